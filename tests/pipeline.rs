//! The whole pipeline and the VAE against diffusers, from the same weights and initial latents.

use burn::tensor::{DType, Device};
use cogview_runtime::import::{Component, Loader, ModelFolder};
use cogview_runtime::memory::PeakMemory;
use cogview_runtime::models::NoProbe;
use cogview_runtime::models::vae::Decoder;
use cogview_runtime::guard::FirstNonFinite;
use cogview_runtime::pipeline::{Guarding, Quiet, Request, generate, prompt_embeddings, to_u8};
use cogview_runtime::precision::{ComputeDtype, Precision, PrecisionDecision};
use cogview_runtime::text::{TextEncoder, WeightsMode};
use cogview_tests::{Refs, assert_close, fixture, lavapipe, pipeline, values};

/// The VAE decoder in f32 against diffusers' f32 on the CPU: convolutions and GroupNorms in
/// another summation order; measured ~1e-6 of the output scale.
const VAE_F32_TOL: f32 = 1e-4;
/// Step latents after up to 10 steps: each step's DiT differences (~1e-6) pass through the
/// scheduler's linear update and feed the next call; measured ~1e-5 of the scale after 10.
const STEP_LATENTS_TOL: f32 = 1e-4;
/// The float image in [0, 1], after the decoder: the same error as the latents, scaled by
/// the decoder's gain.
const IMAGE_TOL: f32 = 1e-4;
/// 8-bit pixels: a float error of 1e-4 can move a value across a rounding boundary, so a pixel
/// may differ from diffusers' PNG by one level, never more.
const PNG_LEVELS: i32 = 1;
/// Prompt embeddings through `encode_prompt`: as the T5 tolerance.
const EMBED_TOL: f32 = 1e-4;

fn manifest(variant: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("refs/manifest.json")).unwrap()).unwrap()
}

fn folder(variant: &str) -> ModelFolder {
    ModelFolder::open(pipeline(variant).to_str().unwrap()).unwrap()
}

/// The pixels of a reference PNG.
fn png_pixels(path: &std::path::Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn request(variant: &str, case: &str) -> Request {
    let m = &manifest(variant)["pipeline"][case];
    let refs = Refs::open(variant, "pipeline");
    let mut r = Request::new(m["prompt"].as_str().unwrap());
    r.negative_prompt = m["negative_prompt"].as_str().map(String::from);
    r.steps = m["num_inference_steps"].as_u64().unwrap() as usize;
    r.guidance = m["guidance_scale"].as_f64().unwrap() as f32;
    r.height = m["height"].as_u64().unwrap() as usize;
    r.width = m["width"].as_u64().unwrap() as usize;
    r.max_sequence_length = m["max_sequence_length"].as_u64().unwrap() as usize;
    if let Some(o) = m.get("original_size").filter(|o| !o.is_null()) {
        r.original_size = Some([o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize]);
    }
    if let Some(c) = m.get("crops_coords_top_left").filter(|c| !c.is_null()) {
        r.crop_coords = [c[0].as_u64().unwrap() as usize, c[1].as_u64().unwrap() as usize];
    }
    r.latents = Some(refs.f32(&format!("{case}.latents")));
    r.keep_tensors = true;
    r
}

fn run_case(variant: &str, case: &str, device: &Device) {
    let f = folder(variant);
    let req = request(variant, case);
    let guard = Guarding::new(PrecisionDecision::fixed(Precision::F32, ComputeDtype::F32));
    let out = generate(&f, device, &guard, &req, &mut Quiet).unwrap();
    let refs = Refs::open(variant, "pipeline");
    let t = out.tensors.unwrap();
    assert_eq!(t.step_latents.1, refs.shape(&format!("{case}.step_latents")));
    assert_close(&format!("{variant} {case} step latents"), &t.step_latents.0, &refs.f32(&format!("{case}.step_latents")), STEP_LATENTS_TOL);
    assert_close(&format!("{variant} {case} image"), &t.image.0, &refs.f32(&format!("{case}.image_pt")), IMAGE_TOL);
    let png = png_pixels(&fixture(variant).join("refs").join(format!("pipeline.{case}.png")));
    let worst = out.rgb.iter().zip(&png).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    let differing = out.rgb.iter().zip(&png).filter(|(a, b)| a != b).count();
    println!("{variant} {case}: PNG differs by at most {worst} level(s) on {differing} of {} values", png.len());
    assert_eq!(out.rgb.len(), png.len());
    assert!(worst <= PNG_LEVELS, "{worst} levels");
}

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

#[test]
fn pipeline_on_lavapipe() {
    let (_, dev) = lavapipe();
    run_case("base", "s4_g7_64x96", &dev);
}

fn decode_case(variant: &str, case: &str, device: &Device) {
    let f = folder(variant);
    let (ck, _) = f.open_weights(Component::Vae).unwrap();
    let dec = Loader::new(&ck, Component::Vae, device, |_| DType::F32).load(|w| Decoder::load(w, &f.vae)).unwrap().0;
    let refs = Refs::open(variant, "vae");
    let z = refs.tensor::<4>(&format!("{case}.latents"), device).div_scalar(f.vae.scaling_factor);
    let out = dec.forward(z, &mut NoProbe);
    assert_close(&format!("{variant} vae {case}"), &values(out), &refs.f32(&format!("{case}.decoded")), VAE_F32_TOL);
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

#[test]
fn vae_decode_on_lavapipe() {
    let (_, dev) = lavapipe();
    decode_case("wide", "h8w12", &dev);
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
