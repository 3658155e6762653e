//! The memory plan: before any weight is read, from the configs, the image size and a memory
//! budget, decide per stage whether weights stay resident or are streamed block by block, how
//! the DiT and VAE weights are stored, how attention is split, and whether the VAE decodes in
//! tiles. `generate` and `bench` follow the plan; `generate --dry-run` prints it.
//!
//! The estimates are analytic: weight bytes from the exact key lists of the configs, activation
//! bytes from the tensors each stage keeps alive at its peak. `cogview bench` measures the same
//! stages from the allocator, and BENCHMARKS.md keeps both side by side.

use std::cmp::Reverse;
use std::fmt;

use burn::tensor::DType;
use cogview_import::KeyRecorder;
use cogview_models::dit::{AttentionLimits, DitBlock, DitConfig, DitEmbeddings};
use cogview_models::t5::{T5Block, T5Config};
use cogview_models::vae::{Decoder, Encoder, VaeConfig, tile_joins, tile_spans};
use cogview_models::{Configs, WeightStorage};
use cogview_shaders::flash::FlashTiles;
use serde::Serialize;

use crate::device::Capabilities;

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
    pub configs: &'a Configs,
    /// The largest image of the run.
    pub width: usize,
    pub height: usize,
    /// Classifier-free guidance doubles the DiT batch.
    pub cfg: bool,
    pub text_len: usize,
    pub compute: DType,
    /// The linear layers multiply bf16 on the matrix hardware (an f32 run on an adapter with
    /// bf16 matrix products but no bf16 arithmetic): their matrices stay bf16.
    pub bf16_products: bool,
    /// Joint attention on the adapter's f16 tiles (with bf16 products): no score matrix.
    pub flash: Option<FlashTiles>,
    pub weights: WeightsChoice,
    /// Whether the DiT and VAE checkpoints hold bf16 (random weights: like the real model).
    pub checkpoint_bf16: bool,
    pub caps: &'a Capabilities,
    pub budget: Budget,
    /// The adapter's largest storage binding: no single buffer may pass it.
    pub max_binding: Option<u64>,
    /// Whether components may stay loaded between runs (a long-lived pipeline), where the
    /// budget allows.
    pub keep_loaded: bool,
    /// Whether a request starts from an image (img2img: the VAE encoder runs).
    pub img2img: bool,
}

/// Whether a component's weights stay on the device for its whole stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Residency {
    Resident,
    /// One block at a time: loaded when the call reaches it, freed after.
    Streamed,
}

impl fmt::Display for Residency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Residency::Resident => "resident",
            Residency::Streamed => "streamed",
        })
    }
}

/// Whether the VAE works on the whole image or on tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiling {
    Untiled,
    /// Tiles of this many latents (decoder) or pixels (encoder) a side, overlapping by a
    /// quarter and blended (diffusers' `enable_tiling`).
    Tiles(usize),
}

impl Tiling {
    /// The tile size, when tiled.
    pub fn tile(self) -> Option<usize> {
        match self {
            Tiling::Untiled => None,
            Tiling::Tiles(t) => Some(t),
        }
    }
}

impl fmt::Display for Tiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tiling::Untiled => f.write_str("untiled"),
            Tiling::Tiles(t) => write!(f, "tiles of {t}"),
        }
    }
}

impl Serialize for Tiling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One stage's decision and estimate.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StagePlan<M> {
    pub mode: M,
    /// Weights on the device at the stage's peak.
    pub weight_bytes: u64,
    /// Activations at the peak.
    pub activation_bytes: u64,
    pub peak_bytes: u64,
}

impl<M> StagePlan<M> {
    fn new(mode: M, weight_bytes: u64, activation_bytes: u64) -> Self {
        Self { mode, weight_bytes, activation_bytes, peak_bytes: weight_bytes + activation_bytes }
    }

    /// Weights, activations, peak.
    fn estimate(&self) -> [u64; 3] {
        [self.weight_bytes, self.activation_bytes, self.peak_bytes]
    }
}

