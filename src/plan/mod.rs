//! The decode planner: from CPU index arrays to a work list, on the host, with no device copy.
//!
//! Each request's visible KV span is `kv_range` evaluated on the host (the same evaluator the
//! reference uses), intersected with `[0, kv_len)`; the kernels never read outside it. When the
//! batch alone cannot fill the GPU (`requests × kv_heads < target CTAs`), long spans are split
//! into equal chunks whose partial states `merge_states` combines. Work is ordered longest first.
//!
//! Modes:
//! - `Default`: the chunk size follows the batch, to fill one wave of CTAs.
//! - `FixedGrid`: grid and buffer sizes are fixed for CUDA-graph capture; spare CTAs exit. A plan
//!   that needs more CTAs than the grid holds is an error.
//! - `Deterministic`: a fixed chunk size, so a request's result is bit-identical whatever else is
//!   in the batch.
//!
//! **Invariant:** the plan is a pure function of its inputs; it never touches the GPU.

use crate::abi::{DecodeWork, MergeWork};
use crate::kv::{validate, Batch, LayoutError};
use crate::spec::eval::{eval, Env};
use crate::spec::params::{Dims, ParamValues};
use crate::spec::{HookExpr, Variant};
use crate::error::PlanError;
use crate::{Error, Result};

/// How the planner splits work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMode {
    Default,
    /// For CUDA graphs: at most `max_ctas` work items (per KV head), always launched in full.
    FixedGrid { max_ctas: usize },
    /// Split every span into chunks of exactly `chunk` positions (the last one shorter).
    Deterministic { chunk: usize },
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

/// Splits shorter than this cost more in merging than they gain in parallelism.
const MIN_CHUNK: usize = 64;

/// A decode schedule, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodePlan {
    pub mode: PlanMode,
    pub work: Vec<DecodeWork>,
    pub merge: Vec<MergeWork>,
    /// Partial-state slots the workspace must hold.
    pub num_partials: usize,
    /// CTAs along x for the decode launch (`work.len()`, the fixed grid, or a balanced plan's
    /// `stride`).
    pub grid: usize,
    /// CTAs that take work: CTA x < stride runs items x, x + stride, … of the work list (the
    /// kernel reads it from the packed header, so a captured fixed grid can run either kind).
    pub stride: usize,
    /// Work items per CTA: 1, or more in a balanced plan (padding items have `req == -1`).
    pub per_cta: usize,
    /// CTAs along x for the merge launch.
    pub merge_grid: usize,
    /// Chunk size used for split requests (0 if none was split).
    pub chunk: usize,
    /// Bytes of f32 workspace for partial states.
    pub workspace_bytes: usize,
    pub batch_size: usize,
    pub qo_heads: usize,
    pub head_dim_vo: usize,
}

impl DecodePlan {
    /// The one buffer uploaded per step (see `pack`: header `[num_work, num_merge, stride, 0]`,
    /// work list, merge list). In fixed-grid mode it is padded to the capacity so its size never
    /// changes.
    pub fn packed(&self) -> Vec<i32> {
        pack(self.work.iter().map(|w| [w.req, w.kv_begin, w.kv_end, w.partial]), self.work.len(), self.stride, self.work_slots(), &self.merge, self.merge_grid)
    }

    pub fn packed_len(&self) -> usize {
        packed_len(DECODE_WORK_INTS, self.work_slots(), self.merge_grid)
    }

    /// Byte offset of the merge list in the packed buffer.
    pub fn merge_offset(&self) -> usize {
        merge_offset(DECODE_WORK_INTS, self.work_slots())
    }

    /// Work items the packed buffer holds: a fixed grid's capacity, else the list.
    fn work_slots(&self) -> usize {
        if matches!(self.mode, PlanMode::FixedGrid { .. }) {
            self.grid
        } else {
            self.work.len()
        }
    }

    /// Workspace bytes needed for `partials` slots.
    pub fn workspace_for(partials: usize, qo_heads: usize, head_dim_vo: usize) -> usize {
        // Saturating: a workspace beyond usize cannot be allocated, and says so at upload.
        partials.saturating_mul(qo_heads).saturating_mul(head_dim_vo.saturating_add(1)).saturating_mul(4)
    }
}

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

