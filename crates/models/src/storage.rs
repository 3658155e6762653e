//! How the big weights (matrices and conv kernels) are kept on the device between uses.
//!
//! The DiT and VAE checkpoints are bf16. Computing in f32 (every adapter without bf16
//! arithmetic) does not need them *stored* in f32: each layer widens its weight when it runs,
//! so only one layer's f32 copy exists at a time. Where the adapter stores bf16 the weight is a
//! bf16 tensor; where it cannot (WGSL, most Vulkan and DX12 adapters) it is packed two values
//! per `u32` and widened by the kernel in `cogview-shaders`. Both are exact: every bf16 value
//! is an f32 value.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

/// Where a [`Weight`] lives between uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightStorage {
    /// In the compute dtype (no conversion at use).
    Compute,
    /// As a bf16 tensor, cast to the compute dtype at use (adapters that store bf16).
    Bf16,
    /// As bf16 pairs packed in `u32` words, unpacked by a kernel at use (adapters that can't).
    PackedBf16,
    /// As a bf16 tensor that linear layers feed to bf16 × bf16 → f32 matrix products as it is
    /// (`cogview_shaders::bf16_product`: adapters whose matrix hardware multiplies bf16 but that
    /// have no general bf16 arithmetic); conv kernels are cast to the compute dtype at use.
    Bf16Products,
}

impl std::fmt::Display for WeightStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightStorage::Compute => "the compute dtype",
            WeightStorage::Bf16 => "bf16",
            WeightStorage::PackedBf16 => "bf16 packed in u32",
            WeightStorage::Bf16Products => "bf16, multiplied as bf16",
        })
    }
}

impl WeightStorage {
    /// Bytes per value stored.
    pub fn bytes_per_value(self, compute: DType) -> usize {
        match self {
            WeightStorage::Compute => compute.size(),
            WeightStorage::Bf16 | WeightStorage::PackedBf16 | WeightStorage::Bf16Products => 2,
        }
    }
}

/// The largest buffer `device` allocates (cubecl's page size: the adapter's storage-binding
/// limit, 128 MiB on lavapipe, about 2 GiB on most Vulkan and DX12 drivers); `None` for the
/// CPU backend.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(d) => Some(d.client().properties().memory.max_page_size),
        _ => None,
    }
}

/// A matrix or conv kernel, stored as its [`WeightStorage`] says.
#[derive(Clone, Debug)]
pub enum Weight<const D: usize> {
    Dense(Tensor<D>),
    Bf16 { stored: Tensor<D>, compute: DType },
    Packed { words: Tensor<1, Int>, shape: [usize; D], compute: DType },
    /// A linear layer's bf16 matrix or a conv kernel, multiplied as it is
    /// ([`WeightStorage::Bf16Products`]).
    Bf16Products { stored: Tensor<D>, compute: DType },
    /// Blocks of rows (along dim 0), for a weight whose compute-dtype copy would pass the
    /// device's largest buffer (T5-XXL's 168 MB feed-forward matrices on a 128 MiB adapter).
    Rows(Vec<Weight<D>>),
}

impl Weight<2> {
    /// A linear layer's `[d_out, d_in]` weight laid out for the matrix product it feeds. On
    /// burn's CPU backend an f32 weight is kept as the transpose of a contiguous
    /// `[d_in, d_out]` matrix (one copy, at load): its shape and values are the same, and the
    /// product `x · weightᵀ` reads it row by row (see `cogview_shaders::linear`). Elsewhere,
    /// unchanged.
    pub fn for_matmul(self) -> Self {
        match self {
            Weight::Dense(t) if cogview_shaders::on_cpu_f32(&t) => {
                let device = t.device();
                let rows_in = Tensor::<2>::from_data(t.transpose().into_data(), (&device, DType::F32));
                Weight::Dense(rows_in.transpose())
            }
            other => other,
        }
    }
}

