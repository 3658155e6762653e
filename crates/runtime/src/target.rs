//! Where a run computes and in which dtype: the chosen adapter, its burn device, what it can
//! do, and the precision decision. Also the survey behind `cogview devices`.

use burn::tensor::Device;
use serde::Serialize;

use crate::device::{self, AdapterInfo, BackendChoice, Capabilities, DeviceChoice, Limits};
use crate::error::RuntimeError;
use crate::precision::{self, Precision, PrecisionDecision};

/// The device a run uses.
#[derive(Clone, Debug)]
pub struct Target {
    pub adapter: AdapterInfo,
    pub device: Device,
    pub capabilities: Capabilities,
    /// Memory and buffer limits, read once.
    pub limits: Limits,
    pub precision: PrecisionDecision,
    /// Warnings about the choice (software adapter, f16, self-test fallback).
    pub warnings: Vec<String>,
}

impl Target {
    /// `device` (brought up for `adapter`) computing as `precision` decided, with its
    /// capabilities and limits read from it.
    pub fn new(adapter: AdapterInfo, device: Device, precision: PrecisionDecision) -> Self {
        let capabilities = device::capabilities(&device);
        let limits = device::limits(&device);
        Self { adapter, device, capabilities, limits, precision, warnings: Vec::new() }
    }

    /// burn's CPU backend computing as `precision` says, without the policy (tests, tools).
    pub fn cpu(precision: PrecisionDecision) -> Self {
        let adapter = device::candidates(DeviceChoice::Cpu, BackendChoice::Auto).pop().expect("the CPU backend is listed");
        let device = device::open(&adapter).expect("the CPU backend starts");
        Self::new(adapter, device, precision)
    }

    /// The largest single buffer the plan keeps to: the adapter's storage-binding limit, else
    /// burn's largest allocation.
    pub fn max_binding(&self) -> Option<u64> {
        self.adapter.max_storage_binding_size.or(self.limits.max_buffer)
    }
}

/// Chooses the adapter, brings it up, and decides the precision.
pub fn target(
    device: DeviceChoice,
    backend: BackendChoice,
    precision: Precision,
) -> Result<Target, RuntimeError> {
    let adapters = device::candidates(device, backend);
    let selection = device::select(&adapters, device, backend)?;
    let burn_device = device::open(&selection.adapter)?;
    let capabilities = device::capabilities(&burn_device);
    let decision =
        precision::decide_on_device(precision, &selection.adapter, &capabilities, &burn_device)?;
    let warnings: Vec<String> = selection.warning.into_iter().chain(decision.warnings.iter().cloned()).collect();
    for w in &warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        adapter = %selection.adapter.label(),
        compiler = %capabilities.compiler,
        precision = %decision.dtype,
        reason = %decision.reason,
        "device chosen"
    );
    Ok(Target { warnings, ..Target::new(selection.adapter, burn_device, decision) })
}

/// One adapter of the survey: what it is, what it can do, what cogview would do on it.
#[derive(Clone, Debug, Serialize)]
pub struct SurveyRow {
    pub adapter: AdapterInfo,
    pub capabilities: Option<Capabilities>,
    /// The precision the request gets on this adapter.
    pub precision: Option<PrecisionDecision>,
    /// Why the adapter could not be used, or the request not met.
    pub error: Option<String>,
    /// Whether `--device`/`--backend` select this adapter.
    pub selected: bool,
}

/// Every adapter, brought up and assessed under `precision`, with the one that `device` and
/// `backend` select marked.
#[derive(Clone, Debug, Serialize)]
pub struct Survey {
    pub requested: Precision,
    pub rows: Vec<SurveyRow>,
    /// Why no adapter is selected (a bad `--device`/`--backend`).
    pub selection_error: Option<String>,
    pub selection_warning: Option<String>,
}

/// `all`: GL adapters too (otherwise listed only under `--backend gl`).
pub fn survey(device: DeviceChoice, backend: BackendChoice, precision: Precision, all: bool) -> Survey {
    // Every adapter is listed whatever `--device` says; `cpu` only marks the CPU backend.
    let adapters = match (all, device) {
        (true, _) => device::enumerate(device::Scope::All),
        (false, DeviceChoice::Cpu) => device::candidates(DeviceChoice::Auto, backend),
        (false, d) => device::candidates(d, backend),
    };
    let selection = device::select(&adapters, device, backend);
    let chosen = selection.as_ref().ok().map(|s| (s.adapter.api, s.adapter.index));
    let rows = adapters
        .into_iter()
        .map(|adapter| {
            let selected = chosen == Some((adapter.api, adapter.index));
            match device::open(&adapter) {
                Err(e) => SurveyRow { adapter, capabilities: None, precision: None, error: Some(e.to_string()), selected },
                Ok(dev) => {
                    let caps = device::capabilities(&dev);
                    let decision = precision::decide_on_device(precision, &adapter, &caps, &dev);
                    let (precision, error) = match decision {
                        Ok(d) => (Some(d), None),
                        Err(e) => (None, Some(e.to_string())),
                    };
                    SurveyRow { adapter, capabilities: Some(caps), precision, error, selected }
                }
            }
        })
        .collect();
    let (selection_error, selection_warning) = match selection {
        Ok(s) => (None, s.warning),
        Err(e) => (Some(e.to_string()), None),
    };
    Survey { requested: precision, rows, selection_error, selection_warning }
}
