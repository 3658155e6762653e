//! Where a pipeline's weights and tokens come from: a diffusers folder's checkpoints and
//! tokenizer, or random weights drawn on the CPU and made-up token ids (`cogview bench`, which
//! then runs the same code as a real run).

use std::rc::Rc;

use burn::tensor::{DType, Device, Distribution, Tensor};
use cogview_import::{Checkpoint, Component, ImportError, Loader, ModelFolder, PromptTokenizer, Tokens};
use cogview_models::{Configs, Weight, WeightSource, WeightStorage};

use crate::error::RuntimeError;

/// A model's weights and tokenizer.
pub enum Source {
    /// A diffusers folder, its checkpoints opened (headers read, keys checked) up front.
    Folder(Box<FolderWeights>),
    /// Random weights: N(0, 1/fan_in) matrices, norm weights 1, other vectors N(0, 0.02²);
    /// token ids made up from the position.
    Random,
}

/// The checkpoints and tokenizer of a folder.
pub struct FolderWeights {
    pub folder: ModelFolder,
    pub tokenizer: PromptTokenizer,
    pub text_encoder: Checkpoint,
    pub transformer: Checkpoint,
    pub vae: Checkpoint,
}

impl Source {
    /// Opens a folder's tokenizer and its three checkpoints, checking every key against the
    /// configs: a missing, misshapen or unexpected key fails here, before any work.
    pub fn folder(folder: ModelFolder) -> Result<Self, ImportError> {
        let tokenizer = PromptTokenizer::from_folder(&folder.root.join("tokenizer"))?;
        let (text_encoder, _) = folder.open_weights(Component::TextEncoder)?;
        let (transformer, _) = folder.open_weights(Component::Transformer)?;
        let (vae, _) = folder.open_weights(Component::Vae)?;
        Ok(Source::Folder(Box::new(FolderWeights { folder, tokenizer, text_encoder, transformer, vae })))
    }

    /// Whether the transformer and VAE weights are bf16 (random weights stand for the real
    /// checkpoints, which are).
    pub fn is_bf16(&self) -> bool {
        match self {
            Source::Folder(f) => f.transformer.is_bf16() && f.vae.is_bf16(),
            Source::Random => true,
        }
    }

    /// Stored bytes read from the checkpoints so far (0 for random weights).
    pub fn bytes_read(&self) -> u64 {
        match self {
            Source::Folder(f) => [&f.text_encoder, &f.transformer, &f.vae].iter().map(|c| c.bytes_read()).sum(),
            Source::Random => 0,
        }
    }

    /// Tokenizes `prompt` as the pipeline does (`max_len` ids: prompt, `</s>`, padding). Random
    /// weights get ids made up from the position, all `max_len` of them.
    pub fn tokenize(&self, prompt: &str, max_len: usize, configs: &Configs) -> Result<Tokens, RuntimeError> {
        match self {
            Source::Folder(f) => Ok(f.tokenizer.encode(prompt, max_len)?),
            Source::Random => {
                let vocab = configs.text_encoder.vocab_size;
                let input_ids = (0..max_len).map(|i| (i * 7919 % vocab) as u32).collect();
                Ok(Tokens { input_ids, attention_mask: vec![1; max_len], dropped: 0 })
            }
        }
    }

    /// Builds a module (or part of one) from component `c`'s weights on `device`: each tensor
    /// in the dtype `dtype_for(key)` gives, matrices and kernels kept in `storage`. Fails with
    /// every missing, misshapen or unreadable key listed.
    pub fn load<M>(
        &self,
        c: Component,
        device: &Device,
        dtype_for: impl Fn(&str) -> DType + 'static,
        storage: WeightStorage,
        build: impl FnOnce(&Weights) -> M,
    ) -> Result<M, RuntimeError> {
        match self {
            Source::Folder(f) => {
                let ck = match c {
                    Component::TextEncoder => &f.text_encoder,
                    Component::Transformer => &f.transformer,
                    Component::Vae => &f.vae,
                };
                let loader = Loader::new(ck, c, device, dtype_for).with_storage(storage);
                Ok(loader.load(|l| build(&Weights::Checkpoint(l.clone())))?.0)
            }
            Source::Random => Ok(build(&Weights::Random(RandomWeights::new(device, dtype_for, storage)))),
        }
    }
}

/// A [`WeightSource`] over either kind of [`Source`].
#[derive(Clone)]
pub enum Weights<'a> {
    Checkpoint(Loader<'a>),
    Random(RandomWeights),
}

impl WeightSource for Weights<'_> {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        match self {
            Weights::Checkpoint(l) => l.tensor(key, shape),
            Weights::Random(r) => r.tensor(key, shape),
        }
    }

    fn weight<const D: usize>(&self, key: &str, shape: [usize; D]) -> Weight<D> {
        match self {
            Weights::Checkpoint(l) => l.weight(key, shape),
            Weights::Random(r) => r.weight(key, shape),
        }
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        match self {
            Weights::Checkpoint(l) => Weights::Checkpoint(l.pp(prefix)),
            Weights::Random(r) => Weights::Random(r.pp(prefix)),
        }
    }
}

/// Random weights, drawn on the CPU and uploaded as a checkpoint's are, so the device holds
/// them from the moment they are loaded (a lazily generated tensor would only exist once used,
/// and the memory measured would be less than a real run's).
#[derive(Clone)]
pub struct RandomWeights {
    device: Device,
    dtype_for: Rc<dyn Fn(&str) -> DType>,
    storage: WeightStorage,
    prefix: String,
}

impl RandomWeights {
    pub fn new(device: &Device, dtype_for: impl Fn(&str) -> DType + 'static, storage: WeightStorage) -> Self {
        Self { device: device.clone(), dtype_for: Rc::new(dtype_for), storage, prefix: String::new() }
    }

    fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() { key.to_string() } else { format!("{}.{key}", self.prefix) }
    }

    /// A norm weight is 1; any other vector N(0, 0.02²); a matrix or kernel N(0, 1/fan_in).
    fn random<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let cpu = Device::flex();
        let norm = key == "weight" && (self.prefix.contains("norm") || self.prefix.ends_with("layer_norm"));
        if D == 1 && norm {
            Tensor::ones(shape, &cpu)
        } else {
            let fan_in: usize = if D > 1 { shape[1..].iter().product() } else { 2500 };
            Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()), &cpu)
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let dtype = (self.dtype_for)(&self.key(key));
        let data = self.random(key, shape).into_data().convert_dtype(dtype);
        Tensor::from_data(data, (&self.device, dtype))
    }

    fn weight<const D: usize>(&self, key: &str, shape: [usize; D]) -> Weight<D> {
        let dtype = (self.dtype_for)(&self.key(key));
        let max = cogview_models::storage::max_buffer_bytes(&self.device);
        Weight::store_limited(self.random(key, shape).into_data(), self.storage, dtype, &self.device, max)
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        Self { prefix: self.key(&prefix.to_string()), ..self.clone() }
    }
}
