//! The memory plan: before any weight is read, from the configs, the image size and a memory
//! budget, decide per stage whether weights stay resident or are streamed block by block, how
//! the DiT and VAE weights are stored, how attention is split, and whether the VAE decodes in
//! tiles. `generate` and `bench` follow the plan; `generate --dry-run` prints it.
//!
//! The estimates are analytic: weight bytes from the exact key lists of the configs, activation
//! bytes from the tensors each stage keeps alive at its peak. `cogview bench` measures the same
//! stages from the allocator, and BENCHMARKS.md keeps both side by side.

use burn::tensor::{DType, Device};
use cogview_import::KeyRecorder;
use cogview_models::dit::{AttentionLimits, DitBlock, DitConfig, DitEmbeddings};
use cogview_models::t5::{T5Block, T5Config};
use cogview_models::vae::{Decoder, VaeConfig};
use cogview_models::WeightStorage;
use serde::Serialize;

use crate::device::Capabilities;
use crate::text::WeightsMode;

/// The budget when neither `--max-memory` nor the adapter gives one: the memory of the
/// smaller GPUs cogview is for.
pub const DEFAULT_BUDGET: u64 = 8 << 30;

/// `--weights`: how the DiT and VAE matrices are stored between uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsChoice {
    /// bf16 when the checkpoint is bf16 and the compute dtype is wider, else the compute dtype.
    #[default]
    Auto,
    Bf16,
    F32,
}

impl std::str::FromStr for WeightsChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("`{s}`: expected auto, bf16 or f32")),
        }
    }
}

/// Parses `8GiB`, `8G`, `7.5GB`, `512MiB`, `1073741824`: binary units (GiB = G = 2^30).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}`: expected a size such as 8GiB, 6G or 512MiB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("`{s}`: unknown unit `{u}` (use B, KiB, MiB, GiB or TiB)")),
    };
    if value <= 0.0 || !value.is_finite() {
        return Err(format!("`{s}`: must be more than zero"));
    }
    Ok((value * scale as f64) as u64)
}

/// `1.5 GiB`-style, for plans and tables.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The device memory the adapter reports (Vulkan: its largest device-local heap; Metal: the
/// recommended working set), if it reports one.
pub fn adapter_memory(device: &Device) -> Option<u64> {
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(d) => d.client().properties().memory.max_memory(),
        _ => None,
    }
}

/// Where the budget came from.
#[derive(Clone, Debug, Serialize)]
pub struct Budget {
    pub bytes: u64,
    pub source: String,
}

impl Budget {
    pub fn new(max_memory: Option<u64>, adapter: Option<u64>) -> Self {
        match (max_memory, adapter) {
            (Some(b), _) => Self { bytes: b, source: "--max-memory".into() },
            (None, Some(b)) => Self { bytes: b, source: "what the adapter reports".into() },
            (None, None) => Self { bytes: DEFAULT_BUDGET, source: "default (the adapter reports no size)".into() },
        }
    }
}

/// What the plan is made from.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub t5: &'a T5Config,
    pub dit: &'a DitConfig,
    pub vae: &'a VaeConfig,
    pub width: usize,
    pub height: usize,
    /// Classifier-free guidance doubles the DiT batch.
    pub cfg: bool,
    pub text_len: usize,
    pub compute: DType,
    pub weights: WeightsChoice,
    /// Whether the DiT and VAE checkpoints hold bf16 (random weights: like the real model).
    pub checkpoint_bf16: bool,
    pub caps: &'a Capabilities,
    pub budget: Budget,
    /// The adapter's largest storage binding: no single buffer may pass it.
    pub max_binding: Option<u64>,
}

/// One stage's plan and estimate.
#[derive(Clone, Debug, Serialize)]
pub struct StagePlan {
    /// `resident`, `streamed`, `untiled`, `tiles of N latents`.
    pub mode: String,
    /// Weights on the device at the stage's peak.
    pub weight_bytes: u64,
    /// Activations at the peak.
    pub activation_bytes: u64,
    pub peak_bytes: u64,
}

