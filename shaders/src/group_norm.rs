//! GroupNorm, optionally followed by SiLU, on burn's CPU backend in two passes over the tensor.
//!
//! As burn ops, `silu(group_norm(x))` is a dozen passes over the activation: statistics, a
//! broadcast subtract and divide, the affine multiply and add, then sigmoid and a multiply. burn's
//! CPU backend runs each elementwise pass on one thread (and sigmoid as a scalar `exp` per
//! element), so on the VAE's 256² activations (8 to 33 million values) they cost about as much as
//! the convolutions between them. Here one pass per group takes its mean and variance (in f64),
//! and one more applies `x·a + s` per channel (`a = w / sqrt(var + eps)`, `s = b - mean·a`) and
//! the SiLU, in place when nothing else holds the tensor, groups in parallel.
//!
//! The plain-burn reference is `cogview_models::nn::GroupNorm`'s burn path, which tests compare
//! against this on the same inputs.

use burn::backend::{Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::{mean_var, on_cpu_f32, owned_f32};

/// Whether [`group_norm`] runs here: an f32 input and f32 affine parameters on burn's CPU
/// backend.
pub fn applies(x: &Tensor<4>, weight: &Tensor<1>) -> bool {
    on_cpu_f32(x) && on_cpu_f32(weight)
}

/// `GroupNorm(groups, C, eps)(x)` with affine `weight`, `bias`, then `x·sigmoid(x)` if `silu`.
///
/// # Shapes
/// - x: `[N, C, H, W]`, weight and bias: `[C]` → `[N, C, H, W]`
pub fn group_norm(x: Tensor<4>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64, silu: bool) -> Tensor<4> {
    let [_, c, _, _] = x.dims();
    assert!(groups > 0 && c.is_multiple_of(groups), "group_norm: {c} channels in {groups} groups");
    Tensor::from_dispatch(Dispatch::group_norm(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), groups, eps, silu))
}

#[backend_extension(Flex)]
pub trait GroupNormOps: Backend {
    /// GroupNorm over `[N, C, H, W]` (f32), then SiLU if `silu`.
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;
}

impl GroupNormOps for Flex {
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let mut x = owned_f32(x);
        let (weight, bias) = (weight.to_contiguous(), bias.to_contiguous());
        let &[_, c, h, w] = x.layout().shape().as_slice() else { panic!("group_norm: x must be 4-D") };
        let (weight, bias) = (weight.storage::<f32>(), bias.storage::<f32>());
        let per_group = c / groups;
        let values = x.storage_mut::<f32>();
        values.par_chunks_mut(per_group * h * w).enumerate().for_each(|(i, group)| {
            let (mean, var) = mean_var(group);
            let inv_std = 1.0 / (var + eps).sqrt();
            let first = (i % groups) * per_group;
            for (k, plane) in group.chunks_mut(h * w).enumerate() {
                let scale = inv_std * weight[first + k] as f64;
                let (a, s) = (scale as f32, (bias[first + k] as f64 - mean * scale) as f32);
                if silu {
                    // x·sigmoid(x) = x / (1 + e^-x): ±0 and x at the extremes, NaN kept.
                    plane.iter_mut().for_each(|v| {
                        let y = *v * a + s;
                        *v = y / (1.0 + (-y).exp());
                    });
                } else {
                    plane.iter_mut().for_each(|v| *v = *v * a + s);
                }
            }
        });
        x
    }
}
