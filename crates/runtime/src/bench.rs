//! `cogview bench`: the pipeline's stages on random weights (no checkpoint needed), through the
//! same [`Pipeline`] code a real run takes, timed and measured: T5 time, the first denoising
//! step (shader compilation) apart from the median step, the non-finite guard's cost per step,
//! VAE time, and peak device memory per stage, sampled at every module output. Each stage's
//! time is its forward; loading its weights is reported apart, as the diffusers script (which
//! builds its modules before it starts timing) does.

use burn::tensor::{DType, Distribution, Tensor};
use cogview_import::KeyRecorder;
use cogview_models::dit::DitBlock;
use cogview_models::t5::T5Block;
use cogview_models::{Configs, WeightStorage};
use cogview_shaders::flash::ExactKernel;
use serde::Serialize;

use crate::error::RuntimeError;
use crate::memory::PeakMemory;
use crate::pipeline::{Options, Pipeline, StageStats, plan_for};
use crate::plan::{Plan, Residency, WeightsChoice};
use crate::progress::Progress;
use crate::init_image::InitImage;
use crate::kernel_activity::Kernels;
use crate::request::{Request, seeded_noise};
use crate::target::Target;
use crate::text::Conditioning;

#[derive(Clone, Debug)]
pub struct BenchSettings {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Shortens the DiT and T5 to this many blocks.
    pub layers: Option<usize>,
    pub text_len: usize,
    /// Classifier-free guidance doubles the DiT batch.
    pub cfg: bool,
    pub weights: WeightsChoice,
    pub max_memory: Option<u64>,
    /// Which stages run: text, encode (img2img's VAE encoder, on a random picture), denoise,
    /// decode. Without the text stage the transformer gets random embeddings; without the
    /// denoising the decoder gets random latents.
    pub stages: [bool; 4],
    /// burn's attention in head groups instead of flash (the path before it), to compare.
    pub grouped_attention: bool,
    /// Sample device memory at every module output (the report's peaks), not only between
    /// steps as a `generate` does. Each sample waits for the device, which also ends burn's
    /// fused kernels there: the run then compiles and tunes some kernels a `generate` never
    /// launches. `cogview warmup` and `bench --no-memory-samples` turn it off.
    pub sample_memory: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub t5_layers: usize,
    pub dit_layers: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// The T5 forward (tokens to embeddings), without loading its weights: what the diffusers
    /// script times.
    pub t5_seconds: f64,
    /// Drawing the random T5 weights and putting them on the device (a real run reads them
    /// from the checkpoint instead).
    pub t5_load_seconds: f64,
    pub first_step_seconds: f64,
    pub median_step_seconds: f64,
    /// Median time of the guard's reduction per step (included in the step time).
    pub guard_seconds_per_step: f64,
    /// Loading the transformer before its first step (resident); a streamed transformer
    /// loads each block inside the steps, which then include it.
    pub dit_load_seconds: f64,
    /// The VAE decode without loading the decoder's weights (`vae_load_seconds`).
    pub vae_seconds: f64,
    pub vae_load_seconds: f64,
    /// img2img's encoder without loading its weights (0 when the stage did not run).
    pub encode_seconds: f64,
    pub encode_load_seconds: f64,
    /// Measured from the allocator at every module output (with `sample_memory`; else between
    /// steps).
    pub t5_peak: PeakMemory,
    pub encode_peak: PeakMemory,
    pub dit_peak: PeakMemory,
    pub vae_peak: PeakMemory,
    /// GPU kernels compiled and autotune keys tuned in each stage: a cold process's compile
    /// budget, stage by stage (a warm one compiles only what the kernel cache cannot hold).
    pub t5_kernels: Kernels,
    pub encode_kernels: Kernels,
    pub dit_kernels: Kernels,
    pub vae_kernels: Kernels,
    /// The exact f32 attention kernel the transformer ran (`unit_flash` or `head_groups`,
    /// whichever autotune found faster on the adapter); `None` where it ran another (flash on
    /// f16 tiles, the CPU backend's kernel, `--attention grouped`) or did not run.
    pub dit_exact_attention: Option<ExactKernel>,
    /// Stored weight bytes of one DiT block and one T5 block (for extrapolating `--layers`
    /// runs to the full depth).
    pub dit_block_weight_bytes: u64,
    pub t5_block_weight_bytes: u64,
    /// The measured peaks (in use) at the configuration's full depth: a resident stage adds
    /// the stored weights of the blocks `--layers` left out; a streamed one holds one block
    /// whatever the depth.
    pub t5_peak_full_depth: Option<u64>,
    pub dit_peak_full_depth: Option<u64>,
    pub vae_peak_full_depth: Option<u64>,
    /// The plan of the full-depth configuration, which the run follows (its estimates are
    /// what `generate --dry-run` prints).
    pub plan: Plan,
}

