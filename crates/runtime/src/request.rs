//! What one image is asked for, and the checks that every request passes before any work:
//! the same for the CLI, the library and the server, each error naming the field.

use std::fmt;

use cogview_models::Configs;

use crate::init_image::InitImage;
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;

/// The model card's recommended sizes: 512–2048 per side, multiples of 32, at most 2^21 pixels.
pub const RECOMMENDED: (usize, usize, usize, usize) = (512, 2048, 32, 1 << 21);

/// img2img's default strength.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// The most prompt tokens the text encoder is given: the pipeline's default, the length
/// CogView3-Plus was trained with.
pub const MAX_SEQUENCE_LENGTH: usize = 224;

/// Everything a generation needs besides the model and the device.
#[derive(Clone, Debug, Serialize)]
pub struct Request {
    pub prompt: String,
    /// `None`: zeros as the unconditional embedding (diffusers' default); `Some("")` encodes the
    /// empty prompt.
    pub negative_prompt: Option<String>,
    pub steps: usize,
    /// Classifier-free guidance is on when > 1.
    pub guidance: f32,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub max_sequence_length: usize,
    /// `(height, width)`; the output size when `None`.
    pub original_size: Option<[usize; 2]>,
    /// `(top, left)`.
    pub crop_coords: [usize; 2],
    /// Initial latents `[1, C, H/8, W/8]` instead of seeded noise.
    #[serde(skip)]
    pub latents: Option<Vec<f32>>,
    /// Keep the embeddings, every step's latents and the float image.
    pub keep_tensors: bool,
    /// img2img: the picture to start from (resized to `width` × `height` if it is not).
    #[serde(skip)]
    pub init_image: Option<InitImage>,
    /// img2img: how much of the schedule runs, in [0, 1]. 1 starts from (almost) pure noise; 0
    /// runs no step and returns the init image through the VAE.
    pub strength: f64,
}

impl Request {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            steps: 50,
            guidance: 5.0,
            width: 1024,
            height: 1024,
            seed: 0,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
            original_size: None,
            crop_coords: [0, 0],
            latents: None,
            keep_tensors: false,
            init_image: None,
            strength: DEFAULT_STRENGTH,
        }
    }

    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }

    /// The latent grid `[C, h, w]` of this request's image.
    pub fn latent_shape(&self, configs: &Configs) -> [usize; 3] {
        let f = configs.vae.scale_factor();
        [configs.transformer.in_channels, self.height / f, self.width / f]
    }

    /// Checks every field against the model: an error names the first field that cannot run;
    /// the warnings say what runs but is not what the model card recommends.
    pub fn validate(&self, configs: &Configs) -> Result<Vec<String>, RequestError> {
        let bad = |field, value: &dyn fmt::Display, problem: String| Err(RequestError::new(field, value, problem));
        let max_steps = configs.scheduler.num_train_timesteps;
        if self.steps == 0 || self.steps > max_steps {
            return bad(Field::Steps, &self.steps, format!("must be between 1 and {max_steps}"));
        }
        if !self.guidance.is_finite() {
            return bad(Field::Guidance, &self.guidance, "must be a finite number (1 or less turns guidance off)".into());
        }
        if self.max_sequence_length == 0 || self.max_sequence_length > MAX_SEQUENCE_LENGTH {
            return bad(
                Field::MaxSequenceLength,
                &self.max_sequence_length,
                format!("must be between 1 and {MAX_SEQUENCE_LENGTH} (the length the model was trained with)"),
            );
        }
        if !(0.0..=1.0).contains(&self.strength) {
            return bad(Field::Strength, &self.strength, "must be between 0 and 1".into());
        }
        let warnings = check_size(configs, self.width, self.height)?;
        if let Some(l) = &self.latents {
            let [c, h, w] = self.latent_shape(configs);
            if l.len() != c * h * w {
                return bad(
                    Field::Latents,
                    &format!("with {} values", l.len()),
                    format!("expected [1, {c}, {h}, {w}] for {}x{}", self.width, self.height),
                );
            }
        }
        Ok(warnings)
    }
}

/// Checks a size against the model: an error for what cannot run, warnings for what the model
/// card does not recommend.
pub fn check_size(configs: &Configs, width: usize, height: usize) -> Result<Vec<String>, RequestError> {
    let vae = configs.vae.scale_factor();
    let p = configs.transformer.patch_size;
    let multiple = configs.pixels_per_token();
    let max = configs.transformer.pos_embed_max_size * multiple;
    for (field, v) in [(Field::Width, width), (Field::Height, height)] {
        if v == 0 || v % multiple != 0 {
            let problem = format!("must be a positive multiple of {multiple} (VAE factor {vae} × patch {p})");
            return Err(RequestError::new(field, &v, problem));
        }
        if v > max {
            let problem = format!("at most {max} (the position table covers {} patches per side)", configs.transformer.pos_embed_max_size);
            return Err(RequestError::new(field, &v, problem));
        }
    }
    let (lo, hi, m, area) = RECOMMENDED;
    let mut warnings = Vec::new();
    if width < lo || height < lo || width > hi || height > hi || !width.is_multiple_of(m) || !height.is_multiple_of(m) || width * height > area {
        warnings.push(format!(
            "{width}x{height} is outside the model card's recommended sizes ({lo}–{hi} per side, multiples of {m}, \
             at most {area} pixels): expect lower quality"
        ));
    }
    Ok(warnings)
}

