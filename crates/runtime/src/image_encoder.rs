//! img2img's first stage: each init image through the VAE encoder to its latents, as diffusers'
//! CogVideoX video-to-video pipeline prepares them: `vae.encode(x).latent_dist.mode()` (the
//! posterior mean, so no randomness) times the scaling factor, the encoder tiled like
//! diffusers' `_tiled_encode` when the plan says so.

use burn::tensor::{DType, Device, Tensor, TensorData};
use cogview_import::Component;
use cogview_models::vae::Encoder;
use cogview_models::{Probe, WeightStorage};

use crate::error::RuntimeError;
use crate::guard::{Call, CallProbe, Guarded, count_nonfinite};
use crate::memory::PeakMemory;
use crate::pipeline::{Model, Run, StageClock, StageStats};
use crate::plan::Tiling;
use crate::progress::{Progress, Stage};
use crate::request::Request;

/// The VAE encoder, loaded, with the dtype it computes in.
pub struct ImageEncoder {
    encoder: Encoder,
    dtype: DType,
}

impl ImageEncoder {
    pub fn load(model: &Model, device: &Device, dtype: DType, storage: WeightStorage) -> Result<Self, RuntimeError> {
        let vae = &model.configs.vae;
        let encoder = model.load(Component::Vae, device, move |_| dtype, storage, |w| Encoder::load(w, vae))?;
        Ok(Self { encoder, dtype })
    }

    /// The latent distribution's moments `[mean | logvar]`, whole or in pixel tiles.
    ///
    /// # Shapes
    /// - x: `[1, 3, H, W]` in [-1, 1] → `[1, 2·C, H/f, W/f]`
    pub fn forward(&self, x: Tensor<4>, tiling: Tiling, probe: &mut impl Probe) -> Tensor<4> {
        match tiling {
            Tiling::Tiles(tile) => self.encoder.forward_tiled(x, tile, probe),
            Tiling::Untiled => self.encoder.forward(x, probe),
        }
    }
}

/// The image-encoding stage of a run: for each request with an init image, its latents
/// (`mode() · scaling_factor`, `[1, C, h, w]` in the compute dtype), under the guard; `None`
/// for the others. `kept` is the encoder a previous run left loaded; it is left there again
/// when the plan keeps it.
pub(crate) fn encode_images(
    run: &mut Run<impl Progress>,
    kept: &mut Option<ImageEncoder>,
    requests: &[Request],
) -> Result<(Vec<Option<Tensor<4>>>, StageStats), RuntimeError> {
    let Some(plan) = run.plan.encode_image else {
        return Ok((requests.iter().map(|_| None).collect(), StageStats::default()));
    };
    let compute = run.compute();
    let device = &run.target.device;
    let scaling = run.model.configs.vae.scaling_factor;
    run.progress.stage(Stage::ImageEncoder, requests.iter().filter(|r| r.init_image.is_some()).count());
    let clock = StageClock::start(run.model);
    let mut peak = PeakMemory::default();
    let mut vae = match kept.take() {
        Some(e) if e.dtype == compute => e,
        _ => ImageEncoder::load(run.model, device, compute, run.plan.storage)?,
    };
    let mut latents = Vec::new();
    while latents.len() < requests.len() {
        let r = &requests[latents.len()];
        let Some(image) = &r.init_image else {
            latents.push(None);
            continue;
        };
        run.check_cancelled(Stage::ImageEncoder, None)?;
        let x = Tensor::<4>::from_data(TensorData::new(image.preprocess(r.width, r.height), [1, 3, r.height, r.width]), device);
        let x = x.cast(vae.dtype);
        let call = |probe: &mut CallProbe<'_>| Ok(vae.forward(x.clone(), plan.mode, probe));
        let at = Call { stage: Stage::ImageEncoder, step: None, dtype: vae.dtype };
        let memory = run.sample_modules.then_some(&mut peak);
        match run.guard.run(at, device, memory, &mut run.fallbacks, call, count_nonfinite)? {
            Guarded::Finite(moments, _) => {
                peak.sample(device);
                latents.push(Some(Encoder::mode(moments).mul_scalar(scaling)));
                run.progress.step(latents.iter().flatten().count(), clock.elapsed());
            }
            Guarded::RedoInF32 => vae = ImageEncoder::load(run.model, device, DType::F32, WeightStorage::Compute)?,
        }
    }
    let keep = run.plan.keep.image_encoder && vae.dtype == compute;
    run.release(kept, vae, keep);
    Ok((latents, clock.stats(run.model, peak)))
}
