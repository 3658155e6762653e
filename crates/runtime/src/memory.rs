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

    /// The larger of both, figure by figure.
    pub fn merge(&mut self, other: PeakMemory) {
        let max = |a: Option<u64>, b: Option<u64>| a.max(b);
        self.in_use = max(self.in_use, other.in_use);
        self.reserved = max(self.reserved, other.reserved);
    }
}
