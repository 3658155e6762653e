//! Scaled dot-product attention on burn's CPU backend: one block of query rows against every key
//! at a time, with the exact softmax in between.
//!
//! burn-flex's attention walks the keys 64 at a time with an online softmax. For each tile it
//! makes two thin matrix products (`k = head_dim`, `n = 64`) that pack the whole query block
//! again, rescales every output row, and calls `exp` once per score on one core's scalar unit.
//! At the transformer's 1024² shape (64 heads of 40, 4320 tokens, two images with guidance)
//! that is 2.4·10⁹ scalar `exp` calls per block: attention took more than half of a
//! transformer step, which was twice as long as PyTorch's.
//!
//! Here each job takes [`QUERY_ROWS`] query rows of one head: one matrix product gives their
//! scores against every key (the scale folded in; T5's position bias is added after it), the
//! softmax runs in place with an `exp` the compiler vectorises (AVX-512 or AVX2 where the CPU
//! has it), one more product gives the output rows, and they are divided by the row sums. Scratch is one `[QUERY_ROWS, T]` score
//! block per thread (1.1 MB at 4320 tokens), never the `[T, T]` matrix.
//!
//! The output is laid out as `[N, T, H, hd]` in memory behind its `[N, H, T, hd]` shape, so the
//! transformer's `swap_dims(1, 2).reshape([N, T, D])` that follows costs no copy.
//!
//! The plain-burn reference is `burn::tensor::module::attention(q, k, v, None, None, _)` with the
//! default scale `1/√hd`, or T5's additive position bias and no scale, which tests compare
//! against this on the same inputs.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::{Bytes, DType, Shape, Tensor};
use rayon::prelude::*;

use crate::on_cpu_f32;

/// Query rows per job: enough rows for the matrix products to fill gemm's register tiles, few
/// enough for their score block to stay in a core's L2 at the transformer's token counts.
const QUERY_ROWS: usize = 64;

/// Whether [`attention`] runs here: f32 `[N, H, T, hd]` queries, keys and values on burn's CPU
/// backend, with one key and value head per query head, and an f32 bias (if any) of one score
/// per query and key, for every image or shared by all.
pub fn applies(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bias: Option<&Tensor<4>>) -> bool {
    let ([n, h, tq, hd], [nk, hk, tk, hdk], [nv, hv, tv, _]) = (q.dims(), k.dims(), v.dims());
    let bias_fits = |b: &Tensor<4>| {
        let [nb, hb, tqb, tkb] = b.dims();
        on_cpu_f32(b) && (nb == n || nb == 1) && (hb, tqb, tkb) == (h, tq, tk)
    };
    on_cpu_f32(q) && on_cpu_f32(k) && on_cpu_f32(v) && (n, h) == (nk, hk) && (n, h, tk) == (nv, hv, tv) && hd == hdk && bias.is_none_or(bias_fits)
}

/// `softmax(scale · q kᵀ + bias) v` per image and head, no mask.
///
/// # Shapes
/// - q: `[N, H, Tq, hd]`, k: `[N, H, Tk, hd]`, v: `[N, H, Tk, hv]`, bias: `[N or 1, H, Tq, Tk]`
///   (any strides) → `[N, H, Tq, hv]`
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Option<Tensor<4>>, scale: f64) -> Tensor<4> {
    let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(match bias {
        None => Dispatch::sdpa(q, k, v, scale),
        Some(bias) => Dispatch::sdpa_bias(q, k, v, bias.into_dispatch(), scale),
    })
}

#[backend_extension(Flex)]
pub trait AttentionOps: Backend {
    /// Scaled dot-product attention without a mask (f32).
    fn sdpa(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    /// The same with an additive bias on the scores.
    fn sdpa_bias(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, bias: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
}

/// A tensor's memory as gemm reads it: the buffer from its first element, and its strides.
struct Strided<'a> {
    data: &'a [f32],
    strides: [isize; 4],
}

impl<'a> Strided<'a> {
    fn of(x: &'a FlexTensor) -> Self {
        let layout = x.layout();
        let strides: [isize; 4] = layout.strides().try_into().expect("attention: 4-D tensors");
        Self { data: &x.storage::<f32>()[layout.start_offset()..], strides }
    }

    /// The offset of element `index` (no stride is negative; a broadcast one is 0).
    fn offset(&self, index: [usize; 4]) -> usize {
        index.iter().zip(self.strides).map(|(&i, s)| i * s as usize).sum()
    }

