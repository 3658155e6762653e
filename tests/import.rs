//! Loading the diffusers folder: fixtures made with diffusers (single-file and sharded, f32- and
//! bf16-stored), the real layout's key names, and one test per kind of broken input.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use cogview_runtime::import::weights::check;
use cogview_runtime::import::{Component, ImportError, Loader, ModelFolder};
use cogview_runtime::models::dit::Dit;
use cogview_runtime::models::t5::{T5Block, T5Embedding};
use cogview_runtime::models::{Weight, WeightSource, WeightStorage};
use cogview_runtime::models::vae::Decoder;
use cogview_tests::{copy_dir, edit_json, fixture, pipeline, rewrite_safetensors};

/// The raw bytes of `key` in a safetensors file, read with the `safetensors` crate directly.
fn stored(file: &Path, key: &str) -> (safetensors::Dtype, Vec<u8>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    (t.dtype(), t.data().to_vec())
}

fn open(variant: &str) -> ModelFolder {
    ModelFolder::open(pipeline(variant).to_str().unwrap()).unwrap()
}

#[test]
fn single_file_f32_loads_bit_for_bit() {
    let folder = open("base");
    let dev = Device::flex();
    let (ck, report) = folder.open_weights(Component::Transformer).unwrap();
    assert!(report.is_ok() && report.unexpected.is_empty());
    let loader = Loader::new(&ck, Component::Transformer, &dev, |_| DType::F32);
    let (dit, report) = loader.load(|w| Dit::load(w, &folder.configs.transformer)).unwrap();
    assert_eq!(report.applied.len(), folder.expected_keys(Component::Transformer).len());
    let file = folder.component_dir(Component::Transformer).join("diffusion_pytorch_model.safetensors");
    let (dtype, bytes) = stored(&file, "transformer_blocks.1.ff.net.0.proj.weight");
    assert_eq!(dtype, safetensors::Dtype::F32);
    assert_eq!(dit.blocks[1].ff_proj.weight.get().into_data().as_bytes(), bytes.as_slice());
    let (_, bytes) = stored(&file, "norm_out.linear.bias");
    assert_eq!(dit.embeddings.norm_out_linear.bias.clone().unwrap().into_data().as_bytes(), bytes.as_slice());
}

#[test]
fn sharded_f32_loads_bit_for_bit_and_partially_by_prefix() {
    let folder = open("wide");
    let dev = Device::flex();
    let (ck, _) = folder.open_weights(Component::TextEncoder).unwrap();
    assert!(ck.index.is_some() && ck.files.len() > 1, "the wide fixture is sharded");
    let loader = Loader::new(&ck, Component::TextEncoder, &dev, |_| DType::F32);
    // Only block 2: exactly its keys are read.
    let (block, report) = loader.load(|w| T5Block::load(&w.pp("encoder.block.2"), &folder.configs.text_encoder)).unwrap();
    assert!(report.applied.iter().all(|k| k.starts_with("encoder.block.2.")));
    assert_eq!(report.applied.len(), 9); // q, k, v, o, 2 norms, wi_0, wi_1, wo
    let key = "encoder.block.2.layer.1.DenseReluDense.wo.weight";
    let file = ck.file_of(key).unwrap().path().to_path_buf();
    assert_eq!(block.wo.weight.get().into_data().as_bytes(), stored(&file, key).1.as_slice());
    // The embedding is stored once, as shared.weight.
    let (emb, _) = loader.load(|w| T5Embedding::load(w, &folder.configs.text_encoder)).unwrap();
    let file = ck.file_of("shared.weight").unwrap().path().to_path_buf();
    assert_eq!(emb.shared.into_data().as_bytes(), stored(&file, "shared.weight").1.as_slice());
}

