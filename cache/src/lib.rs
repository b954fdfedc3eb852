//! A content-addressed, cross-process-safe store of compiled kernels: key → bytes.
//!
//! The store knows nothing about CUDA. A [`CacheKey`] is a blake3 hash of everything that
//! changes the bytes (the caller decides what that is, through [`KeyBuilder`]). Each entry is one
//! self-verifying file, `<readable name>-<16 hex of the key>.afk`:
//!
//! ```text
//! "AFKC" | format u32 | key [32] | meta_len u32 | meta (UTF-8) | len u64 | payload | blake3 [32]
//! ```
//!
//! **Invariant:** a file is only ever *published* by renaming a fully written and synced temp
//! file over its final name, so readers see either nothing or a whole entry, and any number of
//! processes may publish the same key at once (the last rename wins, and all write the same
//! bytes). **Invariant:** [`Store::get`] never returns bytes whose checksum, key or length does
//! not verify; such an entry is reported as [`Lookup::Corrupt`] and removed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const MAGIC: &[u8; 4] = b"AFKC";
const FORMAT: u32 = 1;
const EXT: &str = "afk";
const TMP_PREFIX: &str = ".tmp-";
/// Temp files older than this are leftovers of a killed writer and are removed.
const STALE_TMP: Duration = Duration::from_secs(600);

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("no cache directory: set ATTNFORGE_CACHE_DIR (the platform has no cache dir)")]
    NoDir,
    #[error("cannot use cache directory {path}: {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot write cache entry {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Io(String),
}

/// A 32-byte content hash naming one compiled artefact.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 16 hex digits, used in file names.
    pub fn short(&self) -> String {
        self.hex()[..16].to_string()
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", self.short())
    }
}

/// Hashes named, length-prefixed fields, so `("ab", "c")` and `("a", "bc")` differ.
pub struct KeyBuilder(blake3::Hasher);

impl Default for KeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuilder {
    pub fn new() -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"attnforge-cache-key-v1");
        KeyBuilder(h)
    }

    pub fn field(mut self, name: &str, value: &[u8]) -> Self {
        for part in [name.as_bytes(), value] {
            self.0.update(&(part.len() as u64).to_le_bytes());
            self.0.update(part);
        }
        self
    }

    pub fn finish(self) -> CacheKey {
        CacheKey(*self.0.finalize().as_bytes())
    }
}

/// The result of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<u8>),
    Miss,
    /// An entry existed but did not verify (truncated, flipped, foreign); it was removed.
    Corrupt(String),
}

/// What `list` reports of an entry.
#[derive(Debug, Clone)]
pub struct EntryInfo {
    pub path: PathBuf,
    pub name: String,
    pub meta: String,
    pub size: u64,
    pub age: Duration,
    /// `None` if the entry verifies, else why not.
    pub problem: Option<String>,
}

