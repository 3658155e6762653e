//! Every stage on the software Vulkan adapter (Mesa's lavapipe, through burn's SPIR-V compiler in
//! the default build and its WGSL compiler without the native compilers),
//! against diffusers, in one process: lavapipe compiles each new kernel with LLVM (seconds
//! each), so the stages share shapes with the pipeline run (the `base` fixture at 64x96, 224
//! text tokens) and the compiled kernels.

use burn::tensor::{DType, Device, Tensor, TensorData};
use cogview_shaders::bf16::{unpack_bf16, unpack_bf16_reference, upload_packed};
use rand::{Rng, SeedableRng};
use cogview_runtime::models::WeightStorage;
use cogview_runtime::plan::{Residency, WeightsChoice};
use cogview_tests::stages::{DIT_F32_TOL, T5_F32_TOL, assert_identical, bf16_copy, decode_case, encode, forward_cases, relative_distance, run_case, run_stored};
use cogview_shaders::flash::FlashTiles;
use cogview_tests::{Refs, assert_close, lavapipe, values};

#[test]
fn every_stage_on_lavapipe() {
    let (_, dev) = lavapipe();
    let refs = Refs::open("base", "text_encoder");
    let (resident, peak_resident) = encode("base", &dev, DType::F32, Residency::Resident, 224);
    assert_close("base T5 f32 on lavapipe", &resident, &refs.f32("prompt_embeds.len224"), T5_F32_TOL);
    let (streamed, peak_streamed) = encode("base", &dev, DType::F32, Residency::Streamed, 224);
    assert_eq!(resident, streamed, "streamed == resident");
    println!("lavapipe peak device memory of the text encoder: resident {peak_resident:?}, streamed {peak_streamed:?}");
    assert!(peak_streamed.in_use.is_some());
    forward_cases("base", &["rect"], &dev, DType::F32, DIT_F32_TOL);
    decode_case("base", "h8w12", &dev);
    run_case("base", "s4_g7_64x96", &dev);
    // bf16 weights packed in u32 (lavapipe stores no bf16) and unpacked by the kernel at use, the
    // transformer streamed: bit-identical to f32 storage of the same bf16 values.
    let (_dir, f) = bf16_copy("base");
    let f32_stored = run_stored(&f, "base", "s4_g7_64x96", &dev, WeightsChoice::F32, |_| {});
    let packed = run_stored(&f, "base", "s4_g7_64x96", &dev, WeightsChoice::Auto, |p| p.denoise.mode = Residency::Streamed);
    assert_eq!(packed.plan.storage, WeightStorage::PackedBf16, "{}", packed.plan.storage_reason);
    assert_identical("lavapipe packed-bf16 streamed vs f32-stored", &f32_stored, &packed);
}

/// The bf16 unpacking kernel against its plain-burn reference (a burn bf16 tensor cast to f32
/// on the CPU backend), bit for bit, on lengths that are odd, tiny, or not multiples of any
/// workgroup size, over random bit patterns plus the special values (±0, ±inf, NaN,
/// subnormals, the largest finite).
#[test]
fn bf16_unpacking_kernel_matches_reference() {
    let (_, dev) = lavapipe();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let specials = [0x0000u16, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x0001, 0x807F, 0x7F7F, 0x3F80, 0xBF80];
    for len in [1usize, 2, 3, 63, 64, 65, 255, 257, 1023, 4097, 65_537, 300_001] {
        let mut bits: Vec<u16> = (0..len).map(|_| rng.random()).collect();
        for (b, s) in bits.iter_mut().zip(specials) {
            *b = s;
        }
        let got = unpack_bf16(upload_packed(&bits, &dev), len).into_data().try_to_vec::<f32>().unwrap();
        let want = unpack_bf16_reference(&bits, &Device::flex()).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got.len(), len);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "len {len}, element {i}: kernel {g:e} ({:#010x}), reference {w:e} ({:#010x}) from bf16 {:#06x}", g.to_bits(), w.to_bits(), bits[i]);
        }
    }
}

