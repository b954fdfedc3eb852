//! The planner: from CPU index arrays to work lists, on the host, with no device copy.
//!
//! `decode.rs` plans batches of one query token per request, `prefill.rs` ragged query blocks; this
//! file holds what both share — the modes, the target, the visible span of a query, the split
//! sizes and the packed buffer every plan uploads.
//!
//! Each request's visible KV span is `kv_range` evaluated on the host (the same evaluator the
//! reference uses), intersected with `[0, kv_len)`; the kernels never read outside it. When the
//! batch alone cannot fill the GPU, long spans are split into equal chunks whose partial states
//! `merge_states` combines. Work is ordered longest first.
//!
//! Modes:
//! - `Default`: the chunk size follows the batch, to fill one wave of CTAs.
//! - `FixedGrid`: grid and buffer sizes are fixed for CUDA-graph capture; spare CTAs exit. A plan
//!   that needs more CTAs than the grid holds is an error.
//! - `Deterministic`: a fixed chunk size, so a request's result is bit-identical whatever else is
//!   in the batch.
//!
//! **Invariant:** a plan is a pure function of its inputs; it never touches the GPU.

mod decode;
mod prefill;

pub use self::decode::{plan_decode, wants_wide_tile, DecodePlan};
pub use self::prefill::{decode_cascade_prefix_ctas, plan_cascade, FOLD_KEY_ROWS_PER_SM, plan_decode_cascade, plan_prefill, with_cascade_capacity, PrefillPlan};

use crate::abi::MergeWork;
use crate::spec::eval::{eval, Env};
use crate::spec::params::ParamValues;
use crate::spec::{HookExpr, Variant};
use crate::error::PlanError;
use crate::Result;

/// How the planner splits work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    /// Split-KV sized to fill the GPU, balanced for skewed big batches.
    Default,
    /// For CUDA graphs: at most `max_ctas` work items (per KV head), always launched in full.
    /// For CUDA-graph capture: a grid of `max_ctas` CTAs whose spare CTAs exit, buffers fixed.
    FixedGrid {
        /// CTAs of the grid (per KV head).
        max_ctas: usize,
    },
    /// Split every span into chunks of exactly `chunk` positions (the last one shorter).
    /// Splits at fixed offsets of `chunk` positions: bit-identical results whatever else is in
    /// the batch.
    Deterministic {
        /// KV positions per chunk.
        chunk: usize,
    },
}

/// What the planner needs to know about the kernel and the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanTarget {
    /// CTAs a batch that is too small to fill the GPU is spread over: a batch with fewer work
    /// items (× KV heads) than this has its spans split into chunks, about this many in all.
    pub ctas: usize,
    /// KV positions per kernel tile; chunks are multiples of it.
    pub kv_tile: usize,
    /// CTAs the GPU holds at once (SMs × the kernel's occupancy). A default-mode decode batch
    /// with more work than this runs as one wave of this many CTAs with equal shares (see
    /// `balanced_decode`); 0 turns that off. The prefill planner does not use it.
    pub resident: usize,
    /// Balance every default-mode decode batch bigger than one wave, skewed or not (tuning).
    pub always_balance: bool,
}

/// The CTAs (per KV head) of a fixed decode grid on which every batch of at most `max_batch`
/// requests can be planned, whatever its lengths: for a CUDA-graph wrapper that must size its
/// buffers before it sees a batch.
///
/// Unsplit, a plan has one item per visible span: one per request, or one per request and KV
/// head when the variant's `kv_range` reads `kv_head`. Split into wave chunks (only when the spans
/// do not fill `target.ctas`), pieces of at least `total × kv_heads / ctas` positions give at
/// most `ctas / kv_heads` items plus one per span. A balanced list (a column per resident CTA)
/// is used only when it fits, else the batch is planned unbalanced, each CTA of one wave running
/// its items in turn. A balanced list of W columns holds at most W × (⌈spans / W⌉ + 2) items
/// (the spans a column's share covers whole, and a cut one at each end) when no column gathers
/// many more short spans than its share: three waves of resident CTAs beyond the spans keep
/// such batches balanced (H200, B 40 of 150..1200 tokens at capacity 40: the unbalanced
/// fallback ran 1396 µs per 32-layer step against 1277 eager, `benches/graph_gap.py`). Tier 0
/// checks the bound on random batches.
pub fn decode_fixed_grid_bound(variant: &Variant, target: PlanTarget, kv_heads: usize, max_batch: usize) -> usize {
    let kv_heads = kv_heads.max(1);
    3 * target.resident.div_ceil(kv_heads) + target.ctas.div_ceil(kv_heads) + 1 + max_batch.saturating_mul(range_heads(variant, kv_heads))
}

/// Splits shorter than this cost more in merging than they gain in parallelism.
const MIN_CHUNK: usize = 64;

/// The visible span `[lo, hi)` of the query at `q_pos`, per `kv_range`, within `[0, kv_len)`.
pub fn visible_span(variant: &Variant, params: &ParamValues, req: usize, q_len: usize, kv_len: usize, kv_head: usize) -> (usize, usize) {
    let Some(r) = &variant.kv_range else { return (0, kv_len) };
    let env = Env {
        score: 0.0f64,
        sm_scale: 0.0,
        q_pos: kv_len as i32 - q_len as i32,
        kv_pos: 0,
        qo_head: 0,
        kv_head: kv_head as i32,
        req: req as i32,
        q_len: q_len as i32,
        kv_len: kv_len as i32,
        params,
    };
    let bound = |h: &Option<HookExpr>, open: i64| h.as_ref().map_or(open, |h| i64::from(eval(&h.typed, &env).as_i()));
    let lo = bound(&r.lo, 0).clamp(0, kv_len as i64) as usize;
    let hi = (bound(&r.hi, kv_len as i64 - 1) + 1).clamp(0, kv_len as i64) as usize;
    (lo, hi.max(lo))
}

