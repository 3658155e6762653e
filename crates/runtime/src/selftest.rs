//! The dtype self-test: before a reduced precision is trusted on a device, a small fixed matmul
//! and softmax run in that dtype there and are compared with an f64 CPU reference. For bf16
//! matrix products in an f32 model ([`run_bf16_products`]), the product kernel the linear layers
//! use runs instead, and the attention on f16 tiles that comes with them ([`run_flash`]).
//!
//! Inputs are rounded to the dtype on the host first, so the reference and the device start
//! from the same numbers and the error measures the device's arithmetic alone.

use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, Tensor, TensorData};
use cogview_shaders::flash::FlashTiles;
use serde::Serialize;

use crate::dtype::ComputeDtype;

const M: usize = 8;
const K: usize = 64;
const N: usize = 16;

/// bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3). The matmul output is rounded
/// once to bf16 and may accumulate in bf16 over K = 64 terms (log2 64 = 6 more roundings in a
/// pairwise sum): about 7 × 3.9e-3 = 2.7e-2 relative to the largest output in the worst case.
/// Garbage from a broken driver is O(1).
const BF16_TOLERANCE: f64 = 4e-2;
/// f16 keeps 11 significant bits (unit roundoff 4.9e-4); the same 7 roundings give 3.4e-3.
const F16_TOLERANCE: f64 = 1e-2;
/// bf16 × bf16 products are exact in f32 (8 + 8 significant bits), so with f32 sums over K = 64
/// terms the error is at most 64 × 2^-24 ≈ 3.8e-6 of the largest output. A kernel that sums or
/// rounds its output in bf16 errs by up to 2^-9 ≈ 2e-3 of the largest output; 5e-4 separates the
/// two with room for matrix hardware that aligns its sums with fewer guard bits than f32.
const PRODUCTS_TOLERANCE: f64 = 5e-4;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SelfTestReport {
    pub dtype: ComputeDtype,
    /// What ran: `bf16 arithmetic`, or `bf16 matrix products with f32 sums`.
    pub what: String,
    /// Largest error of the matmul (relative to its largest output) and of the softmax
    /// (absolute; probabilities), whichever is larger. NaN or inf make it infinite.
    pub error: f64,
    pub tolerance: f64,
    pub passed: bool,
}

impl SelfTestReport {
    /// The verdict on `error` against `tolerance`: passed when within it (a NaN error fails).
    fn judge(dtype: ComputeDtype, what: &str, error: f64, tolerance: f64) -> Self {
        Self { dtype, what: what.into(), error, tolerance, passed: error <= tolerance }
    }
}

/// Fixed, smooth, non-trivial inputs in [-1, 1].
fn inputs() -> (Vec<f32>, Vec<f32>) {
    let a = (0..M * K).map(|i| ((i as f32) * 0.37).sin()).collect();
    let b = (0..K * N).map(|i| ((i as f32) * 0.23 + 0.5).cos()).collect();
    (a, b)
}

fn round_to(dtype: ComputeDtype, v: Vec<f32>) -> Vec<f32> {
    match dtype {
        ComputeDtype::F32 => v,
        ComputeDtype::Bf16 => v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect(),
        ComputeDtype::F16 => v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
    }
}

/// `(A·B / sqrt(K), softmax over each row)` in f64.
fn reference(a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (K as f64).sqrt();
    let mut c = vec![0f64; M * N];
    for i in 0..M {
        for j in 0..N {
            c[i * N + j] = (0..K).map(|k| a[i * K + k] as f64 * b[k * N + j] as f64).sum::<f64>() * scale;
        }
    }
    let mut s = c.clone();
    for row in s.chunks_mut(N) {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        row.iter_mut().for_each(|x| *x = (*x - max).exp() / sum);
    }
    (c, s)
}

/// Largest error of `dev` against `reference` in units of `scale`; a NaN, an inf or a wrong
/// length make it infinite.
fn max_error(dev: &[f64], reference: &[f64], scale: f64) -> f64 {
    if dev.len() != reference.len() {
        return f64::INFINITY;
    }
    dev.iter().zip(reference).fold(0f64, |m, (d, r)| {
        let e = (d - r).abs() / scale;
        if e.is_finite() { m.max(e) } else { f64::INFINITY }
    })
}

/// The largest magnitude in `values`.
fn largest(values: &[f64]) -> f64 {
    values.iter().fold(0f64, |m, x| m.max(x.abs()))
}

