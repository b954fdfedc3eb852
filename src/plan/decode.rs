//! Decode plans: one query token per request. A small batch splits long spans into equal chunks
//! until every SM has one; a big batch of similar lengths gets one item per CTA, longest first; a
//! big skewed batch is balanced over one wave of resident CTAs.

use super::{check_mode, merge_offset, pack, packed_len, range_heads, split_piece, visible_span, wave_chunk, Plan, PlanMode, PlanTarget};
use crate::abi::{DecodeWork, MergeWork};
use crate::error::PlanError;
use crate::kv::{LayoutError, ValidBatch};
use crate::spec::params::{Dims, ParamValues};
use crate::spec::Variant;
use crate::{Error, Result};

/// i32 words per decode work item (`DecodeWork`).
const DECODE_WORK_INTS: usize = 4;

/// A decode schedule, ready to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodePlan {
    /// The mode it was planned in.
    pub mode: PlanMode,
    /// The work list (balanced plans, and fixed grids dealing out a list longer than their
    /// wave: column-major over CTAs, padded with `req == -1`).
    pub work: Vec<DecodeWork>,
    /// One item per split request: its partial states to merge.
    pub merge: Vec<MergeWork>,
    /// Partial-state slots the workspace must hold.
    pub num_partials: usize,
    /// CTAs along x for the decode launch (`work.len()`, the fixed grid, or a balanced plan's
    /// `stride`).
    pub grid: usize,
    /// CTAs that take work: CTA x < stride runs items x, x + stride, … of the work list (the
    /// kernel reads it from the packed header, so a captured fixed grid can run either kind).
    pub stride: usize,
    /// Work items per CTA: 1, or more in a balanced plan or a fixed grid's walk (padding items
    /// have `req == -1`).
    pub per_cta: usize,
    /// CTAs along x for the merge launch.
    pub merge_grid: usize,
    /// Chunk size used for split requests (0 if none was split).
    pub chunk: usize,
    /// Bytes of f32 workspace for partial states.
    pub workspace_bytes: usize,
    /// Requests of the batch planned.
    pub batch_size: usize,
    /// Query heads of the batch planned.
    pub qo_heads: usize,
    /// Value head dim of the batch planned.
    pub head_dim_vo: usize,
    /// KV heads of the batch planned (the launch's grid along y).
    pub kv_heads: usize,
    /// [`ValidBatch::fingerprint`] of the batch planned: a launch refuses another batch.
    pub batch_fingerprint: u64,
    /// A decode cascade's shared levels ([`super::plan_decode_cascade`]): group items on the
    /// prefill kernel of the same variant, launched before this plan's items and writing
    /// partial states into the same workspace; packed after this plan's lists. `None` for a
    /// plain decode plan.
    pub prefix: Option<Box<super::PrefillPlan>>,
    /// Partial-state slots a fixed-grid plan reserves for a decode cascade's prefix beyond its
    /// `max_ctas` ([`super::with_cascade_capacity`]); 0 otherwise.
    pub prefix_slots: usize,
}

impl DecodePlan {
    /// The one buffer uploaded per step (see `pack`: header `[num_work, num_merge, stride, 0]`,
    /// work list, merge list). In fixed-grid mode it is padded to the capacity so its size never
    /// changes.
    pub fn packed(&self) -> Vec<i32> {
        let mut v = pack(self.work.iter().map(|w| [w.req, w.kv_begin, w.kv_end, w.partial]), self.work.len(), self.stride, self.work_slots(), &self.merge, self.merge_slots());
        if let Some(p) = &self.prefix {
            // The prefix level's own packed plan, 16-byte aligned (its group table offset is
            // relative to its own header).
            v.resize(self.prefix_offset(), 0);
            v.extend(p.packed());
        }
        v
    }

    /// Length of [`DecodePlan::packed`] in i32 words.
    pub fn packed_len(&self) -> usize {
        match &self.prefix {
            Some(p) => self.prefix_offset() + p.packed_len(),
            None => self.own_len(),
        }
    }

    fn own_len(&self) -> usize {
        packed_len(DECODE_WORK_INTS, self.work_slots(), self.merge_slots())
    }

    /// Word offset of the prefix level's packed plan in [`DecodePlan::packed`].
    pub fn prefix_offset(&self) -> usize {
        self.own_len().next_multiple_of(4)
    }

    /// Byte offset of the merge list in the packed buffer.
    pub fn merge_offset(&self) -> usize {
        merge_offset(DECODE_WORK_INTS, self.work_slots())
    }

    /// Work items the packed buffer holds: a fixed grid's capacity, else the list.
    fn work_slots(&self) -> usize {
        match self.mode {
            PlanMode::FixedGrid { max_ctas } => max_ctas,
            _ => self.work.len(),
        }
    }

