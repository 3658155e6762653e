//! The whole pipeline and the VAE against diffusers, from the same weights and initial latents.

use burn::tensor::{DType, Device};
use cogview_runtime::guard::FirstNonFinite;
use cogview_runtime::import::{Component, Loader};
use cogview_runtime::memory::PeakMemory;
use cogview_runtime::models::NoProbe;
use cogview_runtime::models::vae::Decoder;
use cogview_runtime::pipeline::{prompt_embeddings, to_u8};
use cogview_runtime::text::{TextEncoder, WeightsMode};
use cogview_runtime::pipeline::plan;
use cogview_runtime::plan::{WeightStorageName, WeightsChoice};
use cogview_tests::stages::{VAE_F32_TOL, assert_identical, bf16_copy, decode_case, folder, manifest, run_case, run_stored};
use cogview_tests::{Refs, assert_close, fixture, values};

/// Prompt embeddings through `encode_prompt`: as the T5 tolerance.
const EMBED_TOL: f32 = 1e-4;






/// 4 and 10 steps, guidance 7 and 1 (no CFG), square and non-square, a negative prompt,
/// max_sequence_length 16, non-default size conditioning; on two fixture pipelines.
#[test]
fn pipeline_matches_diffusers_base() {
    for case in ["s4_g7_64x64", "s4_g1_64x96", "s10_g7_64x96", "s4_g7_64x64_neg", "s4_g5_64x96_msl16", "s4_g7_96x64_cond"] {
        run_case("base", case, &Device::flex());
    }
}

#[test]
fn pipeline_matches_diffusers_wide() {
    for case in ["s4_g7_64x96", "s10_g1_64x64", "s4_g7_64x64_neg", "s4_g7_96x64_cond"] {
        run_case("wide", case, &Device::flex());
    }
}


/// VAE decode alone, two latent sizes, both fixtures (scaling factors 0.18215 and 1.0).
#[test]
fn vae_decode_matches_diffusers() {
    for variant in ["base", "wide"] {
        for case in ["h8w8", "h8w12"] {
            decode_case(variant, case, &Device::flex());
        }
    }
}

/// diffusers' `encode_prompt`: no negative prompt → zeros; `""` and a text negative prompt are
/// encoded; images per prompt repeat each prompt in place.
#[test]
fn prompt_semantics() {
    let f = folder("base");
    let refs = Refs::open("base", "text_encoder");
    let m = manifest("base");
    let prompt = m["text_encoder"]["prompt_for_negative_records"].as_str().unwrap();
    let enc = TextEncoder::open(&f, &Device::flex(), DType::F32, WeightsMode::Resident).unwrap();
    let mut peak = PeakMemory::default();
    for (negative, key) in [(None, "none"), (Some(""), "empty"), (Some(m["text_encoder"]["negative_text"].as_str().unwrap()), "text")] {
        let (_, uncond) = prompt_embeddings(&enc, &[prompt], negative, true, 1, 224, &mut peak, &mut FirstNonFinite::default()).unwrap();
        let want = refs.f32(&format!("negative_prompt_embeds.{key}.len224"));
        let got = values(uncond.unwrap());
        if negative.is_none() {
            assert!(got.iter().all(|v| *v == 0.0) && want.iter().all(|v| *v == 0.0));
        } else {
            assert_close(&format!("negative {key}"), &got, &want, EMBED_TOL);
        }
    }
    let (_, none) = prompt_embeddings(&enc, &[prompt], Some("x"), false, 1, 224, &mut peak, &mut FirstNonFinite::default()).unwrap();
    assert!(none.is_none(), "no unconditional embedding without guidance");
    let prompts: Vec<String> = serde_json::from_value(m["prompts"].clone()).unwrap();
    let (cond, _) = prompt_embeddings(&enc, &[&prompts[0], &prompts[1]], None, false, 2, 16, &mut peak, &mut FirstNonFinite::default()).unwrap();
    assert_eq!(cond.dims(), [4, 16, 32]);
    assert_close("images per prompt", &values(cond), &refs.f32("prompt_embeds.len16.nipp2"), EMBED_TOL);
}

