//! The text-to-image pipeline, as diffusers' `CogView3PlusPipeline.__call__`: tokenize → encode
//! (negative prompt as diffusers does) → initial latents → N DDIM steps with classifier-free
//! guidance → VAE decode → denormalize and clamp → 8-bit with round-half-to-even.
//!
//! Stage-wise: the text encoder is freed before the transformer is loaded, the transformer
//! before the VAE, so device memory holds one component at a time.
//!
//! Reference: huggingface/diffusers `src/diffusers/pipelines/cogview3/pipeline_cogview3plus.py`;
//! shared spec `spec/cogview3plus.md` §1.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use cogview_import::{Component, Loader, ModelFolder};
use cogview_models::dit::{Dit, DitBlock, DitEmbeddings, SizeCondition};
use cogview_models::scheduler::DdimScheduler;
use cogview_models::vae::Decoder;
use cogview_models::{Probe, WeightSource, WeightStorage};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;

use crate::error::RuntimeError;
use crate::guard::{CheckFinite, FirstNonFinite, NonFinite, count_nonfinite};
use crate::precision::{Precision, PrecisionDecision};
use crate::memory::PeakMemory;
use crate::plan::{self, Budget, Plan, PlanInput, WeightsChoice};
use crate::text::{TextEncoder, WeightsMode};

/// The model card's recommended sizes: 512–2048 per side, multiples of 32, at most 2^21 pixels.
pub const RECOMMENDED: (usize, usize, usize, usize) = (512, 2048, 32, 1 << 21);

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
    /// The adapter's largest storage binding, in bytes: attention is split so that no score
    /// matrix passes it (see `AttentionLimits`), and the VAE tiles so that no tensor does.
    pub max_binding_bytes: Option<u64>,
    /// `--max-memory`: the device-memory budget the plan keeps to (default: what the adapter
    /// reports, else 8 GiB).
    pub max_memory: Option<u64>,
    /// `--weights`: how the DiT and VAE matrices are stored.
    pub weights: WeightsChoice,
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
            max_sequence_length: 224,
            original_size: None,
            crop_coords: [0, 0],
            latents: None,
            keep_tensors: false,
            max_binding_bytes: None,
            max_memory: None,
            weights: WeightsChoice::Auto,
        }
    }

    pub fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// Checks a size against the model: an error for what cannot run, warnings for what the model
/// card does not recommend.
pub fn check_size(folder: &ModelFolder, width: usize, height: usize) -> Result<Vec<String>, RuntimeError> {
    let vae = folder.vae.scale_factor();
    let p = folder.transformer.patch_size;
    let multiple = vae * p;
    let max = folder.transformer.pos_embed_max_size * multiple;
    for (name, v) in [("--width", width), ("--height", height)] {
        if v == 0 || v % multiple != 0 {
            return Err(RuntimeError::Input(format!(
                "{name} {v}: must be a positive multiple of {multiple} (VAE factor {vae} × patch {p})"
            )));
        }
        if v > max {
            return Err(RuntimeError::Input(format!(
                "{name} {v}: at most {max} (the position table covers {} patches per side)",
                folder.transformer.pos_embed_max_size
            )));
        }
    }
    let (lo, hi, m, area) = RECOMMENDED;
    let mut warnings = Vec::new();
    if width < lo || height < lo || width > hi || height > hi || width % m != 0 || height % m != 0 || width * height > area {
        warnings.push(format!(
            "{width}x{height} is outside the model card's recommended sizes ({lo}–{hi} per side, multiples of {m}, \
             at most {area} pixels): expect lower quality"
        ));
    }
    Ok(warnings)
}

/// What a stage took.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageStats {
    pub seconds: f64,
    pub peak: PeakMemory,
}

/// The tensors `--save-tensors` writes, as f32 host data with their shapes.
#[derive(Clone, Debug, Default)]
pub struct Tensors {
    pub prompt_embeds: (Vec<f32>, Vec<usize>),
    pub negative_prompt_embeds: Option<(Vec<f32>, Vec<usize>)>,
    pub step_latents: (Vec<f32>, Vec<usize>),
    pub image: (Vec<f32>, Vec<usize>),
}

