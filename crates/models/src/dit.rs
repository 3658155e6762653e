//! The CogView3-Plus denoiser, diffusers' `CogView3PlusTransformer2DModel`.
//!
//! Reference: huggingface/diffusers `src/diffusers/models/transformers/transformer_cogview3plus.py`
//! with `embeddings.py` (CogView3PlusPatchEmbed, CogView3CombinedTimestepSizeEmbeddings) and
//! `normalization.py` (CogView3PlusAdaLayerNormZeroTextImage, AdaLayerNormContinuous), where
//! every constant used here comes from.
//!
//! Text and image tokens are modulated separately (AdaLN-zero, 12 chunks), attend jointly
//! (text first), and share one tanh-GELU feed-forward.

use std::sync::Mutex;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use cogview_shaders::flash::{ExactKernel, FlashTiles};
use serde::Deserialize;

use crate::nn::{Linear, gelu_tanh, layer_norm, layer_norm_modulate, silu};
use crate::probe::Probe;
use crate::weights::WeightSource;

/// `transformer/config.json`. Every key is required (diffusers would fill in class defaults;
/// we refuse a config that does not say). `pooled_projection_dim` in the real file is stale
/// (the model derives it) and is ignored like every unknown key.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DitConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub out_channels: usize,
    pub text_embed_dim: usize,
    pub time_embed_dim: usize,
    pub condition_dim: usize,
    pub pos_embed_max_size: usize,
    pub sample_size: usize,
}

impl DitConfig {
    /// CogView3-Plus-3B's `transformer/config.json`.
    pub fn cogview3_plus_3b() -> Self {
        Self {
            patch_size: 2,
            in_channels: 16,
            num_layers: 30,
            attention_head_dim: 40,
            num_attention_heads: 64,
            out_channels: 16,
            text_embed_dim: 4096,
            time_embed_dim: 512,
            condition_dim: 256,
            pos_embed_max_size: 128,
            sample_size: 128,
        }
    }

    /// A tiny DiT of the same kind, the shape of the tests' `base` fixture.
    pub fn tiny() -> Self {
        Self {
            num_layers: 2,
            attention_head_dim: 8,
            num_attention_heads: 4,
            text_embed_dim: 32,
            time_embed_dim: 16,
            condition_dim: 8,
            pos_embed_max_size: 32,
            sample_size: 16,
            ..Self::cogview3_plus_3b()
        }
    }

