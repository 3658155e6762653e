//! The whole pipeline and the VAE against diffusers, from the same weights and initial latents.

use burn::tensor::{DType, Device};
use cogview_runtime::guard::FirstNonFinite;
use cogview_runtime::import::{Component, Loader};
use cogview_runtime::memory::PeakMemory;
use cogview_runtime::models::vae::Decoder;
use cogview_runtime::models::{NoProbe, WeightStorage};
use cogview_runtime::plan::{Residency, WeightsChoice};
use cogview_runtime::text::{TextEncoder, prompt_embeddings};
use cogview_runtime::metadata::Settings;
use cogview_runtime::precision::{ComputeDtype, Precision, PrecisionDecision};
use cogview_runtime::{Options, Pipeline, Quiet};
use cogview_shaders::flash::FlashTiles;
use cogview_tests::stages::{DIT_BF16_TOL, VAE_BF16_PRODUCTS_TOL, VAE_F32_TOL, relative_distance, assert_identical, bf16_copy, decode_case, decode_stored, f32_pipeline, folder, manifest, model, run_case, run_stored};
use cogview_tests::{Refs, assert_close, fixture, target_on, values};

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

/// The VAE decode with its convolutions as bf16 products (emulated on the CPU backend): every
/// stride-1 convolution rounds its input and kernel to bf16: farther from diffusers-f32 than
/// f32's tolerance (the rounding is there), within `VAE_BF16_PRODUCTS_TOL`.
#[test]
fn vae_decode_with_bf16_products() {
    for variant in ["base", "wide"] {
        let (out, want) = decode_stored(variant, "h8w12", &Device::flex(), WeightStorage::Bf16Products);
        let d = relative_distance(&out, &want);
        eprintln!("{variant}: VAE decode with bf16 products {d:.3e} of the scale from diffusers-f32");
        assert!(d > VAE_F32_TOL && d <= VAE_BF16_PRODUCTS_TOL, "{variant}: {d:.2e}");
    }
}

/// diffusers' `encode_prompt`: no negative prompt → zeros; `""` and a text negative prompt are
/// encoded; images per prompt repeat each prompt in place.
#[test]
fn prompt_semantics() {
    let model = model("base");
    let refs = Refs::open("base", "text_encoder");
    let m = manifest("base");
    let prompt = m["text_encoder"]["prompt_for_negative_records"].as_str().unwrap();
    let enc = TextEncoder::load(&model, &Device::flex(), DType::F32, WeightStorage::Compute, Residency::Resident).unwrap();
    let mut peak = PeakMemory::default();
    for (negative, key) in [(None, "none"), (Some(""), "empty"), (Some(m["text_encoder"]["negative_text"].as_str().unwrap()), "text")] {
        let c = prompt_embeddings(&enc, &model, &[prompt], negative, true, 1, 224, &mut peak, &mut FirstNonFinite::default()).unwrap();
        let want = refs.f32(&format!("negative_prompt_embeds.{key}.len224"));
        let got = values(c.uncond.unwrap());
        if negative.is_none() {
            assert!(got.iter().all(|v| *v == 0.0) && want.iter().all(|v| *v == 0.0));
        } else {
            assert_close(&format!("negative {key}"), &got, &want, EMBED_TOL);
        }
    }
    let none = prompt_embeddings(&enc, &model, &[prompt], Some("x"), false, 1, 224, &mut peak, &mut FirstNonFinite::default()).unwrap();
    assert!(none.uncond.is_none(), "no unconditional embedding without guidance");
    let prompts: Vec<String> = serde_json::from_value(m["prompts"].clone()).unwrap();
    let c = prompt_embeddings(&enc, &model, &[&prompts[0], &prompts[1]], None, false, 2, 16, &mut peak, &mut FirstNonFinite::default()).unwrap();
    assert_eq!(c.cond.dims(), [4, 16, 32]);
    assert_close("images per prompt", &values(c.cond), &refs.f32("prompt_embeds.len16.nipp2"), EMBED_TOL);
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
    let dec = Loader::new(&ck, Component::Vae, &dev, |_| DType::F32).load(|w| Decoder::load(w, &f.configs.vae)).unwrap().0;
    let refs = Refs::open("base", "vae_tiled");
    let z = refs.tensor::<4>("latents", &dev).div_scalar(f.configs.vae.scaling_factor);
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
    let whole = values(dec.forward_tiled(refs.tensor::<4>("latents", &dev).div_scalar(f.configs.vae.scaling_factor), 32, &mut NoProbe));
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
    assert_eq!(f32_stored.plan.storage, WeightStorage::Compute);
    let bf16_stored = run_stored(&f, "base", case, &dev, WeightsChoice::Bf16, |_| {});
    assert_eq!(bf16_stored.plan.storage, WeightStorage::Bf16, "{}", bf16_stored.plan.storage_reason);
    assert_identical("bf16-stored vs f32-stored", &f32_stored, &bf16_stored);
    let streamed = run_stored(&f, "base", case, &dev, WeightsChoice::Auto, |p| {
        p.denoise.mode = Residency::Streamed;
        p.text.mode = Residency::Streamed;
    });
    assert_identical("streamed vs resident", &bf16_stored, &streamed);
    // An f32 checkpoint stays in f32 under auto: bf16 would round it.
    let req = cogview_tests::stages::request("base", case);
    let p = f32_pipeline(folder("base"), &dev, Options::default()).plan(&[req]).unwrap();
    assert_eq!(p.storage, WeightStorage::Compute, "{}", p.storage_reason);
}

