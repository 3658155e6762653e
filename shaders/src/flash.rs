//! Attention on a GPU without the score matrix, at any head size: on the matrix hardware
//! ([`attention`]) or in exact f32 ([`exact_attention`]).
//!
//! burn's accelerated flash-attention kernel (cubek-attention's "blackbox accelerated" routine)
//! tiles `q kᵀ` and `p v` on f16 cooperative matrices with f32 sums, and it launches only when
//! the tile divides the head size and a stage of query rows (planes × the tile's rows) divides
//! the sequence. CogView3-Plus has heads of 40 and 4320 tokens at 1024²: neither holds, the
//! kernel reports an invalid configuration, and burn quietly runs its fallback instead, which
//! materialises `[N, H, T, T]` f32 scores (4.8 GB per image, past the 2 GiB binding limit), so
//! the transformer had to split its heads into groups.
//!
//! [`attention`] pads the problem to the tiles, which changes nothing but rounding:
//! - **head size**: q, k and v get zero columns up to a multiple of the tile (40 → 48). Zero
//!   columns add nothing to `q·k` and give zero output columns, which are cut off. The kernel
//!   scales by `1/√48`, so q is multiplied by `√(48/40)` first: the scores are `q·k/√40`.
//! - **query rows**: zero rows up to a multiple of the largest stage burn's autotune tries
//!   (8 planes); their output rows are cut off. Keys are not padded: the kernel bounds-checks
//!   them, and a padded key would take a share of every softmax.
//! - **f16 range**: q and k come out of the transformer's LayerNorm without affine parameters
//!   (`qk_norm`), so every element of a head has `|x| ≤ √(hd − 1)` (6.2 at 40; 6.8 after the
//!   `√(48/40)`), far inside f16's 65504, and the score sums are f32. v is not normalised, and
//!   CogView3-Plus's activations do pass 65504 (why f16 gives black images), so each column of
//!   v (one of a head's 40 values, over the tokens) is divided by its largest magnitude before
//!   the kernel and the output's column multiplied back by it: the softmax weights are in
//!   `[0, 1]` and sum to one, so every f16 operand (v, and the weights) is at most 1 and every
//!   output at most its column's largest magnitude. A NaN or an infinity in v makes its
//!   column's divisor NaN or infinite (or the quotient inf/inf), so the output is NaN and the
//!   non-finite guard stops the run.
//! - **dtype**: the kernel reads q, k and v in its tiles' dtype and writes its output in it, so
//!   they are cast to f16 before it and the output (at most 1) back to f32. Given f32 inputs it
//!   reports an invalid configuration too, and burn's quiet fallback would materialise the
//!   scores after all.
//! - **a shape the kernel still refuses** (tiles an adapter lists that the padding did not
//!   foresee): burn's attention would run that same fallback without a word, so the first call
//!   at each shape launches the kernel itself, and where it cannot, exact f32 attention runs
//!   instead, with a warning ([`FlashTilesOps`]; the self-test then fails, see [`launched`]).
//!
//! f16 keeps 11 significant bits (bf16 8), so this is more exact than the bf16 linear products
//! it runs beside. It is used only with those products ([`FlashTiles`] comes with the precision
//! decision); the f32 path keeps exact f32 attention, [`exact_attention`]: burn's unit flash
//! kernel, which has no matrix hardware but no score matrix either, or burn's attention in head
//! groups, whichever CubeCL's autotune finds faster on the adapter.
//!
//! On burn's CPU backend the same numbers are emulated: the padded, scaled q, k and v rounded to
//! f16, then the exact-softmax kernel of [`crate::attention`] in f32, its output rounded to f16.
//! The kernel also rounds the softmax weights to f16 for `p v` (relative 2^-11 on weights that
//! sum to one), which the emulation does not. The plain-burn reference is burn's `attention` on
//! the unpadded f32 inputs, [`attention_reference`].

use burn::backend::ops::{FloatTensorOps, ModuleOps};
use burn::backend::ops::attention::attention_fallback;
use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor};
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::{DType, Device, FloatDType, Shape, Slice, Tensor};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeDevice, CubeTuneId};
use cubecl::AutotuneKey;
use cubecl::tune::{LocalTuner, Tunable, TunableSet, TuneGroup, local_tuner};
use burn_cubecl::kernel::attention::flash_attention;
use cubecl::ir::{ElemType, FloatKind};
use cubek::attention::forward::launch::{BlueprintStrategy, Strategy};
use cubek::attention::forward::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;