    /// The hidden width, heads × head_dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Cross-field checks diffusers leaves to a crash at run time.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("out_channels", self.out_channels),
            ("text_embed_dim", self.text_embed_dim),
            ("time_embed_dim", self.time_embed_dim),
            ("condition_dim", self.condition_dim),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{key}` must be positive"));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(format!(
                "num_attention_heads × attention_head_dim = {} must be a multiple of 4 (2-D sin-cos position table)",
                self.inner_dim()
            ));
        }
        if !self.condition_dim.is_multiple_of(2) {
            return Err(format!("`condition_dim` {} must be even (cos | sin halves)", self.condition_dim));
        }
        Ok(())
    }
}

/// The 2-D sin-cos position table cropped to the top-left `hp × wp` window, in f32 as diffusers
/// stores it (computed in f64). The first half of the channels encodes the column.
///
/// # Shapes
/// - → `[hp * wp, D]`
pub fn pos_embed_window(dim: usize, hp: usize, wp: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = Vec::with_capacity(hp * wp * dim);
    for i in 0..hp {
        for j in 0..wp {
            for pos in [j as f64, i as f64] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}

/// diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`,
/// in f32 as torch computes it: `[cos | sin]`.
///
/// # Shapes
/// - values: `[N]` → `[N, dim]`
pub fn timestep_embedding(values: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    // torch: exp(-ln(10000) * arange(half, f32) / half), the Python double rounded to f32.
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|k| (neg_log * k as f32 / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &v in values {
        out.extend(freqs.iter().map(|f| (v * f).cos()));
        out.extend(freqs.iter().map(|f| (v * f).sin()));
    }
    out
}

/// The size conditions of one image: each `[height, width]` / `[top, left]` in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeCondition {
    pub original_size: [f32; 2],
    pub crop_coords: [f32; 2],
    pub target_size: [f32; 2],
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct DitBlock {
    /// `norm1.linear`: the 12 modulation chunks, `[12·D, time_embed_dim]`.
    pub norm1_linear: Linear,
    /// `attn1.to_q`, `attn1.to_k`, `attn1.to_v`, `attn1.to_out.0`
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    /// `ff.net.0.proj` and `ff.net.2`
    pub ff_proj: Linear,
    pub ff_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl DitBlock {
    /// `w` is under `transformer_blocks.{i}`.
    pub fn load(w: &impl WeightSource, c: &DitConfig) -> Self {
        let d = c.inner_dim();
        let attn = w.pp("attn1");
        Self {
            norm1_linear: Linear::load(&w.pp("norm1.linear"), c.time_embed_dim, 12 * d, true),
            to_q: Linear::load(&attn.pp("to_q"), d, d, true),
            to_k: Linear::load(&attn.pp("to_k"), d, d, true),
            to_v: Linear::load(&attn.pp("to_v"), d, d, true),
            to_out: Linear::load(&attn.pp("to_out.0"), d, d, true),
            ff_proj: Linear::load(&w.pp("ff.net.0.proj"), d, 4 * d, true),
            ff_out: Linear::load(&w.pp("ff.net.2"), 4 * d, d, true),
            heads: c.num_attention_heads,
            head_dim: c.attention_head_dim,
        }
    }

    /// # Shapes
    /// - x: image tokens `[N, S, D]`, c: text tokens `[N, L, D]`, emb: `[N, E]`
    /// - → `(x, c)` with the same shapes
    pub fn forward(
        &self,
        x: Tensor<3>,
        c: Tensor<3>,
        emb: &Tensor<2>,
        attn: &AttentionLimits,
        name: &str,
        probe: &mut impl Probe,
    ) -> (Tensor<3>, Tensor<3>) {
        let [n, s, d] = x.dims();
        let l = c.dims()[1];
        let m = self.norm1_linear.forward(silu(emb.clone()));
        probe.check(|| format!("{name}.norm1.linear"), &m);
        // shift, scale, gate (msa), shift, scale, gate (mlp), then the same six for the text.
        let m: Vec<Tensor<3>> = m.chunk(12, 1).into_iter().map(|t| t.unsqueeze_dim(1)).collect(); // 12 × [N, 1, D]
        let modulate = |h: Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>| layer_norm_modulate(h, shift.clone(), scale.clone(), 1e-5);
        // The text's norm is queued first. In the other order burn's fusion, under bf16 products,
        // could not order the image norm's tail, the text norm and the concatenation after the
        // previous block's last kernel, and ran those 14 operations as 14 kernels.
        let nc = modulate(c.clone(), &m[6], &m[7]);
        let nx = modulate(x.clone(), &m[0], &m[1]);

        // Joint attention over [text, image].
        let joint = Tensor::cat(vec![nc, nx], 1); // [N, L+S, D]
        let t = l + s;
        let q = self.to_q.forward(joint.clone());
        probe.check(|| format!("{name}.attn1.to_q"), &q);
        let k = self.to_k.forward(joint.clone());
        probe.check(|| format!("{name}.attn1.to_k"), &k);
        let v = self.to_v.forward(joint);
        probe.check(|| format!("{name}.attn1.to_v"), &v);
        let split = |y: Tensor<3>| y.reshape([n, t, self.heads, self.head_dim]).swap_dims(1, 2); // [N, H, T, hd]
        let (q, k, v) = (split(q), split(k), split(v));
        let q = layer_norm(q, 1e-6);
        let k = layer_norm(k, 1e-6);
        let o = attn.attention(q, k, v).swap_dims(1, 2).reshape([n, t, d]);
        let o = self.to_out.forward(o);
        probe.check(|| format!("{name}.attn1.to_out.0"), &o);
        let o_c = o.clone().narrow(1, 0, l);
        let o_x = o.narrow(1, l, s);
        let x = x + m[2].clone() * o_x;
        let c = c + m[8].clone() * o_c;

        let nx = modulate(x.clone(), &m[3], &m[4]);
        let nc = modulate(c.clone(), &m[9], &m[10]);
        let joint = Tensor::cat(vec![nc, nx], 1);
        // Tokens in chunks whose inner tensor `[N, chunk, 4D]` fits the largest buffer.
        let per_token = (n * self.ff_proj.d_out() * joint.dtype().size()) as u64;
        let chunk = ((attn.max_buffer_bytes / per_token.max(1)) as usize).clamp(1, t);
        let parts: Vec<Tensor<3>> = (0..t)
            .step_by(chunk)
            .map(|start| {
                let h = self.ff_proj.forward(joint.clone().narrow(1, start, chunk.min(t - start)));
                probe.check(|| format!("{name}.ff.net.0.proj"), &h);
                self.ff_out.forward(gelu_tanh(h))
            })
            .collect();
        let f = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 1) };
        probe.check(|| format!("{name}.ff.net.2"), &f);
        let x = x + m[5].clone() * f.clone().narrow(1, l, s);
        let c = c + m[11].clone() * f.narrow(1, 0, l);
        (clip_f16(x), clip_f16(c))
    }
}

/// diffusers clips each block's outputs to the f16 range when running in f16 (NaN stays NaN).
fn clip_f16(x: Tensor<3>) -> Tensor<3> {
    if x.dtype() == DType::F16 { x.clamp(-65504.0, 65504.0) } else { x }
}

/// How joint attention runs, and is split so that no buffer passes the adapter's limit.
///
/// With `flash` (the adapter's f16 cooperative-matrix tiles, given with bf16 matrix products),
/// attention is burn's accelerated flash kernel on a padded problem
/// (`cogview_shaders::flash`): one call, no score matrix, no head groups (exact f32 flash at a
/// shape that kernel refuses).
///
/// Otherwise attention is exact f32: cogview's flash kernel on the CPU backend (no score
/// matrix); on a GPU, burn's unit flash kernel or burn's attention in head groups, whichever
/// autotune finds faster there (`cogview_shaders::flash::exact_attention`; burn's own choice
/// would try its accelerated kernel, which at head size 40 silently degrades to the fallback on
/// all heads at once). That fallback materialises `[N, H, T, T]` scores: 4.8 GB per image at
/// 1024² (64 heads, 4320 tokens), past the 2 GiB binding limit of Vulkan and DX12. So heads are
/// processed in groups whose score matrix fits `max_scores_bytes`, there and for other dtypes:
/// at the real shape with a 1 GiB budget that is 14 heads a call, 5 calls a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLimits {
    pub max_scores_bytes: u64,
    /// The device's largest buffer: the feed-forward runs on token chunks below it.
    pub max_buffer_bytes: u64,
    /// Flash attention on f16 tiles with f32 sums, padded to these tiles.
    pub flash: Option<FlashTiles>,
    /// burn's attention in head groups even where a flash path would run: what attention was
    /// before flash, for benchmarks that compare the two (`cogview bench --attention grouped`).
    pub grouped: bool,
}

