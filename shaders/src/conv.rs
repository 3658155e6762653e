//! 3×3 "same" convolutions on burn's CPU backend (burn-flex), as nine matrix products.
//!
//! burn-flex convolves through im2col: each call re-lays the input out as NHWC, copies every
//! 3×3 patch into a column buffer (nine times the input), and runs one small matrix product per
//! 512-pixel tile, which packs the whole weight again for every tile. On the VAE's wide layers
//! (512 and 1024 channels at 128² and 256²) that reaches about half of what the same matrix
//! product does in one call.
//!
//! Here the input is copied once into a zero-padded plane per channel, `(H+2)×(W+2)`, and the
//! output is computed on that padded width: output pixel `(y, x)` of tap `(dy, dx)` reads padded
//! pixel `(y + dy, x + dx)`, which is the flat index `y·(W+2) + x` shifted by `dy·(W+2) + dx`.
//! So each tap is one matrix product `out[c_out, n] += w[c_out, c_in, dy, dx] · xp[c_in, n + shift]`
//! over all `n = H·(W+2)` positions, reading the padded input in place (gemm, the crate burn-flex
//! itself multiplies with, takes strided operands). The two padding columns of each output row
//! are dropped at the end. No column buffer, and the weight is not packed again per tile.
//!
//! The plain-burn reference is burn's own `conv2d` with padding 1.

use burn::backend::flex::FlexTensor;
use burn::backend::{Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::on_cpu_f32;

/// Whether [`conv3x3_same`] computes `conv2d(x, weight, _, options)`: stride 1, padding 1,
/// dilation 1 and one group, an f32 input on burn's CPU backend, an f32 `[c_out, c_in, 3, 3]`
/// weight, and enough channels on both sides for a matrix product per tap to pay.
pub fn applies(x: &Tensor<4>, weight: &Tensor<4>, options: &ConvOptions<2>) -> bool {
    let [c_out, c_in, kh, kw] = weight.dims();
    *options == ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
        && on_cpu_f32(x)
        && on_cpu_f32(weight)
        && kh == 3
        && kw == 3
        && c_in >= MIN_CHANNELS
        && c_out >= MIN_CHANNELS
}

/// Below this many input or output channels a tap's matrix product is too thin to fill gemm's
/// register tiles. The convolutions this leaves to burn-flex are small ones: the VAE decoder's
/// `conv_in` (16 latent channels in) and `conv_out` (3 channels out).
const MIN_CHANNELS: usize = 32;

/// `conv2d(x, weight, bias)` with a 3×3 kernel, stride 1, padding 1, dilation 1, one group, on
/// burn's CPU backend ([`applies`] says when).
///
/// # Shapes
/// - x: `[N, C_in, H, W]`, weight: `[C_out, C_in, 3, 3]`, bias: `[C_out]` → `[N, C_out, H, W]`
pub fn conv3x3_same(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::conv3x3_same(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch()))
}