/// The multiples [`attention`] pads to for one adapter's f16 cooperative matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FlashTiles {
    /// Head size (and value size) multiple: the largest tile side along `k` or `n`.
    pub head: usize,
    /// Query-row multiple: 8 planes (the most burn's autotune tries) × the largest tile's rows.
    pub rows: usize,
}

impl FlashTiles {
    /// `(head size, queries)` that `t` queries of head size `hd` are padded to.
    fn padded(&self, t: usize, hd: usize) -> (usize, usize) {
        (hd.next_multiple_of(self.head), t.next_multiple_of(self.rows))
    }
}

/// The tiles of `device`'s f16 × f16 → f32 cooperative-matrix configurations, the ones burn's
/// accelerated flash attention needs; `None` where the driver lists none (and always on burn's
/// CPU backend).
pub fn tiles(device: &Device) -> Option<FlashTiles> {
    let burn::backend::DispatchDevice::Cube(d) = device.as_dispatch() else { return None };
    let (f16, f32) = (ElemType::Float(FloatKind::F16), ElemType::Float(FloatKind::F32));
    let client = d.client();
    let configs: Vec<_> = client.properties().features.matmul.cmma.iter().filter(|c| c.a_type == f16 && c.b_type == f16 && c.cd_type == f32).cloned().collect();
    // Tile sides are powers of two, so the largest is a multiple of every other.
    let head = configs.iter().map(|c| c.k.max(c.n)).max()? as usize;
    let rows = 8 * configs.iter().map(|c| c.m).max()? as usize;
    Some(FlashTiles { head, rows })
}

/// `softmax(q kᵀ / √hd) v` per image and head, no mask, on f16 tiles with f32 sums, in one call
/// (no head groups, no score matrix). For the transformer's normalised q and k (see the module
/// doc); the output is f32.
///
/// # Shapes
/// - q, k, v: `[N, H, T, hd]` (f32) → `[N, H, T, hd]` (f32)
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, tiles: FlashTiles) -> Tensor<4> {
    padded(q, k, v, tiles, true)
}

/// Whether [`attention`] on `device` with these tiles ran burn's accelerated kernel for q and k
/// of these shapes (`None`: not run there at these shapes yet, or not a CubeCL device). Where it
/// did not, exact f32 attention ran in its place (see [`FlashTilesOps`]).
pub fn launched(device: &Device, q: [usize; 4], k: [usize; 4], tiles: FlashTiles) -> Option<bool> {
    let burn::backend::DispatchDevice::Cube(d) = device.as_dispatch() else { return None };
    let [n, h, t, hd] = q;
    let (hd_pad, t_pad) = tiles.padded(t, hd);
    let key = (d.clone(), vec![n, h, t_pad, hd_pad], vec![k[0], k[1], k[2], hd_pad]);
    LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied()
}

/// The plain-burn reference for [`attention`]: burn's attention on the unpadded inputs.
///
/// # Shapes
/// - as [`attention`]
pub fn attention_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    burn_attention(q, k, v, None, None, OPTIONS)
}

/// Which kernel [`exact_attention`] runs. Both are exact f32 with no `[N, H, T, T]` score
/// matrix in one call; which is faster depends on the adapter: burn's unit flash kernel has no
/// score matrix at all but gives each unit eight query rows of 40 in registers and multiplies
/// without matrix hardware, while the head groups run burn's tuned matrix products and write
/// one group's scores (within the caller's budget) to memory and read them back twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExactKernel {
    /// The faster of the other two for this shape on this adapter: CubeCL's autotune times
    /// both once and keeps its choice with the other tuning results (the kernel cache), so
    /// a later process does not time them again.
    Tuned,
    /// burn's unit flash kernel; the head groups where it cannot launch (no plane operations).
    Unit,
    /// burn's attention fallback, `group` heads a call.
    Groups,
}

/// By its name (`unit_flash`, `head_groups`), as in the tuning results.
impl serde::Serialize for ExactKernel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl std::fmt::Display for ExactKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The candidates' names in the tuning results: a renamed candidate is tuned again.
        f.write_str(match self {
            ExactKernel::Tuned => "tuned",
            ExactKernel::Unit => "unit_flash",
            ExactKernel::Groups => "head_groups",
        })
    }
}