/// Largest error of the matmul (relative to its largest output) and of the softmax (absolute);
/// a NaN, an inf or a wrong length make it infinite.
fn error_of(c_dev: &[f64], s_dev: &[f64], c_ref: &[f64], s_ref: &[f64]) -> f64 {
    max_error(c_dev, c_ref, largest(c_ref)).max(max_error(s_dev, s_ref, 1.0))
}

/// Runs the self-test for `dtype` on `device`.
pub fn run(device: &Device, dtype: ComputeDtype) -> SelfTestReport {
    let (a, b) = inputs();
    let (a, b) = (round_to(dtype, a), round_to(dtype, b));
    let (c_ref, s_ref) = reference(&a, &b);
    let dt = dtype.dtype();
    let ta = Tensor::<2>::from_data(TensorData::new(a, [M, K]).convert_dtype(dt), (device, dt));
    let tb = Tensor::<2>::from_data(TensorData::new(b, [K, N]).convert_dtype(dt), (device, dt));
    let c = cogview_shaders::matmul(ta, tb).mul_scalar(1.0 / (K as f64).sqrt());
    let s = softmax(c.clone(), 1);
    let read = |t: Tensor<2>| -> Vec<f64> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default().into_iter().map(f64::from).collect()
    };
    let error = error_of(&read(c), &read(s), &c_ref, &s_ref);
    let tolerance = match dtype {
        ComputeDtype::Bf16 => BF16_TOLERANCE,
        ComputeDtype::F16 => F16_TOLERANCE,
        // f32 is never self-tested by the policy; 1e-5 is f32 rounding with room to spare.
        ComputeDtype::F32 => 1e-5,
    };
    SelfTestReport::judge(dtype, &format!("{dtype} arithmetic"), error, tolerance)
}

/// Runs the linear layers' bf16 product kernel (`cogview_shaders::bf16_product`) on `device`: A·B
/// with bf16 inputs against the f64 product of the same values. Through the kernel's probe
/// entry, so a kernel that cannot be built for the adapter gives NaN and fails the test instead
/// of ending the run.
pub fn run_bf16_products(device: &Device) -> SelfTestReport {
    let (a, b) = inputs();
    let (a, b) = (round_to(ComputeDtype::Bf16, a), round_to(ComputeDtype::Bf16, b));
    let (c_ref, _) = reference(&a, &b);
    // The product is the unscaled one: `reference` scales by 1/sqrt(K), exactly a power of two.
    let c_ref: Vec<f64> = c_ref.into_iter().map(|c| c * (K as f64).sqrt()).collect();
    let b_t: Vec<f32> = (0..N * K).map(|i| b[(i % K) * N + i / K]).collect();
    let ta = Tensor::<2>::from_data(TensorData::new(a, [M, K]), (device, DType::F32));
    let weight = Tensor::<2>::from_data(TensorData::new(b_t, [N, K]).convert_dtype(DType::BF16), (device, DType::BF16));
    let c = cogview_shaders::bf16_product::bf16_linear_probe(ta, weight);
    let c: Vec<f64> = c.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default().into_iter().map(f64::from).collect();
    let error = max_error(&c, &c_ref, largest(&c_ref));
    SelfTestReport::judge(ComputeDtype::Bf16, "bf16 matrix products with f32 sums", error, PRODUCTS_TOLERANCE)
}

/// The transformer's attention at head size 40 on f16 tiles with f32 sums: the bound derived at
/// [`cogview_shaders::flash::F16_TILES_TOL`] (relative to v's largest magnitude). Garbage from a
/// broken driver is O(1).
const FLASH_TOLERANCE: f64 = cogview_shaders::flash::F16_TILES_TOL as f64;
/// Attention self-test shape: heads, tokens, head size (the transformer's).
const FLASH_HEADS: usize = 2;
const FLASH_TOKENS: usize = 40;
const FLASH_HEAD_DIM: usize = 40;

