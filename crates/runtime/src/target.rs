//! Where a run computes and in which dtype: the chosen adapter, its burn device, what it can
//! do, and the precision decision. Also the survey behind `cogview devices`.

use burn::tensor::Device;
use serde::Serialize;

use crate::device::{self, AdapterInfo, BackendChoice, Capabilities, DeviceChoice};
use crate::error::RuntimeError;
use crate::precision::{self, Precision, PrecisionDecision};

/// The device a run uses.
#[derive(Clone, Debug)]
pub struct Target {
    pub adapter: AdapterInfo,
    pub device: Device,
    pub capabilities: Capabilities,
    pub precision: PrecisionDecision,
    /// Warnings about the choice (software adapter, f16, self-test fallback).
    pub warnings: Vec<String>,
}

/// Chooses the adapter, brings it up, and decides the precision.
pub fn target(
    device: DeviceChoice,
    backend: BackendChoice,
    precision: Precision,
) -> Result<Target, RuntimeError> {
    let adapters = device::enumerate();
    let selection = device::select(&adapters, device, backend)?;
    let burn_device = device::open(&selection.adapter)?;
    let capabilities = device::capabilities(&burn_device);
    let decision =
        precision::decide_on_device(precision, &selection.adapter, &capabilities, &burn_device)?;
    let warnings = selection.warning.into_iter().chain(decision.warnings.iter().cloned()).collect();
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
    Ok(Target { adapter: selection.adapter, device: burn_device, capabilities, precision: decision, warnings })
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

pub fn survey(device: DeviceChoice, backend: BackendChoice, precision: Precision) -> Survey {
    let adapters = device::enumerate();
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
