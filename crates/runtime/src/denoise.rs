//! The denoising stage: the transformer's steps with classifier-free guidance, as diffusers'
//! `CogView3PlusPipeline.__call__` loops over the timesteps, the transformer resident or
//! streamed block by block.

use std::time::Instant;

use burn::tensor::{DType, Device, FloatDType, Tensor};
use cogview_import::Component;
use cogview_models::dit::{AttentionLimits, Dit, DitBlock, DitEmbeddings, SizeCondition};
use cogview_models::scheduler::DdimScheduler;
use cogview_models::{Probe, WeightSource, WeightStorage};

use crate::error::RuntimeError;
use crate::guard::{Call, CallProbe, Guarded, count_nonfinite};
use crate::memory::PeakMemory;
use crate::pipeline::{Model, Run, StageClock, StageStats};
use crate::plan::Residency;
use crate::progress::{Progress, Stage};
use crate::request::Request;
use crate::text::Conditioning;

/// The transformer, loaded: every block on the device, or only the embeddings with each
/// block read from the checkpoint when a call reaches it.
pub struct Denoiser {
    weights: DenoiserWeights,
    dtype: DType,
    storage: WeightStorage,
}

enum DenoiserWeights {
    Resident(Dit),
    Streamed(DitEmbeddings),
}

impl Denoiser {
    pub fn load(model: &Model, device: &Device, dtype: DType, storage: WeightStorage, mode: Residency) -> Result<Self, RuntimeError> {
        let c = &model.configs.transformer;
        let t = Component::Transformer;
        let weights = match mode {
            Residency::Resident => model.load(t, device, move |_| dtype, storage, |w| DenoiserWeights::Resident(Dit::load(w, c)))?,
            Residency::Streamed => {
                model.load(t, device, move |_| dtype, storage, |w| DenoiserWeights::Streamed(DitEmbeddings::load(w, c)))?
            }
        };
        Ok(Self { weights, dtype, storage })
    }