/// Runs the transformer's attention on f16 tiles (`cogview_shaders::flash`) on `device` against
/// an f64 reference: q and k normalised per head as the transformer's are, v in [-3, 3].
pub fn run_flash(device: &Device, tiles: FlashTiles) -> SelfTestReport {
    let (h, t, d) = (FLASH_HEADS, FLASH_TOKENS, FLASH_HEAD_DIM);
    let rows = |seed: f64| -> Vec<f32> {
        let raw: Vec<f64> = (0..h * t * d).map(|i| (i as f64 * 0.618 + seed).sin() * (i as f64 * 0.071 + seed).cos()).collect();
        raw.chunks(d)
            .flat_map(|r| {
                let mean = r.iter().sum::<f64>() / d as f64;
                let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d as f64 + 1e-6).sqrt();
                r.iter().map(move |x| ((x - mean) / sd) as f32)
            })
            .collect()
    };
    let (q, k) = (rows(0.3), rows(1.9));
    let v: Vec<f32> = (0..h * t * d).map(|i| ((i as f32) * 0.37 + 2.7).sin() * 3.0).collect();
    let mut want = vec![0f64; h * t * d];
    for head in 0..h {
        let at = |x: &[f32], row: usize, col: usize| x[(head * t + row) * d + col] as f64;
        for i in 0..t {
            let scores: Vec<f64> = (0..t).map(|j| (0..d).map(|c| at(&q, i, c) * at(&k, j, c)).sum::<f64>() / (d as f64).sqrt()).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            for c in 0..d {
                want[(head * t + i) * d + c] = (0..t).map(|j| weights[j] * at(&v, j, c)).sum::<f64>() / sum;
            }
        }
    }
    let tensor = |x: Vec<f32>| Tensor::<4>::from_data(TensorData::new(x, [1, h, t, d]), (device, DType::F32));
    let got = cogview_shaders::flash::attention(tensor(q), tensor(k), tensor(v), tiles);
    let got: Vec<f64> = got.into_data().convert::<f32>().try_to_vec::<f32>().unwrap_or_default().into_iter().map(f64::from).collect();
    let error = max_error(&got, &want, largest(&want));
    // Where the accelerated kernel cannot launch on these tiles, exact f32 attention gave the
    // values: right, but not a test of the tiles, which the model should then not be told to use.
    if cogview_shaders::flash::launched(device, [1, h, t, d], [1, h, t, d], tiles) == Some(false) {
        let what = "attention on f16 tiles with f32 sums (burn's accelerated kernel cannot launch on them)";
        return SelfTestReport::judge(ComputeDtype::F16, what, f64::INFINITY, FLASH_TOLERANCE);
    }
    SelfTestReport::judge(ComputeDtype::F16, "attention on f16 tiles with f32 sums", error, FLASH_TOLERANCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU backend every dtype is computed correctly, so every self-test passes, and the
    /// error is above zero for the reduced ones (the test does measure something).
    #[test]
    fn passes_on_the_cpu_backend() {
        let device = Device::flex();
        for dtype in [ComputeDtype::F32, ComputeDtype::Bf16, ComputeDtype::F16] {
            let r = run(&device, dtype);
            assert!(r.passed, "{r:?}");
            if dtype != ComputeDtype::F32 {
                assert!(r.error > 0.0, "{r:?}");
            }
        }
        // The emulated products sum the exact products in f32: far inside the tolerance, and
        // the f32 product of the unrounded inputs would not be (the inputs are rounded).
        let r = run_bf16_products(&device);
        assert!(r.passed && r.error < 1e-5, "{r:?}");
        // The emulated f16 tiles round their inputs: inside the tolerance, above f32 rounding.
        let r = run_flash(&device, FlashTiles { head: 16, rows: 128 });
        assert!(r.passed && r.error > 1e-5, "{r:?}");
    }

    /// The comparison catches what broken drivers return: zeros, NaN, a transposed result,
    /// a short read-back.
    #[test]
    fn catches_wrong_arithmetic() {
        let (a, b) = inputs();
        let (c, s) = reference(&a, &b);
        assert_eq!(error_of(&c, &s, &c, &s), 0.0);
        let zeros = vec![0.0; c.len()];
        assert!(error_of(&zeros, &s, &c, &s) > BF16_TOLERANCE);
        let mut nan = c.clone();
        nan[3] = f64::NAN;
        assert_eq!(error_of(&nan, &s, &c, &s), f64::INFINITY);
        let transposed: Vec<f64> = (0..M * N).map(|i| c[(i % M) * N + i / M]).collect();
        assert!(error_of(&transposed, &s, &c, &s) > BF16_TOLERANCE);
        assert_eq!(error_of(&c[1..], &s, &c, &s), f64::INFINITY);
    }
}