    /// The first element of image `b`, head `h`.
    fn head(&self, b: usize, h: usize) -> *const f32 {
        self.data[self.offset([b, h, 0, 0])..].as_ptr()
    }
}

/// The output buffer, written by many jobs at disjoint rows.
struct Out(*mut f32);
// SAFETY: every job writes only the rows of its own (image, head, query block).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so that closures capture the `Out` (which is `Sync`), not its field.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl AttentionOps for Flex {
    fn sdpa(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        sdpa_f32(q, k, v, None, scale)
    }

    fn sdpa_bias(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, bias: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        sdpa_f32(q, k, v, Some(bias), scale)
    }
}

/// [`attention`] on burn-flex tensors.
fn sdpa_f32(q: FlexTensor, k: FlexTensor, v: FlexTensor, bias: Option<FlexTensor>, scale: f64) -> FlexTensor {
    // gemm takes any strides; only negative ones (a flipped view) are laid out first.
    let positive = |x: FlexTensor| if x.layout().has_positive_strides() { x } else { x.to_contiguous() };
    let (q, k, v, bias) = (positive(q), positive(k), positive(v), bias.map(positive));
    let &[n, heads, tq, hd] = q.layout().shape().as_slice() else { panic!("attention: q must be 4-D") };
    let &[_, _, tk, hv] = v.layout().shape().as_slice() else { panic!("attention: v must be 4-D") };
    assert_eq!(k.layout().shape().as_slice(), [n, heads, tk, hd], "attention: k against q and v");
    let shape = Shape::from(vec![n, heads, tq, hv]);
    // [N, Tq, H, hv] in memory: row (b, h, i) starts at ((b·Tq + i)·H + h)·hv.
    let strides = vec![(tq * heads * hv) as isize, hv as isize, (heads * hv) as isize, 1];
    let mut out = vec![0f32; n * tq * heads * hv];
    if !out.is_empty() && tk > 0 {
        let (qs, ks, vs) = (Strided::of(&q), Strided::of(&k), Strided::of(&v));
        let bias = bias.as_ref().map(|b| (Strided::of(b), b.layout().shape()[0] == n));
        let scale = scale as f32;
        let blocks = tq.div_ceil(QUERY_ROWS);
        let dst = Out(out.as_mut_ptr());
        let row_stride = (heads * hv) as isize;
        (0..n * heads * blocks).into_par_iter().for_each_init(
            || (vec![0f32; QUERY_ROWS * tk], vec![0f32; QUERY_ROWS]),
            |(scores, sums), job| {
                let (b, h, block) = (job / (heads * blocks), job / blocks % heads, job % blocks);
                let first = block * QUERY_ROWS;
                let rows = QUERY_ROWS.min(tq - first);
                let scores = &mut scores[..rows * tk];
                // SAFETY: every pointer is an element of its tensor's buffer, and each
                // operand's extent along its strides stays inside it (the shapes above);
                // the scores are this job's own [rows, Tk] row-major scratch.
                unsafe {
                    let qp = qs.head(b, h).offset(first as isize * qs.strides[2]);
                    gemm::gemm(
                        rows, tk, hd,
                        scores.as_mut_ptr(), 1, tk as isize, false,
                        qp, qs.strides[3], qs.strides[2],
                        // kᵀ[j, t] = k[t, j]
                        ks.head(b, h), ks.strides[2], ks.strides[3],
                        0.0, scale, false, false, false, gemm::Parallelism::None,
                    );
                }
                if let Some((bias, per_image)) = &bias {
                    let bb = if *per_image { b } else { 0 };
                    let step = bias.strides[3] as usize;
                    for (i, row) in scores.chunks_exact_mut(tk).enumerate() {
                        let start = bias.offset([bb, h, first + i, 0]);
                        row.iter_mut().enumerate().for_each(|(j, s)| *s += bias.data[start + j * step]);
                    }
                }
                softmax_rows(scores, tk, &mut sums[..rows]);
                // SAFETY: the output rows (b, h, first..first + rows) are this job's alone
                // (see `Out`) and inside `out`; the values are [Tk, hv] at v's strides.
                unsafe {
                    let op = dst.at((b * tq + first) * heads * hv + h * hv);
                    gemm::gemm(
                        rows, hv, tk,
                        op, 1, row_stride, false,
                        scores.as_ptr(), 1, tk as isize,
                        vs.head(b, h), vs.strides[3], vs.strides[2],
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                    for (i, sum) in sums[..rows].iter().enumerate() {
                        let inv = 1.0 / sum;
                        std::slice::from_raw_parts_mut(op.offset(i as isize * row_stride), hv).iter_mut().for_each(|o| *o *= inv);
                    }
                }
            },
        );
    }
    FlexTensor::new(Bytes::from_elems(out), Layout::new(shape, strides, 0), DType::F32)
}

/// Each row of `scores` (`cols` wide) replaced by `e^(s - max)`, its sum written to `sums`.
fn softmax_rows(scores: &mut [f32], cols: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the feature.
            return unsafe { softmax_rows_avx512(scores, cols, sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { softmax_rows_avx2(scores, cols, sums) };
        }
    }
    softmax_rows_any(scores, cols, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_rows_avx512(scores: &mut [f32], cols: usize, sums: &mut [f32]) {
    softmax_rows_any(scores, cols, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_rows_avx2(scores: &mut [f32], cols: usize, sums: &mut [f32]) {
    softmax_rows_any(scores, cols, sums)
}

/// Lanes of the running maximum and sum: the same 16 partial results in the same order on every
/// CPU (so the result is too), and wide enough for an AVX-512 register.
const LANES: usize = 16;

#[inline(always)]
fn softmax_rows_any(scores: &mut [f32], cols: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_exact_mut(cols).zip(sums) {
        let (body, tail) = row.split_at_mut(cols - cols % LANES);
        let mut lanes = [f32::NEG_INFINITY; LANES];
        for chunk in body.chunks_exact(LANES) {
            for (m, &s) in lanes.iter_mut().zip(chunk) {
                // A NaN score is not the maximum; it stays NaN through exp and the sum.
                *m = if s > *m { s } else { *m };
            }
        }
        let max = tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &s| if s > m { s } else { m });
        let mut acc = [0f32; LANES];
        for chunk in body.chunks_exact_mut(LANES) {
            for (a, s) in acc.iter_mut().zip(chunk) {
                *s = exp(*s - max);
                *a += *s;
            }
        }
        let mut total = acc.iter().sum::<f32>();
        for s in tail {
            *s = exp(*s - max);
            total += *s;
        }
        *sum = total;
    }
}

/// `e^x` in f32 without a library call, so that it vectorises: Cephes' `expf` (range reduction
/// by ln 2 in two parts, a degree-6 polynomial; within 2 ulp of `f32::exp` for x ≥ -87.3),
/// rounding through the 1.5·2²³ shifter instead of a rounding instruction (SSE2 has none).
///
/// Softmax only needs x ≤ 0. Below -87.34 (ln 2⁻¹²⁶, the smallest normal power of two) x is
/// clamped, so the result is ≈1.2·10⁻³⁸ instead of a subnormal or 0: negligible next to a row's
/// maximum, e⁰ = 1. Above 88 it is clamped too (the largest power of two is 2¹²⁷). NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 355.0 / 512.0; // ln 2 to 9 bits, so that n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let x = if x < -87.336_54 { -87.336_54 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = x * LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes' 5.0000001201e-1 rounds to 0.5 in f32
    let e_r = p * (r * r) + r + 1.0;
    // 2ⁿ from n's bits: the shifter's low bits hold n + its own integer part.
    let n_int = shifted.to_bits() as i32 - SHIFTER.to_bits() as i32;
    e_r * f32::from_bits(((n_int + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;

    /// Softmax weights within 2 ulp of burn's (its `exp` is the library one), summed over up
    /// to 300 keys in another order, times values |v| ≤ 3: the outputs are weighted means of
    /// the values, so their rounding is a few ulps of 3, well under 1e-5.
    const TOLERANCE: f32 = 1e-5;

    fn burn_sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        burn_attention(q, k, v, None, None, AttentionModuleOptions { scale: None, softcap: None, is_causal: false })
    }

    /// The transformer's call: no bias, the default scale.
    fn sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let scale = 1.0 / (q.dims()[3] as f64).sqrt();
        attention(q, k, v, None, scale)
    }

    fn max_err(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn matches_burns_attention() {
        let device = burn::tensor::Device::flex();
        // Query counts below, at and past one block (with a partial last block); key counts not
        // a multiple of the 16 lanes; the transformer's head width 40 and another.
        for (n, h, tq, tk, hd, hv) in [(1, 1, 5, 7, 8, 8), (2, 3, 64, 64, 40, 40), (2, 2, 130, 300, 40, 24), (1, 2, 129, 17, 16, 16)] {
            let q = Tensor::<4>::random([n, h, tq, hd], Distribution::Normal(0.0, 2.0), &device);
            let k = Tensor::<4>::random([n, h, tk, hd], Distribution::Normal(0.0, 2.0), &device);
            let v = Tensor::<4>::random([n, h, tk, hv], Distribution::Uniform(-3.0, 3.0), &device);
            assert!(applies(&q, &k, &v, None));
            let got = sdpa(q.clone(), k.clone(), v.clone());
            assert_eq!(got.dims(), [n, h, tq, hv]);
            let err = max_err(got, burn_sdpa(q, k, v));
            assert!(err <= TOLERANCE, "{n}×{h} heads, {tq} queries, {tk} keys, hd {hd}, hv {hv}: max error {err}");
        }
    }

    /// The transformer's inputs are views: values as `[N, H, T, hd]` of a `[N, T, H, hd]`
    /// buffer. The output's `[N, T, H, hd]` memory reads back as the same values.
    #[test]
    fn reads_strided_inputs_and_gives_a_token_major_output() {
        let device = burn::tensor::Device::flex();
        let view = |t: usize| Tensor::<4>::random([2, t, 3, 40], Distribution::Normal(0.0, 1.0), &device).swap_dims(1, 2);
        let (q, k, v) = (view(70), view(90), view(90));
        let got = sdpa(q.clone(), k.clone(), v.clone());
        let want = burn_sdpa(q, k, v);
        let tokens = |x: Tensor<4>| x.swap_dims(1, 2).reshape([2, 70, 120]);
        let err = (tokens(got) - tokens(want)).abs().max().into_scalar::<f32>();
        assert!(err <= TOLERANCE, "max error {err}");
    }

    /// A NaN query makes its rows NaN, as in burn; it must not vanish into a finite output
    /// (the pipeline's guard looks for it).
    #[test]
    fn a_nan_stays_a_nan() {
        let device = burn::tensor::Device::flex();
        let mut q = vec![0.5f32; 2 * 3 * 8];
        q[8] = f32::NAN; // head 0, query 1
        let q = Tensor::<4>::from_data(burn::tensor::TensorData::new(q, [1, 2, 3, 8]), &device);
        let k = Tensor::<4>::random([1, 2, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([1, 2, 4, 8], Distribution::Normal(0.0, 1.0), &device);
        let got = sdpa(q, k, v).into_data().try_to_vec::<f32>().unwrap();
        let nan_rows: Vec<bool> = got.chunks(8).map(|row| row.iter().all(|x| x.is_nan())).collect();
        assert_eq!(nan_rows, [false, true, false, false, false, false], "{got:?}");
    }

    #[test]
    fn leaves_other_inputs_to_burn() {
        let device = burn::tensor::Device::flex();
        let x = Tensor::<4>::zeros([1, 2, 3, 8], &device);
        assert!(applies(&x, &x, &x, None));
        assert!(!applies(&x.clone().cast(DType::BF16), &x, &x, None), "bf16");
        let one_kv_head = Tensor::<4>::zeros([1, 1, 3, 8], &device);
        assert!(!applies(&x, &one_kv_head, &one_kv_head, None), "grouped key/value heads");
        assert!(!applies(&Tensor::<4>::zeros([1, 2, 0, 8], &device), &x, &x, None), "no queries");
        let bias = Tensor::<4>::zeros([1, 2, 3, 3], &device);
        assert!(applies(&x, &x, &x, Some(&bias)));
        assert!(!applies(&x, &x, &x, Some(&Tensor::<4>::zeros([1, 1, 3, 3], &device))), "a bias shared by the heads");
    }

    /// T5's attention: scores plus a position bias shared by the batch (a permuted view, as T5
    /// builds it), no scale.
    #[test]
    fn adds_a_shared_bias_and_takes_any_scale() {
        let device = burn::tensor::Device::flex();
        let (n, h, t, d) = (2, 3, 70, 16);
        let q = Tensor::<4>::random([n, h, t, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([n, h, t, d], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<4>::random([n, h, t, d], Distribution::Uniform(-3.0, 3.0), &device);
        let bias = Tensor::<3>::random([t, t, h], Distribution::Normal(0.0, 2.0), &device).permute([2, 0, 1]).unsqueeze::<4>();
        assert!(applies(&q, &k, &v, Some(&bias)));
        let got = attention(q.clone(), k.clone(), v.clone(), Some(bias.clone()), 1.0);
        let scores = q.matmul(k.swap_dims(2, 3)) + bias;
        let want = burn::tensor::activation::softmax(scores, 3).matmul(v);
        let err = max_err(got, want);
        assert!(err <= TOLERANCE, "max error {err}");
    }

    /// Within 2 ulp of the library's `exp` across the softmax range, and NaN stays NaN.
    #[test]
    fn the_vectorisable_exp_is_the_library_one() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst <= 2.0 * f32::EPSILON, "relative error {worst}");
        for x in [1.0f32, 10.0, 80.0] {
            assert!(((exp(x) - x.exp()) / x.exp()).abs() <= 2.0 * f32::EPSILON, "exp({x})");
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1.2e-38);
    }
}
