//! Content-addressed store for compiled kernels (filled in by the JIT pipeline).

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error("{0}")]
    Io(String),
}
