//! cogview's runtime: CogView3-Plus-3B text-to-image on any GPU burn's wgpu backend reaches
//! (Vulkan, Metal, DX12) or on burn's CPU backend, exact to diffusers.
//!
//! A [`Pipeline`] is loaded once and generates any number of images:
//!
//! ```no_run
//! use cogview_runtime::{BackendChoice, DeviceChoice, Options, Pipeline, Precision, Quiet, Request};
//! use cogview_runtime::import::ModelFolder;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let folder = ModelFolder::open("path/to/CogView3-Plus-3B")?;
//! let target = cogview_runtime::target(DeviceChoice::Auto, BackendChoice::Auto, Precision::Auto)?;
//! let mut pipeline = Pipeline::load(folder, target, Options { keep_loaded: true, ..Options::default() })?;
//! let mut request = Request::new("A photo of a red fox sitting in the snow at sunrise");
//! request.seed = 7;
//! let image = pipeline.generate(&request, &mut Quiet)?;
//! println!("{}x{} pixels, {} RGB bytes", image.width, image.height, image.rgb.len());
//! # Ok(())
//! # }
//! ```
//!
//! - [`target`] chooses the adapter and the compute dtype ([`precision`]: bf16 where the
//!   adapter computes bf16, f32 everywhere else, f16 only when asked for);
//! - [`plan`] decides, before any weight is read, what stays resident, what is streamed and
//!   what is tiled to keep within a memory budget;
//! - [`guard`] checks every stage's output for NaN and inf, names the first bad module, and
//!   never lets a non-finite value become a picture;
//! - the stages are [`text`], [`denoise`] and [`decode`], run over any weight [`source`]:
//!   a checkpoint folder, or random weights (`cogview bench`).
//!
//! See `examples/generate.rs` for a program that writes a PNG.

pub mod batch;
pub mod bench;
pub mod decode;
pub mod denoise;
pub mod device;
pub mod driver_output;
pub mod dtype;
pub mod error;
pub mod guard;
pub mod image_encoder;
pub mod init_image;
pub mod kernel_activity;
pub mod kernel_cache;
pub mod memory;
pub mod metadata;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod precision;
pub mod progress;
pub mod request;
pub mod selftest;
pub mod source;
pub mod target;
pub mod text;

pub use device::{AdapterInfo, Api, BackendChoice, Capabilities, DeviceChoice, DeviceError};
pub use dtype::ComputeDtype;
pub use error::{NonFinite, RuntimeError};
pub use pipeline::{Batch, Options, Output, Pipeline};
pub use precision::{Precision, PrecisionDecision, PrecisionError};
pub use progress::{Progress, Quiet, Stage};
pub use request::{Field, Request, RequestError};
pub use target::{Survey, SurveyRow, Target, survey, target};

pub use cogview_import as import;
pub use cogview_models as models;
/// `COGVIEW_MATMUL_KERNEL`: one named kernel for the GPU's matrix products instead of autotune.
pub use cogview_shaders::matmul_kernel;