/// A whole run with bf16 matrix products and attention on f16 tiles (emulated on burn-flex):
/// the plan keeps the matrices for that kernel and says attention holds no scores, the steps stay within the bf16 transformer's tolerance of diffusers-f32
/// (each of the 4 steps moves the latents by a fraction of the DiT output's error), the image
/// is finite, and its metadata says how it was computed.
#[test]
fn a_run_with_bf16_products() {
    let dev = Device::flex();
    let case = "s4_g7_64x96";
    let decision = PrecisionDecision {
        matmul: ComputeDtype::Bf16,
        flash: Some(FlashTiles { head: 16, rows: 128 }),
        reason: "bf16 products and f16-tile attention, emulated".into(),
        ..PrecisionDecision::fixed(Precision::Bf16, ComputeDtype::F32)
    };
    let mut pipeline = Pipeline::load(folder("base"), target_on(&dev, decision), Options::default()).unwrap();
    let req = cogview_tests::stages::request("base", case);
    let out = pipeline.generate(&req, &mut Quiet).unwrap();
    assert_eq!(out.plan.storage, WeightStorage::Bf16Products, "{}", out.plan.storage_reason);
    assert_eq!(out.plan.text_storage(), WeightStorage::Bf16Products);
    assert!(out.plan.report().contains("no score matrix, no head groups"), "{}", out.plan.report());
    assert!(out.fallbacks.is_empty(), "{:?}", out.fallbacks);
    let refs = Refs::open("base", "pipeline");
    let t = out.tensors.as_ref().unwrap();
    assert_close("base bf16 products step latents", &t.step_latents.0, &refs.f32(&format!("{case}.step_latents")), DIT_BF16_TOL);
    assert!(t.image.0.iter().all(|v| v.is_finite()));
    // The image carries the steps' error through a decoder whose convolutions round too:
    // within the sum of both stages' tolerances (measured 7.1e-3).
    let image = relative_distance(&t.image.0, &refs.f32(&format!("{case}.image_pt")));
    assert!(image <= DIT_BF16_TOL + VAE_BF16_PRODUCTS_TOL, "image {image:.2e} from diffusers-f32");
    let settings = Settings::new(&req, &out, "base", pipeline.target());
    assert_eq!(settings.precision_summary(), "f32, bf16 matrix products, f16-tile attention");
    // A1111 quotes a value with a comma in it.
    assert!(settings.parameters().contains("Precision: \"f32, bf16 matrix products, f16-tile attention\""), "{}", settings.parameters());
}