/// Plans a decode batch: every request has exactly one query token (or none).
pub fn plan_decode(variant: &Variant, params: &ParamValues, batch: &Batch<'_>, target: PlanTarget, mode: PlanMode) -> Result<DecodePlan> {
    // Buffer lengths are checked at launch; here only the index arrays matter.
    let kv = batch.kv;
    validate(batch, batch.q_elems(), kv.k_len(), kv.v_len())?;
    let b = batch.batch_size();
    let dims = Dims { qo_heads: batch.qo_heads, kv_heads: kv.kv_heads, batch: b };
    params.fits(&variant.params, dims).map_err(Error::Param)?;
    check_mode(mode)?;
    let heads_to_scan = range_heads(variant, kv.kv_heads);
    // Host-side kv_range spans matter when work is split (they decide the chunks) and in
    // deterministic mode (chunk offsets must not depend on the batch). A batch that fills the GPU
    // unsplit gets whole requests: the kernel narrows each CTA's span by the same hooks, so no
    // page outside it is read either way, and planning stays cheap (B = 256 gemma2: 21 → 15 µs).
    let decode_rows = (0..b).filter(|&r| batch.q_len(r) > 0).count();
    let needs_spans = variant.kv_range.is_some()
        && (matches!(mode, PlanMode::Deterministic { .. }) || decode_rows * kv.kv_heads < target.ctas);
    let span = |req: usize, kv_len: usize| {
        let (mut lo, mut hi) = visible_span(variant, params, req, 1, kv_len, 0);
        for h in 1..heads_to_scan {
            let (l, r) = visible_span(variant, params, req, 1, kv_len, h);
            (lo, hi) = (lo.min(l), hi.max(r));
        }
        (req, lo, hi)
    };
    let mut spans = Vec::with_capacity(b);
    for req in 0..b {
        match batch.q_len(req) {
            0 => {}
            1 => {
                let kv_len = batch.kv_len(req);
                spans.push(if needs_spans { span(req, kv_len) } else { (req, 0, kv_len) });
            }
            n => {
                return Err(Error::InvalidBatch(LayoutError::Mismatch { what: "query tokens of a decode request (use prefill)", expected: 1, got: n }));
            }
        }
    }
    let tile = target.kv_tile.max(1);
    // More work than one wave, with a request longer than a resident CTA's fair share: one CTA
    // per item would leave that request's CTAs running alone at the end, so the batch is dealt
    // out in equal shares to one wave of resident CTAs instead. (A batch of similar lengths keeps
    // one item per CTA: the GPU schedules those as well, without the cuts' merges; on the H100,
    // B64 L4096 balanced was 1% slower, B128 L1024 + one 32K request 2.8x faster.) Whole-request
    // spans decide whether to look closer; balancing itself uses the visible spans.
    let per_head = target.resident / kv.kv_heads.max(1);
    let skewed = |spans: &[(usize, usize, usize)]| {
        let total: usize = spans.iter().map(|&(_, lo, hi)| hi - lo).sum();
        spans.iter().any(|&(_, lo, hi)| hi - lo > total.div_ceil(per_head))
    };
    let mut balance = !matches!(mode, PlanMode::Deterministic { .. }) && per_head > 0 && spans.len() > per_head && (target.always_balance || skewed(&spans));
    if balance && !needs_spans && variant.kv_range.is_some() {
        for s in spans.iter_mut() {
            *s = span(s.0, s.2);
        }
        balance = target.always_balance || skewed(&spans);
    }
    let total: usize = spans.iter().map(|&(_, lo, hi)| hi - lo).sum();
    if balance {
        let (work, merge, partials, per_cta) = balanced_decode(&spans, batch.qo_indptr, tile, per_head);
        // A fixed grid keeps its launch and buffer sizes: the balanced CTAs are its first
        // `per_head`, and the list, the merges and the partials must fit its capacity.
        let (grid, merge_grid, ws_partials) = match mode {
            PlanMode::FixedGrid { max_ctas } => {
                if work.len() > max_ctas || partials > max_ctas || per_head > max_ctas {
                    return Err(PlanError::FixedGridTooSmall { needed: work.len().max(partials).max(per_head), max_ctas }.into());
                }
                (max_ctas, max_ctas, max_ctas)
            }
            _ => (per_head, merge.len(), partials),
        };
        return Ok(DecodePlan {
            mode,
            workspace_bytes: DecodePlan::workspace_for(ws_partials, batch.qo_heads, kv.head_dim_vo),
            num_partials: partials,
            grid,
            stride: per_head,
            per_cta,
            merge_grid,
            chunk: 0,
            work,
            merge,
            batch_size: b,
            qo_heads: batch.qo_heads,
            head_dim_vo: kv.head_dim_vo,
        });
    }
    let chunk = match mode {
        PlanMode::Deterministic { chunk } => chunk,
        _ if spans.len() * kv.kv_heads >= target.ctas || total == 0 => usize::MAX,
        _ => wave_chunk(total, kv.kv_heads, target),
    };
    let mut work = Vec::new();
    let mut merge = Vec::new();
    let mut partials = 0usize;
    let mut used_chunk = 0;
    for &(req, lo, hi) in &spans {
        let len = hi - lo;
        let piece = split_piece(len, chunk, tile, matches!(mode, PlanMode::Deterministic { .. }));
        if len <= piece {
            work.push(DecodeWork { req: req as i32, kv_begin: lo as i32, kv_end: hi as i32, partial: -1 });
            continue;
        }
        let n = len.div_ceil(piece);
        used_chunk = used_chunk.max(piece);
        merge.push(MergeWork { req: req as i32, first: partials as i32, count: n as i32, token: batch.qo_indptr[req] });
        for c in 0..n {
            let s = lo + c * piece;
            work.push(DecodeWork { req: req as i32, kv_begin: s as i32, kv_end: (s + piece).min(hi) as i32, partial: (partials + c) as i32 });
        }
        partials += n;
    }
    // Longest first, so the tail of the launch is short chunks.
    work.sort_by_key(|w| std::cmp::Reverse(w.kv_end - w.kv_begin));
    let (grid, merge_grid) = match mode {
        PlanMode::FixedGrid { max_ctas } => {
            if work.len() > max_ctas {
                return Err(PlanError::FixedGridTooSmall { needed: work.len(), max_ctas }.into());
            }
            (max_ctas, max_ctas)
        }
        _ => (work.len(), merge.len()),
    };
    let ws_partials = if let PlanMode::FixedGrid { max_ctas } = mode { max_ctas } else { partials };
    Ok(DecodePlan {
        mode,
        workspace_bytes: DecodePlan::workspace_for(ws_partials, batch.qo_heads, kv.head_dim_vo),
        num_partials: partials,
        grid,
        stride: grid,
        per_cta: 1,
        merge_grid,
        chunk: used_chunk,
        work,
        merge,
        batch_size: b,
        qo_heads: batch.qo_heads,
        head_dim_vo: kv.head_dim_vo,
    })
}

