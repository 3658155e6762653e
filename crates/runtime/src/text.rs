//! The text stage: prompts to T5 embeddings, resident or streamed block by block.
//!
//! Streaming loads one encoder block's weights, runs it, and frees it, so device memory peaks at
//! about one block plus activations (T5-XXL is 19 GB in f32; a block is 0.8 GB). The token table
//! (0.5 GB) stays on the CPU and only the looked-up rows go to the device.

use burn::tensor::{DType, Device, Tensor};
use cogview_import::{Checkpoint, Component, Loader, ModelFolder, PromptTokenizer, Tokens};
use cogview_models::{Probe, WeightSource};
use cogview_models::t5::{T5Block, T5Embedding};

use crate::error::RuntimeError;
use crate::memory::PeakMemory;

/// Whether a component's weights stay on the device for the whole stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsMode {
    Resident,
    /// One block at a time.
    Streamed,
}

/// The dtype each text-encoder weight is loaded in: the compute dtype, except that under f16
/// the feed-forward output projection `wo` stays in f32 as transformers keeps it
/// (`T5PreTrainedModel._keep_in_fp32_modules`), and the token table, which is looked up on the
/// CPU in f32 (the rows are rounded to the compute dtype on the device, as a lookup in a
/// rounded table would give).
pub fn t5_weight_dtype(compute: DType) -> impl Fn(&str) -> DType {
    move |key: &str| {
        if key == "shared.weight" || (compute == DType::F16 && key.ends_with("DenseReluDense.wo.weight")) {
            DType::F32
        } else {
            compute
        }
    }
}

pub struct TextEncoder<'a> {
    folder: &'a ModelFolder,
    checkpoint: Checkpoint,
    tokenizer: PromptTokenizer,
    embedding: T5Embedding,
    device: Device,
    dtype: DType,
    /// The blocks, when resident.
    blocks: Option<Vec<T5Block>>,
    /// Prompts encoded so far.
    calls: std::cell::Cell<usize>,
}

impl<'a> TextEncoder<'a> {
    /// Opens the tokenizer and the text encoder's weights (checked against the config), and
    /// loads the token table on the CPU; in resident mode also every block on `device`.
    pub fn open(folder: &'a ModelFolder, device: &Device, dtype: DType, mode: WeightsMode) -> Result<Self, RuntimeError> {
        let tokenizer = PromptTokenizer::from_folder(&folder.root.join("tokenizer"))?;
        let (checkpoint, _) = folder.open_weights(Component::TextEncoder)?;
        let embedding = {
            let loader = Loader::new(&checkpoint, Component::TextEncoder, &Device::flex(), t5_weight_dtype(dtype));
            loader.load(|w| T5Embedding::load(w, &folder.text_encoder))?.0
        };
        let mut encoder = Self { folder, checkpoint, tokenizer, embedding, device: device.clone(), dtype, blocks: None, calls: Default::default() };
        if mode == WeightsMode::Resident {
            let blocks = (0..folder.text_encoder.num_layers).map(|i| encoder.load_block(i)).collect::<Result<_, _>>()?;
            encoder.blocks = Some(blocks);
        }
        Ok(encoder)
    }

    /// How many prompts [`encode`](Self::encode) has run the encoder on.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    fn load_block(&self, i: usize) -> Result<T5Block, RuntimeError> {
        let loader = Loader::new(&self.checkpoint, Component::TextEncoder, &self.device, t5_weight_dtype(self.dtype));
        Ok(loader.load(|w| T5Block::load(&w.pp(format!("encoder.block.{i}")), &self.folder.text_encoder))?.0)
    }

    /// Tokenizes as the pipeline does (`max_len` ids each).
    pub fn tokenize(&self, prompts: &[&str], max_len: usize) -> Result<Vec<Tokens>, RuntimeError> {
        Ok(prompts.iter().map(|p| self.tokenizer.encode(p, max_len)).collect::<Result<_, _>>()?)
    }

    /// The prompt embeddings, without attention mask (pad tokens take part, as in the
    /// pipeline).
    ///
    /// # Shapes
    /// - → `[prompts, max_len, d_model]` in the compute dtype (f32 where T5's f16 guards made
    ///   the residual stream f32)
    pub fn encode(&self, prompts: &[&str], max_len: usize, peak: &mut PeakMemory, probe: &mut impl Probe) -> Result<Tensor<3>, RuntimeError> {
        let tokens = self.tokenize(prompts, max_len)?;
        self.calls.set(self.calls.get() + prompts.len());
        let ids: Vec<Vec<u32>> = tokens.into_iter().map(|t| t.input_ids).collect();
        let mut h = self.embedding.embed(&ids, &self.device).cast(self.dtype);
        probe.check(|| "shared".into(), &h);
        let bias = self.embedding.position_bias(max_len, &self.device);
        for i in 0..self.folder.text_encoder.num_layers {
            let name = format!("encoder.block.{i}");
            match &self.blocks {
                Some(blocks) => h = blocks[i].forward(h, &bias, &name, probe),
                None => {
                    let block = self.load_block(i)?;
                    peak.sample(&self.device);
                    h = block.forward(h, &bias, &name, probe);
                    // Free the block before the next one is read.
                    drop(block);
                    peak.sample(&self.device);
                }
            }
        }
        let h = self.embedding.final_norm(h);
        probe.check(|| "encoder.final_layer_norm".into(), &h);
        peak.sample(&self.device);
        Ok(h)
    }
}