impl Default for AttentionLimits {
    fn default() -> Self {
        Self { max_scores_bytes: 1 << 30, max_buffer_bytes: u64::MAX, flash: None, grouped: false }
    }
}

impl AttentionLimits {
    /// Heads per call for `n` images of `t` tokens and `heads` heads.
    pub fn heads_per_call(&self, n: usize, heads: usize, t: usize) -> usize {
        // Scores are f32 in the fallback whatever the compute dtype.
        let per_head = (n * t * t * 4) as u64;
        ((self.max_scores_bytes / per_head.max(1)) as usize).clamp(1, heads)
    }

    /// Whether one head of all `n` images' scores passes the budget, so that attention runs
    /// one image a call.
    fn per_image(&self, n: usize, t: usize) -> bool {
        n > 1 && (n * t * t * 4) as u64 > self.max_scores_bytes
    }

    /// The exact f32 kernel [`Self::attention`] chose on `device` for `n` images of `t` tokens
    /// (unit flash or head groups, whichever autotune found faster there): `None` where it
    /// runs something else (flash on f16 tiles, the CPU backend's kernel, `grouped`) or has not
    /// run at that shape yet.
    pub fn exact_kernel(&self, device: &Device, n: usize, heads: usize, t: usize, hd: usize) -> Option<ExactKernel> {
        if self.flash.is_some() || self.grouped {
            return None;
        }
        let n = if self.per_image(n, t) { 1 } else { n };
        cogview_shaders::flash::exact_kernel(device, [n, heads, t, hd], [n, heads, t, hd], self.heads_per_call(n, heads, t))
    }

