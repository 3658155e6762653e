//! Shared helpers of the integration tests: fixture paths, reference tensors, comparisons that
//! print what differs, and the software Vulkan adapter.

pub mod stages;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use cogview_runtime::device::{self, AdapterType, Api, Compiler};
use cogview_runtime::precision::PrecisionDecision;
use cogview_runtime::Target;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The pipeline folder of a fixture variant (`base`, `wide`, `overflow`).
pub fn pipeline(variant: &str) -> PathBuf {
    fixture(variant).join("pipeline")
}

/// A reference file of a fixture variant (`refs/<file>.safetensors`).
pub struct Refs {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Refs {
    pub fn open(variant: &str, file: &str) -> Self {
        Self::open_file(&fixture(variant).join("refs").join(format!("{file}.safetensors")))
    }

    pub fn open_file(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes, path: path.to_path_buf() }
    }

    fn view(&self, key: &str) -> safetensors::tensor::TensorView<'_> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("reference file parses");
        st.tensor(key).unwrap_or_else(|e| panic!("{}: {key}: {e}", self.path.display()))
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.view(key).shape().to_vec()
    }

    /// A float reference as f32 values (f32, f64, bf16 and f16 are widened).
    pub fn f32(&self, key: &str) -> Vec<f32> {
        let v = self.view(key);
        let b = v.data();
        match v.dtype() {
            safetensors::Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            safetensors::Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            safetensors::Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            safetensors::Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => panic!("{key}: {d:?} is not a float reference"),
        }
    }

    pub fn f64(&self, key: &str) -> Vec<f64> {
        let v = self.view(key);
        match v.dtype() {
            safetensors::Dtype::F64 => v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
            _ => self.f32(key).into_iter().map(f64::from).collect(),
        }
    }

    pub fn u8(&self, key: &str) -> Vec<u8> {
        let v = self.view(key);
        assert_eq!(v.dtype(), safetensors::Dtype::U8, "{key}");
        v.data().to_vec()
    }

    pub fn i64(&self, key: &str) -> Vec<i64> {
        let v = self.view(key);
        assert_eq!(v.dtype(), safetensors::Dtype::I64, "{key}");
        v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// A float reference as a tensor on `device`.
    pub fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let shape = self.shape(key);
        Tensor::from_data(TensorData::new(self.f32(key), shape), device)
    }
}

/// The largest absolute difference, relative to the reference's largest magnitude, with the
/// place where it happens. Panics with the numbers when over `tol`.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: {} values, expected {}", got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs() / scale;
        if !d.is_finite() {
            panic!("{what}: non-finite at {i}: got {g}, want {w}");
        }
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    println!("{what}: max |Δ|/max|ref| = {worst:.3e} (tolerance {tol:.1e}) at {at}, ref scale {scale:.3e}");
    assert!(worst <= tol, "{what}: max |Δ|/max|ref| = {worst:.3e} > {tol:.1e} at {at}: got {}, want {}", got[at], want[at]);
    worst
}

/// A tensor's values as f32.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data")
}

/// Mesa's lavapipe (through burn's SPIR-V compiler in the default build, WGSL without the native
/// compilers): the software Vulkan adapter CI has. Fails
/// (never skips) when it is missing: CI installs it (`.ci/run`).
pub fn lavapipe() -> (device::AdapterInfo, Device) {
    let adapters = device::enumerate(device::Scope::Compute);
    let adapter = adapters
        .into_iter()
        .find(|a| a.api == Api::Vulkan && a.adapter_type == AdapterType::Software)
        .expect("no software Vulkan adapter: install mesa-vulkan-drivers (see .ci/run)");
    // One kernel cache for every test binary of the build, beside them in the target directory
    // (`target/debug/kernel-cache`): a shape is tuned once, not once per test binary (tuning on
    // lavapipe takes seconds a shape). A test holds whichever candidate won to its tolerance, as a
    // user's run would be held. The cache itself is tested in crates/cli/tests/kernel_cache.rs.
    let exe = std::env::current_exe().expect("the test's path");
    let target = exe.parent().and_then(Path::parent).expect("a test binary in <target>/<profile>/deps");
    cogview_runtime::kernel_cache::set_location(cogview_runtime::kernel_cache::CacheLocation::Dir(target.join("kernel-cache")));
    let dev = device::open(&adapter).expect("lavapipe starts");
    (adapter, dev)
}

/// The run target of a test device (burn's CPU backend or lavapipe), computing as `precision`
/// says without the policy.
pub fn target_on(device: &Device, precision: PrecisionDecision) -> Target {
    if device::capabilities(device).compiler == Compiler::Native {
        Target::cpu(precision)
    } else {
        let (adapter, dev) = lavapipe();
        Target::new(adapter, dev, precision)
    }
}

/// Copies a folder tree (to break a fixture in a test without touching the original).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Edits a JSON file in place.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// One tensor of a safetensors file: name, dtype, shape, bytes.
pub type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Rewrites a safetensors file through `edit`, which may change, rename or drop (`None`) each
/// tensor.
pub fn rewrite_safetensors(path: &Path, mut edit: impl FnMut(RawTensor) -> Option<RawTensor>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| edit((k, v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    let views = data.iter().map(|(k, t, s, d)| (k.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), d).unwrap()));
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}
