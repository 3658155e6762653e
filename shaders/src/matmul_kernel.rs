//! Which kernel the GPU's matrix products launch: burn's autotune (the default), or the one
//! kernel `COGVIEW_MATMUL_KERNEL` names.
//!
//! Autotune compiles and times every candidate kernel the first time it meets a shape: on a GPU
//! with cooperative matrices that is a dozen kernels per shape, the bulk of a cold run, and a
//! candidate the driver miscompiles or that never finishes stops the whole run. Naming one kernel
//! (as the autotune log names them, e.g. `matmul_simple_cyclic_cmma`: [`names`]) compiles only
//! it, so a device session can measure each kernel alone, see a cold run without tuning, or get
//! past a candidate that stalls — on a machine without a Rust toolchain, by an environment
//! variable. `autotune` (or unset) keeps burn's choice.
//!
//! It applies to every matrix product cogview launches on a CubeCL adapter: [`crate::matmul`],
//! [`crate::burn_linear`] and [`crate::bf16_product`] (not to the products inside burn's
//! attention and convolution kernels). A product the named kernel cannot launch (a shape or dtype it does
//! not support) falls back to burn's autotune, with a warning. burn's CPU backend ignores it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::{DType, Tensor};
use burn_cubecl::CubeBackend;
use burn::backend::calculate_matmul_output;
use burn_cubecl::kernel::matmul::{MatmulStrategy, init_matmul_output, matmul};
use burn_cubecl::tensor::CubeTensor;
use burn::backend::cubecl::dtype_to_storage_type;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulSetupError};
use cubek::matmul::multi_level::Strategy as Routine;
use cubek::matmul::multi_level::components::tile::TileMatmulKind;
use cubek::matmul::multi_level::routines::TileSizeSelection;
use cubek::matmul::multi_level::routines::batch::double_buffering::DoubleBufferingArgs;
use cubek::matmul::multi_level::routines::batch::double_unit::DoubleUnitSelectionArgs;
use cubek::matmul::multi_level::routines::batch::ordered_double_buffering::OrderedSelectionArgs;
use cubek::matmul::multi_level::routines::batch::simple::SimpleArgs;
use cubek::matmul::multi_level::routines::batch::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::multi_level::routines::gemm::GemmStrategy;
use cubek::matmul::routine::BlueprintStrategy;
use cubek::matmul::strategy::Strategy;
use cubek::std::InputBinding;

/// The environment variable that names the kernel.
pub const VARIABLE: &str = "COGVIEW_MATMUL_KERNEL";

/// The kernels a name can pick: cubek's own choice (`matmul_auto`: its cooperative-matrix kernel,
/// else a unit kernel) and burn's autotune candidates for GPUs (those of burn-cubecl 0.22.1's
/// matmul tune set, without the CPU and TMA ones).
pub fn candidates() -> &'static [Strategy] {
    static ALL: OnceLock<Vec<Strategy>> = OnceLock::new();
    ALL.get_or_init(build)
}

fn build() -> Vec<Strategy> {
    let mut all = vec![Strategy::Auto];
    for tile_size in [TileSizeSelection::MaxTileSize, TileSizeSelection::MinTileSize] {
        all.push(Routine::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs { tile_size })).into());
        all.push(Routine::DoubleUnit(BlueprintStrategy::Inferred(DoubleUnitSelectionArgs { tile_size })).into());
    }
    all.push(Routine::Gemm(BlueprintStrategy::Inferred(GemmStrategy { target_num_planes: None })).into());
    for tile_matmul in [TileMatmulKind::Cmma, TileMatmulKind::Mma] {
        let cmma = tile_matmul == TileMatmulKind::Cmma;
        for multi_rows in [false, true] {
            let args = BlueprintStrategy::Inferred(SimpleArgs { multi_rows, tile_matmul });
            all.push(if cmma { Routine::SimpleCyclicCmma(args) } else { Routine::SimpleCyclicMma(args) }.into());
        }
        for row_count in [4, 8] {
            let args = BlueprintStrategy::Inferred(OrderedSelectionArgs {
                partition_k: Some(2),
                row_count: Some(row_count),
                rows_per_plane: Some(2),
                tile_matmul,
            });
            all.push(if cmma { Routine::OrderedDoubleCmma(args) } else { Routine::OrderedDoubleMma(args) }.into());
        }
        for specialized in [false, true] {
            let args = BlueprintStrategy::Inferred(DoubleBufferingArgs { specialized, tile_matmul });
            all.push(if cmma { Routine::DoubleCyclicCmma(args) } else { Routine::DoubleCyclicMma(args) }.into());
        }
        let args = BlueprintStrategy::Inferred(().into());
        all.push(if cmma { Routine::SpecializedCyclicCmma(args) } else { Routine::SpecializedCyclicMma(args) }.into());
    }
    all
}

/// The names [`parse`] takes: `autotune`, then each candidate's.
pub fn names() -> Vec<String> {
    std::iter::once("autotune".to_string()).chain(candidates().iter().map(Strategy::to_string)).collect()
}

/// `autotune` (or empty) → `None`; a candidate's name → its index in [`candidates`]; anything
/// else → an error listing the names.
pub fn parse(name: &str) -> Result<Option<usize>, String> {
    let name = name.trim();
    if name.is_empty() || name == "autotune" {
        return Ok(None);
    }
    candidates()
        .iter()
        .position(|s| s.to_string() == name)
        .map(Some)
        .ok_or_else(|| format!("{VARIABLE}={name} is not a matmul kernel; use one of: {}", names().join(", ")))
}

