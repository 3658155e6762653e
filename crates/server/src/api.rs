//! The shapes the server speaks: the OpenAI images API, the AUTOMATIC1111 API subset, and the
//! native jobs API; their conversion to [`Request`]s (checked as the CLI checks its flags); and
//! the JSON error every endpoint answers with.

use base64::Engine;
use cogview_runtime::init_image::InitImage;
use cogview_runtime::models::Configs;
use cogview_runtime::{Field, Request, RequestError, RuntimeError};
use serde::{Deserialize, Serialize};

/// The longest prompt accepted, in characters. The text encoder reads 224 tokens at most;
/// anything far beyond is a client's mistake, not a prompt.
pub const MAX_PROMPT_CHARS: usize = 4000;

/// The most images one request may ask for.
pub const MAX_IMAGES: usize = 8;

/// An error as every endpoint returns it, in the OpenAI API's shape
/// (`{"error": {"message", "type", "param"}}`), with the stage of a failure on the device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, as this API names it.
    pub param: Option<String>,
    /// The pipeline stage a failure on the device happened in.
    pub stage: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, stage: None }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_string()), ..Self::new(400, "invalid_request_error", message) }
    }

    /// A request field's error, named as `api` names the field.
    pub fn request(e: &RequestError, api: Api) -> Self {
        Self::invalid(api.param(e.field), format!("{}: {}: {}", api.param(e.field), e.value, e.problem))
    }

    /// A run's failure: a request error is the client's (400), a cancelled run a conflict
    /// (409), anything on the device the server's (500), naming the stage.
    pub fn run(e: &RuntimeError, api: Api) -> Self {
        match e {
            RuntimeError::Request(r) => Self::request(r, api),
            RuntimeError::Cancelled { .. } => Self::new(409, "cancelled", e.to_string()),
            _ => Self { stage: e.stage().map(|s| s.to_string()), ..Self::new(500, "server_error", e.to_string()) },
        }
    }

    /// The response body: `{"error": …}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self })
    }
}

/// Which API a request came in through: it decides how fields are named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    A1111,
    Jobs,
}

impl Api {
    pub fn param(self, field: Field) -> &'static str {
        match (self, field) {
            (Api::OpenAi, Field::Width | Field::Height) => "size",
            (Api::OpenAi, Field::Count) => "n",
            (Api::A1111, Field::Guidance) => "cfg_scale",
            (Api::A1111, Field::Count) => "batch_size",
            (Api::A1111, Field::Strength) => "denoising_strength",
            (Api::A1111, Field::InitImage) => "init_images",
            (_, f) => f.key(),
        }
    }
}

/// `POST /v1/images/generations`. Fields the OpenAI API has and cogview does not use
/// (`model`, `quality`, `style`, `user`) are accepted and ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct OpenAiRequest {
    pub prompt: String,
    pub n: Option<usize>,
    /// `"WxH"`.
    pub size: Option<String>,
    /// Only `b64_json`: cogview keeps no files to link to.
    pub response_format: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
}

/// `POST /sdapi/v1/txt2img` (and the base of img2img). Other A1111 fields (`sampler_name`,
/// `restore_faces`, …) are accepted and ignored: the sampler is CogVideoX's DDIM.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Txt2Img {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f32>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// -1 (A1111's default) or absent: a random seed.
    pub seed: Option<i64>,
    pub batch_size: Option<usize>,
}

/// `POST /sdapi/v1/img2img`: txt2img plus the picture (base64, optionally as a data URL) and
/// the strength.
#[derive(Clone, Debug, Deserialize)]
pub struct Img2Img {
    #[serde(flatten)]
    pub base: Txt2Img,
    pub init_images: Vec<String>,
    pub denoising_strength: Option<f64>,
}

/// `POST /v1/jobs`: the native request, as the page sends it.
#[derive(Clone, Debug, Deserialize)]
pub struct JobRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    /// An init image (base64, optionally as a data URL).
    pub init_image: Option<String>,
    pub strength: Option<f64>,
}

/// What every API's request comes down to.
#[derive(Clone, Debug, Default)]
pub struct Common {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub size: Option<(usize, usize)>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub count: usize,
    pub init_image: Option<InitImage>,
    pub strength: Option<f64>,
}

impl OpenAiRequest {
    pub fn common(self) -> Result<Common, ApiError> {
        if let Some(f) = self.response_format.as_deref().filter(|f| *f != "b64_json") {
            return Err(ApiError::invalid("response_format", format!("response_format `{f}` is not supported: use b64_json")));
        }
        let size = self.size.as_deref().map(parse_size).transpose()?;
        let count = self.n.unwrap_or(1);
        let (negative_prompt, steps, guidance, seed) = (self.negative_prompt, self.steps, self.guidance, self.seed);
        Ok(Common { prompt: self.prompt, negative_prompt, size, steps, guidance, seed, count, ..Common::default() })
    }
}

impl Txt2Img {
    pub fn common(self) -> Common {
        Common {
            prompt: self.prompt,
            // A1111 sends "" for no negative prompt; diffusers' zeros are what that means here.
            negative_prompt: Some(self.negative_prompt).filter(|n| !n.is_empty()),
            size: self.width.zip(self.height).or_else(|| self.width.map(|w| (w, w))).or_else(|| self.height.map(|h| (h, h))),
            steps: self.steps,
            guidance: self.cfg_scale,
            seed: self.seed.and_then(|s| u64::try_from(s).ok()),
            count: self.batch_size.unwrap_or(1),
            ..Common::default()
        }
    }
}

