//! The small layers every model here shares, with PyTorch's checkpoint layout and semantics.
//!
//! Statistics of every norm are computed in f32 whatever the compute dtype, as torch's
//! LayerNorm/GroupNorm kernels and transformers' T5LayerNorm do; the result goes back to the
//! input's dtype.

use burn::tensor::activation::sigmoid;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{FloatDType, Tensor};

use cogview_shaders::{bf16_product, conv, gelu, group_norm, layer_norm, linear};
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
            weight: w.weight("weight", [d_out, d_in]).for_matmul(),
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
        // As one `[rows, d_in]` matrix: with more dims burn lifts the transposed weight view to
        // `[1, d_in, d_out]`, a reshape that copies the whole weight on every call (the CPU
        // backend and CubeCL alike); a 2-D matmul reads the view in place.
        let dims = x.dims();
        let d_in = dims[D - 1];
        let x = x.reshape([dims.iter().product::<usize>() / d_in.max(1), d_in]).cast(self.weight.dtype());
        let y = match &self.weight {
            Weight::Rows(blocks) => {
                // Output features block by block, so no weight passes the device's largest buffer.
                let mut start = 0;
                let parts = blocks
                    .iter()
                    .map(|b| {
                        let n = b.dims()[0];
                        let bias = self.bias.clone().map(|bias| bias.narrow(0, start, n));
                        start += n;
                        product(x.clone(), b, bias)
                    })
                    .collect();
                Tensor::cat(parts, 1)
            }
            weight => product(x, weight, self.bias.clone()),
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        y.reshape(out)
    }
}

/// `x · weightᵀ + bias` for one (unblocked) weight: bf16 matrices meant for bf16 products go to
/// that kernel as they are; the others are widened to the compute dtype (if stored narrower) for
/// the CPU backend's linear kernel or burn's `linear`.
///
/// # Shapes
/// - x: `[rows, d_in]`, weight: `[d_out, d_in]`, bias: `[d_out]` → `[rows, d_out]`
fn product(x: Tensor<2>, weight: &Weight<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    if let Weight::Bf16Products { stored, .. } = weight {
        return bf16_product::bf16_linear(x, stored.clone(), bias);
    }
    let w = weight.get();
    if linear::applies(&x, &w, bias.as_ref()) {
        linear::linear(x, w, bias)
    } else {
        cogview_shaders::burn_linear(x, w.transpose(), bias)
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
        // A kernel kept for bf16 products: one product per tap where the conv has stride 1 and
        // the same padding on both sides (all of the decoder's); the encoder's downsampling
        // conv widens it instead.
        if let Weight::Bf16Products { stored, .. } = &self.weight {
            let [(top, bottom), (left, right)] = self.options.padding;
            if self.options.stride == [1, 1] && self.options.dilation == [1, 1] && top == bottom && left == right {
                return bf16_product::bf16_conv2d(x, stored.clone(), self.bias.clone(), [top, left]);
            }
        }
        let weight = self.weight.get();
        let x = x.cast(weight.dtype());
        // burn's CPU backend convolves through im2col at about half its matrix-product speed;
        // a same-padded 3×3 convolution there runs as nine matrix products instead.
        if conv::applies(&x, &weight, &self.options) {
            return conv::conv3x3_same(x, weight, self.bias.clone());
        }
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
    if layer_norm::applies(&x) {
        return layer_norm::layer_norm(x, eps);
    }
    layer_norm_burn(x, eps)
}

/// AdaLN's modulated norm, `layer_norm(x, eps) · (1 + scale) + shift`, in one pass on burn's
/// CPU backend.
///
/// # Shapes
/// - x: `[N, T, D]`, shift and scale: `[N, 1, D]` → `[N, T, D]`
pub fn layer_norm_modulate(x: Tensor<3>, shift: Tensor<3>, scale: Tensor<3>, eps: f64) -> Tensor<3> {
    if layer_norm::applies(&x) && layer_norm::applies(&shift) && layer_norm::applies(&scale) {
        return layer_norm::layer_norm_modulate(x, shift, scale, eps);
    }
    layer_norm_burn(x, eps) * scale.add_scalar(1.0) + shift
}

/// [`layer_norm`] as burn ops (the GPU path, and the CPU kernel's reference).
fn layer_norm_burn<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = x.cast(stats_dtype());
    // The centred values are computed once and serve both the variance and the output. burn's
    // `var_mean_bias` followed by `x - mean` subtracts the mean twice, and around each DiT
    // block's first two modulated norms burn's fusion could not order that graph: it gave up
    // fusing and ran their 20 operations as 20 kernels (8 now).
    let centered = x.clone() - x.mean_dim(D - 1);
    let var = centered.clone().square().mean_dim(D - 1);
    let y = centered.div(var.add_scalar(eps).sqrt());
    y.cast(dtype)
}