    /// Scaled dot-product attention, `softmax(q kᵀ / sqrt(hd)) v`, no mask: flash on f16 tiles,
    /// exact f32 attention, or burn's attention in head groups (see the type's doc).
    ///
    /// # Shapes
    /// - q, k, v: `[N, H, T, hd]` → `[N, H, T, hd]`
    pub fn attention(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let [n, h, t, hd] = q.dims();
        if let Some(tiles) = self.flash.filter(|_| !self.grouped) {
            return cogview_shaders::flash::attention(q, k, v, tiles);
        }
        if cogview_shaders::attention::applies(&q, &k, &v, None) {
            // burn's CPU backend: a kernel that holds one block of query rows' scores per
            // thread, never a [T, T] matrix, so no head groups.
            return cogview_shaders::attention::attention(q, k, v, None, 1.0 / (hd as f64).sqrt());
        }
        if self.per_image(n, t) {
            // One head of the whole batch is already too much: one image at a time.
            let parts = (0..n)
                .map(|i| self.attention(q.clone().narrow(0, i, 1), k.clone().narrow(0, i, 1), v.clone().narrow(0, i, 1)))
                .collect();
            return Tensor::cat(parts, 0);
        }
        let group = self.heads_per_call(n, h, t);
        if !self.grouped && !matches!(q.device().as_dispatch(), burn::backend::DispatchDevice::Flex(_)) && q.dtype() == DType::F32 {
            // A GPU in f32: exact attention, unit flash or these head groups, whichever is
            // faster on the adapter.
            return cogview_shaders::flash::exact_attention(q, k, v, group, ExactKernel::Tuned);
        }
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        if group >= h {
            return attention(q, k, v, None, None, options);
        }
        let parts = (0..h)
            .step_by(group)
            .map(|start| {
                let len = group.min(h - start);
                attention(q.clone().narrow(1, start, len), k.clone().narrow(1, start, len), v.clone().narrow(1, start, len), None, None, options)
            })
            .collect();
        Tensor::cat(parts, 1)
    }
}

/// Everything of the DiT but its blocks, which the runtime may stream.
#[derive(Debug)]
pub struct DitEmbeddings {
    /// `patch_embed.proj`: `[D, C·p·p]`
    pub patch_proj: Linear,
    /// `patch_embed.text_proj`: `[D, text_embed_dim]`
    pub text_proj: Linear,
    /// `time_condition_embed.timestep_embedder.linear_{1,2}`
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    /// `time_condition_embed.condition_embedder.linear_{1,2}`
    pub cond_linear_1: Linear,
    pub cond_linear_2: Linear,
    /// `norm_out.linear`: scale then shift, `[2·D, E]`
    pub norm_out_linear: Linear,
    /// `proj_out`: `[p·p·C_out, D]`
    pub proj_out: Linear,
    config: DitConfig,
    /// The last position window used, by `(hp, wp)`: the same for every step of a run.
    pos_cache: Mutex<Option<((usize, usize), Tensor<2>)>>,
}

impl DitEmbeddings {
    /// `w` is at the checkpoint root.
    pub fn load(w: &impl WeightSource, c: &DitConfig) -> Self {
        let d = c.inner_dim();
        let p = c.patch_size;
        let te = c.time_embed_dim;
        let tce = w.pp("time_condition_embed");
        Self {
            patch_proj: Linear::load(&w.pp("patch_embed.proj"), c.in_channels * p * p, d, true),
            text_proj: Linear::load(&w.pp("patch_embed.text_proj"), c.text_embed_dim, d, true),
            time_linear_1: Linear::load(&tce.pp("timestep_embedder.linear_1"), d, te, true),
            time_linear_2: Linear::load(&tce.pp("timestep_embedder.linear_2"), te, te, true),
            cond_linear_1: Linear::load(&tce.pp("condition_embedder.linear_1"), 6 * c.condition_dim, te, true),
            cond_linear_2: Linear::load(&tce.pp("condition_embedder.linear_2"), te, te, true),
            norm_out_linear: Linear::load(&w.pp("norm_out.linear"), te, 2 * d, true),
            proj_out: Linear::load(&w.pp("proj_out"), d, p * p * c.out_channels, true),
            config: c.clone(),
            pos_cache: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &DitConfig {
        &self.config
    }

    fn dtype(&self) -> DType {
        self.proj_out.weight.dtype()
    }

    fn pos_window(&self, hp: usize, wp: usize, device: &Device) -> Tensor<2> {
        let mut cache = self.pos_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, t)) = cache.as_ref() && *key == (hp, wp) {
            return t.clone();
        }
        let d = self.config.inner_dim();
        let t = Tensor::<2>::from_data(TensorData::new(pos_embed_window(d, hp, wp), [hp * wp, d]), device);
        *cache = Some(((hp, wp), t.clone()));
        t
    }

