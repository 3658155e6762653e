//! Linear layers and stride-1 convolutions as matrix products with bf16 inputs and f32
//! accumulation: the matrix hardware (tensor cores, cooperative matrices) of adapters that have
//! no general bf16 arithmetic.
//!
//! Vulkan lists bf16 × bf16 → f32 cooperative-matrix configurations (VK_KHR_cooperative_matrix
//! with VK_KHR_shader_bfloat16) on adapters where burn's `supports_dtype(BF16)` is false, and f32
//! products never use that hardware there (no tf32). So the weight stays a bf16 tensor, the
//! activations are rounded to bf16 for the product only, and the product's sums and output are
//! f32: bf16 has f32's exponent range, so nothing here can overflow where f32 would not (f16
//! would: CogView3-Plus's activations pass 65504).
//!
//! burn's `matmul` cannot do this: it binds the right-hand side with the left-hand dtype and
//! takes the output dtype from the inputs. burn-cubecl's matmul entry takes the output dtype
//! explicitly; [`bf16_linear`] calls it through a backend extension, so it runs under burn's
//! fusion like any other op.
//!
//! On burn's CPU backend the same numbers are emulated: inputs rounded to bf16 and widened back
//! (exact), then an f32 product. A product of two bf16 values (8 significant bits each) has at
//! most 16 significant bits and is exact in f32, so the emulation differs from the hardware only
//! in the order of the f32 sums. The plain-burn reference is [`bf16_linear_reference`].
//!
//! An f16 weight runs the same code with f16 in place of bf16 (the activations rounded to f16,
//! f16 × f16 → f32 products): not for models (f16's range is what CogView3-Plus overflows), but
//! so that the GPU path runs where the matrix hardware has f16 and no bf16, as on Mesa's
//! lavapipe in CI.

