//! The non-finite guard: a NaN or an inf is caught where it is born, named, and never becomes a
//! PNG.
//!
//! After each stage (the text embeddings, every transformer call, the VAE output) one device
//! reduction counts the non-finite values; only that count is read back. On a hit, the failing
//! call runs again with a probe on every module output, which names the first module whose output
//! is not finite — what a PyTorch forward hook would show. `--check-finite all` keeps that probe
//! on for every call.

use burn::tensor::Tensor;
use cogview_models::Probe;
use serde::Serialize;

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

/// Where a non-finite value was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NonFinite {
    /// `text encoder`, `transformer` or `VAE decoder`.
    pub stage: &'static str,
    /// The denoising step (0-based) and its timestep, for the transformer.
    pub step: Option<(usize, i64)>,
    /// The first module with a non-finite output, when localisation found one.
    pub module: Option<String>,
    /// Non-finite values in the stage's output.
    pub count: u64,
    /// The dtype the stage computed in.
    pub dtype: String,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} non-finite value(s) (NaN/inf) in the {}", self.count, self.stage)?;
        if let Some((i, t)) = self.step {
            write!(f, " at step {i} (timestep {t})")?;
        }
        match &self.module {
            Some(m) => write!(f, ", first in {m}")?,
            None => write!(f, " (no single module's output was non-finite)")?,
        }
        if self.dtype == "f32" {
            write!(f, ", computing in f32: the weights are probably broken (a sound model never gets here in f32)")
        } else {
            write!(f, ", computing in {}: use --precision f32", self.dtype)
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
        let mut e = NonFinite { stage: "transformer", step: Some((0, 999)), module: Some("transformer_blocks.0.ff.net.0.proj".into()), count: 12, dtype: "f16".into() };
        let m = e.to_string();
        assert!(m.contains("at step 0 (timestep 999), first in transformer_blocks.0.ff.net.0.proj") && m.contains("--precision f32"), "{m}");
        e.dtype = "f32".into();
        assert!(e.to_string().contains("weights are probably broken"));
    }
}
