//! Every stage on the software Vulkan adapter (Mesa's lavapipe through burn's WGSL compiler),
//! against diffusers, in one process: lavapipe compiles each new kernel with LLVM (seconds
//! each), so the stages share shapes with the pipeline run (the `base` fixture at 64x96, 224
//! text tokens) and the compiled kernels.

use burn::tensor::DType;
use cogview_runtime::text::WeightsMode;
use cogview_tests::stages::{DIT_F32_TOL, T5_F32_TOL, decode_case, encode, forward_cases, run_case};
use cogview_tests::{Refs, assert_close, lavapipe};

#[test]
fn every_stage_on_lavapipe() {
    let (_, dev) = lavapipe();
    let refs = Refs::open("base", "text_encoder");
    let (resident, peak_resident) = encode("base", &dev, DType::F32, WeightsMode::Resident, 224);
    assert_close("base T5 f32 on lavapipe", &resident, &refs.f32("prompt_embeds.len224"), T5_F32_TOL);
    let (streamed, peak_streamed) = encode("base", &dev, DType::F32, WeightsMode::Streamed, 224);
    assert_eq!(resident, streamed, "streamed == resident");
    println!("lavapipe peak device memory of the text encoder: resident {peak_resident:?}, streamed {peak_streamed:?}");
    assert!(peak_streamed.in_use.is_some());
    forward_cases("base", &["rect"], &dev, DType::F32, DIT_F32_TOL);
    decode_case("base", "h8w12", &dev);
    run_case("base", "s4_g7_64x96", &dev);
}
