//! Import errors: each names the file (and key) and says what is wrong, in one line.

use std::fmt;
use std::path::PathBuf;

use crate::report::LoadReport;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("model folder {0} does not exist")]
    NoFolder(PathBuf),
    #[error("{hub_id} is not in the Hugging Face cache (looked for {looked}); run without --offline to download it, or pass a model folder")]
    NotCached { hub_id: String, looked: PathBuf },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("downloading {repo}{}: {message}", if file.is_empty() { String::new() } else { format!(" ({file})") })]
    Download { repo: String, file: String, message: String },
    #[error("{component}: {report}")]
    Load { component: String, report: Box<LoadReport> },
}

impl ImportError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl fmt::Display) -> Self {
        Self::File { path: path.into(), message: message.to_string() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, message: impl fmt::Display) -> Self {
        Self::Config { path: path.into(), message: message.to_string() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
