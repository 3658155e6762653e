//! The one place that decides the compute dtype (`--precision auto|bf16|f32|f16`).
//!
//! CogView3-Plus-3B was trained in bf16; in f16 it overflows to NaN and the image comes out
//! black (the model card; diffusers issue #10343). So:
//! - `auto` is bf16 where the device really computes bf16; on a GPU whose matrix hardware
//!   multiplies bf16 with f32 accumulation but that has no general bf16 arithmetic (Vulkan's
//!   cooperative matrices), the matrix products of the linear layers take bf16 inputs and
//!   everything else (norms, softmax, modulation, gates, the residual stream) stays f32; f32
//!   everywhere else;
//! - `bf16` on a device with neither is an error naming the device and what it lacks;
//! - `f16` runs only when asked for, with a warning (the non-finite guard stands behind it);
//! - a reduced precision is trusted only after a self-test ([`crate::selftest`]) on the device:
//!   drivers that claim a dtype and compute garbage exist.
//!
//! The decision and its reason are data ([`PrecisionDecision`]) so the CLI can print them and
//! PNG metadata can carry them.

use std::fmt;

use burn::tensor::Device;
use cogview_shaders::flash::FlashTiles;
use serde::Serialize;

use crate::device::{AdapterInfo, AdapterType, Capabilities};
pub use crate::dtype::ComputeDtype;
use crate::selftest::{self, SelfTestReport};

/// Why a precision cannot be had on an adapter.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    #[error("--precision {requested}: {adapter} lacks {missing}; use --precision auto or f32")]
    Unsupported { requested: &'static str, adapter: String, missing: String },
    #[error(
        "--precision {requested}: {adapter} claims {requested} but computes it wrongly \
         (self-test error {error:.3e} > {tolerance:.1e}); use --precision auto or f32"
    )]
    SelfTestFailed { requested: &'static str, adapter: String, error: f64, tolerance: f64 },
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    Bf16,
    F32,
    F16,
}

impl Precision {
    pub const ALL: [Precision; 4] = [Precision::Auto, Precision::Bf16, Precision::F32, Precision::F16];

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Bf16 => "bf16",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

/// The request that computes in exactly this dtype.
impl From<ComputeDtype> for Precision {
    fn from(d: ComputeDtype) -> Self {
        match d {
            ComputeDtype::F32 => Precision::F32,
            ComputeDtype::Bf16 => Precision::Bf16,
            ComputeDtype::F16 => Precision::F16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("`{s}` is not a precision: use auto, bf16, f32 or f16"))
    }
}

/// The decision, with the reason a person can read and the warnings to show.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrecisionDecision {
    pub requested: Precision,
    /// The dtype activations, norms and everything but the linear layers' products compute in.
    pub dtype: ComputeDtype,
    /// The dtype the linear layers' matrix products read: `dtype`, or bf16 (summed in f32) when
    /// `dtype` is f32 on an adapter whose matrix hardware multiplies bf16.
    pub matmul: ComputeDtype,
    /// Joint attention on the adapter's f16 cooperative matrices (f32 sums), padded to these
    /// tiles: with bf16 products where the adapter has them, else `None` (exact f32 attention).
    pub flash: Option<FlashTiles>,
    pub reason: String,
    pub warnings: Vec<String>,
    /// The reduced-precision self-test, when one ran.
    pub self_test: Option<SelfTestReport>,
}

impl PrecisionDecision {
    /// A decision made without a device (tests, tools): `requested` computing in `dtype`.
    pub fn fixed(requested: Precision, dtype: ComputeDtype) -> Self {
        Self { requested, dtype, matmul: dtype, flash: None, reason: format!("{dtype} was given"), warnings: vec![], self_test: None }
    }

    /// f32 with the linear layers' matrix products in bf16 (f32 sums).
    pub fn bf16_products(&self) -> bool {
        self.dtype == ComputeDtype::F32 && self.matmul == ComputeDtype::Bf16
    }

    /// `f32`, `bf16`, `f32, bf16 matrix products` or `f32, bf16 matrix products, f16-tile
    /// attention`: what `cogview devices` and PNG metadata show.
    pub fn summary(&self) -> String {
        summary(self.dtype, (self.matmul != self.dtype).then_some(self.matmul), self.flash.is_some())
    }

