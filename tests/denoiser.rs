//! The CogView3-Plus transformer and the CogVideoX DDIM scheduler against diffusers.

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use cogview_runtime::models::dit::{AttentionLimits, DitBlock, DitConfig};
use cogview_runtime::models::scheduler::{DdimScheduler, SchedulerConfig, alphas_cumprod, timesteps};
use cogview_runtime::models::{NoProbe, WeightSource};
use cogview_tests::stages::{DIT_BF16_TOL, DIT_F32_TOL, bf16_products_cases, forward_cases};
use cogview_tests::{Refs, assert_close, fixture, values};

/// One scheduler step in f32 from f64 coefficients, as diffusers computes it (f64 scalars times
/// f32 tensors): differences are f32 rounding of a few products.
const STEP_TOL: f32 = 1e-6;




#[test]
fn transformer_matches_diffusers_f32() {
    forward_cases("base", &["square", "rect"], &Device::flex(), DType::F32, DIT_F32_TOL);
    forward_cases("wide", &["square", "rect"], &Device::flex(), DType::F32, DIT_F32_TOL);
}

/// bf16 matrix products (the Vulkan tensor-core path, emulated on burn-flex) against diffusers
/// in bf16, and no farther from diffusers in f32 than diffusers-bf16 is.
#[test]
fn transformer_with_bf16_products_against_diffusers_bf16() {
    for (products, full_bf16) in bf16_products_cases("base", &Device::flex()) {
        assert!(products <= full_bf16, "bf16 products {products:.2e} from f32, diffusers-bf16 {full_bf16:.2e}");
        // The inputs were rounded: the result is not the f32 one (an f32 product lands ~1e-6
        // from f32, rounded inputs about half as far as diffusers-bf16).
        assert!(products >= full_bf16 / 20.0, "bf16 products {products:.2e} from f32: were the inputs rounded?");
        eprintln!("bf16 products {products:.2e} of the scale from f32; diffusers-bf16 {full_bf16:.2e}");
    }
}

#[test]
fn transformer_bf16_within_its_tolerance() {
    forward_cases("base", &["square", "rect"], &Device::flex(), DType::BF16, DIT_BF16_TOL);
}

/// Random weights for one block at the real width.
struct Random(Device);

impl WeightSource for Random {
    fn tensor<const D: usize>(&self, _key: &str, shape: [usize; D]) -> Tensor<D> {
        let fan_in = if D > 1 { shape[D - 1] } else { 1 };
        Tensor::random(shape, Distribution::Normal(0.0, 1.0 / (fan_in as f64).sqrt()), &self.0)
    }
    fn pp(&self, _prefix: impl std::fmt::Display) -> Self {
        Random(self.0.clone())
    }
}

/// One block at the real width (64 heads × 40, hidden 2560, FF 10240) at 1024² (4096 image +
/// 224 text tokens): the fallback's score matrix there would be 64 × 4320² × 4 B = 4.8 GB, past
/// the 2 GiB binding limit, so heads go in groups of 14 (1 GiB). Grouped and ungrouped outputs
/// agree. It runs on the CPU backend (about 0.9 TFLOP a forward); on lavapipe (≈15 GFLOP/s)
/// one forward would take over a minute per call, too long for CI.
#[test]
fn real_width_block_with_head_groups() {
    let real: DitConfig =
        serde_json::from_str(&std::fs::read_to_string(fixture("real").join("transformer/config.json")).unwrap()).unwrap();
    let dev = Device::flex();
    dev.seed(7);
    let block = DitBlock::load(&Random(dev.clone()), &real);
    let (s, l, d) = (64 * 64, 224, real.inner_dim());
    let x = Tensor::<3>::random([1, s, d], Distribution::Normal(0.0, 1.0), &dev);
    let c = Tensor::<3>::random([1, l, d], Distribution::Normal(0.0, 1.0), &dev);
    let emb = Tensor::<2>::random([1, real.time_embed_dim], Distribution::Normal(0.0, 1.0), &dev);
    let grouped = AttentionLimits::default();
    assert_eq!(grouped.heads_per_call(1, 64, s + l), 14);
    let whole = AttentionLimits { max_scores_bytes: u64::MAX, ..Default::default() };
    let (xg, cg) = block.forward(x.clone(), c.clone(), &emb, &grouped, "b", &mut NoProbe);
    let (xw, cw) = block.forward(x, c, &emb, &whole, "b", &mut NoProbe);
    assert_close("real-width block image tokens, grouped vs whole", &values(xg), &values(xw), 1e-5);
    assert_close("real-width block text tokens, grouped vs whole", &values(cg), &values(cw), 1e-5);
}

fn real_scheduler() -> SchedulerConfig {
    serde_json::from_str(&std::fs::read_to_string(fixture("real").join("scheduler/scheduler_config.json")).unwrap()).unwrap()
}

#[test]
fn scheduler_schedule_matches_diffusers() {
    let refs = Refs::open("base", "scheduler");
    let config = real_scheduler();
    let ac = alphas_cumprod(&config);
    let want = refs.f64("alphas_cumprod");
    let worst = ac.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    println!("alphas_cumprod max |Δ| = {worst:.3e}");
    assert!(worst <= 1e-12, "{worst}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("scheduler").join("timesteps.json")).unwrap()).unwrap();
    for (n, want) in json["timesteps"].as_object().unwrap() {
        let n: usize = n.parse().unwrap();
        let want: Vec<i64> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(timesteps(&config, n), want, "{n} steps");
    }
    for n in [1, 3, 4, 7, 10, 50, 61] {
        assert!(json["timesteps"].get(n.to_string()).is_some(), "{n} is covered");
    }
    for n in [3, 4, 7, 10, 50] {
        let want = refs.i64(&format!("timesteps.n{n}"));
        assert_eq!(DdimScheduler::new(&config, n).unwrap().timesteps, want);
    }
}

#[test]
fn scheduler_steps_match_diffusers() {
    let refs = Refs::open("base", "scheduler");
    let config = real_scheduler();
    let dev = Device::flex();
    for (n, t) in [(10, 999), (10, 499), (10, 99), (4, 249), (3, 666), (50, 19)] {
        let s = DdimScheduler::new(&config, n).unwrap();
        let key = |k: &str| format!("step.n{n}.t{t}.{k}");
        let (prev, x0) = s.step(refs.tensor(&key("model_output"), &dev), t, refs.tensor(&key("sample"), &dev));
        assert_close(&key("prev_sample"), &values(prev), &refs.f32(&key("prev_sample")), STEP_TOL);
        assert_close(&key("pred_original_sample"), &values(x0), &refs.f32(&key("pred_original_sample")), STEP_TOL);
    }
    // Whole runs, including step counts whose timestep list ends in -1 (61).
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("scheduler").join("timesteps.json")).unwrap()).unwrap();
    for run in json["steps"].as_array().unwrap() {
        let n = run["n"].as_u64().unwrap() as usize;
        let f = |k: &str| -> Vec<f32> { serde_json::from_value(run[k].clone()).unwrap() };
        let s = DdimScheduler::new(&config, n).unwrap();
        let v = Tensor::<4>::from_data(TensorData::new(f("model_output"), [1, 4, 3, 3]), &dev);
        let mut x = Tensor::<4>::from_data(TensorData::new(f("sample"), [1, 4, 3, 3]), &dev);
        for &t in &s.timesteps {
            x = s.step(v.clone(), t, x).0;
        }
        assert_close(&format!("{n}-step run"), &values(x), &f("final"), 1e-5);
    }
}
