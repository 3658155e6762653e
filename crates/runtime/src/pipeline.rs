//! The text-to-image pipeline, as diffusers' `CogView3PlusPipeline.__call__`: tokenize → encode
//! (negative prompt as diffusers does) → initial latents → N DDIM steps with classifier-free
//! guidance → VAE decode → denormalize and clamp → 8-bit with round-half-to-even.
//!
//! A [`Pipeline`] is loaded once (configs read, checkpoints opened and checked, nothing on the
//! device yet) and runs any number of requests. A run goes stage by stage over all its
//! requests: the text encoder for every distinct prompt, then the transformer for every image,
//! then the VAE, so each component is loaded once per run and device memory holds one at a
//! time. Between runs a component stays loaded when [`Options::keep_loaded`] is set and the
//! memory plan finds room for it; the others are released and read from disk again when
//! needed.
//!
//! Reference: huggingface/diffusers `src/diffusers/pipelines/cogview3/pipeline_cogview3plus.py`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use cogview_import::{Component, ModelFolder};
use cogview_models::{Configs, WeightStorage};
use cogview_models::scheduler::DdimScheduler;
use serde::Serialize;

use crate::decode::{Decoded, ImageDecoder, decode, host, pixel_std, to_rgb8};
use crate::image_encoder::{ImageEncoder, encode_images};
use crate::denoise::{Denoised, Denoiser, Start, denoise};
use crate::error::RuntimeError;
use crate::guard::{CheckFinite, Guard};
use crate::kernel_activity::Kernels;
use crate::memory::PeakMemory;
use crate::plan::{self, Budget, Plan, PlanInput, WeightsChoice};
use crate::progress::{Progress, Stage};
use crate::request::{Field, Request, RequestError, seeded_noise};
use crate::source::{Source, Weights};
use crate::target::Target;
use crate::text::{Conditioning, Encoded, TextEncoder, encode_prompts};

/// A model: its configs and where its weights come from.
pub struct Model {
    pub configs: Configs,
    pub source: Source,
    /// Nanoseconds spent in [`load`](Self::load) so far.
    loading: AtomicU64,
}

impl Model {
    pub fn new(configs: Configs, source: Source) -> Self {
        Self { configs, source, loading: AtomicU64::new(0) }
    }

    /// [`Source::load`], timed: reading (or drawing) the weights and handing them to the
    /// device add up in [`load_seconds`](Self::load_seconds), so a stage can report its
    /// forward time apart from its loading.
    pub fn load<M>(
        &self,
        c: Component,
        device: &Device,
        dtype_for: impl Fn(&str) -> DType + 'static,
        storage: WeightStorage,
        build: impl FnOnce(&Weights) -> M,
    ) -> Result<M, RuntimeError> {
        let start = Instant::now();
        let module = self.source.load(c, device, dtype_for, storage, build);
        self.loading.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        module
    }

    /// Seconds spent loading weights so far (on a GPU, until the uploads were queued).
    pub fn load_seconds(&self) -> f64 {
        self.loading.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

/// How a pipeline runs, besides the device.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// How the transformer and VAE matrices are stored (`--weights`).
    pub weights: WeightsChoice,
    /// The device-memory budget (`--max-memory`; default: what the adapter reports, else 8 GiB).
    pub max_memory: Option<u64>,
    /// `--check-finite`.
    pub check: CheckFinite,
    /// Sample device memory at every module output (the benchmark's view; each sample waits
    /// for the device).
    pub sample_modules: bool,
    /// Keep components loaded between runs where the memory plan finds room (a long-lived
    /// pipeline: a server, a GUI). A one-shot run leaves it off, so each stage holds only its
    /// own component.
    pub keep_loaded: bool,
}

/// What a stage took.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageStats {
    pub seconds: f64,
    /// The part of `seconds` spent loading the component's weights ([`Model::load`]).
    pub load_seconds: f64,
    pub peak: PeakMemory,
    /// GPU kernels compiled and tuned during the stage (none when the kernel cache had them).
    pub kernels: Kernels,
}

