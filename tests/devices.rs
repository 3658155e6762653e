//! Adapters and the precision policy on the real software adapter (lavapipe) and the CPU
//! backend.

use cogview_runtime::device::{self, AdapterType, Api, BackendChoice, Compiler, DeviceChoice};
use cogview_runtime::precision::{self, ComputeDtype, Precision};
use cogview_runtime::{PrecisionError, RuntimeError, target};
use cogview_tests::lavapipe;

#[test]
fn lavapipe_is_listed_with_its_capabilities() {
    let (adapter, dev) = lavapipe();
    assert_eq!(adapter.api, Api::Vulkan);
    assert_eq!(adapter.adapter_type, AdapterType::Software);
    assert!(adapter.max_storage_binding_size.unwrap() > 0);
    let caps = device::capabilities(&dev);
    // SPIR-V in the default build (the native compilers), WGSL without them.
    assert!(matches!(caps.compiler, Compiler::Spirv | Compiler::Wgsl), "{caps:?}");
    assert!(caps.f32.arithmetic && caps.f32.storage);
    assert!(!caps.bf16.arithmetic, "lavapipe has no bf16 arithmetic: {caps:?}");
    // No cooperative matrices on lavapipe: the linear layers' products stay f32 too, and the
    // reason says so.
    assert!(!caps.bf16_products, "{caps:?}");
    let auto = precision::decide_on_device(Precision::Auto, &adapter, &caps, &dev).unwrap();
    assert_eq!((auto.dtype, auto.matmul), (ComputeDtype::F32, ComputeDtype::F32));
    assert!(auto.reason.contains("lacks bf16 arithmetic, bf16 matrix products and bf16 storage"), "{}", auto.reason);
    assert!(auto.self_test.is_none() && auto.summary() == "f32");
    let err = precision::decide_on_device(Precision::Bf16, &adapter, &caps, &dev).unwrap_err();
    assert!(matches!(err, PrecisionError::Unsupported { .. }));
    assert!(err.to_string().contains(&adapter.name));
    // f16: accepted after the self-test where the adapter has shader f16, refused otherwise.
    match precision::decide_on_device(Precision::F16, &adapter, &caps, &dev) {
        Ok(d) => {
            assert!(caps.f16.arithmetic);
            let t = d.self_test.expect("f16 is self-tested");
            println!("lavapipe f16 self-test: error {:.3e} (tolerance {:.1e})", t.error, t.tolerance);
            assert!(t.passed);
        }
        Err(e) => {
            println!("lavapipe refuses f16: {e}");
            assert!(!caps.f16.arithmetic || matches!(e, PrecisionError::SelfTestFailed { .. }));
        }
    }
}

#[test]
fn enumeration_lists_the_cpu_backend_last_and_numbers_gpus() {
    let adapters = device::enumerate(device::Scope::Compute);
    let last = adapters.last().unwrap();
    assert_eq!(last.adapter_type, AdapterType::CpuBackend);
    assert_eq!(last.index, None);
    for (i, a) in adapters.iter().filter(|a| a.index.is_some()).enumerate() {
        assert_eq!(a.index, Some(i));
    }
}

#[test]
fn auto_on_a_machine_without_gpu_takes_the_cpu_backend_and_vulkan_takes_lavapipe() {
    let adapters = device::enumerate(device::Scope::Compute);
    if adapters.iter().any(|a| a.adapter_type.is_gpu()) {
        // A machine with a GPU (not CI): auto must take one of them.
        let s = device::select(&adapters, DeviceChoice::Auto, BackendChoice::Auto).unwrap();
        assert!(s.adapter.adapter_type.is_gpu());
        return;
    }
    let s = device::select(&adapters, DeviceChoice::Auto, BackendChoice::Auto).unwrap();
    assert_eq!(s.adapter.adapter_type, AdapterType::CpuBackend);
    assert!(s.warning.is_some());
    let s = device::select(&adapters, DeviceChoice::Auto, BackendChoice::Only(Api::Vulkan)).unwrap();
    assert_eq!(s.adapter.adapter_type, AdapterType::Software);
}

#[test]
fn cpu_backend_is_f32_under_auto_refuses_bf16_and_runs_f16_when_asked() {
    let t = target(DeviceChoice::Cpu, BackendChoice::Auto, Precision::Auto).unwrap();
    assert_eq!(t.capabilities.compiler, Compiler::Native);
    assert_eq!(t.precision.dtype, ComputeDtype::F32);
    assert!(t.precision.reason.contains("emulates bf16"));
    let e = target(DeviceChoice::Cpu, BackendChoice::Auto, Precision::Bf16).unwrap_err();
    assert!(e.to_string().contains("only emulates bf16"), "{e}");
    let t = target(DeviceChoice::Cpu, BackendChoice::Auto, Precision::F16).unwrap();
    assert_eq!(t.precision.dtype, ComputeDtype::F16);
    assert_eq!(t.precision.warnings, vec![precision::F16_WARNING.to_string()]);
    assert!(t.precision.self_test.unwrap().passed);
}

#[test]
fn bad_device_index_is_an_error() {
    let e = target(DeviceChoice::Index(99), BackendChoice::Auto, Precision::Auto).unwrap_err();
    assert!(matches!(e, RuntimeError::Device(_)), "{e}");
    assert!(e.to_string().contains("--device 99"));
}
