//! The runtime's error: each message names what went wrong and what to do about it.

use serde::Serialize;

use crate::device::DeviceError;
use crate::dtype::ComputeDtype;
use crate::precision::PrecisionError;
use crate::progress::Stage;
use crate::request::RequestError;

/// Any runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error(transparent)]
    Import(#[from] cogview_import::ImportError),
    /// A request that cannot run; the message names the field (as its CLI flag).
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("{0}")]
    NonFinite(NonFinite),
    /// [`crate::Progress::cancelled`] said stop.
    #[error("cancelled in the {stage}{}", step.map(|s| format!(" before step {s}")).unwrap_or_default())]
    Cancelled { stage: Stage, step: Option<usize> },
}

impl RuntimeError {
    /// The stage a failure happened in, when it happened on the device.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            RuntimeError::NonFinite(n) => Some(n.stage),
            RuntimeError::Cancelled { stage, .. } => Some(*stage),
            _ => None,
        }
    }
}

/// Where a non-finite value was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NonFinite {
    pub stage: Stage,
    /// The denoising step (0-based) and its timestep, for the transformer.
    pub step: Option<(usize, i64)>,
    /// The first module with a non-finite output, when localisation found one.
    pub module: Option<String>,
    /// Non-finite values in the stage's output.
    pub count: u64,
    /// The dtype the stage computed in.
    pub dtype: ComputeDtype,
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
        match self.dtype {
            ComputeDtype::F32 => write!(f, ", computing in f32: the weights are probably broken (a sound model never gets here in f32)"),
            reduced => write!(f, ", computing in {reduced}: use --precision f32"),
        }
    }
}