/// The seeded initial noise: `ChaCha8Rng::seed_from_u64(seed)` (rand_chacha 0.9), standard
/// normal samples (rand_distr 0.5's `StandardNormal`) in f32, filled in NCHW order. The same
/// seed gives the same latents on every machine and device.
pub fn seeded_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect()
}

/// A field of a request, as the CLI and the JSON interfaces name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Prompt,
    NegativePrompt,
    Steps,
    Guidance,
    Width,
    Height,
    Seed,
    MaxSequenceLength,
    OriginalSize,
    CropCoords,
    Latents,
    Count,
    InitImage,
    Strength,
}

impl Field {
    /// The CLI flag.
    pub fn flag(self) -> &'static str {
        match self {
            Field::Prompt => "--prompt",
            Field::NegativePrompt => "--negative-prompt",
            Field::Steps => "--steps",
            Field::Guidance => "--guidance",
            Field::Width => "--width",
            Field::Height => "--height",
            Field::Seed => "--seed",
            Field::MaxSequenceLength => "--max-sequence-length",
            Field::OriginalSize => "--original-size",
            Field::CropCoords => "--crop-coords",
            Field::Latents => "--latents",
            Field::Count => "--count",
            Field::InitImage => "--init-image",
            Field::Strength => "--strength",
        }
    }

    /// The key in JSON (JSON Lines batches, the server's requests).
    pub fn key(self) -> &'static str {
        match self {
            Field::Prompt => "prompt",
            Field::NegativePrompt => "negative_prompt",
            Field::Steps => "steps",
            Field::Guidance => "guidance",
            Field::Width => "width",
            Field::Height => "height",
            Field::Seed => "seed",
            Field::MaxSequenceLength => "max_sequence_length",
            Field::OriginalSize => "original_size",
            Field::CropCoords => "crop_coords",
            Field::Latents => "latents",
            Field::Count => "count",
            Field::InitImage => "init_image",
            Field::Strength => "strength",
        }
    }
}

/// A request that cannot run: which field, its value, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} {value}: {problem}", field.flag())]
pub struct RequestError {
    pub field: Field,
    pub value: String,
    pub problem: String,
}

impl RequestError {
    pub fn new(field: Field, value: &dyn fmt::Display, problem: impl Into<String>) -> Self {
        Self { field, value: value.to_string(), problem: problem.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_checked_and_named() {
        let c = Configs::tiny();
        let ok = {
            let mut r = Request::new("a cat");
            (r.width, r.height, r.steps) = (64, 96, 4);
            r
        };
        assert!(ok.validate(&c).unwrap()[0].contains("outside the model card's recommended sizes"));
        let case = |edit: &dyn Fn(&mut Request), field: Field, needle: &str| {
            let mut r = ok.clone();
            edit(&mut r);
            let e = r.validate(&c).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(needle), "`{e}` should contain `{needle}`");
        };
        case(&|r| r.steps = 0, Field::Steps, "--steps 0: must be between 1 and 1000");
        case(&|r| r.steps = 1001, Field::Steps, "--steps 1001");
        case(&|r| r.guidance = f32::NAN, Field::Guidance, "--guidance NaN: must be a finite number");
        case(&|r| r.guidance = f32::INFINITY, Field::Guidance, "--guidance inf");
        case(&|r| r.max_sequence_length = 0, Field::MaxSequenceLength, "--max-sequence-length 0");
        case(&|r| r.max_sequence_length = 225, Field::MaxSequenceLength, "between 1 and 224");
        case(&|r| r.width = 72, Field::Width, "--width 72: must be a positive multiple of 16");
        case(&|r| r.height = 0, Field::Height, "--height 0");
        case(&|r| r.height = 1024, Field::Height, "--height 1024: at most 512");
        case(&|r| r.latents = Some(vec![0.0; 3]), Field::Latents, "expected [1, 16, 12, 8] for 64x96");
        case(&|r| r.strength = 1.5, Field::Strength, "--strength 1.5: must be between 0 and 1");
        case(&|r| r.strength = f64::NAN, Field::Strength, "--strength NaN");
        assert_eq!(Field::MaxSequenceLength.key(), "max_sequence_length");
    }

    #[test]
    fn seeded_noise_is_reproducible() {
        assert_eq!(seeded_noise(3, 16), seeded_noise(3, 16));
        assert_ne!(seeded_noise(3, 16), seeded_noise(4, 16));
    }
}