/// `COGVIEW_MATMUL_KERNEL`'s kernels on lavapipe: cubek's own choice, a unit kernel and the gemm
/// routine (lavapipe has no cooperative matrices) launch themselves and give the CPU's product;
/// a cooperative-matrix kernel cannot launch and falls back to burn's autotune, which gives it
/// too. (Every kernel compiles with LLVM on a fresh machine, about 10 s each: not all of them.)
#[test]
fn named_matmul_kernels_on_lavapipe() {
    use cogview_shaders::matmul_kernel::{candidates, fallbacks, matmul_with, names};
    let (_, dev) = lavapipe();
    let cpu = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let ([m, k, n], a, b) = ([37, 72, 50], random(37 * 72), random(72 * 50));
    let on = |x: &[f32], dims: [usize; 2], d: &Device| Tensor::<2>::from_data(TensorData::new(x.to_vec(), dims), d);
    let want = values(on(&a, [m, k], &cpu).matmul(on(&b, [k, n], &cpu)));
    let tried = ["matmul_auto", "matmul_simple_unit_max_tile_size", "gemm_None", "matmul_double_cyclic_cmma"];
    let mut launched = Vec::new();
    for (i, name) in names()[1..].iter().enumerate().filter(|(_, n)| tried.contains(&n.as_str())) {
        assert_eq!(candidates()[i].to_string(), *name);
        let before = fallbacks();
        let got = values(matmul_with(on(&a, [m, k], &dev), on(&b, [k, n], &dev), Some(i)));
        assert_close(name, &got, &want, LAVAPIPE_MATMUL_TOL);
        if fallbacks() == before {
            launched.push(name.clone());
        }
    }
    assert_eq!(launched, tried[..3], "the kernels that launched themselves");
}

