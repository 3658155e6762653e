//! `cogview bench`: the pipeline's stages on random weights (no checkpoint needed), timed and
//! measured: T5 time, the first denoising step (shader compilation) apart from the median step,
//! the non-finite guard's cost per step, VAE time, and peak device memory per stage.

use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Tensor};
use cogview_models::dit::{DitBlock, DitConfig, DitEmbeddings, SizeCondition};
use cogview_models::t5::{T5Block, T5Config, T5Embedding};
use cogview_models::vae::{Decoder, VaeConfig};
use cogview_models::{Weight, WeightSource, WeightStorage};
use serde::Serialize;

use crate::guard::count_nonfinite;
use crate::memory::{PeakMemory, PeakProbe};
use crate::plan::{self, Budget, Plan, PlanInput, WeightsChoice};
use crate::text::WeightsMode;

/// Random weights: N(0, 1/fan_in) matrices, norm weights 1, other vectors N(0, 0.02²); matrices
/// and kernels kept in `storage`.
#[derive(Clone)]
pub struct RandomWeights {
    device: Device,
    dtype: DType,
    storage: WeightStorage,
    prefix: String,
}

impl RandomWeights {
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
            storage: WeightStorage::Compute,
            prefix: String::new(),
        }
    }

    pub fn with_storage(self, storage: WeightStorage) -> Self {
        Self { storage, ..self }
    }

    fn random<const D: usize>(&self, key: &str, shape: [usize; D], device: &Device) -> Tensor<D> {
        let norm = key == "weight" && (self.prefix.contains("norm") || self.prefix.ends_with("layer_norm"));
        if D == 1 && norm {
            Tensor::ones(shape, device)
        } else {
            let fan_in: usize = if D > 1 { shape[1..].iter().product() } else { 2500 };
            Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()), device)
        }
    }
}

/// Weights are drawn on the CPU and uploaded as a checkpoint's are, so the device holds them
/// from the moment they are loaded (a lazily generated tensor would only exist once used, and
/// the memory measured would be less than a real run's).
impl WeightSource for RandomWeights {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let data = self
            .random(key, shape, &Device::flex())
            .into_data()
            .convert_dtype(self.dtype);
        Tensor::from_data(data, (&self.device, self.dtype))
    }

    fn weight<const D: usize>(&self, key: &str, shape: [usize; D]) -> Weight<D> {
        let max = cogview_models::storage::max_buffer_bytes(&self.device);
        let data = self.random(key, shape, &Device::flex()).into_data();
        Weight::store_limited(data, self.storage, self.dtype, &self.device, max)
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}.{prefix}", self.prefix)
        };
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
    pub weights: WeightsChoice,
    pub max_memory: Option<u64>,
    pub max_binding: Option<u64>,
    /// Which stages run: text, denoise, decode. Without the text stage the transformer gets
    /// random embeddings.
    pub stages: [bool; 3],
}

#[derive(Clone, Debug, Serialize)]
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
    /// Measured from the allocator at every module output.
    pub t5_peak: PeakMemory,
    pub dit_peak: PeakMemory,
    pub vae_peak: PeakMemory,
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

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn stored_bytes(shapes: Vec<(String, Vec<usize>)>, storage: WeightStorage, dtype: DType) -> u64 {
    let sb = storage.bytes_per_value(dtype) as u64;
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * if s.len() >= 2 { sb } else { dtype.size() as u64 })
        .sum()
}

