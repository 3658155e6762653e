//! Custom kernels for cogview, each beside a plain-burn reference and a parity test.
//!
//! - GPU: `#[cube]` functions (so they compile to WGSL, SPIR-V and MSL, whichever compiler the
//!   adapter got), launched through a burn backend extension (so they run under burn's fusion
//!   like any other op): [`bf16`].
//! - burn's CPU backend (burn-flex): host code on its tensors' memory, through the same kind of
//!   extension, where burn-flex's own ops leave most of the machine idle. Its elementwise ops
//!   run on one thread and its convolution copies nine times its input: [`conv`], [`linear`],
//!   [`attention`], [`group_norm`], [`layer_norm`], [`gelu`]. Each says with an `applies`
//!   function when it is used; models call burn's op otherwise.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData};

pub mod attention;
pub mod bf16;
pub mod conv;
pub mod gelu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;

/// Whether `x` is a non-empty f32 tensor on burn's CPU backend, where the host kernels run
/// (they split tensors into rows, groups or planes; an empty one is left to burn's ops).
pub fn on_cpu_f32<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().as_dispatch(), burn::backend::DispatchDevice::Flex(_))
        && x.dtype() == DType::F32
        && x.shape().num_elements() > 0
}

/// The mean and biased variance of `values`, in f64: two passes, so that the variance has no
/// cancellation of `E[x²] - E[x]²` (the norms' statistics).
fn mean_var(values: &[f32]) -> (f64, f64) {
    let len = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
    (mean, var)
}

/// An f32 burn-flex tensor as a contiguous buffer a host kernel may overwrite: the same memory
/// when nothing else holds it, else a copy.
fn owned_f32(x: FlexTensor) -> FlexTensor {
    let contiguous = x.to_contiguous();
    drop(x);
    if contiguous.is_unique() {
        contiguous
    } else {
        let shape = contiguous.layout().shape().clone();
        FlexTensor::from_data(TensorData::new(contiguous.storage::<f32>().to_vec(), shape))
    }
}