/// A generated image.
#[derive(Clone, Debug)]
pub struct Output {
    /// RGB, row-major, `height × width × 3`.
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub text: StageStats,
    pub denoise: StageStats,
    pub decode: StageStats,
    /// Per-step seconds.
    pub step_seconds: Vec<f64>,
    pub tensors: Option<Tensors>,
    pub warnings: Vec<String>,
    /// Stages redone in f32 after going non-finite under `--precision auto`.
    pub fallbacks: Vec<String>,
    /// The memory plan the run followed.
    pub plan: Plan,
}

/// Progress events, for a progress bar.
pub trait Progress {
    fn stage(&mut self, _name: &'static str, _steps: usize) {}
    fn step(&mut self, _done: usize, _elapsed: Duration) {}
    fn finish(&mut self) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// The seeded initial noise: `ChaCha8Rng::seed_from_u64(seed)` (rand_chacha 0.9), standard
/// normal samples (rand_distr 0.5's `StandardNormal`) in f32, filled in NCHW order. The same
/// seed gives the same latents on every machine and device.
pub fn seeded_noise(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect()
}

fn host<const D: usize>(t: &Tensor<D>) -> (Vec<f32>, Vec<usize>) {
    let shape = t.dims().to_vec();
    (t.clone().into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default(), shape)
}

/// numpy's `(x * 255).round().astype(uint8)` on values already clamped to [0, 1].
pub fn to_u8(x: f32) -> u8 {
    let v = x * 255.0;
    let r = v.round();
    let r = if (v - v.trunc()).abs() == 0.5 { 2.0 * (v / 2.0).round() } else { r };
    r.clamp(0.0, 255.0) as u8
}

/// How a run treats non-finite values.
#[derive(Clone, Debug)]
pub struct Guarding {
    /// The precision decision: under `auto` below f32, a stage that goes non-finite is redone
    /// in f32; otherwise the run stops.
    pub precision: PrecisionDecision,
    pub check: CheckFinite,
}

impl Guarding {
    pub fn new(precision: PrecisionDecision) -> Self {
        Self { precision, check: CheckFinite::Stages }
    }

    fn probe(&self) -> FirstNonFinite {
        FirstNonFinite { enabled: self.check == CheckFinite::All, found: None }
    }

    /// What to do about a non-finite stage output: `Ok(())` to redo the stage in f32 (recorded
    /// in `fallbacks`), or the error that stops the run.
    fn on_hit(&self, hit: NonFinite, dtype: DType, fallbacks: &mut Vec<String>) -> Result<(), RuntimeError> {
        if self.precision.requested == Precision::Auto && dtype != DType::F32 {
            let note = format!("{hit}; redone in f32 (--precision auto)");
            tracing::warn!("{note}");
            fallbacks.push(note);
            Ok(())
        } else {
            Err(RuntimeError::NonFinite(hit))
        }
    }
}

fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F32 => "f32".into(),
        DType::BF16 => "bf16".into(),
        DType::F16 => "f16".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The first non-finite module of a call: the probe of the call itself when it was on, else
/// the call again with the probe on.
fn localise(found: Option<(String, u64)>, rerun: impl FnOnce(&mut FirstNonFinite)) -> Option<String> {
    if let Some((m, _)) = found {
        return Some(m);
    }
    let mut probe = FirstNonFinite::on();
    rerun(&mut probe);
    probe.found.map(|(m, _)| m)
}

/// The memory plan of `request` on `device` in `compute`, from the configs and the
/// checkpoints' headers (no weight is read). Without checkpoints (a folder of configs only) the
/// weights are taken to be bf16, as the published ones are.
pub fn plan(folder: &ModelFolder, device: &Device, compute: DType, request: &Request) -> Result<Plan, RuntimeError> {
    let bf16 = |c| folder.open_weights(c).map(|(ck, _)| ck.is_bf16()).unwrap_or(true);
    let checkpoint_bf16 = bf16(Component::Transformer) && bf16(Component::Vae);
    let caps = crate::device::capabilities(device);
    Ok(plan::make(&PlanInput {
        t5: &folder.text_encoder,
        dit: &folder.transformer,
        vae: &folder.vae,
        width: request.width,
        height: request.height,
        cfg: request.cfg(),
        text_len: request.max_sequence_length,
        compute,
        weights: request.weights,
        checkpoint_bf16,
        caps: &caps,
        budget: Budget::new(request.max_memory, plan::adapter_memory(device)),
        max_binding: request.max_binding_bytes.or_else(|| cogview_models::storage::max_buffer_bytes(device)),
    }))
}

/// The transformer, resident or streamed as the plan says.
enum Denoiser {
    Resident(Dit),
    /// The embeddings resident, each block read from the checkpoint when the call reaches it.
    Streamed(DitEmbeddings, cogview_import::Checkpoint),
}

/// Runs the whole pipeline for one request: [`generate_batch`] of one.
pub fn generate(
    folder: &ModelFolder,
    device: &Device,
    guard: &Guarding,
    request: &Request,
    plan: &Plan,
    progress: &mut impl Progress,
) -> Result<Output, RuntimeError> {
    let mut batch = generate_batch(folder, device, guard, std::slice::from_ref(request), plan, progress)?;
    Ok(batch.outputs.pop().expect("one output per request"))
}

/// What a batch gave.
#[derive(Debug)]
pub struct Batch {
    /// One per request, in order.
    pub outputs: Vec<Output>,
    /// Prompts the text encoder ran on: each distinct prompt (and negative prompt) once.
    pub encoder_calls: usize,
}

/// One request's state between stages.
struct Job {
    scheduler: DdimScheduler,
    latents: Tensor<4>,
    cond: Tensor<3>,
    uncond: Option<Tensor<3>>,
    step_latents: Vec<Tensor<4>>,
    step_seconds: Vec<f64>,
    warnings: Vec<String>,
}

/// Runs the pipeline for every request, stage by stage: the text encoder once for the batch
/// (each distinct prompt encoded once), then the transformer for every image, then the VAE,
/// so each component is loaded once and device memory holds one at a time. Follows `plan`
/// (from [`plan`], made for the largest image).
pub fn generate_batch(
    folder: &ModelFolder,
    device: &Device,
    guard: &Guarding,
    requests: &[Request],
    plan: &Plan,
    progress: &mut impl Progress,
) -> Result<Batch, RuntimeError> {
    let dtype = guard.precision.dtype.dtype();
    let mut fallbacks = Vec::new();
    tracing::info!(
        "plan: text {} · transformer {} · VAE {} · weights {} ({}) · budget {} ({})",
        plan.text.mode, plan.denoise.mode, plan.decode.mode, plan.storage, plan.storage_reason,
        plan::human(plan.budget.bytes), plan.budget.source
    );
    // A stage redone in f32 after an f16 overflow keeps its weights in f32.
    let storage_for = |d: DType| if d == dtype { plan.weight_storage } else { WeightStorage::Compute };
    let vae_factor = folder.vae.scale_factor();
    let channels = folder.transformer.in_channels;

    // ---- checks and initial latents, before anything is loaded ----
    let mut jobs = Vec::new();
    for request in requests {
        let mut warnings = check_size(folder, request.width, request.height)?;
        warnings.extend(plan.warnings.iter().cloned());
        let (h, w) = (request.height / vae_factor, request.width / vae_factor);
        let scheduler = DdimScheduler::new(&folder.scheduler, request.steps).map_err(|e| RuntimeError::Input(e.to_string()))?;
        if scheduler.timesteps.len() != request.steps {
            warnings.push(format!(
                "--steps {}: diffusers' trailing spacing yields {} timesteps for this count (the last is -1); \
                 running them all, as diffusers does",
                request.steps,
                scheduler.timesteps.len()
            ));
        }
        let latents0 = match &request.latents {
            Some(l) if l.len() != channels * h * w => {
                return Err(RuntimeError::Input(format!(
                    "--latents: {} values, expected [1, {channels}, {h}, {w}] for {}x{}",
                    l.len(),
                    request.width,
                    request.height
                )));
            }
            Some(l) => l.clone(),
            None => seeded_noise(request.seed, channels * h * w),
        };
        let latents = Tensor::<4>::from_data(TensorData::new(latents0, [1, channels, h, w]), device);
        let placeholder = Tensor::<3>::zeros([1, 1, 1], device);
        jobs.push(Job {
            scheduler,
            latents,
            cond: placeholder,
            uncond: None,
            step_latents: Vec::new(),
            step_seconds: Vec::new(),
            warnings,
        });
    }

    // ---- text: each distinct (prompt, negative prompt, length) once ----
    let start = Instant::now();
    let mut text_peak = PeakMemory::default();
    let mut text_dtype = dtype;
    let mut keys: Vec<(&str, Option<&str>, usize)> = Vec::new();
    for r in requests {
        let key = (r.prompt.as_str(), r.negative_prompt.as_deref().filter(|_| r.cfg()), r.max_sequence_length);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    progress.stage("encode", keys.len());
    let mut encoder_calls = 0;
    let embeddings = loop {
        let mode = if text_dtype == dtype { plan.text_mode } else { WeightsMode::Streamed };
        let encoder = TextEncoder::open(folder, device, text_dtype, mode)?;
        let mut done = Vec::new();
        let mut hit = None;
        for (i, &(prompt, negative, len)) in keys.iter().enumerate() {
            // Guidance needs the unconditional half; without a negative prompt it is zeros.
            let cfg = requests.iter().any(|r| r.prompt == prompt && r.cfg());
            let embed = |probe: &mut FirstNonFinite, peak: &mut PeakMemory| {
                prompt_embeddings(&encoder, &[prompt], negative, cfg, 1, len, peak, probe)
            };
            let mut probe = guard.probe();
            let (cond, uncond) = embed(&mut probe, &mut text_peak)?;
            let count = count_nonfinite(&cond) + uncond.as_ref().map_or(0, count_nonfinite);
            if count > 0 || probe.found.is_some() {
                let module = localise(probe.found, |p| {
                    let _ = embed(p, &mut PeakMemory::default());
                });
                hit = Some(NonFinite { stage: "text encoder", step: None, module, count, dtype: dtype_name(text_dtype) });
                break;
            }
            done.push((cond, uncond));
            progress.step(i + 1, start.elapsed());
        }
        encoder_calls += encoder.calls();
        match hit {
            None => break done,
            Some(hit) => {
                guard.on_hit(hit, text_dtype, &mut fallbacks)?;
                text_dtype = DType::F32;
            }
        }
    };
    for (job, r) in jobs.iter_mut().zip(requests) {
        let key = (r.prompt.as_str(), r.negative_prompt.as_deref().filter(|_| r.cfg()), r.max_sequence_length);
        let i = keys.iter().position(|k| *k == key).expect("every request has its key");
        (job.cond, job.uncond) = embeddings[i].clone();
        if !r.cfg() {
            job.uncond = None;
        }
        job.latents = job.latents.clone().cast(dtype);
    }
    drop(embeddings);
    free(device);
    let text_stats = StageStats { seconds: start.elapsed().as_secs_f64(), peak: text_peak };

    // ---- denoise ----
    let total_steps: usize = jobs.iter().map(|j| j.scheduler.timesteps.len()).sum();
    progress.stage("denoise", total_steps);
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let load_dit = |dtype: DType| -> Result<Denoiser, RuntimeError> {
        let (ck, _) = folder.open_weights(Component::Transformer)?;
        let loader = |ck| Loader::new(ck, Component::Transformer, device, |_| dtype).with_storage(storage_for(dtype));
        Ok(match plan.dit_mode {
            WeightsMode::Resident => Denoiser::Resident(loader(&ck).load(|w| Dit::load(w, &folder.transformer))?.0),
            WeightsMode::Streamed => {
                let embeddings = loader(&ck).load(|w| DitEmbeddings::load(w, &folder.transformer))?.0;
                Denoiser::Streamed(embeddings, ck)
            }
        })
    };
    let mut dit_dtype = dtype;
    let mut dit = load_dit(dit_dtype)?;
    peak.sample(device);
    let attn = plan.attention();
    let mut done_steps = 0;
    for (job, request) in jobs.iter_mut().zip(requests) {
        let cfg = request.cfg();
        let text_in = match &job.uncond {
            Some(n) => Tensor::cat(vec![n.clone(), job.cond.clone()], 0), // [uncond, cond]
            None => job.cond.clone(),
        };
        let batch = text_in.dims()[0];
        let orig = request.original_size.unwrap_or([request.height, request.width]);
        let size = SizeCondition {
            original_size: orig.map(|v| v as f32),
            crop_coords: request.crop_coords.map(|v| v as f32),
            target_size: [request.height as f32, request.width as f32],
        };
        let sizes = vec![size; batch];
        let timesteps = job.scheduler.timesteps.clone();
        for (i, &t) in timesteps.iter().enumerate() {
            let step_start = Instant::now();
            let v = loop {
                let x = job.latents.clone().cast(dit_dtype);
                let x_in = if cfg { Tensor::cat(vec![x.clone(), x], 0) } else { x };
                let txt = text_in.clone().cast(dit_dtype);
                let ts = vec![t as f32; batch];
                let call = |probe: &mut FirstNonFinite| -> Result<Tensor<4>, RuntimeError> {
                    match &dit {
                        Denoiser::Resident(model) => Ok(model.forward(x_in.clone(), txt.clone(), &ts, &sizes, &attn, probe)),
                        Denoiser::Streamed(embeddings, ck) => {
                            let block = |i: usize| -> Result<DitBlock, RuntimeError> {
                                let loader = Loader::new(ck, Component::Transformer, device, |_| dit_dtype)
                                    .with_storage(storage_for(dit_dtype));
                                Ok(loader.load(|w| DitBlock::load(&w.pp(format!("transformer_blocks.{i}")), &folder.transformer))?.0)
                            };
                            let n = folder.transformer.num_layers;
                            embeddings.forward_blocks(n, block, x_in.clone(), txt.clone(), &ts, &sizes, &attn, probe)
                        }
                    }
                };
                let mut probe = guard.probe();
                let v = call(&mut probe)?;
                let count = count_nonfinite(&v);
                if count == 0 && probe.found.is_none() {
                    break v;
                }
                let module = localise(probe.found, |p| {
                    let _ = call(p);
                });
                let hit = NonFinite { stage: "transformer", step: Some((i, t)), module, count, dtype: dtype_name(dit_dtype) };
                guard.on_hit(hit, dit_dtype, &mut fallbacks)?;
                dit_dtype = DType::F32;
                dit = load_dit(dit_dtype)?;
            };
            let v = v.cast(FloatDType::F32);
            let v = if cfg {
                let mut halves = v.chunk(2, 0).into_iter();
                let (u, c) = (halves.next().expect("2 halves"), halves.next().expect("2 halves"));
                u.clone() + (c - u).mul_scalar(request.guidance)
            } else {
                v
            };
            // The scheduler's arithmetic in f32, the latents kept in the compute dtype between steps.
            let (prev, _) = job.scheduler.step(v, t, job.latents.clone().cast(FloatDType::F32));
            job.latents = prev.cast(dit_dtype);
            if request.keep_tensors {
                job.step_latents.push(job.latents.clone().cast(FloatDType::F32));
            }
            peak.sample(device);
            job.step_seconds.push(step_start.elapsed().as_secs_f64());
            done_steps += 1;
            progress.step(done_steps, start.elapsed());
        }
    }
    drop(dit);
    free(device);
    let denoise_stats = StageStats { seconds: start.elapsed().as_secs_f64(), peak };

    // ---- decode ----
    progress.stage("decode", jobs.len());
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let mut vae_dtype = dtype;
    let mut images = Vec::new();
    'decoder: loop {
        let decoder = {
            let (ck, _) = folder.open_weights(Component::Vae)?;
            let loader = Loader::new(&ck, Component::Vae, device, |_| vae_dtype).with_storage(storage_for(vae_dtype));
            loader.load(|w| Decoder::load(w, &folder.vae))?.0
        };
        let decode = |z: Tensor<4>, probe: &mut FirstNonFinite| match plan.vae_tile {
            Some(tile) => decoder.forward_tiled(z, tile, probe),
            None => decoder.forward(z, probe),
        };
        while images.len() < jobs.len() {
            let z = jobs[images.len()].latents.clone().cast(vae_dtype).div_scalar(folder.vae.scaling_factor);
            let mut probe = guard.probe();
            let decoded = decode(z.clone(), &mut probe);
            peak.sample(device);
            let count = count_nonfinite(&decoded);
            if count > 0 || probe.found.is_some() {
                let module = localise(probe.found, |p| {
                    decode(z, p);
                });
                let hit = NonFinite { stage: "VAE decoder", step: None, module, count, dtype: dtype_name(vae_dtype) };
                guard.on_hit(hit, vae_dtype, &mut fallbacks)?;
                vae_dtype = DType::F32;
                continue 'decoder;
            }
            // VaeImageProcessor.denormalize, in the compute dtype as diffusers does it.
            let image = decoded.mul_scalar(0.5).add_scalar(0.5).clamp(0.0, 1.0).cast(FloatDType::F32);
            images.push(host(&image));
            progress.step(images.len(), start.elapsed());
        }
        break;
    }
    free(device);
    let decode_stats = StageStats { seconds: start.elapsed().as_secs_f64(), peak };
    progress.finish();

    let outputs = jobs
        .into_iter()
        .zip(images)
        .zip(requests)
        .map(|((job, (pixels, shape)), request)| {
            let (height, width) = (shape[2], shape[3]);
            let plane = height * width;
            let mut rgb = vec![0u8; plane * 3];
            for c in 0..3 {
                for p in 0..plane {
                    rgb[p * 3 + c] = to_u8(pixels[c * plane + p]);
                }
            }
            let mut warnings = job.warnings;
            let std = pixel_std(&rgb);
            if std < 1.0 {
                warnings.push(format!(
                    "the image is nearly uniform (pixel standard deviation {std:.2} levels): check the prompt, steps and guidance"
                ));
            }
            let tensors = request.keep_tensors.then(|| {
                let steps = job.step_latents.len();
                let [_, c, h, w] = job.latents.dims();
                let stacked = Tensor::cat(job.step_latents, 0); // [steps, C, h, w]
                let (lat, _) = host(&stacked);
                Tensors {
                    prompt_embeds: host(&job.cond.clone().cast(FloatDType::F32)),
                    negative_prompt_embeds: job.uncond.as_ref().map(|n| host(&n.clone().cast(FloatDType::F32))),
                    step_latents: (lat, vec![steps, 1, c, h, w]),
                    image: (pixels, shape.clone()),
                }
            });
            Output {
                rgb,
                width,
                height,
                text: text_stats.clone(),
                denoise: denoise_stats.clone(),
                decode: decode_stats.clone(),
                step_seconds: job.step_seconds,
                tensors,
                warnings,
                fallbacks: fallbacks.clone(),
                plan: plan.clone(),
            }
        })
        .collect();
    Ok(Batch { outputs, encoder_calls })
}

/// The largest per-channel standard deviation of interleaved RGB 8-bit pixels, in levels: under
/// one level, the image is a flat colour.
fn pixel_std(rgb: &[u8]) -> f64 {
    (0..3)
        .map(|c| {
            let v: Vec<f64> = rgb.iter().skip(c).step_by(3).map(|&x| x as f64).collect();
            let n = v.len().max(1) as f64;
            let mean = v.iter().sum::<f64>() / n;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
        })
        .fold(0.0, f64::max)
}

/// diffusers' `encode_prompt`: each prompt's embedding repeated `per_prompt` times (p0, p0, p1,
/// p1, ...); with guidance, the unconditional embedding: zeros when there is no negative prompt,
/// the encoded negative prompt (even `""`) otherwise, broadcast to every prompt.
///
/// # Shapes
/// - → `(cond [B·N, L, D], uncond [B·N, L, D] when cfg)`
pub fn prompt_embeddings(
    encoder: &TextEncoder,
    prompts: &[&str],
    negative: Option<&str>,
    cfg: bool,
    per_prompt: usize,
    max_len: usize,
    peak: &mut PeakMemory,
    probe: &mut impl Probe,
) -> Result<(Tensor<3>, Option<Tensor<3>>), RuntimeError> {
    let repeat = |t: Tensor<3>| {
        let [b, l, d] = t.dims();
        t.unsqueeze_dim::<4>(1).expand([b, per_prompt, l, d]).reshape([b * per_prompt, l, d])
    };
    let cond = repeat(encoder.encode(prompts, max_len, peak, probe)?);
    let uncond = match (negative, cfg) {
        (_, false) => None,
        (None, true) => Some(cond.zeros_like()),
        (Some(n), true) => {
            let negatives = vec![n; prompts.len()];
            Some(repeat(encoder.encode(&negatives, max_len, peak, probe)?))
        }
    };
    Ok((cond, uncond))
}

/// Returns freed memory to the driver between stages.
fn free(device: &Device) {
    let _ = device.sync();
    device.memory_cleanup();
}
