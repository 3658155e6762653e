//! diffusers' `AutoencoderKL` with `DownEncoderBlock2D`/`UpDecoderBlock2D` blocks, as
//! CogView3-Plus uses it (16 latent channels, no quant convs, no mid-block attention) and as
//! its config can ask for otherwise (quant convs, mid-block attention).
//!
//! Reference: huggingface/diffusers `src/diffusers/models/autoencoders/{autoencoder_kl,vae}.py`,
//! `unets/unet_2d_blocks.py`, `resnet.py`, `upsampling.py`, `downsampling.py`. GroupNorm eps 1e-6, SiLU, nearest ×2 upsampling then a 3×3 conv;
//! `up_blocks.0` is the lowest resolution.

use burn::tensor::Tensor;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use serde::Deserialize;

use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::probe::Probe;
use crate::weights::WeightSource;

const EPS: f64 = 1e-6;

/// `vae/config.json`. The core keys are required; the flags diffusers added later default as
/// diffusers defaults them (a config that predates them means what it meant then).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn yes() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}

impl VaeConfig {
    /// CogView3-Plus-3B's `vae/config.json`.
    pub fn cogview3_plus_3b() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 512, 1024, 1024],
            layers_per_block: 3,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 1.0,
            shift_factor: None,
            act_fn: "silu".into(),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: false,
        }
    }

    /// A tiny VAE of the same kind, the shape of the tests' `base` fixture.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![8, 16, 16, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            scaling_factor: 0.18215,
            ..Self::cogview3_plus_3b()
        }
    }

    /// The pixel size of one latent cell: 2^(levels - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    pub fn validate(&self) -> Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(format!(
                "{} down and {} up block types for {levels} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(format!("down block type `{t}` is not supported (DownEncoderBlock2D)"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(format!("up block type `{t}` is not supported (UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` must be positive".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c % self.norm_num_groups != 0) {
            return Err(format!("block_out_channels {c} is not a multiple of norm_num_groups {}", self.norm_num_groups));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err("`layers_per_block` and `latent_channels` must be positive".into());
        }
        if self.scaling_factor == 0.0 || !self.scaling_factor.is_finite() {
            return Err(format!("scaling_factor {} must be finite and non-zero", self.scaling_factor));
        }
        Ok(())
    }
}

/// `ResnetBlock2D` without time embedding.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1×1, when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(w: &impl WeightSource, c_in: usize, c_out: usize, groups: usize) -> Self {
        Self {
            norm1: GroupNorm::load(&w.pp("norm1"), groups, c_in, EPS),
            conv1: Conv2d::load(&w.pp("conv1"), c_in, c_out, 3),
            norm2: GroupNorm::load(&w.pp("norm2"), groups, c_out, EPS),
            conv2: Conv2d::load(&w.pp("conv2"), c_out, c_out, 3),
            conv_shortcut: (c_in != c_out).then(|| Conv2d::load(&w.pp("conv_shortcut"), c_in, c_out, 1)),
        }
    }

    /// # Shapes
    /// - x: `[N, C_in, H, W]` → `[N, C_out, H, W]`
    fn forward(&self, x: Tensor<4>, name: &str, probe: &mut impl Probe) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        probe.check(|| format!("{name}.conv1"), &h);
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        probe.check(|| format!("{name}.conv2"), &h);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = shortcut + h;
        probe.check(|| name.to_string(), &out);
        out
    }
}

/// The mid-block's single-head self-attention over pixels (diffusers `Attention` with a
/// GroupNorm, residual connection, f32 softmax).
#[derive(Clone, Debug)]
pub struct MidAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl MidAttention {
    fn load(w: &impl WeightSource, c: usize, groups: usize) -> Self {
        Self {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, c, EPS),
            to_q: Linear::load(&w.pp("to_q"), c, c, true),
            to_k: Linear::load(&w.pp("to_k"), c, c, true),
            to_v: Linear::load(&w.pp("to_v"), c, c, true),
            to_out: Linear::load(&w.pp("to_out.0"), c, c, true),
        }
    }

    /// # Shapes
    /// - x: `[N, C, H, W]` → `[N, C, H, W]`
    fn forward(&self, x: Tensor<4>, name: &str, probe: &mut impl Probe) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let t = self.group_norm.forward(x.clone()).reshape([n, c, h * w]).swap_dims(1, 2); // [N, HW, C]
        let head = |lin: &Linear| lin.forward(t.clone()).unsqueeze_dim::<4>(1); // [N, 1, HW, C]
        let o = attention(head(&self.to_q), head(&self.to_k), head(&self.to_v), None, None, AttentionModuleOptions::default());
        let o = self.to_out.forward(o.squeeze_dim::<3>(1));
        probe.check(|| format!("{name}.to_out.0"), &o);
        o.swap_dims(1, 2).reshape([n, c, h, w]) + x
    }
}

/// `UNetMidBlock2D`: resnet, optional attention, resnet.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: [ResnetBlock; 2],
    pub attention: Option<MidAttention>,
}

impl MidBlock {
    fn load(w: &impl WeightSource, c: usize, groups: usize, attention: bool) -> Self {
        Self {
            resnets: [
                ResnetBlock::load(&w.pp("resnets.0"), c, c, groups),
                ResnetBlock::load(&w.pp("resnets.1"), c, c, groups),
            ],
            attention: attention.then(|| MidAttention::load(&w.pp("attentions.0"), c, groups)),
        }
    }

    fn forward(&self, x: Tensor<4>, name: &str, probe: &mut impl Probe) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, &format!("{name}.resnets.0"), probe);
        if let Some(attn) = &self.attention {
            x = attn.forward(x, &format!("{name}.attentions.0"), probe);
        }
        self.resnets[1].forward(x, &format!("{name}.resnets.1"), probe)
    }
}

/// One `UpDecoderBlock2D` (or `DownEncoderBlock2D`): resnets, then the resampling conv.
#[derive(Clone, Debug)]
pub struct Level {
    pub resnets: Vec<ResnetBlock>,
    /// `upsamplers.0.conv` / `downsamplers.0.conv`
    pub resample: Option<Conv2d>,
}

/// The decoder: latents to pixels.
#[derive(Clone, Debug)]
pub struct Decoder {
    /// `post_quant_conv` (outside `decoder.` in the checkpoint), when configured.
    pub post_quant_conv: Option<Conv2d>,
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<Level>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    /// `w` is at the checkpoint root (the keys are `decoder.*` and `post_quant_conv.*`).
    pub fn load(w: &impl WeightSource, c: &VaeConfig) -> Self {
        let g = c.norm_num_groups;
        let top = *c.block_out_channels.last().expect("validated: non-empty");
        let d = w.pp("decoder");
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut prev = reversed[0];
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let b = d.pp(format!("up_blocks.{i}"));
                let resnets = (0..=c.layers_per_block)
                    .map(|j| ResnetBlock::load(&b.pp(format!("resnets.{j}")), if j == 0 { prev } else { out }, out, g))
                    .collect();
                prev = out;
                let is_final = i + 1 == reversed.len();
                Level { resnets, resample: (!is_final).then(|| Conv2d::load(&b.pp("upsamplers.0.conv"), out, out, 3)) }
            })
            .collect();
        Self {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| Conv2d::load(&w.pp("post_quant_conv"), c.latent_channels, c.latent_channels, 1)),
            conv_in: Conv2d::load(&d.pp("conv_in"), c.latent_channels, top, 3),
            mid_block: MidBlock::load(&d.pp("mid_block"), top, g, c.mid_block_add_attention),
            up_blocks,
            conv_norm_out: GroupNorm::load(&d.pp("conv_norm_out"), g, c.block_out_channels[0], EPS),
            conv_out: Conv2d::load(&d.pp("conv_out"), c.block_out_channels[0], c.out_channels, 3),
        }
    }

    /// `vae.decode(z)`: z is already divided by the scaling factor (the pipeline's job).
    ///
    /// # Shapes
    /// - z: `[N, latent, h, w]` → `[N, out, h·f, w·f]`, f = 2^(levels-1)
    pub fn forward(&self, z: Tensor<4>, probe: &mut impl Probe) -> Tensor<4> {
        let mut x = z;
        if let Some(conv) = &self.post_quant_conv {
            x = conv.forward(x);
            probe.check(|| "post_quant_conv".into(), &x);
        }
        x = self.conv_in.forward(x);
        probe.check(|| "decoder.conv_in".into(), &x);
        x = self.mid_block.forward(x, "decoder.mid_block", probe);
        for (i, level) in self.up_blocks.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                x = r.forward(x, &format!("decoder.up_blocks.{i}.resnets.{j}"), probe);
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(upsample_nearest_2x(x));
                probe.check(|| format!("decoder.up_blocks.{i}.upsamplers.0.conv"), &x);
            }
        }
        let x = self.conv_out.forward(self.conv_norm_out.forward_silu(x));
        probe.check(|| "decoder.conv_out".into(), &x);
        x
    }
}

impl Decoder {
    /// diffusers' `AutoencoderKL.tiled_decode`: the latents cut into `tile`×`tile` tiles (see
    /// [`tiled`]), each decoded alone. Bounds the decode's memory by one tile whatever the
    /// image size. Each tile is normalised over itself, so the result is close to, not equal
    /// to, the untiled decode.
    ///
    /// # Shapes
    /// - z: `[N, latent, h, w]` → `[N, out, h·f, w·f]`
    pub fn forward_tiled(&self, z: Tensor<4>, tile: usize, probe: &mut impl Probe) -> Tensor<4> {
        let factor = 1 << (self.up_blocks.len() - 1);
        tiled(z, tile, tile * factor, |part| self.forward(part, probe))
    }
}

/// diffusers' tiling (`tiled_decode`, `_tiled_encode`): `x` cut into `tile`×`tile` tiles that
/// overlap by a quarter, each run through `f` (which makes it `out_tile`×`out_tile`), each
/// result blended into its upper then its left neighbour (already blended) over a quarter of
/// an output tile, as diffusers blends in place, then the tiles cropped and joined.
///
/// # Shapes
/// - x: `[N, C, H, W]` → `[N, C', H·s, W·s]` with `s = out_tile / tile`
fn tiled(x: Tensor<4>, tile: usize, out_tile: usize, mut f: impl FnMut(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let blend = tile_blend(out_tile);
    let keep = out_tile - blend;
    let mut rows: Vec<Vec<Tensor<4>>> = Vec::new();
    for (i, th) in tile_spans(h, tile) {
        let mut row: Vec<Tensor<4>> = Vec::new();
        for (j, tw) in tile_spans(w, tile) {
            let mut out = f(x.clone().narrow(2, i, th).narrow(3, j, tw));
            if let Some(above) = rows.last() {
                out = blend_edges(&above[row.len()], out, blend, 2);
            }
            if let Some(left) = row.last() {
                out = blend_edges(left, out, blend, 3);
            }
            row.push(out);
        }
        rows.push(row);
    }
    let crop = |t: &Tensor<4>| {
        let [_, _, th, tw] = t.dims();
        t.clone().narrow(2, 0, keep.min(th)).narrow(3, 0, keep.min(tw))
    };
    let joined = rows.iter().map(|row| Tensor::cat(row.iter().map(crop).collect(), 3)).collect();
    Tensor::cat(joined, 2)
}

/// The tiles' overlap, as a fraction of a tile (diffusers' `tile_overlap_factor`).
pub const TILE_OVERLAP: f64 = 0.25;

/// Where [`tiled`] cuts a side of `len` with tiles of `tile`: each tile's start and length. A
/// tile starts every three quarters of a tile while the start is inside, as diffusers' loop
/// does (so the last tile may be a sliver).
pub fn tile_spans(len: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(tile_stride(tile)).map(move |start| (start, tile.min(len - start)))
}

/// How far apart tiles of `tile` start: three quarters of a tile (at least 1).
fn tile_stride(tile: usize) -> usize {
    ((tile as f64 * (1.0 - TILE_OVERLAP)) as usize).max(1)
}

/// The rows (columns) over which an output tile of `out_tile` is blended into its neighbour.
fn tile_blend(out_tile: usize) -> usize {
    (out_tile as f64 * TILE_OVERLAP) as usize
}

/// Whether [`tiled`] with tiles of `tile` that become `out_tile` joins them without a seam:
/// the rows a tile keeps after blending must end where the next tile's output starts, i.e.
/// the stride over the tile equals the kept rows over the output tile. That holds for the
/// decoder's tiles of a multiple of 4 latents and the encoder's of a multiple of 32 pixels
/// (diffusers' own sizes, powers of two, always do).
pub fn tile_joins(tile: usize, out_tile: usize) -> bool {
    tile > 0 && tile_stride(tile) * out_tile == (out_tile - tile_blend(out_tile)) * tile
}

/// diffusers' `blend_v` (dim 2) / `blend_h` (dim 3): the first `extent` rows (columns) of `b`
/// become `a`'s last ones × (1 − y/extent) + `b`'s × y/extent.
fn blend_edges(a: &Tensor<4>, b: Tensor<4>, extent: usize, dim: usize) -> Tensor<4> {
    let extent = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let rest: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let ramp = Tensor::<1>::from_floats(ramp.as_slice(), &device).reshape(shape).cast(b.dtype());
    let rest = Tensor::<1>::from_floats(rest.as_slice(), &device).reshape(shape).cast(b.dtype());
    let len_a = a.dims()[dim];
    let len_b = b.dims()[dim];
    let edge = a.clone().narrow(dim, len_a - extent, extent) * rest + b.clone().narrow(dim, 0, extent) * ramp;
    if extent == len_b { edge } else { Tensor::cat(vec![edge, b.narrow(dim, extent, len_b - extent)], dim) }
}

/// `F.interpolate(x, scale_factor=2, mode="nearest")`: out[y, x] = in[y/2, x/2].
///
/// # Shapes
/// - x: `[N, C, H, W]` → `[N, C, 2H, 2W]`
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h, 1, w, 1]).expand([n, c, h, 2, w, 2]).reshape([n, c, 2 * h, 2 * w])
}