/// `softmax(q kᵀ / √hd) v` in exact f32 without the whole score matrix on a GPU, by `kernel`
/// ([`ExactKernel`]): burn's unit flash kernel (f32 registers and sums, no matrix hardware),
/// launched directly, or burn's attention fallback in groups of `group` heads, each group's
/// scores within the caller's budget; the model asks for the faster of the two. burn's own
/// attention would try its accelerated kernel first on an adapter with f16 cooperative
/// matrices, which at head size 40 cannot launch and silently degrades to the fallback on
/// every head's scores at once. For CubeCL devices only (burn's CPU backend has
/// `crate::attention`).
///
/// # Shapes
/// - q, k, v: `[N, H, T, hd]` (f32) → `[N, H, T, hd]` (f32)
pub fn exact_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, group: usize, kernel: ExactKernel) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::exact_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), group.max(1), kernel))
}

/// The kernel [`ExactKernel::Tuned`] runs on `device` for q and k of these shapes and this
/// group size: `None` until it has run there at such shapes (or on a device that is not
/// CubeCL's).
pub fn exact_kernel(device: &Device, q: [usize; 4], k: [usize; 4], group: usize) -> Option<ExactKernel> {
    let burn::backend::DispatchDevice::Cube(d) = device.as_dispatch() else { return None };
    let client = d.client();
    let id = CubeTuneId::new(&client, d);
    let key = exact_key(&q, &k, group.max(1));
    EXACT_TUNER.fastest_identity(&id, &EXACT_TUNER.init(&id, exact_candidates), &key)
}

/// The shapes the choice of [`ExactKernel::Tuned`] is kept for: counts to the nearest power
/// of two (a new image size rarely needs a new timing), head size and group exact.
#[derive(Hash, Eq, PartialEq, Debug, Clone, serde::Serialize, serde::Deserialize, AutotuneKey)]
pub struct ExactAttentionKey {
    /// Images × heads.
    #[autotune(anchor)]
    batches: usize,
    #[autotune(anchor)]
    queries: usize,
    #[autotune(anchor)]
    keys: usize,
    head_dim: usize,
    group: usize,
}

/// The key of q and k of these shapes and this group size.
fn exact_key(q: &[usize], k: &[usize], group: usize) -> ExactAttentionKey {
    ExactAttentionKey::new(q[0] * q[1], q[2], k[2], q[3], group)
}

/// q, k, v and the group size.
type ExactInputs = (CubeTensor, CubeTensor, CubeTensor, usize);

static EXACT_TUNER: LocalTuner<ExactAttentionKey, CubeTuneId> = local_tuner!();

/// [`ExactKernel::Tuned`]'s candidates, both timed for every key (one group, one priority).
/// The head groups come first: they launch everywhere.
fn exact_candidates() -> TunableSet<ExactAttentionKey, ExactInputs, CubeTensor, ExactKernel> {
    let key = |(q, k, _, group): &ExactInputs| exact_key(q.meta.shape(), k.meta.shape(), *group);
    let both = TuneGroup::<ExactAttentionKey>::new("exact_attention", |_| 1);
    TunableSet::new_cloning_inputs(key)
        .with(Tunable::identified(ExactKernel::Groups, |(q, k, v, group)| Ok::<_, String>(head_groups(q, k, v, group))).group(&both, |_| 1))
        .with(Tunable::identified(ExactKernel::Unit, |(q, k, v, _)| unit_flash(q, k, v)).group(&both, |_| 1))
}

/// burn's unit flash kernel, or why it cannot launch.
fn unit_flash(q: CubeTensor, k: CubeTensor, v: CubeTensor) -> Result<CubeTensor, String> {
    let unit = Strategy::Unit(BlueprintStrategy::Inferred(()));
    flash_attention(q, k, v, None, None, OPTIONS, unit).map_err(|e| format!("{e:?}"))
}

/// burn's attention fallback (scores, softmax, product) on `group` heads a call.
fn head_groups(q: CubeTensor, k: CubeTensor, v: CubeTensor, group: usize) -> CubeTensor {
    type B = CubeBackend;
    let heads = q.meta.shape()[1];
    let parts = (0..heads)
        .step_by(group)
        .map(|start| {
            let heads = Slice::from(start..(start + group).min(heads));
            let cut = |t: &CubeTensor| B::float_slice(t.clone(), &[Slice::from(..), heads, Slice::from(..), Slice::from(..)]);
            attention_fallback::<B>(cut(&q), cut(&k), cut(&v), None, None, OPTIONS)
        })
        .collect();
    B::float_cat(parts, 1)
}

