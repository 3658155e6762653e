//! LayerNorm without affine parameters, optionally followed by AdaLN's modulation
//! `y·(1 + scale) + shift`, on burn's CPU backend in one parallel pass over the rows.
//!
//! As burn ops the modulated norm is six passes over the activation (statistics, a broadcast
//! subtract and divide, the modulation's multiply and add), each on one thread of burn's CPU
//! backend; the transformer runs four per block and two more on its attention's queries and
//! keys. Here each row is read for its mean and variance (two passes over the row while it is
//! in cache) and written once, rows in parallel, in place when nothing else holds the tensor.
//!
//! The plain-burn references are `cogview_models::nn::layer_norm` and
//! `cogview_models::nn::layer_norm_modulate`'s burn paths, which tests compare against this.

use burn::backend::{Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::{mean_var, on_cpu_f32, owned_f32};

/// Whether [`layer_norm`] and [`layer_norm_modulate`] run here: f32 on burn's CPU backend.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    on_cpu_f32(x)
}

/// `(x - mean) / sqrt(var + eps)` over the last dim (biased variance).
///
/// # Shapes
/// - x: `[..., D]` → `[..., D]`
pub fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::layer_norm(x.into_dispatch(), eps))
}

/// `layer_norm(x, eps) · (1 + scale) + shift`, scale and shift one row per batch item.
///
/// # Shapes
/// - x: `[N, T, D]`, shift and scale: `[N, 1, D]` → `[N, T, D]`
pub fn layer_norm_modulate(x: Tensor<3>, shift: Tensor<3>, scale: Tensor<3>, eps: f64) -> Tensor<3> {
    let [n, _, d] = x.dims();
    assert_eq!(shift.dims(), [n, 1, d], "layer_norm_modulate: shift");
    assert_eq!(scale.dims(), [n, 1, d], "layer_norm_modulate: scale");
    Tensor::from_dispatch(Dispatch::layer_norm_modulate(x.into_dispatch(), shift.into_dispatch(), scale.into_dispatch(), eps))
}

#[backend_extension(Flex)]
pub trait LayerNormOps: Backend {
    /// LayerNorm over the last dim (f32), no affine parameters.
    fn layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    /// LayerNorm over the last dim of `[N, T, D]`, then `· (1 + scale[n]) + shift[n]`.
    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

impl LayerNormOps for Flex {
    fn layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let mut x = owned_f32(x);
        let d = *x.layout().shape().as_slice().last().expect("layer_norm: a 0-D tensor");
        x.storage_mut::<f32>().par_chunks_mut(d).for_each(|row| normalize(row, eps, |_, y| y));
        x
    }

    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let mut x = owned_f32(x);
        let &[_, t, d] = x.layout().shape().as_slice() else { panic!("layer_norm_modulate: x must be 3-D") };
        let (shift, scale) = (shift.to_contiguous(), scale.to_contiguous());
        let (shift, scale) = (shift.storage::<f32>(), scale.storage::<f32>());
        x.storage_mut::<f32>().par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let item = i / t;
            let (shift, scale) = (&shift[item * d..][..d], &scale[item * d..][..d]);
            // (1 + scale) rounded first, as the burn ops and PyTorch do.
            normalize(row, eps, |k, y| y * (1.0 + scale[k]) + shift[k]);
        });
        x
    }
}

/// One row normalised in place, then `then(index, value)` applied to each value.
fn normalize(row: &mut [f32], eps: f64, then: impl Fn(usize, f32) -> f32) {
    let (mean, var) = mean_var(row);
    let (mean, inv_std) = (mean as f32, (1.0 / (var + eps).sqrt()) as f32);
    row.iter_mut().enumerate().for_each(|(k, v)| *v = then(k, (*v - mean) * inv_std));
}