/// A stage's start: the time, the model's loading time so far and the kernel counts.
pub(crate) struct StageClock {
    start: Instant,
    loaded: f64,
    kernels: Kernels,
}

impl StageClock {
    pub(crate) fn start(model: &Model) -> Self {
        StageClock { start: Instant::now(), loaded: model.load_seconds(), kernels: Kernels::now() }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The stats of the stage so far, with its `peak` memory.
    pub(crate) fn stats(&self, model: &Model, peak: PeakMemory) -> StageStats {
        StageStats {
            seconds: self.start.elapsed().as_secs_f64(),
            load_seconds: model.load_seconds() - self.loaded,
            peak,
            kernels: Kernels::now().since(self.kernels),
        }
    }
}

/// The tensors `--save-tensors` writes, as f32 host data with their shapes.
#[derive(Clone, Debug, Default)]
pub struct Tensors {
    pub prompt_embeds: HostTensor,
    pub negative_prompt_embeds: Option<HostTensor>,
    /// img2img: the init image's latents (`mode() · scaling_factor`).
    pub init_latents: Option<HostTensor>,
    pub step_latents: HostTensor,
    pub image: HostTensor,
}

/// A tensor read back to the host: its f32 values (row-major) and its shape.
pub type HostTensor = (Vec<f32>, Vec<usize>);

/// A generated image.
#[derive(Clone, Debug)]
pub struct Output {
    /// RGB, row-major, `height × width × 3`.
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub text: StageStats,
    /// img2img's VAE encoder.
    pub encode_image: Option<StageStats>,
    pub denoise: StageStats,
    pub decode: StageStats,
    /// Per-step seconds.
    pub step_seconds: Vec<f64>,
    /// Per step, the seconds of the non-finite check (included in the step's).
    pub guard_seconds: Vec<f64>,
    pub tensors: Option<Tensors>,
    pub warnings: Vec<String>,
    /// Stages redone in f32 after going non-finite under `--precision auto`.
    pub fallbacks: Vec<String>,
    /// The memory plan the run followed.
    pub plan: Plan,
}

/// What a batch gave.
#[derive(Debug)]
pub struct Batch {
    /// One per request, in order.
    pub outputs: Vec<Output>,
    /// Prompts the text encoder ran on: each distinct prompt (and negative prompt) once.
    pub encoder_calls: usize,
}

/// A loaded pipeline: the model, the device it runs on, and the components kept loaded
/// between runs.
pub struct Pipeline {
    model: Model,
    target: Target,
    options: Options,
    guard: Guard,
    text: Option<TextEncoder>,
    image_encoder: Option<ImageEncoder>,
    transformer: Option<Denoiser>,
    vae: Option<ImageDecoder>,
}

impl Pipeline {
    /// A diffusers folder's pipeline on `target`: the tokenizer and checkpoints are opened and
    /// every key checked against the configs; no weight is read until a stage needs it.
    pub fn load(folder: ModelFolder, target: Target, options: Options) -> Result<Self, RuntimeError> {
        let configs = folder.configs.clone();
        Ok(Self::new(Model::new(configs, Source::folder(folder)?), target, options))
    }

    /// A pipeline on random weights (and made-up token ids) of `configs`: the benchmark's.
    pub fn random(configs: Configs, target: Target, options: Options) -> Self {
        Self::new(Model::new(configs, Source::Random), target, options)
    }

    fn new(model: Model, target: Target, options: Options) -> Self {
        let guard = Guard { precision: target.precision.clone(), check: options.check };
        Self { model, target, options, guard, text: None, image_encoder: None, transformer: None, vae: None }
    }