/// Runs the three stages on random weights, following the plan of the full-depth
/// configuration (storage, streaming, attention groups, VAE tiles).
pub fn bench(
    t5_full: &T5Config,
    dit_full: &DitConfig,
    vae: &VaeConfig,
    settings: &BenchSettings,
    device: &Device,
    dtype: DType,
) -> BenchReport {
    let mut t5 = t5_full.clone();
    let mut dit = dit_full.clone();
    if let Some(n) = settings.layers {
        t5.num_layers = n.min(t5.num_layers);
        dit.num_layers = n.min(dit.num_layers);
    }
    let caps = crate::device::capabilities(device);
    let plan = plan::make(&PlanInput {
        t5: t5_full,
        dit: dit_full,
        vae,
        width: settings.width,
        height: settings.height,
        cfg: settings.cfg,
        text_len: settings.text_len,
        compute: dtype,
        weights: settings.weights,
        // Random weights stand for the real checkpoints, which are bf16.
        checkpoint_bf16: true,
        caps: &caps,
        budget: Budget::new(settings.max_memory, plan::adapter_memory(device)),
        max_binding: settings
            .max_binding
            .or_else(|| cogview_models::storage::max_buffer_bytes(device)),
    });
    let storage = plan.weight_storage;
    let w = RandomWeights::new(device, dtype).with_storage(storage);
    let dit_block = stored_bytes(
        cogview_import::KeyRecorder::keys_of(|r| {
            DitBlock::load(r, &dit);
        }),
        storage,
        dtype,
    );
    let t5_block = stored_bytes(
        cogview_import::KeyRecorder::keys_of(|r| {
            T5Block::load(r, &t5);
        }),
        WeightStorage::Compute,
        dtype,
    );
    let mut report = BenchReport {
        t5_layers: t5.num_layers,
        dit_layers: dit.num_layers,
        width: settings.width,
        height: settings.height,
        steps: settings.steps,
        t5_seconds: 0.0,
        first_step_seconds: 0.0,
        median_step_seconds: 0.0,
        guard_seconds_per_step: 0.0,
        vae_seconds: 0.0,
        t5_peak: PeakMemory::default(),
        dit_peak: PeakMemory::default(),
        vae_peak: PeakMemory::default(),
        dit_block_weight_bytes: dit_block,
        t5_block_weight_bytes: t5_block,
        t5_peak_full_depth: None,
        dit_peak_full_depth: None,
        vae_peak_full_depth: None,
        plan: plan.clone(),
    };

    tracing::info!(
        "bench: T5 {} ({} layers), DiT {} ({} layers), VAE {}, weights {}",
        plan.text.mode,
        t5.num_layers,
        plan.denoise.mode,
        dit.num_layers,
        plan.decode.mode,
        plan.storage
    );
    let left_out = |full: usize, run: usize, block: u64| (full - run) as u64 * block;
    let text = if settings.stages[0] {
        let (text, seconds, peak) = bench_text(&t5, &plan, &RandomWeights::new(device, dtype), settings, device, dtype);
        report.t5_seconds = seconds;
        report.t5_peak = peak;
        report.t5_peak_full_depth = peak.in_use.map(|b| match plan.text_mode {
            WeightsMode::Resident => b + left_out(t5_full.num_layers, t5.num_layers, t5_block),
            WeightsMode::Streamed => b,
        });
        tracing::info!("bench: T5 {seconds:.1} s, peak {:?}", peak.in_use);
        text
    } else {
        Tensor::<3>::random(
            [1, settings.text_len, t5.d_model],
            Distribution::Normal(0.0, 0.1),
            device,
        )
        .cast(dtype)
    };
    let f = vae.scale_factor();
    let (lh, lw) = (settings.height / f, settings.width / f);
    if settings.stages[1] {
        let denoise = bench_denoise(&dit, &plan, &w, text, [lh, lw], settings, device, dtype);
        report.first_step_seconds = denoise.first_step_seconds;
        report.median_step_seconds = denoise.median_step_seconds;
        report.guard_seconds_per_step = denoise.guard_seconds_per_step;
        report.dit_peak = denoise.peak;
        report.dit_peak_full_depth = denoise.peak.in_use.map(|b| match plan.dit_mode {
            WeightsMode::Resident => b + left_out(dit_full.num_layers, dit.num_layers, dit_block),
            WeightsMode::Streamed => b,
        });
    }
    if settings.stages[2] {
        let (seconds, peak) = bench_decode(vae, &plan, &w, [lh, lw], device, dtype);
        report.vae_seconds = seconds;
        report.vae_peak = peak;
        report.vae_peak_full_depth = peak.in_use;
    }
    report
}

/// The text stage: `text_len` tokens through the encoder, resident or streamed as planned, its
/// weights in the compute dtype as the pipeline loads them.
/// Returns the embeddings, the seconds and the peak.
fn bench_text(
    t5: &T5Config,
    plan: &Plan,
    w: &RandomWeights,
    settings: &BenchSettings,
    device: &Device,
    dtype: DType,
) -> (Tensor<3>, f64, PeakMemory) {
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let embedding = T5Embedding::load(&RandomWeights::new(&Device::flex(), DType::F32), t5);
    let ids = vec![
        (0..settings.text_len)
            .map(|i| (i * 7919 % t5.vocab_size) as u32)
            .collect::<Vec<_>>();
        1
    ];
    let mut h = embedding.embed(&ids, device).cast(dtype);
    let bias = embedding.position_bias(settings.text_len, device);
    let resident: Option<Vec<T5Block>> = (plan.text_mode == WeightsMode::Resident).then(|| {
        (0..t5.num_layers)
            .map(|i| T5Block::load(&w.pp(format!("encoder.block.{i}")), t5))
            .collect()
    });
    for i in 0..t5.num_layers {
        let mut probe = PeakProbe {
            device,
            peak: &mut peak,
        };
        h = match &resident {
            Some(blocks) => blocks[i].forward(h, &bias, "b", &mut probe),
            None => T5Block::load(&w.pp(format!("encoder.block.{i}")), t5).forward(h, &bias, "b", &mut probe),
        };
        peak.sample(device);
    }
    let text = embedding.final_norm(h);
    peak.sample(device);
    drop((bias, resident));
    free(device);
    (text, start.elapsed().as_secs_f64(), peak)
}