use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::ops::PadMode;
use burn::tensor::{DType, Device, Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::full_client;
use cubecl::ir::{ElemType, FloatKind};
use cubek::matmul::strategy::Strategy;
use std::sync::OnceLock;

use crate::linear;

/// Whether `device` multiplies bf16 matrices on its matrix hardware with f32 accumulation: one of
/// the cooperative-matrix (or manual MMA) configurations its driver lists is bf16 × bf16 → f32.
/// That is not burn's `supports_dtype(BF16)`, which asks for general bf16 arithmetic. Always
/// false on burn's CPU backend (which only emulates the numbers).
pub fn available(device: &Device) -> bool {
    let burn::backend::DispatchDevice::Cube(d) = device.as_dispatch() else { return false };
    let (bf16, f32) = (ElemType::Float(FloatKind::BF16), ElemType::Float(FloatKind::F32));
    let client = d.client();
    let matmul = &client.properties().features.matmul;
    matmul.cmma.iter().chain(&matmul.mma).any(|c| c.a_type == bf16 && c.b_type == bf16 && c.cd_type == f32)
}

/// `x · weightᵀ + bias` with `x` and `weight` rounded to bf16 and the sums in f32.
///
/// On CubeCL adapters the product runs on the matrix hardware (`weight` must be a bf16 tensor
/// there, or f16: see the module doc; `x` may already be in the weight's dtype, rounded once
/// for several products); on burn's CPU backend it is emulated (any float dtype; an f16 weight
/// rounds to f16 instead). The output is f32.
///
/// # Shapes
/// - x: `[rows, d_in]` (f32), weight: `[d_out, d_in]` (bf16), bias: `[d_out]` (f32) →
///   `[rows, d_out]` (f32)
pub fn bf16_linear(x: Tensor<2>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    product(x, weight, bias, true)
}

/// [`bf16_linear`] without a bias through the matrix hardware alone instead of autotune: cubek's
/// simple cooperative-matrix kernel, else its manual-MMA twin. Where neither launches, for
/// whatever reason, the output is NaN rather than a panic (a release build aborts on a panic;
/// cubek's own fixed choice panics on an invalid configuration) or a kernel without the matrix
/// hardware. For the self-test that decides whether the adapter gets bf16 products at all.
///
/// # Shapes
/// - as [`bf16_linear`]
pub fn bf16_linear_probe(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    product(x, weight, None, false)
}

/// `tuned`: autotune the kernel (which panics when no candidate launches), else cubek's fixed
/// choice (which reports it).
fn product(x: Tensor<2>, weight: Tensor<2>, bias: Option<Tensor<1>>, tuned: bool) -> Tensor<2> {
    let y = match x.device().as_dispatch() {
        burn::backend::DispatchDevice::Flex(_) => {
            let half = if weight.dtype() == DType::F16 { DType::F16 } else { DType::BF16 };
            let x = x.cast(half).cast(DType::F32);
            let weight = weight.cast(half).cast(DType::F32);
            if linear::applies(&x, &weight, bias.as_ref()) {
                return linear::linear(x, weight, bias);
            }
            crate::matmul(x, weight.transpose())
        }
        _ => {
            let dtype = weight.dtype();
            assert!(matches!(dtype, DType::BF16 | DType::F16), "bf16_linear: the weight must be stored in bf16 on a GPU, not {dtype:?}");
            Tensor::from_dispatch(Dispatch::bf16_product(x.into_dispatch(), weight.into_dispatch(), tuned))
        }
    };
    match bias {
        Some(bias) => y + bias.cast(DType::F32).unsqueeze(),
        None => y,
    }
}

/// The plain-burn reference for [`bf16_linear`]: the same roundings, then burn's f32 `linear`.
///
/// # Shapes
/// - as [`bf16_linear`]
pub fn bf16_linear_reference(x: Tensor<2>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    let round = |t: Tensor<2>| t.cast(DType::BF16).cast(DType::F32);
    crate::burn_linear(round(x), round(weight).transpose(), bias.map(|b| b.cast(DType::F32)))
}

/// A stride-1 convolution with `x` and `weight` rounded to bf16 and the sums in f32, as one
/// [`bf16_linear`] per kernel tap: the matrix hardware's products instead of a convolution
/// kernel in f32 (which has no matrix hardware on Vulkan).
///
/// The input goes channels-last, zero-padded and flattened once: one row per padded pixel,
/// `[N·Hp·Wp, C_in]`. Output pixel `(y, x)` of tap `(i, j)` reads padded pixel `(y + i, x + j)`,
/// which is row `y·Wp + x` shifted by `i·Wp + j`; so each tap is one product of a window of
/// consecutive rows — a view of the flat input, no copy — times the kernel's `[C_out, C_in]`
/// slice at that tap, computed at every padded position (as `conv::conv3x3_same` does on the
/// CPU). `(kh−1)·Wp + kw−1` zero rows after the last image keep every window inside. The
/// positions outside the output (the right and bottom padding of each image) are dropped at the
/// end. The k² products are summed in f32 (the order of the sums differs from a direct
/// convolution's, not their terms: each term, a product of two bf16 values, is exact in f32).
/// The kernel is laid out tap-major in f32 once per call and rounded back to bf16 (exact); on
/// a GPU the padded input is rounded to bf16 once too, and each tap reads its windows of both.
///
/// # Shapes
/// - x: `[N, C_in, H, W]` (f32), weight: `[C_out, C_in, kh, kw]` (bf16 on a GPU, or f16 as in
///   [`bf16_linear`]), bias:
///   `[C_out]`, padding `[ph, pw]` on each side → `[N, C_out, H + 2ph - kh + 1, W + 2pw - kw + 1]`
///   (f32)
pub fn bf16_conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, padding: [usize; 2]) -> Tensor<4> {
    let [n, c_in, h, w] = x.dims();
    let [c_out, _, kh, kw] = weight.dims();
    let [ph, pw] = padding;
    let half = weight.dtype();
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let (ho, wo) = (hp + 1 - kh, wp + 1 - kw);
    let rows = n * hp * wp;
    let tail = (kh - 1) * wp + kw - 1;
    let flat = x
        .pad([(ph, ph), (pw, pw)], PadMode::Constant(0.0))
        .permute([0, 2, 3, 1]) // [N, Hp, Wp, C_in]
        .reshape([rows, c_in])
        .pad([(0, tail), (0, 0)], PadMode::Constant(0.0));
    let taps = weight.cast(DType::F32).permute([2, 3, 0, 1]).reshape([kh * kw * c_out, c_in]);
    // On a GPU the input and the kernel are rounded to bf16 once for all k² products (each
    // product would otherwise round its own window, k² casts of nearly the whole input).
    let on_cpu = matches!(flat.device().as_dispatch(), burn::backend::DispatchDevice::Flex(_));
    let (flat, taps) = if on_cpu { (flat, taps) } else { (flat.cast(half), taps.cast(half)) };
    let mut y: Option<Tensor<2>> = None;
    for i in 0..kh {
        for j in 0..kw {
            let shift = i * wp + j;
            let window = flat.clone().slice([shift..shift + rows, 0..c_in]);
            let t = (i * kw + j) * c_out;
            let at = taps.clone().slice([t..t + c_out, 0..c_in]);
            let p = bf16_linear(window, at, None);
            y = Some(match y {
                Some(sum) => sum + p,
                None => p,
            });
        }
    }
    let y = y.expect("a kernel has at least one tap") + bias.cast(DType::F32).unsqueeze();
    y.reshape([n, hp, wp, c_out]).slice([0..n, 0..ho, 0..wo, 0..c_out]).permute([0, 3, 1, 2])
}

