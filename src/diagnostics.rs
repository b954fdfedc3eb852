//! Warnings: what the library worked around without failing (a damaged cache entry that was
//! rebuilt, a cache directory that could not be written, so a kernel is kept in memory only).
//!
//! The library never prints. Each warning is returned where it arose (e.g.
//! [`crate::jit::CompiledKernel::warnings`]) and also passed to a hook the program may install
//! once, typically to print or log it; without a hook it is only returned.

use std::sync::RwLock;

type Hook = Box<dyn Fn(&str) + Send + Sync>;

static HOOK: RwLock<Option<Hook>> = RwLock::new(None);

/// Installs the function every warning is passed to (replacing any earlier one).
pub fn set_warning_hook(hook: impl Fn(&str) + Send + Sync + 'static) {
    if let Ok(mut h) = HOOK.write() {
        *h = Some(Box::new(hook));
    }
}

/// Passes a warning to the installed hook, if any.
pub(crate) fn warn(message: &str) {
    if let Ok(h) = HOOK.read() {
        if let Some(f) = h.as_ref() {
            f(message);
        }
    }
}
