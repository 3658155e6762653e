//! The text stage: prompts to T5 embeddings, the encoder resident or streamed block by block.
//!
//! Streaming loads one encoder block's weights, runs it, and frees it, so device memory peaks at
//! about one block plus activations (T5-XXL is 19 GB in f32; a block is 0.8 GB). The token table
//! (0.5 GB) stays on the CPU and only the looked-up rows go to the device.

use std::cell::Cell;

use burn::tensor::{DType, Device, Tensor};
use cogview_import::Component;
use cogview_models::t5::{T5Block, T5Embedding};
use cogview_models::{Probe, WeightSource, WeightStorage};

use crate::error::RuntimeError;
use crate::guard::{Call, CallProbe, Guarded, count_nonfinite};
use crate::memory::PeakMemory;
use crate::pipeline::{Model, Run, StageClock, StageStats};
use crate::plan::Residency;
use crate::progress::{Progress, Stage};
use crate::request::Request;

/// The dtype each text-encoder weight is loaded in: the compute dtype, except that under f16
/// the feed-forward output projection `wo` stays in f32 as transformers keeps it
/// (`T5PreTrainedModel._keep_in_fp32_modules`), and the token table, which is looked up on the
/// CPU in f32 (the rows are rounded to the compute dtype on the device, as a lookup in a
/// rounded table would give).
pub fn t5_weight_dtype(compute: DType) -> impl Fn(&str) -> DType + 'static {
    move |key: &str| {
        if key == "shared.weight" || (compute == DType::F16 && key.ends_with("DenseReluDense.wo.weight")) {
            DType::F32
        } else {
            compute
        }
    }
}

/// The T5 encoder, loaded: its token table on the CPU, its blocks on the device when resident.
pub struct TextEncoder {
    embedding: T5Embedding,
    /// The blocks, when resident.
    blocks: Option<Vec<T5Block>>,
    device: Device,
    dtype: DType,
    /// How the blocks' matrices are kept: the compute dtype, or bf16 for bf16 matrix products.
    storage: WeightStorage,
    /// Prompts encoded so far.
    calls: Cell<usize>,
}

impl TextEncoder {
    /// Loads the token table on the CPU, and in resident mode every block on `device`, the
    /// blocks' matrices kept in `storage` (the compute dtype, or bf16 for bf16 matrix products).
    pub fn load(model: &Model, device: &Device, dtype: DType, storage: WeightStorage, mode: Residency) -> Result<Self, RuntimeError> {
        let t5 = &model.configs.text_encoder;
        let embedding = model.load(Component::TextEncoder, &Device::flex(), t5_weight_dtype(dtype), WeightStorage::Compute, |w| {
            T5Embedding::load(w, t5)
        })?;
        let mut encoder = Self { embedding, blocks: None, device: device.clone(), dtype, storage, calls: Cell::new(0) };
        if mode == Residency::Resident {
            encoder.blocks = Some((0..t5.num_layers).map(|i| encoder.load_block(model, i)).collect::<Result<_, _>>()?);
        }
        Ok(encoder)
    }

    pub fn mode(&self) -> Residency {
        if self.blocks.is_some() { Residency::Resident } else { Residency::Streamed }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn storage(&self) -> WeightStorage {
        self.storage
    }

    /// How many prompts [`encode`](Self::encode) has run the encoder on.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    fn load_block(&self, model: &Model, i: usize) -> Result<T5Block, RuntimeError> {
        let t5 = &model.configs.text_encoder;
        model.load(Component::TextEncoder, &self.device, t5_weight_dtype(self.dtype), self.storage, |w| {
            T5Block::load(&w.pp(format!("encoder.block.{i}")), t5)
        })
    }

