//! A diffusers CogView3-Plus folder as it is on the hub: `model_index.json`, the component
//! configs (each parsed into the struct that mirrors it, unknown keys ignored, a missing
//! required key an error naming the file and key), and the weights of each component.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cogview_models::dit::Dit;
use cogview_models::t5::{T5Block, T5Embedding};
use cogview_models::vae::{Decoder, Encoder};
use cogview_models::{Configs, WeightSource};
use serde::de::DeserializeOwned;

use crate::checkpoint::Checkpoint;
use crate::error::ImportError;
use crate::location;
use crate::report::LoadReport;
use crate::weights::{Component, KeyRecorder, check};

/// `model_index.json`: the pipeline class and, per component, `[library, class]`.
#[derive(Clone, Debug)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, (String, String)>,
}

/// The components a CogView3-Plus pipeline folder must have.
pub const REQUIRED_COMPONENTS: [&str; 5] = ["scheduler", "text_encoder", "tokenizer", "transformer", "vae"];

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ImportError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImportError::file(path, "missing: the model folder is incomplete"));
        }
        Err(e) => return Err(ImportError::io(path, e)),
    };
    serde_json::from_str(&text).map_err(|e| {
        let msg = e.to_string();
        // serde names a missing key as "missing field `x`": say it in this project's words.
        match msg.strip_prefix("missing field ") {
            Some(rest) => ImportError::config(path, format!("missing required key {}", rest.split(" at ").next().unwrap_or(rest))),
            None if e.is_syntax() || e.is_eof() => ImportError::config(path, format!("not valid JSON: {msg}")),
            None => ImportError::config(path, msg),
        }
    })
}

impl ModelIndex {
    pub fn read(path: &Path) -> Result<Self, ImportError> {
        let map: serde_json::Map<String, serde_json::Value> = read_json(path)?;
        let class_name = map
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ImportError::config(path, "missing required key `_class_name`"))?
            .to_string();
        let mut components = BTreeMap::new();
        for (k, v) in &map {
            if k.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = v.as_array().map(|a| a.as_slice())
                && let (Some(lib), Some(class)) = (lib.as_str(), class.as_str())
            {
                components.insert(k.clone(), (lib.to_string(), class.to_string()));
            }
        }
        if let Some(missing) = REQUIRED_COMPONENTS.iter().find(|c| !components.contains_key(**c)) {
            return Err(ImportError::config(path, format!("missing required key `{missing}`")));
        }
        Ok(Self { class_name, components })
    }
}

/// An opened model folder: configs read and checked; weights opened on demand.
#[derive(Clone, Debug)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub configs: Configs,
}

impl ModelFolder {
    /// `model` is a folder or a hub id in the local Hugging Face cache.
    pub fn open(model: &str) -> Result<Self, ImportError> {
        let root = location::resolve(model)?;
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(ImportError::file(&index_path, "missing: this is not a diffusers pipeline folder"));
        }
        let index = ModelIndex::read(&index_path)?;
        if index.class_name != "CogView3PlusPipeline" {
            tracing::warn!(class = %index.class_name, "model_index.json names another pipeline class; loading it as CogView3PlusPipeline");
        }
        let config = |c: &str, f: &str| root.join(c).join(f);
        let configs = Configs {
            text_encoder: read_json(&config("text_encoder", "config.json"))?,
            transformer: read_json(&config("transformer", "config.json"))?,
            vae: read_json(&config("vae", "config.json"))?,
            scheduler: read_json(&config("scheduler", "scheduler_config.json"))?,
        };
        let c = &configs;
        c.text_encoder.validate().map_err(|m| ImportError::config(config("text_encoder", "config.json"), m))?;
        c.transformer.validate().map_err(|m| ImportError::config(config("transformer", "config.json"), m))?;
        c.vae.validate().map_err(|m| ImportError::config(config("vae", "config.json"), m))?;
        c.scheduler.validate().map_err(|m| ImportError::config(config("scheduler", "scheduler_config.json"), m))?;
        // Components must fit each other.
        c.check_across().map_err(|m| ImportError::config(config("transformer", "config.json"), m))?;
        Ok(Self { root, index, configs })
    }

    pub fn component_dir(&self, c: Component) -> PathBuf {
        self.root.join(c.name())
    }

    /// Every key (and shape) the modules of `c` can ask for under this folder's configs.
    pub fn expected_keys(&self, c: Component) -> Vec<(String, Vec<usize>)> {
        expected_keys(c, &self.configs)
    }

    /// Opens the weights of `c` and checks them against the configs: every missing,
    /// misshapen or unexpected key fails, all of them listed.
    pub fn open_weights(&self, c: Component) -> Result<(Checkpoint, LoadReport), ImportError> {
        let ck = Checkpoint::open(&self.component_dir(c))?;
        let all = self.expected_keys(c);
        let report = check(c, &ck, &all, &all);
        if !report.is_ok() {
            return Err(ImportError::Load { component: c.name().into(), report: Box::new(report) });
        }
        Ok((ck, report))
    }
}

/// The full key list of a component (every module its folder can feed: for the VAE, both the
/// decoder and the encoder).
pub fn expected_keys(c: Component, configs: &Configs) -> Vec<(String, Vec<usize>)> {
    let (t5, dit, vae) = (&configs.text_encoder, &configs.transformer, &configs.vae);
    KeyRecorder::keys_of(|w| match c {
        Component::TextEncoder => {
            T5Embedding::load(w, t5);
            for i in 0..t5.num_layers {
                T5Block::load(&w.pp(format!("encoder.block.{i}")), t5);
            }
        }
        Component::Transformer => {
            Dit::load(w, dit);
        }
        Component::Vae => {
            Decoder::load(w, vae);
            Encoder::load(w, vae);
        }
    })
}