impl<const D: usize> Weight<D> {
    /// Puts `data` (any float dtype; rounded to bf16 for the bf16 storages, which is exact for
    /// a bf16 checkpoint) on `device`.
    pub fn store(data: TensorData, storage: WeightStorage, compute: DType, device: &Device) -> Self {
        let shape: [usize; D] = data.shape().to_vec().try_into().expect("weight rank");
        match storage {
            WeightStorage::Compute => Weight::Dense(Tensor::from_data(data.convert_dtype(compute), (device, compute))),
            _ if compute == DType::BF16 => Weight::Dense(Tensor::from_data(data.convert_dtype(compute), (device, compute))),
            WeightStorage::Bf16 => {
                Weight::Bf16 { stored: Tensor::from_data(data.convert_dtype(DType::BF16), (device, DType::BF16)), compute }
            }
            WeightStorage::Bf16Products => {
                // Matrices and conv kernels feed the products; vectors never reach this (they
                // are stored in the compute dtype).
                let stored = Tensor::from_data(data.convert_dtype(DType::BF16), (device, DType::BF16));
                Weight::Bf16Products { stored, compute }
            }
            WeightStorage::PackedBf16 => {
                let data = data.convert_dtype(DType::BF16);
                let values = data.as_slice::<half::bf16>().expect("converted to bf16");
                let bits: Vec<u16> = values.iter().map(|v| v.to_bits()).collect();
                Weight::Packed { words: cogview_shaders::bf16::upload_packed(&bits, device), shape, compute }
            }
        }
    }

    /// [`store`](Self::store), split into blocks of rows when the compute-dtype copy would
    /// pass `max_bytes`.
    pub fn store_limited(data: TensorData, storage: WeightStorage, compute: DType, device: &Device, max_bytes: Option<u64>) -> Self {
        let shape = data.shape().to_vec();
        let row: usize = shape[1..].iter().product();
        // A bf16 matrix multiplied as it is never has a compute-dtype copy.
        let value_bytes = if storage == WeightStorage::Bf16Products && shape.len() == 2 { 2 } else { compute.size() };
        let bytes = (shape[0] * row * value_bytes) as u64;
        match max_bytes {
            Some(max) if bytes > max && shape[0] > 1 => {
                let rows = ((max / (row * value_bytes) as u64) as usize).max(1);
                let elem = data.dtype().size();
                let raw = data.as_bytes();
                let blocks = (0..shape[0])
                    .step_by(rows)
                    .map(|start| {
                        let n = rows.min(shape[0] - start);
                        let mut block_shape = shape.clone();
                        block_shape[0] = n;
                        let bytes = raw[start * row * elem..(start + n) * row * elem].to_vec();
                        Self::store(TensorData::from_bytes_vec(bytes, block_shape, data.dtype()), storage, compute, device)
                    })
                    .collect();
                Weight::Rows(blocks)
            }
            _ => Self::store(data, storage, compute, device),
        }
    }

    /// The weight in the compute dtype.
    pub fn get(&self) -> Tensor<D> {
        match self {
            Weight::Rows(blocks) => Tensor::cat(blocks.iter().map(Weight::get).collect(), 0),
            Weight::Dense(t) => t.clone(),
            Weight::Bf16 { stored, compute } | Weight::Bf16Products { stored, compute } => stored.clone().cast(*compute),
            Weight::Packed { words, shape, compute } => {
                let n = shape.iter().product();
                cogview_shaders::bf16::unpack_bf16(words.clone(), n).reshape(*shape).cast(*compute)
            }
        }
    }

    /// The shape [`get`](Self::get) gives.
    pub fn dims(&self) -> [usize; D] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Bf16 { stored, .. } | Weight::Bf16Products { stored, .. } => stored.dims(),
            Weight::Packed { shape, .. } => *shape,
            Weight::Rows(blocks) => {
                let mut dims = blocks[0].dims();
                dims[0] = blocks.iter().map(|b| b.dims()[0]).sum();
                dims
            }
        }
    }

    /// The dtype [`get`](Self::get) gives.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Bf16 { compute, .. } | Weight::Packed { compute, .. } | Weight::Bf16Products { compute, .. } => *compute,
            Weight::Rows(blocks) => blocks[0].dtype(),
        }
    }
}