impl StagePlan {
    fn new(mode: impl Into<String>, weight_bytes: u64, activation_bytes: u64) -> Self {
        Self { mode: mode.into(), weight_bytes, activation_bytes, peak_bytes: weight_bytes + activation_bytes }
    }
}

/// The whole plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub budget: Budget,
    pub storage: WeightStorageName,
    pub storage_reason: String,
    pub text: StagePlan,
    pub denoise: StagePlan,
    pub decode: StagePlan,
    #[serde(skip)]
    pub text_mode: WeightsMode,
    #[serde(skip)]
    pub dit_mode: WeightsMode,
    #[serde(skip)]
    pub weight_storage: WeightStorage,
    /// The most bytes one attention call's scores may take.
    pub attention_scores_bytes: u64,
    /// The largest buffer the adapter allows (the feed-forward runs on token chunks below it).
    pub max_buffer_bytes: Option<u64>,
    /// The VAE tile in latents, when tiled.
    pub vae_tile: Option<usize>,
    pub warnings: Vec<String>,
}

/// [`WeightStorage`] as printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightStorageName {
    Compute,
    Bf16,
    PackedBf16,
}

impl From<WeightStorage> for WeightStorageName {
    fn from(s: WeightStorage) -> Self {
        match s {
            WeightStorage::Compute => Self::Compute,
            WeightStorage::Bf16 => Self::Bf16,
            WeightStorage::PackedBf16 => Self::PackedBf16,
        }
    }
}

impl std::fmt::Display for WeightStorageName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Compute => "the compute dtype",
            Self::Bf16 => "bf16",
            Self::PackedBf16 => "bf16 packed in u32",
        })
    }
}

impl Plan {
    pub fn attention(&self) -> AttentionLimits {
        AttentionLimits {
            max_scores_bytes: self.attention_scores_bytes,
            max_buffer_bytes: self.max_buffer_bytes.unwrap_or(u64::MAX),
        }
    }
}

/// Weight bytes of the tensors a module asks for: matrices and kernels (rank ≥ 2) at
/// `matrix_bytes` a value, vectors at `vector_bytes`.
fn bytes_of(keys: &[(String, Vec<usize>)], matrix_bytes: usize, vector_bytes: usize) -> u64 {
    keys.iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * if s.len() >= 2 { matrix_bytes } else { vector_bytes } as u64)
        .sum()
}

/// The weight storage for the DiT and VAE, and why.
pub fn choose_storage(input: &PlanInput) -> (WeightStorage, String) {
    // burn's CPU backend stores bf16 itself (its arithmetic is what it emulates).
    let native = input.caps.bf16.storage || input.caps.compiler == crate::device::Compiler::Native;
    let narrower = input.compute.size() > 2;
    let bf16 = || if native { WeightStorage::Bf16 } else { WeightStorage::PackedBf16 };
    let how = if native { "as bf16 tensors" } else { "packed two per u32 (the adapter cannot store bf16)" };
    match input.weights {
        WeightsChoice::F32 => (WeightStorage::Compute, "--weights f32: stored in the compute dtype".into()),
        _ if !narrower => (WeightStorage::Compute, "the compute dtype is already 16-bit".into()),
        WeightsChoice::Bf16 => (bf16(), format!("--weights bf16: stored {how}, widened to f32 layer by layer")),
        WeightsChoice::Auto if input.checkpoint_bf16 => {
            (bf16(), format!("the checkpoint is bf16: stored {how} (lossless, half the memory), widened to f32 layer by layer"))
        }
        WeightsChoice::Auto => {
            (WeightStorage::Compute, "the checkpoint is not bf16: stored in the compute dtype (bf16 would round it)".into())
        }
    }
}

