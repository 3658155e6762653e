//! The decoding stage: latents to pixels through the VAE decoder (tiled as diffusers'
//! `enable_tiling` when the plan says so), then denormalised and clamped as
//! `VaeImageProcessor.postprocess` does, and rounded to 8 bits as numpy does.

use burn::tensor::{DType, Device, FloatDType, Tensor};
use cogview_import::Component;
use cogview_models::WeightStorage;
use cogview_models::vae::Decoder;

use crate::error::RuntimeError;
use crate::guard::{Call, CallProbe, Guarded, count_nonfinite};
use crate::memory::PeakMemory;
use crate::pipeline::{Model, Run, StageClock, StageStats};
use crate::plan::Tiling;
use crate::progress::{Progress, Stage};

/// The VAE decoder, loaded, with the dtype it computes in.
pub struct ImageDecoder {
    decoder: Decoder,
    dtype: DType,
}

impl ImageDecoder {
    pub fn load(model: &Model, device: &Device, dtype: DType, storage: WeightStorage) -> Result<Self, RuntimeError> {
        let vae = &model.configs.vae;
        let decoder = model.load(Component::Vae, device, move |_| dtype, storage, |w| Decoder::load(w, vae))?;
        Ok(Self { decoder, dtype })
    }

    /// `vae.decode(z)` on latents already divided by the scaling factor, whole or in tiles.
    ///
    /// # Shapes
    /// - z: `[1, C, h, w]` → `[1, 3, h·f, w·f]`
    pub fn forward(&self, z: Tensor<4>, tiling: Tiling, probe: &mut impl cogview_models::Probe) -> Tensor<4> {
        match tiling {
            Tiling::Tiles(tile) => self.decoder.forward_tiled(z, tile, probe),
            Tiling::Untiled => self.decoder.forward(z, probe),
        }
    }
}

/// A decoded image: float values in [0, 1], planar `[1, 3, H, W]`.
pub struct Decoded {
    pub pixels: Vec<f32>,
    pub shape: Vec<usize>,
}

/// The decoding stage of a run, for each image's final latents, under the guard (a non-finite
/// output under `auto` below f32 reloads the decoder in f32 and decodes that image again).
/// `kept` is the decoder a previous run left loaded; it is left there again when the plan
/// keeps it.
pub(crate) fn decode(run: &mut Run<impl Progress>, kept: &mut Option<ImageDecoder>, latents: Vec<Tensor<4>>) -> Result<(Vec<Decoded>, StageStats), RuntimeError> {
    let compute = run.compute();
    let device = &run.target.device;
    let scaling = run.model.configs.vae.scaling_factor;
    run.progress.stage(Stage::Decoder, latents.len());
    let clock = StageClock::start(run.model);
    let mut peak = PeakMemory::default();
    let mut vae = match kept.take() {
        Some(d) if d.dtype == compute => d,
        _ => ImageDecoder::load(run.model, device, compute, run.plan.storage)?,
    };
    let mut images = Vec::new();
    while images.len() < latents.len() {
        run.check_cancelled(Stage::Decoder, None)?;
        let z = latents[images.len()].clone().cast(vae.dtype).div_scalar(scaling);
        let call = |probe: &mut CallProbe<'_>| Ok(vae.forward(z.clone(), run.plan.decode.mode, probe));
        let at = Call { stage: Stage::Decoder, step: None, dtype: vae.dtype };
        let memory = run.sample_modules.then_some(&mut peak);
        match run.guard.run(at, device, memory, &mut run.fallbacks, call, count_nonfinite)? {
            Guarded::Finite(decoded, _) => {
                peak.sample(device);
                // VaeImageProcessor.denormalize, in the compute dtype as diffusers does it.
                let image = decoded.mul_scalar(0.5).add_scalar(0.5).clamp(0.0, 1.0).cast(FloatDType::F32);
                let (pixels, shape) = host(&image);
                images.push(Decoded { pixels, shape });
                run.progress.step(images.len(), clock.elapsed());
            }
            Guarded::RedoInF32 => vae = ImageDecoder::load(run.model, device, DType::F32, WeightStorage::Compute)?,
        }
    }
    let keep = run.plan.keep.vae && vae.dtype == compute;
    run.release(kept, vae, keep);
    Ok((images, clock.stats(run.model, peak)))
}

/// A tensor's values as f32 host data, with its shape.
pub(crate) fn host<const D: usize>(t: &Tensor<D>) -> crate::pipeline::HostTensor {
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

/// Interleaved 8-bit RGB from a planar `[1, 3, H, W]` float image in [0, 1].
pub fn to_rgb8(planar: &[f32], height: usize, width: usize) -> Vec<u8> {
    let plane = height * width;
    let mut rgb = vec![0u8; plane * 3];
    for c in 0..3 {
        for p in 0..plane {
            rgb[p * 3 + c] = to_u8(planar[c * plane + p]);
        }
    }
    rgb
}

/// The largest per-channel standard deviation of interleaved RGB 8-bit pixels, in levels: under
/// one level, the image is a flat colour.
pub fn pixel_std(rgb: &[u8]) -> f64 {
    (0..3)
        .map(|c| {
            let v: Vec<f64> = rgb.iter().skip(c).step_by(3).map(|&x| x as f64).collect();
            let n = v.len().max(1) as f64;
            let mean = v.iter().sum::<f64>() / n;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_to_8_bits_is_half_to_even() {
        assert_eq!(to_u8(0.5 / 255.0), 0);
        assert_eq!(to_u8(1.5 / 255.0), 2);
        assert_eq!(to_u8(2.5 / 255.0), 2);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 0);
    }

    #[test]
    fn planar_to_interleaved() {
        // 1 × 2 pixels: R = [0, 1], G = [1, 0], B = [0.5, 0.5] (0.5 · 255 = 127.5 → 128)
        let rgb = to_rgb8(&[0.0, 1.0, 1.0, 0.0, 0.5, 0.5], 1, 2);
        assert_eq!(rgb, [0, 255, 128, 255, 0, 128]);
        assert_eq!(pixel_std(&[7, 7, 7, 7, 7, 7]), 0.0);
        assert!(pixel_std(&rgb) > 100.0);
    }
}