/// The encoder: pixels to the latent distribution's moments (for img2img; the text-to-image
/// pipeline does not use it).
#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<Level>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// `quant_conv` (outside `encoder.`), when configured.
    pub quant_conv: Option<Conv2d>,
}

impl Encoder {
    /// `w` is at the checkpoint root (the keys are `encoder.*` and `quant_conv.*`).
    pub fn load(w: &impl WeightSource, c: &VaeConfig) -> Self {
        let g = c.norm_num_groups;
        let e = w.pp("encoder");
        let top = *c.block_out_channels.last().expect("validated: non-empty");
        let mut prev = c.block_out_channels[0];
        let down_blocks = c
            .block_out_channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let b = e.pp(format!("down_blocks.{i}"));
                let resnets = (0..c.layers_per_block)
                    .map(|j| ResnetBlock::load(&b.pp(format!("resnets.{j}")), if j == 0 { prev } else { out }, out, g))
                    .collect();
                prev = out;
                let is_final = i + 1 == c.block_out_channels.len();
                Level { resnets, resample: (!is_final).then(|| Conv2d::load_downsample(&b.pp("downsamplers.0.conv"), out)) }
            })
            .collect();
        let moments = 2 * c.latent_channels;
        Self {
            conv_in: Conv2d::load(&e.pp("conv_in"), c.in_channels, c.block_out_channels[0], 3),
            down_blocks,
            mid_block: MidBlock::load(&e.pp("mid_block"), top, g, c.mid_block_add_attention),
            conv_norm_out: GroupNorm::load(&e.pp("conv_norm_out"), g, top, EPS),
            conv_out: Conv2d::load(&e.pp("conv_out"), top, moments, 3),
            quant_conv: c.use_quant_conv.then(|| Conv2d::load(&w.pp("quant_conv"), moments, moments, 1)),
        }
    }

    /// The moments `[mean | logvar]` of the latent distribution (before any scaling).
    ///
    /// # Shapes
    /// - x: `[N, in, H, W]` in [-1, 1] → `[N, 2·latent, H/f, W/f]`
    pub fn forward(&self, x: Tensor<4>, probe: &mut impl Probe) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        probe.check(|| "encoder.conv_in".into(), &x);
        for (i, level) in self.down_blocks.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                x = r.forward(x, &format!("encoder.down_blocks.{i}.resnets.{j}"), probe);
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(x);
                probe.check(|| format!("encoder.down_blocks.{i}.downsamplers.0.conv"), &x);
            }
        }
        x = self.mid_block.forward(x, "encoder.mid_block", probe);
        x = self.conv_out.forward(self.conv_norm_out.forward_silu(x));
        probe.check(|| "encoder.conv_out".into(), &x);
        if let Some(conv) = &self.quant_conv {
            x = conv.forward(x);
            probe.check(|| "quant_conv".into(), &x);
        }
        x
    }

    /// diffusers' `AutoencoderKL._tiled_encode`: the image cut into `tile`×`tile` pixel tiles
    /// (see [`tiled`]), each encoded alone.
    ///
    /// # Shapes
    /// - x: `[N, in, H, W]` → `[N, 2·latent, H/f, W/f]`
    pub fn forward_tiled(&self, x: Tensor<4>, tile: usize, probe: &mut impl Probe) -> Tensor<4> {
        let factor = 1 << (self.down_blocks.len() - 1);
        tiled(x, tile, tile / factor, |part| self.forward(part, probe))
    }

    /// The distribution's mode (its mean), as `latent_dist.mode()`.
    pub fn mode(moments: Tensor<4>) -> Tensor<4> {
        let c = moments.dims()[1] / 2;
        moments.narrow(1, 0, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn nearest_upsampling_repeats_pixels() {
        let d = Device::flex();
        let x = Tensor::<4>::from_data(TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [1, 1, 2, 3]), &d);
        let y = upsample_nearest_2x(x).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(&y[..6], &[1., 1., 2., 2., 3., 3.]);
        assert_eq!(&y[6..12], &[1., 1., 2., 2., 3., 3.]);
        assert_eq!(&y[12..18], &[4., 4., 5., 5., 6., 6.]);
    }

    /// A grid of distinct values in [0, 1).
    fn grid(h: usize, w: usize, d: &Device) -> Tensor<4> {
        let values: Vec<f32> = (0..h * w).map(|i| ((i * 7919) % 1009) as f32 / 1009.0).collect();
        Tensor::<4>::from_data(TensorData::new(values, [1, 1, h, w]), d)
    }

    /// Whether `a` and `b` have one shape and the same values (to rounding: blending a value
    /// with itself weighs it by factors that sum to 1 within an f32 step).
    fn same(a: Tensor<4>, b: Tensor<4>) -> bool {
        a.dims() == b.dims()
            && a.into_data().try_to_vec::<f32>().unwrap().iter().zip(b.into_data().try_to_vec::<f32>().unwrap()).all(|(x, y)| (x - y).abs() <= 1e-6)
    }

    /// Tiling a map that works pixel by pixel changes nothing exactly when the tiles join
    /// (`tile_joins`): the decoder's direction (each latent to 8×8 pixels), on a grid no tile
    /// divides, for every tile size from 3 to 40.
    #[test]
    fn tiles_that_join_give_the_untiled_result() {
        let d = Device::flex();
        let up = |x: Tensor<4>| upsample_nearest_2x(upsample_nearest_2x(upsample_nearest_2x(x)));
        let x = grid(37, 50, &d);
        let whole = up(x.clone());
        for tile in 3..=40 {
            let joins = tile_joins(tile, 8 * tile);
            assert_eq!(joins, tile % 4 == 0, "tile {tile}");
            assert_eq!(same(tiled(x.clone(), tile, 8 * tile, up), whole.clone()), joins, "tile {tile}");
        }
        // The encoder's direction (every other pixel kept): tiles of a multiple of 8 join.
        let down = |x: Tensor<4>| {
            let [n, c, h, w] = x.dims();
            x.reshape([n, c, h / 2, 2, w / 2, 2]).narrow(3, 0, 1).narrow(5, 0, 1).reshape([n, c, h / 2, w / 2])
        };
        let x = grid(40, 56, &d);
        for tile in [8, 16, 24, 32] {
            assert!(tile_joins(tile, tile / 2) && same(tiled(x.clone(), tile, tile / 2, down), down(x.clone())), "tile {tile}");
        }
        assert!(!tile_joins(12, 6) && !tile_joins(72, 9), "strides that land between output pixels");
    }
}
