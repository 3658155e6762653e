//! Compiled kernels and autotune results kept between runs, so that only the first run on an
//! adapter compiles and tunes.
//!
//! CubeCL keeps both in its active "environment" when its `persistence` feature is on: autotune
//! results for every backend, compiled SPIR-V on Vulkan. cogview builds CubeCL's environment crate
//! from `vendor/cubecl-environment`, whose storage is one file per entry (written to a temporary
//! file, then linked or renamed into place: safe with several processes; a torn or corrupted
//! entry reads as a miss and is recomputed and rewritten).
//!
//! The cache lives in `<dir>/<environment>.entries/`. `<dir>` is `--kernel-cache DIR` or
//! `COGVIEW_KERNEL_CACHE=DIR` (`off` turns it off), else the platform's cache directory +
//! `cogview/kernels`. The environment is named after what makes an entry valid: cogview's
//! version (which pins burn and CubeCL) and the adapter's driver and its version. A cogview or driver upgrade therefore starts
//! a new environment and never reads an old entry. CubeCL's own namespaces add its version, the
//! device and a checksum of the kernels tuned.
//!
//! The environment is process-wide and must be chosen before the first GPU device starts:
//! [`set_location`] (the CLI's flags) first, then [`device::open`](crate::device::open) calls
//! [`activate`] for the first GPU adapter it brings up.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cubecl::config::cache::CacheConfig;
use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use serde::Serialize;

use crate::device::AdapterInfo;

/// Where the cache goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CacheLocation {
    /// `COGVIEW_KERNEL_CACHE` (a directory, or `off`), else the platform's cache directory +
    /// `cogview/kernels`.
    #[default]
    Default,
    Dir(PathBuf),
    /// Nothing persists: every process compiles and tunes again.
    Off,
}

/// The cache a process uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelCache {
    /// The directory environments are kept in.
    pub dir: PathBuf,
    /// The environment: `cogview-<version>-<hash of the adapter and driver>`.
    pub environment: String,
    /// The environment's entries (`<dir>/<environment>.entries`).
    pub entries: PathBuf,
    /// Whether it held nothing when the process started: the first run on this adapter and
    /// driver, which compiles and tunes every kernel it meets.
    pub fresh: bool,
}

fn requested() -> &'static Mutex<CacheLocation> {
    static REQUESTED: OnceLock<Mutex<CacheLocation>> = OnceLock::new();
    REQUESTED.get_or_init(Default::default)
}

fn activated() -> &'static OnceLock<Option<KernelCache>> {
    static ACTIVATED: OnceLock<Option<KernelCache>> = OnceLock::new();
    &ACTIVATED
}

/// Chooses where the cache goes; takes effect at the first GPU device of the process.
pub fn set_location(location: CacheLocation) {
    if activated().get().is_some() {
        tracing::warn!("the kernel cache was already chosen when a GPU started; {location:?} applies to the next process");
    }
    *requested().lock().unwrap_or_else(|e| e.into_inner()) = location;
}

/// The directory for `location`, or `None` when off or when the platform names no cache
/// directory (then nothing persists).
pub fn dir_of(location: &CacheLocation) -> Option<PathBuf> {
    match location {
        CacheLocation::Off => None,
        CacheLocation::Dir(dir) => Some(dir.clone()),
        CacheLocation::Default => match std::env::var_os("COGVIEW_KERNEL_CACHE").filter(|v| !v.is_empty()) {
            Some(v) if v == "off" => None,
            Some(dir) => Some(PathBuf::from(dir)),
            None => dirs::cache_dir().map(|d| d.join("cogview").join("kernels")),
        },
    }
}

/// The environment name for `adapter`: cogview's version and a hash of what identifies the
/// adapter's driver build (name, vendor, API, driver and its version). FNV-1a: stable across
/// builds, unlike std's hasher.
pub fn environment_name(adapter: &AdapterInfo) -> String {
    let identity = format!("{}\0{}\0{}\0{}", adapter.name, adapter.vendor_id, adapter.api, adapter.driver);
    let hash = identity.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3));
    format!("cogview-{}-{hash:016x}", env!("CARGO_PKG_VERSION"))
}

/// Sets CubeCL's configuration once per process, before its first GPU device starts: the
/// environment pointed at the cache for `adapter`, and the loggers
/// [`kernel_activity`](crate::kernel_activity) counts from. Later calls return the first one's
/// cache. `None`: nothing persists (turned off, no cache directory, or CubeCL's configuration was
/// already read).
pub fn activate(adapter: &AdapterInfo) -> Option<KernelCache> {
    activated()
        .get_or_init(|| {
            let location = requested().lock().unwrap_or_else(|e| e.into_inner()).clone();
            // CubeCL's own configuration (cubecl.toml, CUBECL_* variables), with the environment
            // set here and compiled kernels cached (autotune results are unless cubecl.toml says
            // `autotune.disable_cache`).
            let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
            crate::kernel_activity::configure(&mut config);
            let cache = dir_of(&location).map(|dir| {
                let environment = environment_name(adapter);
                let entries = entries_dir(&dir, &environment);
                let fresh = !has_entries(&entries);
                config.environment.name = environment.clone();
                config.environment.path = CacheConfig::Directory(dir.clone());
                config.compilation.cache = true;
                KernelCache { dir, environment, entries, fresh }
            });
            if cache.is_none() {
                // Nothing persists: CubeCL's stores keep their entries in this process's memory.
                // Left to itself CubeCL would keep autotune and throughput results in its default
                // environment (`target/environment` under the outermost Cargo project above the
                // working directory, else the user's cache directory) and read them back in later
                // runs. Its own switches for that (`disable_cache`) would also forget within the
                // process: the throughput probes would run again at every tuning.
                cubecl::environment::keep_in_memory();
            }
            if !CubeClRuntimeConfig::try_set(config) {
                tracing::warn!("CubeCL's configuration was read before cogview set it; kernels are not cached and not counted");
                return None;
            }
            if let Some(c) = &cache {
                tracing::info!(dir = %c.entries.display(), fresh = c.fresh, "kernel cache");
            }
            cache
        })
        .clone()
}

/// The cache this process uses, once a GPU device started.
pub fn active() -> Option<KernelCache> {
    activated().get().cloned().flatten()
}

/// Where an environment's entries are (`vendor/cubecl-environment`'s file storage).
pub fn entries_dir(dir: &Path, environment: &str) -> PathBuf {
    dir.join(format!("{environment}.entries"))
}

/// Whether `dir` holds any entry file, at any depth.
fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let path = e.path();
            if path.is_dir() { has_entries(&path) } else { !e.file_name().to_string_lossy().starts_with('.') }
        })
    })
}

/// Entry files and their bytes under `dir`.
pub fn size_of(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else { return (0, 0) };
    entries.flatten().fold((0, 0), |(n, bytes), e| {
        let path = e.path();
        if path.is_dir() {
            let (dn, db) = size_of(&path);
            (n + dn, bytes + db)
        } else if e.file_name().to_string_lossy().starts_with('.') {
            (n, bytes)
        } else {
            (n + 1, bytes + e.metadata().map_or(0, |m| m.len()))
        }
    })
}
