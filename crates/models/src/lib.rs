//! Pure burn modules of CogView3-Plus-3B: the T5 text encoder, the CogView3-Plus DiT, the
//! AutoencoderKL and the CogVideoX DDIM scheduler. No files, no printing: weights come through
//! [`weights::WeightSource`], which `cogview-import` implements.

pub mod dit;
pub mod nn;
pub mod probe;
pub mod scheduler;
pub mod storage;
pub mod t5;
pub mod vae;
pub mod weights;

pub use probe::{NoProbe, Probe};
pub use storage::{Weight, WeightStorage};
pub use weights::WeightSource;
