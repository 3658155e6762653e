//! Adapters: every GPU adapter of every graphics API wgpu can reach, plus burn's CPU backend,
//! what each can do, and which one a run uses.
//!
//! wgpu enumerates adapters (name, vendor, type, driver, limits); what burn can compute on one
//! (its shader compiler and which float dtypes it stores and computes) is only known once a
//! burn device is up on it, so [`probe`] brings each one up. Devices are registered once per
//! process ([`open`] caches them): burn refuses to configure a device twice.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use burn::backend::{Backend as _, Dispatch};
use burn::tensor::wgpu::{WgpuBackend, wgpu};
use burn::tensor::{DType, Device, DeviceKind};
use cogview_shaders::flash::FlashTiles;
use serde::Serialize;

/// Why an adapter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {index}: there is no such adapter ({count} listed by `cogview devices`)")]
    NoSuchDevice { index: usize, count: usize },
    #[error("--device {index} is {adapter}, not a {backend} adapter: drop --backend or pick another device")]
    BackendMismatch { index: usize, adapter: String, backend: Api },
    #[error("--backend {api}: this machine has no {api} adapter (see `cogview devices`)")]
    NoAdapterOnApi { api: Api },
    #[error("{adapter} could not be started: {reason}")]
    Init { adapter: String, reason: String },
}

/// The graphics API an adapter is reached through, or burn's CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// burn-flex, the pure-Rust CPU backend (not a wgpu adapter).
    Cpu,
}

impl Api {
    /// The wgpu APIs in the order `auto` prefers among adapters of the same type.
    pub const GPU: [Api; 4] = [Api::Vulkan, Api::Metal, Api::Dx12, Api::Gl];

    fn wgpu(self) -> Option<(wgpu::Backend, WgpuBackend)> {
        match self {
            Api::Vulkan => Some((wgpu::Backend::Vulkan, WgpuBackend::Vulkan)),
            Api::Metal => Some((wgpu::Backend::Metal, WgpuBackend::Metal)),
            Api::Dx12 => Some((wgpu::Backend::Dx12, WgpuBackend::Dx12)),
            Api::Gl => Some((wgpu::Backend::Gl, WgpuBackend::Gl)),
            Api::Cpu => None,
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Vulkan => "Vulkan",
            Api::Metal => "Metal",
            Api::Dx12 => "DX12",
            Api::Gl => "GL",
            Api::Cpu => "CPU",
        })
    }
}

/// The `--backend` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Only(Api),
}

/// The `--device` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// Best GPU by type (discrete, integrated, virtual, other); the CPU backend when there is none.
    #[default]
    Auto,
    /// The adapter with this index in `cogview devices`.
    Index(usize),
    /// burn's CPU backend.
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            n => n.parse().map(Self::Index).map_err(|_| {
                format!("`{s}` is not a device: use auto, cpu, or an index from `cogview devices`")
            }),
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "vulkan" => Self::Only(Api::Vulkan),
            "metal" => Self::Only(Api::Metal),
            "dx12" => Self::Only(Api::Dx12),
            "gl" => Self::Only(Api::Gl),
            _ => return Err(format!("`{s}` is not a backend: use auto, vulkan, metal, dx12 or gl")),
        })
    }
}

/// What kind of adapter it is, in the order `auto` prefers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdapterType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    Other,
    /// A software rasteriser such as Mesa's lavapipe or WARP: correct, but a CPU underneath.
    Software,
    /// burn's own CPU backend.
    CpuBackend,
}

impl AdapterType {
    fn from_wgpu(t: wgpu::DeviceType) -> Self {
        match t {
            wgpu::DeviceType::DiscreteGpu => Self::DiscreteGpu,
            wgpu::DeviceType::IntegratedGpu => Self::IntegratedGpu,
            wgpu::DeviceType::VirtualGpu => Self::VirtualGpu,
            wgpu::DeviceType::Cpu => Self::Software,
            wgpu::DeviceType::Other => Self::Other,
        }
    }

    /// burn's selector for the `nth` adapter of this type on one API (cubecl counts adapters of
    /// the same type, in wgpu's enumeration order, and takes the first software one).
    fn burn_kind(self, nth: usize) -> DeviceKind {
        match self {
            Self::DiscreteGpu => DeviceKind::DiscreteGpu(nth),
            Self::IntegratedGpu => DeviceKind::IntegratedGpu(nth),
            Self::VirtualGpu => DeviceKind::VirtualGpu(nth),
            Self::Software => DeviceKind::Cpu,
            Self::Other | Self::CpuBackend => DeviceKind::DefaultDevice,
        }
    }