    /// Patch and text embedding with the position table added (in f32, then rounded).
    ///
    /// # Shapes
    /// - latents: `[N, C, h, w]`, text: `[N, L, text_embed_dim]` → `(image [N, S, D], text [N, L, D])`
    pub fn embed(&self, latents: Tensor<4>, text: Tensor<3>, probe: &mut impl Probe) -> (Tensor<3>, Tensor<3>) {
        let [n, ch, h, w] = latents.dims();
        let p = self.config.patch_size;
        let (hp, wp) = (h / p, w / p);
        let patches = latents
            .reshape([n, ch, hp, p, wp, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([n, hp * wp, ch * p * p]); // feature = c·p² + py·p + px
        let img = self.patch_proj.forward(patches);
        probe.check(|| "patch_embed.proj".into(), &img);
        let txt = self.text_proj.forward(text);
        probe.check(|| "patch_embed.text_proj".into(), &txt);
        let dtype = img.dtype();
        let pos = self.pos_window(hp, wp, &img.device()).unsqueeze::<3>();
        let img = (img.cast(FloatDType::F32) + pos).cast(dtype);
        (img, txt)
    }

    /// The combined timestep and size embedding.
    ///
    /// # Shapes
    /// - timesteps: `[N]`, sizes: `N` conditions → `[N, time_embed_dim]`
    pub fn time_embedding(&self, timesteps: &[f32], sizes: &[SizeCondition], device: &Device, probe: &mut impl Probe) -> Tensor<2> {
        let n = timesteps.len();
        let d = self.config.inner_dim();
        let cd = self.config.condition_dim;
        let dtype = self.dtype();
        let t = Tensor::<2>::from_data(TensorData::new(timestep_embedding(timesteps, d), [n, d]), device).cast(dtype);
        // Per image: original_size (h, w), crop_coords (top, left), target_size (h, w), each
        // scalar its own [cos | sin] of condition_dim channels.
        let scalars: Vec<f32> = sizes
            .iter()
            .flat_map(|s| s.original_size.into_iter().chain(s.crop_coords).chain(s.target_size))
            .collect();
        let cond = Tensor::<2>::from_data(TensorData::new(timestep_embedding(&scalars, cd), [n, 6 * cd]), device).cast(dtype);
        let te = self.time_linear_2.forward(silu(self.time_linear_1.forward(t)));
        probe.check(|| "time_condition_embed.timestep_embedder".into(), &te);
        let ce = self.cond_linear_2.forward(silu(self.cond_linear_1.forward(cond)));
        probe.check(|| "time_condition_embed.condition_embedder".into(), &ce);
        te + ce
    }

    /// Output norm (AdaLayerNormContinuous: scale, then shift), projection and unpatchify.
    ///
    /// # Shapes
    /// - x: `[N, S, D]`, emb: `[N, E]` → `[N, C_out, h, w]` with `S = (h/p)(w/p)`
    pub fn output(&self, x: Tensor<3>, emb: &Tensor<2>, h: usize, w: usize, probe: &mut impl Probe) -> Tensor<4> {
        let [n, _, _] = x.dims();
        let p = self.config.patch_size;
        let co = self.config.out_channels;
        let m = self.norm_out_linear.forward(silu(emb.clone()));
        probe.check(|| "norm_out.linear".into(), &m);
        let mut m = m.chunk(2, 1).into_iter().map(|t| t.unsqueeze_dim::<3>(1));
        let (scale, shift) = (m.next().expect("2 chunks"), m.next().expect("2 chunks"));
        let x = layer_norm_modulate(x, shift, scale, 1e-6);
        let x = self.proj_out.forward(x);
        probe.check(|| "proj_out".into(), &x);
        let (hp, wp) = (h / p, w / p);
        x.reshape([n, hp, wp, co, p, p]).permute([0, 3, 1, 4, 2, 5]).reshape([n, co, h, w])
    }
}

/// The whole transformer, resident.
#[derive(Debug)]
pub struct Dit {
    pub embeddings: DitEmbeddings,
    /// `transformer_blocks.{i}`
    pub blocks: Vec<DitBlock>,
}

impl Dit {
    pub fn load(w: &impl WeightSource, c: &DitConfig) -> Self {
        Self {
            embeddings: DitEmbeddings::load(w, c),
            blocks: (0..c.num_layers).map(|i| DitBlock::load(&w.pp(format!("transformer_blocks.{i}")), c)).collect(),
        }
    }

    /// One denoiser call: the velocity prediction.
    ///
    /// # Shapes
    /// - latents `[N, C, h, w]`, text `[N, L, text_embed_dim]`, timesteps `[N]`, sizes `N`
    /// - → `[N, C_out, h, w]`
    pub fn forward(
        &self,
        latents: Tensor<4>,
        text: Tensor<3>,
        timesteps: &[f32],
        sizes: &[SizeCondition],
        attn: &AttentionLimits,
        probe: &mut impl Probe,
    ) -> Tensor<4> {
        let blocks = |i: usize| Ok::<_, std::convert::Infallible>(&self.blocks[i]);
        match self.embeddings.forward_blocks(self.blocks.len(), blocks, latents, text, timesteps, sizes, attn, probe) {
            Ok(v) => v,
        }
    }
}

impl DitEmbeddings {
    /// One denoiser call with block `i` from `block(i)`: resident blocks, or blocks loaded
    /// when needed and dropped after (the runtime's streamed mode).
    ///
    /// # Shapes
    /// - as [`Dit::forward`]
    #[allow(clippy::too_many_arguments)]
    pub fn forward_blocks<B: std::borrow::Borrow<DitBlock>, E>(
        &self,
        num_layers: usize,
        mut block: impl FnMut(usize) -> Result<B, E>,
        latents: Tensor<4>,
        text: Tensor<3>,
        timesteps: &[f32],
        sizes: &[SizeCondition],
        attn: &AttentionLimits,
        probe: &mut impl Probe,
    ) -> Result<Tensor<4>, E> {
        let [_, _, h, w] = latents.dims();
        let device = latents.device();
        let (mut x, mut c) = self.embed(latents, text, probe);
        let emb = self.time_embedding(timesteps, sizes, &device, probe);
        for i in 0..num_layers {
            let b = block(i)?;
            (x, c) = b.borrow().forward(x, c, &emb, attn, &format!("transformer_blocks.{i}"), probe);
        }
        Ok(self.output(x, &emb, h, w, probe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_table_layout() {
        // dim 8: quarter 2, omega = [1, 1/100]; cell (row 1, col 2)
        let t = pos_embed_window(8, 2, 3);
        let cell = &t[(3 + 2) * 8..(3 + 2) * 8 + 8];
        let want = [2f64.sin(), 0.02f64.sin(), 2f64.cos(), 0.02f64.cos(), 1f64.sin(), 0.01f64.sin(), 1f64.cos(), 0.01f64.cos()];
        for (g, w) in cell.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-7, "{cell:?}");
        }
    }

    #[test]
    fn timestep_embedding_is_cos_then_sin() {
        let e = timestep_embedding(&[0.0, 3.0], 4);
        assert_eq!(&e[..4], &[1.0, 1.0, 0.0, 0.0]);
        // freqs: exp(-ln(1e4) * k / 2) = [1, 0.01]
        assert!((e[4] - 3f32.cos()).abs() < 1e-6 && (e[6] - 3f32.sin()).abs() < 1e-6);
        assert!((e[5] - 0.03f32.cos()).abs() < 1e-6 && (e[7] - 0.03f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn head_groups_fit_the_budget() {
        let real = AttentionLimits { max_scores_bytes: 1 << 30, ..Default::default() };
        // 1024²: 4096 image + 224 text tokens, 64 heads, one image
        let g = real.heads_per_call(1, 64, 4320);
        assert_eq!(g, 14);
        assert!((g * 4320 * 4320 * 4) as u64 <= 1 << 30);
        assert_eq!(real.heads_per_call(2, 4, 80), 4);
        assert_eq!(AttentionLimits { max_scores_bytes: 1, ..Default::default() }.heads_per_call(1, 8, 100), 1);
    }
}