/// Whether a decode plan should run on the kernel's wide tile (twice the warps, `wide_kv_tile`
/// keys per tile): when the launch leaves every SM at most one CTA (`stride × kv_heads ≤ SMs`,
/// so a scheduler would otherwise have one warp to issue from) and its items are long enough to
/// fill the wide tile's ring (at least four wide tiles on average). Never for deterministic
/// plans: a request's bits must not depend on the rest of the batch, and the tile decides the
/// order of the sums. Either tile computes any plan; a CUDA graph keeps the tile it captured
/// while the plans replayed into it change.
pub fn wants_wide_tile(plan: &DecodePlan, kv_heads: usize, sm_count: usize, wide_kv_tile: usize) -> bool {
    if matches!(plan.mode, PlanMode::Deterministic { .. }) || plan.stride == 0 || plan.stride * kv_heads > sm_count {
        return false;
    }
    let (items, keys) = plan.work.iter().filter(|w| w.req >= 0).fold((0usize, 0usize), |(n, k), w| (n + 1, k + (w.kv_end - w.kv_begin).max(0) as usize));
    items > 0 && keys >= 4 * wide_kv_tile * items
}

/// A prefill schedule: one work item per (request, block of query rows, KV chunk), longest
/// first, and the merge list of the blocks whose KV was split.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillPlan {
    pub mode: PlanMode,
    pub work: Vec<crate::abi::PrefillWork>,
    /// One item per query token of a split block: combines its chunks' partial states.
    pub merge: Vec<MergeWork>,
    /// Partial-state slots (one per token and chunk of a split block).
    pub num_partials: usize,
    /// CTAs along x (`work.len()`, or the fixed grid).
    pub grid: usize,
    /// CTAs along x of the merge launch.
    pub merge_grid: usize,
    /// KV positions per chunk of split blocks (0 when nothing was split).
    pub chunk: usize,
    /// Bytes of f32 workspace for partial states.
    pub workspace_bytes: usize,
    /// Query rows per work item.
    pub rows: usize,
    pub batch_size: usize,
    pub qo_heads: usize,
}

