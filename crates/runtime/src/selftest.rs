//! The dtype self-test: before a reduced precision is trusted on a device, a small fixed matmul
//! and softmax run in that dtype there and are compared with an f64 CPU reference.
//!
//! Inputs are rounded to the dtype on the host first, so the reference and the device start
//! from the same numbers and the error measures the device's arithmetic alone.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
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

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SelfTestReport {
    pub dtype: ComputeDtype,
    /// Largest error of the matmul (relative to its largest output) and of the softmax
    /// (absolute; probabilities), whichever is larger. NaN or inf make it infinite.
    pub error: f64,
    pub tolerance: f64,
    pub passed: bool,
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

/// Largest error of the matmul (relative to its largest output) and of the softmax (absolute);
/// a NaN, an inf or a wrong length make it infinite.
fn error_of(c_dev: &[f64], s_dev: &[f64], c_ref: &[f64], s_ref: &[f64]) -> f64 {
    let err = |dev: &[f64], reference: &[f64], scale: f64| -> f64 {
        if dev.len() != reference.len() {
            return f64::INFINITY;
        }
        dev.iter().zip(reference).fold(0f64, |m, (d, r)| {
            let e = (d - r).abs() / scale;
            if e.is_finite() { m.max(e) } else { f64::INFINITY }
        })
    };
    let c_max = c_ref.iter().fold(0f64, |m, x| m.max(x.abs()));
    err(c_dev, c_ref, c_max).max(err(s_dev, s_ref, 1.0))
}

/// Runs the self-test for `dtype` on `device`.
pub fn run(device: &Device, dtype: ComputeDtype) -> SelfTestReport {
    let (a, b) = inputs();
    let (a, b) = (round_to(dtype, a), round_to(dtype, b));
    let (c_ref, s_ref) = reference(&a, &b);
    let dt = dtype.dtype();
    let ta = Tensor::<2>::from_data(TensorData::new(a, [M, K]).convert_dtype(dt), (device, dt));
    let tb = Tensor::<2>::from_data(TensorData::new(b, [K, N]).convert_dtype(dt), (device, dt));
    let c = ta.matmul(tb).mul_scalar(1.0 / (K as f64).sqrt());
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
    SelfTestReport { dtype, error, tolerance, passed: error <= tolerance }
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