/// Which components stay loaded after their stage, for the next run of a long-lived
/// pipeline; the others are released (and read from disk again when needed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Keep {
    pub text: bool,
    pub transformer: bool,
    pub vae: bool,
    pub image_encoder: bool,
}

/// The whole plan: the decisions, each with its estimate.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub budget: Budget,
    pub storage: WeightStorage,
    pub storage_reason: String,
    pub text: StagePlan<Residency>,
    /// img2img's VAE encoder; tiles are in pixels.
    pub encode_image: Option<StagePlan<Tiling>>,
    pub denoise: StagePlan<Residency>,
    /// Tiles are in latents.
    pub decode: StagePlan<Tiling>,
    pub keep: Keep,
    /// The most bytes one attention call's scores may take (when `flash` is `None`).
    pub attention_scores_bytes: u64,
    /// Joint attention as burn's accelerated flash kernel on these f16 tiles: one call, no
    /// scores, no head groups.
    pub flash: Option<FlashTiles>,
    /// burn's attention in head groups on a GPU, no flash path (`cogview bench --attention
    /// grouped`, to compare).
    pub grouped_attention: bool,
    /// The largest buffer the adapter allows (the feed-forward runs on token chunks below it).
    pub max_buffer_bytes: Option<u64>,
    pub warnings: Vec<String>,
}

impl Plan {
    /// How the text encoder's matrices are kept: bf16 when the linear layers multiply bf16 (as
    /// the transformer's), else the compute dtype.
    pub fn text_storage(&self) -> WeightStorage {
        if self.storage == WeightStorage::Bf16Products { WeightStorage::Bf16Products } else { WeightStorage::Compute }
    }

    pub fn attention(&self) -> AttentionLimits {
        AttentionLimits {
            max_scores_bytes: self.attention_scores_bytes,
            max_buffer_bytes: self.max_buffer_bytes.unwrap_or(u64::MAX),
            flash: self.flash,
            grouped: self.grouped_attention,
        }
    }