    /// Merge items the packed buffer holds: a fixed grid's capacity, else the list.
    fn merge_slots(&self) -> usize {
        match self.mode {
            PlanMode::FixedGrid { max_ctas } => max_ctas,
            _ => self.merge.len(),
        }
    }

    /// Workspace bytes needed for `partials` slots.
    pub fn workspace_for(partials: usize, qo_heads: usize, head_dim_vo: usize) -> usize {
        // Saturating: a workspace beyond usize cannot be allocated, and says so at upload.
        partials.saturating_mul(qo_heads).saturating_mul(head_dim_vo.saturating_add(1)).saturating_mul(4)
    }
}

/// Plans a decode batch: every request has exactly one query token (or none).
pub fn plan_decode(variant: &Variant, params: &ParamValues, batch: &ValidBatch<'_>, target: PlanTarget, mode: PlanMode) -> Result<DecodePlan> {
    // Buffer lengths are checked at launch; here only the index arrays matter.
    let kv = batch.kv;
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
    // A fixed grid keeps its launch and buffer sizes: the balanced CTAs are its first
    // `per_head`, and the list (a column per CTA, as long as the fullest CTA's), the merges and
    // the partials must fit its capacity. Many short requests can pile into one CTA's column, so
    // a balanced list that does not fit is planned unbalanced instead, which
    // `decode_fixed_grid_bound` bounds.
    let balanced = balance.then(|| balanced_decode(&spans, batch.qo_indptr, tile, per_head)).filter(|(work, _, partials, _)| match mode {
        PlanMode::FixedGrid { max_ctas } => work.len() <= max_ctas && *partials <= max_ctas && per_head <= max_ctas,
        _ => true,
    });
    if let Some((work, merge, partials, per_cta)) = balanced {
        let (grid, merge_grid, ws_partials) = match mode {
            PlanMode::FixedGrid { max_ctas } => (fixed_launch(max_ctas, per_head), fixed_merge_launch(max_ctas, target, batch.qo_heads), max_ctas),
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
            kv_heads: kv.kv_heads,
            batch_fingerprint: batch.fingerprint(),
            prefix: None,
            prefix_slots: 0,
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
    // A fixed grid's launch is one wave of resident CTAs (per KV head), whatever the capacity:
    // CTA x < stride runs items x, x + stride, … (scheduler.cuh), so a list longer than the wave
    // is walked by the CTAs in turn, and no CTA is launched only to exit. Which CTA runs which
    // item is decided here, longest first to the least loaded CTA (`lpt_columns`), as the
    // hardware's scheduler does for an eager launch of one CTA per item.
    let (grid, stride, merge_grid) = match mode {
        PlanMode::FixedGrid { max_ctas } => {
            if work.len() > max_ctas {
                return Err(PlanError::FixedGridTooSmall { needed: work.len(), max_ctas }.into());
            }
            let grid = fixed_launch(max_ctas, per_head);
            let stride = work.len().min(grid);
            deal_to_wave(&mut work, stride, tile, max_ctas);
            (grid, stride, fixed_merge_launch(max_ctas, target, batch.qo_heads))
        }
        _ => (work.len(), work.len(), merge.len()),
    };
    let per_cta = items_per_cta(work.len(), stride);
    let ws_partials = if let PlanMode::FixedGrid { max_ctas } = mode { max_ctas } else { partials };
    Ok(DecodePlan {
        mode,
        workspace_bytes: DecodePlan::workspace_for(ws_partials, batch.qo_heads, kv.head_dim_vo),
        num_partials: partials,
        grid,
        stride,
        per_cta,
        merge_grid,
        chunk: used_chunk,
        work,
        merge,
        batch_size: b,
        qo_heads: batch.qo_heads,
        head_dim_vo: kv.head_dim_vo,
        kv_heads: kv.kv_heads,
        batch_fingerprint: batch.fingerprint(),
        prefix: None,
        prefix_slots: 0,
    })
}

/// A fixed grid's list longer than its wave of `stride` CTAs, dealt out in columns
/// ([`lpt_columns`]; left as it is when the padded columns outgrow `capacity`).
pub(super) fn deal_to_wave(work: &mut Vec<DecodeWork>, stride: usize, tile: usize, capacity: usize) {
    if work.len() > stride && stride > 0 {
        if let Some(columns) = lpt_columns(work, stride, tile, capacity) {
            *work = columns;
        }
    }
}

/// Work items per CTA of a list of `len` walked by `stride` CTAs (1 for an empty grid).
pub(super) fn items_per_cta(len: usize, stride: usize) -> usize {
    if stride == 0 { 1 } else { len.div_ceil(stride).max(1) }
}

/// Deals a work list (longest first) out to `ctas` CTAs, each item to the CTA with the least
/// work so far (longest processing time first: the largest load is at most 4/3 of the best
/// possible), an item costing its keys plus one tile (its prologue and epilogue). Returns the
/// list in columns (CTA x runs items x, x + ctas, …, each column longest first), padded with
/// `req == -1` items, or `None` when the padded list would not fit `capacity` slots (the walk
/// by stride over the list as it is then runs it).
///
/// A fixed grid of one resident wave walking the sorted list by stride instead gives CTA x the
/// x-th longest item of every band of `ctas`: on the H200, B 100 (151..1172 tokens) on 33 CTAs
/// per KV head, one CTA ran a fourth item after the others were done, and the graph step was
/// 2730 µs against 2556 eager (`benches/graph_gap.py`).
fn lpt_columns(work: &[DecodeWork], ctas: usize, tile: usize, capacity: usize) -> Option<Vec<DecodeWork>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut heap: BinaryHeap<Reverse<(usize, usize)>> = (0..ctas).map(|c| Reverse((0, c))).collect();
    let mut columns: Vec<Vec<DecodeWork>> = vec![Vec::new(); ctas];
    for w in work {
        let Reverse((load, c)) = heap.pop()?;
        columns[c].push(*w);
        heap.push(Reverse((load + (w.kv_end - w.kv_begin).max(0) as usize + tile, c)));
    }
    let per_cta = columns.iter().map(Vec::len).max().unwrap_or(0);
    if per_cta.checked_mul(ctas)? > capacity {
        return None;
    }
    let mut out = vec![DecodeWork { req: -1, kv_begin: 0, kv_end: 0, partial: -1 }; per_cta * ctas];
    for (c, column) in columns.iter().enumerate() {
        for (k, w) in column.iter().enumerate() {
            out[k * ctas + c] = *w;
        }
    }
    Some(out)
}

/// CTAs (per KV head) a fixed-grid decode launch has: one wave of resident CTAs, at most the
/// capacity (a captured graph replays this launch, so it depends on the capacity and the GPU
/// only). Before, the launch was the capacity itself: at a graph bucket of 256 requests, about
/// 2 100 CTAs per KV head of which most exited at once.
pub(super) fn fixed_launch(max_ctas: usize, per_head: usize) -> usize {
    if per_head == 0 {
        max_ctas
    } else {
        max_ctas.min(per_head)
    }
}

/// CTAs along x a fixed-grid merge launch has: about eight CTAs (of `qo_heads` along y) per SM,
/// at most the capacity; `merge_states` walks the list by the grid's stride (merge.cuh).
pub(super) fn fixed_merge_launch(max_ctas: usize, target: PlanTarget, qo_heads: usize) -> usize {
    max_ctas.min((8 * target.ctas.max(1)).div_ceil(qo_heads.max(1)).max(1))
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

impl Plan for DecodePlan {
    fn is_cascade(&self) -> bool {
        // A fixed-grid plan's prefix section may be empty (`with_cascade_capacity`).
        self.prefix.as_ref().is_some_and(|p| !p.work.is_empty())
    }
    fn prefix(&self) -> Option<(&super::PrefillPlan, usize)> {
        self.prefix.as_deref().map(|p| (p, self.prefix_offset()))
    }
    fn packed(&self) -> Vec<i32> {
        DecodePlan::packed(self)
    }
    fn packed_len(&self) -> usize {
        DecodePlan::packed_len(self)
    }
    fn merge_offset(&self) -> usize {
        DecodePlan::merge_offset(self)
    }
    fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }
    fn partial_slots(&self) -> usize {
        // A fixed-grid workspace holds a slot per work item of its capacity, whatever this step
        // splits (`workspace_bytes` is laid out for that many). The launched grid can be smaller
        // (one wave of resident CTAs), and a balanced list's cut requests can have more pieces
        // than it has CTAs: laying the workspace out for the grid put those partials' outputs
        // over the LSEs.
        match self.mode {
            PlanMode::FixedGrid { max_ctas } => max_ctas + self.prefix_slots,
            _ => self.num_partials,
        }
    }
    fn mode(&self) -> PlanMode {
        self.mode
    }
    fn grid(&self) -> usize {
        self.grid
    }
    fn merge_grid(&self) -> usize {
        self.merge_grid
    }
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn qo_heads(&self) -> usize {
        self.qo_heads
    }
    fn batch_fingerprint(&self) -> u64 {
        self.batch_fingerprint
    }
}