#[test]
fn bf16_stored_loads_as_bf16_exactly_and_widens_to_f32_exactly() {
    let folder = open("overflow");
    let dev = Device::flex();
    let (ck, _) = folder.open_weights(Component::Vae).unwrap();
    let key = "decoder.up_blocks.1.resnets.0.conv1.weight";
    let file = folder.component_dir(Component::Vae).join("diffusion_pytorch_model.safetensors");
    let (dtype, bytes) = stored(&file, key);
    assert_eq!(dtype, safetensors::Dtype::BF16);
    let as_bf16 = Loader::new(&ck, Component::Vae, &dev, |_| DType::BF16);
    let (dec, _) = as_bf16.load(|w| Decoder::load(w, &folder.configs.vae)).unwrap();
    assert_eq!(dec.up_blocks[1].resnets[0].conv1.weight.dtype(), DType::BF16);
    assert_eq!(dec.up_blocks[1].resnets[0].conv1.weight.get().into_data().as_bytes(), bytes.as_slice());
    let widened: Vec<f32> = bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    let as_f32 = Loader::new(&ck, Component::Vae, &dev, |_| DType::F32);
    let (dec, _) = as_f32.load(|w| Decoder::load(w, &folder.configs.vae)).unwrap();
    assert_eq!(dec.up_blocks[1].resnets[0].conv1.weight.get().into_data().try_to_vec::<f32>().unwrap(), widened);
    // Stored as bf16, computed in f32: the stored bytes are the checkpoint's, the weight at use
    // is the same widened f32.
    let bf16_stored = Loader::new(&ck, Component::Vae, &dev, |_| DType::F32).with_storage(WeightStorage::Bf16);
    let (dec, _) = bf16_stored.load(|w| Decoder::load(w, &folder.configs.vae)).unwrap();
    let Weight::Bf16 { stored, compute } = &dec.up_blocks[1].resnets[0].conv1.weight else { panic!("not stored as bf16") };
    assert_eq!((stored.dtype(), *compute), (DType::BF16, DType::F32));
    assert_eq!(stored.clone().into_data().as_bytes(), bytes.as_slice());
    assert_eq!(dec.up_blocks[1].resnets[0].conv1.weight.get().into_data().try_to_vec::<f32>().unwrap(), widened);
}