/// The attention-score caps to try, largest first: 1 GiB (or the adapter's largest buffer),
/// halving down to one head of one image.
fn attention_caps(input: &PlanInput, tokens: usize) -> Vec<u64> {
    let mut cap = AttentionLimits::default().max_scores_bytes.min(input.max_binding.unwrap_or(u64::MAX));
    let floor = (tokens * tokens * 4) as u64;
    let mut caps = vec![cap];
    while cap / 2 >= floor {
        cap /= 2;
        caps.push(cap);
    }
    caps
}

/// DiT activations at the peak of a block: the token streams and their norms, q/k/v and the
/// attention output (about ten `[N, T, D]` tensors), the feed-forward's inner tensor and its
/// activation (two `[N, chunk, F]`, chunked below the largest buffer), and one head group's
/// scores and softmax (f32).
fn dit_activations(c: &DitConfig, n: usize, tokens: usize, dtype: DType, attn: &AttentionLimits) -> u64 {
    let d = c.inner_dim();
    let s = dtype.size() as u64;
    let stream = n as u64 * tokens as u64 * d as u64 * s;
    let inner = (n as u64 * tokens as u64 * 4 * d as u64 * s).min(attn.max_buffer_bytes);
    let per_head = (tokens * tokens * 4) as u64;
    let scores = if (n as u64) * per_head > attn.max_scores_bytes {
        per_head
    } else {
        (attn.heads_per_call(n, c.num_attention_heads, tokens) * n) as u64 * per_head
    };
    stream * 10 + inner * 2 + 2 * scores
}

/// T5 activations: the residual stream and its norms, q/k/v, the gated feed-forward's three
/// inner tensors, and the scores, softmax and position bias (f32).
fn t5_activations(c: &T5Config, len: usize, dtype: DType) -> u64 {
    let s = dtype.size();
    let inner = c.num_heads * c.d_kv;
    (len * c.d_model * s * 6 + len * inner * s * 4 + len * c.d_ff * s * 3) as u64 + 3 * (c.num_heads * len * len * 4) as u64
}

/// VAE decoder activations for a `h`×`w` latent tile, and the largest single tensor: at each
/// level the input, the norm's output, the conv's output and the residual (four
/// `[1, C, H, W]`), the upsampled tensor, and the mid block's attention scores (f32).
fn vae_activations(c: &VaeConfig, h: usize, w: usize, dtype: DType) -> (u64, u64) {
    let s = dtype.size();
    let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
    let mut peak = 0u64;
    let mut largest = 0u64;
    let (mut rh, mut rw) = (h, w);
    for (i, &ch) in reversed.iter().enumerate() {
        let level = (ch * rh * rw * s) as u64;
        let mut here = 4 * level;
        largest = largest.max(level);
        if i + 1 < reversed.len() {
            let up = 4 * level;
            here = here.max(level + 2 * up);
            largest = largest.max(up);
            rh *= 2;
            rw *= 2;
        }
        peak = peak.max(here);
    }
    if c.mid_block_add_attention {
        let scores = ((h * w) * (h * w) * 4) as u64;
        peak = peak.max(2 * scores + (reversed[0] * h * w * s * 4) as u64);
        largest = largest.max(scores);
    }
    (peak, largest)
}

