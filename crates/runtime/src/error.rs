//! The runtime's errors. Each message names what went wrong and what to do about it.

use crate::device::Api;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {index}: there is no such adapter ({count} listed by `cogview devices`)")]
    NoSuchDevice { index: usize, count: usize },
    #[error("--device {index} is {adapter}, not a {backend} adapter: drop --backend or pick another device")]
    BackendMismatch { index: usize, adapter: String, backend: Api },
    #[error("--backend {api}: this machine has no {api} adapter (see `cogview devices`)")]
    NoAdapterOnApi { api: Api },
    #[error("{adapter} could not be started: {reason}")]
    Init { adapter: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error("--precision {requested}: {adapter} lacks {missing}; use --precision auto or f32")]
    Unsupported { requested: &'static str, adapter: String, missing: String },
    #[error(
        "--precision {requested}: {adapter} claims {requested} but computes it wrongly \
         (self-test error {error:.3e} > {tolerance:.1e}); use --precision auto or f32"
    )]
    SelfTestFailed { requested: &'static str, adapter: String, error: f64, tolerance: f64 },
}

/// Any runtime failure, for callers that do not care which stage.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Precision(#[from] PrecisionError),
    #[error(transparent)]
    Import(#[from] cogview_import::ImportError),
    /// A request that cannot run (size, steps, latents): the message names the flag.
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    NonFinite(crate::guard::NonFinite),
}
