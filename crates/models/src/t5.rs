//! The T5 encoder (google/t5-v1_1-xxl in CogView3-Plus), as transformers' `T5EncoderModel`.
//!
//! Reference: huggingface/transformers `src/transformers/models/t5/modeling_t5.py` and
//! `configuration_t5.py`. No attention mask (the pipeline passes none, so pad tokens take
//! part), no 1/sqrt(d) scaling (T5 folds it into the init), a relative position bias computed
//! from block 0's table and shared by every block, RMS norms with f32 statistics, a gated
//! tanh-GELU feed-forward.
//!
//! The blocks are separate so the runtime can stream them (load one, run it, free it).

use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use serde::Deserialize;

use crate::nn::{Linear, gelu_tanh, rms_norm};
use crate::probe::Probe;
use crate::weights::WeightSource;

/// `text_encoder/config.json` (transformers `T5Config`), the keys the encoder uses.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct T5Config {
    pub d_model: usize,
    pub d_ff: usize,
    pub d_kv: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub relative_attention_num_buckets: usize,
    /// Absent from configs written before transformers 4.10; transformers' default then.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `"gated-gelu"` (T5 v1.1), `"relu"` (T5 v1.0), `"gated-relu"`, `"gelu"`, ...
    pub feed_forward_proj: FeedForward,
}

fn default_max_distance() -> usize {
    128
}

impl T5Config {
    /// google/t5-v1_1-xxl, CogView3-Plus-3B's text encoder.
    pub fn t5_v1_1_xxl() -> Self {
        Self {
            d_model: 4096,
            d_ff: 10240,
            d_kv: 64,
            num_heads: 64,
            num_layers: 24,
            vocab_size: 32128,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: FeedForward { gated: true, act: Activation::GeluTanh },
        }
    }

    /// A tiny T5 of the same kind, the shape of the tests' `base` fixture.
    pub fn tiny() -> Self {
        Self { d_model: 32, d_ff: 64, d_kv: 8, num_heads: 4, num_layers: 2, vocab_size: 448, ..Self::t5_v1_1_xxl() }
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("d_kv", self.d_kv),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{key}` must be positive"));
        }
        if self.relative_attention_num_buckets < 4 || !self.relative_attention_num_buckets.is_multiple_of(2) {
            return Err(format!("relative_attention_num_buckets {} must be even and at least 4", self.relative_attention_num_buckets));
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err("relative_attention_max_distance must exceed num_buckets / 4".into());
        }
        Ok(())
    }
}

/// `feed_forward_proj`: whether the feed-forward is gated (`wi_0`, `wi_1`), and its activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedForward {
    pub gated: bool,
    pub act: Activation,
}

/// As transformers' `T5Config` reads it: an optional `gated-` prefix, then the activation's
/// name, where `gated-gelu` means the tanh approximation (`gelu_new`) for backward
/// compatibility. Anything else is an error naming the key.
impl std::str::FromStr for FeedForward {
    type Err = String;
    fn from_str(proj: &str) -> Result<Self, String> {
        let (gated, name) = match proj.strip_prefix("gated-") {
            Some(name) => (true, name),
            None => (false, proj),
        };
        let act = match (proj, name) {
            ("gated-gelu", _) | (_, "gelu_new") => Activation::GeluTanh,
            (_, "gelu") => Activation::Gelu,
            (_, "relu") => Activation::Relu,
            _ => {
                return Err(format!(
                    "feed_forward_proj `{proj}` is not supported (supported: gated-gelu, gelu, gelu_new, gated-relu, relu)"
                ));
            }
        };
        Ok(Self { gated, act })
    }
}

impl std::fmt::Display for FeedForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.gated, self.act) {
            (true, Activation::GeluTanh) => "gelu",
            (_, Activation::GeluTanh) => "gelu_new",
            (_, Activation::Gelu) => "gelu",
            (_, Activation::Relu) => "relu",
        };
        write!(f, "{}{name}", if self.gated { "gated-" } else { "" })
    }
}

impl<'de> Deserialize<'de> for FeedForward {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`: the tanh approximation.
    GeluTanh,
    /// The exact (erf) GELU.
    Gelu,
    Relu,
}

/// The relative-position bucket of `key - query` (bidirectional), computed as transformers
/// does: the log in f32, then truncated toward zero.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> usize {
    let num_buckets = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { num_buckets } else { 0 };
    let n = relative_position.abs();
    let max_exact = num_buckets / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // torch: log(n.float() / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact),
        // all in f32 (the Python doubles are rounded to f32 when they meet the f32 tensor).
        let log_ratio = (n as f32 / max_exact as f32).ln();
        let denominator = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio / denominator * (num_buckets - max_exact) as f32) as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket as usize
}

