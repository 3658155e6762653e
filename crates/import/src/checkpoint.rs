//! A component's weights: one safetensors file, or shards listed by a
//! `*.safetensors.index.json` (`{"metadata": {...}, "weight_map": {key: shard}}`), as
//! `save_pretrained` writes them. Every shard is opened and validated up front; the index must
//! agree with what the shards hold.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{DType, TensorData};
use serde::Deserialize;

use crate::error::ImportError;
use crate::safetensors::{TensorFile, TensorMeta};

#[derive(Debug)]
pub struct Checkpoint {
    /// The folder (`transformer/`, ...).
    pub dir: PathBuf,
    /// The index file, when sharded.
    pub index: Option<PathBuf>,
    pub files: Vec<TensorFile>,
    /// Key → position in `files`.
    keys: HashMap<String, usize>,
    /// Stored bytes of every tensor [`read`](Self::read) so far.
    bytes_read: AtomicU64,
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens the weights of the component folder `dir`: a `*.safetensors.index.json` with its
    /// shards if there is one, else the single `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ImportError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let named = |suffix: &str| {
            let mut v: Vec<PathBuf> = entries
                .iter()
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)))
                .cloned()
                .collect();
            v.sort();
            v
        };
        let indexes = named(".safetensors.index.json");
        match indexes.as_slice() {
            [index] => return Self::open_sharded(dir, index),
            [] => {}
            many => {
                return Err(ImportError::file(dir, format!("{} safetensors index files; expected one", many.len())));
            }
        }
        let singles = named(".safetensors");
        match singles.as_slice() {
            [one] => {
                let file = TensorFile::open(one)?;
                let keys = file.tensors().keys().map(|k| (k.clone(), 0)).collect();
                Ok(Self { dir: dir.to_path_buf(), index: None, files: vec![file], keys, bytes_read: AtomicU64::new(0) })
            }
            [] => Err(ImportError::file(dir, "no .safetensors weights (and no .safetensors.index.json)")),
            many => Err(ImportError::file(
                dir,
                format!("{} .safetensors files but no index naming which to use", many.len()),
            )),
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self, ImportError> {
        let text = std::fs::read_to_string(index_path).map_err(|e| ImportError::io(index_path, e))?;
        let index: Index = serde_json::from_str(&text).map_err(|e| ImportError::config(index_path, e))?;
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut files = Vec::new();
        let mut position = HashMap::new();
        for name in shard_names {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(ImportError::file(
                    index_path,
                    format!("names shard {name}, which is not in {}: the download is incomplete", dir.display()),
                ));
            }
            position.insert(name.clone(), files.len());
            files.push(TensorFile::open(&path)?);
        }
        let mut keys = HashMap::new();
        let mut absent = Vec::new();
        for (key, shard) in &index.weight_map {
            let i = position[shard];
            if files[i].get(key).is_none() {
                absent.push(format!("{key} (in {shard})"));
            }
            keys.insert(key.clone(), i);
        }
        if !absent.is_empty() {
            return Err(ImportError::file(
                index_path,
                format!("lists tensors its shards do not hold: {}", absent.join(", ")),
            ));
        }
        // Tensors a shard holds that the index does not list are still weights of the model.
        for (i, f) in files.iter().enumerate() {
            for key in f.tensors().keys() {
                keys.entry(key.clone()).or_insert(i);
            }
        }
        Ok(Self { dir: dir.to_path_buf(), index: Some(index_path.to_path_buf()), files, keys, bytes_read: AtomicU64::new(0) })
    }

    /// Every stored key.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn meta(&self, key: &str) -> Option<&TensorMeta> {
        self.files[*self.keys.get(key)?].get(key)
    }

    /// Whether every float tensor is stored as bf16 (the DiT and VAE of the real model).
    pub fn is_bf16(&self) -> bool {
        use safetensors::Dtype;
        self.keys().filter_map(|k| self.meta(k)).all(|m| !matches!(m.dtype, Dtype::F32 | Dtype::F16 | Dtype::F64))
    }

    /// The file that holds `key`.
    pub fn file_of(&self, key: &str) -> Option<&TensorFile> {
        self.keys.get(key).map(|&i| &self.files[i])
    }

    /// `key` as host data in `dtype`.
    pub fn read(&self, key: &str, dtype: DType) -> Result<TensorData, ImportError> {
        let file = self.file_of(key).ok_or_else(|| ImportError::file(&self.dir, format!("no tensor `{key}`")))?;
        let data = file.read(key, dtype)?;
        let stored = file.get(key).map_or(0, |m| (m.end - m.start) as u64);
        self.bytes_read.fetch_add(stored, Ordering::Relaxed);
        Ok(data)
    }

    /// The stored bytes [`read`](Self::read) has read so far (each read counts again).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}
