//! The tanh GELU on burn's CPU backend in one parallel pass.
//!
//! As burn ops it is five elementwise passes (see `cogview_models::nn::gelu_tanh`), each on one
//! thread of burn's CPU backend, with sigmoid's `exp` a scalar call per element: on the
//! transformer's feed-forward activation (`[2, 480, 10240]` at 256² with guidance) that was
//! about a tenth of a step. Here it is one pass, in place when nothing else holds the tensor,
//! split across threads.
//!
//! The plain-burn reference is `cogview_models::nn::gelu_tanh`'s burn path, which tests compare
//! against this on the same inputs.

use burn::backend::{Backend, Dispatch, Flex, backend_extension, tensor::FloatTensor};
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::{on_cpu_f32, owned_f32};

/// Whether [`gelu_tanh`] runs here: an f32 tensor on burn's CPU backend.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    on_cpu_f32(x)
}

/// `x·sigmoid(2u)`, `u = sqrt(2/π)·x·(1 + 0.044715·x²)`: `0.5·x·(1 + tanh(u))`.
///
/// # Shapes
/// - x: any → the same
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::gelu_tanh(x.into_dispatch()))
}

#[backend_extension(Flex)]
pub trait GeluOps: Backend {
    /// The tanh GELU of an f32 tensor.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl GeluOps for Flex {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        // The constants of the burn path, rounded to f32 once.
        const TWO_SQRT_2_OVER_PI: f64 = 2.0 * 0.797_884_560_802_865_4;
        const LINEAR: f32 = TWO_SQRT_2_OVER_PI as f32;
        const CUBIC: f32 = (TWO_SQRT_2_OVER_PI * 0.044715) as f32;
        let mut x = owned_f32(x);
        x.storage_mut::<f32>().par_chunks_mut(1 << 14).for_each(|chunk| {
            chunk.iter_mut().for_each(|v| {
                let two_u = *v * (*v * *v * CUBIC + LINEAR);
                // x / (1 + e^-2u): x for large u, -0 for very negative u, NaN kept.
                *v /= 1.0 + (-two_u).exp();
            })
        });
        x
    }
}
