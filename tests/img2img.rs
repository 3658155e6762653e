//! img2img against diffusers' own components (tools/img2img_refs.py): the init image's
//! preprocessing and PIL resize, the VAE encoder (tiny and at the real width), and whole runs
//! at several strengths, sizes and guidance settings.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use cogview_runtime::init_image::{InitImage, resize_lanczos};
use cogview_runtime::models::vae::{Encoder, VaeConfig};
use cogview_runtime::models::{NoProbe, WeightSource};
use cogview_runtime::{Options, Quiet, Request};
use cogview_tests::stages::{IMAGE_TOL, PNG_LEVELS, STEP_LATENTS_TOL, VAE_F32_TOL, f32_pipeline, folder, png_pixels};
use cogview_tests::{Refs, assert_close, fixture, values};

fn init(name: &str) -> PathBuf {
    fixture("img2img").join(name)
}

fn cases(variant: &str) -> serde_json::Value {
    let path = fixture(variant).join("refs/img2img.json");
    serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(path).unwrap()).unwrap()["cases"].clone()
}

/// The request of a reference case, with the reference's noise as its noise.
fn request(variant: &str, case: &str) -> Request {
    let c = &cases(variant)[case];
    let refs = Refs::open(variant, "img2img");
    let mut r = Request::new(c["prompt"].as_str().unwrap());
    r.negative_prompt = c["negative_prompt"].as_str().map(String::from);
    r.steps = c["num_inference_steps"].as_u64().unwrap() as usize;
    r.guidance = c["guidance_scale"].as_f64().unwrap() as f32;
    r.width = c["width"].as_u64().unwrap() as usize;
    r.height = c["height"].as_u64().unwrap() as usize;
    r.max_sequence_length = c["max_sequence_length"].as_u64().unwrap() as usize;
    r.strength = c["strength"].as_f64().unwrap();
    r.init_image = Some(InitImage::open(&init(c["init_image"].as_str().unwrap())).unwrap());
    r.latents = Some(refs.f32(&format!("{case}.noise")));
    r.keep_tensors = true;
    r
}

/// A whole img2img run of `case` against diffusers: the preprocessed image exactly, the init
/// latents, every executed step's latents, the float image and the PNG.
fn run_case(variant: &str, case: &str) {
    let c = &cases(variant)[case];
    let refs = Refs::open(variant, "img2img");
    let req = request(variant, case);
    let image = req.init_image.as_ref().unwrap();
    let image_in = image.preprocess(req.width, req.height);
    assert_eq!(image_in, refs.f32(c["image_in_key"].as_str().unwrap()), "{variant} {case}: preprocessed image");
    assert_eq!(image.sha256, c["init_image_sha256"].as_str().unwrap());
    let out = f32_pipeline(folder(variant), &Device::flex(), Options::default()).generate(&req, &mut Quiet).unwrap();
    let t = out.tensors.unwrap();
    let what = |s: &str| format!("{variant} {case} {s}");
    assert_close(&what("init latents"), &t.init_latents.unwrap().0, &refs.f32(&format!("{case}.init_latents")), VAE_F32_TOL);
    let steps = c["steps_run"].as_u64().unwrap() as usize;
    assert_eq!(t.step_latents.1[0], steps, "{case}: steps run");
    assert_eq!(out.step_seconds.len(), steps);
    if let Some(key) = c["step_latents_key"].as_str() {
        assert_close(&what("step latents"), &t.step_latents.0, &refs.f32(key), STEP_LATENTS_TOL);
    }
    assert_close(&what("image"), &t.image.0, &refs.f32(&format!("{case}.image_pt")), IMAGE_TOL);
    let png = png_pixels(&fixture(variant).join("refs").join(c["png"].as_str().unwrap()));
    let worst = out.rgb.iter().zip(&png).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert_eq!(out.rgb.len(), png.len());
    assert!(worst <= PNG_LEVELS, "{case}: {worst} levels");
}

/// Strengths 0.8, 1 (pure noise), 0.3 without guidance (3 steps), 0.5 with a negative
/// prompt, 0 (no step: the image through the VAE), a resized init image, RGBA and gray.
#[test]
fn img2img_matches_diffusers_base() {
    for case in [
        "st08_s10_g7_64x64",
        "st10_s4_g7_96x64",
        "st03_s10_g1_64x64",
        "st05_s4_g7_64x64_neg",
        "st0_s4_g7_64x64",
        "st06_s5_g7_resize",
        "st07_s4_g7_rgba",
        "st07_s4_g7_gray",
    ] {
        run_case("base", case);
    }
}

#[test]
fn img2img_matches_diffusers_wide() {
    for case in ["st08_s10_g7_64x64", "st10_s4_g7_96x64", "st03_s10_g1_64x64", "st06_s5_g7_resize"] {
        run_case("wide", case);
    }
}

/// The encoder alone: its raw moments `[mean | logvar]`.
#[test]
fn vae_encoder_matches_diffusers() {
    use cogview_runtime::import::{Component, Loader};
    let f = folder("base");
    let (ck, _) = f.open_weights(Component::Vae).unwrap();
    let dev = Device::flex();
    let enc = Loader::new(&ck, Component::Vae, &dev, |_| burn::tensor::DType::F32).load(|w| Encoder::load(w, &f.configs.vae)).unwrap().0;
    let refs = Refs::open("base", "img2img");
    let x = refs.tensor::<4>("st08_s10_g7_64x64.image_in", &dev);
    assert_close("base encoder moments", &values(enc.forward(x.clone(), &mut NoProbe)), &refs.f32("st08_s10_g7_64x64.moments"), VAE_F32_TOL);
    // A tile whose stride covers the whole image (128 px: stride 96) is the untiled encoder.
    assert!(values(enc.forward_tiled(x.clone(), 128, &mut NoProbe)) == values(enc.forward(x, &mut NoProbe)));
}

