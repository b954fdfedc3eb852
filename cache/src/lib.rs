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
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const MAGIC: &[u8; 4] = b"AFKC";
const FORMAT: u32 = 1;
const EXT: &str = "afk";
const TMP_PREFIX: &str = ".tmp-";
/// Temp files older than this are leftovers of a killed writer and are removed.
const STALE_TMP: Duration = Duration::from_secs(600);
/// The largest entry file the store reads (a CUBIN is well under 10 MB). Anything larger is
/// damaged: a reader never allocates more than this for one entry.
pub const MAX_ENTRY_BYTES: u64 = 256 << 20;
/// The longest readable part of an entry's file name (names stay far below the 255-byte limit
/// of file systems once the key and extension are added).
pub const MAX_NAME_CHARS: usize = 96;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("no cache directory: set ATTNFORGE_CACHE_DIR (the platform has no cache dir)")]
    NoDir,
    #[error("cannot use cache directory {}: it exists and is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    // The I/O error is part of the message, not a `source`: printing the chain would repeat it.
    #[error("cannot use cache directory {}: {cause}", path.display())]
    Dir { path: PathBuf, cause: std::io::Error },
    #[error("cannot write cache entry {}: {cause}", path.display())]
    Write { path: PathBuf, cause: std::io::Error },
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
    /// An entry existed but did not verify (truncated, flipped, foreign, not a regular file,
    /// larger than [`MAX_ENTRY_BYTES`]); it was removed, or the message says it could not be.
    Corrupt(String),
    /// An entry may exist but could not be read (permissions, I/O): not damage, left in place.
    Unreadable(String),
}

/// What `verify` did.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Entries that verified.
    pub kept: usize,
    /// Damaged entries, removed.
    pub removed: Vec<EntryInfo>,
    /// Damaged entries that could not be removed, and why.
    pub not_removed: Vec<(EntryInfo, String)>,
}

/// What `clear` did.
#[derive(Debug, Default)]
pub struct ClearReport {
    /// Entries and temp files removed.
    pub removed: usize,
    /// Files that could not be removed, and why.
    pub not_removed: Vec<(PathBuf, String)>,
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

/// Why an entry file could not be read.
enum ReadError {
    /// Nothing at the path.
    Missing,
    /// Something is there that is not an entry file: damage, to be removed.
    Damaged(String),
    /// The file could not be read (permissions, I/O): left in place.
    Unreadable(String),
}

/// Reads an entry file without following a symbolic link, without blocking on a FIFO or a
/// device, accepting a regular file only and never more than [`MAX_ENTRY_BYTES`].
fn read_entry(path: &Path) -> Result<Vec<u8>, ReadError> {
    let mut opts = fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    }
    let mut file = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(ReadError::Damaged("a symbolic link, not an entry file".into())),
        Err(e) => return Err(ReadError::Unreadable(e.to_string())),
    };
    let md = file.metadata().map_err(|e| ReadError::Unreadable(e.to_string()))?;
    if !md.file_type().is_file() {
        return Err(ReadError::Damaged(format!("not a regular file ({})", file_kind(&md.file_type()))));
    }
    if md.len() > MAX_ENTRY_BYTES {
        return Err(ReadError::Damaged(format!("{} bytes, more than the {MAX_ENTRY_BYTES} an entry may have", md.len())));
    }
    // Read at most one byte past the size fstat gave (a file growing under us is damage too).
    let mut bytes = Vec::with_capacity(md.len() as usize);
    Read::by_ref(&mut file).take(md.len() + 1).read_to_end(&mut bytes).map_err(|e| ReadError::Unreadable(e.to_string()))?;
    if bytes.len() as u64 != md.len() {
        return Err(ReadError::Damaged(format!("changed size while read ({} bytes, then {})", md.len(), bytes.len())));
    }
    Ok(bytes)
}

/// "directory", "symbolic link", "FIFO", … for messages.
fn file_kind(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a file"
    }
}