/// What the denoising stage measured.
struct DenoiseTimes {
    first_step_seconds: f64,
    median_step_seconds: f64,
    guard_seconds_per_step: f64,
    peak: PeakMemory,
}

/// The denoising stage: `steps` transformer calls with the pipeline's batch, resident or
/// streamed block by block as planned, each followed by the non-finite guard.
///
/// # Shapes
/// - `text`: [1, text_len, d_text]; `latent`: [height / 8, width / 8]
#[allow(clippy::too_many_arguments)]
fn bench_denoise(
    dit: &DitConfig,
    plan: &Plan,
    w: &RandomWeights,
    text: Tensor<3>,
    [lh, lw]: [usize; 2],
    settings: &BenchSettings,
    device: &Device,
    dtype: DType,
) -> DenoiseTimes {
    let mut peak = PeakMemory::default();
    let embeddings = DitEmbeddings::load(w, dit);
    let blocks: Option<Vec<DitBlock>> = (plan.dit_mode == WeightsMode::Resident).then(|| {
        (0..dit.num_layers)
            .map(|i| DitBlock::load(&w.pp(format!("transformer_blocks.{i}")), dit))
            .collect()
    });
    peak.sample(device);
    let batch = if settings.cfg { 2 } else { 1 };
    let [_, text_len, d_text] = text.dims();
    // The text stage ends in its f32 final norm (the embedding is kept on the CPU in f32).
    let text = text.expand([batch, text_len, d_text]).cast(dtype);
    let latents =
        Tensor::<4>::random([batch, dit.in_channels, lh, lw], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let size = SizeCondition {
        original_size: [settings.height as f32, settings.width as f32],
        crop_coords: [0.0, 0.0],
        target_size: [settings.height as f32, settings.width as f32],
    };
    let sizes = vec![size; batch];
    let attn = plan.attention();
    let mut steps = Vec::new();
    let mut guard = Vec::new();
    for i in 0..settings.steps {
        let t = 999.0 - (i as f32) * 1000.0 / settings.steps as f32;
        let s = Instant::now();
        let mut probe = PeakProbe {
            device,
            peak: &mut peak,
        };
        let block = |i: usize| -> Result<_, std::convert::Infallible> {
            Ok(match &blocks {
                Some(b) => std::borrow::Cow::Borrowed(&b[i]),
                None => std::borrow::Cow::Owned(DitBlock::load(&w.pp(format!("transformer_blocks.{i}")), dit)),
            })
        };
        let Ok(v) = embeddings.forward_blocks(
            dit.num_layers,
            block,
            latents.clone(),
            text.clone(),
            &vec![t; batch],
            &sizes,
            &attn,
            &mut probe,
        );
        let _ = device.sync();
        let g = Instant::now();
        let _ = count_nonfinite(&v);
        guard.push(g.elapsed().as_secs_f64());
        steps.push(s.elapsed().as_secs_f64());
        peak.sample(device);
        tracing::info!(
            "bench: DiT step {} {:.1} s, peak {:?}",
            i + 1,
            s.elapsed().as_secs_f64(),
            peak.in_use
        );
    }
    let first_step_seconds = steps.first().copied().unwrap_or(0.0);
    // With one step, the first is also the median.
    let later = if steps.len() > 1 { &steps[1..] } else { &steps[..] };
    let median_step_seconds = median(&mut later.to_vec());
    drop((embeddings, blocks));
    free(device);
    DenoiseTimes {
        first_step_seconds,
        median_step_seconds,
        guard_seconds_per_step: median(&mut guard),
        peak,
    }
}

/// The decode stage: one latent through the VAE decoder, tiled as planned.
/// Returns the seconds and the peak.
///
/// # Shapes
/// - `latent`: [height / 8, width / 8]
fn bench_decode(
    vae: &VaeConfig,
    plan: &Plan,
    w: &RandomWeights,
    [lh, lw]: [usize; 2],
    device: &Device,
    dtype: DType,
) -> (f64, PeakMemory) {
    let start = Instant::now();
    let mut peak = PeakMemory::default();
    let decoder = Decoder::load(w, vae);
    let z = Tensor::<4>::random([1, vae.latent_channels, lh, lw], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let mut probe = PeakProbe {
        device,
        peak: &mut peak,
    };
    let image = match plan.vae_tile {
        Some(tile) => decoder.forward_tiled(z, tile, &mut probe),
        None => decoder.forward(z, &mut probe),
    };
    peak.sample(device);
    drop(image);
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!("bench: VAE {seconds:.1} s, peak {:?}", peak.in_use);
    drop(decoder);
    free(device);
    (seconds, peak)
}

fn free(device: &Device) {
    let _ = device.sync();
    device.memory_cleanup();
}