    /// `generate --from`: attention as the image had it (`f16_tiles`: its attention ran on f16
    /// tiles). An image made with exact f32 attention turns off the f16 tiles this decision
    /// would use; one made on f16 tiles cannot be matched where this decision has none, and the
    /// returned warning says so. `None` when attention already matches.
    pub fn match_attention(&mut self, f16_tiles: bool, adapter: &str) -> Option<String> {
        match (f16_tiles, self.flash.is_some()) {
            (false, true) => {
                self.flash = None;
                self.reason = format!("{}; attention in exact f32, as the image was made", self.reason);
                None
            }
            (true, false) => Some(format!(
                "the image's attention ran on f16 tiles, which {adapter} does not use in {}: attention is exact f32 here, \
                 so the picture can differ slightly",
                self.summary()
            )),
            _ => None,
        }
    }
}

/// `f32`, `bf16`, `f32, bf16 matrix products` or `f32, bf16 matrix products, f16-tile
/// attention`, from what a run computed in: its dtype, the dtype its matrix products read where
/// that differs, and whether attention ran on f16 tiles. The one wording of a live decision
/// ([`PrecisionDecision::summary`]) and of an image's metadata.
pub fn summary(dtype: ComputeDtype, matrix_products: Option<ComputeDtype>, f16_tile_attention: bool) -> String {
    let attention = if f16_tile_attention { ", f16-tile attention" } else { "" };
    match matrix_products {
        Some(m) => format!("{dtype}, {m} matrix products{attention}"),
        None => format!("{dtype}{attention}"),
    }
}

/// The warning every f16 run carries.
pub const F16_WARNING: &str = "f16 is not supported by CogView3-Plus's authors: the model was \
    trained in bf16 and overflows to NaN in f16 (black images); cogview's non-finite guard \
    stops the run if that happens";

/// The policy alone, over a capability set: no device, no self-test. Unit-tested over every
/// combination.
pub fn decide(
    requested: Precision,
    adapter: &str,
    adapter_type: AdapterType,
    caps: &Capabilities,
) -> Result<PrecisionDecision, PrecisionError> {
    let cpu_backend = adapter_type == AdapterType::CpuBackend;
    let ok = |dtype, reason: String, warnings: Vec<String>| {
        Ok(PrecisionDecision { requested, dtype, matmul: dtype, flash: None, reason, warnings, self_test: None })
    };
    // The matrix hardware needs its inputs stored as bf16; the CPU backend never has it.
    let products = caps.bf16_products && caps.bf16.storage && !cpu_backend;
    let bf16_products = |reason: String| {
        Ok(PrecisionDecision {
            requested,
            dtype: ComputeDtype::F32,
            matmul: ComputeDtype::Bf16,
            flash: caps.flash_tiles,
            reason,
            warnings: vec![],
            self_test: None,
        })
    };
    let products_reason = || {
        format!(
            "{adapter} multiplies bf16 matrices with f32 sums but has no general bf16 arithmetic: \
             the linear layers' products in bf16, everything else in f32"
        )
    };
    // "bf16 arithmetic, bf16 matrix products and bf16 storage", what applies of it.
    let lacks_bf16 = || {
        let mut missing = vec!["bf16 arithmetic"];
        missing.extend((!caps.bf16_products).then_some("bf16 matrix products"));
        missing.extend((!caps.bf16.storage).then_some("bf16 storage"));
        let last = missing.pop().expect("bf16 arithmetic is listed");
        let list = if missing.is_empty() { last.to_string() } else { format!("{} and {last}", missing.join(", ")) };
        if caps.bf16.storage { format!("{list} (it can only store bf16)") } else { list }
    };
    match requested {
        Precision::F32 => ok(ComputeDtype::F32, "f32 was asked for".into(), vec![]),
        Precision::Auto if cpu_backend => ok(
            ComputeDtype::F32,
            "the CPU backend emulates bf16 through f32, which is slower and less exact than f32".into(),
            vec![],
        ),
        Precision::Auto if caps.bf16.arithmetic => ok(
            ComputeDtype::Bf16,
            format!("{adapter} computes bf16, the dtype the model was trained in"),
            vec![],
        ),
        Precision::Auto if products => bf16_products(products_reason()),
        Precision::Auto => ok(ComputeDtype::F32, format!("{adapter} lacks {}", lacks_bf16()), vec![]),
        Precision::Bf16 if caps.bf16.arithmetic && !cpu_backend => {
            ok(ComputeDtype::Bf16, "bf16 was asked for".into(), vec![])
        }
        Precision::Bf16 if products => bf16_products(format!("bf16 was asked for; {}", products_reason())),
        // burn-flex rounds each op's f32 result to bf16: not what "bf16 where the adapter
        // really supports it" promises, and slower than f32.
        Precision::Bf16 if cpu_backend => Err(PrecisionError::Unsupported {
            requested: "bf16",
            adapter: adapter.to_string(),
            missing: "native bf16 arithmetic (it only emulates bf16 through f32)".to_string(),
        }),
        Precision::Bf16 => Err(PrecisionError::Unsupported {
            requested: "bf16",
            adapter: adapter.to_string(),
            missing: lacks_bf16(),
        }),
        Precision::F16 if caps.f16.arithmetic => {
            ok(ComputeDtype::F16, "f16 was asked for".into(), vec![F16_WARNING.into()])
        }
        Precision::F16 => Err(PrecisionError::Unsupported {
            requested: "f16",
            adapter: adapter.to_string(),
            missing: "f16 arithmetic".to_string(),
        }),
    }
}