/// T5LayerNorm (RMS norm): `w * x / sqrt(mean(x²) + eps)`, statistics in f32, no mean
/// subtraction, no bias. The normalised value is rounded to the weight's dtype before the
/// multiply, as transformers does.
///
/// The weight comes reshaped to `[1, 1, D]`, and the caller queues that reshape before the
/// operations that make `x` (before a residual add, for one): queued after them, burn's fusion
/// puts the reshape in a block of its own, cannot order the blocks that follow and runs the norm's
/// tail and everything up to the next matrix product unfused (T5's feed-forward: 20 kernels a
/// layer instead of 4).
///
/// # Shapes
/// - x: `[B, L, D]`, weight: `[1, 1, D]` → `[B, L, D]`
pub fn rms_norm(x: Tensor<3>, weight: Tensor<3>, eps: f64) -> Tensor<3> {
    let dtype = weight.dtype();
    let x = x.cast(stats_dtype());
    let var = x.clone().square().mean_dim(2);
    let y = x.div(var.add_scalar(eps).sqrt()).cast(dtype);
    y.mul(weight)
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
        self.normalize(x, false)
    }

    /// `silu(self.forward(x))`, fused into the normalisation's pass on burn's CPU backend.
    ///
    /// # Shapes
    /// - x: `[N, C, H, W]` → `[N, C, H, W]`
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        self.normalize(x, true)
    }

    /// The normalisation, then SiLU if `then_silu`: the CPU kernel where it applies.
    fn normalize(&self, x: Tensor<4>, then_silu: bool) -> Tensor<4> {
        if group_norm::applies(&x, &self.weight) {
            return group_norm::group_norm(x, self.weight.clone(), self.bias.clone(), self.groups, self.eps, then_silu);
        }
        let y = self.forward_burn(x);
        if then_silu { silu(y) } else { y }
    }

    /// The normalisation as burn ops (the GPU path, and the CPU kernel's reference).
    fn forward_burn(&self, x: Tensor<4>) -> Tensor<4> {
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
///
/// Computed as `x · sigmoid(2u)` with `u = sqrt(2/π) x (1 + 0.044715 x²)`, the same function
/// (`(1 + tanh u) / 2 = sigmoid(2u)`): five elementwise passes instead of eight, and no `powf`
/// or `tanh` per element, which on the CPU backend are scalar library calls. Where `x²`
/// overflows (f16 beyond 256) `2u` is ±∞ and the result is `x` or 0, as with tanh.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if gelu::applies(&x) {
        return gelu::gelu_tanh(x);
    }
    gelu_tanh_burn(x)
}

/// [`gelu_tanh`] as burn ops (the GPU path, and the CPU kernel's reference).
fn gelu_tanh_burn<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4;
    let two_u = x.clone() * (x.clone() * x.clone()).mul_scalar(TWO_SQRT_2_OVER_PI * 0.044715).add_scalar(TWO_SQRT_2_OVER_PI);
    x * sigmoid(two_u)
}