    /// The plan as `--dry-run` prints it: storage, budget, attention, what stays loaded, and
    /// per stage its mode and memory against the budget.
    pub fn report(&self) -> String {
        let mut s = String::new();
        s += &format!("weights     {}: {}\n", self.storage, self.storage_reason);
        s += &format!("budget      {} ({})\n", human(self.budget.bytes), self.budget.source);
        s += &match self.flash {
            _ if self.grouped_attention => format!("attention   burn's, in head groups of at most {} of scores\n", human(self.attention_scores_bytes)),
            Some(t) => format!(
                "attention   flash on f16 tiles with f32 sums (heads padded to {}, queries to {}): no score matrix, no head groups\n",
                t.head, t.rows
            ),
            // The CPU backend's kernel and burn's unit flash kernel hold no score matrix; the
            // budget is for the head groups, which a GPU's autotune may find faster, and for
            // burn's fallback where the unit kernel cannot launch.
            None => format!(
                "attention   exact f32: flash, or head groups of at most {} of scores per call where faster\n",
                human(self.attention_scores_bytes)
            ),
        };
        let k = &self.keep;
        let kept: Vec<&str> = [(k.text, "text encoder"), (k.image_encoder, "VAE encoder"), (k.transformer, "transformer"), (k.vae, "VAE decoder")]
            .into_iter()
            .filter_map(|(k, name)| k.then_some(name))
            .collect();
        let kept = if kept.is_empty() { "nothing (each component is released after its stage)".to_string() } else { kept.join(", ") };
        s += &format!("kept        {kept}\n");
        s += &format!("\n{:<10}{:<22}{:>12}{:>14}{:>12}\n", "stage", "mode", "weights", "activations", "peak");
        let tiles = |t: Tiling, unit: &str| match t {
            Tiling::Untiled => t.to_string(),
            Tiling::Tiles(_) => format!("{t} {unit}"),
        };
        let mut rows = vec![("encode", self.text.mode.to_string(), self.text.estimate())];
        if let Some(e) = &self.encode_image {
            rows.push(("image", tiles(e.mode, "pixels"), e.estimate()));
        }
        rows.push(("denoise", self.denoise.mode.to_string(), self.denoise.estimate()));
        rows.push(("decode", tiles(self.decode.mode, "latents"), self.decode.estimate()));
        for (name, mode, [weights, activations, peak]) in rows {
            let over = if peak > self.budget.bytes { "  over budget" } else { "" };
            s += &format!("{name:<10}{mode:<22}{:>12}{:>14}{:>12}{over}\n", human(weights), human(activations), human(peak));
        }
        for w in &self.warnings {
            s += &format!("warning     {w}\n");
        }
        s
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
    if input.bf16_products {
        let ignored = if input.weights == WeightsChoice::F32 { " (--weights f32 does not apply: the products read bf16)" } else { "" };
        return (
            WeightStorage::Bf16Products,
            format!("the linear layers multiply bf16: their matrices stay bf16 tensors, never widened; conv kernels widened to f32 at use{ignored}"),
        );
    }
    match input.weights {
        WeightsChoice::F32 => (WeightStorage::Compute, "--weights f32: stored in the compute dtype".into()),
        _ if !narrower => (WeightStorage::Compute, "the compute dtype is already 16-bit".into()),
        WeightsChoice::Bf16 => (bf16(), format!("--weights bf16: stored {how}, widened to f32 layer by layer")),
        // burn's CPU backend widens a bf16 weight on the host at every use (a single-threaded
        // pass, about a fifth of a step at 256²): where the transformer fits resident in f32,
        // it is widened once, at load.
        WeightsChoice::Auto
            if input.checkpoint_bf16
                && input.caps.compiler == crate::device::Compiler::Native
                && plan_denoise(input, WeightStorage::Compute).0.mode == Residency::Resident =>
        {
            (WeightStorage::Compute, "the checkpoint is bf16; on the CPU backend widened once at load, since the f32 transformer fits the budget resident".into())
        }
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
/// scores and softmax (f32), or with flash on f16 tiles the padded q, k, v and output instead.
fn dit_activations(c: &DitConfig, n: usize, tokens: usize, dtype: DType, attn: &AttentionLimits) -> u64 {
    let d = c.inner_dim();
    let s = dtype.size() as u64;
    let stream = n as u64 * tokens as u64 * d as u64 * s;
    let inner = (n as u64 * tokens as u64 * 4 * d as u64 * s).min(attn.max_buffer_bytes);
    if let Some(t) = attn.flash {
        let padded = (n * c.num_attention_heads * tokens.next_multiple_of(t.rows) * c.attention_head_dim.next_multiple_of(t.head) * 4) as u64;
        return stream * 10 + inner * 2 + 4 * padded;
    }
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
/// `[1, C, H, W]`, and four more with `products`), the upsampled tensor, and the mid block's
/// attention scores (f32).
fn vae_activations(c: &VaeConfig, h: usize, w: usize, dtype: DType, products: bool) -> (u64, u64) {
    let s = dtype.size();
    let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
    // Convolutions as bf16 products hold four more of their input's size: the padded
    // channels-last copy, one tap's bf16 copy, one tap's product and the sum, each a little
    // over the input's size (they cover the padding's rows and columns too).
    let convs = if products { 4 } else { 0 };
    let mut peak = 0u64;
    let mut largest = 0u64;
    let (mut rh, mut rw) = (h, w);
    for (i, &ch) in reversed.iter().enumerate() {
        let level = (ch * rh * rw * s) as u64;
        let mut here = (4 + convs) * level;
        largest = largest.max(level);
        if i + 1 < reversed.len() {
            let up = 4 * level;
            here = here.max(level + (2 + convs) * up);
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
    let text = plan_text(input);
    let (denoise, attn) = plan_denoise(input, storage);
    if denoise.peak_bytes > budget {
        warnings.push(format!(
            "the transformer needs about {} even streamed, over the {} budget",
            human(denoise.peak_bytes),
            human(budget)
        ));
    }
    let decode = plan_decode(input, storage);
    let encode_image = input.img2img.then(|| plan_encode_image(input, storage));
    // A kept streamed text encoder holds nothing on the device (its token table is on the CPU).
    let held = [
        if text.mode == Residency::Resident { text.weight_bytes } else { 0 },
        dit_weights(input.configs, storage, input.compute, denoise.mode),
        decode.weight_bytes,
        encode_image.map_or(0, |e| e.weight_bytes),
    ];
    let peaks = [text.peak_bytes, denoise.peak_bytes, decode.peak_bytes, encode_image.map_or(0, |e| e.peak_bytes)];
    let keep = plan_keep(input, peaks, held);
    Plan {
        budget: input.budget.clone(),
        storage,
        storage_reason,
        text,
        encode_image,
        denoise,
        decode,
        keep,
        attention_scores_bytes: attn.max_scores_bytes,
        flash: attn.flash,
        grouped_attention: false,
        max_buffer_bytes: input.max_binding,
        warnings,
    }
}

/// Text: resident when every block fits with room to spare, streamed otherwise.
fn plan_text(input: &PlanInput) -> StagePlan<Residency> {
    let t5 = &input.configs.text_encoder;
    let c = input.compute.size();
    // bf16 matrix products keep T5's matrices bf16 too (Plan::text_storage).
    let matrix = if input.bf16_products { 2 } else { c };
    let block = bytes_of(&KeyRecorder::keys_of(|r| {
        T5Block::load(r, t5);
    }), matrix, c);
    let activations = t5_activations(t5, input.text_len, input.compute);
    let all = block * t5.num_layers as u64;
    if all + activations <= input.budget.bytes / 2 {
        StagePlan::new(Residency::Resident, all, activations)
    } else {
        StagePlan::new(Residency::Streamed, block, activations)
    }
}

/// The DiT's weights on the device in `mode`: every block and the embeddings when resident,
/// the embeddings and one block when streamed.
fn dit_weights(c: &Configs, storage: WeightStorage, compute: DType, mode: Residency) -> u64 {
    let dit = &c.transformer;
    let (sb, cb) = (storage.bytes_per_value(compute), compute.size());
    let block = bytes_of(&KeyRecorder::keys_of(|r| {
        DitBlock::load(r, dit);
    }), sb, cb);
    let rest = bytes_of(&KeyRecorder::keys_of(|r| {
        DitEmbeddings::load(r, dit);
    }), sb, cb);
    match mode {
        Residency::Resident => rest + block * dit.num_layers as u64,
        Residency::Streamed => rest + block,
    }
}

/// Denoise: the DiT resident if it fits with its activations, else streamed block by block;
/// the largest attention cap that fits with the weights.
fn plan_denoise(input: &PlanInput, storage: WeightStorage) -> (StagePlan<Residency>, AttentionLimits) {
    let dit = &input.configs.transformer;
    let budget = input.budget.bytes;
    // Widening at use keeps one layer's compute-dtype copy alive: the feed-forward's.
    let widened = if matches!(storage, WeightStorage::Compute | WeightStorage::Bf16Products) { 0 } else { (dit.inner_dim() * 4 * dit.inner_dim() * input.compute.size()) as u64 };
    let n = if input.cfg { 2 } else { 1 };
    let tokens = input.configs.dit_tokens(input.text_len, input.height, input.width);
    let max_buffer = input.max_binding.unwrap_or(u64::MAX);
    let caps = attention_caps(input, tokens);
    // The largest attention cap that fits with these weights (the smallest if none does).
    let fit = |weights: u64| {
        let limits = |cap| AttentionLimits { max_scores_bytes: cap, max_buffer_bytes: max_buffer, flash: input.flash, grouped: false };
        let found = caps.iter().map(|&cap| limits(cap)).find(|l| weights + dit_activations(dit, n, tokens, input.compute, l) <= budget);
        let l = found.unwrap_or_else(|| limits(*caps.last().expect("at least one cap")));
        (found.is_some(), l, dit_activations(dit, n, tokens, input.compute, &l))
    };
    let resident = dit_weights(input.configs, storage, input.compute, Residency::Resident) + widened;
    let (fits, attn, act) = fit(resident);
    if fits {
        return (StagePlan::new(Residency::Resident, resident, act), attn);
    }
    let streamed = dit_weights(input.configs, storage, input.compute, Residency::Streamed) + widened;
    let (_, attn, act) = fit(streamed);
    (StagePlan::new(Residency::Streamed, streamed, act), attn)
}

/// Decode: untiled when it fits, else tiles of latents (of at least 8).
fn plan_decode(input: &PlanInput, storage: WeightStorage) -> StagePlan<Tiling> {
    let vae = &input.configs.vae;
    let weights = bytes_of(&KeyRecorder::keys_of(|r| {
        Decoder::load(r, vae);
    }), storage.bytes_per_value(input.compute), input.compute.size());
    let f = vae.scale_factor();
    let size = (input.height / f, input.width / f);
    let joins = |t: usize| tile_joins(t, t * f);
    plan_tiles(input, weights, size, 8, joins, |h, w| vae_activations(vae, h, w, input.compute, storage == WeightStorage::Bf16Products))
}

/// A VAE stage on an `h`×`w` grid: untiled when its `activations` (the stage's, and its
/// largest tensor) fit the budget with `weights` and no tensor passes the binding limit; else
/// tiles of a size from `smallest` up that `joins` allows and that fit, chosen by
/// [`tiles_work`]; `smallest` if none fits. Fewer, larger tiles launch fewer kernels and
/// recompute less overlap: at 1024² on a 2 GiB binding, 4 tiles of 88 latents instead of 9 of
/// 64 (1.37 instead of 1.56 times the image's area).
fn plan_tiles(
    input: &PlanInput,
    weights: u64,
    (h, w): (usize, usize),
    smallest: usize,
    joins: impl Fn(usize) -> bool,
    activations: impl Fn(usize, usize) -> (u64, u64),
) -> StagePlan<Tiling> {
    let binding = input.max_binding.unwrap_or(u64::MAX);
    let fits = |th: usize, tw: usize| {
        let (act, largest) = activations(th, tw);
        (weights + act <= input.budget.bytes && largest <= binding / 2).then_some(act)
    };
    if let Some(act) = fits(h, w) {
        return StagePlan::new(Tiling::Untiled, weights, act);
    }
    let tile = (smallest..h.max(w))
        .filter(|&t| joins(t) && fits(t.min(h), t.min(w)).is_some())
        .min_by_key(|&t| tiles_work(h, w, t))
        .unwrap_or(smallest);
    let (act, _) = activations(tile.min(h), tile.min(w));
    StagePlan::new(Tiling::Tiles(tile), weights, act)
}

/// What cutting an `h`×`w` grid into tiles of `tile` costs, least first: how many tiles; then
/// the thinnest tile's side, widest first (each tile normalises over itself, so a sliver is
/// the tile least like the untiled decode); then the area the tiles add up to.
fn tiles_work(h: usize, w: usize, tile: usize) -> (usize, Reverse<usize>, usize) {
    let side = |len: usize| tile_spans(len, tile).fold((0, usize::MAX, 0), |(n, thinnest, sum), (_, l)| (n + 1, thinnest.min(l), sum + l));
    let ((nh, th, sh), (nw, tw, sw)) = (side(h), side(w));
    (nh * nw, Reverse(th.min(tw)), sh * sw)
}

/// What stays loaded between runs: everything when `keep_loaded` and it all fits; otherwise
/// the largest component is released first until every stage's peak, plus what the others
/// keep on the device, is within the budget. `peaks` and `held` are per component (text
/// encoder, transformer, VAE): a stage's peak, and what the component holds on the device
/// when kept.
fn plan_keep(input: &PlanInput, peaks: [u64; 4], held: [u64; 4]) -> Keep {
    let mut keep = [input.keep_loaded, input.keep_loaded, input.keep_loaded, input.keep_loaded && input.img2img];
    let over = |keep: &[bool; 4]| {
        (0..4).any(|s| peaks[s] + (0..4).filter(|&k| k != s && keep[k]).map(|k| held[k]).sum::<u64>() > input.budget.bytes)
    };
    while keep.iter().any(|k| *k) && over(&keep) {
        let largest = (0..4).filter(|&k| keep[k]).max_by_key(|&k| held[k]).expect("one is kept");
        keep[largest] = false;
    }
    Keep { text: keep[0], transformer: keep[1], vae: keep[2], image_encoder: keep[3] }
}

/// img2img's encoder: untiled when it fits, else tiles of pixels (of at least 64; whole
/// latents, joining: multiples of 32 for the 8× VAE).
fn plan_encode_image(input: &PlanInput, storage: WeightStorage) -> StagePlan<Tiling> {
    let vae = &input.configs.vae;
    let weights = bytes_of(&KeyRecorder::keys_of(|r| {
        Encoder::load(r, vae);
    }), storage.bytes_per_value(input.compute), input.compute.size());
    let f = vae.scale_factor();
    let joins = |t: usize| t.is_multiple_of(f) && tile_joins(t, t / f);
    plan_tiles(input, weights, (input.height, input.width), 64, joins, |h, w| vae_encoder_activations(vae, h, w, input.compute, storage == WeightStorage::Bf16Products))
}

/// VAE encoder activations for an `h`×`w` pixel tile, and the largest single tensor: at each
/// level the input, the norm's output, the conv's output and the residual (four
/// `[1, C, H, W]`), and the mid block's attention scores (f32).
fn vae_encoder_activations(c: &VaeConfig, h: usize, w: usize, dtype: DType, products: bool) -> (u64, u64) {
    let s = dtype.size();
    // As the decoder's (`vae_activations`): four more with convolutions as bf16 products.
    let convs = if products { 4 } else { 0 };
    let (mut peak, mut largest) = (0u64, 0u64);
    let (mut rh, mut rw) = (h, w);
    for (i, &ch) in c.block_out_channels.iter().enumerate() {
        let level = (ch * rh * rw * s) as u64;
        peak = peak.max((4 + convs) * level);
        largest = largest.max(level);
        if i + 1 < c.block_out_channels.len() {
            rh /= 2;
            rw /= 2;
        }
    }
    if c.mid_block_add_attention {
        let scores = ((rh * rw) * (rh * rw) * 4) as u64;
        peak = peak.max(2 * scores + (c.block_out_channels.last().copied().unwrap_or(0) * rh * rw * s * 4) as u64);
        largest = largest.max(scores);
    }
    (peak, largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Compiler, DtypeSupport};

    fn real(budget: u64, keep_loaded: bool, img2img: bool, caps: &Capabilities, configs: &Configs) -> Plan {
        make(&input(budget, keep_loaded, img2img, caps, configs))
    }

    fn input<'a>(budget: u64, keep_loaded: bool, img2img: bool, caps: &'a Capabilities, configs: &'a Configs) -> PlanInput<'a> {
        PlanInput {
            configs,
            width: 1024,
            height: 1024,
            cfg: true,
            text_len: 224,
            compute: DType::F32,
            bf16_products: false,
            flash: None,
            weights: WeightsChoice::Auto,
            checkpoint_bf16: true,
            caps,
            budget: Budget::new(Some(budget), None),
            max_binding: None,
            keep_loaded,
            img2img,
        }
    }

    /// Between runs everything stays loaded when the budget holds it all; when it does not, the
    /// largest component goes first, until every stage's peak plus what the others keep fits.
    #[test]
    fn components_stay_loaded_while_the_budget_allows() {
        let all = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let caps = Capabilities { compiler: Compiler::Native, f32: all, f16: all, bf16: all, bf16_products: false, flash_tiles: None };
        let configs = Configs::cogview3_plus_3b();
        let roomy = real(1 << 40, true, true, &caps, &configs);
        assert_eq!(roomy.keep, Keep { text: true, transformer: true, vae: true, image_encoder: true });
        assert_eq!(real(1 << 40, false, true, &caps, &configs).keep, Keep::default(), "a one-shot run keeps nothing");
        assert!(!real(1 << 40, true, false, &caps, &configs).keep.image_encoder, "no img2img, no encoder");
        // Room for the transformer's own stage and little else: neither it nor the VAE (which
        // would sit beside it) stays; the streamed text encoder holds nothing on the device.
        let tight = real(8 << 30, true, false, &caps, &configs);
        assert_eq!(tight.denoise.mode, Residency::Resident);
        let just = real(tight.denoise.peak_bytes + 1, true, false, &caps, &configs);
        assert_eq!(just.text.mode, Residency::Streamed);
        assert!(!just.keep.transformer && !just.keep.vae && just.keep.text, "{:?}", just.keep);
        // The dry run says what stays.
        assert!(roomy.report().contains("kept        text encoder, VAE encoder, transformer, VAE decoder"));
        assert!(!just.report().contains("\nimage ") && just.report().contains("kept        text encoder\n"));
    }

    /// On the CPU backend a bf16 checkpoint's transformer is widened once, at load, where it
    /// fits resident in f32, and kept bf16 where only that fits; a GPU keeps bf16 regardless.
    #[test]
    fn the_cpu_widens_at_load_when_the_f32_transformer_fits() {
        let all = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let cpu = Capabilities { compiler: Compiler::Native, f32: all, f16: all, bf16: all, bf16_products: false, flash_tiles: None };
        let configs = Configs::cogview3_plus_3b();
        let roomy = real(1 << 40, false, false, &cpu, &configs);
        assert_eq!((roomy.storage, roomy.denoise.mode), (WeightStorage::Compute, Residency::Resident), "{}", roomy.storage_reason);
        assert!(roomy.storage_reason.contains("widened once at load"), "{}", roomy.storage_reason);
        let tight = real(8 << 30, false, false, &cpu, &configs);
        assert_eq!((tight.storage, tight.denoise.mode), (WeightStorage::Bf16, Residency::Resident), "{}", tight.storage_reason);
        let gpu = Capabilities { compiler: Compiler::Spirv, ..cpu };
        assert_eq!(real(1 << 40, false, false, &gpu, &configs).storage, WeightStorage::Bf16);
    }

    /// With bf16 matrix products the matrices stay bf16 whatever `--weights` says (the products
    /// read bf16), and the transformer's stage budgets no widened f32 matrix: less than with
    /// bf16 storage widened layer by layer; T5's matrices stay bf16 as well.
    #[test]
    fn bf16_products_keep_matrices_bf16() {
        let (store, none) = (DtypeSupport { storage: true, arithmetic: false, accelerated: true }, DtypeSupport::default());
        let all = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let caps = Capabilities { compiler: Compiler::Spirv, f32: all, f16: none, bf16: store, bf16_products: true, flash_tiles: None };
        let configs = Configs::cogview3_plus_3b();
        let widened = make(&input(1 << 40, false, false, &caps, &configs));
        assert_eq!(widened.storage, WeightStorage::Bf16);
        for weights in [WeightsChoice::Auto, WeightsChoice::Bf16, WeightsChoice::F32] {
            let plan = make(&PlanInput { bf16_products: true, weights, ..input(1 << 40, false, false, &caps, &configs) });
            assert_eq!(plan.storage, WeightStorage::Bf16Products, "{weights:?}");
            assert!(plan.storage_reason.contains("multiply bf16"), "{}", plan.storage_reason);
            assert_eq!(plan.storage_reason.contains("does not apply"), weights == WeightsChoice::F32);
            assert!(plan.denoise.peak_bytes < widened.denoise.peak_bytes, "{} vs {}", plan.denoise.peak_bytes, widened.denoise.peak_bytes);
            // T5's matrices too: half the resident encoder.
            assert_eq!(plan.text_storage(), WeightStorage::Bf16Products);
            assert!(plan.text.peak_bytes < widened.text.peak_bytes);
        }
    }

    /// With flash attention on f16 tiles the transformer's stage holds no score matrix: at
    /// 1024² with guidance its activations are below the head-grouped plan's (1 GiB of scores
    /// and their softmax), and the dry run says so.
    #[test]
    fn flash_attention_holds_no_scores() {
        let (store, none) = (DtypeSupport { storage: true, arithmetic: false, accelerated: true }, DtypeSupport::default());
        let all = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let tiles = FlashTiles { head: 16, rows: 128 };
        let caps = Capabilities { compiler: Compiler::Spirv, f32: all, f16: none, bf16: store, bf16_products: true, flash_tiles: Some(tiles) };
        let configs = Configs::cogview3_plus_3b();
        let grouped = make(&PlanInput { bf16_products: true, ..input(1 << 40, false, false, &caps, &configs) });
        let flash = make(&PlanInput { bf16_products: true, flash: Some(tiles), ..input(1 << 40, false, false, &caps, &configs) });
        assert_eq!((grouped.attention().flash, flash.attention().flash), (None, Some(tiles)));
        assert!(
            flash.denoise.activation_bytes + (1 << 30) < grouped.denoise.activation_bytes,
            "{} vs {}",
            flash.denoise.activation_bytes,
            grouped.denoise.activation_bytes
        );
        assert!(flash.report().contains("no score matrix, no head groups"), "{}", flash.report());
        assert!(grouped.report().contains("of scores per call"), "{}", grouped.report());
    }

    /// A VAE stage that passes the binding limit runs in the fewest tiles that fit and join
    /// (then the widest thinnest tile, then the least area): at 1024² (128 latents a side),
    /// 4 tiles of 88 on a 2 GiB binding (the largest size in which the 512-channel tensor at
    /// the last level fits half of it), 81 tiles of 20 on lavapipe's 128 MiB. No other size
    /// that fits does better, and the encoder's pixel tiles are whole latents that join. At
    /// 256² on lavapipe tiles of 16 and of 20 both make 9, and 16's thinnest is 8 latents
    /// where 20's is 2.
    #[test]
    fn vae_tiles_are_the_fewest_that_fit() {
        let all = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let caps = Capabilities { compiler: Compiler::Spirv, f32: all, f16: all, bf16: DtypeSupport::default(), bf16_products: false, flash_tiles: None };
        let configs = Configs::cogview3_plus_3b();
        for (binding, count, tile) in [((2u64 << 30) - 1, 4, 88), (128 << 20, 81, 20)] {
            let plan = make(&PlanInput { max_binding: Some(binding), ..input(1 << 40, false, true, &caps, &configs) });
            assert_eq!(plan.decode.mode, Tiling::Tiles(tile), "binding {binding}");
            assert_eq!(tiles_work(128, 128, tile).0, count);
            let fits = |t: usize| vae_activations(&configs.vae, t, t, DType::F32, false).1 <= binding / 2;
            assert!(fits(tile) && tile_joins(tile, 8 * tile));
            for t in (8..128).filter(|&t| fits(t) && tile_joins(t, 8 * t)) {
                assert!(tiles_work(128, 128, t) >= tiles_work(128, 128, tile), "tiles of {t} against {tile}");
            }
            let small = make(&PlanInput { width: 256, height: 256, max_binding: Some(binding), ..input(1 << 40, false, false, &caps, &configs) });
            assert_eq!(small.decode.mode, if binding < 1 << 30 { Tiling::Tiles(16) } else { Tiling::Untiled });
            // The encoder's largest tensor (128 channels at 1024², 512 MiB) fits 2 GiB whole.
            match plan.encode_image.expect("img2img").mode {
                Tiling::Tiles(t) => assert!(binding < 1 << 30 && t.is_multiple_of(32) && tile_joins(t, t / 8), "tiles of {t}"),
                Tiling::Untiled => assert!(binding > 1 << 30),
            }
        }
    }

    #[test]
    fn modes_print_as_people_read_them() {
        assert_eq!(Tiling::Tiles(16).to_string(), "tiles of 16");
        assert_eq!(Tiling::Untiled.tile(), None);
        assert_eq!(serde_json::to_value(Tiling::Tiles(8)).unwrap(), "tiles of 8");
        assert_eq!(serde_json::to_value(Residency::Streamed).unwrap(), "streamed");
    }

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