/// PIL's Lanczos resize, bit for bit: down, up, both at once, an odd size.
#[test]
fn lanczos_resize_is_pils() {
    let refs = Refs::open_file(&init("resize.safetensors"));
    let pairs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(init("resize.json")).unwrap()).unwrap();
    for p in pairs["pairs"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let [w, h] = [0, 1].map(|i| p["input_wh"][i].as_u64().unwrap() as usize);
        let [ow, oh] = [0, 1].map(|i| p["output_wh"][i].as_u64().unwrap() as usize);
        let input = refs.u8(&format!("{name}.input"));
        let want = refs.u8(&format!("{name}.output"));
        let got = resize_lanczos(&input, w, h, ow, oh);
        let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} values differ from PIL", want.len());
    }
}

/// A lossless WebP is the PNG's pixels; a JPEG of it is close; the sha256 is the file's.
#[test]
fn webp_and_jpeg_init_images() {
    let png = InitImage::open(&init("init_64x64.png")).unwrap();
    let webp = InitImage::open(&init("init_64x64.webp")).unwrap();
    assert_eq!((webp.width, webp.height), (64, 64));
    assert_eq!(webp.rgb, png.rgb);
    let jpeg = InitImage::open(&init("init_64x64.jpg")).unwrap();
    let mean_diff = jpeg.rgb.iter().zip(&png.rgb).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / png.rgb.len() as f64;
    // Quality 95 with 4:2:0 chroma on a noisy picture: about 6 levels on average (PIL and the
    // `image` crate decode alike to within rounding), far from an unrelated image's ~80.
    assert!(mean_diff < 12.0, "JPEG differs from its PNG by {mean_diff:.2} levels on average");
    assert_ne!(jpeg.sha256, png.sha256);
}

// ---- the encoder at the real width, with weights made by a formula both sides compute ----

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// `u(key, i)` of tools/img2img_refs.py: uniform in [-1, 1) from the key and the flat index.
fn formula(key: &str, n: usize) -> impl Iterator<Item = f64> {
    let h = fnv1a64(key);
    (0..n as u64).map(move |i| (splitmix64(h ^ i) >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0)
}

/// The weights tools/img2img_refs.py gives diffusers' encoder: biases 0.02·u, norm weights
/// 1 + 0.1·u, conv kernels u·sqrt(3 / fan_in).
struct Formula(String);

impl WeightSource for Formula {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D]) -> Tensor<D> {
        let full = format!("{}.{key}", self.0);
        let n = shape.iter().product();
        let values: Vec<f32> = if full.ends_with(".bias") {
            formula(&full, n).map(|u| (0.02 * u) as f32).collect()
        } else if full.contains("norm") && full.ends_with(".weight") {
            formula(&full, n).map(|u| (1.0 + 0.1 * u) as f32).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            formula(&full, n).map(|u| (u * (3.0 / fan_in as f64).sqrt()) as f32).collect()
        };
        Tensor::from_data(TensorData::new(values, shape), &Device::flex())
    }

    fn pp(&self, prefix: impl std::fmt::Display) -> Self {
        Formula(if self.0.is_empty() { prefix.to_string() } else { format!("{}.{prefix}", self.0) })
    }
}

/// The real VAE's encoder widths (128, 512, 1024, 1024 channels; one resnet per level) at
/// 256²: the same moments as diffusers from the same weights.
#[test]
fn real_width_encoder_matches_diffusers() {
    let refs = Refs::open_file(&init("real_encoder.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(init("real_encoder.json")).unwrap()).unwrap();
    // The formula, checked on the values the script recorded.
    for key in meta["check_keys"].as_object().unwrap().values() {
        let key = key.as_str().unwrap();
        let (prefix, name) = key.rsplit_once('.').unwrap();
        let shape: Vec<usize> = serde_json::from_value(meta["state_dict_keys"][key].clone()).unwrap();
        let w = Formula(prefix.into());
        let got = match shape.as_slice() {
            &[o, i, kh, kw] => values(w.tensor::<4>(name, [o, i, kh, kw])),
            &[n] => values(w.tensor::<1>(name, [n])),
            other => panic!("{key}: shape {other:?}"),
        };
        assert_eq!(&got[..8], refs.f32(&format!("check.{key}")).as_slice(), "{key}");
    }
    let image: Vec<f32> = formula("image", 3 * 256 * 256).map(|u| u as f32).collect();
    assert_eq!(&image[..8], refs.f32("check.image").as_slice());
    let config = VaeConfig { layers_per_block: 1, ..VaeConfig::cogview3_plus_3b() };
    let enc = Encoder::load(&Formula(String::new()), &config);
    let x = Tensor::<4>::from_data(TensorData::new(image, [1, 3, 256, 256]), &Device::flex());
    let moments = values(enc.forward(x, &mut NoProbe));
    assert_close("real-width encoder moments at 256²", &moments, &refs.f32("moments"), VAE_F32_TOL);
}