    pub fn configs(&self) -> &Configs {
        &self.model.configs
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Stored bytes read from the checkpoints so far.
    pub fn bytes_read(&self) -> u64 {
        self.model.source.bytes_read()
    }

    /// The memory plan for `requests` (made for the largest image), as [`Self::run`] follows
    /// it. No weight is read.
    pub fn plan(&self, requests: &[Request]) -> Result<Plan, RuntimeError> {
        plan_for(&self.model.configs, self.model.source.is_bf16(), &self.target, &self.options, requests)
    }

    /// One image: [`Self::generate_batch`] of one.
    pub fn generate(&mut self, request: &Request, progress: &mut impl Progress) -> Result<Output, RuntimeError> {
        let mut batch = self.generate_batch(std::slice::from_ref(request), progress)?;
        Ok(batch.outputs.pop().expect("one output per request"))
    }

    /// Every request, stage by stage, following [`Self::plan`].
    pub fn generate_batch(&mut self, requests: &[Request], progress: &mut impl Progress) -> Result<Batch, RuntimeError> {
        let plan = self.plan(requests)?;
        self.run(requests, &plan, progress)
    }

    /// Every request, stage by stage, following `plan` (from [`Self::plan`], possibly edited:
    /// the tests force streaming or tiling this way). Nothing is loaded before every request
    /// has passed its checks.
    pub fn run(&mut self, requests: &[Request], plan: &Plan, progress: &mut impl Progress) -> Result<Batch, RuntimeError> {
        let mut warnings = Vec::new();
        for r in requests {
            let mut w = r.validate(&self.model.configs)?;
            w.extend(plan.warnings.iter().cloned());
            warnings.push(w);
        }
        let starts = requests.iter().zip(&mut warnings).map(|(r, w)| self.start(r, w)).collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            "plan: text {} · transformer {} · VAE {} · weights {} ({}) · budget {} ({})",
            plan.text.mode, plan.denoise.mode, plan.decode.mode, plan.storage, plan.storage_reason,
            plan::human(plan.budget.bytes), plan.budget.source
        );
        let mut run = Run::new(&self.model, &self.target, &self.guard, &self.options, plan, progress);
        let encoded = encode_prompts(&mut run, &mut self.text, requests)?;
        let (init_latents, image_stats) = encode_images(&mut run, &mut self.image_encoder, requests)?;
        let starts = starts.into_iter().zip(requests).zip(&init_latents).map(|((s, r), init)| match init {
            Some(init) => s.from_image(init.clone(), r.steps, r.strength),
            None => s,
        });
        let (denoised, denoise_stats) = denoise(&mut run, &mut self.transformer, requests, &encoded.conditionings, starts.collect())?;
        let latents = denoised.iter().map(|d| d.latents.clone()).collect();
        let (images, decode_stats) = decode(&mut run, &mut self.vae, latents)?;
        run.progress.finish();
        let fallbacks = run.fallbacks;
        let stats = Stats { text: encoded.stats, encode_image: plan.encode_image.map(|_| image_stats), denoise: denoise_stats, decode: decode_stats };
        let outputs = requests
            .iter()
            .zip(encoded.conditionings)
            .zip(init_latents)
            .zip(denoised)
            .zip(images)
            .zip(warnings)
            .map(|(((((r, c), init), d), image), w)| output(r, Stages { conditioning: c, init, denoised: d, image }, w, &stats, &fallbacks, plan))
            .collect();
        Ok(Batch { outputs, encoder_calls: encoded.encoder_calls })
    }

    /// The text stage alone (the benchmark's): each request's conditioning.
    pub fn encode_prompts(&mut self, requests: &[Request], plan: &Plan, progress: &mut impl Progress) -> Result<Encoded, RuntimeError> {
        let mut run = Run::new(&self.model, &self.target, &self.guard, &self.options, plan, progress);
        encode_prompts(&mut run, &mut self.text, requests)
    }

    /// The denoising stage alone (the benchmark's), from the requests' seeded or given noise.
    pub fn denoise(
        &mut self,
        requests: &[Request],
        conditionings: &[Conditioning],
        plan: &Plan,
        progress: &mut impl Progress,
    ) -> Result<(Vec<Denoised>, StageStats), RuntimeError> {
        let starts = requests.iter().map(|r| self.start(r, &mut Vec::new())).collect::<Result<Vec<_>, _>>()?;
        let mut run = Run::new(&self.model, &self.target, &self.guard, &self.options, plan, progress);
        denoise(&mut run, &mut self.transformer, requests, conditionings, starts)
    }