    pub fn is_gpu(self) -> bool {
        matches!(self, Self::DiscreteGpu | Self::IntegratedGpu | Self::VirtualGpu | Self::Other)
    }
}

impl fmt::Display for AdapterType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DiscreteGpu => "discrete",
            Self::IntegratedGpu => "integrated",
            Self::VirtualGpu => "virtual",
            Self::Other => "other",
            Self::Software => "software",
            Self::CpuBackend => "cpu",
        })
    }
}

/// The shader compiler burn feeds an adapter (or none, for the CPU backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compiler {
    Wgsl,
    Spirv,
    Msl,
    /// burn-flex runs Rust code, no shaders.
    Native,
}

impl fmt::Display for Compiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wgsl => "wgsl",
            Self::Spirv => "spirv",
            Self::Msl => "msl",
            Self::Native => "native",
        })
    }
}

/// How a float dtype can be used on a device (burn's `DTypeUsage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DtypeSupport {
    /// Stored in device memory and converted to and from other dtypes.
    pub storage: bool,
    /// General arithmetic (elementwise, reductions, matmul).
    pub arithmetic: bool,
    /// Hardware-accelerated paths (tensor cores / cooperative matrix).
    pub accelerated: bool,
}

impl fmt::Display for DtypeSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.storage {
            parts.push("storage");
        }
        if self.arithmetic {
            parts.push("arith");
        }
        if self.accelerated {
            parts.push("accel");
        }
        if parts.is_empty() { f.write_str("no") } else { f.write_str(&parts.join("+")) }
    }
}

/// What burn can do on a device, known once the device is up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub compiler: Compiler,
    pub f32: DtypeSupport,
    pub f16: DtypeSupport,
    pub bf16: DtypeSupport,
    /// bf16 × bf16 → f32 matrix products on the matrix hardware (a cooperative-matrix or MMA
    /// configuration the driver lists), with or without general bf16 arithmetic.
    pub bf16_products: bool,
    /// The tiles of its f16 × f16 → f32 cooperative matrices, which burn's accelerated flash
    /// attention runs on (`cogview_shaders::flash`); used with bf16 products only.
    pub flash_tiles: Option<FlashTiles>,
}

/// One adapter as `cogview devices` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterInfo {
    /// `--device N` selects this adapter; `None` for the CPU backend (`--device cpu`).
    pub index: Option<usize>,
    pub name: String,
    /// PCI vendor id (0 when the API does not say).
    pub vendor_id: u32,
    pub vendor: String,
    pub adapter_type: AdapterType,
    pub api: Api,
    pub driver: String,
    /// Largest buffer the adapter allows, in bytes (`None` for the CPU backend).
    pub max_buffer_size: Option<u64>,
    /// Largest storage-buffer binding, in bytes: the real cap on one tensor's size.
    pub max_storage_binding_size: Option<u64>,
    /// burn's selector for it (internal).
    #[serde(skip)]
    burn_kind: DeviceKind,
}

impl AdapterInfo {
    /// The one-line label used in messages: `NAME (API, TYPE)`.
    pub fn label(&self) -> String {
        format!("{} ({}, {})", self.name, self.api, self.adapter_type)
    }
}

/// Names of the usual PCI vendors, for people.
fn vendor_name(id: u32) -> &'static str {
    match id {
        0x1002 | 0x1022 => "AMD",
        0x10de => "NVIDIA",
        0x8086 => "Intel",
        0x106b => "Apple",
        0x13b5 => "ARM",
        0x5143 => "Qualcomm",
        0x1414 => "Microsoft",
        0x10005 => "Mesa",
        0 => "",
        _ => "other",
    }
}

/// Which graphics APIs a listing looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// None: only burn's CPU backend (`--device cpu` starts no graphics API).
    CpuOnly,
    /// Vulkan, Metal and DX12, where cogview computes. GL is left out: probing it starts EGL,
    /// whose platform probing prints driver messages of its own on machines without a display
    /// session (`XDG_RUNTIME_DIR is invalid or not set`), and GL only ever runs WGSL.
    Compute,
    /// Every API, GL included (`devices --all`, `--backend gl`, or a `--device N` past the
    /// others: GL adapters are listed last, so every other index is the same in both).
    All,
}

