//! cogview: a [`Storage`] with one file per entry, in place of the Turso database.
//!
//! An environment is the directory `<root>/<name>.entries/`; a namespace is a directory below
//! it (one level per `/`-separated segment, each sanitized); an entry is one file named by a
//! 128-bit hash of its key. The file holds the key itself, so a hash collision reads as a miss,
//! and a checksum over everything, so a torn or corrupted file reads as a miss too (the entry is
//! recomputed and rewritten).
//!
//! Every write goes to a temporary file in the same directory first. A new entry is then
//! published with `hard_link`, which fails when the name exists: the check and the write are one
//! atomic step for every process sharing the directory, as the [`Storage`] contract asks (on a
//! file system without hard links, a rename where nothing is yet). An overwrite (a repair, or a
//! local value replacing an imported one) is a `rename`, which is atomic too. Readers never see a
//! partial file.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::storage::{Insertion, Origin, Storage};
use crate::bytes::Bytes;

/// First bytes of every entry file; a new layout gets a new magic.
const MAGIC: &[u8; 8] = b"CCLENT01";

/// The directory of `namespace` in the active environment.
fn namespace_dir(namespace: &str) -> PathBuf {
    let mut dir = crate::environment::path().with_extension("entries");
    for segment in namespace.split('/').filter(|s| !s.is_empty()) {
        dir.push(sanitize(segment));
    }
    dir
}

/// A namespace segment as a file name: `[A-Za-z0-9._-]` kept, anything else `_`, never `.` or
/// `..` (so a segment cannot leave the environment's directory).
fn sanitize(segment: &str) -> String {
    let s: String = segment
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    if s.chars().all(|c| c == '.') { format!("_{s}") } else { s }
}

/// FNV-1a, 64 bits, from `seed`: stable across builds and platforms, unlike std's hashers.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The file name of `key`: two independent 64-bit hashes.
fn file_name(key: &[u8]) -> String {
    format!("{:016x}{:016x}", fnv1a(FNV_OFFSET, key), fnv1a(!FNV_OFFSET, key))
}

