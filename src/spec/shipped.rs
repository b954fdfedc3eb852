//! The variants shipped with attnforge, embedded in the binary so that nothing is looked up on
//! disk at run time.

use super::{load, SpecError, Variant};

/// `(name, JSON text)` of every shipped variant.
pub const SHIPPED: [(&str, &str); 11] = [
    ("default", include_str!("../../variants/default.json")),
    ("causal", include_str!("../../variants/causal.json")),
    ("sliding_window", include_str!("../../variants/sliding_window.json")),
    ("soft_cap", include_str!("../../variants/soft_cap.json")),
    ("gemma2", include_str!("../../variants/gemma2.json")),
    ("alibi", include_str!("../../variants/alibi.json")),
    ("sink", include_str!("../../variants/sink.json")),
    ("chunked", include_str!("../../variants/chunked.json")),
    ("prefix_lm", include_str!("../../variants/prefix_lm.json")),
    ("sigmoid", include_str!("../../variants/sigmoid.json")),
    ("tree_mask", include_str!("../../variants/tree_mask.json")),
];

/// Loads a shipped variant by name.
pub fn shipped(name: &str) -> Option<Result<Variant, SpecError>> {
    SHIPPED.iter().find(|(n, _)| *n == name).map(|(n, text)| load(&format!("shipped:{n}"), text))
}

/// Every shipped variant. They are checked by the test suite, so a failure here is a bug.
pub fn all() -> Result<Vec<Variant>, SpecError> {
    SHIPPED.iter().map(|(n, text)| load(&format!("shipped:{n}"), text)).collect()
}

/// Resolves a command-line argument: an existing file path, else a shipped variant's name.
pub fn resolve(arg: &str) -> Result<Variant, crate::Error> {
    let path = std::path::Path::new(arg);
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io { path: path.to_path_buf(), source })?;
        return Ok(load(arg, &text)?);
    }
    match shipped(arg) {
        Some(v) => Ok(v?),
        None => Err(crate::Error::UnknownVariant { name: arg.to_string(), shipped: SHIPPED.iter().map(|(n, _)| *n).collect() }),
    }
}
