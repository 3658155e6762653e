//! Device memory measured from burn's allocator.

use burn::tensor::Device;
use serde::Serialize;

/// The most device memory seen in use (and reserved) at the sampled points of a stage.
///
/// Sampling waits for queued work first, so what is in use is what the work needed. Backends
/// without an allocator report (the CPU backend) leave it at `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeakMemory {
    pub in_use: Option<u64>,
    pub reserved: Option<u64>,
}

impl PeakMemory {
    pub fn sample(&mut self, device: &Device) {
        if let Err(e) = device.sync() {
            tracing::debug!("memory sample: sync failed: {e}");
        }
        if let Some(u) = device.memory_pool_usage() {
            self.in_use = Some(self.in_use.unwrap_or(0).max(u.bytes_in_use));
            self.reserved = Some(self.reserved.unwrap_or(0).max(u.bytes_reserved));
        }
    }
}

/// A probe that samples device memory at every module output: a stage's peak seen between
/// modules (what a module keeps alive while the next runs), not only between calls. Each sample
/// waits for the device, so only the benchmark uses it.
pub struct PeakProbe<'a> {
    pub device: &'a Device,
    pub peak: &'a mut PeakMemory,
}

impl cogview_models::Probe for PeakProbe<'_> {
    fn check<const D: usize>(&mut self, _name: impl FnOnce() -> String, _output: &burn::tensor::Tensor<D>) {
        self.peak.sample(self.device);
    }
}