/// Makes the plan.
pub fn make(input: &PlanInput) -> Plan {
    let budget = input.budget.bytes;
    let mut warnings = Vec::new();
    let (storage, storage_reason) = choose_storage(input);
    let c = input.compute.size();

    // Text: resident when every block fits with room to spare, streamed otherwise.
    let t5_block = bytes_of(&KeyRecorder::keys_of(|r| {
        T5Block::load(r, input.t5);
    }), c, c);
    let t5_act = t5_activations(input.t5, input.text_len, input.compute);
    let t5_all = t5_block * input.t5.num_layers as u64;
    let text = if t5_all + t5_act <= budget / 2 {
        StagePlan::new("resident", t5_all, t5_act)
    } else {
        StagePlan::new("streamed", t5_block, t5_act)
    };
    let text_mode = if text.mode == "resident" { WeightsMode::Resident } else { WeightsMode::Streamed };

    // Denoise: the DiT resident if it fits with its activations, else streamed block by block.
    let sb = storage.bytes_per_value(input.compute);
    let block = bytes_of(&KeyRecorder::keys_of(|r| {
        DitBlock::load(r, input.dit);
    }), sb, c);
    let rest = bytes_of(&KeyRecorder::keys_of(|r| {
        DitEmbeddings::load(r, input.dit);
    }), sb, c);
    // Widening at use keeps one layer's compute-dtype copy alive: the feed-forward's.
    let widened = if storage == WeightStorage::Compute { 0 } else { (input.dit.inner_dim() * 4 * input.dit.inner_dim() * c) as u64 };
    let n = if input.cfg { 2 } else { 1 };
    let p = input.dit.patch_size;
    let f = input.vae.scale_factor();
    let (lh, lw) = (input.height / f, input.width / f);
    let tokens = input.text_len + (lh / p) * (lw / p);
    let resident_weights = rest + block * input.dit.num_layers as u64 + widened;
    let max_buffer = input.max_binding.unwrap_or(u64::MAX);
    let caps = attention_caps(input, tokens);
    // The largest attention cap that fits with these weights (the smallest if none does).
    let fit = |weights: u64| {
        let limits = |cap| AttentionLimits { max_scores_bytes: cap, max_buffer_bytes: max_buffer };
        let found = caps.iter().map(|&cap| limits(cap)).find(|l| weights + dit_activations(input.dit, n, tokens, input.compute, l) <= budget);
        let l = found.unwrap_or_else(|| limits(*caps.last().expect("at least one cap")));
        (found.is_some(), l, dit_activations(input.dit, n, tokens, input.compute, &l))
    };
    let (fits_resident, attn_resident, act_resident) = fit(resident_weights);
    let (denoise, dit_mode, attn) = if fits_resident {
        (StagePlan::new("resident", resident_weights, act_resident), WeightsMode::Resident, attn_resident)
    } else {
        let weights = rest + block + widened;
        let (_, attn, act) = fit(weights);
        (StagePlan::new("streamed", weights, act), WeightsMode::Streamed, attn)
    };
    if denoise.peak_bytes > budget {
        warnings.push(format!(
            "the transformer needs about {} even streamed, over the {} budget",
            human(denoise.peak_bytes),
            human(budget)
        ));
    }

    // Decode: untiled when it fits the budget and no tensor passes the binding limit; else
    // the largest tile that does.
    let vae_w = bytes_of(&KeyRecorder::keys_of(|r| {
        Decoder::load(r, input.vae);
    }), sb, c);
    let binding = input.max_binding.unwrap_or(u64::MAX);
    let fits = |th: usize, tw: usize| {
        let (act, largest) = vae_activations(input.vae, th, tw, input.compute);
        (vae_w + act <= budget && largest <= binding / 2).then_some(act)
    };
    let (decode, vae_tile) = match fits(lh, lw) {
        Some(act) => (StagePlan::new("untiled", vae_w, act), None),
        None => {
            let tile = [128usize, 96, 64, 48, 32, 16, 8].into_iter().filter(|&t| t < lh.max(lw)).find(|&t| fits(t.min(lh), t.min(lw)).is_some());
            let tile = tile.unwrap_or(8);
            let (act, _) = vae_activations(input.vae, tile.min(lh), tile.min(lw), input.compute);
            (StagePlan::new(format!("tiles of {tile} latents"), vae_w, act), Some(tile))
        }
    };
    Plan {
        budget: input.budget.clone(),
        storage: storage.into(),
        storage_reason,
        text,
        denoise,
        decode,
        text_mode,
        dit_mode,
        weight_storage: storage,
        attention_scores_bytes: attn.max_scores_bytes,
        max_buffer_bytes: input.max_binding,
        vae_tile,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("8 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }
}