impl PrefillPlan {
    /// The buffer the kernels read (see `pack`; the prefill kernel ignores the header's stride).
    pub fn packed(&self) -> Vec<i32> {
        let words = self.work.iter().map(|w| [w.req, w.row_start, w.kv_begin, w.kv_end, w.partial, w.stride]);
        pack(words, self.work.len(), self.grid, self.grid, &self.merge, self.merge_grid)
    }

    pub fn packed_len(&self) -> usize {
        packed_len(PREFILL_WORK_INTS, self.grid, self.merge_grid)
    }

    /// Byte offset of the merge list in the packed buffer.
    pub fn merge_offset(&self) -> usize {
        merge_offset(PREFILL_WORK_INTS, self.grid)
    }
}

/// i32 words per decode work item (`DecodeWork`).
const DECODE_WORK_INTS: usize = 4;
/// i32 words per prefill work item (`PrefillWork`).
const PREFILL_WORK_INTS: usize = 6;

/// Words of the packed header: `[num_work, num_merge, stride, 0]` (16 bytes, so the lists
/// after it stay 16-byte aligned).
pub const PLAN_HEADER_INTS: usize = 4;

/// The one buffer a plan uploads: the header `[num_work, num_merge, stride, 0]`, then the work
/// list padded to `slots` items of N words and the merge list padded to `merge_grid` items (so a
/// fixed-grid plan's buffer never changes size), all i32.
fn pack<const N: usize>(work: impl Iterator<Item = [i32; N]>, num_work: usize, stride: usize, slots: usize, merge: &[MergeWork], merge_grid: usize) -> Vec<i32> {
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

fn packed_len(work_ints: usize, slots: usize, merge_grid: usize) -> usize {
    PLAN_HEADER_INTS + work_ints * slots + 4 * merge_grid
}

fn merge_offset(work_ints: usize, slots: usize) -> usize {
    4 * (PLAN_HEADER_INTS + work_ints * slots)
}

/// Rejects a deterministic mode without a chunk size.
fn check_mode(mode: PlanMode) -> Result<()> {
    match mode {
        PlanMode::Deterministic { chunk: 0 } => Err(PlanError::Invalid("deterministic chunk size must be at least 1".into()).into()),
        _ => Ok(()),
    }
}

/// KV heads whose spans must be unioned: all of them when a kv_range bound reads `kv_head` (the
/// kernel narrows the span again per head), else one.
fn range_heads(variant: &Variant, kv_heads: usize) -> usize {
    match &variant.kv_range {
        Some(r) if [&r.lo, &r.hi].iter().any(|h| h.as_ref().is_some_and(|h| h.typed.reads(crate::spec::typed::Builtin::KvHead))) => kv_heads,
        _ => 1,
    }
}

/// A balanced decode schedule: `ctas` CTAs (per KV head) each get an equal share of the batch's
/// positions, taken in batch order, so the launch is one wave with no tail of short or idle
/// CTAs, and each CTA walks several requests in turn. A request that straddles two shares is cut
/// at the share boundary (snapped to the kernel's tile) and its pieces merge like any split.
/// The work list is CTA-major in columns: CTA x runs items `x, x + ctas, …`, padded with
/// `req == -1` items. Returns (work, merge, partial slots, items per CTA).
fn balanced_decode(spans: &[(usize, usize, usize)], qo_indptr: &[i32], tile: usize, ctas: usize) -> (Vec<DecodeWork>, Vec<MergeWork>, usize, usize) {
    let total: usize = spans.iter().map(|&(_, lo, hi)| hi - lo).sum();
    let share = total.div_ceil(ctas).max(1);
    let mut items: Vec<(usize, DecodeWork)> = Vec::with_capacity(spans.len() + ctas); // (cta, item)
    let mut merge = Vec::new();
    let mut partials = 0usize;
    let mut g = 0usize; // positions of the batch before this request
    let (mut cta, mut boundary) = (0usize, share); // the CTA filling now, and where its share ends
    let mut pieces = Vec::new(); // (cta, start, end) of one request, request-relative
    for &(req, lo, hi) in spans {
        let len = hi - lo;
        while g >= boundary && cta + 1 < ctas {
            (cta, boundary) = (cta + 1, boundary + share);
        }
        pieces.clear();
        let mut start = 0;
        while g + len > boundary && cta + 1 < ctas {
            let cut = boundary - g; // in (0, len)
            let snapped = (cut + tile / 2) / tile * tile;
            if snapped >= len {
                break; // the request's last bit stays with this CTA
            }
            if snapped > start {
                pieces.push((cta, start, snapped));
                start = snapped;
            }
            (cta, boundary) = (cta + 1, boundary + share);
        }
        pieces.push((cta, start, len));
        g += len;
        let whole = pieces.len() == 1;
        if !whole {
            merge.push(MergeWork { req: req as i32, first: partials as i32, count: pieces.len() as i32, token: qo_indptr[req] });
        }
        for (j, &(c, s, e)) in pieces.iter().enumerate() {
            let partial = if whole { -1 } else { (partials + j) as i32 };
            items.push((c, DecodeWork { req: req as i32, kv_begin: (lo + s) as i32, kv_end: (lo + e) as i32, partial }));
        }
        if !whole {
            partials += pieces.len();
        }
    }
    // Column layout: CTA c's k-th item at k * ctas + c, in batch order.
    let mut next = vec![0usize; ctas];
    for &(c, _) in &items {
        next[c] += 1;
    }
    let per_cta = next.iter().copied().max().unwrap_or(0).max(1);
    next.fill(0);
    let mut work = vec![DecodeWork { req: -1, kv_begin: 0, kv_end: 0, partial: -1 }; per_cta * ctas];
    for (c, w) in items {
        work[next[c] * ctas + c] = w;
        next[c] += 1;
    }
    (work, merge, partials, per_cta)
}

/// The chunk that spreads `total` visible positions of each of `kv_heads` heads over one wave of
/// `target.ctas` CTAs: a multiple of the kernel's tile, at least MIN_CHUNK.
fn wave_chunk(total: usize, kv_heads: usize, target: PlanTarget) -> usize {
    let tile = target.kv_tile.max(1);
    let per_cta = (total * kv_heads).div_ceil(target.ctas.max(1));
    per_cta.div_ceil(tile).max(1).saturating_mul(tile).max(MIN_CHUNK)
}

/// The length of the pieces a span of `len` positions is cut into (`>= len`: it stays whole).
/// Deterministic mode cuts at fixed offsets, so the result never depends on the rest of the
/// batch; the other modes cut into the nearest whole number of equal, tile-aligned pieces, so no
/// span leaves a short straggler.
fn split_piece(len: usize, chunk: usize, tile: usize, deterministic: bool) -> usize {
    if deterministic || len <= chunk {
        return if deterministic { chunk } else { len };
    }
    let n = ((len as f64 / chunk as f64).round() as usize).max(1);
    len.div_ceil(n).div_ceil(tile) * tile
}

/// The KV positions `[lo, hi)` that any of a request's query tokens `first..last` (inclusive)
/// may see, over every KV head `kv_range` distinguishes. Bounds proven monotone in `q_pos` are
/// evaluated at the two ends only; others at every token.
fn block_span(variant: &Variant, params: &ParamValues, req: usize, q_len: usize, kv_len: usize, tokens: (usize, usize), heads: usize) -> (usize, usize) {
    let Some(r) = &variant.kv_range else { return (0, kv_len) };
    let mono = |h: &Option<HookExpr>| h.as_ref().is_none_or(|h| crate::spec::implied::nondecreasing_in_q_pos(&h.typed, &variant.params));
    let ends = [tokens.0, tokens.1];
    let every: Vec<usize> = if mono(&r.lo) && mono(&r.hi) { ends.to_vec() } else { (tokens.0..=tokens.1).collect() };
    let (mut lo, mut hi) = (kv_len, 0);
    for &t in &every {
        for h in 0..heads {
            // visible_span places its query at kv_len - q_len; token t sits t positions later.
            let (l, r) = visible_span(variant, params, req, q_len - t, kv_len, h);
            if r > l {
                (lo, hi) = (lo.min(l), hi.max(r));
            }
        }
    }
    if hi > lo {
        (lo, hi)
    } else {
        (0, 0)
    }
}

/// Plans a prefill/append batch: each request's `q_len × group` query rows are cut into blocks
/// of `rows`; every block reads the KV positions its rows may see (the kernel narrows the span by
/// `kv_range` per row). Blocks are ordered by an estimate of their work — their visible span —
/// longest first, so a long prompt's late blocks start before short requests.
///
/// When the blocks alone cannot fill the GPU (`blocks × kv_heads < target.ctas`, e.g. a few
/// draft tokens against a long cache), a block's span is split into equal KV chunks (multiples
/// of the kernel's tile) whose partial states a merge launch combines, as in decode. Splitting
/// needs blocks of whole tokens (`rows` a multiple of the GQA group); fixed-grid plans never
/// split. Deterministic mode splits every span at fixed offsets (`chunk`) from its start, so a
/// request's result does not depend on the rest of the batch.
pub fn plan_prefill(variant: &Variant, params: &ParamValues, batch: &Batch<'_>, rows: usize, target: PlanTarget, mode: PlanMode) -> Result<PrefillPlan> {
    use crate::abi::PrefillWork;
    let kv = batch.kv;
    validate(batch, batch.q_elems(), kv.k_len(), kv.v_len())?;
    let b = batch.batch_size();
    let group = batch.group();
    let rows = rows.max(1);
    params.fits(&variant.params, Dims { qo_heads: batch.qo_heads, kv_heads: kv.kv_heads, batch: b }).map_err(Error::Param)?;
    check_mode(mode)?;
    // A block's rows are (token, head) pairs, indexed in i32 by the kernel.
    for r in 0..b {
        if batch.q_len(r).checked_mul(group).is_none_or(|n| n > i32::MAX as usize) {
            return Err(Error::UnsupportedConfig(format!(
                "request {r}: {} query tokens × a GQA group of {group} is more than the 2^31 - 1 query rows a prefill kernel indexes",
                batch.q_len(r)
            )));
        }
    }
    let heads_to_scan = range_heads(variant, kv.kv_heads);
    let can_split = rows % group == 0 && !matches!(mode, PlanMode::FixedGrid { .. });
    let n_blocks: usize = (0..b).map(|r| (batch.q_len(r) * group).div_ceil(rows)).sum();
    let split_pays = match mode {
        PlanMode::Deterministic { .. } => true,
        PlanMode::Default => n_blocks * kv.kv_heads < target.ctas,
        PlanMode::FixedGrid { .. } => false,
    };
    // (request, first row, tokens first..=last, span)
    let mut blocks = Vec::with_capacity(n_blocks);
    for req in 0..b {
        let q_len = batch.q_len(req);
        let kv_len = batch.kv_len(req);
        let n_rows = q_len * group;
        for row_start in (0..n_rows).step_by(rows) {
            let tokens = (row_start / group, ((row_start + rows).min(n_rows) - 1) / group);
            let span = if can_split && split_pays {
                block_span(variant, params, req, q_len, kv_len, tokens, heads_to_scan)
            } else {
                // Only an estimate (the span of the block's first and last rows for head 0);
                // the kernel narrows each row by kv_range itself.
                let (lo, _) = visible_span(variant, params, req, q_len - tokens.0, kv_len, 0);
                let (_, hi) = visible_span(variant, params, req, q_len - tokens.1, kv_len, 0);
                (lo, hi.max(lo))
            };
            blocks.push((req, row_start, tokens, span));
        }
    }
    let tile = target.kv_tile.max(1);
    let chunk = match mode {
        PlanMode::Deterministic { chunk } if can_split => chunk,
        PlanMode::Default if can_split && split_pays => {
            let total: usize = blocks.iter().map(|b| b.3 .1 - b.3 .0).sum();
            if total == 0 {
                usize::MAX
            } else {
                wave_chunk(total, kv.kv_heads, target)
            }
        }
        _ => usize::MAX,
    };
    let mut work: Vec<(usize, PrefillWork)> = Vec::with_capacity(blocks.len());
    let mut merge = Vec::new();
    let mut partials = 0usize;
    let mut used_chunk = 0;
    for &(req, row_start, (t0, t1), (lo, hi)) in &blocks {
        let len = hi - lo;
        let whole = PrefillWork { req: req as i32, row_start: row_start as i32, kv_begin: 0, kv_end: batch.kv_len(req) as i32, partial: -1, stride: 0 };
        let piece = split_piece(len, chunk, tile, matches!(mode, PlanMode::Deterministic { .. }));
        if len <= piece {
            work.push((len, whole));
            continue;
        }
        let n = len.div_ceil(piece);
        used_chunk = used_chunk.max(piece);
        let ntok = t1 - t0 + 1;
        // Slots are token-major: token k of the block, chunk c at partials + k * n + c.
        for c in 0..n {
            let s = lo + c * piece;
            let e = (s + piece).min(hi);
            work.push((e - s, PrefillWork { kv_begin: s as i32, kv_end: e as i32, partial: (partials + c) as i32, stride: n as i32, ..whole }));
        }
        for k in 0..ntok {
            merge.push(MergeWork { req: req as i32, first: (partials + k * n) as i32, count: n as i32, token: batch.qo_indptr[req] + (t0 + k) as i32 });
        }
        partials += ntok * n;
    }
    if partials > i32::MAX as usize {
        return Err(PlanError::Invalid(format!("the split needs {partials} partial states, more than the 2^31 - 1 the kernels index")).into());
    }
    work.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
    let work: Vec<PrefillWork> = work.into_iter().map(|(_, w)| w).collect();
    let grid = match mode {
        PlanMode::FixedGrid { max_ctas } => {
            if work.len() > max_ctas {
                return Err(PlanError::FixedGridTooSmall { needed: work.len(), max_ctas }.into());
            }
            max_ctas
        }
        _ => work.len(),
    };
    Ok(PrefillPlan {
        mode,
        merge_grid: merge.len(),
        merge,
        num_partials: partials,
        workspace_bytes: DecodePlan::workspace_for(partials, batch.qo_heads, kv.head_dim_vo),
        chunk: used_chunk,
        work,
        grid,
        rows,
        batch_size: b,
        qo_heads: batch.qo_heads,
    })
}

/// What the engine needs to upload a plan.
pub trait Upload {
    /// The i32 buffer the kernels read.
    fn packed(&self) -> Vec<i32>;
    /// Bytes of f32 workspace the launch needs.
    fn workspace_bytes(&self) -> usize;
    /// Whether buffers must never be reallocated (CUDA-graph capture).
    fn fixed(&self) -> bool;
}

impl Upload for DecodePlan {
    fn packed(&self) -> Vec<i32> {
        DecodePlan::packed(self)
    }
    fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }
    fn fixed(&self) -> bool {
        matches!(self.mode, PlanMode::FixedGrid { .. })
    }
}

impl Upload for PrefillPlan {
    fn packed(&self) -> Vec<i32> {
        PrefillPlan::packed(self)
    }
    fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }
    fn fixed(&self) -> bool {
        matches!(self.mode, PlanMode::FixedGrid { .. })
    }
}