impl Scope {
    /// What a `--device`/`--backend` choice needs to look at.
    pub fn of(device: DeviceChoice, backend: BackendChoice) -> Self {
        match (device, backend) {
            (DeviceChoice::Cpu, _) => Scope::CpuOnly,
            (_, BackendChoice::Only(Api::Gl)) => Scope::All,
            _ => Scope::Compute,
        }
    }

    fn includes(self, api: Api) -> bool {
        match self {
            Scope::CpuOnly => api == Api::Cpu,
            Scope::Compute => api != Api::Gl,
            Scope::All => true,
        }
    }
}

/// The adapters of the APIs in `scope` this build of wgpu has, in a stable order (API, then
/// the API's own order), followed by burn's CPU backend. Nothing is initialised.
pub fn enumerate(scope: Scope) -> Vec<AdapterInfo> {
    let mut out = Vec::new();
    let enabled = wgpu::Instance::enabled_backend_features();
    for api in Api::GPU.into_iter().filter(|a| scope.includes(*a)) {
        let (backend, _) = api.wgpu().expect("GPU APIs map to wgpu");
        if !enabled.contains(backend.into()) {
            continue;
        }
        let adapters = crate::driver_output::captured(&format!("listing {api} adapters"), || {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: backend.into(),
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            pollster::block_on(instance.enumerate_adapters(backend.into()))
        });
        let mut seen: HashMap<AdapterType, usize> = HashMap::new();
        for adapter in adapters {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let adapter_type = AdapterType::from_wgpu(info.device_type);
            let nth = seen.entry(adapter_type).or_default();
            let burn_kind = adapter_type.burn_kind(*nth);
            *nth += 1;
            // burn reaches only the first software adapter and no `Other` one by index.
            let reachable = match adapter_type {
                AdapterType::Software => burn_kind_unused(&out, api, DeviceKind::Cpu),
                AdapterType::Other => false,
                _ => true,
            };
            if !reachable {
                tracing::debug!(adapter = %info.name, %api, "adapter not reachable through burn, skipped");
                continue;
            }
            let driver = [info.driver.as_str(), info.driver_info.as_str()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            out.push(AdapterInfo {
                index: Some(out.len()),
                name: info.name.clone(),
                vendor_id: info.vendor,
                vendor: vendor_name(info.vendor).to_string(),
                adapter_type,
                api,
                driver,
                max_buffer_size: Some(limits.max_buffer_size),
                max_storage_binding_size: Some(limits.max_storage_buffer_binding_size),
                burn_kind,
            });
        }
    }
    out.push(AdapterInfo {
        index: None,
        name: "burn-flex CPU backend".to_string(),
        vendor_id: 0,
        vendor: String::new(),
        adapter_type: AdapterType::CpuBackend,
        api: Api::Cpu,
        driver: format!("{} threads", std::thread::available_parallelism().map_or(1, |n| n.get())),
        max_buffer_size: None,
        max_storage_binding_size: None,
        burn_kind: DeviceKind::Cpu,
    });
    out
}

fn burn_kind_unused(out: &[AdapterInfo], api: Api, kind: DeviceKind) -> bool {
    !out.iter().any(|a| a.api == api && a.burn_kind == kind)
}

/// Picks the adapter for `--device`/`--backend` from `adapters` (as [`enumerate`] returns them).
///
/// `auto` takes the best GPU by type (discrete, integrated, virtual), Vulkan first among equals.
/// With no GPU it takes burn's CPU backend, unless `--backend` names an API that has only a
/// software adapter (lavapipe, WARP): asking for that API explicitly is asking for it.
pub fn select(
    adapters: &[AdapterInfo],
    device: DeviceChoice,
    backend: BackendChoice,
) -> Result<Selection, DeviceError> {
    let api_ok = |a: &AdapterInfo| match backend {
        BackendChoice::Auto => true,
        BackendChoice::Only(api) => a.api == api,
    };
    let cpu = || {
        adapters
            .iter()
            .find(|a| a.adapter_type == AdapterType::CpuBackend)
            .cloned()
            .expect("enumerate always lists the CPU backend")
    };
    match device {
        DeviceChoice::Cpu => Ok(Selection { adapter: cpu(), warning: None }),
        DeviceChoice::Index(n) => {
            let adapter = adapters.iter().find(|a| a.index == Some(n)).ok_or_else(|| {
                DeviceError::NoSuchDevice { index: n, count: adapters.iter().filter(|a| a.index.is_some()).count() }
            })?;
            if !api_ok(adapter) {
                return Err(DeviceError::BackendMismatch {
                    index: n,
                    adapter: adapter.label(),
                    backend: match backend {
                        BackendChoice::Only(api) => api,
                        BackendChoice::Auto => unreachable!(),
                    },
                });
            }
            let warning = (adapter.adapter_type == AdapterType::Software).then(|| {
                format!("{} is a software adapter: it runs on the CPU and is slow", adapter.label())
            });
            Ok(Selection { adapter: adapter.clone(), warning })
        }
        DeviceChoice::Auto => {
            let best_gpu = adapters
                .iter()
                .filter(|a| a.adapter_type.is_gpu() && api_ok(a))
                .min_by_key(|a| (a.adapter_type, a.api));
            if let Some(adapter) = best_gpu {
                return Ok(Selection { adapter: adapter.clone(), warning: None });
            }
            if let BackendChoice::Only(api) = backend {
                let software = adapters
                    .iter()
                    .find(|a| a.adapter_type == AdapterType::Software && a.api == api)
                    .ok_or(DeviceError::NoAdapterOnApi { api })?;
                return Ok(Selection {
                    adapter: software.clone(),
                    warning: Some(format!(
                        "{api} has only a software adapter, {}: it runs on the CPU and is slow",
                        software.name
                    )),
                });
            }
            Ok(Selection {
                adapter: cpu(),
                warning: Some(
                    "no GPU adapter found: running on the CPU backend, which is slow \
                     (software Vulkan/GL adapters are used only when chosen with --device N)"
                        .to_string(),
                ),
            })
        }
    }
}

/// The adapters a `--device`/`--backend` choice can pick from: [`enumerate`] over what
/// [`Scope::of`] says, widened to every API when `--device N` names a GL adapter.
pub fn candidates(device: DeviceChoice, backend: BackendChoice) -> Vec<AdapterInfo> {
    let scope = Scope::of(device, backend);
    let adapters = enumerate(scope);
    match device {
        DeviceChoice::Index(n) if scope == Scope::Compute && !adapters.iter().any(|a| a.index == Some(n)) => {
            enumerate(Scope::All)
        }
        _ => adapters,
    }
}

/// The adapter a run uses, with the warning to show about it, if any.
#[derive(Clone, Debug)]
pub struct Selection {
    pub adapter: AdapterInfo,
    pub warning: Option<String>,
}

/// Devices brought up in this process, by adapter. burn registers a device once; asking again
/// must return the same one.
fn opened() -> &'static Mutex<HashMap<(Api, String), Device>> {
    static OPENED: OnceLock<Mutex<HashMap<(Api, String), Device>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

/// Brings up (once per process) the burn device for `adapter`.
pub fn open(adapter: &AdapterInfo) -> Result<Device, DeviceError> {
    let key = (adapter.api, format!("{:?}", adapter.burn_kind));
    let mut opened = opened().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(device) = opened.get(&key) {
        return Ok(device.clone());
    }
    let device = match adapter.api.wgpu() {
        None => Device::flex(),
        Some((_, api)) => {
            // Before CubeCL's first device: it reads its configuration, and the environment the
            // caches live in, once.
            crate::kernel_cache::activate(adapter);
            let kind = adapter.burn_kind.clone();
            // burn returns the errors of adapter and device requests. A panic inside a driver
            // is not caught: release builds abort on panic (Cargo.toml's profile, for size),
            // with the message on stderr even during this capture (`release_for_panic`).
            let init = crate::driver_output::captured(&format!("starting {}", adapter.label()), || {
                Device::wgpu_options().graphics_api(api).device_kind(kind).init()
            });
            match init {
                Ok(device) => device,
                Err(e) => return Err(DeviceError::Init { adapter: adapter.label(), reason: e.to_string() }),
            }
        }
    };
    opened.insert(key, device.clone());
    Ok(device)
}

/// What burn can do on `device`: its compiler and float dtype usage.
pub fn capabilities(device: &Device) -> Capabilities {
    let usage = |dtype: DType| {
        use burn::backend::DTypeUsage;
        let set = Dispatch::dtype_usage(device.as_dispatch(), dtype);
        DtypeSupport {
            storage: set.contains(DTypeUsage::Storage),
            arithmetic: set.contains(DTypeUsage::Arithmetic),
            accelerated: set.contains(DTypeUsage::Accelerated),
        }
    };
    Capabilities {
        compiler: compiler_of(&Dispatch::name(device.as_dispatch())),
        f32: usage(DType::F32),
        f16: usage(DType::F16),
        bf16: usage(DType::BF16),
        bf16_products: cogview_shaders::bf16_product::available(device),
        flash_tiles: cogview_shaders::flash::tiles(device),
    }
}

/// The sizes a device limits buffers and memory to, read once when the device is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// The device memory the adapter reports (Vulkan: its largest device-local heap; Metal:
    /// the recommended working set; the CPU backend: three quarters of the machine's memory).
    pub memory: Option<u64>,
    /// The largest buffer burn allocates (cubecl's page size: the storage-binding limit, 128 MiB
    /// on lavapipe, about 2 GiB on most Vulkan and DX12 drivers). `None` on the CPU backend.
    pub max_buffer: Option<u64>,
}