/// One encoder block: self-attention, then feed-forward, each with a pre-norm and a residual.
#[derive(Clone, Debug)]
pub struct T5Block {
    /// `layer.0.layer_norm.weight`
    pub attn_norm: Tensor<1>,
    /// `layer.0.SelfAttention.{q,k,v,o}`
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// `layer.1.layer_norm.weight`
    pub ff_norm: Tensor<1>,
    /// `layer.1.DenseReluDense.wi` (`wi_0` when gated)
    pub wi_0: Linear,
    /// `layer.1.DenseReluDense.wi_1` (gated only)
    pub wi_1: Option<Linear>,
    /// `layer.1.DenseReluDense.wo`
    pub wo: Linear,
    heads: usize,
    d_kv: usize,
    act: Activation,
    eps: f64,
}

impl T5Block {
    /// `w` is under `encoder.block.{i}`.
    pub fn load(w: &impl WeightSource, c: &T5Config) -> Self {
        let FeedForward { gated, act } = c.feed_forward_proj;
        let inner = c.num_heads * c.d_kv;
        let attn = w.pp("layer.0.SelfAttention");
        let ff = w.pp("layer.1.DenseReluDense");
        let wi_0 = if gated { ff.pp("wi_0") } else { ff.pp("wi") };
        Self {
            attn_norm: w.pp("layer.0.layer_norm").tensor("weight", [c.d_model]),
            q: Linear::load(&attn.pp("q"), c.d_model, inner, false),
            k: Linear::load(&attn.pp("k"), c.d_model, inner, false),
            v: Linear::load(&attn.pp("v"), c.d_model, inner, false),
            o: Linear::load(&attn.pp("o"), inner, c.d_model, false),
            ff_norm: w.pp("layer.1.layer_norm").tensor("weight", [c.d_model]),
            wi_0: Linear::load(&wi_0, c.d_model, c.d_ff, false),
            wi_1: gated.then(|| Linear::load(&ff.pp("wi_1"), c.d_model, c.d_ff, false)),
            wo: Linear::load(&ff.pp("wo"), c.d_ff, c.d_model, false),
            heads: c.num_heads,
            d_kv: c.d_kv,
            act,
            eps: c.layer_norm_epsilon,
        }
    }

