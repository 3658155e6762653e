//! The non-finite guard: a NaN or an inf is caught where it is born, named, and never becomes a
//! PNG.
//!
//! After each stage (the text embeddings, every transformer call, the VAE output) one device
//! reduction counts the non-finite values; only that count is read back. On a hit, the failing
//! call runs again with a probe on every module output, which names the first module whose output
//! is not finite — what a PyTorch forward hook would show. `--check-finite all` keeps that probe
//! on for every call.

use std::time::Instant;

use burn::tensor::{DType, Device, Tensor};
use cogview_models::Probe;
use serde::Serialize;

use crate::dtype::ComputeDtype;
use crate::error::{NonFinite, RuntimeError};
use crate::memory::PeakMemory;
use crate::precision::{Precision, PrecisionDecision};
use crate::progress::Stage;

/// `--check-finite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckFinite {
    /// One count after each stage call (cheap); per-module checks only to localise a hit.
    #[default]
    Stages,
    /// Every module output of every call.
    All,
}

impl std::str::FromStr for CheckFinite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stages" => Ok(Self::Stages),
            "all" => Ok(Self::All),
            _ => Err(format!("`{s}`: use stages or all")),
        }
    }
}

/// How many values of `t` are NaN or ±inf: `0 · x` is NaN exactly for those, so one
/// elementwise op and one sum on the device, one integer read back.
pub fn count_nonfinite<const D: usize>(t: &Tensor<D>) -> u64 {
    let n: i64 = t.clone().mul_scalar(0.0).is_nan().int().sum().into_scalar::<i64>();
    n.max(0) as u64
}

/// Finds the first module whose output is not finite, when enabled.
#[derive(Debug, Default)]
pub struct FirstNonFinite {
    pub enabled: bool,
    /// The module's name and how many of its outputs were non-finite.
    pub found: Option<(String, u64)>,
}

impl FirstNonFinite {
    pub fn on() -> Self {
        Self { enabled: true, found: None }
    }
}

impl Probe for FirstNonFinite {
    fn check<const D: usize>(&mut self, name: impl FnOnce() -> String, output: &Tensor<D>) {
        if !self.enabled || self.found.is_some() {
            return;
        }
        let n = count_nonfinite(output);
        if n > 0 {
            self.found = Some((name(), n));
        }
    }
}

/// The probe a guarded call runs with: the first-non-finite check (when on), and for the
/// benchmark a memory sample at every module output.
pub struct CallProbe<'a> {
    pub finite: FirstNonFinite,
    memory: Option<(&'a Device, &'a mut PeakMemory)>,
}

impl Probe for CallProbe<'_> {
    fn check<const D: usize>(&mut self, name: impl FnOnce() -> String, output: &Tensor<D>) {
        self.finite.check(name, output);
        if let Some((device, peak)) = &mut self.memory {
            peak.sample(device);
        }
    }
}

/// One stage call, as the guard names it.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub stage: Stage,
    /// The denoising step (0-based) and its timestep.
    pub step: Option<(usize, i64)>,
    pub dtype: DType,
}

/// What a guarded call gave.
pub enum Guarded<T> {
    /// A finite output, and the seconds its check took.
    Finite(T, f64),
    /// The output was not finite, and the precision policy says to redo the stage in f32 (the
    /// fallback is recorded).
    RedoInF32,
}

/// How a run treats non-finite values: the one place that checks a stage call, names the first
/// bad module, and decides between an f32 redo and an error.
#[derive(Clone, Debug)]
pub struct Guard {
    /// Under `auto` below f32, a stage that goes non-finite is redone in f32; otherwise the run
    /// stops.
    pub precision: PrecisionDecision,
    pub check: CheckFinite,
}

impl Guard {
    pub fn new(precision: PrecisionDecision) -> Self {
        Self { precision, check: CheckFinite::Stages }
    }

