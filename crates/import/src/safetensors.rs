//! One safetensors file, memory-mapped, validated when opened, with its tensors converted to
//! the dtype the runtime asks for.
//!
//! The `safetensors` crate validates the header (JSON, dtypes, offsets in order, no overlap,
//! sizes that match shapes, a data section the offsets cover exactly); this wrapper adds the
//! file's name to every error and says in words what is wrong.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::ImportError;

/// A tensor's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, validated safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorMeta>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self, ImportError> {
        let file = File::open(path).map_err(|e| ImportError::io(path, e))?;
        // SAFETY: the file is only read; a concurrent truncation by another process is the
        // one risk of every mmap-based loader (safetensors, burn-store, candle).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ImportError::io(path, e))?;
        let (header_len, metadata) = read_metadata(path, &mmap)?;
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let meta = TensorMeta {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: info.data_offsets.0,
                    end: info.data_offsets.1,
                };
                (name, meta)
            })
            .collect();
        Ok(Self { path: path.to_path_buf(), mmap, data_start: 8 + header_len, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn tensors(&self) -> &HashMap<String, TensorMeta> {
        &self.tensors
    }

    pub fn get(&self, key: &str) -> Option<&TensorMeta> {
        self.tensors.get(key)
    }

    /// The raw little-endian bytes of `key`.
    pub fn bytes(&self, key: &str) -> Option<&[u8]> {
        let m = self.tensors.get(key)?;
        Some(&self.mmap[self.data_start + m.start..self.data_start + m.end])
    }

    /// `key` as host data in `dtype` (F32, BF16 or F16), converted from its stored float dtype.
    /// bf16 → bf16 and f16 → f16 are copies; f32 → bf16/f16 rounds to nearest even, as
    /// torch's `.to()` does; every widening is exact.
    pub fn read(&self, key: &str, dtype: DType) -> Result<TensorData, ImportError> {
        let meta = self.get(key).ok_or_else(|| ImportError::file(&self.path, format!("no tensor `{key}`")))?;
        let bytes = self.bytes(key).expect("meta exists");
        let shape = meta.shape.clone();
        let same = matches!(
            (meta.dtype, dtype),
            (Dtype::F32, DType::F32) | (Dtype::BF16, DType::BF16) | (Dtype::F16, DType::F16)
        );
        if same {
            return Ok(TensorData::from_bytes_vec(bytes.to_vec(), shape, dtype));
        }
        let values: Vec<f32> = match meta.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(ImportError::file(
                    &self.path,
                    format!("tensor `{key}` is stored as {other:?}; only F32, BF16 and F16 weights can be loaded"),
                ));
            }
        };
        Ok(match dtype {
            DType::F32 => TensorData::new(values, shape),
            DType::BF16 => TensorData::new(values.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(), shape),
            DType::F16 => TensorData::new(values.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(), shape),
            other => return Err(ImportError::file(&self.path, format!("cannot load `{key}` as {other:?}"))),
        })
    }
}

/// Parses and validates the header, with errors in words.
fn read_metadata(path: &Path, buf: &[u8]) -> Result<(usize, safetensors::tensor::Metadata), ImportError> {
    let err = |m: String| ImportError::file(path, m);
    if buf.is_empty() {
        return Err(err("empty file (a safetensors file starts with an 8-byte header length)".into()));
    }
    if buf.len() < 8 {
        return Err(err(format!("truncated: {} bytes, shorter than the 8-byte header length", buf.len())));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > (buf.len() - 8) as u64 {
        return Err(err(format!(
            "header length {n} runs past the end of the file ({} bytes): truncated or not a safetensors file",
            buf.len()
        )));
    }
    SafeTensors::read_metadata(buf).map_err(|e| {
        err(match e {
            SafeTensorError::InvalidHeader(_) => "header is not UTF-8 text: not a safetensors file".into(),
            SafeTensorError::InvalidHeaderDeserialization(e) => {
                let text = e.to_string();
                match text.find("unknown variant") {
                    Some(_) => format!("header names an unknown dtype ({text})"),
                    None => format!("header is not valid safetensors JSON ({text})"),
                }
            }
            SafeTensorError::InvalidOffset(name) => {
                format!("tensor `{name}` has data offsets that overlap another tensor or leave a gap")
            }
            SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
            SafeTensorError::MetadataIncompleteBuffer => {
                let data = buf.len() - 8 - n as usize;
                match header_data_end(&buf[8..8 + n as usize]) {
                    Some(end) if end > data => format!(
                        "truncated: the header describes {end} bytes of tensor data, the file holds {data} \
                         (a tensor's offsets run past the end); download it again"
                    ),
                    Some(end) => format!("{} bytes after the last tensor's data ({end} of {data} used)", data - end),
                    None => "tensor data does not match the header".into(),
                }
            }
            SafeTensorError::HeaderTooLarge => "header is larger than safetensors allows".into(),
            other => other.to_string(),
        })
    })
}

/// The largest end offset the header names (to say how truncated a file is).
fn header_data_end(header: &[u8]) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    v.as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .map(|e| e as usize)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A safetensors file from `(name, dtype, shape, bytes)` in that order.
    pub fn build(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut offset = 0;
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
            );
            offset += bytes.len();
            data.extend_from_slice(bytes);
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(data);
        out
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn converts_between_float_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let bf: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        std::fs::write(&p, build(&[("w", "F32", vec![3], f32s(&[1.0, 0.1, -3.25])), ("b", "BF16", vec![2], bf.clone())])).unwrap();
        let f = TensorFile::open(&p).unwrap();
        assert_eq!(f.read("w", DType::F32).unwrap().try_to_vec::<f32>().unwrap(), vec![1.0, 0.1, -3.25]);
        let w16 = f.read("w", DType::BF16).unwrap().try_to_vec::<half::bf16>().unwrap();
        assert_eq!(w16[1], half::bf16::from_f32(0.1));
        assert_eq!(f.read("b", DType::BF16).unwrap().as_bytes(), bf.as_slice());
        assert_eq!(f.read("b", DType::F32).unwrap().try_to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
        assert_eq!(f.read("b", DType::F16).unwrap().try_to_vec::<half::f16>().unwrap()[0], half::f16::from_f32(1.5));
    }
}