/// Words of the packed header: `[num_work, num_merge, stride, 0]` (16 bytes, so the lists
/// after it stay 16-byte aligned).
pub const PLAN_HEADER_INTS: usize = 4;

/// The one buffer a plan uploads: the header `[num_work, num_merge, stride, 0]`, then the work
/// list padded to `slots` items of N words and the merge list padded to `merge_grid` items (so a
/// fixed-grid plan's buffer never changes size), all i32.
pub(super) fn pack<const N: usize>(work: impl Iterator<Item = [i32; N]>, num_work: usize, stride: usize, slots: usize, merge: &[MergeWork], merge_grid: usize) -> Vec<i32> {
    let len = packed_len(N, slots, merge_grid);
    let mut v = Vec::with_capacity(len);
    v.extend([num_work as i32, merge.len() as i32, stride as i32, 0]);
    work.for_each(|w| v.extend(w));
    v.resize(PLAN_HEADER_INTS + N * slots, 0);
    for m in merge {
        v.extend([m.req, m.first, m.count, m.token]);
    }
    v.resize(len, 0);
    v
}

pub(super) fn packed_len(work_ints: usize, slots: usize, merge_grid: usize) -> usize {
    PLAN_HEADER_INTS + work_ints * slots + 4 * merge_grid
}

pub(super) fn merge_offset(work_ints: usize, slots: usize) -> usize {
    4 * (PLAN_HEADER_INTS + work_ints * slots)
}

/// Rejects a deterministic mode without a chunk size.
pub(super) fn check_mode(mode: PlanMode) -> Result<()> {
    match mode {
        PlanMode::Deterministic { chunk: 0 } => Err(PlanError::Invalid("deterministic chunk size must be at least 1".into()).into()),
        _ => Ok(()),
    }
}

/// KV heads whose spans must be unioned: all of them when a kv_range bound reads `kv_head` (the
/// kernel narrows the span again per head), else one.
pub(super) fn range_heads(variant: &Variant, kv_heads: usize) -> usize {
    match &variant.kv_range {
        Some(r) if [&r.lo, &r.hi].iter().any(|h| h.as_ref().is_some_and(|h| h.typed.reads(crate::spec::typed::Builtin::KvHead))) => kv_heads,
        _ => 1,
    }
}

/// The chunk that spreads `total` visible positions of each of `kv_heads` heads over one wave of
/// `target.ctas` CTAs: a multiple of the kernel's tile, at least MIN_CHUNK.
pub(super) fn wave_chunk(total: usize, kv_heads: usize, target: PlanTarget) -> usize {
    let tile = target.kv_tile.max(1);
    let per_cta = (total * kv_heads).div_ceil(target.ctas.max(1));
    per_cta.div_ceil(tile).max(1).saturating_mul(tile).max(MIN_CHUNK)
}

/// The length of the pieces a span of `len` positions is cut into (`>= len`: it stays whole).
/// Deterministic mode cuts at fixed offsets, so the result never depends on the rest of the
/// batch; the other modes cut into the nearest whole number of equal, tile-aligned pieces, so no
/// span leaves a short straggler.
pub(super) fn split_piece(len: usize, chunk: usize, tile: usize, deterministic: bool) -> usize {
    if deterministic || len <= chunk {
        return if deterministic { chunk } else { len };
    }
    let n = ((len as f64 / chunk as f64).round() as usize).max(1);
    len.div_ceil(n).div_ceil(tile) * tile
}

/// What the engine needs of a plan to upload and launch it, whatever the family.
pub trait Plan {
    /// The i32 buffer the kernels read: header, work list, merge list.
    fn packed(&self) -> Vec<i32>;
    /// Its length (without building it).
    fn packed_len(&self) -> usize;
    /// Where the merge list starts in it, in bytes.
    fn merge_offset(&self) -> usize;
    /// Bytes of f32 workspace the launch needs.
    fn workspace_bytes(&self) -> usize;
    /// Partial-state slots the workspace is laid out for (o for every slot and head, then lse).
    fn partial_slots(&self) -> usize;
    /// The mode it was planned in.
    fn mode(&self) -> PlanMode;
    /// Whether buffers must never be reallocated (CUDA-graph capture).
    fn fixed(&self) -> bool {
        matches!(self.mode(), PlanMode::FixedGrid { .. })
    }
    /// CTAs along x of the main launch (along y: the KV heads).
    fn grid(&self) -> usize;
    /// CTAs along x of the merge launch (0: nothing to merge).
    fn merge_grid(&self) -> usize;
    /// Requests of the batch planned.
    fn batch_size(&self) -> usize;
    /// Query heads of the batch planned.
    fn qo_heads(&self) -> usize;
    /// The planned batch's [`crate::kv::ValidBatch::fingerprint`].
    fn batch_fingerprint(&self) -> u64;
    /// Whether it runs the batch through a cascade ([`plan_cascade`]).
    fn is_cascade(&self) -> bool {
        false
    }
    /// A decode cascade's shared levels: the prefill plan launched first (on the companion
    /// prefill kernel) and its word offset in [`Plan::packed`].
    fn prefix(&self) -> Option<(&PrefillPlan, usize)> {
        None
    }
}
