//! Per-module output checks, the way a PyTorch forward hook would see them.
//!
//! Every forward takes a probe and hands it each submodule's output under its checkpoint name
//! (`transformer_blocks.0.ff.net.0.proj`). The runtime's non-finite guard re-runs a failing call
//! with a probe that finds the first module whose output is not finite; normal runs pass
//! [`NoProbe`], which costs nothing.

use burn::tensor::Tensor;

pub trait Probe {
    /// Called with each module's output, in execution order. `name` is only evaluated when the
    /// probe wants it.
    fn check<const D: usize>(&mut self, name: impl FnOnce() -> String, output: &Tensor<D>);
}

/// The probe of normal runs.
pub struct NoProbe;

impl Probe for NoProbe {
    #[inline]
    fn check<const D: usize>(&mut self, _name: impl FnOnce() -> String, _output: &Tensor<D>) {}
}