#[test]
fn rounding_to_8_bits_is_half_to_even() {
    assert_eq!(to_u8(0.5 / 255.0), 0);
    assert_eq!(to_u8(1.5 / 255.0), 2);
    assert_eq!(to_u8(2.5 / 255.0), 2);
    assert_eq!(to_u8(1.0), 255);
    assert_eq!(to_u8(0.0), 0);
}

/// A VAE with what CogView3-Plus's leaves out (mid-block attention, quant and post-quant convs):
/// decode and encode against diffusers.
#[test]
fn vae_with_mid_attention_and_quant_convs() {
    use cogview_runtime::import::Checkpoint;
    use cogview_runtime::import::weights::{KeyRecorder, check};
    use cogview_runtime::models::vae::{Encoder, VaeConfig};
    let dir = fixture("vae_attn");
    let config: VaeConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("vae/config.json")).unwrap()).unwrap();
    config.validate().unwrap();
    let ck = Checkpoint::open(&dir.join("vae")).unwrap();
    let all = KeyRecorder::keys_of(|w| {
        Decoder::load(w, &config);
        Encoder::load(w, &config);
    });
    let report = check(Component::Vae, &ck, &all, &all);
    assert!(report.is_ok() && report.unexpected.is_empty(), "{report}");
    assert!(report.applied.iter().any(|k| k.starts_with("decoder.mid_block.attentions.0.")));
    let dev = Device::flex();
    let loader = Loader::new(&ck, Component::Vae, &dev, |_| DType::F32);
    let refs = cogview_tests::Refs::open_file(&dir.join("refs.safetensors"));
    let dec = loader.load(|w| Decoder::load(w, &config)).unwrap().0;
    let out = dec.forward(refs.tensor::<4>("latents", &dev), &mut NoProbe);
    assert_close("vae_attn decode", &values(out), &refs.f32("decoded"), VAE_F32_TOL);
    let enc = loader.load(|w| Encoder::load(w, &config)).unwrap().0;
    let mean = Encoder::mode(enc.forward(refs.tensor::<4>("image", &dev), &mut NoProbe));
    assert_close("vae_attn encode (mean)", &values(mean), &refs.f32("encoded_mean"), VAE_F32_TOL);
}

/// The tiled decode against diffusers' own (`AutoencoderKL.enable_tiling()`; the fixture's
/// `sample_size` 64 gives 8-latent tiles): 3 × 4 tiles with blended seams, within the untiled
/// decode's tolerance. Against the untiled decode, each tile normalises over itself, so the
/// two differ by what tiling changes, not by rounding: ours must be no further from the
/// untiled decode (in mean |Δ|) than diffusers' tiling is, plus [`VAE_F32_TOL`] of slack.
#[test]
fn tiled_decode_matches_diffusers_tiling() {
    let f = folder("base");
    let dev = Device::flex();
    let (ck, _) = f.open_weights(Component::Vae).unwrap();
    let dec = Loader::new(&ck, Component::Vae, &dev, |_| DType::F32).load(|w| Decoder::load(w, &f.vae)).unwrap().0;
    let refs = Refs::open("base", "vae_tiled");
    let z = refs.tensor::<4>("latents", &dev).div_scalar(f.vae.scaling_factor);
    let tiled = values(dec.forward_tiled(z.clone(), 8, &mut NoProbe));
    let want = refs.f32("tiled");
    assert_close("base vae tiled (8-latent tiles)", &tiled, &want, VAE_F32_TOL);
    let untiled = values(dec.forward(z, &mut NoProbe));
    assert_close("base vae untiled", &untiled, &refs.f32("untiled"), VAE_F32_TOL);
    let mean_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
    let ours = mean_diff(&tiled, &untiled);
    let theirs = mean_diff(&want, &refs.f32("untiled"));
    println!("mean |tiled − untiled|: ours {ours:.4e}, diffusers {theirs:.4e}");
    assert!(ours <= theirs + VAE_F32_TOL as f64, "tiling moved the decode by {ours:.4e} on average, diffusers' by {theirs:.4e}");
    // A tile as large as the latents is the untiled decode.
    let whole = values(dec.forward_tiled(refs.tensor::<4>("latents", &dev).div_scalar(f.vae.scaling_factor), 32, &mut NoProbe));
    assert_eq!(whole, untiled);
}