/// A directory of entries.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// The default location: `$ATTNFORGE_CACHE_DIR`, else `<platform cache dir>/attnforge`.
    pub fn default_dir() -> Result<PathBuf, CacheError> {
        if let Some(d) = std::env::var_os("ATTNFORGE_CACHE_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
        dirs::cache_dir().map(|d| d.join("attnforge")).ok_or(CacheError::NoDir)
    }

    /// Opens (creating if needed) a store in `dir`, and removes stale temp files.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, CacheError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| CacheError::Dir { path: dir.clone(), source })?;
        let store = Store { dir };
        store.remove_stale_temps(STALE_TMP);
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path an entry of this name and key lives at.
    pub fn path_of(&self, key: &CacheKey, name: &str) -> PathBuf {
        self.dir.join(format!("{}-{}.{EXT}", sanitize(name), key.short()))
    }

    /// Reads and verifies an entry.
    pub fn get(&self, key: &CacheKey, name: &str) -> Lookup {
        let path = self.path_of(key, name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Corrupt(format!("unreadable: {e}")),
        };
        match decode(&bytes) {
            Ok((k, _, payload)) if k == *key => Lookup::Hit(payload.to_vec()),
            Ok((k, _, _)) => {
                let _ = fs::remove_file(&path);
                Lookup::Corrupt(format!("holds key {} instead of {}", k.short(), key.short()))
            }
            Err(why) => {
                let _ = fs::remove_file(&path);
                Lookup::Corrupt(why)
            }
        }
    }

    /// Publishes an entry atomically (temp file, fsync, rename). Returns its path.
    pub fn put(&self, key: &CacheKey, name: &str, meta: &str, payload: &[u8]) -> Result<PathBuf, CacheError> {
        let path = self.path_of(key, name);
        let tmp = self.dir.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
            key.short()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&encode(key, meta, payload))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&tmp);
            CacheError::Write { path: path.clone(), source }
        })?;
        Ok(path)
    }

    /// Every entry, verified, sorted by name.
    pub fn list(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| CacheError::Dir { path: self.dir.clone(), source })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some(EXT) {
                continue;
            }
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let md = e.metadata().ok();
            let age = md.as_ref().and_then(|m| m.modified().ok()).and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default();
            let (meta, problem) = match fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode(&b).map(|(_, m, _)| m.to_string())) {
                Ok(m) => (m, None),
                Err(why) => (String::new(), Some(why)),
            };
            out.push(EntryInfo { path, name, meta, size: md.map_or(0, |m| m.len()), age, problem });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Verifies every entry and removes those that fail; returns (kept, removed).
    pub fn verify(&self) -> Result<(usize, Vec<EntryInfo>), CacheError> {
        let entries = self.list()?;
        let (bad, good): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.problem.is_some());
        for e in &bad {
            let _ = fs::remove_file(&e.path);
        }
        Ok((good.len(), bad))
    }

    /// Removes every entry and temp file; returns how many files were removed.
    pub fn clear(&self) -> Result<usize, CacheError> {
        let rd = fs::read_dir(&self.dir).map_err(|source| CacheError::Dir { path: self.dir.clone(), source })?;
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if (name.ends_with(&format!(".{EXT}")) || name.starts_with(TMP_PREFIX)) && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Removes temp files older than `age` (a writer killed mid-write leaves one behind).
    pub fn remove_stale_temps(&self, age: Duration) -> usize {
        let Ok(rd) = fs::read_dir(&self.dir) else { return 0 };
        let mut n = 0;
        for e in rd.flatten() {
            let stale = e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                && e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| SystemTime::now().duration_since(t).ok()).is_some_and(|a| a >= age);
            if stale && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

/// Keeps names readable and safe as file names.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

fn encode(key: &CacheKey, meta: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload.len() + meta.len() + 88);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT.to_le_bytes());
    b.extend_from_slice(&key.0);
    b.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    b.extend_from_slice(meta.as_bytes());
    b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    b.extend_from_slice(payload);
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// Splits and verifies an entry: (key, meta, payload).
fn decode(b: &[u8]) -> Result<(CacheKey, &str, &[u8]), String> {
    let take = |at: usize, n: usize| b.get(at..at + n).ok_or_else(|| format!("truncated ({} bytes)", b.len()));
    if take(0, 4)? != MAGIC {
        return Err("not an attnforge cache entry (bad magic)".into());
    }
    let format = u32::from_le_bytes(take(4, 4)?.try_into().unwrap_or_default());
    if format != FORMAT {
        return Err(format!("entry format {format}, expected {FORMAT}"));
    }
    let key = CacheKey(take(8, 32)?.try_into().unwrap_or_default());
    let meta_len = u32::from_le_bytes(take(40, 4)?.try_into().unwrap_or_default()) as usize;
    let meta = std::str::from_utf8(take(44, meta_len)?).map_err(|_| "metadata is not UTF-8".to_string())?;
    let at = 44 + meta_len;
    let len = u64::from_le_bytes(take(at, 8)?.try_into().unwrap_or_default());
    let len = usize::try_from(len).map_err(|_| "payload length overflows".to_string())?;
    let payload = take(at + 8, len)?;
    let end = at + 8 + len;
    let sum = take(end, 32)?;
    if b.len() != end + 32 {
        return Err(format!("{} trailing bytes", b.len() - end - 32));
    }
    if blake3::hash(&b[..end]).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    Ok((key, meta, payload))
}