    /// Runs `call`, counts the non-finite values `count` finds in its output (after waiting
    /// for the device, so the check's time is its own), and on a hit re-runs the call with
    /// the probe on (unless it already was) to name the first non-finite module. Then either
    /// [`Guarded::RedoInF32`] (recorded in `fallbacks`) or the error that stops the run.
    /// `memory` samples the allocator at every module output of the first call.
    pub fn run<T>(
        &self,
        at: Call,
        device: &Device,
        memory: Option<&mut PeakMemory>,
        fallbacks: &mut Vec<String>,
        mut call: impl FnMut(&mut CallProbe) -> Result<T, RuntimeError>,
        count: impl Fn(&T) -> u64,
    ) -> Result<Guarded<T>, RuntimeError> {
        let finite = FirstNonFinite { enabled: self.check == CheckFinite::All, found: None };
        let mut probe = CallProbe { finite, memory: memory.map(|p| (device, p)) };
        let out = call(&mut probe)?;
        if let Err(e) = device.sync() {
            tracing::debug!("guard: sync failed: {e}");
        }
        let start = Instant::now();
        let n = count(&out);
        let seconds = start.elapsed().as_secs_f64();
        if n == 0 && probe.finite.found.is_none() {
            return Ok(Guarded::Finite(out, seconds));
        }
        drop(out);
        let module = match probe.finite.found {
            Some((m, _)) => Some(m),
            None => {
                let mut again = CallProbe { finite: FirstNonFinite::on(), memory: None };
                // The re-run only looks for the module; its own failure says nothing new.
                let _ = call(&mut again);
                again.finite.found.map(|(m, _)| m)
            }
        };
        let dtype = ComputeDtype::of(at.dtype).unwrap_or(ComputeDtype::F32);
        let hit = NonFinite { stage: at.stage, step: at.step, module, count: n, dtype };
        if self.precision.requested == Precision::Auto && dtype != ComputeDtype::F32 {
            let note = format!("{hit}; redone in f32 (--precision auto)");
            tracing::warn!("{note}");
            fallbacks.push(note);
            Ok(Guarded::RedoInF32)
        } else {
            Err(RuntimeError::NonFinite(hit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn counts_nan_and_inf() {
        let d = Device::flex();
        let t = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, -3.0], [2, 3]), &d);
        assert_eq!(count_nonfinite(&t), 3);
        assert_eq!(count_nonfinite(&Tensor::<1>::from_data(TensorData::new(vec![f32::MAX, f32::MIN], [2]), &d)), 0);
        let mut p = FirstNonFinite::on();
        p.check(|| "a".into(), &Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &d));
        p.check(|| "b".into(), &t);
        p.check(|| "c".into(), &t);
        assert_eq!(p.found, Some(("b".to_string(), 3)));
    }

    #[test]
    fn messages_say_what_to_do() {
        let mut e = NonFinite {
            stage: Stage::Transformer,
            step: Some((0, 999)),
            module: Some("transformer_blocks.0.ff.net.0.proj".into()),
            count: 12,
            dtype: ComputeDtype::F16,
        };
        let m = e.to_string();
        assert!(m.contains("in the transformer at step 0 (timestep 999), first in transformer_blocks.0.ff.net.0.proj"), "{m}");
        assert!(m.contains("--precision f32"), "{m}");
        e.dtype = ComputeDtype::F32;
        assert!(e.to_string().contains("weights are probably broken"));
    }

    /// The guard's three outcomes on a stage call that can be made to fail: finite, a redo in
    /// f32 under `auto` below f32 (recorded), and an error naming the module otherwise.
    #[test]
    fn run_checks_localises_and_decides() {
        use crate::precision::PrecisionDecision;
        let d = Device::flex();
        let call = |bad: bool| {
            move |probe: &mut CallProbe| -> Result<Tensor<1>, RuntimeError> {
                let ok = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &Device::flex());
                probe.check(|| "first".into(), &ok);
                let out = if bad { ok.clone().div_scalar(0.0) } else { ok };
                probe.check(|| "second".into(), &out);
                Ok(out)
            }
        };
        let at = Call { stage: Stage::Decoder, step: None, dtype: DType::F16 };
        let mut fallbacks = Vec::new();
        let auto = Guard::new(PrecisionDecision::fixed(Precision::Auto, ComputeDtype::F16));
        assert!(matches!(auto.run(at, &d, None, &mut fallbacks, call(false), count_nonfinite).unwrap(), Guarded::Finite(..)));
        assert!(matches!(auto.run(at, &d, None, &mut fallbacks, call(true), count_nonfinite).unwrap(), Guarded::RedoInF32));
        assert_eq!(fallbacks.len(), 1);
        assert!(fallbacks[0].contains("first in second") && fallbacks[0].contains("redone in f32"), "{fallbacks:?}");
        let explicit = Guard::new(PrecisionDecision::fixed(Precision::F16, ComputeDtype::F16));
        let Err(RuntimeError::NonFinite(hit)) = explicit.run(at, &d, None, &mut fallbacks, call(true), count_nonfinite) else {
            panic!("an explicit f16 run stops");
        };
        assert_eq!((hit.stage, hit.module.as_deref(), hit.count, hit.dtype), (Stage::Decoder, Some("second"), 2, ComputeDtype::F16));
        // In f32 even `auto` stops: there is nothing wider to fall back to.
        let f32_at = Call { dtype: DType::F32, ..at };
        assert!(auto.run(f32_at, &d, None, &mut fallbacks, call(true), count_nonfinite).is_err());
    }
}