/// Removes a damaged entry; `Err` says why it could not be.
fn remove_damaged(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(md) if md.is_dir() => Err("it is a directory; remove it by hand".into()),
        _ => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// A suffix no other writer can predict: the process, a counter, the time and a per-process
/// random hash key.
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(TMP_COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{}-{:016x}", std::process::id(), h.finish())
}

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
        if fs::metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(CacheError::NotADirectory { path: dir });
        }
        fs::create_dir_all(&dir).map_err(|cause| CacheError::Dir { path: dir.clone(), cause })?;
        let store = Store { dir };
        store.remove_stale_temps(STALE_TMP);
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path an entry of this name and key lives at (the name sanitised and cut to
    /// [`MAX_NAME_CHARS`]).
    pub fn path_of(&self, key: &CacheKey, name: &str) -> PathBuf {
        self.dir.join(format!("{}-{}.{EXT}", sanitize(name), key.short()))
    }

    /// Reads and verifies an entry.
    pub fn get(&self, key: &CacheKey, name: &str) -> Lookup {
        let path = self.path_of(key, name);
        let damaged = |why: String| match remove_damaged(&path) {
            Ok(()) => Lookup::Corrupt(why),
            Err(e) => Lookup::Corrupt(format!("{why}; it could not be removed: {e}")),
        };
        let bytes = match read_entry(&path) {
            Ok(b) => b,
            Err(ReadError::Missing) => return Lookup::Miss,
            Err(ReadError::Damaged(why)) => return damaged(why),
            Err(ReadError::Unreadable(why)) => return Lookup::Unreadable(why),
        };
        match decode(&bytes) {
            Ok((k, _, payload)) if k == *key => Lookup::Hit(payload.to_vec()),
            Ok((k, _, _)) => damaged(format!("holds key {} instead of {}", k.short(), key.short())),
            Err(why) => damaged(why),
        }
    }

    /// Publishes an entry atomically (temp file, fsync, rename). Returns its path.
    ///
    /// The temp file has an unpredictable name and is created exclusively (`O_EXCL`), so a
    /// file or symbolic link planted in the directory is never written through; the rename
    /// replaces whatever is at the entry's path (a planted link itself, not its target).
    pub fn put(&self, key: &CacheKey, name: &str, meta: &str, payload: &[u8]) -> Result<PathBuf, CacheError> {
        let path = self.path_of(key, name);
        let bytes = encode(key, meta, payload);
        let mut last = None;
        for _ in 0..8 {
            let tmp = self.dir.join(format!("{TMP_PREFIX}{}-{}", random_suffix(), key.short()));
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o644).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
            }
            let mut f = match opts.open(&tmp) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    last = Some(e);
                    continue;
                }
                Err(cause) => return Err(CacheError::Write { path, cause }),
            };
            let mut write = || -> std::io::Result<()> {
                f.write_all(&bytes)?;
                f.sync_all()?;
                fs::rename(&tmp, &path)
            };
            return match write() {
                Ok(()) => Ok(path),
                Err(cause) => {
                    let _ = fs::remove_file(&tmp);
                    Err(CacheError::Write { path, cause })
                }
            };
        }
        Err(CacheError::Write { path, cause: last.unwrap_or_else(|| std::io::Error::other("no free temp file name")) })
    }

    /// Every entry, verified, sorted by name. Never follows a link or blocks on a special file.
    pub fn list(&self) -> Result<Vec<EntryInfo>, CacheError> {
        let rd = fs::read_dir(&self.dir).map_err(|cause| CacheError::Dir { path: self.dir.clone(), cause })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some(EXT) {
                continue;
            }
            let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            // The entry itself, not what a link points to.
            let md = fs::symlink_metadata(&path).ok();
            let age = md.as_ref().and_then(|m| m.modified().ok()).and_then(|t| SystemTime::now().duration_since(t).ok()).unwrap_or_default();
            let read = match read_entry(&path) {
                Ok(b) => decode(&b).map(|(_, m, _)| m.to_string()),
                Err(ReadError::Missing) => continue,
                Err(ReadError::Damaged(why)) => Err(why),
                Err(ReadError::Unreadable(why)) => Err(format!("unreadable: {why}")),
            };
            let (meta, problem) = match read {
                Ok(m) => (m, None),
                Err(why) => (String::new(), Some(why)),
            };
            out.push(EntryInfo { path, name, meta, size: md.map_or(0, |m| m.len()), age, problem });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Verifies every entry and removes those that fail.
    pub fn verify(&self) -> Result<VerifyReport, CacheError> {
        let mut report = VerifyReport::default();
        for e in self.list()? {
            if e.problem.is_none() {
                report.kept += 1;
                continue;
            }
            match remove_damaged(&e.path) {
                Ok(()) => report.removed.push(e),
                Err(why) => report.not_removed.push((e, why)),
            }
        }
        Ok(report)
    }

    /// Removes every entry and temp file.
    pub fn clear(&self) -> Result<ClearReport, CacheError> {
        let rd = fs::read_dir(&self.dir).map_err(|cause| CacheError::Dir { path: self.dir.clone(), cause })?;
        let mut report = ClearReport::default();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !(name.ends_with(&format!(".{EXT}")) || name.starts_with(TMP_PREFIX)) {
                continue;
            }
            match remove_damaged(&e.path()) {
                Ok(()) => report.removed += 1,
                Err(why) => report.not_removed.push((e.path(), why)),
            }
        }
        Ok(report)
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

/// Keeps names readable and safe as file names, and short enough for any file system.
fn sanitize(name: &str) -> String {
    name.chars().take(MAX_NAME_CHARS).map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
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

/// Splits and verifies an entry: (key, meta, payload). Every length read from the file goes
/// through checked arithmetic.
fn decode(b: &[u8]) -> Result<(CacheKey, &str, &[u8]), String> {
    let take = |at: usize, n: usize| at.checked_add(n).and_then(|end| b.get(at..end)).ok_or_else(|| format!("truncated ({} bytes)", b.len()));
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
    let len = usize::try_from(len).map_err(|_| format!("payload length {len} overflows"))?;
    let start = at + 8;
    let payload = take(start, len).map_err(|_| format!("payload length {len} is past the end ({} bytes)", b.len()))?;
    let end = start + len;
    let sum = take(end, 32)?;
    if b.len() != end + 32 {
        return Err(format!("{} trailing bytes", b.len() - end - 32));
    }
    if blake3::hash(&b[..end]).as_bytes() != sum {
        return Err("checksum mismatch".into());
    }
    Ok((key, meta, payload))
}
