//! Custom kernels for cogview, each beside a plain-burn reference and a parity test.
//!
//! - GPU: `#[cube]` functions (so they compile to WGSL, SPIR-V and MSL, whichever compiler the
//!   adapter got), launched through a burn backend extension (so they run under burn's fusion
//!   like any other op): [`bf16`], [`bf16_product`] (burn-cubecl's matmul with bf16 inputs and an
//!   f32 output, emulated on the CPU backend). [`flash`] is plain burn around burn's accelerated
//!   flash attention (the padding that lets it launch at the transformer's head size) and an
//!   extension that launches its exact f32 unit kernel directly. [`matmul_kernel`]: one named
//!   matrix-product kernel instead of burn's autotune (`COGVIEW_MATMUL_KERNEL`).
//! - burn's CPU backend (burn-flex): host code on its tensors' memory, through the same kind of
//!   extension, where burn-flex's own ops leave most of the machine idle. Its elementwise ops
//!   run on one thread and its convolution copies nine times its input: [`conv`], [`linear`],
//!   [`attention`], [`group_norm`], [`layer_norm`], [`gelu`]. Each says with an `applies`
//!   function when it is used; models call burn's op otherwise.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData};

pub mod attention;
pub mod bf16;
pub mod bf16_product;
pub mod conv;
pub mod flash;
pub mod gelu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod matmul_kernel;

/// `lhs · rhs` (burn's `matmul`), with both operands in one dtype.
///
/// burn accepts two dtypes and reads the right-hand side as if it had the left-hand one's:
/// garbage, silently. So every matrix product in cogview is this, [`burn_linear`], a CPU kernel
/// here (f32 only), or [`bf16_product`] (whose kernel takes its dtypes explicitly); the test
/// `every_product_checks_its_dtypes` scans the sources for any other.
///
/// # Shapes
/// - lhs: `[..., m, k]`, rhs: `[..., k, n]` → `[..., m, n]`
pub fn matmul<const D: usize>(lhs: Tensor<D>, rhs: Tensor<D>) -> Tensor<D> {
    same_dtype("matmul", &[lhs.dtype(), rhs.dtype()]);
    if matmul_kernel::applies(&lhs) {
        return matmul_kernel::matmul_named(lhs, rhs);
    }
    lhs.matmul(rhs)
}

/// burn's `linear` (`x · weight_t + bias`), with every operand in one dtype (see [`matmul`]).
///
/// # Shapes
/// - x: `[rows, d_in]`, weight_t: `[d_in, d_out]`, bias: `[d_out]` → `[rows, d_out]`
pub fn burn_linear(x: Tensor<2>, weight_t: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    let mut dtypes = vec![x.dtype(), weight_t.dtype()];
    dtypes.extend(bias.as_ref().map(Tensor::dtype));
    same_dtype("linear", &dtypes);
    if matmul_kernel::applies(&x) {
        let y = matmul_kernel::matmul_named(x, weight_t);
        return match bias {
            Some(bias) => y + bias.unsqueeze(),
            None => y,
        };
    }
    burn::tensor::module::linear(x, weight_t, bias)
}

/// Panics (a bug in cogview, not bad input) unless all `dtypes` are one.
fn same_dtype(op: &str, dtypes: &[DType]) {
    assert!(dtypes.windows(2).all(|w| w[0] == w[1]), "{op} on mixed dtypes {dtypes:?}: burn would read them all as {:?}", dtypes[0]);
}

/// Whether `x` is a non-empty f32 tensor on burn's CPU backend, where the host kernels run
/// (they split tensors into rows, groups or planes; an empty one is left to burn's ops).
pub fn on_cpu_f32<const D: usize>(x: &Tensor<D>) -> bool {
    matches!(x.device().as_dispatch(), burn::backend::DispatchDevice::Flex(_))
        && x.dtype() == DType::F32
        && x.shape().num_elements() > 0
}

/// The mean and biased variance of `values`, in f64: two passes, so that the variance has no
/// cancellation of `E[x²] - E[x]²` (the norms' statistics).
fn mean_var(values: &[f32]) -> (f64, f64) {
    let len = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / len;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
    (mean, var)
}

/// An f32 burn-flex tensor as a contiguous buffer a host kernel may overwrite: the same memory
/// when nothing else holds it, else a copy.
fn owned_f32(x: FlexTensor) -> FlexTensor {
    let contiguous = x.to_contiguous();
    drop(x);
    if contiguous.is_unique() {
        contiguous
    } else {
        let shape = contiguous.layout().shape().clone();
        FlexTensor::from_data(TensorData::new(contiguous.storage::<f32>().to_vec(), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// burn's matrix products called directly in `code`: `.matmul(` and `module::linear(` outside
    /// comments and test modules, as `line: text`.
    fn unchecked_products(code: &str) -> Vec<String> {
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        code.lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.split("//").next().unwrap_or_default()))
            .filter(|(_, line)| line.contains(".matmul(") || line.contains("module::linear("))
            .map(|(n, line)| format!("{n}: {}", line.trim()))
            .collect()
    }

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// No library code calls burn's `matmul` or `linear` but the checked wrappers above: so no
    /// product ever runs on two dtypes (the wrappers assert it; `bf16_product` names its dtypes
    /// to burn-cubecl's kernel). Positive control first: the scan finds what it looks for.
    #[test]
    fn every_product_checks_its_dtypes() {
        let planted = "let y = a.matmul(b); // a.matmul(c)\nlet z = burn::tensor::module::linear(x, w, None);\n#[cfg(test)]\nx.matmul(y)";
        assert_eq!(unchecked_products(planted), vec!["1: let y = a.matmul(b);", "2: let z = burn::tensor::module::linear(x, w, None);"]);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        sources(&root.join("shaders/src"), &mut files);
        for krate in std::fs::read_dir(root.join("crates")).unwrap() {
            sources(&krate.unwrap().path().join("src"), &mut files);
        }
        assert!(files.len() > 30, "the scan must see the workspace: {} files", files.len());
        let this = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
        let found: Vec<String> = files
            .iter()
            .filter(|f| **f != this)
            .flat_map(|f| unchecked_products(&std::fs::read_to_string(f).unwrap()).into_iter().map(move |l| format!("{}:{l}", f.display())))
            .collect();
        assert!(found.is_empty(), "matrix products that bypass the dtype check:\n{}", found.join("\n"));
    }

    #[test]
    #[should_panic(expected = "matmul on mixed dtypes [F32, BF16]")]
    fn a_product_of_two_dtypes_is_refused() {
        let device = burn::tensor::Device::flex();
        let a = Tensor::<2>::ones([2, 2], &device);
        let _ = matmul(a.clone(), a.cast(DType::BF16));
    }
}
