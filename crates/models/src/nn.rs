//! The small layers every model here shares, with PyTorch's checkpoint layout and semantics.
//!
//! Statistics of every norm are computed in f32 whatever the compute dtype, as torch's
//! LayerNorm/GroupNorm kernels and transformers' T5LayerNorm do; the result goes back to the
//! input's dtype.

use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{FloatDType, Tensor};

use crate::storage::Weight;
use crate::weights::WeightSource;

/// `torch.nn.Linear`: `y = x W^T + b`, weight stored `[out, in]` as in the checkpoint.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight<2>,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(w: &impl WeightSource, d_in: usize, d_out: usize, bias: bool) -> Self {
        Self {
            weight: w.weight("weight", [d_out, d_in]),
            bias: bias.then(|| w.tensor("bias", [d_out])),
        }
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// # Shapes
    /// - x: `[..., d_in]` → `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Weight::Rows(blocks) = &self.weight {
            // Output features block by block, so no weight passes the device's largest buffer.
            let x = x.cast(self.weight.dtype());
            let mut start = 0;
            let parts = blocks
                .iter()
                .map(|b| {
                    let w = b.get();
                    let n = w.dims()[0];
                    let bias = self.bias.clone().map(|bias| bias.narrow(0, start, n));
                    start += n;
                    burn::tensor::module::linear(x.clone(), w.transpose(), bias)
                })
                .collect();
            return Tensor::cat(parts, D - 1);
        }
        let weight = self.weight.get();
        let x = x.cast(weight.dtype());
        burn::tensor::module::linear(x, weight.transpose(), self.bias.clone())
    }
}

/// `torch.nn.Conv2d`: stride 1 with "same" padding (k = 1 or 3), or the VAE encoder's
/// downsampling conv (stride 2 after a zero pad of one row and column at the bottom/right).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Weight<4>,
    pub bias: Tensor<1>,
    options: ConvOptions<2>,
}

impl Conv2d {
    pub fn load(w: &impl WeightSource, c_in: usize, c_out: usize, k: usize) -> Self {
        let options = ConvOptions::new([1, 1], [k / 2, k / 2], [1, 1], 1);
        Self::load_with(w, c_in, c_out, k, options)
    }

    /// `F.pad(x, (0, 1, 0, 1))` then a 3×3 conv with stride 2 and no padding (Downsample2D).
    pub fn load_downsample(w: &impl WeightSource, channels: usize) -> Self {
        let options = ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1);
        Self::load_with(w, channels, channels, 3, options)
    }

    fn load_with(w: &impl WeightSource, c_in: usize, c_out: usize, k: usize, options: ConvOptions<2>) -> Self {
        Self { weight: w.weight("weight", [c_out, c_in, k, k]), bias: w.tensor("bias", [c_out]), options }
    }

    /// # Shapes
    /// - x: `[N, C_in, H, W]` → `[N, C_out, H', W']`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let weight = self.weight.get();
        let x = x.cast(weight.dtype());
        conv2d(x, weight, Some(self.bias.clone()), self.options.clone())
    }
}

/// The dtype norms compute their statistics in.
fn stats_dtype() -> FloatDType {
    FloatDType::F32
}

/// LayerNorm over the last dim without affine parameters (all of the DiT's norms).
///
/// # Shapes
/// - x: `[..., D]` → `[..., D]`
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(stats_dtype());
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    let y = (x - mean).div(var.add_scalar(eps).sqrt());
    y.cast(dtype)
}

/// T5LayerNorm (RMS norm): `w * x / sqrt(mean(x²) + eps)`, statistics in f32, no mean
/// subtraction, no bias. The normalised value is rounded to the weight's dtype before the
/// multiply, as transformers does.
///
/// # Shapes
/// - x: `[B, L, D]` → `[B, L, D]`
pub fn rms_norm(x: Tensor<3>, weight: &Tensor<1>, eps: f64) -> Tensor<3> {
    let dtype = weight.dtype();
    let x = x.cast(stats_dtype());
    let var = x.clone().square().mean_dim(2);
    let y = x.div(var.add_scalar(eps).sqrt()).cast(dtype);
    y.mul(weight.clone().unsqueeze())
}

/// `torch.nn.GroupNorm` with affine weight and bias.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(w: &impl WeightSource, groups: usize, channels: usize, eps: f64) -> Self {
        Self { weight: w.tensor("weight", [channels]), bias: w.tensor("bias", [channels]), groups, eps }
    }

    /// # Shapes
    /// - x: `[N, C, H, W]` → `[N, C, H, W]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let dtype = self.weight.dtype();
        let g = x.cast(stats_dtype()).reshape([n, self.groups, (c / self.groups) * h * w]);
        let (var, mean) = g.clone().var_mean_bias(2);
        let y = (g - mean).div(var.add_scalar(self.eps).sqrt()).reshape([n, c, h, w]).cast(dtype);
        y * self.weight.clone().reshape([1, c, 1, 1]) + self.bias.clone().reshape([1, c, 1, 1])
    }
}

/// `x * sigmoid(x)`.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * sigmoid(x)
}

/// The tanh approximation of GELU, `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`, as both
/// `F.gelu(approximate="tanh")` and transformers' `NewGELUActivation` define it.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(SQRT_2_OVER_PI);
    x.mul_scalar(0.5) * tanh(inner).add_scalar(1.0)
}
