//! What an image was made from, written into its PNG so that other tools can read it and
//! cogview can make it again:
//! - `parameters`: the AUTOMATIC1111 text that stable-diffusion.cpp writes and that sd-webui's
//!   PNG Info, Civitai and InvokeAI read (prompt lines, `Negative prompt: …`, then one line of
//!   `Key: value` pairs, a value quoted as JSON when it holds a comma, a colon or a newline);
//! - `cogview`: every setting as one JSON object ([`Settings`]), what `cogview info` prints and
//!   `generate --from` reruns;
//! - `Software`, the PNG standard's keyword.
//!
//! No chunk is named `prompt` or `workflow`: ComfyUI reads those as its own workflow JSON.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dtype::ComputeDtype;
use crate::output::{OutputError, read_png_text};
use crate::pipeline::Output;
use crate::precision::Precision;
use crate::request::Request;
use crate::target::Target;

/// The `cogview` chunk's format; a reader refuses a newer one.
pub const FORMAT: u32 = 1;

/// The sampler, as A1111 names it: CogVideoX's DDIM (v-prediction, trailing timesteps).
pub const SAMPLER: &str = "DDIM";

/// Everything an image was made with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub format: u32,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
    pub max_sequence_length: usize,
    pub original_size: Option<[usize; 2]>,
    pub crop_coords: [usize; 2],
    /// The `--model` given (a hub id or a folder).
    pub model: String,
    /// What was asked for, and the dtype the image was computed in, with the reason.
    pub precision_requested: Precision,
    pub precision: ComputeDtype,
    /// The dtype the linear layers' matrix products read, where it is not `precision` (bf16
    /// products with f32 sums in an f32 run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_products: Option<ComputeDtype>,
    /// Joint attention ran on f16 tiles with f32 sums (beside bf16 products).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub f16_tile_attention: bool,
    pub precision_reason: String,
    /// `NAME (API, TYPE) (compiler)`.
    pub adapter: String,
    /// Stages redone in f32 after a non-finite value under `--precision auto`.
    pub fallbacks: Vec<String>,
    /// The initial latents' file, when they came from `--latents` instead of the seed.
    pub latents: Option<String>,
    /// img2img: the picture the image started from.
    #[serde(default)]
    pub init_image: Option<InitImageInfo>,
    /// `cogview x.y.z`.
    pub software: String,
}

/// An img2img init image as the metadata records it: its file name and content, and the
/// strength it was used at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitImageInfo {
    pub name: String,
    pub sha256: String,
    pub strength: f64,
}

/// `cogview 0.1.0`.
pub fn software() -> String {
    format!("cogview {}", env!("CARGO_PKG_VERSION"))
}

impl Settings {
    /// The settings of `output`, made from `request` with `model` on `target`.
    pub fn new(request: &Request, output: &Output, model: &str, target: &Target) -> Self {
        Self {
            format: FORMAT,
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            seed: request.seed,
            steps: request.steps,
            guidance: request.guidance,
            width: output.width,
            height: output.height,
            max_sequence_length: request.max_sequence_length,
            original_size: request.original_size,
            crop_coords: request.crop_coords,
            model: model.to_string(),
            precision_requested: target.precision.requested,
            precision: target.precision.dtype,
            matrix_products: (target.precision.matmul != target.precision.dtype).then_some(target.precision.matmul),
            f16_tile_attention: target.precision.flash.is_some(),
            precision_reason: target.precision.reason.clone(),
            adapter: format!("{} ({})", target.adapter.label(), target.capabilities.compiler),
            fallbacks: output.fallbacks.clone(),
            latents: None,
            init_image: request.init_image.as_ref().map(|i| InitImageInfo { name: i.name.clone(), sha256: i.sha256.clone(), strength: request.strength }),
            software: software(),
        }
    }

    /// `f32`, `f32, bf16 matrix products`, or `f32, bf16 matrix products, f16-tile attention`
    /// (as `PrecisionDecision::summary`).
    pub fn precision_summary(&self) -> String {
        crate::precision::summary(self.precision, self.matrix_products, self.f16_tile_attention)
    }

    /// A1111's `parameters` text.
    pub fn parameters(&self) -> String {
        let mut s = self.prompt.clone();
        if let Some(n) = self.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s += &format!("\nNegative prompt: {n}");
        }
        let mut pairs = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", SAMPLER.to_string()),
            ("CFG scale", self.guidance.to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
            ("Model", self.model.clone()),
            ("Version", self.software.clone()),
            ("Precision", self.precision_summary()),
            ("Adapter", self.adapter.clone()),
        ];
        if self.max_sequence_length != crate::request::MAX_SEQUENCE_LENGTH {
            pairs.push(("Max sequence length", self.max_sequence_length.to_string()));
        }
        if let Some([h, w]) = self.original_size {
            pairs.push(("Original size", format!("{w}x{h}")));
        }
        if self.crop_coords != [0, 0] {
            pairs.push(("Crop top left", format!("{}x{}", self.crop_coords[0], self.crop_coords[1])));
        }
        if let Some(i) = &self.init_image {
            pairs.push(("Denoising strength", i.strength.to_string()));
            pairs.push(("Init image", i.name.clone()));
            pairs.push(("Init image hash", i.sha256.clone()));
        }
        let line: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}: {}", quote(&v))).collect();
        s + "\n" + &line.join(", ")
    }

    /// The PNG text chunks: `parameters`, `cogview` (JSON) and `Software`.
    pub fn png_text(&self) -> Vec<(String, String)> {
        vec![
            ("parameters".into(), self.parameters()),
            ("cogview".into(), serde_json::to_string(self).expect("settings serialize")),
            ("Software".into(), self.software.clone()),
        ]
    }

    /// The settings a cogview PNG carries.
    pub fn read_png(path: &Path) -> Result<Self, MetadataError> {
        let chunks = read_png_text(path)?;
        let json = chunks.iter().find(|(k, _)| k == "cogview").map(|(_, v)| v).ok_or_else(|| MetadataError::NotCogview {
            path: path.display().to_string(),
            a1111: chunks.iter().any(|(k, _)| k == "parameters"),
        })?;
        let settings: Settings = serde_json::from_str(json)
            .map_err(|e| MetadataError::Bad { path: path.display().to_string(), message: e.to_string() })?;
        if settings.format > FORMAT {
            return Err(MetadataError::Bad {
                path: path.display().to_string(),
                message: format!("written by a newer cogview (format {} > {FORMAT})", settings.format),
            });
        }
        Ok(settings)
    }
}

/// A1111's `quote`: as is, unless it holds a comma, a newline or a colon; then a JSON string.
pub fn quote(value: &str) -> String {
    if value.contains([',', '\n', ':']) { serde_json::to_string(value).expect("a string serializes") } else { value.to_string() }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(transparent)]
    Png(#[from] OutputError),
    #[error("{path} has no cogview settings{}", if *a1111 { " (it has A1111 `parameters`, written by another tool)" } else { "" })]
    NotCogview { path: String, a1111: bool },
    #[error("{path}: the cogview settings cannot be read: {message}")]
    Bad { path: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_with_separators_are_quoted_as_a1111_does() {
        assert_eq!(quote("1024x1024"), "1024x1024");
        assert_eq!(quote("NVIDIA H200 (Vulkan, discrete)"), "\"NVIDIA H200 (Vulkan, discrete)\"");
        assert_eq!(quote("a: b"), "\"a: b\"");
    }
}
