//! The prompt tokenizer and the T5 encoder against transformers.

use burn::tensor::{DType, Device};
use cogview_runtime::import::{ModelFolder, PromptTokenizer};
use cogview_runtime::memory::PeakMemory;
use cogview_runtime::models::NoProbe;
use cogview_runtime::text::{TextEncoder, WeightsMode};
use cogview_tests::{Refs, assert_close, fixture, lavapipe, pipeline, values};

/// T5 in f32 against transformers' f32 on the CPU: the same math in another summation order
/// (torch's GEMM vs burn-flex's, and softmax/RMS reductions); measured differences are ~1e-6 of
/// the output scale after 2-3 blocks. 1e-4 leaves room for GPU reduction orders (lavapipe).
const T5_F32_TOL: f32 = 1e-4;
/// bf16 rounds every activation to 8 significant bits (3.9e-3 relative per rounding), through
/// ~10 roundings per block in a different order than torch: measured about 1e-2 of the scale.
const T5_BF16_TOL: f32 = 4e-2;

fn tokens_json(variant: &str) -> serde_json::Value {
    let path = fixture(variant).join("refs").join("tokens.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Ids of ≥ 30 prompts (English, Chinese, emoji, tabs/newlines, repeated spaces, accents, a
/// literal `<extra_id_3>`, empty, far over 224 tokens) equal transformers 5's T5Tokenizer,
/// transformers 4's sentencepiece T5Tokenizer and its T5TokenizerFast, on two tokenizers.
#[test]
fn token_ids_match_transformers_fast_and_sentencepiece() {
    for variant in ["base", "wide"] {
        let refs = tokens_json(variant);
        let prompts: Vec<String> = serde_json::from_value(refs["prompts"].clone()).unwrap();
        assert!(prompts.len() >= 30);
        let dir = pipeline(variant).join("tokenizer");
        let from_spiece = PromptTokenizer::from_spiece(&dir.join("spiece.model"), 100).unwrap();
        let from_json = PromptTokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap();
        for impl_name in ["fast", "slow", "fast4"] {
            let want: Vec<Vec<u32>> = serde_json::from_value(refs["ids"][impl_name].clone()).unwrap();
            for (p, w) in prompts.iter().zip(&want) {
                assert_eq!(&from_spiece.ids(p).unwrap(), w, "{variant} {impl_name}: {p:?}");
                assert_eq!(&from_json.ids(p).unwrap(), w, "{variant} tokenizer.json vs {impl_name}: {p:?}");
            }
        }
        println!("{variant}: {} prompts identical to {}", prompts.len(), refs["versions"]);
    }
}

/// Padding and truncation as the pipeline calls the tokenizer (224 and 16 tokens).
#[test]
fn padded_and_truncated_like_the_pipeline() {
    for variant in ["base", "wide"] {
        let refs = Refs::open(variant, "tokenizer");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("refs/manifest.json")).unwrap()).unwrap();
        let prompts: Vec<String> = serde_json::from_value(manifest["prompts"].clone()).unwrap();
        let tok = PromptTokenizer::from_folder(&pipeline(variant).join("tokenizer")).unwrap();
        for len in [224usize, 16] {
            let ids = refs.i64(&format!("input_ids.len{len}"));
            let mask = refs.i64(&format!("attention_mask.len{len}"));
            for (i, p) in prompts.iter().enumerate() {
                let t = tok.encode(p, len).unwrap();
                let row = i * len..(i + 1) * len;
                assert_eq!(t.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), ids[row.clone()], "{variant} len {len}: {p:?}");
                assert_eq!(t.attention_mask.iter().map(|&x| x as i64).collect::<Vec<_>>(), mask[row], "{variant} len {len}");
                let full = tok.ids(p).unwrap().len() - 1;
                assert_eq!(t.dropped, full.saturating_sub(len - 1));
            }
        }
    }
}

fn encode(variant: &str, device: &Device, dtype: DType, mode: WeightsMode, len: usize) -> (Vec<f32>, PeakMemory) {
    let folder = ModelFolder::open(pipeline(variant).to_str().unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("refs/manifest.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(manifest["prompts"].clone()).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let encoder = TextEncoder::open(&folder, device, dtype, mode).unwrap();
    let mut peak = PeakMemory::default();
    let h = encoder.encode(&prompts, len, &mut peak, &mut NoProbe).unwrap();
    (values(h), peak)
}

/// Embeddings of the five reference prompts (one truncated, one empty, one with `<unk>`s) at
/// 224 and 16 tokens, single-file (base) and sharded (wide) weights.
#[test]
fn prompt_embeddings_match_transformers_f32() {
    for variant in ["base", "wide"] {
        let refs = Refs::open(variant, "text_encoder");
        for len in [224, 16] {
            let (got, _) = encode(variant, &Device::flex(), DType::F32, WeightsMode::Resident, len);
            assert_close(&format!("{variant} T5 f32 len {len}"), &got, &refs.f32(&format!("prompt_embeds.len{len}")), T5_F32_TOL);
        }
    }
}

#[test]
fn streamed_equals_resident() {
    let (resident, _) = encode("wide", &Device::flex(), DType::F32, WeightsMode::Resident, 16);
    let (streamed, _) = encode("wide", &Device::flex(), DType::F32, WeightsMode::Streamed, 16);
    assert_eq!(resident, streamed);
}

/// On the software Vulkan adapter: parity with transformers, streamed == resident, and the
/// streamed peak device memory.
#[test]
fn t5_on_lavapipe() {
    let (_, dev) = lavapipe();
    let refs = Refs::open("base", "text_encoder");
    let (resident, peak_resident) = encode("base", &dev, DType::F32, WeightsMode::Resident, 224);
    assert_close("base T5 f32 on lavapipe", &resident, &refs.f32("prompt_embeds.len224"), T5_F32_TOL);
    let (streamed, peak_streamed) = encode("base", &dev, DType::F32, WeightsMode::Streamed, 224);
    assert_eq!(resident, streamed);
    println!("lavapipe peak device memory: resident {peak_resident:?}, streamed {peak_streamed:?}");
    assert!(peak_streamed.in_use.is_some());
}

/// bf16 (emulated on the CPU backend) against transformers' bf16 pipeline encoding of the first
/// prompt.
#[test]
fn prompt_embeddings_bf16() {
    let refs = Refs::open("base", "dtypes");
    let (got, _) = encode("base", &Device::flex(), DType::BF16, WeightsMode::Resident, 224);
    let first = &got[..224 * 32];
    assert_close("base T5 bf16", first, &refs.f32("bfloat16.prompt_embeds"), T5_BF16_TOL);
}