/// The default scale `1/√hd`, no mask, no softcap, not causal.
const OPTIONS: AttentionModuleOptions = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };

#[backend_extension(Cube, Fusion)]
pub trait ExactAttentionOps: Backend {
    /// Exact f32 attention with the default scale and no mask, by `kernel` (see
    /// [`ExactKernel`]), `group` heads a call where it runs the head groups.
    #[fusion(dtype = burn::tensor::DType::F32, shape = Shape::new([q[0], q[1], q[2], v[3]]))]
    fn exact_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, group: usize, kernel: ExactKernel) -> FloatTensor<Self>;
}

impl ExactAttentionOps for CubeBackend {
    fn exact_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, group: usize, kernel: ExactKernel) -> FloatTensor<Self> {
        match kernel {
            ExactKernel::Tuned => {
                let client = q.client.clone();
                let id = CubeTuneId::new(&client, &q.device);
                let candidates = EXACT_TUNER.init(&id, exact_candidates);
                EXACT_TUNER.execute(&id, &client, candidates, (q, k, v, group))
            }
            ExactKernel::Unit => unit_flash(q.clone(), k.clone(), v.clone()).unwrap_or_else(|e| {
                tracing::debug!("unit flash attention cannot launch ({e}): the fallback in groups of {group} heads");
                head_groups(q, k, v, group)
            }),
            ExactKernel::Groups => head_groups(q, k, v, group),
        }
    }
}