/// The real checkpoint's key names (tests/fixtures/real, written by tools/real_layout.py from
/// the real configs): the modules ask for exactly these keys, with these shapes.
#[test]
fn real_layout_keys_are_all_mapped() {
    let real = ModelFolder::open(fixture("real").to_str().unwrap()).unwrap();
    for c in Component::ALL {
        let text = std::fs::read_to_string(fixture("real").join(format!("{}.keys.txt", c.name()))).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = text
            .lines()
            .map(|l| {
                let (k, s) = l.split_once(' ').unwrap();
                let shape = s.trim_matches(['[', ']']).split(',').filter(|x| !x.is_empty()).map(|x| x.parse().unwrap()).collect();
                (k.to_string(), shape)
            })
            .collect();
        let mut got = real.expected_keys(c);
        want.sort();
        got.sort();
        let missing: Vec<_> = want.iter().filter(|k| !got.contains(k)).collect();
        let extra: Vec<_> = got.iter().filter(|k| !want.contains(k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{}: not mapped {missing:?}; not in the checkpoint {extra:?}", c.name());
        println!("{}: {} keys mapped", c.name(), got.len());
    }
    assert_eq!(real.expected_keys(Component::Transformer).len(), 436);
    assert_eq!(real.expected_keys(Component::Vae).len(), 288);
}

// ---- bad input: each test breaks one thing in a copy of a fixture ----


/// A writable copy of a fixture pipeline.
fn copy(variant: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    copy_dir(&pipeline(variant), &root);
    (dir, root)
}

/// Opens the folder and all three components' weights; the first error.
fn open_all(root: &Path) -> Result<(), ImportError> {
    let folder = ModelFolder::open(root.to_str().unwrap())?;
    for c in Component::ALL {
        folder.open_weights(c)?;
    }
    Ok(())
}

#[track_caller]
fn fails(root: &Path, names: &[&str]) -> String {
    let msg = open_all(root).expect_err("broken input must fail").to_string();
    println!("{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    for n in names {
        assert!(msg.contains(n), "`{msg}` should name `{n}`");
    }
    msg
}

const DIT: &str = "transformer/diffusion_pytorch_model.safetensors";

/// A safetensors file from raw parts: `header` JSON then `data`.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

#[test]
fn missing_folder() {
    let msg = ModelFolder::open("/nonexistent/cogview-model").unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/cogview-model") && msg.contains("does not exist"), "{msg}");
}

#[test]
fn missing_model_index() {
    let (_d, root) = copy("base");
    std::fs::remove_file(root.join("model_index.json")).unwrap();
    fails(&root, &["model_index.json", "missing"]);
}

#[test]
fn missing_config() {
    let (_d, root) = copy("base");
    std::fs::remove_file(root.join("vae/config.json")).unwrap();
    fails(&root, &["vae/config.json", "missing"]);
}

#[test]
fn invalid_config() {
    let (_d, root) = copy("base");
    std::fs::write(root.join("transformer/config.json"), "{\"patch_size\": 2,").unwrap();
    fails(&root, &["transformer/config.json", "not valid JSON"]);
}

#[test]
fn config_missing_a_required_key_and_unknown_keys_ignored() {
    let (_d, root) = copy("base");
    let path = root.join("transformer/config.json");
    edit_json(&path, |c| c["pooled_projection_dim"] = 1536.into()); // stale key of the real file: ignored
    open_all(&root).unwrap();
    edit_json(&path, |c| {
        c.as_object_mut().unwrap().remove("time_embed_dim");
    });
    fails(&root, &["transformer/config.json", "missing required key `time_embed_dim`"]);
}

#[test]
fn config_cross_field_check() {
    let (_d, root) = copy("base");
    edit_json(&root.join("vae/config.json"), |c| c["norm_num_groups"] = 3.into());
    fails(&root, &["vae/config.json", "not a multiple of norm_num_groups 3"]);
}

#[test]
fn truncated_shard() {
    let (_d, root) = copy("wide");
    let shard = root.join("text_encoder/model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    fails(&root, &["model-00002-of-00003.safetensors", "truncated"]);
}

#[test]
fn header_length_past_end_of_file() {
    let (_d, root) = copy("base");
    let mut bytes = (1u64 << 20).to_le_bytes().to_vec();
    bytes.extend(b"{}");
    std::fs::write(root.join(DIT), bytes).unwrap();
    fails(&root, &[DIT, "header length 1048576 runs past the end"]);
}

#[test]
fn header_not_json() {
    let (_d, root) = copy("base");
    std::fs::write(root.join(DIT), raw("this is not json", &[])).unwrap();
    fails(&root, &[DIT, "not valid safetensors JSON"]);
}

#[test]
fn offsets_out_of_range() {
    let (_d, root) = copy("base");
    std::fs::write(root.join(DIT), raw(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, &[0; 8])).unwrap();
    fails(&root, &[DIT, "truncated", "16 bytes of tensor data, the file holds 8"]);
}

#[test]
fn overlapping_offsets() {
    let (_d, root) = copy("base");
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    std::fs::write(root.join(DIT), raw(header, &[0; 12])).unwrap();
    fails(&root, &[DIT, "overlap"]);
}

#[test]
fn unknown_dtype() {
    let (_d, root) = copy("base");
    std::fs::write(root.join(DIT), raw(r#"{"a":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#, &[0])).unwrap();
    fails(&root, &[DIT, "unknown dtype"]);
}

#[test]
fn non_float_dtype() {
    let (_d, root) = copy("base");
    let folder = ModelFolder::open(root.to_str().unwrap()).unwrap();
    let key = "proj_out.bias";
    // proj_out.bias stored as I32.
    rewrite_safetensors(&root.join(DIT), |(k, t, s, d)| Some((k.clone(), if k == key { safetensors::Dtype::I32 } else { t }, s, d)));
    let (ck, _) = folder.open_weights(Component::Transformer).unwrap();
    let loader = Loader::new(&ck, Component::Transformer, &Device::flex(), |_| DType::F32);
    let msg = loader.load(|w| Dit::load(w, &folder.configs.transformer)).unwrap_err().to_string();
    assert!(msg.contains(DIT) && msg.contains(key) && msg.contains("I32"), "{msg}");
}

#[test]
fn index_names_an_absent_shard() {
    let (_d, root) = copy("wide");
    std::fs::remove_file(root.join("transformer/diffusion_pytorch_model-00003-of-00003.safetensors")).unwrap();
    fails(&root, &["diffusion_pytorch_model.safetensors.index.json", "00003-of-00003", "incomplete"]);
}

#[test]
fn index_key_not_in_its_shard() {
    let (_d, root) = copy("wide");
    let index = root.join("transformer/diffusion_pytorch_model.safetensors.index.json");
    edit_json(&index, |i| i["weight_map"]["proj_out.weight"] = "diffusion_pytorch_model-00001-of-00003.safetensors".into());
    // Only meaningful if proj_out.weight really lives in another shard.
    let bytes = std::fs::read(root.join("transformer/diffusion_pytorch_model-00001-of-00003.safetensors")).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&bytes).unwrap().tensor("proj_out.weight").is_err());
    fails(&root, &["index.json", "proj_out.weight (in diffusion_pytorch_model-00001-of-00003.safetensors)"]);
}

#[test]
fn shape_disagrees_with_config_and_all_problems_listed() {
    let (_d, root) = copy("base");
    edit_json(&root.join("transformer/config.json"), |c| c["time_embed_dim"] = 24.into());
    let msg = fails(&root, &["transformer", "time_condition_embed.timestep_embedder.linear_1.weight (config says [24, 32], file has [16, 32])"]);
    // Every affected key is listed, not the first one only.
    assert!(msg.contains("transformer_blocks.1.norm1.linear.weight") && msg.contains("norm_out.linear.weight"), "{msg}");
}

#[test]
fn missing_and_unexpected_keys_all_listed() {
    let (_d, root) = copy("base");
    rewrite_safetensors(&root.join(DIT), |(k, t, s, d)| match k.as_str() {
        k if k.starts_with("transformer_blocks.1.attn1.to_v.") || k == "proj_out.bias" => None,
        "norm_out.linear.bias" => Some(("norm_out.linear.extra".into(), t, s, d)),
        _ => Some((k, t, s, d)),
    });
    fails(
        &root,
        &["4 missing", "transformer_blocks.1.attn1.to_v.weight", "transformer_blocks.1.attn1.to_v.bias", "proj_out.bias", "norm_out.linear.bias", "1 unexpected: norm_out.linear.extra"],
    );
}

#[test]
fn empty_file() {
    let (_d, root) = copy("base");
    std::fs::write(root.join("vae/diffusion_pytorch_model.safetensors"), b"").unwrap();
    fails(&root, &["vae/diffusion_pytorch_model.safetensors", "empty file"]);
}

#[test]
fn tied_embedding_under_either_name() {
    let (_d, root) = copy("base");
    rewrite_safetensors(&root.join("text_encoder/model.safetensors"), |(k, t, s, d)| {
        Some((if k == "shared.weight" { "encoder.embed_tokens.weight".into() } else { k }, t, s, d))
    });
    let folder = ModelFolder::open(root.to_str().unwrap()).unwrap();
    let (ck, report) = folder.open_weights(Component::TextEncoder).unwrap();
    assert!(report.is_ok(), "{report}");
    let all = folder.expected_keys(Component::TextEncoder);
    assert!(check(Component::TextEncoder, &ck, &all, &all).applied.contains(&"shared.weight".to_string()));
}

/// The presets are the configs they name: the real model's, and the tiny one of the tests'
/// `base` fixture.
#[test]
fn presets_are_the_configs_they_name() {
    use cogview_runtime::models::Configs;
    let real = ModelFolder::open(fixture("real").to_str().unwrap()).unwrap();
    assert_eq!(real.configs, Configs::cogview3_plus_3b());
    let base = ModelFolder::open(pipeline("base").to_str().unwrap()).unwrap();
    assert_eq!(base.configs, Configs::tiny());
}