/// An entry file's bytes: magic, origin, key length and key, value length and value, checksum.
fn encode(key: &[u8], value: &[u8], origin: Origin) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + 16 + key.len() + value.len() + 8);
    out.extend_from_slice(MAGIC);
    out.push(match origin {
        Origin::Local => 0,
        Origin::Imported => 1,
    });
    out.extend_from_slice(&(key.len() as u64).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
    let sum = fnv1a(FNV_OFFSET, &out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The key, value and origin of an entry file's bytes; `None` for anything but a whole,
/// intact entry.
fn decode(bytes: &[u8]) -> Option<(&[u8], &[u8], Origin)> {
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
    if fnv1a(FNV_OFFSET, body) != u64::from_le_bytes(sum.try_into().ok()?) {
        return None;
    }
    let rest = body.strip_prefix(MAGIC.as_slice())?;
    let (&origin, rest) = rest.split_first()?;
    let origin = match origin {
        0 => Origin::Local,
        1 => Origin::Imported,
        _ => return None,
    };
    let (len, rest) = rest.split_at_checked(8)?;
    let (key, rest) = rest.split_at_checked(usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?)?;
    let (len, rest) = rest.split_at_checked(8)?;
    let (value, rest) = rest.split_at_checked(usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?)?;
    rest.is_empty().then_some((key, value, origin))
}

/// What a file holds for `key`.
enum Read {
    Missing,
    /// Unreadable, torn, corrupted, or another key's: to be overwritten.
    Invalid,
    Entry(Bytes, Origin),
}

fn read(path: &Path, key: &[u8]) -> Read {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Read::Missing,
        Err(e) => {
            log::debug!("cache entry {}: {e}", path.display());
            Read::Invalid
        }
        Ok(bytes) => match decode(&bytes) {
            Some((k, value, origin)) if k == key => Read::Entry(Bytes::from_bytes_vec(value.to_vec()), origin),
            _ => {
                log::debug!("cache entry {}: not an intact entry for this key; ignored", path.display());
                Read::Invalid
            }
        },
    }
}

/// The entries of one namespace, one file each.
#[derive(Debug)]
pub struct FileStorage {
    namespace: String,
    dir: PathBuf,
}

impl FileStorage {
    /// The storage of `namespace` in the active environment; its directory is made on the first
    /// write.
    pub fn open(namespace: &str) -> Self {
        Self { namespace: namespace.to_string(), dir: namespace_dir(namespace) }
    }

    /// `bytes` in a new temporary file beside the entries (same file system, so it can be
    /// linked or renamed into place).
    fn temporary(&self, bytes: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let mut n = 0u32;
        loop {
            let path = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    file.write_all(bytes)?;
                    file.sync_data()?;
                    return Ok(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the entry, replacing whatever is at `path` (`overwrite`) or only where nothing
    /// is (`!overwrite`: `Ok(false)` when another writer got there first).
    fn publish(&self, path: &Path, bytes: &[u8], overwrite: bool) -> std::io::Result<bool> {
        let tmp = self.temporary(bytes)?;
        let published = if overwrite {
            std::fs::rename(&tmp, path).map(|()| true)
        } else {
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                // A file system without hard links (FAT, some network mounts): a rename where
                // nothing is yet. Two writers racing there may both publish, the last one
                // winning; each wrote a whole, valid entry for the same key.
                Err(e) => {
                    log::debug!("cache entry {}: no hard link ({e}); renaming", path.display());
                    if path.exists() { Ok(false) } else { std::fs::rename(&tmp, path).map(|()| true) }
                }
            }
        };
        // Gone already where it was renamed into place.
        let _ = std::fs::remove_file(&tmp);
        published
    }

    fn write(&self, key: &[u8], value: Bytes, origin: Origin, force: bool) -> Insertion {
        let path = self.dir.join(file_name(key));
        let bytes = encode(key, &value, origin);
        // Two rounds at most: a writer that loses the race to publish reads the winner's entry.
        for _ in 0..2 {
            let overwrite = force
                || match read(&path, key) {
                    Read::Missing => false,
                    Read::Invalid => true,
                    // Only a local value replaces an imported one (the Storage contract).
                    Read::Entry(existing, existing_origin) => {
                        if !matches!((origin, existing_origin), (Origin::Local, Origin::Imported)) {
                            return Insertion::Conflict(existing);
                        }
                        true
                    }
                };
            match self.publish(&path, &bytes, overwrite) {
                Ok(true) => return Insertion::Stored,
                Ok(false) => continue,
                Err(e) => {
                    log::warn!("cache entry {}: {e}", path.display());
                    return Insertion::Failed(e.to_string());
                }
            }
        }
        match read(&path, key) {
            Read::Entry(existing, _) => Insertion::Conflict(existing),
            _ => Insertion::Failed(format!("cache entry {}: kept changing under concurrent writers", path.display())),
        }
    }
}

impl Storage for FileStorage {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        let path = self.dir.join(file_name(key));
        match read(&path, key) {
            Read::Entry(value, _) => Some(value),
            Read::Missing | Read::Invalid => None,
        }
    }

    fn insert(&self, key: &[u8], value: Bytes, origin: Origin) -> Insertion {
        self.write(key, value, origin, false)
    }

    fn replace(&self, key: &[u8], value: Bytes, origin: Origin) -> Insertion {
        self.write(key, value, origin, true)
    }

    fn scan(&self, visit: &mut dyn FnMut(&[u8], &[u8])) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') || !path.is_file() {
                continue;
            }
            match std::fs::read(&path).ok().as_deref().and_then(decode) {
                Some((key, value, _)) if name.to_string_lossy() == file_name(key) => visit(key, value),
                _ => log::debug!("cache entry {}: not an intact entry; ignored", path.display()),
            }
        }
    }

    fn purge(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cache namespace {}: {e}", self.dir.display());
        }
    }

    fn purge_key(&self, key: &[u8]) {
        let path = self.dir.join(file_name(key));
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("cache entry {}: {e}", path.display());
        }
    }

    fn describe(&self) -> String {
        format!("files in {} ({})", self.dir.display(), self.namespace)
    }
}

/// Every namespace with entries in the active environment.
pub fn namespaces() -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut has_entries = false;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.path().is_dir() {
                let child = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
                walk(&entry.path(), &child, out);
            } else if !name.starts_with('.') {
                has_entries = true;
            }
        }
        if has_entries && !prefix.is_empty() {
            out.push(prefix.to_string());
        }
    }
    let mut out = Vec::new();
    walk(&crate::environment::path().with_extension("entries"), "", &mut out);
    out
}
