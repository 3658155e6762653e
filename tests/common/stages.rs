//! The stage-by-stage comparisons with diffusers, shared by the CPU tests and the lavapipe test,
//! with their tolerances.

use burn::tensor::{DType, Device};
use cogview_runtime::import::{Component, Loader, ModelFolder};
use cogview_runtime::memory::PeakMemory;
use cogview_runtime::models::{NoProbe, WeightStorage};
use cogview_runtime::models::dit::{AttentionLimits, Dit, SizeCondition};
use cogview_runtime::models::vae::Decoder;
use cogview_runtime::pipeline::Model;
use cogview_runtime::plan::{Plan, Residency, WeightsChoice};
use cogview_runtime::precision::{ComputeDtype, Precision, PrecisionDecision};
use cogview_runtime::source::Source;
use cogview_runtime::text::TextEncoder;
use cogview_runtime::{Options, Output, Pipeline, Quiet, Request};
use cogview_shaders::flash::FlashTiles;

use crate::{Refs, assert_close, fixture, pipeline, target_on, values};

/// T5 in f32 against transformers' f32 on the CPU: the same math in another summation order
/// (torch's GEMM vs burn-flex's, and softmax/RMS reductions); measured differences are ~1e-6 of
/// the output scale after 2-3 blocks. 1e-4 leaves room for GPU reduction orders (lavapipe).
pub const T5_F32_TOL: f32 = 1e-4;

/// bf16 rounds every activation to 8 significant bits (3.9e-3 relative per rounding), through
/// ~10 roundings per block in a different order than torch: measured about 1e-2 of the scale.
pub const T5_BF16_TOL: f32 = 4e-2;

/// A fixture's configs and checkpoints, opened.
pub fn model(variant: &str) -> Model {
    let folder = folder(variant);
    Model::new(folder.configs.clone(), Source::folder(folder).unwrap())
}

pub fn encode(variant: &str, device: &Device, dtype: DType, mode: Residency, len: usize) -> (Vec<f32>, PeakMemory) {
    encode_stored(variant, device, dtype, WeightStorage::Compute, mode, len)
}

pub fn encode_stored(variant: &str, device: &Device, dtype: DType, storage: WeightStorage, mode: Residency, len: usize) -> (Vec<f32>, PeakMemory) {
    let model = model(variant);
    let prompts: Vec<String> = serde_json::from_value(manifest(variant)["prompts"].clone()).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let encoder = TextEncoder::load(&model, device, dtype, storage, mode).unwrap();
    let mut peak = PeakMemory::default();
    let h = encoder.encode(&model, &prompts, len, &mut peak, &mut NoProbe).unwrap();
    (values(h), peak)
}

/// One DiT forward in f32 against diffusers' f32 on the CPU: the same math in another
/// summation order (GEMMs, attention, LayerNorm reductions); measured ~1e-6 of the output
/// scale. 1e-4 leaves room for GPU reduction orders.
pub const DIT_F32_TOL: f32 = 1e-4;

/// bf16 rounds every activation and weight to 8 significant bits; against the f32 reference a
/// 2-3 block tiny DiT lands around 1e-2 of the output scale.
pub const DIT_BF16_TOL: f32 = 5e-2;

pub fn load_dit(variant: &str, device: &Device, dtype: DType) -> (ModelFolder, Dit) {
    load_dit_stored(variant, device, dtype, WeightStorage::Compute)
}

pub fn load_dit_stored(variant: &str, device: &Device, dtype: DType, storage: WeightStorage) -> (ModelFolder, Dit) {
    let folder = ModelFolder::open(pipeline(variant).to_str().unwrap()).unwrap();
    let (ck, _) = folder.open_weights(Component::Transformer).unwrap();
    let dit = Loader::new(&ck, Component::Transformer, device, move |_| dtype)
        .with_storage(storage)
        .load(|w| Dit::load(w, &folder.configs.transformer))
        .unwrap()
        .0;
    (folder, dit)
}

/// The DiT with bf16 matrix products and attention on f16 tiles (f32 everywhere else) against
/// diffusers run entirely in bf16 (`tools/bf16_refs.py`).
///
/// Both approximate the f32 result. diffusers-bf16 rounds every activation, norm output and
/// residual to 8 significant bits as well as the products' inputs; on these fixtures it lands
/// 8.4e-3 of the output scale from f32 (recorded in the reference file). bf16 products round
/// only the products' inputs (2^-9 relative each, about 4 products deep per block), so they
/// must land no farther from f32 than diffusers-bf16 does, and the two may differ by at most
/// the sum of both distances: 2 × 8.4e-3, rounded up to 2e-2 (measured: 8.4e-3 and 8.0e-3,
/// with the products 4.3e-3 and 4.4e-3 from f32). A path that forgot to round would pass this
/// (f32 is 8.4e-3 from diffusers-bf16 too) but not the test's lower bound on the distance
/// from f32.
pub const DIT_BF16_PRODUCTS_TOL: f32 = 2e-2;