/// A batch runs each stage once for all its images: 3 prompts × 2 seeds encode 3 prompts, and
/// each image is the one its request gives alone.
#[test]
fn batch_encodes_each_prompt_once() {
    use cogview_runtime::Request;
    use cogview_runtime::batch::{expand, parse_prompts};
    let lines = parse_prompts("a red apple\n{\"prompt\": \"a green pear\", \"seed\": 100}\n{\"prompt\": \"a plum\", \"negative_prompt\": \"blurry\"}").unwrap();
    let mut defaults = Request::new("");
    (defaults.steps, defaults.width, defaults.height, defaults.seed) = (2, 64, 64, 7);
    let items = expand(&lines, 2, &defaults);
    let requests: Vec<Request> = items.iter().map(|i| i.request.clone()).collect();
    let mut pipeline = f32_pipeline(folder("base"), &Device::flex(), Options::default());
    let batch = pipeline.generate_batch(&requests, &mut Quiet).unwrap();
    // The plum's negative prompt is encoded too: 3 prompts + 1 negative prompt.
    assert_eq!(batch.encoder_calls, 4);
    assert_eq!(batch.outputs.len(), 6);
    let alone = pipeline.generate(&requests[3], &mut Quiet).unwrap();
    assert_eq!(batch.outputs[3].rgb, alone.rgb, "batched == alone");
    assert_ne!(batch.outputs[2].rgb, batch.outputs[3].rgb, "seeds 100 and 101 differ");
}

/// A request of the base fixture: 2 steps at 64x64.
fn small(prompt: &str, seed: u64) -> cogview_runtime::Request {
    let mut r = cogview_runtime::Request::new(prompt);
    (r.steps, r.width, r.height, r.seed) = (2, 64, 64, seed);
    r
}

/// One loaded pipeline makes two images and reads its weights from disk once: with
/// `keep_loaded`, every component stays on the device after its stage (the tiny model fits).
/// Without it each run reads them again. Both give the images a fresh pipeline gives.
#[test]
fn a_loaded_pipeline_reads_its_weights_once() {
    let dev = Device::flex();
    let mut kept = f32_pipeline(folder("base"), &dev, Options { keep_loaded: true, ..Options::default() });
    assert_eq!(kept.bytes_read(), 0, "nothing is read before a stage needs it");
    let plan = kept.plan(&[small("a red apple", 1)]).unwrap();
    assert!(plan.keep.text && plan.keep.transformer && plan.keep.vae, "{:?}", plan.keep);
    let a = kept.generate(&small("a red apple", 1), &mut Quiet).unwrap();
    let first = kept.bytes_read();
    assert!(first > 0);
    let b = kept.generate(&small("a green pear", 2), &mut Quiet).unwrap();
    assert_eq!(kept.bytes_read(), first, "the second image read nothing from disk");

    let mut one_shot = f32_pipeline(folder("base"), &dev, Options::default());
    let a2 = one_shot.generate(&small("a red apple", 1), &mut Quiet).unwrap();
    assert_eq!(one_shot.bytes_read(), first, "a run reads each weight once");
    let b2 = one_shot.generate(&small("a green pear", 2), &mut Quiet).unwrap();
    assert_eq!(one_shot.bytes_read(), 2 * first, "without keep_loaded each run reads them again");
    assert_eq!(a.rgb, a2.rgb);
    assert_eq!(b.rgb, b2.rgb);
    assert_ne!(a.rgb, b.rgb);
}

/// A caller that cancels once the denoising has done `after` steps.
struct CancelAfter {
    after: usize,
    stage: Option<cogview_runtime::Stage>,
    done: usize,
}

impl cogview_runtime::Progress for CancelAfter {
    fn stage(&mut self, stage: cogview_runtime::Stage, _steps: usize) {
        (self.stage, self.done) = (Some(stage), 0);
    }
    fn step(&mut self, done: usize, _elapsed: std::time::Duration) {
        self.done = done;
    }
    fn cancelled(&self) -> bool {
        self.stage == Some(cogview_runtime::Stage::Transformer) && self.done >= self.after
    }
}

/// A cancelled request stops before its next step with an error saying where, and the
/// pipeline goes on serving.
#[test]
fn a_cancelled_request_stops_between_steps() {
    use cogview_runtime::{RuntimeError, Stage};
    let mut p = f32_pipeline(folder("base"), &Device::flex(), Options { keep_loaded: true, ..Options::default() });
    let mut r = small("a red apple", 1);
    r.steps = 4;
    let err = p.generate(&r, &mut CancelAfter { after: 1, stage: None, done: 0 }).unwrap_err();
    assert!(matches!(err, RuntimeError::Cancelled { stage: Stage::Transformer, step: Some(1) }), "{err}");
    assert_eq!(err.to_string(), "cancelled in the transformer before step 1");
    let out = p.generate(&r, &mut Quiet).unwrap();
    assert_eq!(out.step_seconds.len(), 4);
}