#[backend_extension(Flex)]
pub trait ConvOps: Backend {
    /// A 3×3 convolution with stride 1 and padding 1 (f32).
    fn conv3x3_same(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl ConvOps for Flex {
    fn conv3x3_same(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.to_contiguous());
        let &[n, c_in, h, w] = x.layout().shape().as_slice() else { panic!("conv3x3_same: x must be 4-D") };
        let &[c_out, c_in_w, 3, 3] = weight.layout().shape().as_slice() else {
            panic!("conv3x3_same: the weight must be [c_out, c_in, 3, 3]")
        };
        assert_eq!(c_in, c_in_w, "conv3x3_same: {c_in} input channels, a weight for {c_in_w}");
        let out = conv3x3_same_f32(x.storage::<f32>(), weight.storage::<f32>(), bias.storage::<f32>(), [n, c_in, h, w], c_out);
        FlexTensor::from_data(TensorData::new(out, [n, c_out, h, w]))
    }
}

/// The computation of [`conv3x3_same`] on host slices (NCHW, contiguous).
fn conv3x3_same_f32(x: &[f32], weight: &[f32], bias: &[f32], [n, c_in, h, w]: [usize; 4], c_out: usize) -> Vec<f32> {
    let wp = w + 2;
    // The padded plane, plus two elements of slack: the last tap (2, 2) reads up to index
    // (H+2)·(W+2) + 1 for the padding columns of the last row, which are computed and dropped.
    let plane = (h + 2) * wp + 2;
    let cols = h * wp;
    // The weight as nine [c_out, c_in] matrices, one per tap, so that each product reads a
    // contiguous operand (gemm packs it either way, but a stride-9 gather packs slowly).
    let mut taps = vec![0f32; 9 * c_out * c_in];
    taps.par_chunks_mut(c_out * c_in).enumerate().for_each(|(t, tap)| {
        for (o, row) in tap.chunks_mut(c_in).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = weight[(o * c_in + i) * 9 + t];
            }
        }
    });
    let mut out = vec![0f32; n * c_out * h * w];
    let mut padded = vec![0f32; c_in * plane];
    let mut acc = vec![0f32; c_out * cols];
    for (image, out) in x.chunks(c_in * h * w).zip(out.chunks_mut(c_out * h * w)) {
        // Borders stay zero from the allocation: each image writes the same interior.
        padded.par_chunks_mut(plane).zip(image.par_chunks(h * w)).for_each(|(dst, src)| {
            for (y, row) in src.chunks(w).enumerate() {
                dst[(y + 1) * wp + 1..][..w].copy_from_slice(row);
            }
        });
        acc.par_chunks_mut(cols).zip(bias.par_iter()).for_each(|(row, &b)| row.fill(b));
        for (t, tap) in taps.chunks(c_out * c_in).enumerate() {
            let shift = (t / 3) * wp + t % 3;
            // SAFETY: dst is [c_out, cols] with row stride `cols`; lhs is [c_out, c_in] with
            // row stride c_in; rhs is [c_in, cols] starting `shift` into the padded input with
            // row stride `plane`, whose last read is (c_in-1)·plane + shift + cols - 1 <
            // c_in·plane because shift + cols ≤ 2·wp + 2 + h·wp = plane.
            unsafe {
                gemm::gemm(
                    c_out,
                    cols,
                    c_in,
                    acc.as_mut_ptr(),
                    1,
                    cols as isize,
                    true,
                    tap.as_ptr(),
                    1,
                    c_in as isize,
                    padded.as_ptr().add(shift),
                    1,
                    plane as isize,
                    1.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        // Drop the two padding columns of each output row.
        out.par_chunks_mut(h * w).zip(acc.par_chunks(cols)).for_each(|(dst, src)| {
            for (d, s) in dst.chunks_mut(w).zip(src.chunks(wp)) {
                d.copy_from_slice(&s[..w]);
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::DType;
    use burn::tensor::module::conv2d;
    use burn::tensor::Distribution;

    /// f32 sums of up to 9·c_in products in a different order than burn's im2col: the
    /// difference is rounding, a few ulps of the largest partial sums (|x|, |w| ≤ 1, c_in ≤ 64
    /// here, so sums stay under 600 and 1e-4 is about 30 ulps of them).
    const TOLERANCE: f32 = 1e-4;

    fn check(n: usize, c_in: usize, c_out: usize, h: usize, w: usize) {
        let device = burn::tensor::Device::flex();
        let x = Tensor::<4>::random([n, c_in, h, w], Distribution::Uniform(-1.0, 1.0), &device);
        let weight = Tensor::<4>::random([c_out, c_in, 3, 3], Distribution::Uniform(-1.0, 1.0), &device);
        let bias = Tensor::<1>::random([c_out], Distribution::Uniform(-1.0, 1.0), &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        assert!(applies(&x, &weight, &options));
        let expected = conv2d(x.clone(), weight.clone(), Some(bias.clone()), options);
        let got = conv3x3_same(x, weight, bias);
        assert_eq!(got.dims(), [n, c_out, h, w]);
        let err = (got - expected).abs().max().into_scalar::<f32>();
        assert!(err <= TOLERANCE, "{n}×{c_in}→{c_out} at {h}×{w}: max error {err}");
    }

    #[test]
    fn matches_burns_conv2d() {
        check(1, 32, 48, 7, 5);
        check(2, 64, 32, 9, 13);
        check(1, 40, 33, 1, 1);
    }

    #[test]
    fn reads_a_strided_input() {
        let device = burn::tensor::Device::flex();
        let x = Tensor::<4>::random([1, 32, 6, 8], Distribution::Uniform(-1.0, 1.0), &device).swap_dims(2, 3);
        let weight = Tensor::<4>::random([32, 32, 3, 3], Distribution::Uniform(-1.0, 1.0), &device);
        let bias = Tensor::<1>::zeros([32], &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let expected = conv2d(x.clone(), weight.clone(), Some(bias.clone()), options);
        let err = (conv3x3_same(x, weight, bias) - expected).abs().max().into_scalar::<f32>();
        assert!(err <= TOLERANCE, "max error {err}");
    }

    #[test]
    fn leaves_every_other_convolution_to_burn() {
        let device = burn::tensor::Device::flex();
        let same = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let x = Tensor::<4>::zeros([1, 64, 4, 4], &device);
        let w = Tensor::<4>::zeros([64, 64, 3, 3], &device);
        assert!(applies(&x, &w, &same));
        let thin = Tensor::<4>::zeros([1, 16, 4, 4], &device);
        assert!(!applies(&thin, &Tensor::<4>::zeros([128, 16, 3, 3], &device), &same), "16 input channels");
        assert!(!applies(&x, &Tensor::<4>::zeros([3, 64, 3, 3], &device), &same), "3 output channels");
        assert!(!applies(&x, &Tensor::<4>::zeros([64, 64, 1, 1], &device), &same), "a 1×1 kernel");
        assert!(!applies(&x.clone().cast(DType::BF16), &w, &same), "bf16");
        let downsample = ConvOptions::new_with_padding([2, 2], [(0, 1), (0, 1)], [1, 1], 1);
        assert!(!applies(&x, &w, &downsample), "stride 2");
        assert!(!applies(&x, &w, &ConvOptions::new([1, 1], [0, 0], [1, 1], 1)), "no padding");
        assert!(!applies(&Tensor::<4>::zeros([1, 64, 0, 4], &device), &w, &same), "an empty input");
    }
}