/// The policy on a real device: [`decide`], then the self-test for a reduced precision. On a
/// failed self-test `auto` falls back to f32 with a warning, an explicit request is an error.
pub fn decide_on_device(
    requested: Precision,
    adapter: &AdapterInfo,
    caps: &Capabilities,
    device: &Device,
) -> Result<PrecisionDecision, PrecisionError> {
    let decision = decide(requested, &adapter.label(), adapter.adapter_type, caps)?;
    let report = if decision.bf16_products() {
        selftest::run_bf16_products(device)
    } else if decision.dtype == ComputeDtype::F32 {
        return Ok(decision);
    } else {
        selftest::run(device, decision.dtype)
    };
    let mut decision = apply_self_test(decision, report, &adapter.label())?;
    if let Some(tiles) = decision.flash {
        // The attention kernel is a second kernel on the matrix hardware: one that fails its
        // own test costs only itself (exact f32 attention), not the products.
        let report = selftest::run_flash(device, tiles);
        if !report.passed {
            decision.warnings.push(format!(
                "{} claims f16 cooperative matrices but failed the attention self-test, {} (error {:.3e} > {:.1e}): exact f32 attention",
                adapter.label(),
                report.what,
                report.error,
                report.tolerance
            ));
            decision.flash = None;
        }
    }
    Ok(decision)
}