    /// The prompt embeddings, without attention mask (pad tokens take part, as in the
    /// pipeline).
    ///
    /// # Shapes
    /// - → `[prompts, max_len, d_model]` in the compute dtype (f32 where T5's f16 guards made
    ///   the residual stream f32)
    pub fn encode(&self, model: &Model, prompts: &[&str], max_len: usize, peak: &mut PeakMemory, probe: &mut impl Probe) -> Result<Tensor<3>, RuntimeError> {
        let ids = prompts
            .iter()
            .map(|p| Ok(model.source.tokenize(p, max_len, &model.configs)?.input_ids))
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        self.calls.set(self.calls.get() + prompts.len());
        let mut h = self.embedding.embed(&ids, &self.device).cast(self.dtype);
        probe.check(|| "shared".into(), &h);
        let bias = self.embedding.position_bias(max_len, &self.device);
        for i in 0..model.configs.text_encoder.num_layers {
            let name = format!("encoder.block.{i}");
            match &self.blocks {
                Some(blocks) => h = blocks[i].forward(h, &bias, &name, probe),
                None => {
                    let block = self.load_block(model, i)?;
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

/// diffusers' `encode_prompt`: each prompt's embedding repeated `per_prompt` times (p0, p0, p1,
/// p1, ...); with guidance, the unconditional embedding: zeros when there is no negative prompt,
/// the encoded negative prompt (even `""`) otherwise, broadcast to every prompt.
///
/// # Shapes
/// - → `(cond [B·N, L, D], uncond [B·N, L, D] when cfg)`
#[allow(clippy::too_many_arguments)]
pub fn prompt_embeddings(
    encoder: &TextEncoder,
    model: &Model,
    prompts: &[&str],
    negative: Option<&str>,
    cfg: bool,
    per_prompt: usize,
    max_len: usize,
    peak: &mut PeakMemory,
    probe: &mut impl Probe,
) -> Result<Conditioning, RuntimeError> {
    let repeat = |t: Tensor<3>| {
        let [b, l, d] = t.dims();
        t.unsqueeze_dim::<4>(1).expand([b, per_prompt, l, d]).reshape([b * per_prompt, l, d])
    };
    let cond = repeat(encoder.encode(model, prompts, max_len, peak, probe)?);
    let uncond = match (negative, cfg) {
        (_, false) => None,
        (None, true) => Some(cond.zeros_like()),
        (Some(n), true) => {
            let negatives = vec![n; prompts.len()];
            Some(repeat(encoder.encode(model, &negatives, max_len, peak, probe)?))
        }
    };
    Ok(Conditioning { cond, uncond })
}

/// What the transformer is conditioned on for one image: the prompt embedding and, with
/// guidance, the unconditional one.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// `[1, L, d_model]`
    pub cond: Tensor<3>,
    /// `[1, L, d_model]`, with guidance only.
    pub uncond: Option<Tensor<3>>,
}

/// What the text stage gave: one conditioning per request, and how many prompts the encoder
/// ran on.
pub struct Encoded {
    pub conditionings: Vec<Conditioning>,
    pub encoder_calls: usize,
    pub stats: StageStats,
}

/// The text stage of a run: each distinct (prompt, negative prompt, length) encoded once, as
/// [`prompt_embeddings`] does it, under the guard (a non-finite result under `auto` below f32
/// is redone in f32 with a streamed encoder). `kept` is the encoder a previous run left loaded;
/// the encoder is left there again when the plan keeps it.
pub(crate) fn encode_prompts(run: &mut Run<impl Progress>, kept: &mut Option<TextEncoder>, requests: &[Request]) -> Result<Encoded, RuntimeError> {
    let clock = StageClock::start(run.model);
    let compute = run.compute();
    let mode = run.plan.text.mode;
    let storage = run.plan.text_storage();
    // Each distinct (prompt, negative prompt when guided, length); guided when any of its
    // requests is (the unconditional half is only used by those).
    fn key(r: &Request) -> (&str, Option<&str>, usize) {
        (r.prompt.as_str(), r.negative_prompt.as_deref().filter(|_| r.cfg()), r.max_sequence_length)
    }
    let mut keys: Vec<(&str, Option<&str>, usize)> = Vec::new();
    for r in requests {
        if !keys.contains(&key(r)) {
            keys.push(key(r));
        }
    }
    run.progress.stage(Stage::Text, keys.len());
    let device = &run.target.device;
    let mut peak = PeakMemory::default();
    // What the streamed blocks sample inside a call (the probe samples between modules).
    let mut streamed_peak = PeakMemory::default();
    let mut encoder = match kept.take() {
        Some(e) if e.mode() == mode && e.dtype() == compute && e.storage() == storage => e,
        _ => TextEncoder::load(run.model, device, compute, storage, mode)?,
    };
    let mut encoder_calls = 0;
    let embeddings = 'stage: loop {
        let mut done = Vec::new();
        for (i, &(prompt, negative, len)) in keys.iter().enumerate() {
            run.check_cancelled(Stage::Text, None)?;
            let cfg = requests.iter().any(|r| key(r) == (prompt, negative, len) && r.cfg());
            let at = Call { stage: Stage::Text, step: None, dtype: encoder.dtype() };
            let embed = |probe: &mut CallProbe<'_>| prompt_embeddings(&encoder, run.model, &[prompt], negative, cfg, 1, len, &mut streamed_peak, probe);
            let count = |c: &Conditioning| count_nonfinite(&c.cond) + c.uncond.as_ref().map_or(0, count_nonfinite);
            let memory = run.sample_modules.then_some(&mut peak);
            match run.guard.run(at, device, memory, &mut run.fallbacks, embed, count)? {
                Guarded::Finite(c, _) => done.push(c),
                Guarded::RedoInF32 => {
                    encoder_calls += encoder.calls();
                    encoder = TextEncoder::load(run.model, device, DType::F32, WeightStorage::Compute, Residency::Streamed)?;
                    continue 'stage;
                }
            }
            run.progress.step(i + 1, clock.elapsed());
        }
        break done;
    };
    encoder_calls += encoder.calls();
    peak.merge(streamed_peak);
    peak.sample(device);
    let conditionings = requests
        .iter()
        .map(|r| {
            let mut c = embeddings[keys.iter().position(|k| *k == key(r)).expect("every request has its key")].clone();
            if !r.cfg() {
                c.uncond = None;
            }
            c
        })
        .collect();
    let keep = run.plan.keep.text && encoder.dtype() == compute;
    run.release(kept, encoder, keep);
    Ok(Encoded { conditionings, encoder_calls, stats: clock.stats(run.model, peak) })
}