/// The plain-burn reference for [`bf16_conv2d`]: the same roundings, then burn's f32 `conv2d`.
///
/// # Shapes
/// - as [`bf16_conv2d`]
pub fn bf16_conv2d_reference(x: Tensor<4>, weight: Tensor<4>, bias: Tensor<1>, padding: [usize; 2]) -> Tensor<4> {
    let round = |t: Tensor<4>| t.cast(DType::BF16).cast(DType::F32);
    let options = burn::tensor::ops::ConvOptions::new([1, 1], padding, [1, 1], 1);
    burn::tensor::module::conv2d(round(x), round(weight), Some(bias.cast(DType::F32)), options)
}

#[backend_extension(Cube, Fusion)]
pub trait Bf16ProductOps: Backend {
    /// `x · weightᵀ`: `x` f32 `[rows, d_in]`, `weight` bf16 (or f16) `[d_out, d_in]`, output
    /// f32; `tuned`: autotuned, else [`PROBE_KERNELS`] with NaN where none launches.
    #[fusion(dtype = burn::tensor::DType::F32, shape = Shape::new([x[0], weight[0]]))]
    fn bf16_product(x: FloatTensor<Self>, weight: FloatTensor<Self>, tuned: bool) -> FloatTensor<Self>;
}

impl Bf16ProductOps for CubeBackend {
    fn bf16_product(x: FloatTensor<Self>, weight: FloatTensor<Self>, tuned: bool) -> FloatTensor<Self> {
        let (client, device) = (x.client.clone(), x.device.clone());
        let shape = Shape::new([x.meta.shape()[0], weight.meta.shape()[0]]);
        // Both operands in the weight's dtype (burn-cubecl binds the right-hand side with the
        // left-hand dtype); the transposed weight is a view, which the matmul reads in place.
        let half = weight.dtype;
        let x = burn_cubecl::kernel::cast(x, half);
        let weight_t = <Self as burn::backend::ops::FloatTensorOps<Self>>::float_swap_dims(weight, 0, 1);
        let tuned_product = |x, weight_t| crate::matmul_kernel::product(crate::matmul_kernel::chosen(), x, weight_t, DType::F32).map_err(|e| format!("{e:?}"));
        let product = match tuned {
            // One row (a batch of one image: the modulation's linear layers without guidance)
            // is a vector-matrix product, for which burn's autotune tries gemv kernels first.
            // One of them (cubek's GemvUnitPerpendicular) passes its bf16 inputs between a
            // subgroup's lanes, which SPIR-V's bf16 (SPV_KHR_bfloat16: loads, stores,
            // conversions, dot products and cooperative matrices only) does not allow, so a
            // driver may refuse it. The self-tested kernel takes those instead; autotune only
            // where it cannot launch, or where a kernel is named.
            true if shape[0] == 1 && crate::matmul_kernel::chosen().is_none() => {
                probe(x.clone(), weight_t.clone()).or_else(|_| tuned_product(x, weight_t))
            }
            true => tuned_product(x, weight_t),
            false => probe(x, weight_t),
        };
        match product {
            Ok(y) => y,
            Err(e) => {
                tracing::warn!("no {half:?} × {half:?} → f32 matrix-product kernel for this adapter: {e}");
                full_client::<f32>(client, shape, device, f32::NAN)
            }
        }
    }
}