/// The [`Limits`] of `device`.
pub fn limits(device: &Device) -> Limits {
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(d) => {
            let client = d.client();
            let memory = &client.properties().memory;
            Limits { memory: memory.max_memory(), max_buffer: Some(memory.max_page_size) }
        }
        _ => Limits { memory: host_memory().map(|m| m / 4 * 3), max_buffer: None },
    }
}

/// The machine's physical memory, whose RAM the CPU backend computes in (three quarters of
/// it make its budget, the rest is left to the system and other programs); `None` where the
/// platform does not say.
fn host_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a system constant; it has no preconditions.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The compiler from burn's backend name, e.g. `dispatch<fusion<cubecl<wgpu<spirv>>>>`.
fn compiler_of(name: &str) -> Compiler {
    if name.contains("wgpu<spirv>") {
        Compiler::Spirv
    } else if name.contains("wgpu<msl>") {
        Compiler::Msl
    } else if name.contains("wgpu") {
        Compiler::Wgsl
    } else {
        Compiler::Native
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel cache's environment is cogview's version and the adapter's driver build: the
    /// same adapter and driver share it, a driver upgrade or another adapter does not.
    #[test]
    fn kernel_cache_environments_follow_the_driver() {
        use crate::kernel_cache::environment_name;
        let gpu = AdapterInfo { driver: "NVIDIA 580.65.06".into(), ..adapter(Some(0), AdapterType::DiscreteGpu, Api::Vulkan) };
        let name = environment_name(&gpu);
        assert!(name.starts_with(&format!("cogview-{}-", env!("CARGO_PKG_VERSION"))), "{name}");
        assert_eq!(name, environment_name(&gpu.clone()));
        let upgraded = AdapterInfo { driver: "NVIDIA 580.82.07".into(), ..gpu.clone() };
        let other = AdapterInfo { name: "another card".into(), ..gpu.clone() };
        let dx12 = AdapterInfo { api: Api::Dx12, ..gpu.clone() };
        for changed in [upgraded, other, dx12] {
            assert_ne!(environment_name(&changed), name, "{changed:?}");
        }
        use crate::kernel_cache::{CacheLocation, dir_of};
        assert_eq!(dir_of(&CacheLocation::Off), None);
        assert_eq!(dir_of(&CacheLocation::Dir("/x".into())), Some("/x".into()));
    }

    fn adapter(index: Option<usize>, t: AdapterType, api: Api) -> AdapterInfo {
        AdapterInfo {
            index,
            name: format!("{t} on {api}"),
            vendor_id: 0,
            vendor: String::new(),
            adapter_type: t,
            api,
            driver: String::new(),
            max_buffer_size: None,
            max_storage_binding_size: None,
            burn_kind: DeviceKind::DefaultDevice,
        }
    }

    fn machine(list: &[(AdapterType, Api)]) -> Vec<AdapterInfo> {
        let mut v: Vec<_> =
            list.iter().enumerate().map(|(i, (t, a))| adapter(Some(i), *t, *a)).collect();
        v.push(adapter(None, AdapterType::CpuBackend, Api::Cpu));
        v
    }

    #[test]
    fn auto_prefers_discrete_then_integrated_then_virtual() {
        use AdapterType::*;
        let m = machine(&[(Software, Api::Vulkan), (IntegratedGpu, Api::Vulkan), (VirtualGpu, Api::Gl), (DiscreteGpu, Api::Dx12)]);
        let s = select(&m, DeviceChoice::Auto, BackendChoice::Auto).unwrap();
        assert_eq!(s.adapter.index, Some(3));
        assert!(s.warning.is_none());
        let m = machine(&[(VirtualGpu, Api::Vulkan), (IntegratedGpu, Api::Gl)]);
        assert_eq!(select(&m, DeviceChoice::Auto, BackendChoice::Auto).unwrap().adapter.index, Some(1));
    }

    #[test]
    fn auto_prefers_vulkan_among_equals_and_backend_can_force_dx12() {
        use AdapterType::*;
        let m = machine(&[(DiscreteGpu, Api::Dx12), (DiscreteGpu, Api::Vulkan)]);
        assert_eq!(select(&m, DeviceChoice::Auto, BackendChoice::Auto).unwrap().adapter.api, Api::Vulkan);
        let s = select(&m, DeviceChoice::Auto, BackendChoice::Only(Api::Dx12)).unwrap();
        assert_eq!(s.adapter.api, Api::Dx12);
    }

    #[test]
    fn software_adapter_only_when_asked_for() {
        use AdapterType::*;
        let m = machine(&[(Software, Api::Vulkan)]);
        let s = select(&m, DeviceChoice::Auto, BackendChoice::Auto).unwrap();
        assert_eq!(s.adapter.adapter_type, CpuBackend);
        assert!(s.warning.unwrap().contains("no GPU adapter"));
        let s = select(&m, DeviceChoice::Auto, BackendChoice::Only(Api::Vulkan)).unwrap();
        assert_eq!(s.adapter.adapter_type, Software);
        assert!(s.warning.unwrap().contains("software adapter"));
        let s = select(&m, DeviceChoice::Index(0), BackendChoice::Auto).unwrap();
        assert_eq!(s.adapter.adapter_type, Software);
        assert!(s.warning.is_some());
    }

    #[test]
    fn gl_is_probed_only_when_asked_for_and_cpu_probes_nothing() {
        use DeviceChoice as D;
        assert_eq!(Scope::of(D::Cpu, BackendChoice::Auto), Scope::CpuOnly);
        assert_eq!(Scope::of(D::Cpu, BackendChoice::Only(Api::Gl)), Scope::CpuOnly);
        assert_eq!(Scope::of(D::Auto, BackendChoice::Auto), Scope::Compute);
        assert_eq!(Scope::of(D::Index(0), BackendChoice::Only(Api::Vulkan)), Scope::Compute);
        assert_eq!(Scope::of(D::Auto, BackendChoice::Only(Api::Gl)), Scope::All);
        assert!(Api::GPU.iter().all(|a| !Scope::CpuOnly.includes(*a)));
        assert!(!Scope::Compute.includes(Api::Gl) && Scope::Compute.includes(Api::Vulkan));
        assert!(Api::GPU.iter().all(|a| Scope::All.includes(*a)));
        // GL adapters come last, so the other indices do not depend on whether GL is listed.
        assert_eq!(Api::GPU.last(), Some(&Api::Gl));
    }

    #[test]
    fn bad_choices_are_errors() {
        use AdapterType::*;
        let m = machine(&[(DiscreteGpu, Api::Vulkan)]);
        assert!(matches!(
            select(&m, DeviceChoice::Index(5), BackendChoice::Auto),
            Err(DeviceError::NoSuchDevice { index: 5, count: 1 })
        ));
        assert!(matches!(
            select(&m, DeviceChoice::Index(0), BackendChoice::Only(Api::Metal)),
            Err(DeviceError::BackendMismatch { .. })
        ));
        assert!(matches!(
            select(&m, DeviceChoice::Auto, BackendChoice::Only(Api::Dx12)),
            Err(DeviceError::NoAdapterOnApi { api: Api::Dx12 })
        ));
        assert!("7x".parse::<DeviceChoice>().is_err());
        assert!("cuda".parse::<BackendChoice>().is_err());
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("dx12".parse::<BackendChoice>().unwrap(), BackendChoice::Only(Api::Dx12));
    }

    #[test]
    fn compiler_from_backend_name() {
        assert_eq!(compiler_of("dispatch<fusion<cubecl<wgpu<spirv>>>>"), Compiler::Spirv);
        assert_eq!(compiler_of("dispatch<fusion<cubecl<wgpu<wgsl>>>>"), Compiler::Wgsl);
        assert_eq!(compiler_of("dispatch<cubecl<wgpu<msl>>>"), Compiler::Msl);
        assert_eq!(compiler_of("dispatch<flex>"), Compiler::Native);
    }
}