    /// `name` is the block's checkpoint prefix (`encoder.block.3`), for the probe.
    ///
    /// # Shapes
    /// - h: `[B, L, D]`, position_bias: `[1, H, L, L]` (f32) → `[B, L, D]`
    pub fn forward(&self, h: Tensor<3>, position_bias: &Tensor<4>, name: &str, probe: &mut impl Probe) -> Tensor<3> {
        let [b, l, _] = h.dims();
        // This reshape follows the previous block's residual add, which this block cannot reach
        // (see rms_norm); under bf16 products fusion leaves this norm and the softmax unfused.
        let n = rms_norm(h.clone(), self.attn_norm.clone().unsqueeze(), self.eps);
        let split = |x: Tensor<3>| x.reshape([b, l, self.heads, self.d_kv]).swap_dims(1, 2); // [B, H, L, dk]
        let (q, k, v) = (split(self.q.forward(n.clone())), split(self.k.forward(n.clone())), split(self.v.forward(n)));
        // T5 does not scale its scores by 1/sqrt(d_kv).
        let a = if cogview_shaders::attention::applies(&q, &k, &v, Some(position_bias)) {
            // burn's CPU backend in f32: scores, bias, softmax and values in one kernel.
            cogview_shaders::attention::attention(q, k, v, Some(position_bias.clone()), 1.0)
        } else {
            let dtype = v.dtype();
            // Scores and softmax in f32 (torch's SDPA accumulates in f32).
            let scores = cogview_shaders::matmul(q.cast(FloatDType::F32), k.cast(FloatDType::F32).swap_dims(2, 3)) + position_bias.clone();
            cogview_shaders::matmul(softmax(scores, 3).cast(dtype), v)
        };
        let a = a.swap_dims(1, 2).reshape([b, l, self.heads * self.d_kv]);
        let a = self.o.forward(a);
        probe.check(|| format!("{name}.layer.0.SelfAttention.o"), &a);
        // Reshaped before the residual add (see rms_norm).
        let ff_norm = self.ff_norm.clone().unsqueeze();
        let h = clamp_f16(add_promoted(h, a));

        let n = rms_norm(h.clone(), ff_norm, self.eps);
        let act = |x: Tensor<3>| match self.act {
            Activation::GeluTanh => gelu_tanh(x),
            Activation::Gelu => gelu(x),
            Activation::Relu => relu(x),
        };
        let pre = self.wi_0.forward(n.clone());
        let wi_0_name = if self.wi_1.is_some() { "wi_0" } else { "wi" };
        probe.check(|| format!("{name}.layer.1.DenseReluDense.{wi_0_name}"), &pre);
        let hidden = match &self.wi_1 {
            Some(wi_1) => {
                // The gate's product is queued before the activation, so that the activation and
                // the gate's multiply run as one fused kernel on a GPU.
                let gate = wi_1.forward(n);
                probe.check(|| format!("{name}.layer.1.DenseReluDense.wi_1"), &gate);
                act(pre) * gate
            }
            None => act(pre),
        };
        let f = self.wo.forward(hidden);
        probe.check(|| format!("{name}.layer.1.DenseReluDense.wo"), &f);
        clamp_f16(add_promoted(h, f))
    }
}

/// `a + b` with torch's promotion: when one side is f32 (T5's `wo` kept in f32 under f16)
/// the sum is f32.
fn add_promoted(a: Tensor<3>, b: Tensor<3>) -> Tensor<3> {
    if a.dtype() == b.dtype() {
        a + b
    } else {
        a.cast(FloatDType::F32) + b.cast(FloatDType::F32)
    }
}

/// transformers' f16 guard in T5Block: clamp to the f16 range (less 1000 when an inf is
/// already there). A no-op in other dtypes.
fn clamp_f16(h: Tensor<3>) -> Tensor<3> {
    if h.dtype() != DType::F16 {
        return h;
    }
    let max = 65504.0f32;
    let has_inf = h.clone().is_inf().any().float().reshape([1, 1, 1]); // 1.0 or 0.0
    let limit = has_inf.mul_scalar(-1000.0).add_scalar(max).cast(FloatDType::F16);
    let h = h.clone().max_pair(limit.clone().neg().expand(h.shape()));
    h.clone().min_pair(limit.expand(h.shape()))
}

/// The encoder without its blocks: the token table, block 0's relative-attention-bias table
/// and the final norm. The runtime runs the blocks itself (resident or streamed).
#[derive(Clone, Debug)]
pub struct T5Embedding {
    /// `shared.weight` (`encoder.embed_tokens.weight` is tied to it): `[vocab, D]`.
    pub shared: Tensor<2>,
    /// `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`: `[buckets, H]`.
    pub relative_attention_bias: Tensor<2>,
    /// `encoder.final_layer_norm.weight`
    pub final_layer_norm: Tensor<1>,
    config: T5Config,
}

impl T5Embedding {
    /// `w` is at the checkpoint root.
    pub fn load(w: &impl WeightSource, c: &T5Config) -> Self {
        Self {
            shared: w.pp("shared").tensor("weight", [c.vocab_size, c.d_model]),
            relative_attention_bias: w
                .pp("encoder.block.0.layer.0.SelfAttention.relative_attention_bias")
                .tensor("weight", [c.relative_attention_num_buckets, c.num_heads]),
            final_layer_norm: w.pp("encoder.final_layer_norm").tensor("weight", [c.d_model]),
            config: c.clone(),
        }
    }

