//! Reads a diffusers CogView3-Plus model folder (model_index.json, config.json files, single or
//! sharded safetensors) and loads its weights into the modules of `cogview-models`, reporting
//! every missing, unexpected or misshapen key at once.

pub mod checkpoint;
pub mod error;
pub mod hub;
pub mod inspect;
pub mod location;
pub mod model;
pub mod report;
pub mod safetensors;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use error::ImportError;
pub use model::{ModelFolder, ModelIndex};
pub use report::LoadReport;
pub use weights::{Component, KeyRecorder, Loader};
pub use tokenizer::{PromptTokenizer, Tokens};