    /// The image-encoding stage alone (the benchmark's): each init image's latents.
    pub fn encode_images(&mut self, requests: &[Request], plan: &Plan, progress: &mut impl Progress) -> Result<(Vec<Option<Tensor<4>>>, StageStats), RuntimeError> {
        let mut run = Run::new(&self.model, &self.target, &self.guard, &self.options, plan, progress);
        encode_images(&mut run, &mut self.image_encoder, requests)
    }

    /// The decoding stage alone (the benchmark's): float images `[1, 3, H, W]` in [0, 1].
    pub fn decode(&mut self, latents: Vec<Tensor<4>>, plan: &Plan, progress: &mut impl Progress) -> Result<(Vec<Decoded>, StageStats), RuntimeError> {
        let mut run = Run::new(&self.model, &self.target, &self.guard, &self.options, plan, progress);
        decode(&mut run, &mut self.vae, latents)
    }

    /// Where `request`'s denoising starts: its scheduler and its noise (seeded, or the
    /// request's latents), on the device in f32.
    fn start(&self, request: &Request, warnings: &mut Vec<String>) -> Result<Start, RuntimeError> {
        let scheduler = DdimScheduler::new(&self.model.configs.scheduler, request.steps)
            .map_err(|_| RequestError::new(Field::Steps, &request.steps, format!("must be between 1 and {}", self.model.configs.scheduler.num_train_timesteps)))?;
        if scheduler.timesteps.len() != request.steps {
            warnings.push(format!(
                "--steps {}: diffusers' trailing spacing yields {} timesteps for this count (the last is -1); \
                 running them all, as diffusers does",
                request.steps,
                scheduler.timesteps.len()
            ));
        }
        let [c, h, w] = request.latent_shape(&self.model.configs);
        let noise = match &request.latents {
            Some(l) => l.clone(),
            None => seeded_noise(request.seed, c * h * w),
        };
        let latents = Tensor::<4>::from_data(TensorData::new(noise, [1, c, h, w]), &self.target.device);
        Ok(Start { scheduler, first: 0, latents })
    }
}

/// The memory plan of a run of `requests`, from the configs alone: made for the largest image,
/// with guidance if any request has it, the VAE encoder if any starts from an image.
pub fn plan_for(configs: &Configs, checkpoint_bf16: bool, target: &Target, options: &Options, requests: &[Request]) -> Result<Plan, RuntimeError> {
    let largest = requests
        .iter()
        .max_by_key(|r| r.width * r.height)
        .ok_or_else(|| RequestError::new(Field::Count, &0, "nothing to generate"))?;
    Ok(plan::make(&PlanInput {
        configs,
        width: largest.width,
        height: largest.height,
        cfg: requests.iter().any(Request::cfg),
        text_len: largest.max_sequence_length,
        compute: target.precision.dtype.dtype(),
        bf16_products: target.precision.bf16_products(),
        flash: target.precision.flash,
        weights: options.weights,
        checkpoint_bf16,
        caps: &target.capabilities,
        budget: Budget::new(options.max_memory, target.limits.memory),
        max_binding: target.max_binding(),
        keep_loaded: options.keep_loaded,
        img2img: requests.iter().any(|r| r.init_image.is_some()),
    }))
}

/// What each stage took, for every image of a run.
struct Stats {
    text: StageStats,
    encode_image: Option<StageStats>,
    denoise: StageStats,
    decode: StageStats,
}

/// One image's results from each stage.
struct Stages {
    conditioning: Conditioning,
    init: Option<Tensor<4>>,
    denoised: Denoised,
    image: Decoded,
}

/// One image's output from its stages' results.
fn output(request: &Request, stages: Stages, mut warnings: Vec<String>, stats: &Stats, fallbacks: &[String], plan: &Plan) -> Output {
    let Stages { conditioning, init, denoised, image } = stages;
    let (height, width) = (image.shape[2], image.shape[3]);
    let rgb = to_rgb8(&image.pixels, height, width);
    let std = pixel_std(&rgb);
    if std < 1.0 {
        warnings.push(format!(
            "the image is nearly uniform (pixel standard deviation {std:.2} levels): check the prompt, steps and guidance"
        ));
    }
    let tensors = request.keep_tensors.then(|| {
        let steps = denoised.step_latents.len();
        let [_, c, h, w] = denoised.latents.dims();
        // [steps, C, h, w]; no step at all (img2img at strength 0): an empty tensor.
        let lat = if steps == 0 { Vec::new() } else { host(&Tensor::cat(denoised.step_latents, 0)).0 };
        Tensors {
            prompt_embeds: host(&conditioning.cond.cast(FloatDType::F32)),
            negative_prompt_embeds: conditioning.uncond.map(|n| host(&n.cast(FloatDType::F32))),
            init_latents: init.map(|i| host(&i.cast(FloatDType::F32))),
            step_latents: (lat, vec![steps, 1, c, h, w]),
            image: (image.pixels, image.shape),
        }
    });
    Output {
        rgb,
        width,
        height,
        text: stats.text.clone(),
        encode_image: stats.encode_image.clone(),
        denoise: stats.denoise.clone(),
        decode: stats.decode.clone(),
        step_seconds: denoised.step_seconds,
        guard_seconds: denoised.guard_seconds,
        tensors,
        warnings,
        fallbacks: fallbacks.to_vec(),
        plan: plan.clone(),
    }
}

/// One run's shared state: what it runs, where, how it guards, what it has recorded.
pub(crate) struct Run<'a, P> {
    pub model: &'a Model,
    pub target: &'a Target,
    pub guard: &'a Guard,
    pub plan: &'a Plan,
    pub sample_modules: bool,
    pub progress: &'a mut P,
    /// Stages redone in f32 (under `auto`).
    pub fallbacks: Vec<String>,
}

