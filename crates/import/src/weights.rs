//! Loading checkpoint tensors into the modules of `cogview-models`.
//!
//! Why our own applier rather than burn-store's: burn-store has no sharded-index support, keeps
//! each tensor's stored dtype (so bf16 weights would need an adapter chain per target dtype),
//! and reports problems only after materialising modules. Here every module asks its
//! [`WeightSource`] for each tensor by checkpoint key, so (1) the expected key list of any
//! config comes from the module code itself ([`KeyRecorder`]: no checkpoint, no allocation), and
//! can be checked against a checkpoint before a byte is read, listing every missing, misshapen
//! and unexpected key at once; (2) [`Loader`] reads exactly the keys a sub-module asks for —
//! partial loading by prefix, which streaming needs — converting each to the dtype the runtime
//! chooses for it. The "remap table" is the key strings in the modules' `load` functions (they
//! mirror the checkpoint's names), plus the aliases and ignore rules of [`Component`].

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use burn::tensor::{DType, Device, Tensor, TensorData};
use cogview_models::{Weight, WeightSource, WeightStorage};

use crate::checkpoint::Checkpoint;
use crate::error::ImportError;
use crate::report::LoadReport;

/// The weight-carrying components of the pipeline folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    TextEncoder,
    Transformer,
    Vae,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::TextEncoder, Component::Transformer, Component::Vae];

    /// The component's folder and `model_index.json` entry.
    pub fn name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::Transformer => "transformer",
            Component::Vae => "vae",
        }
    }

    /// `(key the module asks for, other name it may be stored under)`.
    pub fn aliases(self) -> &'static [(&'static str, &'static str)] {
        match self {
            // transformers ties the encoder's embedding to `shared` and saves one copy, under
            // either name depending on version.
            Component::TextEncoder => &[("shared.weight", "encoder.embed_tokens.weight")],
            _ => &[],
        }
    }

    /// Stored keys that are skipped on purpose, with the reason.
    pub fn ignored(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Component::TextEncoder => {
                &[("encoder.embed_tokens.weight", "tied to shared.weight, which is loaded instead")]
            }
            _ => &[],
        }
    }
}

/// Checkpoint keys with their shapes, in the order a module asks for them.
pub type KeyShapes = Vec<(String, Vec<usize>)>;

/// Records the keys and shapes a module asks for; gives empty placeholders.
#[derive(Clone, Default)]
pub struct KeyRecorder {
    keys: Rc<RefCell<KeyShapes>>,
    prefix: String,
}

fn join(prefix: &str, key: impl std::fmt::Display) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// A zero-element tensor of rank `D` on the CPU: what a module holds when it was only built to
/// learn its keys, or when its load failed (and it will be dropped).
fn placeholder<const D: usize>() -> Tensor<D> {
    Tensor::empty([0; D], &Device::flex())
}

impl KeyRecorder {
    /// The keys `build` asks for, in order, with their shapes.
    pub fn keys_of(build: impl FnOnce(&KeyRecorder)) -> KeyShapes {
        let r = KeyRecorder::default();
        build(&r);
        r.keys.take()
    }
}

impl WeightSource for KeyRecorder {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        self.keys.borrow_mut().push((join(&self.prefix, key), shape.to_vec()));
        placeholder()
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        Self { keys: self.keys.clone(), prefix: join(&self.prefix, prefix) }
    }
}

/// Compares what a module wants with what a checkpoint holds.
///
/// `wanted` are the keys to load now; `all` every key the component's modules can ask for
/// (stored keys outside it are unexpected unless ignored). Aliases count as the key they stand
/// for.
pub fn check(component: Component, ck: &Checkpoint, wanted: &[(String, Vec<usize>)], all: &[(String, Vec<usize>)]) -> LoadReport {
    let mut report = LoadReport::default();
    for (key, shape) in wanted {
        let stored = stored_name(ck, component, key);
        match stored.and_then(|k| ck.meta(k)) {
            None => report.missing.push(key.clone()),
            Some(m) if &m.shape != shape => report.mismatched.push((key.clone(), shape.clone(), m.shape.clone())),
            Some(_) => report.applied.push(key.clone()),
        }
    }
    let known: HashSet<&str> = all
        .iter()
        .flat_map(|(k, _)| {
            let stored = stored_name(ck, component, k);
            [Some(k.as_str()), stored].into_iter().flatten()
        })
        .collect();
    let ignored: HashMap<&str, &'static str> = component.ignored().iter().copied().collect();
    for key in ck.keys() {
        if known.contains(key) {
            continue;
        }
        match ignored.get(key) {
            Some(reason) => report.ignored.push((key.to_string(), reason)),
            None => report.unexpected.push(key.to_string()),
        }
    }
    report.sort();
    report
}