impl Img2Img {
    pub fn common(self) -> Result<Common, ApiError> {
        let [image] = self.init_images.as_slice() else {
            return Err(ApiError::invalid("init_images", "exactly one init image, base64"));
        };
        let init = decode_image(image).map_err(|m| ApiError::invalid("init_images", m))?;
        Ok(Common { init_image: Some(init), strength: self.denoising_strength, ..self.base.common() })
    }
}

impl JobRequest {
    pub fn common(self) -> Result<Common, ApiError> {
        let init_image = self.init_image.as_deref().map(decode_image).transpose().map_err(|m| ApiError::invalid("init_image", m))?;
        Ok(Common {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt.filter(|n| !n.is_empty()),
            size: self.width.zip(self.height),
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            count: self.n.unwrap_or(1),
            init_image,
            strength: self.strength,
        })
    }
}

/// `"1024x1024"`.
fn parse_size(s: &str) -> Result<(usize, usize), ApiError> {
    let bad = || ApiError::invalid("size", format!("size `{s}`: expected WIDTHxHEIGHT, e.g. 1024x1024"));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?))
}

/// A base64 picture, plain or as a `data:image/…;base64,` URL.
fn decode_image(text: &str) -> Result<InitImage, String> {
    let b64 = text.split_once(";base64,").map_or(text, |(_, b)| b);
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).map_err(|e| format!("not base64: {e}"))?;
    InitImage::decode(&bytes, "init image")
}

/// A seed for a request that gave none (or A1111's -1): from the clock, as the CLI does.
pub fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.as_nanos() as u64 % 1_000_000_007
}

impl Common {
    /// The requests: `count` images with seeds S, S+1, …; each checked against the model.
    /// Fields left out take the CLI's defaults, the size an init image's own.
    pub fn requests(self, configs: &Configs, api: Api) -> Result<Vec<Request>, ApiError> {
        if self.prompt.chars().count() > MAX_PROMPT_CHARS {
            return Err(ApiError::invalid(api.param(Field::Prompt), format!("the prompt is longer than {MAX_PROMPT_CHARS} characters")));
        }
        if self.count == 0 || self.count > MAX_IMAGES {
            let e = RequestError::new(Field::Count, &self.count, format!("must be between 1 and {MAX_IMAGES}"));
            return Err(ApiError::request(&e, api));
        }
        let mut base = Request::new(self.prompt);
        base.negative_prompt = self.negative_prompt;
        base.steps = self.steps.unwrap_or(base.steps);
        base.guidance = self.guidance.unwrap_or(base.guidance);
        base.strength = self.strength.unwrap_or(base.strength);
        (base.width, base.height) = match (self.size, &self.init_image) {
            (Some(size), _) => size,
            (None, Some(image)) => (image.width, image.height),
            (None, None) => (base.width, base.height),
        };
        base.init_image = self.init_image;
        let seed = self.seed.unwrap_or_else(random_seed);
        (0..self.count)
            .map(|i| {
                let mut r = base.clone();
                r.seed = seed.wrapping_add(i as u64);
                r.validate(configs).map_err(|e| ApiError::request(&e, api))?;
                Ok(r)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_named_as_each_api_names_them() {
        let configs = Configs::tiny();
        let openai = OpenAiRequest {
            prompt: "x".into(),
            n: None,
            size: Some("72x64".into()),
            response_format: None,
            negative_prompt: None,
            seed: Some(1),
            steps: Some(2),
            guidance: None,
        };
        let e = openai.clone().common().unwrap().requests(&configs, Api::OpenAi).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("size")));
        assert!(e.message.contains("72: must be a positive multiple of 16"), "{}", e.message);
        let e = OpenAiRequest { size: Some("big".into()), ..openai.clone() }.common().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("size"));
        let e = OpenAiRequest { response_format: Some("url".into()), ..openai.clone() }.common().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let a1111 = Txt2Img { prompt: "x".into(), cfg_scale: Some(f32::INFINITY), width: Some(64), height: Some(64), ..Txt2Img::default() };
        let e = a1111.common().requests(&configs, Api::A1111).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("cfg_scale"));
        let many = Txt2Img { prompt: "x".into(), batch_size: Some(9), width: Some(64), height: Some(64), ..Txt2Img::default() };
        assert_eq!(many.common().requests(&configs, Api::A1111).unwrap_err().param.as_deref(), Some("batch_size"));
        let long = OpenAiRequest { prompt: "a".repeat(MAX_PROMPT_CHARS + 1), size: Some("64x64".into()), ..openai };
        assert_eq!(long.common().unwrap().requests(&configs, Api::OpenAi).unwrap_err().param.as_deref(), Some("prompt"));
    }

    #[test]
    fn seeds_count_up_and_a1111_empty_negative_is_none() {
        let configs = Configs::tiny();
        let r = Txt2Img { prompt: "x".into(), seed: Some(7), batch_size: Some(3), width: Some(64), height: Some(96), ..Txt2Img::default() };
        let requests = r.common().requests(&configs, Api::A1111).unwrap();
        assert_eq!(requests.iter().map(|r| r.seed).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!((requests[0].width, requests[0].height, requests[0].negative_prompt.clone()), (64, 96, None));
    }
}