impl<'a, P: Progress> Run<'a, P> {
    fn new(model: &'a Model, target: &'a Target, guard: &'a Guard, options: &Options, plan: &'a Plan, progress: &'a mut P) -> Self {
        Self { model, target, guard, plan, sample_modules: options.sample_modules, progress, fallbacks: Vec::new() }
    }

    /// The compute dtype.
    pub fn compute(&self) -> DType {
        self.guard.precision.dtype.dtype()
    }

    /// The cancellation error, if the caller asked to stop.
    pub fn check_cancelled(&self, stage: Stage, step: Option<usize>) -> Result<(), RuntimeError> {
        if self.progress.cancelled() { Err(RuntimeError::Cancelled { stage, step }) } else { Ok(()) }
    }

    /// Leaves a component in its slot for the next run (`keep`), or drops it and returns the
    /// freed memory to the driver.
    pub fn release<T>(&self, slot: &mut Option<T>, component: T, keep: bool) {
        if keep {
            *slot = Some(component);
        } else {
            drop(component);
            free(&self.target.device);
        }
    }
}

/// Returns freed memory to the driver between stages.
pub(crate) fn free(device: &Device) {
    let _ = device.sync();
    device.memory_cleanup();
}

/// The plan of `requests` on a folder without opening its weights (`--dry-run` needs only the
/// configs): the weights are taken to be bf16, as the published ones are, unless the folder's
/// checkpoints say otherwise.
pub fn plan_folder(folder: &ModelFolder, target: &Target, options: &Options, requests: &[Request]) -> Result<Plan, RuntimeError> {
    use cogview_import::Component;
    let bf16 = |c| folder.open_weights(c).map(|(ck, _)| ck.is_bf16()).unwrap_or(true);
    let checkpoint_bf16 = bf16(Component::Transformer) && bf16(Component::Vae);
    plan_for(&folder.configs, checkpoint_bf16, target, options, requests)
}