/// The stored name of `key`: itself, or its alias when only that is stored.
fn stored_name<'k>(ck: &Checkpoint, component: Component, key: &'k str) -> Option<&'k str> {
    if ck.meta(key).is_some() {
        return Some(key);
    }
    component.aliases().iter().find(|(k, _)| *k == key).map(|(_, alias)| *alias).filter(|a| ck.meta(a).is_some())
}

/// Reads tensors from a checkpoint onto a device, each in the dtype `dtype_for(key)` gives.
#[derive(Clone)]
pub struct Loader<'a> {
    ck: &'a Checkpoint,
    component: Component,
    device: Device,
    dtype_for: Rc<dyn Fn(&str) -> DType + 'a>,
    storage: WeightStorage,
    max_buffer: Option<u64>,
    prefix: String,
    state: Rc<RefCell<(LoadReport, Option<ImportError>)>>,
}

impl<'a> Loader<'a> {
    pub fn new(ck: &'a Checkpoint, component: Component, device: &Device, dtype_for: impl Fn(&str) -> DType + 'a) -> Self {
        Self {
            ck,
            component,
            device: device.clone(),
            dtype_for: Rc::new(dtype_for),
            storage: WeightStorage::Compute,
            max_buffer: cogview_models::storage::max_buffer_bytes(device),
            prefix: String::new(),
            state: Default::default(),
        }
    }

    /// Keeps matrices and conv kernels (what modules ask for with `weight`) in `storage`.
    pub fn with_storage(mut self, storage: WeightStorage) -> Self {
        self.storage = storage;
        self
    }

    /// The stored data of `key`, converted to `dtype`, or `None` with the problem recorded.
    fn read(&self, key: &str, shape: &[usize], dtype: DType) -> Option<TensorData> {
        let full = join(&self.prefix, key);
        let mut state = self.state.borrow_mut();
        let Some(stored) = stored_name(self.ck, self.component, &full) else {
            state.0.missing.push(full);
            return None;
        };
        let meta = self.ck.meta(stored).expect("stored_name checks it exists");
        if meta.shape != shape {
            state.0.mismatched.push((full, shape.to_vec(), meta.shape.clone()));
            return None;
        }
        match self.ck.read(stored, dtype) {
            Ok(data) => {
                state.0.applied.push(full);
                Some(data)
            }
            Err(e) => {
                state.1.get_or_insert(e);
                None
            }
        }
    }

    /// Builds a module (or a part of one: `|w| Block::load(&w.pp("encoder.block.7"), c)`),
    /// failing with every problem listed if any tensor was missing, misshapen or unreadable.
    pub fn load<M>(&self, build: impl FnOnce(&Loader<'a>) -> M) -> Result<(M, LoadReport), ImportError> {
        let module = build(self);
        let (mut report, error) = self.state.take();
        if let Some(e) = error {
            return Err(e);
        }
        report.sort();
        if !report.is_ok() {
            return Err(ImportError::Load { component: self.component.name().into(), report: Box::new(report) });
        }
        Ok((module, report))
    }
}

impl WeightSource for Loader<'_> {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let dtype = (self.dtype_for)(&join(&self.prefix, key));
        match self.read(key, &shape, dtype) {
            Some(data) => Tensor::from_data(data, (&self.device, dtype)),
            None => placeholder(),
        }
    }

    fn weight<const D: usize>(&self, key: &str, shape: [usize; D]) -> Weight<D> {
        let compute = (self.dtype_for)(&join(&self.prefix, key));
        let (storage, read_as) = if self.storage == WeightStorage::Compute || compute == DType::BF16 {
            (WeightStorage::Compute, compute)
        } else {
            (self.storage, DType::BF16)
        };
        match self.read(key, &shape, read_as) {
            Some(data) => Weight::store_limited(data, storage, compute, &self.device, self.max_buffer),
            None => Weight::Dense(placeholder()),
        }
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        Self { prefix: join(&self.prefix, prefix), ..self.clone() }
    }
}