/// Attention padded to f16 tiles (`cogview_shaders::flash::attention`) on lavapipe, against
/// burn's attention on the unpadded f32 inputs on the CPU backend; v past f16's range. The
/// kernel's inputs are f16, with f32 sums.
/// - Newer Mesa (26.1 in `.ci/run`'s second run) lists f16 cooperative matrices (8×8×8 on
///   lavapipe), so burn runs its accelerated flash kernel, as on a GPU's matrix hardware: with
///   the adapter's own tiles and with an H200's (16: heads padded 40 → 48, 70 queries → 128).
///   The attention self-test the precision policy runs must pass on both.
/// - Older Mesa lists none (CI's bookworm-backports Mesa 25.0): exact f32 attention runs on the
///   same f16-rounded inputs, which checks the padding, the folded scale and v's divisor.
///
/// Either way the result must be within the f16 tiles' derived tolerance and really rounded
/// (farther than f32 rounding: f16 inputs reached the kernel). Where the accelerated kernel
/// cannot launch (older Mesa; unpadded inputs on newer Mesa), exact f32 attention must have run
/// in its place, and the self-test must fail saying so. The exact path
/// (`flash::exact_attention`: burn's unit kernel, burn's fallback in head groups, or whichever
/// of them autotune finds faster) is f32 on both.
#[test]
fn flash_attention_on_lavapipe() {
    use cogview_shaders::flash::{self, ExactKernel, F16_TILES_TOL};
    let (adapter, dev) = lavapipe();
    let dims = [1, 2, 70, 40];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut random = |scale: f32| -> Vec<f32> { (0..dims.iter().product()).map(|_| rng.random_range(-scale..scale)).collect() };
    // q and k normalised per head, as the transformer's are; v past f16's range.
    let normalised = |v: Vec<f32>| -> Vec<f32> {
        v.chunks(dims[3])
            .flat_map(|r| {
                let mean = r.iter().sum::<f32>() / r.len() as f32;
                let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / r.len() as f32 + 1e-6).sqrt();
                r.iter().map(move |x| (x - mean) / sd)
            })
            .collect()
    };
    let (q, k, v) = (normalised(random(1.0)), normalised(random(1.0)), random(1e5));
    let on = |x: &[f32], d: &Device| Tensor::<4>::from_data(TensorData::new(x.to_vec(), dims), d);
    let cpu = Device::flex();
    let want = values(flash::attention_reference(on(&q, &cpu), on(&k, &cpu), on(&v, &cpu)));
    let h200 = FlashTiles { head: 16, rows: 128 };
    let own = flash::tiles(&dev);
    println!("{}: f16 cooperative-matrix tiles {own:?}", adapter.name);
    // Unpadded (tiles of 1): 70 query rows are no multiple of a stage of lavapipe's tiles, so the
    // accelerated kernel refuses them, and exact f32 attention must run in its place, not burn's
    // fallback with its score matrix.
    let refused = FlashTiles { head: 1, rows: 1 };
    for tiles in own.into_iter().chain([h200, refused]) {
        let got = values(flash::attention(on(&q, &dev), on(&k, &dev), on(&v, &dev), tiles));
        let err = assert_close(&format!("flash on lavapipe, {tiles:?}"), &got, &want, F16_TILES_TOL);
        assert!(err > LAVAPIPE_ATTENTION_TOL, "{tiles:?}: error {err:.2e} is f32 rounding: the kernel did not get f16 inputs");
        let launched = flash::launched(&dev, dims, dims, tiles);
        assert_eq!(launched, Some(own.is_some() && tiles != refused), "{tiles:?}: whether the accelerated kernel launched");
        if own.is_some() {
            let report = cogview_runtime::selftest::run_flash(&dev, tiles);
            let launches = tiles != refused;
            assert_eq!(report.passed, launches, "the attention self-test on lavapipe's f16 tiles, {tiles:?}: {report:?}");
            assert_eq!(report.what.contains("cannot launch"), !launches, "{report:?}");
        }
    }
    // The exact f32 path: burn's unit flash kernel launched directly, burn's fallback in head
    // groups, and the one of them autotune finds faster, which it then names (and not before).
    for group in [1, 2] {
        for kernel in [ExactKernel::Unit, ExactKernel::Groups, ExactKernel::Tuned] {
            let tuned = || flash::exact_kernel(&dev, dims, dims, group);
            if kernel == ExactKernel::Tuned {
                assert_eq!(tuned(), None, "group {group}: nothing tuned at this shape yet");
            }
            let got = values(flash::exact_attention(on(&q, &dev), on(&k, &dev), on(&v, &dev), group, kernel));
            assert_close(&format!("exact attention on lavapipe, {kernel:?}, groups of {group}"), &got, &want, LAVAPIPE_ATTENTION_TOL);
            if kernel == ExactKernel::Tuned {
                let chosen = tuned();
                println!("exact attention, groups of {group}: autotune chose {chosen:?}");
                assert!(matches!(chosen, Some(ExactKernel::Unit | ExactKernel::Groups)), "group {group}: {chosen:?}");
            }
        }
    }
}

