//! # attnforge
//!
//! A JIT attention engine for LLM inference over a paged KV cache. A *variant* (how logits are
//! transformed, which positions are visible, what joins the softmax) is a small JSON spec; the
//! same spec drives the CUDA kernels and the CPU reference that tests them.
//!
//! ```text
//! variants/*.json ─► spec ─► Variant ─┬─► render (Tera) ─► NVRTC ─► cache ─► launch
//!                                     └─► reference (CPU, f64)
//! PageTable + qo_indptr ─► Batch::validated ─► plan ─► upload ─► launch
//! ```
//!
//! | concept | module |
//! |---|---|
//! | spec language: parse, type-check, emit CUDA, evaluate | [`spec`] |
//! | paged KV layout, page tables, validation | [`kv`] |
//! | composable formats: shared-prefix levels, detection (host side) | [`cascade`] |
//! | CPU reference attention | [`reference`](mod@reference) |
//! | provable facts about a spec (mask implied by `kv_range`, monotone bounds) | [`spec::implied`] |
//! | host-device ABI structs | [`abi`] |
//! | render (Tera) → NVRTC → disk cache | [`jit`] |
//! | decode and prefill schedules (split-KV, merge, graph and deterministic modes) | [`plan`] |
//! | the GPU: kernel families, the two-call wrappers, checked launches | [`engine`] |
//! | typed errors; warnings through a hook | [`Error`], [`diagnostics`] |
//! | workloads, GPU-vs-reference harness, benchmarks (feature `testing`) | `testing` |
//!
//! Serving code drives the engine through [`engine::DecodeWrapper`] and
//! [`engine::PrefillWrapper`] (see `examples/`); the example below runs the CPU reference.
//!
//! ```
//! use std::collections::HashMap;
//! use attnforge::kv::{Batch, KvLayout, KvShape, PageTable};
//! use attnforge::spec::params::Dims;
//! use half::bf16;
//!
//! let variant = attnforge::spec::shipped::resolve("causal")?;
//! let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 4, page_size: 16,
//!                    kv_heads: 2, head_dim_qk: 64, head_dim_vo: 64 };
//! // Two requests of 20 and 7 tokens, one query token each (decode), pages permuted.
//! let pages = PageTable::from_lens(&[20, 7], 16, &mut [3, 0, 2].into_iter())?;
//! let qo_indptr = [0, 1, 2];
//! let batch = Batch { qo_indptr: &qo_indptr, pages: &pages, kv, qo_heads: 8 };
//! let q = vec![bf16::from_f32(0.1); batch.q_elems()];
//! let cache = vec![bf16::from_f32(0.2); kv.k_len()];
//! let params = variant.bind(&HashMap::new(), Dims { qo_heads: 8, kv_heads: 2, batch: 2 })?;
//! let out = attnforge::reference::attention(&variant, &params, &batch, &q, &cache, &cache, None)?;
//! assert_eq!(out.o.len(), 2 * 8 * 64);
//! # Ok::<(), attnforge::Error>(())
//! ```

#![deny(missing_docs)]

pub mod abi;
pub mod cascade;
pub mod diagnostics;
pub mod engine;
pub mod error;
pub mod jit;
pub mod kv;
pub mod plan;
pub mod reference;
pub mod spec;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{Error, Result};
