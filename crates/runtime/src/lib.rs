//! cogview's runtime: adapters and the precision policy (more to come: memory, the pipeline,
//! the non-finite guard).

pub mod batch;
pub mod bench;
pub mod device;
pub mod error;
pub mod guard;
pub mod memory;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod precision;
pub mod selftest;
pub mod target;
pub mod text;

pub use device::{AdapterInfo, Api, BackendChoice, Capabilities, DeviceChoice};
pub use error::{DeviceError, PrecisionError, RuntimeError};
pub use precision::{ComputeDtype, Precision, PrecisionDecision};

pub use target::{Survey, SurveyRow, Target, survey, target};

pub use cogview_import as import;
pub use cogview_models as models;
