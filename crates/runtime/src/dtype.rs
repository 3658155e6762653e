//! The dtype the model computes in.

use std::fmt;

use burn::tensor::DType;
use serde::{Deserialize, Serialize};

/// The compute dtype: never anything else than these three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }

    /// The compute dtype a burn float dtype stands for (`None` for the others).
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(ComputeDtype::F32),
            DType::BF16 => Some(ComputeDtype::Bf16),
            DType::F16 => Some(ComputeDtype::F16),
            _ => None,
        }
    }
}

impl fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
        })
    }
}