/// Takes a self-test's verdict into a reduced-precision decision.
fn apply_self_test(
    mut decision: PrecisionDecision,
    report: SelfTestReport,
    adapter: &str,
) -> Result<PrecisionDecision, PrecisionError> {
    decision.self_test = Some(report.clone());
    if report.passed {
        tracing::debug!(dtype = %decision.dtype, error = report.error, "self-test passed");
        return Ok(decision);
    }
    if decision.requested == Precision::Auto {
        let failed = format!(
            "{adapter} claims {} but failed the self-test (error {:.3e} > {:.1e})",
            report.what, report.error, report.tolerance
        );
        decision.warnings.push(format!("{failed}: falling back to f32"));
        decision.reason = failed;
        decision.dtype = ComputeDtype::F32;
        decision.matmul = ComputeDtype::F32;
        decision.flash = None;
        return Ok(decision);
    }
    Err(PrecisionError::SelfTestFailed {
        requested: decision.requested.as_str(),
        adapter: adapter.to_string(),
        error: report.error,
        tolerance: report.tolerance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Compiler, DtypeSupport};

    /// Every combination of storage/arithmetic/accelerated for f16 and bf16, on every adapter
    /// type, under every request: the policy's whole domain.
    fn all_supports() -> Vec<DtypeSupport> {
        (0..8)
            .map(|bits| DtypeSupport {
                storage: bits & 1 != 0,
                arithmetic: bits & 2 != 0,
                accelerated: bits & 4 != 0,
            })
            .collect()
    }

    const TYPES: [AdapterType; 6] = [
        AdapterType::DiscreteGpu,
        AdapterType::IntegratedGpu,
        AdapterType::VirtualGpu,
        AdapterType::Other,
        AdapterType::Software,
        AdapterType::CpuBackend,
    ];

    #[test]
    fn policy_over_every_capability_set() {
        let full = DtypeSupport { storage: true, arithmetic: true, accelerated: false };
        let mut cases = 0;
        for f16 in all_supports() {
            for bf16 in all_supports() {
                for bf16_products in [false, true] {
                    for flash_tiles in [None, Some(FlashTiles { head: 16, rows: 128 })] {
                        for t in TYPES {
                            let caps = Capabilities { compiler: Compiler::Wgsl, f32: full, f16, bf16, bf16_products, flash_tiles };
                            for req in Precision::ALL {
                                cases += 1;
                                check(req, t, &caps, decide(req, "Card", t, &caps));
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 8 * 8 * 2 * 2 * 6 * 4);
    }

    /// What the policy must give for one request on one adapter.
    fn check(req: Precision, t: AdapterType, caps: &Capabilities, got: Result<PrecisionDecision, PrecisionError>) {
        let (bf16, f16) = (caps.bf16, caps.f16);
        let cpu = t == AdapterType::CpuBackend;
        // bf16 products need the matrix hardware and bf16 buffers for its inputs, on a GPU.
        let products = caps.bf16_products && bf16.storage && !cpu;
        let native_bf16 = bf16.arithmetic && !cpu;
        // Attention on f16 tiles comes with bf16 products only (never with exact f32 or bf16).
        if let Ok(d) = &got {
            assert_eq!(d.flash, if d.bf16_products() { caps.flash_tiles } else { None }, "{req:?} {t:?} {caps:?}");
        }
        match req {
            Precision::F32 => {
                let d = got.unwrap();
                assert_eq!((d.dtype, d.matmul), (ComputeDtype::F32, ComputeDtype::F32));
            }
            Precision::Auto => {
                let d = got.unwrap();
                let want = match (native_bf16, products) {
                    (true, _) => (ComputeDtype::Bf16, ComputeDtype::Bf16),
                    (false, true) => (ComputeDtype::F32, ComputeDtype::Bf16),
                    (false, false) => (ComputeDtype::F32, ComputeDtype::F32),
                };
                assert_eq!((d.dtype, d.matmul), want, "{t:?} {caps:?}");
                assert!(!d.reason.is_empty());
                assert_eq!(d.reason.contains("matrices"), want == (ComputeDtype::F32, ComputeDtype::Bf16), "{}", d.reason);
                // auto never picks f16, and never warns about it
                assert!(d.warnings.iter().all(|w| !w.contains("f16")));
            }
            Precision::Bf16 => match got {
                Ok(d) => {
                    assert!(native_bf16 || products, "{t:?} {caps:?}");
                    let matmul_only = !native_bf16;
                    assert_eq!(d.dtype, if matmul_only { ComputeDtype::F32 } else { ComputeDtype::Bf16 });
                    assert_eq!(d.matmul, ComputeDtype::Bf16);
                    assert_eq!(d.bf16_products(), matmul_only);
                    assert!(d.warnings.is_empty());
                }
                Err(e) => {
                    assert!(!native_bf16 && !products, "{t:?} {caps:?}");
                    let msg = e.to_string();
                    assert!(msg.contains("Card") && msg.contains("bf16 arithmetic"), "{msg}");
                    assert!(!msg.contains('\n'));
                    if !cpu {
                        assert_eq!(msg.contains("only store"), bf16.storage, "{msg}");
                        assert_eq!(msg.contains("bf16 matrix products"), !caps.bf16_products, "{msg}");
                    }
                }
            },
            Precision::F16 => match got {
                Ok(d) => {
                    assert!(f16.arithmetic);
                    assert_eq!((d.dtype, d.matmul), (ComputeDtype::F16, ComputeDtype::F16));
                    assert_eq!(d.warnings, vec![F16_WARNING.to_string()]);
                }
                Err(e) => {
                    assert!(!f16.arithmetic);
                    assert!(e.to_string().contains("f16 arithmetic"));
                }
            },
        }
    }

    fn report(passed: bool) -> SelfTestReport {
        SelfTestReport {
            dtype: ComputeDtype::Bf16,
            what: "bf16 arithmetic".into(),
            error: if passed { 1e-3 } else { 0.9 },
            tolerance: 4e-2,
            passed,
        }
    }

    #[test]
    fn failed_self_test_falls_back_under_auto_and_refuses_explicit_requests() {
        let caps = Capabilities {
            compiler: Compiler::Msl,
            f32: DtypeSupport { storage: true, arithmetic: true, accelerated: false },
            f16: DtypeSupport { storage: true, arithmetic: true, accelerated: false },
            bf16: DtypeSupport { storage: true, arithmetic: true, accelerated: true },
            bf16_products: true,
            flash_tiles: Some(FlashTiles { head: 16, rows: 128 }),
        };
        let auto = decide(Precision::Auto, "Card", AdapterType::IntegratedGpu, &caps).unwrap();
        let passed = apply_self_test(auto.clone(), report(true), "Card").unwrap();
        assert_eq!(passed.dtype, ComputeDtype::Bf16);
        assert!(passed.self_test.unwrap().passed);
        let failed = apply_self_test(auto, report(false), "Card").unwrap();
        assert_eq!(failed.dtype, ComputeDtype::F32);
        assert!(failed.reason.contains("self-test"));
        assert!(failed.warnings[0].contains("falling back to f32"));
        let explicit = decide(Precision::Bf16, "Card", AdapterType::IntegratedGpu, &caps).unwrap();
        let err = apply_self_test(explicit, report(false), "Card").unwrap_err();
        assert!(matches!(err, PrecisionError::SelfTestFailed { requested: "bf16", .. }));
        // Vulkan's shape: bf16 stored and multiplied on the matrix hardware, no bf16 arithmetic.
        let vulkan = Capabilities {
            compiler: Compiler::Spirv,
            bf16: DtypeSupport { storage: true, arithmetic: false, accelerated: true },
            ..caps
        };
        let auto = decide(Precision::Auto, "Card", AdapterType::DiscreteGpu, &vulkan).unwrap();
        assert!(auto.bf16_products(), "{auto:?}");
        assert_eq!(auto.summary(), "f32, bf16 matrix products, f16-tile attention");
        assert_eq!(PrecisionDecision { flash: None, ..auto.clone() }.summary(), "f32, bf16 matrix products");
        let products_failed = SelfTestReport { what: "bf16 matrix products with f32 sums".into(), ..report(false) };
        let failed = apply_self_test(auto, products_failed, "Card").unwrap();
        assert_eq!((failed.dtype, failed.matmul, failed.flash), (ComputeDtype::F32, ComputeDtype::F32, None));
        assert!(failed.reason.contains("bf16 matrix products"), "{}", failed.reason);
        assert_eq!(failed.summary(), "f32");
    }

    #[test]
    fn from_an_image_matches_its_attention() {
        let tiles = FlashTiles { head: 16, rows: 128 };
        let products = PrecisionDecision {
            matmul: ComputeDtype::Bf16,
            flash: Some(tiles),
            ..PrecisionDecision::fixed(Precision::Auto, ComputeDtype::F32)
        };
        // Made with exact f32 attention: the tiles this adapter has are turned off.
        let mut d = products.clone();
        assert_eq!(d.match_attention(false, "Card"), None);
        assert_eq!((d.flash, d.summary().as_str()), (None, "f32, bf16 matrix products"));
        assert!(d.reason.ends_with("attention in exact f32, as the image was made"), "{}", d.reason);
        // Made on f16 tiles, which this decision has: nothing changes.
        let mut d = products.clone();
        assert_eq!(d.match_attention(true, "Card"), None);
        assert_eq!(d, products);
        // Made on f16 tiles, which this decision lacks: a warning, exact attention stays.
        let mut d = PrecisionDecision { flash: None, ..products.clone() };
        let warning = d.match_attention(true, "Card").expect("a warning");
        assert!(warning.contains("Card") && warning.contains("f32, bf16 matrix products"), "{warning}");
        assert_eq!(d.flash, None);
        // Neither: nothing changes.
        let mut d = PrecisionDecision::fixed(Precision::F32, ComputeDtype::F32);
        assert_eq!(d.match_attention(false, "Card"), None);
        assert_eq!(d, PrecisionDecision::fixed(Precision::F32, ComputeDtype::F32));
    }

    #[test]
    fn parses_requests() {
        for p in Precision::ALL {
            assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert!("fp8".parse::<Precision>().is_err());
    }
}
