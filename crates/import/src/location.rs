//! Where a model lives: a local diffusers folder, or a hub id (`THUDM/CogView3-Plus-3B`) in the
//! standard Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; `models--ORG--NAME/snapshots/REV/`).

use std::path::{Path, PathBuf};

use crate::error::ImportError;

/// The Hugging Face hub cache folder, as huggingface_hub resolves it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// True for `ORG/NAME` (the hub's id syntax) that is not an existing path.
pub fn is_hub_id(model: &str) -> bool {
    let mut parts = model.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && p != ".." && p != ".")
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none() && !Path::new(model).exists()
}

/// The cache folder of `hub_id` (`models--ORG--NAME`) under `cache`.
pub fn repo_cache_dir(cache: &Path, hub_id: &str) -> PathBuf {
    cache.join(format!("models--{}", hub_id.replace('/', "--")))
}

/// The folder of `model`: the path itself, or the cached snapshot of a hub id (the revision
/// `refs/main` points at; the only snapshot when there is no ref).
pub fn resolve(model: &str) -> Result<PathBuf, ImportError> {
    resolve_in(model, &hub_cache_dir())
}

/// [`resolve`] with the hub cache at `cache`.
pub fn resolve_in(model: &str, cache: &Path) -> Result<PathBuf, ImportError> {
    if !is_hub_id(model) {
        let path = PathBuf::from(model);
        return if path.is_dir() { Ok(path) } else { Err(ImportError::NoFolder(path)) };
    }
    let repo = repo_cache_dir(cache, model);
    let snapshots = repo.join("snapshots");
    let not_cached = || ImportError::NotCached { hub_id: model.to_string(), looked: repo.clone() };
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        return if dir.is_dir() { Ok(dir) } else { Err(not_cached()) };
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(not_cached()),
        _ => Err(ImportError::file(&snapshots, "several snapshots and no refs/main: pass the snapshot folder itself")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("THUDM/CogView3-Plus-3B"));
        assert!(is_hub_id("zai-org/CogView3-Plus-3B"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("name"));
    }

    #[test]
    fn cache_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let err = resolve_in("ORG/NAME", cache).unwrap_err();
        assert!(err.to_string().contains("ORG/NAME is not in the Hugging Face cache"), "{err}");
        let repo = repo_cache_dir(cache, "ORG/NAME");
        assert!(repo.ends_with("models--ORG--NAME"));
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        // No ref: the only snapshot.
        assert_eq!(resolve_in("ORG/NAME", cache).unwrap(), repo.join("snapshots/abc123"));
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        assert!(resolve_in("ORG/NAME", cache).is_err());
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "def456\n").unwrap();
        assert_eq!(resolve_in("ORG/NAME", cache).unwrap(), repo.join("snapshots/def456"));
        let local = dir.path().join("local");
        assert!(matches!(resolve_in(local.to_str().unwrap(), cache), Err(ImportError::NoFolder(_))));
        std::fs::create_dir(&local).unwrap();
        assert_eq!(resolve_in(local.to_str().unwrap(), cache).unwrap(), local);
    }
}