    pub fn mode(&self) -> Residency {
        match self.weights {
            DenoiserWeights::Resident(_) => Residency::Resident,
            DenoiserWeights::Streamed(_) => Residency::Streamed,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// One denoiser call: the velocity prediction.
    ///
    /// # Shapes
    /// - latents `[N, C, h, w]`, text `[N, L, text_embed_dim]`, timesteps `[N]`, sizes `N`
    /// - → `[N, C_out, h, w]`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        model: &Model,
        latents: Tensor<4>,
        text: Tensor<3>,
        timesteps: &[f32],
        sizes: &[SizeCondition],
        attn: &AttentionLimits,
        probe: &mut impl Probe,
    ) -> Result<Tensor<4>, RuntimeError> {
        match &self.weights {
            DenoiserWeights::Resident(dit) => Ok(dit.forward(latents, text, timesteps, sizes, attn, probe)),
            DenoiserWeights::Streamed(embeddings) => {
                let c = &model.configs.transformer;
                let device = latents.device();
                let dtype = self.dtype;
                let block = |i: usize| -> Result<DitBlock, RuntimeError> {
                    model.load(Component::Transformer, &device, move |_| dtype, self.storage, |w| {
                        DitBlock::load(&w.pp(format!("transformer_blocks.{i}")), c)
                    })
                };
                embeddings.forward_blocks(c.num_layers, block, latents, text, timesteps, sizes, attn, probe)
            }
        }
    }
}

/// Where one image's denoising starts: its scheduler (set for the request's step count), the
/// index of the first timestep to run, and the latents there.
pub struct Start {
    pub scheduler: DdimScheduler,
    pub first: usize,
    /// `[1, C, h, w]`, f32: the noise, until [`Self::from_image`].
    pub latents: Tensor<4>,
}

impl Start {
    /// img2img, as diffusers' CogVideoX video-to-video pipeline: the schedule cut at
    /// `strength` (`init = min(int(steps · strength), steps)`, the loop from index
    /// `steps − init`, the scheduler still stepping as for `steps`), and the init latents noised
    /// to the first timestep that runs with `add_noise` (this start's noise). When no step runs
    /// (strength 0) the init latents are the result.
    pub fn from_image(self, init: Tensor<4>, steps: usize, strength: f64) -> Self {
        let first = self.scheduler.first_step(steps, strength);
        let init = init.cast(FloatDType::F32);
        let latents = match self.scheduler.timesteps.get(first) {
            Some(&t) => self.scheduler.add_noise(init, self.latents, t),
            None => init,
        };
        Self { first, latents, ..self }
    }
}

/// What the denoising gave for one image.
pub struct Denoised {
    /// `[1, C, h, w]` in the compute dtype.
    pub latents: Tensor<4>,
    /// Every executed step's latents (f32), when the request keeps tensors.
    pub step_latents: Vec<Tensor<4>>,
    pub step_seconds: Vec<f64>,
    /// The non-finite check's share of each step.
    pub guard_seconds: Vec<f64>,
}

impl Denoised {
    /// Latents no step has run on yet.
    fn none(latents: Tensor<4>) -> Self {
        Self { latents, step_latents: Vec::new(), step_seconds: Vec::new(), guard_seconds: Vec::new() }
    }
}

/// The denoising stage of a run: for each request, the transformer at each of its timesteps
/// from its start, under the guard (a non-finite output under `auto` below f32 reloads the
/// transformer in f32 and redoes the step). `kept` is the transformer a previous run left
/// loaded; it is left there again when the plan keeps it.
pub(crate) fn denoise(
    run: &mut Run<impl Progress>,
    kept: &mut Option<Denoiser>,
    requests: &[Request],
    conditionings: &[Conditioning],
    starts: Vec<Start>,
) -> Result<(Vec<Denoised>, StageStats), RuntimeError> {
    let compute = run.compute();
    let mode = run.plan.denoise.mode;
    let total: usize = starts.iter().map(|s| s.scheduler.timesteps.len() - s.first).sum();
    run.progress.stage(Stage::Transformer, total);
    let clock = StageClock::start(run.model);
    let mut peak = PeakMemory::default();
    if total == 0 {
        // img2img at strength 0: nothing to denoise, the transformer is not even loaded.
        let outputs = starts.into_iter().map(|s| Denoised::none(s.latents.cast(compute))).collect();
        return Ok((outputs, StageStats::default()));
    }
    let mut dit = match kept.take() {
        Some(d) if d.mode() == mode && d.dtype() == compute => d,
        _ => Denoiser::load(run.model, &run.target.device, compute, run.plan.storage, mode)?,
    };
    peak.sample(&run.target.device);
    let mut outputs = Vec::new();
    let mut done = 0;
    for ((request, cond), s) in requests.iter().zip(conditionings).zip(starts) {
        let mut out = Denoised::none(s.latents.cast(compute));
        for (i, &t) in s.scheduler.timesteps.iter().enumerate().skip(s.first) {
            run.check_cancelled(Stage::Transformer, Some(i))?;
            let step_start = Instant::now();
            let guard_seconds = step(run, &mut dit, &mut peak, request, cond, &s.scheduler, (i, t), &mut out.latents)?;
            if request.keep_tensors {
                out.step_latents.push(out.latents.clone().cast(FloatDType::F32));
            }
            peak.sample(&run.target.device);
            out.step_seconds.push(step_start.elapsed().as_secs_f64());
            out.guard_seconds.push(guard_seconds);
            done += 1;
            run.progress.step(done, clock.elapsed());
        }
        outputs.push(out);
    }
    let keep = run.plan.keep.transformer && dit.dtype() == compute;
    run.release(kept, dit, keep);
    Ok((outputs, clock.stats(run.model, peak)))
}

/// One step: the transformer on the latents (doubled with guidance), guidance, the scheduler.
/// Returns the guard's seconds.
#[allow(clippy::too_many_arguments)]
fn step(
    run: &mut Run<impl Progress>,
    dit: &mut Denoiser,
    peak: &mut PeakMemory,
    request: &Request,
    cond: &Conditioning,
    scheduler: &DdimScheduler,
    (i, t): (usize, i64),
    latents: &mut Tensor<4>,
) -> Result<f64, RuntimeError> {
    let cfg = request.cfg();
    let text_in = match &cond.uncond {
        Some(n) => Tensor::cat(vec![n.clone(), cond.cond.clone()], 0), // [uncond, cond]
        None => cond.cond.clone(),
    };
    let batch = text_in.dims()[0];
    let orig = request.original_size.unwrap_or([request.height, request.width]);
    let size = SizeCondition {
        original_size: orig.map(|v| v as f32),
        crop_coords: request.crop_coords.map(|v| v as f32),
        target_size: [request.height as f32, request.width as f32],
    };
    let sizes = vec![size; batch];
    let attn = run.plan.attention();
    let device = &run.target.device;
    let (v, guard_seconds) = loop {
        let x = latents.clone().cast(dit.dtype());
        let x_in = if cfg { Tensor::cat(vec![x.clone(), x], 0) } else { x };
        let txt = text_in.clone().cast(dit.dtype());
        let ts = vec![t as f32; batch];
        let call = |probe: &mut CallProbe<'_>| dit.forward(run.model, x_in.clone(), txt.clone(), &ts, &sizes, &attn, probe);
        let at = Call { stage: Stage::Transformer, step: Some((i, t)), dtype: dit.dtype() };
        let memory = run.sample_modules.then_some(&mut *peak);
        match run.guard.run(at, device, memory, &mut run.fallbacks, call, count_nonfinite)? {
            Guarded::Finite(v, seconds) => break (v, seconds),
            Guarded::RedoInF32 => *dit = Denoiser::load(run.model, device, DType::F32, WeightStorage::Compute, run.plan.denoise.mode)?,
        }
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
    let (prev, _) = scheduler.step(v, t, latents.clone().cast(FloatDType::F32));
    *latents = prev.cast(dit.dtype());
    Ok(guard_seconds)
}
