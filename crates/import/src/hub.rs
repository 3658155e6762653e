//! Model download from the Hugging Face hub, into the standard cache, with hf-hub's blocking
//! client: only the files the pipeline reads, resumable (an interrupted transfer leaves
//! `blobs/<etag>.part`, which the next run continues with a range request), each file checked
//! against the size the hub gives and, for LFS files (whose etag is their sha256), its sha256.
//!
//! Environment, as the Python hub client reads it: `HF_ENDPOINT` (default
//! `https://huggingface.co`), `HF_HOME` / `HF_HUB_CACHE` (the cache, see
//! [`crate::location::hub_cache_dir`]) and `HF_TOKEN` (else the token file `huggingface-cli
//! login` writes).

use std::io::Read;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use sha2::Digest;

use crate::error::ImportError;
use crate::location;

/// A file transfer's progress (hf-hub's).
pub use hf_hub::api::Progress;

/// The components the pipeline reads, and the weight files' stems in them.
const COMPONENTS: [&str; 5] = ["text_encoder", "tokenizer", "transformer", "vae", "scheduler"];

/// Whether the pipeline needs `path` (a file of the repo): `model_index.json`, and in each
/// component folder its configs, tokenizer files and safetensors weights without a variant
/// (`diffusion_pytorch_model.fp16.safetensors` and `.bin` duplicates are left out).
pub fn needed(path: &str) -> bool {
    if path == "model_index.json" {
        return true;
    }
    let Some((dir, name)) = path.split_once('/') else { return false };
    if !COMPONENTS.contains(&dir) || name.contains('/') {
        return false;
    }
    if matches!(
        name,
        "config.json" | "scheduler_config.json" | "spiece.model" | "tokenizer.json" | "tokenizer_config.json"
            | "special_tokens_map.json" | "added_tokens.json"
    ) {
        return true;
    }
    let Some(stem) = ["model", "diffusion_pytorch_model"].into_iter().find(|s| name.starts_with(s)) else {
        return false;
    };
    let rest = &name[stem.len()..];
    let rest = rest.strip_suffix(".safetensors.index.json").or_else(|| rest.strip_suffix(".safetensors"));
    match rest {
        Some("") => true,
        // `-00001-of-00004`
        Some(shard) => {
            let parts: Vec<&str> = shard.trim_start_matches('-').split("-of-").collect();
            shard.starts_with('-') && parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        }
        None => false,
    }
}

/// Where and how to reach the hub.
#[derive(Clone, Debug)]
pub struct Hub {
    pub endpoint: String,
    /// The hub cache folder (`…/huggingface/hub`).
    pub cache: PathBuf,
    pub token: Option<String>,
    pub revision: String,
    /// The first wait before a request is tried again, in milliseconds (doubling each time).
    pub retry_ms: u64,
}

impl Hub {
    /// From `HF_ENDPOINT`, `HF_HOME`/`HF_HUB_CACHE` and `HF_TOKEN` (else the login token file).
    pub fn from_env() -> Self {
        let cache = location::hub_cache_dir();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let token = env("HF_TOKEN").or_else(|| Cache::new(cache.clone()).token());
        let endpoint = env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        Self { endpoint: endpoint.trim_end_matches('/').to_string(), cache, token, revision: "main".into(), retry_ms: 300 }
    }
}

/// Download progress, one bar per file.
pub trait FetchProgress {
    type Bar: Progress;
    /// A file of `size` bytes is about to be downloaded (`size` includes any part already
    /// downloaded by an interrupted run).
    fn file(&mut self, name: &str, size: u64) -> Self::Bar;
}

/// No progress reporting.
impl FetchProgress for () {
    type Bar = ();
    fn file(&mut self, _name: &str, _size: u64) {}
}

/// How often a request that failed on the way (a dropped connection, a timeout, a 5xx or
/// 429 answer) is tried again, waiting 0.3, 0.6, 1.2 and 2.4 s in between. A file transfer
/// tried again continues where the last attempt stopped (its `.part` file).
pub const RETRIES: usize = 4;

/// Whether a failed hub request may succeed if tried again: the network or the server, not
/// the request (401, 403, 404 stay failures).
fn transient(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(code) => *code == 429 || *code >= 500,
            _ => true,
        },
        ApiError::IoError(_) => true,
        _ => false,
    }
}

