//! What a model folder holds, without loading a weight: `cogview inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::ImportError;
use crate::model::ModelFolder;
use crate::report::LoadReport;
use crate::weights::Component;

#[derive(Clone, Debug, Serialize)]
pub struct ComponentInfo {
    pub name: &'static str,
    /// `[library, class]` from model_index.json.
    pub library: String,
    pub class: String,
    /// The weight files and their sizes in bytes.
    pub files: Vec<(PathBuf, u64)>,
    pub index: Option<PathBuf>,
    pub tensors: usize,
    pub parameters: u64,
    /// Parameters per stored dtype (`F32`, `BF16`, ...).
    pub dtypes: BTreeMap<String, u64>,
    /// Keys skipped on purpose, with the reason.
    pub ignored: Vec<(String, String)>,
}

/// Opens every component's weights (validating them against the configs) and describes them.
pub fn inspect(folder: &ModelFolder) -> Result<Vec<ComponentInfo>, ImportError> {
    Component::ALL
        .into_iter()
        .map(|c| {
            let (ck, report): (_, LoadReport) = folder.open_weights(c)?;
            let (library, class) = folder.index.components.get(c.name()).cloned().unwrap_or_default();
            let mut dtypes = BTreeMap::new();
            let mut parameters = 0u64;
            let mut tensors = 0;
            for f in &ck.files {
                for meta in f.tensors().values() {
                    tensors += 1;
                    parameters += meta.numel() as u64;
                    *dtypes.entry(format!("{:?}", meta.dtype)).or_insert(0) += meta.numel() as u64;
                }
            }
            Ok(ComponentInfo {
                name: c.name(),
                library,
                class,
                files: ck.files.iter().map(|f| (f.path().to_path_buf(), f.len_bytes())).collect(),
                index: ck.index.clone(),
                tensors,
                parameters,
                dtypes,
                ignored: report.ignored.iter().map(|(k, r)| (k.clone(), r.to_string())).collect(),
            })
        })
        .collect()
}