/// What [`VARIABLE`] asks for: `Ok(None)` when unset or `autotune`.
pub fn from_env() -> Result<Option<usize>, String> {
    std::env::var(VARIABLE).map_or(Ok(None), |v| parse(&v))
}

/// The kernel this process launches (its index in [`candidates`]), read from [`VARIABLE`] once.
/// A bad name warns and keeps autotune here (the CLI refuses it before anything runs).
pub fn chosen() -> Option<usize> {
    static CHOSEN: OnceLock<Option<usize>> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        from_env().unwrap_or_else(|e| {
            tracing::warn!("{e}; autotune instead");
            None
        })
    })
}

/// Whether `x`'s products go to the named kernel: a CubeCL adapter, and a kernel named.
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().as_dispatch(), burn::backend::DispatchDevice::Cube(_)) && chosen().is_some()
}

/// `lhs · rhs` through the kernel [`chosen`] names (both in one dtype, the output in it too).
///
/// # Shapes
/// - lhs: `[..., m, k]`, rhs: `[..., k, n]` → `[..., m, n]`
pub fn matmul_named<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    matmul_with(lhs, rhs, chosen())
}

/// `lhs · rhs` on a CubeCL adapter through `kernel` (an index in [`candidates`]; `None`:
/// burn's autotune).
///
/// # Shapes
/// - lhs: `[..., m, k]`, rhs: `[..., k, n]` → `[..., m, n]`
pub fn matmul_with<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>, kernel: Option<usize>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::named_matmul(lhs.into_dispatch(), rhs.into_dispatch(), kernel.unwrap_or(usize::MAX)))
}

/// `lhs · rhs` into `out_dtype` through candidate `kernel` (an index in [`candidates`]), or
/// burn's autotune when `kernel` names none or cannot launch.
pub(crate) fn product(kernel: Option<usize>, lhs: CubeTensor, rhs: CubeTensor, out_dtype: DType) -> Result<CubeTensor, MatmulSetupError> {
    let Some(strategy) = kernel.and_then(|k| candidates().get(k)) else {
        return matmul(lhs, rhs, None, MatmulStrategy::default(), out_dtype);
    };
    match launch(strategy, lhs.clone(), rhs.clone(), out_dtype) {
        Ok(out) => Ok(out),
        Err(e) => {
            if FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("{VARIABLE}={strategy} cannot launch a product ({e:?}): burn's autotune for those");
            }
            matmul(lhs, rhs, None, MatmulStrategy::default(), out_dtype)
        }
    }
}

/// `lhs · rhs` into `out_dtype` through `strategy` alone: its setup error (an unavailable
/// feature, an invalid configuration) where it cannot launch, never another kernel.
pub(crate) fn launch(strategy: &Strategy, lhs: CubeTensor, rhs: CubeTensor, out_dtype: DType) -> Result<CubeTensor, MatmulSetupError> {
    let (l, r, o) = (dtype_to_storage_type(lhs.dtype), dtype_to_storage_type(rhs.dtype), dtype_to_storage_type(out_dtype));
    let out = init_matmul_output(&lhs, &rhs, out_dtype);
    let client = out.client.clone();
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: l, rhs: r, out: o });
    let (lhs_in, rhs_in) = (InputBinding::new(lhs.binding(), l), InputBinding::new(rhs.binding(), r));
    cubek::matmul::launch::launch_ref(strategy, &client, lhs_in, rhs_in, out.clone().binding(), &mut dtypes).map(|()| out)
}

/// The candidate called `name` (see [`names`]).
pub(crate) fn named(name: &str) -> Option<&'static Strategy> {
    parse(name).ok().flatten().map(|i| &candidates()[i])
}

static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// How many products a named kernel could not launch in this process (each ran through burn's
/// autotune instead; the first one warns).
pub fn fallbacks() -> usize {
    FALLBACKS.load(Ordering::Relaxed)
}

#[backend_extension(Cube, Fusion)]
pub trait NamedMatmulOps: Backend {
    /// `lhs · rhs` through candidate `kernel` (`usize::MAX`: burn's autotune).
    #[fusion(dtype = lhs, shape = calculate_matmul_output(lhs, rhs).expect("matmul shapes"))]
    fn named_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, kernel: usize) -> FloatTensor<Self>;
}

impl NamedMatmulOps for CubeBackend {
    fn named_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>, kernel: usize) -> FloatTensor<Self> {
        let dtype = lhs.dtype;
        product(Some(kernel), lhs, rhs, dtype).expect("burn's autotune launches a matmul on any adapter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every candidate has its own name, `parse` finds each, and a wrong name is refused with
    /// the list.
    #[test]
    fn names_pick_their_kernels() {
        let names = names();
        assert!(names.len() > 15, "{names:?}");
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for name in &names[1..] {
            assert_eq!(parse(name).unwrap().map(|i| candidates()[i].to_string()).as_deref(), Some(name.as_str()));
        }
        assert!(parse("autotune").unwrap().is_none() && parse("").unwrap().is_none());
        assert!(names.iter().any(|n| n == "matmul_simple_cyclic_cmma"), "{names:?}");
        let err = parse("fastest").unwrap_err();
        assert!(err.contains(VARIABLE) && err.contains("matmul_simple_cyclic_cmma"), "{err}");
    }
}
