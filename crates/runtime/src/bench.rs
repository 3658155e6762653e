//! `cogview bench`: the pipeline's stages on random weights (no checkpoint needed), timed and
//! measured: T5 time, the first denoising step (shader compilation) apart from the median step,
//! the non-finite guard's cost per step, VAE time, and peak device memory per stage.

use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Tensor};
use cogview_models::dit::{AttentionLimits, Dit, DitBlock, DitConfig, SizeCondition};
use cogview_models::t5::{T5Block, T5Config, T5Embedding};
use cogview_models::vae::{Decoder, VaeConfig};
use cogview_models::{NoProbe, WeightSource};
use serde::Serialize;

use crate::guard::count_nonfinite;
use crate::memory::PeakMemory;

/// Random weights: N(0, 1/fan_in) matrices, norm weights 1, other vectors N(0, 0.02²).
#[derive(Clone)]
pub struct RandomWeights {
    device: Device,
    dtype: DType,
    prefix: String,
}

impl RandomWeights {
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self { device: device.clone(), dtype, prefix: String::new() }
    }
}

impl WeightSource for RandomWeights {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let norm = key == "weight" && (self.prefix.contains("norm") || self.prefix.ends_with("layer_norm"));
        let t: Tensor<D> = if D == 1 && norm {
            Tensor::ones(shape, &self.device)
        } else {
            let fan_in: usize = if D > 1 { shape[1..].iter().product() } else { 2500 };
            Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()), &self.device)
        };
        t.cast(self.dtype)
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { prefix.to_string() } else { format!("{}.{prefix}", self.prefix) };
        Self { prefix, ..self.clone() }
    }
}

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
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub t5_layers: usize,
    pub dit_layers: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub t5_seconds: f64,
    pub first_step_seconds: f64,
    pub median_step_seconds: f64,
    /// Median time of the guard's reduction per step (included in the step time).
    pub guard_seconds_per_step: f64,
    pub vae_seconds: f64,
    pub t5_peak: PeakMemory,
    pub dit_peak: PeakMemory,
    pub vae_peak: PeakMemory,
    /// Weight bytes of one DiT block and of the non-block parts, in the compute dtype (for
    /// extrapolating `--layers` runs to the full depth).
    pub dit_block_weight_bytes: u64,
    pub t5_block_weight_bytes: u64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn block_bytes(shapes: Vec<(String, Vec<usize>)>, dtype: DType) -> u64 {
    shapes.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>() * dtype.size() as u64
}

/// Runs the three stages on random weights.
pub fn bench(
    t5: &T5Config,
    dit: &DitConfig,
    vae: &VaeConfig,
    settings: &BenchSettings,
    device: &Device,
    dtype: DType,
) -> BenchReport {
    let mut t5 = t5.clone();
    let mut dit = dit.clone();
    if let Some(n) = settings.layers {
        t5.num_layers = n.min(t5.num_layers);
        dit.num_layers = n.min(dit.num_layers);
    }
    let w = RandomWeights::new(device, dtype);
    let mut report = BenchReport {
        t5_layers: t5.num_layers,
        dit_layers: dit.num_layers,
        width: settings.width,
        height: settings.height,
        steps: settings.steps,
        dit_block_weight_bytes: block_bytes(cogview_import::KeyRecorder::keys_of(|r| { DitBlock::load(r, &dit); }), dtype),
        t5_block_weight_bytes: block_bytes(cogview_import::KeyRecorder::keys_of(|r| { T5Block::load(r, &t5); }), dtype),
        ..Default::default()
    };

    // T5, streamed block by block as the pipeline does for the real model.
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let embedding = T5Embedding::load(&RandomWeights::new(&Device::flex(), DType::F32), &t5);
    let ids = vec![(0..settings.text_len).map(|i| (i * 7919 % t5.vocab_size) as u32).collect::<Vec<_>>(); 1];
    let mut h = embedding.embed(&ids, device).cast(dtype);
    let bias = embedding.position_bias(settings.text_len, device);
    for i in 0..t5.num_layers {
        let block = T5Block::load(&w.pp(format!("encoder.block.{i}")), &t5);
        h = block.forward(h, &bias, "b", &mut NoProbe);
        peak.sample(device);
    }
    let text = embedding.final_norm(h);
    peak.sample(device);
    report.t5_seconds = start.elapsed().as_secs_f64();
    report.t5_peak = peak;
    drop(bias);
    free(device);

    // DiT: resident, `steps` calls with the pipeline's batch.
    let mut peak = PeakMemory::default();
    let model = Dit::load(&w, &dit);
    peak.sample(device);
    let batch = if settings.cfg { 2 } else { 1 };
    let f = vae.scale_factor();
    let (lh, lw) = (settings.height / f, settings.width / f);
    let text = text.expand([batch, settings.text_len, t5.d_model]).cast(dtype);
    let latents = Tensor::<4>::random([batch, dit.in_channels, lh, lw], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let size = SizeCondition {
        original_size: [settings.height as f32, settings.width as f32],
        crop_coords: [0.0, 0.0],
        target_size: [settings.height as f32, settings.width as f32],
    };
    let sizes = vec![size; batch];
    let attn = AttentionLimits::default();
    let mut steps = Vec::new();
    let mut guard = Vec::new();
    for i in 0..settings.steps {
        let t = 999.0 - (i as f32) * 1000.0 / settings.steps as f32;
        let s = Instant::now();
        let v = model.forward(latents.clone(), text.clone(), &vec![t; batch], &sizes, &attn, &mut NoProbe);
        let _ = device.sync();
        let g = Instant::now();
        let _ = count_nonfinite(&v);
        guard.push(g.elapsed().as_secs_f64());
        steps.push(s.elapsed().as_secs_f64());
        peak.sample(device);
    }
    report.first_step_seconds = steps.first().copied().unwrap_or(0.0);
    report.median_step_seconds = median(&mut steps.iter().skip(1).copied().collect::<Vec<_>>());
    if settings.steps == 1 {
        report.median_step_seconds = report.first_step_seconds;
    }
    report.guard_seconds_per_step = median(&mut guard);
    report.dit_peak = peak;
    drop(model);
    free(device);

    // VAE decode.
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let decoder = Decoder::load(&w, vae);
    let z = Tensor::<4>::random([1, vae.latent_channels, lh, lw], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let image = decoder.forward(z, &mut NoProbe);
    peak.sample(device);
    drop(image);
    report.vae_seconds = start.elapsed().as_secs_f64();
    report.vae_peak = peak;
    drop(decoder);
    free(device);
    report
}


fn free(device: &Device) {
    let _ = device.sync();
    device.memory_cleanup();
}
