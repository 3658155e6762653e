//! The T5 prompt tokenizer, built as an HF `tokenizers` Unigram tokenizer from `spiece.model`.
//!
//! The real checkpoint ships only `spiece.model` (no `tokenizer.json`). transformers 5 builds its
//! `T5Tokenizer` the same way (`src/transformers/models/t5/tokenization_t5.py`): the
//! sentencepiece pieces and scores as a Unigram vocabulary followed by the `extra_ids` sentinel
//! tokens (`<extra_id_99>` first, so `<extra_id_0>` is the last id), unk from the trainer spec,
//! no byte fallback; the model's precompiled charsmap as normalizer; whitespace split then
//! Metaspace (`▁`, always prepended); `</s>` appended. When a folder has a `tokenizer.json` it
//! can be used instead; the tests show both give the same ids.
//!
//! Padding and truncation follow the pipeline's call (`padding="max_length", truncation=True`):
//! at most `max_len - 1` prompt tokens, then `</s>`, then `<pad>` up to `max_len`.

use std::path::{Path, PathBuf};

use sentencepiece_model::{SentencePieceModel, Type};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::ImportError;

/// One prompt, tokenized as the pipeline does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `max_len` ids: prompt, `</s>`, padding.
    pub input_ids: Vec<u32>,
    /// 1 for the prompt and `</s>`, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Prompt tokens cut by truncation.
    pub dropped: usize,
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    eos_id: u32,
    source: PathBuf,
}

impl PromptTokenizer {
    /// The tokenizer of a pipeline's `tokenizer/` folder: from `spiece.model` (what the real
    /// checkpoint has), else from `tokenizer.json`.
    pub fn from_folder(dir: &Path) -> Result<Self, ImportError> {
        let spiece = dir.join("spiece.model");
        if spiece.is_file() {
            return Self::from_spiece(&spiece, extra_ids(dir)?);
        }
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        Err(ImportError::file(dir, "neither spiece.model nor tokenizer.json: the tokenizer is missing"))
    }

    /// Builds the tokenizer from a sentencepiece model, with `extra_ids` sentinel tokens.
    pub fn from_spiece(path: &Path, extra_ids: usize) -> Result<Self, ImportError> {
        let bad = |m: String| ImportError::file(path, m);
        let bytes = std::fs::read(path).map_err(|e| ImportError::io(path, e))?;
        let sp = SentencePieceModel::from_slice(&bytes).map_err(|e| bad(format!("not a sentencepiece model: {e}")))?;
        if sp.pieces().is_empty() {
            return Err(bad("the sentencepiece model has no pieces".into()));
        }
        let trainer = sp.trainer();
        let id = |v: Option<i32>, default: i32| v.unwrap_or(default);
        let unk = id(trainer.map(|t| t.unk_id()), 2);
        let pad = id(trainer.map(|t| t.pad_id()), 0);
        let eos = id(trainer.map(|t| t.eos_id()), 1);
        let piece_of = |i: i32| {
            usize::try_from(i).ok().and_then(|i| sp.pieces().get(i)).map(|p| p.piece().to_string())
        };
        let (Some(unk_token), Some(pad_token), Some(eos_token)) = (piece_of(unk), piece_of(pad), piece_of(eos)) else {
            return Err(bad(format!("unk/pad/eos ids {unk}/{pad}/{eos} are not pieces of the model")));
        };
        let mut vocab: Vec<(String, f64)> =
            sp.pieces().iter().map(|p| (p.piece().to_string(), f64::from(p.score()))).collect();
        let sentinels: Vec<String> = (0..extra_ids).rev().map(|i| format!("<extra_id_{i}>")).collect();
        vocab.extend(sentinels.iter().map(|s| (s.clone(), 0.0)));
        let model = Unigram::from(vocab, Some(unk as usize), false).map_err(|e| bad(e.to_string()))?;

        let mut tokenizer = Tokenizer::new(model);
        let charsmap = sp.model().normalizer_spec.as_ref().map(|n| n.precompiled_charsmap().to_vec()).unwrap_or_default();
        if !charsmap.is_empty() {
            let normalizer = Precompiled::from(&charsmap).map_err(|e| bad(format!("bad precompiled charsmap: {e}")))?;
            tokenizer.with_normalizer(Some(normalizer));
        }
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            WhitespaceSplit.into(),
            Metaspace::new('▁', PrependScheme::Always, true).into(),
        ])));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::Always, true)));
        let template = TemplateProcessing::builder()
            .try_single(format!("$A {eos_token}"))
            .and_then(|b| b.try_pair(format!("$A {eos_token} $B {eos_token}")))
            .map_err(|e| bad(e.to_string()))?
            .special_tokens(vec![(eos_token.clone(), eos as u32)])
            .build()
            .map_err(|e| bad(e.to_string()))?;
        tokenizer.with_post_processor(Some(template));
        // Control and unknown pieces, and the sentinels, are special: matched whole, before
        // normalization, never split by the model.
        let mut special: Vec<AddedToken> = sp
            .pieces()
            .iter()
            .filter(|p| matches!(p.r#type(), Type::Control | Type::Unknown | Type::UserDefined))
            .map(|p| AddedToken::from(p.piece().to_string(), true))
            .collect();
        special.extend([&pad_token, &eos_token, &unk_token].map(|t| AddedToken::from(t.clone(), true)));
        special.extend(sentinels.into_iter().map(|s| AddedToken::from(s, true)));
        tokenizer.add_special_tokens(&special);
        Ok(Self { tokenizer, pad_id: pad as u32, eos_id: eos as u32, source: path.to_path_buf() })
    }

    /// Loads a `tokenizer.json` (pad `<pad>`, eos `</s>`, as T5 names them).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, ImportError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| ImportError::file(path, e))?;
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| ImportError::file(path, format!("no `{t}` token")));
        let (pad_id, eos_id) = (id("<pad>")?, id("</s>")?);
        Ok(Self { tokenizer, pad_id, eos_id, source: path.to_path_buf() })
    }

    /// The file it was built from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The ids of `prompt` with `</s>`, untruncated and unpadded.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>, ImportError> {
        let enc = self.tokenizer.encode(prompt, true).map_err(|e| ImportError::file(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `prompt` padded and truncated to `max_len` as the pipeline does; warns when tokens are
    /// dropped.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Tokens, ImportError> {
        let mut ids = self.ids(prompt)?;
        // The post-processor appended `</s>`; truncation keeps room for it.
        let content = ids.len().saturating_sub(1);
        let keep = content.min(max_len.saturating_sub(1));
        let dropped = content - keep;
        if dropped > 0 {
            tracing::warn!(
                "the prompt is {content} tokens long; the text encoder takes {} (--max-sequence-length {max_len}): \
                 the last {dropped} were dropped",
                max_len - 1
            );
            ids.truncate(keep);
            ids.push(self.eos_id);
        }
        let used = ids.len().min(max_len);
        let mut attention_mask = vec![1; used];
        ids.truncate(max_len);
        ids.resize(max_len, self.pad_id);
        attention_mask.resize(max_len, 0);
        Ok(Tokens { input_ids: ids, attention_mask, dropped })
    }
}

/// `extra_ids` from `tokenizer_config.json` (T5Tokenizer's default, 100, when absent).
fn extra_ids(dir: &Path) -> Result<usize, ImportError> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(100);
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ImportError::config(&path, format!("not valid JSON: {e}")))?;
    Ok(v.get("extra_ids").and_then(|e| e.as_u64()).map_or(100, |e| e as usize))
}
