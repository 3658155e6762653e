//! The prompt tokenizer and the T5 encoder against transformers.

use burn::tensor::{DType, Device};
use cogview_runtime::import::PromptTokenizer;
use cogview_runtime::models::WeightStorage;
use cogview_runtime::plan::Residency;
use cogview_tests::stages::{T5_BF16_TOL, T5_F32_TOL, encode, encode_stored, relative_distance};
use cogview_tests::{Refs, assert_close, fixture, pipeline};


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


/// Embeddings of the five reference prompts (one truncated, one empty, one with `<unk>`s) at
/// 224 and 16 tokens, single-file (base) and sharded (wide) weights.
#[test]
fn prompt_embeddings_match_transformers_f32() {
    for variant in ["base", "wide"] {
        let refs = Refs::open(variant, "text_encoder");
        for len in [224, 16] {
            let (got, _) = encode(variant, &Device::flex(), DType::F32, Residency::Resident, len);
            assert_close(&format!("{variant} T5 f32 len {len}"), &got, &refs.f32(&format!("prompt_embeds.len{len}")), T5_F32_TOL);
        }
    }
}

#[test]
fn streamed_equals_resident() {
    let (resident, _) = encode("wide", &Device::flex(), DType::F32, Residency::Resident, 16);
    let (streamed, _) = encode("wide", &Device::flex(), DType::F32, Residency::Streamed, 16);
    assert_eq!(resident, streamed);
}

/// bf16 (emulated on the CPU backend) against transformers' bf16 pipeline encoding of the first
/// prompt.
#[test]
fn prompt_embeddings_bf16() {
    let refs = Refs::open("base", "dtypes");
    let (got, _) = encode("base", &Device::flex(), DType::BF16, Residency::Resident, 224);
    let first = &got[..224 * 32];
    assert_close("base T5 bf16", first, &refs.f32("bfloat16.prompt_embeds"), T5_BF16_TOL);
}

/// bf16 matrix products (f32 elsewhere; emulated on the CPU backend) against transformers'
/// bf16 encoding within the bf16 tolerance, and no farther from transformers' f32 than that
/// bf16 encoding is (only the products' inputs are rounded), yet not the f32 result.
#[test]
fn prompt_embeddings_with_bf16_products() {
    let refs = Refs::open("base", "dtypes");
    let f32_refs = Refs::open("base", "text_encoder");
    let (got, _) = encode_stored("base", &Device::flex(), DType::F32, WeightStorage::Bf16Products, Residency::Resident, 224);
    let first = &got[..224 * 32];
    let bf16_ref = refs.f32("bfloat16.prompt_embeds");
    assert_close("base T5 bf16 products", first, &bf16_ref, T5_BF16_TOL);
    let f32_ref = f32_refs.f32("prompt_embeds.len224");
    let f32_first = &f32_ref[..224 * 32];
    let (products, full_bf16) = (relative_distance(first, f32_first), relative_distance(&bf16_ref, f32_first));
    eprintln!("T5: bf16 products {products:.2e} of the scale from f32; transformers-bf16 {full_bf16:.2e}");
    assert!(products <= full_bf16 && products >= full_bf16 / 20.0, "{products:.2e} vs {full_bf16:.2e}");
}