/// Per case: (distance of bf16 products from f32, distance of diffusers-bf16 from f32), each
/// relative to the f32 output's scale, after asserting the products within
/// [`DIT_BF16_PRODUCTS_TOL`] of diffusers-bf16.
pub fn bf16_products_cases(variant: &str, device: &Device) -> Vec<(f32, f32)> {
    let (_, dit) = load_dit_stored(variant, device, DType::F32, WeightStorage::Bf16Products);
    let refs = Refs::open(variant, "transformer");
    let bf16_refs = Refs::open(variant, "transformer_bf16");
    // With them, attention on f16 tiles (emulated on the CPU backend; `cogview_shaders::flash`).
    let limits = AttentionLimits { flash: Some(FlashTiles { head: 16, rows: 128 }), ..Default::default() };
    ["square", "rect"]
        .iter()
        .map(|case| {
            let t: Vec<f32> = refs.i64(&format!("{case}.timestep")).into_iter().map(|t| t as f32).collect();
            let x = refs.tensor::<4>(&format!("{case}.hidden_states"), device);
            let text = refs.tensor::<3>(&format!("{case}.encoder_hidden_states"), device);
            let out = values(dit.forward(x, text, &t, &sizes(&refs, case), &limits, &mut NoProbe));
            let (f32_ref, bf16_ref) = (refs.f32(&format!("{case}.output")), bf16_refs.f32(&format!("{case}.output")));
            assert_close(&format!("{variant} {case} bf16 products vs diffusers bf16"), &out, &bf16_ref, DIT_BF16_PRODUCTS_TOL);
            (relative_distance(&out, &f32_ref), relative_distance(&bf16_ref, &f32_ref))
        })
        .collect()
}

/// The largest difference of `a` from `reference`, relative to the reference's largest value.
pub fn relative_distance(a: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(reference).fold(0f32, |m, (a, r)| m.max((a - r).abs())) / scale
}

pub fn sizes(refs: &Refs, case: &str) -> Vec<SizeCondition> {
    let (o, c, t) = (refs.f32(&format!("{case}.original_size")), refs.f32(&format!("{case}.crop_coords")), refs.f32(&format!("{case}.target_size")));
    (0..o.len() / 2)
        .map(|i| SizeCondition { original_size: [o[2 * i], o[2 * i + 1]], crop_coords: [c[2 * i], c[2 * i + 1]], target_size: [t[2 * i], t[2 * i + 1]] })
        .collect()
}

/// The cases: `square` latents, 16 text tokens, t = 999/499, default sizes; non-square
/// latents, 224 text tokens, t = 749/0, non-default original size and crop.
pub fn forward_cases(variant: &str, cases: &[&str], device: &Device, dtype: DType, tol: f32) {
    let (_, dit) = load_dit(variant, device, dtype);
    let refs = Refs::open(variant, "transformer");
    for &case in cases {
        let t: Vec<f32> = refs.i64(&format!("{case}.timestep")).into_iter().map(|t| t as f32).collect();
        let sizes = sizes(&refs, case);
        let emb = dit.embeddings.time_embedding(&t, &sizes, device, &mut NoProbe);
        assert_close(&format!("{variant} {case} time_condition_emb {dtype:?}"), &values(emb), &refs.f32(&format!("{case}.time_condition_emb")), tol);
        let x = refs.tensor::<4>(&format!("{case}.hidden_states"), device).cast(dtype);
        let text = refs.tensor::<3>(&format!("{case}.encoder_hidden_states"), device).cast(dtype);
        let out = dit.forward(x, text, &t, &sizes, &AttentionLimits::default(), &mut NoProbe);
        assert_close(&format!("{variant} {case} output {dtype:?}"), &values(out), &refs.f32(&format!("{case}.output")), tol);
    }
}

/// The VAE decoder in f32 against diffusers' f32 on the CPU: convolutions and GroupNorms in
/// another summation order; measured ~1e-6 of the output scale.
pub const VAE_F32_TOL: f32 = 1e-4;

/// The VAE decoder with its convolutions as bf16 products against diffusers' f32: each
/// convolution rounds its input and kernel to bf16, 2 × 2^-9 = 3.9e-3 of its output at worst;
/// the `wide` fixture's decoder is 33 convolutions deep (the real one's depth too), and
/// independent roundings add up as a random walk, √33 × 3.9e-3 = 2.2e-2; doubled, 5e-2
/// (measured 4.5e-3 on `base`, 25 deep, and 1.7e-2 on `wide`).
pub const VAE_BF16_PRODUCTS_TOL: f32 = 5e-2;