/// The bf16 products' GPU path (`cogview_shaders::bf16_product`: its backend extension, the
/// activations' cast, the transposed weight read in place, the f32 output, the convolution's
/// tap products) with f16 in place of bf16 — lavapipe's cooperative matrices have f16 and no
/// bf16 — against plain burn on the CPU backend with the same f16 roundings, at the shapes of a
/// linear layer, the transformer's modulation (2 rows; 1 without guidance) and the self-test.
/// - Autotuned (`bf16_linear`, `bf16_conv2d`), as the model runs: whichever kernel wins (one
///   row: the probe's kernels where they launch).
/// - The self-test's probe (`bf16_linear_probe`): the matrix hardware's kernels alone. Where
///   lavapipe lists f16 tiles (Mesa 26, `.ci/run`'s second run) it must give the product; where
///   it lists none (Mesa 25) NaN, so that the self-test fails instead of the run stopping.
///
/// The results must also be farther than f32 rounding from the f32 product of the unrounded
/// values: the inputs were rounded.
#[test]
fn half_products_on_lavapipe() {
    use burn::tensor::module::{conv2d, linear};
    use burn::tensor::ops::ConvOptions;
    use cogview_shaders::bf16_product::{bf16_conv2d, bf16_linear, bf16_linear_probe};
    let (adapter, dev) = lavapipe();
    let tiles = cogview_shaders::flash::tiles(&dev);
    println!("{}: f16 cooperative-matrix tiles {tiles:?}", adapter.name);
    let cpu = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let rounded = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect() };
    let far_from = |what: &str, got: &[f32], unrounded: &[f32]| {
        let d = relative_distance(got, unrounded);
        assert!(d > LAVAPIPE_MATMUL_TOL, "{what}: {d:.2e} from the f32 product of the unrounded inputs: they were not rounded");
    };
    for [m, k, n] in [[37, 72, 50], [2, 64, 48], [1, 64, 48], [8, 64, 16]] {
        let (x, w, b) = (random(m * k), random(n * k), random(n));
        let on = |v: &[f32], dims: [usize; 2], d: &Device| Tensor::<2>::from_data(TensorData::new(v.to_vec(), dims), d);
        let bias = |d: &Device| Tensor::<1>::from_data(TensorData::new(b.clone(), [n]), d);
        let reference = |x: &[f32], w: &[f32], with_bias: bool| {
            values(linear(on(x, [m, k], &cpu), on(w, [n, k], &cpu).transpose(), with_bias.then(|| bias(&cpu))))
        };
        let weight = || on(&w, [n, k], &dev).cast(DType::F16);
        let what = format!("f16 products on lavapipe, {m}×{k}×{n}");
        let got = values(bf16_linear(on(&x, [m, k], &dev), weight(), Some(bias(&dev))));
        assert_close(&what, &got, &reference(&rounded(&x), &rounded(&w), true), LAVAPIPE_MATMUL_TOL);
        far_from(&what, &got, &reference(&x, &w, true));
        let probed = values(bf16_linear_probe(on(&x, [m, k], &dev), weight()));
        if tiles.is_some() {
            assert_close(&format!("{what}, the probe"), &probed, &reference(&rounded(&x), &rounded(&w), false), LAVAPIPE_MATMUL_TOL);
        } else {
            assert!(probed.iter().all(|v| v.is_nan()), "{what}: the probe ran without cooperative matrices");
        }
    }
    // 3×3 "same" (the VAE's convolutions) and 1×1 (its shortcuts), 8 input channels: 72 terms.
    let [c_in, c_out, h, w] = [8, 12, 6, 5];
    let x = random(c_in * h * w);
    let b = random(c_out);
    for kernel in [3, 1] {
        let kw = random(c_out * c_in * kernel * kernel);
        let on = |v: &[f32], dims: [usize; 4], d: &Device| Tensor::<4>::from_data(TensorData::new(v.to_vec(), dims), d);
        let bias = |d: &Device| Tensor::<1>::from_data(TensorData::new(b.clone(), [c_out]), d);
        let (xd, kd) = ([1, c_in, h, w], [c_out, c_in, kernel, kernel]);
        let pad = [kernel / 2, kernel / 2];
        let reference = |x: &[f32], k: &[f32]| values(conv2d(on(x, xd, &cpu), on(k, kd, &cpu), Some(bias(&cpu)), ConvOptions::new([1, 1], pad, [1, 1], 1)));
        let what = format!("f16 tap products on lavapipe, {kernel}×{kernel}");
        let got = values(bf16_conv2d(on(&x, xd, &dev), on(&kw, kd, &dev).cast(DType::F16), bias(&dev), pad));
        assert_close(&what, &got, &reference(&rounded(&x), &rounded(&kw)), LAVAPIPE_MATMUL_TOL);
        far_from(&what, &got, &reference(&x, &kw));
    }
}

/// f32 rounding of the same attention on two backends (lavapipe's `exp` is LLVM's vectorised
/// one, burn-flex's the standard library's; the sums run in different orders): a few ulps per
/// score, about 1e-6 of the output's scale; 1e-5 leaves room.
const LAVAPIPE_ATTENTION_TOL: f32 = 1e-5;

/// An f32 product on lavapipe against the CPU's: the same 72 terms (each of size ≤ 1) summed in
/// another order, at most about 72 · 2^-24 ≈ 4e-6 apart; the output's scale is several units.
/// The same holds for products of f16-rounded inputs (at most 72 terms; a product of two f16
/// values, 11 significant bits each, is exact in f32) plus a bias.
const LAVAPIPE_MATMUL_TOL: f32 = 1e-5;
