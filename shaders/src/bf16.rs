//! bf16 weights on adapters that cannot store bf16.
//!
//! WGSL has no 16-bit float type other than f16, and most Vulkan and DX12 adapters have no bf16
//! storage, so a bf16 checkpoint would otherwise be widened to f32 on load: twice the memory.
//! Instead two bf16 values are packed into one `u32` word on the host ([`pack_bf16`]), and
//! [`unpack_bf16`] widens them to f32 on the device when a layer needs its weight. A bf16 value
//! is the upper half of the f32 with the same bits, so the unpacking is exact: word `i` holds
//! element `2i` in its low half and element `2i + 1` in its high half.
//!
//! The plain-burn reference is [`unpack_bf16_reference`]: the same bf16 values as a burn bf16
//! tensor, cast to f32.

use burn::backend::{Backend, Dispatch, backend_extension, tensor::FloatTensor, tensor::IntTensor};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::CubeDim;
use cubecl::calculate_cube_count_elemwise;

use kernel::unpack_bf16_kernel;

/// Packs bf16 values (as their bit patterns) two per word; an odd count pads the last word's
/// high half with zero.
pub fn pack_bf16(bits: &[u16]) -> Vec<u32> {
    bits.chunks(2).map(|p| p[0] as u32 | (p.get(1).copied().unwrap_or(0) as u32) << 16).collect()
}

/// Packed bf16 words on a device, ready for [`unpack_bf16`].
///
/// # Shapes
/// - bits: `[len]` → words `[ceil(len / 2)]` (dtype u32)
pub fn upload_packed(bits: &[u16], device: &Device) -> Tensor<1, Int> {
    let words = pack_bf16(bits);
    let n = words.len();
    Tensor::from_data(TensorData::new(words, [n]), (device, DType::U32))
}

/// The f32 values of `len` bf16 values packed by [`pack_bf16`], computed on the device.
///
/// Runs the `#[cube]` kernel on CubeCL adapters (wgpu and friends). burn's CPU backend stores
/// bf16 itself, so nothing there packs; it would panic here.
///
/// # Shapes
/// - words: `[ceil(len / 2)]` (u32) → `[len]` (f32)
pub fn unpack_bf16(words: Tensor<1, Int>, len: usize) -> Tensor<1> {
    assert_eq!(words.dims()[0], len.div_ceil(2), "unpack_bf16: {len} values need {} words", len.div_ceil(2));
    assert_eq!(words.dtype(), DType::U32, "unpack_bf16: the words must be u32");
    Tensor::from_dispatch(Dispatch::unpack_bf16(words.into_dispatch(), len))
}

/// The plain-burn reference for [`unpack_bf16`]: the bf16 values as a bf16 tensor, cast to f32.
///
/// # Shapes
/// - bits: `[len]` → `[len]` (f32)
pub fn unpack_bf16_reference(bits: &[u16], device: &Device) -> Tensor<1> {
    let values: Vec<half::bf16> = bits.iter().map(|&b| half::bf16::from_bits(b)).collect();
    let n = values.len();
    Tensor::<1>::from_data(TensorData::new(values, [n]), (device, DType::BF16)).cast(DType::F32)
}

#[backend_extension(Cube, Fusion)]
pub trait Bf16Ops: Backend {
    /// `len` f32 values from `ceil(len / 2)` u32 words of packed bf16 pairs.
    #[fusion(dtype = burn::tensor::DType::F32, shape = Shape::new([*len]))]
    fn unpack_bf16(words: IntTensor<Self>, len: usize) -> FloatTensor<Self>;
}

impl Bf16Ops for CubeBackend {
    fn unpack_bf16(words: IntTensor<Self>, len: usize) -> FloatTensor<Self> {
        let words = into_contiguous(words);
        let output = empty_device_dtype(words.client.clone(), words.device.clone(), Shape::new([len]), DType::F32);
        let units = words.meta.num_elements();
        if units == 0 {
            return output;
        }
        let cube_dim = CubeDim::new(&words.client, units);
        let cube_count = calculate_cube_count_elemwise(&words.client, units, cube_dim);
        unpack_bf16_kernel::launch(&output.client, cube_count, cube_dim, words.into_tensor_arg(), output.clone().into_tensor_arg());
        output
    }
}

mod kernel {
    use cubecl::prelude::*;

    /// One unit per word: the low half is element `2i`, the high half element `2i + 1` (absent for
    /// the padding of an odd length). Moving a bf16 into the top 16 bits of a word gives the f32
    /// with the same value, infinities, NaNs and subnormals included.
    #[cube(launch)]
    pub fn unpack_bf16_kernel(words: &Tensor<u32>, output: &mut Tensor<f32>) {
        let i = ABSOLUTE_POS;
        if i >= words.len() {
            terminate!();
        }
        let word = words[i];
        output[2 * i] = f32::reinterpret(word << 16u32);
        if 2 * i + 1 < output.len() {
            output[2 * i + 1] = f32::reinterpret(word & 0xFFFF_0000u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_puts_even_elements_low_and_pads_odd_lengths() {
        assert_eq!(pack_bf16(&[0x3F80, 0xBF80, 0x7F80]), vec![0xBF80_3F80, 0x0000_7F80]);
        assert_eq!(pack_bf16(&[]), Vec::<u32>::new());
    }
}