    /// Token embeddings, on `device` (the table itself may live elsewhere, e.g. on the CPU).
    ///
    /// # Shapes
    /// - ids: `[B][L]` → `[B, L, D]`
    pub fn embed(&self, ids: &[Vec<u32>], device: &Device) -> Tensor<3> {
        let (b, l) = (ids.len(), ids.first().map_or(0, Vec::len));
        let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
        let table_device = self.shared.device();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(flat, [b, l]), &table_device);
        embedding(self.shared.clone(), idx).to_device(device)
    }

    /// The relative position bias of `len` tokens, in f32, shared by every block.
    ///
    /// # Shapes
    /// - → `[1, H, L, L]`
    pub fn position_bias(&self, len: usize, device: &Device) -> Tensor<4> {
        let c = &self.config;
        let buckets: Vec<i64> = (0..len)
            .flat_map(|q| {
                (0..len).map(move |k| {
                    relative_position_bucket(k as i64 - q as i64, c.relative_attention_num_buckets, c.relative_attention_max_distance) as i64
                })
            })
            .collect();
        let table = self.relative_attention_bias.clone().to_device(device).cast(FloatDType::F32);
        let idx = Tensor::<2, Int>::from_data(TensorData::new(buckets, [len, len]), device);
        embedding(table, idx).permute([2, 0, 1]).unsqueeze::<4>() // [1, H, L, L]
    }

    /// # Shapes
    /// - h: `[B, L, D]` → `[B, L, D]`
    pub fn final_norm(&self, h: Tensor<3>) -> Tensor<3> {
        let w = self.final_layer_norm.clone().to_device(&h.device());
        rms_norm(h, w.unsqueeze(), self.config.layer_norm_epsilon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket table transformers' `_relative_position_bucket` gives (32 buckets, 128).
    #[test]
    fn buckets_match_transformers() {
        let b = |rel| relative_position_bucket(rel, 32, 128);
        assert_eq!(b(0), 0);
        for (range, want) in [(1..8, None), (8..12, Some(8)), (12..16, Some(9)), (16..23, Some(10)), (23..32, Some(11)), (32..46, Some(12)), (46..64, Some(13)), (64..91, Some(14)), (91..224, Some(15))] {
            for n in range {
                let want = want.unwrap_or(n as usize);
                assert_eq!(b(n), 16 + want, "rel +{n}");
                assert_eq!(b(-n), want, "rel -{n}");
            }
        }
    }

    #[test]
    fn feed_forward_kinds() {
        let ff = |s: &str| s.parse::<FeedForward>();
        assert_eq!(ff("gated-gelu"), Ok(FeedForward { gated: true, act: Activation::GeluTanh }));
        assert_eq!(ff("relu"), Ok(FeedForward { gated: false, act: Activation::Relu }));
        assert_eq!(ff("gelu"), Ok(FeedForward { gated: false, act: Activation::Gelu }));
        assert_eq!(ff("gated-relu"), Ok(FeedForward { gated: true, act: Activation::Relu }));
        assert_eq!(ff("gelu_new"), Ok(FeedForward { gated: false, act: Activation::GeluTanh }));
        for s in ["gated-gelu", "relu", "gelu", "gated-relu", "gelu_new"] {
            assert_eq!(ff(s).unwrap().to_string(), s);
        }
        assert!(ff("swish").unwrap_err().contains("feed_forward_proj `swish`"));
        // A config with an unknown activation is refused when it is read, naming the key.
        let json = r#"{"d_model": 8, "d_ff": 16, "d_kv": 4, "num_heads": 2, "num_layers": 1, "vocab_size": 10,
            "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "swish"}"#;
        let err = serde_json::from_str::<T5Config>(json).unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj `swish` is not supported"), "{err}");
    }
}