#[backend_extension(Cube, Fusion)]
pub trait FlashTilesOps: Backend {
    /// Flash attention with the default scale and no mask on f16 tiles (f16 in and out) where
    /// burn's accelerated kernel launches at this shape, exact f32 attention where it does not.
    #[fusion(dtype = burn::tensor::DType::F16, shape = Shape::new([q[0], q[1], q[2], v[3]]))]
    fn flash_tiles(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Whether burn's accelerated flash kernel launched, by device and q and k shapes.
type Launches = std::collections::HashMap<(CubeDevice, Vec<usize>, Vec<usize>), bool>;
static LAUNCHES: std::sync::LazyLock<std::sync::Mutex<Launches>> = std::sync::LazyLock::new(Default::default);

impl FlashTilesOps for CubeBackend {
    /// burn's attention tunes its accelerated kernel (2, 4 and 8 planes) but runs its fallback,
    /// which materialises every head's scores (4.8 GB at 1024², past a 2 GiB binding), for
    /// any configuration the kernel calls invalid, and says nothing. The padding is meant to
    /// leave it none, but the tiles an adapter lists are not known here in advance. So the
    /// first call at each shape launches the kernel itself (8 planes: the padded rows are a
    /// multiple of 8 planes' stage, so 2 and 4 launch where 8 does) and keeps its output; later
    /// calls go through burn's tuning where it launched, and to exact f32 attention (burn's
    /// unit flash kernel, no score matrix either) where it did not, with a warning.
    fn flash_tiles(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>) -> FloatTensor<Self> {
        let key = (q.device.clone(), q.meta.shape().to_vec(), k.meta.shape().to_vec());
        let known = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
        let exact = |q, k, v| {
            let f32 = |x| Self::float_cast(x, FloatDType::F32);
            // The unit kernel: no scores, which the plan of a run on f16 tiles has no room for.
            // Its fallback in groups of 1 is for an adapter without plane operations, which
            // one with cooperative matrices does not lack.
            Self::float_cast(Self::exact_attention(f32(q), f32(k), f32(v), 1, ExactKernel::Unit), FloatDType::F16)
        };
        match known {
            Some(true) => Self::attention(q, k, v, None, None, OPTIONS),
            Some(false) => exact(q, k, v),
            None => {
                let planes = BlackboxAcceleratedStrategy { num_planes: 8, seq_q: 1, seq_kv: 1 };
                let strategy = Strategy::BlackboxAccelerated(BlueprintStrategy::Inferred(planes));
                // A launch is queued, not run: a driver that refuses the kernel's pipeline fails
                // it later, at the first read of its output. So one element is read back here
                // (a wait for the device, once per shape).
                let launched = flash_attention(q.clone(), k.clone(), v.clone(), None, None, OPTIONS, strategy)
                    .map_err(|e| format!("{e:?}"))
                    .and_then(|o| {
                        let first = Self::float_slice(o.clone(), &[Slice::from(0..1); 4]);
                        burn::tensor::read_sync(Self::float_into_data(first)).map(|_| o).map_err(|e| format!("{e:?}"))
                    });
                LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).insert(key, launched.is_ok());
                launched.unwrap_or_else(|e| {
                    tracing::warn!("attention on f16 tiles cannot run at q {:?}, k {:?} ({e}): exact f32 attention instead", q.meta.shape(), k.meta.shape());
                    exact(q, k, v)
                })
            }
        }
    }
}

/// [`attention`], with the emulation's f16 rounding on burn's CPU backend when `round` (tests
/// turn it off to check the padding alone, which must then be exact).
fn padded(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, tiles: FlashTiles, round: bool) -> Tensor<4> {
    let [n, h, t, hd] = q.dims();
    let (hd_pad, t_pad) = tiles.padded(t, hd);
    // Zero rows up to `rows`, zero columns up to `hd_pad`.
    let pad = |x: Tensor<4>, rows: usize| x.pad([(0, rows - t), (0, hd_pad - hd)], PadMode::Constant(0.0));
    // The divisor of v: each of its columns' largest magnitude over the tokens (f32's smallest
    // normal for an all-zero column). The output's column is a weighted mean of v's, so it is
    // multiplied back by the same number; one reduction over one dim, where v's largest
    // magnitude overall took one per dim.
    let v_max = v.clone().abs().max_dim(2).clamp_min(f32::MIN_POSITIVE); // [N, H, 1, hd]
    let q = q.mul_scalar((hd_pad as f64 / hd as f64).sqrt());
    let v = v / v_max.clone();
    let o = match q.device().as_dispatch() {
        burn::backend::DispatchDevice::Flex(_) => {
            let f16 = |x: Tensor<4>| if round { x.cast(DType::F16).cast(DType::F32) } else { x };
            let (q, k, v) = (pad(q, t_pad), pad(k, t), pad(v, t));
            f16(crate::attention::attention(f16(q), f16(k), f16(v), None, 1.0 / (hd_pad as f64).sqrt()))
        }
        // The kernel's inputs must already be in its tiles' dtype: given f32, it reports an
        // invalid configuration ("Query global and tile types must be the same") and burn
        // silently runs its fallback, which materialises every head's scores (seen on lavapipe
        // with Mesa 26's cooperative matrices). Cast before the padding, which then moves half
        // the bytes, and the scaling of q and v joins the cast's kernel.
        _ => {
            let f16 = |x: Tensor<4>, rows: usize| pad(x.cast(DType::F16), rows).into_dispatch();
            Tensor::<4>::from_dispatch(Dispatch::flash_tiles(f16(q, t_pad), f16(k, t), f16(v, t))).cast(DType::F32)
        }
    };
    o.slice([0..n, 0..h, 0..t, 0..hd]) * v_max
}

/// How far [`attention`] on f16 tiles may be from [`attention_reference`], relative to the
/// output's largest magnitude (v past f16's range included, as it is scaled). f16 inputs
/// (relative rounding 2^-11 = 4.9e-4 each). A score `q·k/√hd` with `|q| = |k| =
/// √hd` moves by at most `2 · 2^-11 · √hd` (3.1e-3 at hd 40), which moves each softmax
/// weight by at most twice that, relative: the output, a weighted mean of v, by at most
/// `4 · 2^-11 · √hd + 2^-11` of v's largest magnitude = 1.3e-2 at hd 40; the GPU kernel also
/// rounds the softmax weights to f16 for `p v` (2^-11 more) and writes an f16 output of
/// magnitude at most 1 (2^-12 more): 1.4e-2. Rounded up to 2e-2. (Measured: about 2e-4
/// emulated, 5e-4 on lavapipe's f16 tiles; the bound adds every rounding with one sign.)
pub const F16_TILES_TOL: f32 = 2e-2;

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// A LayerNorm (no affine) over each head, as the transformer's q and k get.
    fn normalised(x: Tensor<4>) -> Tensor<4> {
        let mean = x.clone().mean_dim(3);
        let centred = x - mean;
        let var = centred.clone().square().mean_dim(3);
        centred / (var + 1e-6).sqrt()
    }