/// The kernels the probe tries, in order (names as in [`crate::matmul_kernel::names`]):
/// cubek's simple cooperative-matrix kernel (its own first choice), then the same on manual MMA
/// (the other kind of matrix-hardware configuration [`available`] counts).
pub const PROBE_KERNELS: [&str; 2] = ["matmul_simple_cyclic_cmma", "matmul_simple_cyclic_mma"];

/// `x · weight_t` through the first of [`PROBE_KERNELS`] that launches; every kernel's setup
/// error where none does.
fn probe(x: burn_cubecl::tensor::CubeTensor, weight_t: burn_cubecl::tensor::CubeTensor) -> Result<burn_cubecl::tensor::CubeTensor, String> {
    // Looked up once: a product of one row comes here on every call.
    static KERNELS: OnceLock<Vec<&'static Strategy>> = OnceLock::new();
    let kernels = KERNELS.get_or_init(|| PROBE_KERNELS.map(|name| crate::matmul_kernel::named(name).expect("a matmul candidate's name")).to_vec());
    let mut errors = Vec::new();
    for (name, kernel) in PROBE_KERNELS.iter().zip(kernels) {
        match crate::matmul_kernel::launch(kernel, x.clone(), weight_t.clone(), DType::F32) {
            Ok(y) => return Ok(y),
            Err(e) => errors.push(format!("{name}: {e:?}")),
        }
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// Smooth values of both signs over three decades, none of them a bf16 value.
    fn matrix(rows: usize, cols: usize, seed: f32, device: &Device) -> Tensor<2> {
        let v: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.731 + seed).sin() * 10f32.powi((i % 3) as i32 - 1)).collect();
        Tensor::from_data(TensorData::new(v, [rows, cols]), device)
    }

    /// f32 sums of the same exact products, in gemm's order against burn's: at most K rounding
    /// steps of 2^-24 each on partial sums no larger than Σ|x·w|; here K ≤ 300, so 300 × 6e-8 ≈
    /// 2e-5 of Σ|x·w|, which is itself within a few times the largest output.
    const EMULATION_TOL: f32 = 1e-4;

    /// The emulation on burn's CPU backend is the reference's numbers: bf16-rounded inputs, f32
    /// sums; with and without a bias, on the linear kernel's path (f32) and burn's (a bf16 weight).
    #[test]
    fn emulation_matches_the_reference() {
        let device = Device::flex();
        for (rows, d_in, d_out) in [(1, 8, 4), (37, 300, 65), (64, 40, 120)] {
            let x = matrix(rows, d_in, 0.3, &device);
            let w = matrix(d_out, d_in, 1.7, &device);
            let b = matrix(1, d_out, 2.9, &device).reshape([d_out]);
            for bias in [None, Some(b)] {
                let want = values(bf16_linear_reference(x.clone(), w.clone(), bias.clone()));
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for weight in [w.clone(), w.clone().cast(DType::BF16)] {
                    let got = values(bf16_linear(x.clone(), weight, bias.clone()));
                    let err = got.iter().zip(&want).fold(0f32, |m, (g, r)| m.max((g - r).abs())) / scale;
                    assert!(err <= EMULATION_TOL, "{rows}×{d_in}×{d_out}: error {err:.2e} of the scale");
                }
            }
        }
    }

    /// The probe's kernels are matmul candidates (a wrong name would fail every self-test).
    #[test]
    fn probe_kernels_are_candidates() {
        for name in PROBE_KERNELS {
            assert!(crate::matmul_kernel::named(name).is_some(), "{name}");
        }
    }

    /// The inputs really are rounded to bf16: the result is not the f32 product (it differs by
    /// about 2^-9 of the scale), and equals an f64 product of the rounded values.
    #[test]
    fn rounds_the_inputs_and_sums_in_f32() {
        let device = Device::flex();
        let (rows, d_in, d_out) = (16, 64, 24);
        let x = matrix(rows, d_in, 0.3, &device);
        let w = matrix(d_out, d_in, 1.7, &device);
        let got = values(bf16_linear(x.clone(), w.clone(), None));
        let f32_product = values(burn::tensor::module::linear(x.clone(), w.clone().transpose(), None));
        let round = |t: Tensor<2>| -> Vec<f64> { values(t).into_iter().map(|v| half::bf16::from_f32(v).to_f64()).collect() };
        let (xr, wr) = (round(x), round(w));
        let exact: Vec<f64> =
            (0..rows * d_out).map(|i| (0..d_in).map(|k| xr[i / d_out * d_in + k] * wr[i % d_out * d_in + k]).sum()).collect();
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = |a: &[f32]| a.iter().zip(&exact).fold(0f64, |m, (g, r)| m.max((*g as f64 - r).abs())) / scale;
        assert!(err(&got) <= EMULATION_TOL as f64, "against the f64 product of the rounded inputs: {:.2e}", err(&got));
        assert!(err(&f32_product) > 1e-3, "the f32 product is within {:.2e}: the inputs were not rounded", err(&f32_product));
    }

    /// The convolution as tap products against burn's convolution of the same rounded values:
    /// 3×3 "same" (the VAE's), 1×1 (its shortcuts), an unpadded 3×3, non-square inputs; with a
    /// bf16 kernel as on a GPU. Each output sums `C_in · k²` exact products in f32 in another
    /// order than burn's: at most 72 roundings of 2^-24 here, well inside [`EMULATION_TOL`]; and
    /// the rounding shows (the f32 convolution of the unrounded values is farther off).
    #[test]
    fn conv_taps_match_the_reference() {
        let device = Device::flex();
        let data = |t: Tensor<4>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        for (c_in, c_out, k, pad, h, w) in [(8, 6, 3, [1, 1], 5, 7), (8, 6, 1, [0, 0], 4, 4), (4, 3, 3, [0, 0], 6, 5), (5, 7, 3, [1, 0], 4, 6)] {
            let x = matrix(2 * c_in, h * w, 0.3, &device).reshape([2, c_in, h, w]);
            let weight = matrix(c_out, c_in * k * k, 1.7, &device).reshape([c_out, c_in, k, k]);
            let bias = matrix(1, c_out, 2.9, &device).reshape([c_out]);
            let want = bf16_conv2d_reference(x.clone(), weight.clone(), bias.clone(), pad);
            let dims = want.dims();
            let want = data(want);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = |got: Tensor<4>| {
                assert_eq!(got.dims(), dims);
                data(got).iter().zip(&want).fold(0f32, |m, (g, r)| m.max((g - r).abs())) / scale
            };
            let got = err(bf16_conv2d(x.clone(), weight.clone().cast(DType::BF16), bias.clone(), pad));
            assert!(got <= EMULATION_TOL, "{c_in}→{c_out}, k {k}, pad {pad:?}: {got:.2e}");
            let options = burn::tensor::ops::ConvOptions::new([1, 1], pad, [1, 1], 1);
            let f32_conv = err(burn::tensor::module::conv2d(x, weight, Some(bias), options));
            assert!(f32_conv > 1e-3, "the f32 convolution is within {f32_conv:.2e}: the inputs were not rounded");
        }
    }

    /// A NaN in the input reaches the output (the non-finite guard downstream must see it).
    #[test]
    fn a_nan_stays_a_nan() {
        let device = Device::flex();
        let mut v = vec![0.5f32; 4 * 8];
        v[9] = f32::NAN;
        let x = Tensor::<2>::from_data(TensorData::new(v, [4, 8]), &device);
        let w = matrix(3, 8, 0.1, &device);
        let got = values(bf16_linear(x, w, None));
        assert!(got[3..6].iter().all(|v| v.is_nan()) && got[..3].iter().all(|v| v.is_finite()), "{got:?}");
    }
}