/// `op`, tried again with backoff while it fails transiently, at most `retries` more times.
fn with_retries<T>(what: &str, retries: usize, base_ms: u64, mut op: impl FnMut() -> Result<T, ApiError>) -> Result<T, ApiError> {
    let mut attempt = 0;
    loop {
        match op() {
            Err(e) if attempt < retries && transient(&e) => {
                let wait = (base_ms << attempt).min(10_000);
                tracing::warn!("{what}: {e}; trying again in {:.1} s", wait as f64 / 1000.0);
                std::thread::sleep(std::time::Duration::from_millis(wait));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A readable reason for a failed hub request.
fn explain(e: &ApiError, hub: &Hub) -> String {
    if let ApiError::RequestError(inner) = e {
        if let ureq::Error::StatusCode(code) = inner.as_ref() {
            return match code {
                401 | 403 => format!(
                    "HTTP {code}: the hub refused access; for a gated or private model accept its terms on the \
                     model page and set HF_TOKEN"
                ),
                404 => "HTTP 404: not on the hub (check the model id and the revision)".into(),
                _ => format!("HTTP {code} from {}", hub.endpoint),
            };
        }
        return format!("could not reach {}: {inner} (check the network, or pass --offline to use the cache)", hub.endpoint);
    }
    if let ApiError::IoError(io) = e {
        return format!("the transfer was interrupted ({io})");
    }
    e.to_string()
}

/// What to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Files {
    /// Everything the pipeline reads.
    All,
    /// The configs and tokenizer files only (kilobytes): enough to plan a run.
    Configs,
}

/// Fetches what the pipeline needs of `repo_id` into the cache (files already there are not
/// downloaded again) and returns the snapshot folder.
pub fn fetch(hub: &Hub, repo_id: &str, which: Files, progress: &mut impl FetchProgress) -> Result<PathBuf, ImportError> {
    let download_error = |file: &str, message: String| ImportError::Download {
        repo: repo_id.to_string(),
        file: file.to_string(),
        message,
    };
    let api = ApiBuilder::new()
        .with_endpoint(hub.endpoint.clone())
        .with_cache_dir(hub.cache.clone())
        .with_token(hub.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| download_error("", explain(&e, hub)))?;
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, hub.revision.clone());
    let api_repo = api.repo(repo.clone());
    let info = with_retries(repo_id, RETRIES, hub.retry_ms, || api_repo.info()).map_err(|e| download_error("", explain(&e, hub)))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| needed(f) && (which == Files::All || !f.ends_with(".safetensors")))
        .collect();
    if !files.iter().any(|f| f == "model_index.json") {
        return Err(download_error("model_index.json", "the repository has no model_index.json: not a diffusers pipeline".into()));
    }
    let cache = Cache::new(hub.cache.clone()).repo(repo.clone());
    tracing::info!("{repo_id}: {} files needed", files.len());
    for file in &files {
        if cached_at(&cache, &info.sha, file).is_some() {
            tracing::debug!("{file}: cached");
            continue;
        }
        let meta = with_retries(file, RETRIES, hub.retry_ms, || api.metadata(&api_repo.url(file))).map_err(|e| download_error(file, explain(&e, hub)))?;
        let path = with_retries(file, RETRIES, hub.retry_ms, || {
            let bar = progress.file(file, meta.size() as u64);
            api_repo.download_with_progress(file, bar)
        })
        .map_err(|e| {
            let part = cache.blob_path(meta.etag()).with_extension("part");
            let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            let resume = if kept > 0 {
                format!("; {kept} of {} bytes are kept, run the same command again to resume", meta.size())
            } else {
                String::new()
            };
            download_error(file, format!("{}{resume}", explain(&e, hub)))
        })?;
        verify(&path, meta.size() as u64, meta.etag()).map_err(|m| {
            // A bad file must not look cached to the next run.
            let blob = std::fs::canonicalize(&path).ok();
            let _ = std::fs::remove_file(&path);
            if let Some(blob) = blob {
                let _ = std::fs::remove_file(blob);
            }
            download_error(file, format!("{m}; the file was removed, run the same command again to download it anew"))
        })?;
    }
    Ok(cache.pointer_path(&info.sha))
}

/// The cached file of `file` at commit `sha`, if complete.
fn cached_at(cache: &hf_hub::CacheRepo, sha: &str, file: &str) -> Option<PathBuf> {
    let path = cache.pointer_path(sha).join(file);
    path.is_file().then_some(path)
}

/// The downloaded file against the size the hub gave and, when the etag is a sha256 (LFS
/// files), against it.
fn verify(path: &Path, size: u64, etag: &str) -> Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len != size {
        return Err(format!("downloaded {len} bytes, the hub lists {size}"));
    }
    if etag.len() == 64 && etag.chars().all(|c| c.is_ascii_hexdigit()) {
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if !got.eq_ignore_ascii_case(etag) {
            return Err(format!("sha256 {got} does not match the hub's {etag}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failures on the way are tried again, with backoff, up to the limit; refusals are not.
    #[test]
    fn transient_failures_are_tried_again() {
        let reset = || ApiError::IoError(std::io::Error::other("connection reset"));
        let mut calls = 0;
        let got = with_retries("x", 3, 1, || {
            calls += 1;
            if calls < 3 { Err(reset()) } else { Ok(7) }
        });
        assert_eq!((got.unwrap(), calls), (7, 3));
        calls = 0;
        let got: Result<(), _> = with_retries("x", 3, 1, || {
            calls += 1;
            Err(reset())
        });
        assert!(got.is_err());
        assert_eq!(calls, 4, "the first try and 3 more");
        for (code, again) in [(404, false), (403, false), (503, true), (429, true)] {
            let e = ApiError::RequestError(Box::new(ureq::Error::StatusCode(code)));
            assert_eq!(transient(&e), again, "HTTP {code}");
        }
    }

    #[test]
    fn only_what_the_pipeline_reads() {
        for yes in [
            "model_index.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "text_encoder/model-00004-of-00004.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/spiece.model",
            "scheduler/scheduler_config.json",
        ] {
            assert!(needed(yes), "{yes}");
        }
        for no in [
            "README.md",
            "transformer/diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/pytorch_model-00001-of-00002.bin",
            "text_encoder/model-00001-of-.safetensors",
            "images/cat.png",
            "unet/config.json",
        ] {
            assert!(!needed(no), "{no}");
        }
    }
}