/// The building blocks on literal tensors, against values worked out by hand (in f64, from the
/// formulas in each function's doc).
#[cfg(test)]
// The expected values are as numpy printed them (f64); f32 rounds them when the literal is read.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use crate::storage::WeightStorage;
    use burn::tensor::{DType, Device, TensorData};

    /// A few f32 roundings of values of order 1 (f32's unit roundoff is 6e-8).
    const F32_TOL: f32 = 1e-6;

    fn close<const D: usize>(got: Tensor<D>, want: &[f32]) {
        let got = got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= F32_TOL, "{got:?} vs {want:?}");
        }
    }

    fn tensor<const D: usize>(values: &[f32], shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), &Device::flex())
    }

    #[test]
    fn layer_norm_of_a_row() {
        // mean 2.5, biased variance 1.25
        close(layer_norm(tensor(&[1.0, 2.0, 3.0, 4.0], [1, 4]), 1e-5), &[-1.3416354, -0.4472118, 0.4472118, 1.3416354]);
    }

    #[test]
    fn rms_norm_scales_by_the_weight() {
        // mean square 7.5, no mean subtracted
        let w = tensor(&[1.0, 0.5, 2.0, 1.0], [1, 1, 4]);
        close(rms_norm(tensor(&[1.0, 2.0, 3.0, 4.0], [1, 1, 4]), w, 1e-6), &[0.36514835, 0.36514835, 2.19089008, 1.46059339]);
    }

    #[test]
    fn group_norm_over_channel_pairs() {
        // 4 channels of 2 pixels in 2 groups: {1, 2, 3, 5} and {-1, 1, 0, 4}
        let n = GroupNorm { weight: tensor(&[1.0, 2.0, 0.5, 1.0], [4]), bias: tensor(&[0.0, 1.0, 0.0, -1.0], [4]), groups: 2, eps: 1e-6 };
        let x = tensor(&[1.0, 2.0, 3.0, 5.0, -1.0, 1.0, 0.0, 4.0], [1, 4, 1, 2]);
        let want = [-1.18321569, -0.50709244, 1.33806162, 4.04255462, -0.53452241, 0.0, -1.53452241, 0.60356722];
        close(n.forward(x), &want);
    }

    #[test]
    fn gelu_tanh_values() {
        let want = [-0.00363739, -0.15880801, 0.0, 0.34571401, 1.95459769];
        close(gelu_tanh(tensor(&[-3.0, -1.0, 0.0, 0.5, 2.0], [5])), &want);
        close(silu(tensor(&[0.0, 1.0], [2])), &[0.0, 0.7310586]);
    }

    /// The CPU kernels against the burn ops they replace: the same function, rounded
    /// differently (GroupNorm's statistics in f64 and its affine folded into one multiply-add;
    /// GELU's sigmoid as one division). Outputs are of order 1 to 6 here, so 1e-5 is a few ulps.
    const KERNEL_TOL: f32 = 1e-5;

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn cpu_group_norm_is_the_burn_one() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let c = 64;
        let n = GroupNorm {
            weight: Tensor::random([c], Distribution::Uniform(-2.0, 2.0), &device),
            bias: Tensor::random([c], Distribution::Uniform(-1.0, 1.0), &device),
            groups: 32,
            eps: 1e-6,
        };
        // An offset and scale far from 0 and 1, so the statistics matter.
        let x = Tensor::<4>::random([2, c, 5, 7], Distribution::Normal(3.0, 2.0), &device);
        assert!(group_norm::applies(&x, &n.weight));
        let want = n.forward_burn(x.clone());
        let err = max_diff(n.forward(x.clone()), want.clone());
        assert!(err <= KERNEL_TOL, "group norm: {err}");
        let err = max_diff(n.forward_silu(x.clone()), silu(want));
        assert!(err <= KERNEL_TOL, "group norm + silu: {err}");
        // A view (not contiguous) is read through its strides; a tensor still held elsewhere
        // is read, not overwritten.
        let view = x.clone().swap_dims(2, 3);
        let err = max_diff(n.forward(view.clone()), n.forward_burn(view));
        assert!(err <= KERNEL_TOL, "strided group norm: {err}");
        let before = x.to_data();
        let _ = n.forward_silu(x.clone());
        assert_eq!(x.to_data(), before);
    }

    #[test]
    fn cpu_gelu_is_the_burn_one() {
        use burn::tensor::Distribution;
        let x = Tensor::<2>::random([3, 1000], Distribution::Uniform(-6.0, 6.0), &Device::flex());
        assert!(gelu::applies(&x));
        let err = max_diff(gelu_tanh(x.clone()), gelu_tanh_burn(x.clone()));
        assert!(err <= KERNEL_TOL, "gelu: {err}");
        // Infinities, NaN and extremes as the burn ops give them (-∞·0 is NaN in both).
        let special = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -100.0, 100.0, f32::MAX];
        let got = gelu_tanh(tensor(&special, [6])).into_data().try_to_vec::<f32>().unwrap();
        let want = gelu_tanh_burn(tensor(&special, [6])).into_data().try_to_vec::<f32>().unwrap();
        for ((g, w), x) in got.iter().zip(&want).zip(special) {
            assert!(g == w || (g.is_nan() && w.is_nan()), "gelu({x}): {g} against burn's {w}");
        }
    }

    #[test]
    fn cpu_layer_norms_are_the_burn_ones() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 5, 48], Distribution::Normal(2.0, 3.0), &device);
        let shift = Tensor::<3>::random([2, 1, 48], Distribution::Uniform(-1.0, 1.0), &device);
        let scale = Tensor::<3>::random([2, 1, 48], Distribution::Uniform(-1.0, 1.0), &device);
        assert!(layer_norm::applies(&x));
        let err = max_diff(layer_norm(x.clone(), 1e-6), layer_norm_burn(x.clone(), 1e-6));
        assert!(err <= KERNEL_TOL, "layer norm: {err}");
        let want = layer_norm_burn(x.clone(), 1e-5) * scale.clone().add_scalar(1.0) + shift.clone();
        let before = x.to_data();
        let err = max_diff(layer_norm_modulate(x.clone(), shift, scale, 1e-5), want);
        assert!(err <= KERNEL_TOL, "modulated layer norm: {err}");
        assert_eq!(x.to_data(), before, "the input is still held here, so it must not be overwritten");
        // The attention's queries: a [N, H, T, hd] view of [N, T, H, hd].
        let q = Tensor::<4>::random([2, 7, 3, 40], Distribution::Normal(0.0, 2.0), &device).swap_dims(1, 2);
        let err = max_diff(layer_norm(q.clone(), 1e-6), layer_norm_burn(q, 1e-6));
        assert!(err <= KERNEL_TOL, "strided layer norm: {err}");
    }

    #[test]
    fn cpu_linear_is_the_burn_one() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 5, 48], Distribution::Uniform(-1.0, 1.0), &device);
        let w = Tensor::<2>::random([40, 48], Distribution::Uniform(-1.0, 1.0), &device);
        let b = Tensor::<1>::random([40], Distribution::Uniform(-1.0, 1.0), &device);
        let laid_out = Weight::store(w.to_data(), WeightStorage::Compute, DType::F32, &device).for_matmul();
        // The same shape and values, another memory order.
        assert_eq!(laid_out.get().to_data(), w.to_data());
        let x2 = x.clone().reshape([10, 48]);
        assert!(linear::applies(&x2, &laid_out.get(), Some(&b)));
        for bias in [Some(b), None] {
            let want = burn::tensor::module::linear(x2.clone(), w.clone().transpose(), bias.clone()).reshape([2, 5, 40]);
            let err = max_diff(Linear { weight: laid_out.clone(), bias: bias.clone() }.forward(x.clone()), want.clone());
            assert!(err <= KERNEL_TOL, "linear (bias {}): {err}", bias.is_some());
            let plain = Weight::Dense(w.clone());
            let err = max_diff(Linear { weight: plain, bias }.forward(x.clone()), want);
            assert!(err <= KERNEL_TOL, "linear on the checkpoint's layout: {err}");
        }
    }

    /// A linear layer whose weight is kept in blocks of rows (one row a block here) gives what
    /// the dense weight gives.
    #[test]
    fn row_blocked_linear_is_the_dense_one() {
        let data = TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [3, 2]); // [out 3, in 2]
        let blocked = Weight::store_limited(data.clone(), WeightStorage::Compute, DType::F32, &Device::flex(), Some(8));
        assert!(matches!(&blocked, Weight::Rows(b) if b.len() == 3), "{blocked:?}");
        let bias = Some(tensor(&[0.5, -1.0, 0.0], [3]));
        let x = tensor(&[1.0, -1.0], [1, 2]);
        let want = [-0.5, -2.0, -1.0];
        close(Linear { weight: blocked, bias: bias.clone() }.forward(x.clone()), &want);
        let dense = Weight::store(data, WeightStorage::Compute, DType::F32, &Device::flex());
        close(Linear { weight: dense, bias }.forward(x), &want);
    }

    /// A matrix kept for bf16 products goes to that kernel, whole or in blocks of rows (the
    /// same numbers: each output feature is one row's product), with its bias; a conv kernel
    /// kept that way is a bf16 tensor too.
    #[test]
    fn bf16_products_linear_is_the_kernels_reference() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 5, 48], Distribution::Uniform(-1.0, 1.0), &device);
        let w = Tensor::<2>::random([40, 48], Distribution::Uniform(-1.0, 1.0), &device);
        let b = Tensor::<1>::random([40], Distribution::Uniform(-1.0, 1.0), &device);
        let want = bf16_product::bf16_linear_reference(x.clone().reshape([10, 48]), w.clone(), Some(b.clone())).reshape([2, 5, 40]);
        let whole = Weight::store(w.to_data(), WeightStorage::Bf16Products, DType::F32, &device);
        assert!(matches!(&whole, Weight::Bf16Products { stored, .. } if stored.dtype() == DType::BF16), "{whole:?}");
        // 16 rows of 48 bf16 values a block (1536 bytes): three blocks.
        let blocked = Weight::store_limited(w.to_data(), WeightStorage::Bf16Products, DType::F32, &device, Some(1536));
        assert!(matches!(&blocked, Weight::Rows(blocks) if blocks.len() == 3), "{blocked:?}");
        for weight in [whole, blocked] {
            let err = max_diff(Linear { weight, bias: Some(b.clone()) }.forward(x.clone()), want.clone());
            assert!(err <= KERNEL_TOL, "bf16-product linear: {err}");
        }
        let f32_linear = Linear { weight: Weight::Dense(w), bias: Some(b) }.forward(x);
        assert!(max_diff(f32_linear, want) > 1e-3, "the bf16 products must differ from the f32 product");
        let kernel = Weight::<4>::store(TensorData::new(vec![1.5f32; 16], [1, 1, 4, 4]), WeightStorage::Bf16Products, DType::F32, &device);
        assert!(matches!(&kernel, Weight::Bf16Products { stored, .. } if stored.dtype() == DType::BF16), "{kernel:?}");
    }

    /// A conv kernel kept for bf16 products: the VAE's stride-1 convolutions (3×3 same, 1×1) run
    /// as the tap products of `bf16_conv2d` (its reference's numbers), and the encoder's
    /// stride-2 downsampling widens the kernel instead (f32 input, bf16-rounded kernel).
    #[test]
    fn bf16_products_conv_is_the_kernels_reference() {
        use burn::tensor::Distribution;
        let device = Device::flex();
        let x = Tensor::<4>::random([1, 6, 5, 7], Distribution::Uniform(-1.0, 1.0), &device);
        let bias = Tensor::<1>::random([4], Distribution::Uniform(-1.0, 1.0), &device);
        for k in [3, 1] {
            let w = Tensor::<4>::random([4, 6, k, k], Distribution::Uniform(-1.0, 1.0), &device);
            let weight = Weight::store(w.to_data(), WeightStorage::Bf16Products, DType::F32, &device);
            let conv = Conv2d { weight, bias: bias.clone(), options: ConvOptions::new([1, 1], [k / 2, k / 2], [1, 1], 1) };
            let want = bf16_product::bf16_conv2d_reference(x.clone(), w, bias.clone(), [k / 2, k / 2]);
            let err = max_diff(conv.forward(x.clone()), want);
            assert!(err <= KERNEL_TOL, "k {k}: {err}");
        }
        let w = Tensor::<4>::random([6, 6, 3, 3], Distribution::Uniform(-1.0, 1.0), &device);
        let options = ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1);
        let bias = Tensor::<1>::random([6], Distribution::Uniform(-1.0, 1.0), &device);
        let weight = Weight::store(w.to_data(), WeightStorage::Bf16Products, DType::F32, &device);
        let down = Conv2d { weight, bias: bias.clone(), options: options.clone() };
        let want = conv2d(x.clone(), w.cast(DType::BF16).cast(DType::F32), Some(bias), options);
        assert!(max_diff(down.forward(x), want) <= KERNEL_TOL);
    }

    /// bf16 storage keeps 8 significant bits (rounding to nearest, ties to even) and widens back
    /// exactly.
    #[test]
    fn bf16_storage_rounds_once_and_widens_exactly() {
        let values = vec![1.0078125f32, 1.00390625, 1.01171875, -3.0, 0.0];
        let w = Weight::<1>::store(TensorData::new(values, [5]), WeightStorage::Bf16, DType::F32, &Device::flex());
        assert!(matches!(w, Weight::Bf16 { .. }));
        assert_eq!(w.dtype(), DType::F32);
        // 1 + 2^-7 is a bf16 value; 1 + 2^-8 is halfway and rounds to even (1); 1 + 3·2^-8 to 1 + 2^-6.
        let got = w.get().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got, [1.0078125, 1.0, 1.015625, -3.0, 0.0]);
    }
}