impl BenchReport {
    /// One whole image of `steps` steps at this run's size and depth, from its stages: the text
    /// encoder and its load, the transformer's load, the first step, `steps - 1` median steps,
    /// the VAE decode and its load (the random weights' drawing stands in for reading the
    /// checkpoint). In a cold process the first step includes compiling and tuning; in a warm one
    /// (the kernel cache filled by an earlier run) it does not.
    pub fn image_seconds(&self, steps: usize) -> f64 {
        self.t5_seconds
            + self.t5_load_seconds
            + self.dit_load_seconds
            + self.first_step_seconds
            + steps.saturating_sub(1) as f64 * self.median_step_seconds
            + self.vae_seconds
            + self.vae_load_seconds
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Stored bytes of the tensors a module asks for: matrices and kernels in `storage`, vectors
/// in the compute dtype.
fn stored_bytes(shapes: Vec<(String, Vec<usize>)>, storage: WeightStorage, dtype: DType) -> u64 {
    let sb = storage.bytes_per_value(dtype) as u64;
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * if s.len() >= 2 { sb } else { dtype.size() as u64 })
        .sum()
}

/// What the stages measured.
struct Measured {
    text: StageStats,
    encode: StageStats,
    denoise: StageStats,
    /// Each denoising step's seconds, and the guard's share.
    steps: Vec<f64>,
    guard: Vec<f64>,
    decode: StageStats,
}

/// The stages `settings` asks for, each through the pipeline; a stage left out gives the next
/// random inputs (text embeddings, latents).
fn run_stages(pipeline: &mut Pipeline, request: Request, plan: &Plan, settings: &BenchSettings, target: &Target, progress: &mut impl Progress) -> Result<Measured, RuntimeError> {
    let configs = pipeline.configs().clone();
    let (device, dtype) = (&target.device, target.precision.dtype.dtype());
    let requests = [request];
    let (conditionings, text) = if settings.stages[0] {
        let encoded = pipeline.encode_prompts(&requests, plan, progress)?;
        tracing::info!("bench: T5 {:.1} s, peak {:?}", encoded.stats.seconds, encoded.stats.peak.in_use);
        (encoded.conditionings, encoded.stats)
    } else {
        let cond = Tensor::<3>::random([1, settings.text_len, configs.text_encoder.d_model], Distribution::Normal(0.0, 0.1), device).cast(dtype);
        let uncond = settings.cfg.then(|| cond.zeros_like());
        (vec![Conditioning { cond, uncond }], StageStats::default())
    };
    let encode = if settings.stages[1] {
        let (_, stats) = pipeline.encode_images(&requests, plan, progress)?;
        tracing::info!("bench: VAE encoder {:.1} s, peak {:?}", stats.seconds, stats.peak.in_use);
        stats
    } else {
        StageStats::default()
    };
    let [c, lh, lw] = requests[0].latent_shape(&configs);
    let (latents, denoise, steps, guard) = if settings.stages[2] {
        let (mut out, stats) = pipeline.denoise(&requests, &conditionings, plan, progress)?;
        let d = out.pop().expect("one image");
        tracing::info!("bench: DiT {} step(s) {:?} s, peak {:?}", d.step_seconds.len(), d.step_seconds, stats.peak.in_use);
        (d.latents, stats, d.step_seconds, d.guard_seconds)
    } else {
        let random = Tensor::<4>::random([1, c, lh, lw], Distribution::Normal(0.0, 1.0), device).cast(dtype);
        (random, StageStats::default(), Vec::new(), Vec::new())
    };
    let decode = if settings.stages[3] {
        let (_, stats) = pipeline.decode(vec![latents], plan, progress)?;
        tracing::info!("bench: VAE {:.1} s, peak {:?}", stats.seconds, stats.peak.in_use);
        stats
    } else {
        StageStats::default()
    };
    Ok(Measured { text, encode, denoise, steps, guard, decode })
}

/// A picture of random pixels (seeded), for the encoder.
fn random_picture(width: usize, height: usize) -> InitImage {
    let rgb = seeded_noise(7, width * height * 3).into_iter().map(|v| (v * 64.0 + 128.0).clamp(0.0, 255.0) as u8).collect();
    InitImage { rgb, width, height, name: "random".into(), sha256: String::new() }
}

/// Runs the stages on random weights of `full` (cut to `settings.layers` blocks), following
/// the plan of the full-depth configuration (storage, streaming, attention groups, VAE tiles).
pub fn bench(full: &Configs, settings: &BenchSettings, target: &Target, progress: &mut impl Progress) -> Result<BenchReport, RuntimeError> {
    let configs = match settings.layers {
        Some(n) => full.clone().with_layers(n),
        None => full.clone(),
    };
    let dtype = target.precision.dtype.dtype();
    let options = Options { weights: settings.weights, max_memory: settings.max_memory, sample_modules: settings.sample_memory, ..Options::default() };
    let mut request = Request::new("a benchmark");
    (request.width, request.height, request.steps) = (settings.width, settings.height, settings.steps);
    request.max_sequence_length = settings.text_len;
    request.guidance = if settings.cfg { 5.0 } else { 1.0 };
    if settings.stages[1] {
        request.init_image = Some(random_picture(settings.width, settings.height));
    }
    request.validate(&configs)?;
    let mut plan = plan_for(full, true, target, &options, std::slice::from_ref(&request))?;
    if settings.grouped_attention {
        // The head groups budget the scores of burn's fallback, as the plan does.
        (plan.flash, plan.grouped_attention) = (None, true);
    }
    let mut pipeline = Pipeline::random(configs.clone(), target.clone(), options);
    let blocks = |full: usize, run: usize| (full - run) as u64;
    let dit_block = stored_bytes(KeyRecorder::keys_of(|r| {
        DitBlock::load(r, &configs.transformer);
    }), plan.storage, dtype);
    let t5_block = stored_bytes(KeyRecorder::keys_of(|r| {
        T5Block::load(r, &configs.text_encoder);
    }), plan.text_storage(), dtype);
    let full_depth = |stats: &StageStats, mode: Residency, left_out: u64| {
        stats.peak.in_use.map(|b| if mode == Residency::Resident { b + left_out } else { b })
    };
    tracing::info!(
        "bench: T5 {} ({} layers), DiT {} ({} layers), VAE {}, weights {}",
        plan.text.mode, configs.text_encoder.num_layers, plan.denoise.mode, configs.transformer.num_layers, plan.decode.mode, plan.storage
    );
    let dit = &configs.transformer;
    let (images, tokens) = (if request.cfg() { 2 } else { 1 }, configs.dit_tokens(request.max_sequence_length, request.height, request.width));
    let Measured { text, encode, denoise, steps, guard, decode } = run_stages(&mut pipeline, request, &plan, settings, target, progress)?;
    let dit_exact_attention = plan.attention().exact_kernel(&target.device, images, dit.num_attention_heads, tokens, dit.attention_head_dim);
    // With one step, the first is also the median.
    let later = if steps.len() > 1 { &steps[1..] } else { &steps[..] };
    Ok(BenchReport {
        t5_layers: configs.text_encoder.num_layers,
        dit_layers: configs.transformer.num_layers,
        width: settings.width,
        height: settings.height,
        steps: settings.steps,
        t5_seconds: text.seconds - text.load_seconds,
        t5_load_seconds: text.load_seconds,
        first_step_seconds: steps.first().copied().unwrap_or(0.0),
        median_step_seconds: median(&mut later.to_vec()),
        guard_seconds_per_step: median(&mut guard.clone()),
        dit_load_seconds: denoise.load_seconds,
        vae_seconds: decode.seconds - decode.load_seconds,
        vae_load_seconds: decode.load_seconds,
        encode_seconds: encode.seconds - encode.load_seconds,
        encode_load_seconds: encode.load_seconds,
        t5_peak: text.peak,
        encode_peak: encode.peak,
        dit_peak: denoise.peak,
        vae_peak: decode.peak,
        t5_kernels: text.kernels,
        encode_kernels: encode.kernels,
        dit_kernels: denoise.kernels,
        vae_kernels: decode.kernels,
        dit_exact_attention,
        dit_block_weight_bytes: dit_block,
        t5_block_weight_bytes: t5_block,
        t5_peak_full_depth: full_depth(&text, plan.text.mode, blocks(full.text_encoder.num_layers, configs.text_encoder.num_layers) * t5_block),
        dit_peak_full_depth: full_depth(&denoise, plan.denoise.mode, blocks(full.transformer.num_layers, configs.transformer.num_layers) * dit_block),
        vae_peak_full_depth: decode.peak.in_use,
        plan,
    })
}
