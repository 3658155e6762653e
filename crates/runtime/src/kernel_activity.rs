//! What CubeCL compiles and tunes while cogview runs, counted as it happens: a first run on an
//! adapter spends most of its time there, so the progress bar says so, `generate` and
//! `cogview bench` report it per stage, and a run that seems to hang names the last kernel
//! compiled and when.
//!
//! CubeCL tells it through its loggers. `configure` adds a `log`-crate sink to two of them:
//! compilation at its basic level (`[Compiling kernel] NAME`, one line per kernel compiled; a
//! kernel read back from the kernel cache is not compiled and says nothing) and autotune at its
//! minimal level (`Fastest result NAME-KEY…`, one line per key tuned; a key found in the cache is
//! not tuned). Whatever else CubeCL's configuration asks for (`CUBECL_DEBUG_LOG`: files, more
//! detail) stays as it is. The records reach [`observe`] through the process's tracing
//! subscriber, which gets them from the `log` crate: add [`layer`] to it.
//!
//! The counts are process-wide; a stage reads the difference around itself ([`Kernels::since`]).

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cubecl::config::CubeClRuntimeConfig;
use cubecl::config::autotune::AutotuneLogLevel;
use cubecl::config::compilation::CompilationLogLevel;
use serde::Serialize;
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::layer::Context;
use tracing_subscriber::{Layer, registry::LookupSpan};

/// CubeCL's log targets for the two loggers [`configure`] listens to.
const COMPILATION: &str = "cubecl::compilation";
const AUTOTUNE: &str = "cubecl::autotune";

static COMPILED: AtomicU64 = AtomicU64::new(0);
static TUNED: AtomicU64 = AtomicU64::new(0);
static LAST: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Kernels compiled and autotune keys tuned, since the process started or over a stretch of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Kernels {
    /// Kernels compiled (for the GPU's compiler: WGSL, SPIR-V or MSL, then the driver's); not
    /// those read from the kernel cache.
    pub compiled: u64,
    /// Autotune keys tuned: each compiles and times its candidates (matrix products, fused
    /// element-wise blocks, reductions, convolutions, attention at one shape class).
    pub tuned: u64,
}

impl Kernels {
    /// The counts so far in this process.
    pub fn now() -> Self {
        Kernels { compiled: COMPILED.load(Ordering::Relaxed), tuned: TUNED.load(Ordering::Relaxed) }
    }

    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Kernels) -> Kernels {
        Kernels { compiled: self.compiled.saturating_sub(earlier.compiled), tuned: self.tuned.saturating_sub(earlier.tuned) }
    }

    pub fn is_empty(&self) -> bool {
        *self == Kernels::default()
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} kernel{} compiled, {} tuned", self.compiled, if self.compiled == 1 { "" } else { "s" }, self.tuned)
    }
}

/// Turns off the backtraces `std::backtrace::Backtrace::capture` takes, unless
/// `RUST_LIB_BACKTRACE` is set already. CubeCL's SPIR-V compiler (pliron) builds an error with a
/// captured backtrace on paths that fail as a matter of course (a cast tried on every operation
/// of a dialect conversion): about 90 000 of them for the tiny model's 160 kernels. Under
/// `RUST_BACKTRACE=1`, which many Rust users keep set, each walks the whole stack: a quarter to a
/// third of a run that compiles its kernels. `RUST_LIB_BACKTRACE` governs `Backtrace::capture`
/// alone, so panics still print their backtrace under `RUST_BACKTRACE`; set
/// `RUST_LIB_BACKTRACE=1` to get the errors' back.
///
/// # Safety
/// It sets an environment variable: call it first in `main`, before any other thread starts.
pub unsafe fn skip_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the caller's promise: no other thread runs yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// The last kernel compiled and how long ago; `None` before the first.
pub fn last_compiled() -> Option<(String, Duration)> {
    let last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    last.as_ref().map(|(name, at)| (name.clone(), at.elapsed()))
}