    /// Smooth values of both signs, `scale` at most.
    fn tensor(dims: [usize; 4], seed: f32, scale: f32, device: &Device) -> Tensor<4> {
        let len = dims.iter().product();
        let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.618 + seed).sin() * (i as f32 * 0.071 + seed).cos() * scale).collect();
        Tensor::from_data(TensorData::new(v, dims), device)
    }

    fn inputs(dims: [usize; 4], v_scale: f32, device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        // Scores of a few units, as in the transformer: normalised q and k are √hd long.
        (normalised(tensor(dims, 0.3, 1.0, device)), normalised(tensor(dims, 1.9, 1.0, device)), tensor(dims, 2.7, v_scale, device))
    }

    /// The largest difference, relative to the reference's largest magnitude.
    fn distance(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / scale
    }

    /// f32 rounding of the padded problem against the unpadded one: the zero columns add exact
    /// zeros, the folded scale and v's divisor each round once (2^-24), the softmax sums 70 keys.
    const PADDING_TOL: f32 = 1e-5;

    /// Padding alone (no f16 rounding) is exact: head sizes that are and are not multiples of
    /// the tile, token counts that are and are not multiples of the stage, one and two images.
    #[test]
    fn padding_changes_nothing() {
        let device = Device::flex();
        let tiles = FlashTiles { head: 16, rows: 32 };
        for dims in [[1, 2, 70, 40], [2, 3, 32, 16], [1, 1, 5, 8]] {
            let (q, k, v) = inputs(dims, 3.0, &device);
            let want = values(attention_reference(q.clone(), k.clone(), v.clone()));
            let got = padded(q, k, v, tiles, false);
            assert_eq!(got.dims(), dims);
            let err = distance(&values(got), &want);
            assert!(err <= PADDING_TOL, "{dims:?}: {err:.2e}");
        }
    }

    /// The emulated f16 tiles: within the derived tolerance of the f32 reference, and really
    /// rounded (farther from it than f32 rounding).
    #[test]
    fn f16_tiles_match_the_reference() {
        let device = Device::flex();
        let tiles = FlashTiles { head: 16, rows: 128 };
        let (q, k, v) = inputs([2, 4, 300, 40], 3.0, &device);
        let want = values(attention_reference(q.clone(), k.clone(), v.clone()));
        let err = distance(&values(attention(q, k, v, tiles)), &want);
        assert!(err <= F16_TILES_TOL && err > PADDING_TOL, "{err:.2e}");
    }

    /// Values past f16's range (1e6) are scaled into it: the output is finite and as exact as
    /// at any other scale; unscaled, the same values round to infinity in f16.
    #[test]
    fn values_past_the_f16_range_stay_finite() {
        let device = Device::flex();
        let tiles = FlashTiles { head: 16, rows: 32 };
        let (q, k, v) = inputs([1, 2, 40, 40], 1e6, &device);
        assert!(values(v.clone().cast(DType::F16).cast(DType::F32)).iter().any(|x| x.is_infinite()), "the test's v must overflow f16");
        let want = values(attention_reference(q.clone(), k.clone(), v.clone()));
        let got = values(attention(q, k, v, tiles));
        assert!(got.iter().all(|x| x.is_finite()));
        let err = distance(&got, &want);
        assert!(err <= F16_TILES_TOL, "{err:.2e}");
    }

    /// A NaN in v reaches the output (the guard downstream must see it), and an all-zero v gives
    /// zeros (the divisor is never zero).
    #[test]
    fn nan_spreads_and_zero_stays_zero() {
        let device = Device::flex();
        let tiles = FlashTiles { head: 16, rows: 32 };
        let (q, k, v) = inputs([1, 1, 8, 8], 1.0, &device);
        let mut raw = values(v.clone());
        raw[5] = f32::NAN;
        let v_nan = Tensor::from_data(TensorData::new(raw, [1, 1, 8, 8]), &device);
        assert!(values(attention(q.clone(), k.clone(), v_nan, tiles)).iter().any(|x| x.is_nan()));
        assert!(values(attention(q, k, v.zeros_like(), tiles)).iter().all(|&x| x == 0.0));
    }
}