/// The weight storages and the streamed transformer change where weights live, not what is
/// computed: on a fixture whose transformer and VAE hold bf16 values (as the real checkpoints
/// do), f32 storage, bf16 storage and a streamed transformer give bit-identical runs.
#[test]
fn storage_modes_and_streaming_are_bit_identical() {
    let dev = Device::flex();
    let case = "s4_g7_64x96";
    let (_dir, f) = bf16_copy("base");
    let f32_stored = run_stored(&f, "base", case, &dev, WeightsChoice::F32, |_| {});
    assert_eq!(f32_stored.plan.storage, WeightStorageName::Compute);
    let bf16_stored = run_stored(&f, "base", case, &dev, WeightsChoice::Auto, |_| {});
    assert_eq!(bf16_stored.plan.storage, WeightStorageName::Bf16, "{}", bf16_stored.plan.storage_reason);
    assert_identical("bf16-stored vs f32-stored", &f32_stored, &bf16_stored);
    let streamed = run_stored(&f, "base", case, &dev, WeightsChoice::Auto, |p| {
        p.dit_mode = WeightsMode::Streamed;
        p.text_mode = WeightsMode::Streamed;
    });
    assert_identical("streamed vs resident", &bf16_stored, &streamed);
    // An f32 checkpoint stays in f32 under auto: bf16 would round it.
    let req = cogview_tests::stages::request("base", case);
    let p = plan(&folder("base"), &dev, DType::F32, &req).unwrap();
    assert_eq!(p.storage, WeightStorageName::Compute, "{}", p.storage_reason);
}

/// A batch runs each stage once for all its images: 3 prompts × 2 seeds encode 3 prompts, and
/// each image is the one its request gives alone.
#[test]
fn batch_encodes_each_prompt_once() {
    use cogview_runtime::batch::{expand, parse_prompts};
    use cogview_runtime::pipeline::{Guarding, Quiet, Request, generate, generate_batch};
    use cogview_runtime::precision::{ComputeDtype, Precision, PrecisionDecision};
    let f = folder("base");
    let dev = Device::flex();
    let lines = parse_prompts("a red apple\n{\"prompt\": \"a green pear\", \"seed\": 100}\n{\"prompt\": \"a plum\", \"negative_prompt\": \"blurry\"}").unwrap();
    let mut defaults = Request::new("");
    (defaults.steps, defaults.width, defaults.height, defaults.seed) = (2, 64, 64, 7);
    let items = expand(&lines, 2, &defaults);
    let requests: Vec<Request> = items.iter().map(|i| i.request.clone()).collect();
    let guard = Guarding::new(PrecisionDecision::fixed(Precision::F32, ComputeDtype::F32));
    let p = plan(&f, &dev, DType::F32, &requests[0]).unwrap();
    let batch = generate_batch(&f, &dev, &guard, &requests, &p, &mut Quiet).unwrap();
    // The plum's negative prompt is encoded too: 3 prompts + 1 negative prompt.
    assert_eq!(batch.encoder_calls, 4);
    assert_eq!(batch.outputs.len(), 6);
    let alone = generate(&f, &dev, &guard, &requests[3], &p, &mut Quiet).unwrap();
    assert_eq!(batch.outputs[3].rgb, alone.rgb, "batched == alone");
    assert_ne!(batch.outputs[2].rgb, batch.outputs[3].rgb, "seeds 100 and 101 differ");
}
