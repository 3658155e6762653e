//! Where modules get their weights from, without this crate knowing about files.
//!
//! Every module has a `load(w, config)` that asks its source for each tensor by its checkpoint
//! key (relative to the source's prefix) and expected shape. `cogview-import` implements the
//! source twice: one that reads a checkpoint (collecting every missing or mismatched key
//! instead of stopping at the first) and one that only records which keys a module wants, so
//! the key list of any config can be known without a checkpoint.

use burn::tensor::Tensor;

use crate::storage::Weight;

pub trait WeightSource: Sized {
    /// The tensor stored under `key` (after this source's prefix), of `shape`.
    ///
    /// A source that cannot give it (missing key, wrong shape) records the problem and returns
    /// a placeholder; the caller checks the source's report once the whole module is built.
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D>;

    /// A matrix or conv kernel under `key`: like [`tensor`](Self::tensor), but a source may
    /// keep it in a narrower storage and widen it at use (see [`crate::storage`]).
    fn weight<const D: usize>(&self, key: &str, shape: [usize; D]) -> Weight<D> {
        Weight::Dense(self.tensor(key, shape))
    }

    /// The same source under `prefix.` (e.g. `w.pp("encoder").pp("block.3")`).
    fn pp(&self, prefix: impl std::fmt::Display) -> Self;
}