/// Turns on the two CubeCL loggers this module counts from, with a `log`-crate sink, keeping any
/// more detailed level and any other sink the configuration already has.
pub(crate) fn configure(config: &mut CubeClRuntimeConfig) {
    let compilation = &mut config.compilation.logger;
    if matches!(compilation.level, CompilationLogLevel::Disabled) {
        compilation.level = CompilationLogLevel::Basic;
    }
    compilation.log = Some(Default::default());
    let autotune = &mut config.autotune.logger;
    if matches!(autotune.level, AutotuneLogLevel::Disabled) {
        autotune.level = AutotuneLogLevel::Minimal;
    }
    autotune.log = Some(Default::default());
}

/// Counts one of CubeCL's log lines: a compilation's first line (basic or full level) or an
/// autotune result; every other line (a kernel's source, a candidate's timing) counts nothing.
pub fn observe(target: &str, message: &str) {
    if target.starts_with(COMPILATION) {
        let name = if let Some(rest) = message.strip_prefix("[Compiling kernel]") {
            rest.trim()
        } else if message.starts_with("[START_KERNEL_COMPILATION]") {
            message.lines().find_map(|l| l.strip_prefix("name: ")).unwrap_or("").trim()
        } else {
            return;
        };
        COMPILED.fetch_add(1, Ordering::Relaxed);
        let name = if name.is_empty() { "a kernel" } else { name };
        *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some((name.to_string(), Instant::now()));
    } else if target.starts_with(AUTOTUNE) && message.starts_with("Fastest result ") {
        TUNED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The layer that hands CubeCL's compilation and autotune records to [`observe`], whatever the
/// other layers of the subscriber print.
pub fn layer<S>() -> Filtered<ActivityLayer, Targets, S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let targets = Targets::new().with_target(COMPILATION, tracing::Level::INFO).with_target(AUTOTUNE, tracing::Level::INFO);
    ActivityLayer.with_filter(targets)
}

/// See [`layer`].
pub struct ActivityLayer;

impl<S: tracing::Subscriber> Layer<S> for ActivityLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // A record from the `log` crate carries its target in a field; the event's own is "log".
        let target = fields.log_target.as_deref().unwrap_or(event.metadata().target());
        observe(target, &fields.message);
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters are process-wide: the tests that read them take turns.
    static TURN: Mutex<()> = Mutex::new(());

    /// The lines CubeCL writes (cubecl-server's `CompiledKernel` display, cubecl-runtime's
    /// autotune log) count once each; their other lines count nothing. The counters are
    /// process-wide, so the test reads differences.
    #[test]
    fn counts_compilations_and_tuned_keys_from_cubecl_lines() {
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let before = Kernels::now();
        observe(COMPILATION, "[Compiling kernel] MatmulEntry");
        assert_eq!(last_compiled().map(|(n, _)| n), Some("MatmulEntry".to_string()));
        observe(COMPILATION, "[START_KERNEL_COMPILATION]\nname: FusedElemwise\ncube_dim: (16, 16, 1)\n...source...");
        assert_eq!(last_compiled().map(|(n, _)| n), Some("FusedElemwise".to_string()));
        observe(COMPILATION, "[END_KERNEL_COMPILATION]");
        observe(AUTOTUNE, "Fastest result matmul_simple_unit_max-MatmulAutotuneKey { m: 64 }. Top 3 times: []");
        observe(AUTOTUNE, "- Tuning: matmul_simple_unit_min (compilation & bench: 1.2ms)");
        observe("cubecl::profiling", "[Compiling kernel] not a compilation log");
        observe("wgpu_core", "Fastest result not an autotune log");
        let counted = Kernels::now().since(before);
        assert_eq!(counted, Kernels { compiled: 2, tuned: 1 });
        assert_eq!(counted.to_string(), "2 kernels compiled, 1 tuned");
    }

    /// The layer counts what CubeCL's targets log at info, nothing else. (The `log` crate's
    /// records reach it through the CLI's subscriber: the kernel-cache process tests.)
    #[test]
    fn the_layer_counts_cubecl_targets_only() {
        use tracing_subscriber::prelude::*;
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let subscriber = tracing_subscriber::registry().with(layer());
        let before = Kernels::now();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "cubecl::autotune", "Fastest result a-b");
            tracing::info!(target: "elsewhere", "Fastest result a-b");
            tracing::debug!(target: "cubecl::autotune", "Fastest result below the layer's level");
        });
        assert_eq!(Kernels::now().since(before).tuned, 1);
    }
}