/// Step latents after up to 10 steps: each step's DiT differences (~1e-6) pass through the
/// scheduler's linear update and feed the next call; measured ~1e-5 of the scale after 10.
pub const STEP_LATENTS_TOL: f32 = 1e-4;

/// The float image in [0, 1], after the decoder: the same error as the latents, scaled by
/// the decoder's gain.
pub const IMAGE_TOL: f32 = 1e-4;

/// 8-bit pixels: a float error of 1e-4 can move a value across a rounding boundary, so a pixel
/// may differ from diffusers' PNG by one level, never more.
pub const PNG_LEVELS: i32 = 1;

pub fn manifest(variant: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(variant).join("refs/manifest.json")).unwrap()).unwrap()
}

pub fn folder(variant: &str) -> ModelFolder {
    ModelFolder::open(pipeline(variant).to_str().unwrap()).unwrap()
}

/// The pixels of a reference PNG.
pub fn png_pixels(path: &std::path::Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

pub fn request(variant: &str, case: &str) -> Request {
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

/// A fixture's pipeline on `device`, computing in f32.
pub fn f32_pipeline(f: ModelFolder, device: &Device, options: Options) -> Pipeline {
    let target = target_on(device, PrecisionDecision::fixed(Precision::F32, ComputeDtype::F32));
    Pipeline::load(f, target, options).unwrap()
}

pub fn run_case(variant: &str, case: &str, device: &Device) {
    let req = request(variant, case);
    let out = f32_pipeline(folder(variant), device, Options::default()).generate(&req, &mut Quiet).unwrap();
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

pub fn decode_case(variant: &str, case: &str, device: &Device) {
    let (out, want) = decode_stored(variant, case, device, WeightStorage::Compute);
    assert_close(&format!("{variant} vae {case}"), &out, &want, VAE_F32_TOL);
}

/// The VAE decode of a case with its weights stored as `storage` (f32 compute), and diffusers'
/// f32 output.
pub fn decode_stored(variant: &str, case: &str, device: &Device, storage: WeightStorage) -> (Vec<f32>, Vec<f32>) {
    let f = folder(variant);
    let (ck, _) = f.open_weights(Component::Vae).unwrap();
    let dec = Loader::new(&ck, Component::Vae, device, |_| DType::F32).with_storage(storage).load(|w| Decoder::load(w, &f.configs.vae)).unwrap().0;
    let refs = Refs::open(variant, "vae");
    let z = refs.tensor::<4>(&format!("{case}.latents"), device).div_scalar(f.configs.vae.scaling_factor);
    (values(dec.forward(z, &mut NoProbe)), refs.f32(&format!("{case}.decoded")))
}

/// A copy of a fixture whose transformer and VAE weights are rounded to bf16, as the real
/// checkpoints are: the storage modes must then give bit-identical results.
pub fn bf16_copy(variant: &str) -> (tempfile::TempDir, ModelFolder) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pipeline");
    crate::copy_dir(&pipeline(variant), &root);
    for file in ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"] {
        crate::rewrite_safetensors(&root.join(file), |(k, dtype, shape, data)| {
            if dtype != safetensors::Dtype::F32 {
                return Some((k, dtype, shape, data));
            }
            let bf16: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect();
            Some((k, safetensors::Dtype::BF16, shape, bf16))
        });
    }
    let f = ModelFolder::open(root.to_str().unwrap()).unwrap();
    (dir, f)
}

/// A reference case of `variant` on `f` in f32 with `--weights weights`, its plan edited by
/// `edit` (to force streaming or tiling).
pub fn run_stored(f: &ModelFolder, variant: &str, case: &str, device: &Device, weights: WeightsChoice, edit: impl FnOnce(&mut Plan)) -> Output {
    let req = request(variant, case);
    let mut pipeline = f32_pipeline(f.clone(), device, Options { weights, ..Options::default() });
    let mut plan = pipeline.plan(std::slice::from_ref(&req)).unwrap();
    edit(&mut plan);
    pipeline.run(std::slice::from_ref(&req), &plan, &mut Quiet).unwrap().outputs.pop().unwrap()
}

/// Two runs that must agree to the bit: pixels, latents of every step, the float image.
pub fn assert_identical(what: &str, a: &Output, b: &Output) {
    let (ta, tb) = (a.tensors.as_ref().unwrap(), b.tensors.as_ref().unwrap());
    assert!(ta.step_latents.0 == tb.step_latents.0, "{what}: step latents differ");
    assert!(ta.image.0 == tb.image.0, "{what}: float images differ");
    assert!(a.rgb == b.rgb, "{what}: pixels differ");
    println!("{what}: bit-identical ({} latent values, {} pixels)", ta.step_latents.0.len(), a.rgb.len());
}
