//! Prefill / append plans: each request's query rows cut into blocks, each block's visible KV
//! span split into chunks when the blocks cannot fill the GPU.

use super::{check_mode, merge_offset, pack, packed_len, range_heads, split_piece, visible_span, wave_chunk, Plan, PlanMode, PlanTarget};
use super::decode::DecodePlan;
use crate::abi::MergeWork;
use crate::cascade::Cascade;
use crate::error::PlanError;
use crate::kv::ValidBatch;
use crate::spec::params::{Dims, ParamValues};
use crate::spec::{HookExpr, Variant};
use crate::{Error, Result};

/// i32 words per prefill work item (`PrefillWork`).
const PREFILL_WORK_INTS: usize = 6;

/// A prefill schedule: one work item per (request, block of query rows, KV chunk), longest
/// first, and the merge list of the blocks whose KV was split.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillPlan {
    /// The mode it was planned in.
    pub mode: PlanMode,
    /// The work list, longest first.
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
    /// Requests of the batch planned.
    pub batch_size: usize,
    /// Query heads of the batch planned.
    pub qo_heads: usize,
    /// [`ValidBatch::fingerprint`] of the batch planned: a launch refuses another batch.
    pub batch_fingerprint: u64,
    /// A cascade plan's group table ([`plan_cascade`]): `[request, token, partial slot, 0]` per
    /// row entry of its group items; empty otherwise.
    pub groups: Vec<[i32; 4]>,
    /// Entries the packed group table holds: a fixed-grid decode cascade's prefix pads its table
    /// to this capacity, so its buffer never changes size; 0 otherwise (the table as it is).
    pub group_slots: usize,
}

impl PrefillPlan {
    /// The buffer the kernels read (see `pack`; the prefill kernel ignores the header's stride).
    pub fn packed(&self) -> Vec<i32> {
        let words = self.work.iter().map(|w| [w.req, w.row_start, w.kv_begin, w.kv_end, w.partial, w.stride]);
        let mut v = pack(words, self.work.len(), self.grid, self.grid, &self.merge, self.merge_grid);
        if self.has_table() {
            // The group table after the lists, 16-byte aligned; header word 3 is its offset.
            let at = self.groups_offset();
            v.resize(at, 0);
            v[3] = at as i32;
            v.extend(self.groups.iter().flatten());
            v.resize(self.packed_len(), 0);
        }
        v
    }

    /// Word offset of the group table in the packed buffer.
    fn groups_offset(&self) -> usize {
        packed_len(PREFILL_WORK_INTS, self.grid, self.merge_grid).next_multiple_of(4)
    }

    /// Whether the packed buffer holds a group table.
    fn has_table(&self) -> bool {
        !self.groups.is_empty() || self.group_slots > 0
    }

    /// Length of [`PrefillPlan::packed`] in i32 words.
    pub fn packed_len(&self) -> usize {
        if self.has_table() {
            self.groups_offset() + 4 * self.groups.len().max(self.group_slots)
        } else {
            packed_len(PREFILL_WORK_INTS, self.grid, self.merge_grid)
        }
    }

    /// Byte offset of the merge list in the packed buffer.
    pub fn merge_offset(&self) -> usize {
        merge_offset(PREFILL_WORK_INTS, self.grid)
    }
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
pub fn plan_prefill(variant: &Variant, params: &ParamValues, batch: &ValidBatch<'_>, rows: usize, target: PlanTarget, mode: PlanMode) -> Result<PrefillPlan> {
    use crate::abi::PrefillWork;
    let kv = batch.kv;
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
        batch_fingerprint: batch.fingerprint(),
        groups: Vec::new(),
        group_slots: 0,
    })
}

/// The checks every cascade plan makes (parameters, mode, a tile of at least one token's rows);
/// returns the member tokens a group item holds.
/// `refuse_fixed`: the plan's name, when it has no fixed-grid form.
fn cascade_tokens_per_item(variant: &Variant, params: &ParamValues, batch: &ValidBatch<'_>, rows: usize, mode: PlanMode, refuse_fixed: Option<&str>) -> Result<usize> {
    let group = batch.group();
    params.fits(&variant.params, Dims { qo_heads: batch.qo_heads, kv_heads: batch.kv.kv_heads, batch: batch.batch_size() }).map_err(Error::Param)?;
    check_mode(mode)?;
    if let (PlanMode::FixedGrid { .. }, Some(what)) = (mode, refuse_fixed) {
        return Err(Error::UnsupportedConfig(format!("{what} in CUDA-graph (fixed-grid) mode is not built: plan the batch without a cascade")));
    }
    let per_item = rows / group.max(1);
    if per_item == 0 {
        return Err(Error::UnsupportedConfig(format!("a cascade needs a tile of at least one token's rows: {rows} rows per block, a GQA group of {group}")));
    }
    Ok(per_item)
}

/// Plans a batch through its cascade (`crate::cascade`): every group of every level becomes
/// group items — blocks of at most `rows / group` member tokens (all query tokens of its
/// requests) over a chunk of the group's keys — each row writing a partial state, and one merge
/// item per query token combines the token's partials (the sink added there, once). A token of a
/// request with no keys merges nothing: its output is zero and its LSE -inf, as the reference's.
/// The keys of a group are split into chunks of at most one CTA's share of a wave of
/// `target.ctas` (in deterministic mode, chunks of the mode's size). Not in fixed-grid mode: a
/// CUDA graph's buffers have no room for the group table.
pub fn plan_cascade(variant: &Variant, params: &ParamValues, batch: &ValidBatch<'_>, cascade: &Cascade, rows: usize, target: PlanTarget, mode: PlanMode) -> Result<PrefillPlan> {
    use crate::abi::PrefillWork;
    let kv = batch.kv;
    let b = batch.batch_size();
    let per_item = cascade_tokens_per_item(variant, params, batch, rows, mode, Some("a prefill cascade plan"))?;
    let tokens = |r: usize| batch.qo_indptr[r] as usize..batch.qo_indptr[r + 1] as usize;
    let groups: Vec<&crate::cascade::Group> = cascade.levels.iter().flat_map(|l| &l.groups).filter(|g| g.len > 0).collect();
    let n_tok = |g: &crate::cascade::Group| g.requests.iter().map(|&r| batch.q_len(r)).sum::<usize>();
    let tile = target.kv_tile.max(1);
    let chunk = match mode {
        PlanMode::Deterministic { chunk } => chunk,
        _ => {
            // A tile costs the same per key whatever rows it holds, so the work is blocks × keys;
            // no item may take more than a CTA's share of one wave (a 32K prefix left whole ran
            // on 4 × 8 CTAs beside 1 024 short ones: H200, 1246 µs against 658 for FlashInfer's
            // cascade, BENCHMARKS.md).
            let total: usize = groups.iter().map(|g| n_tok(g).div_ceil(per_item) * g.len).sum();
            if total == 0 {
                usize::MAX
            } else {
                wave_chunk(total, kv.kv_heads, target)
            }
        }
    };
    let det = matches!(mode, PlanMode::Deterministic { .. });
    let pieces = |g: &crate::cascade::Group| g.len.div_ceil(split_piece(g.len, chunk, tile, det));
    // Slots per token: a partial for each chunk of each group its request is in, token-major.
    let mut count = vec![0usize; b];
    for g in &groups {
        for &r in &g.requests {
            count[r] += pieces(g);
        }
    }
    let mut base = vec![0usize; batch.qo_indptr.last().map_or(0, |&t| t.max(0) as usize)];
    let mut merge = Vec::with_capacity(base.len());
    let mut slots = 0usize;
    for (r, &n) in count.iter().enumerate() {
        for t in tokens(r) {
            base[t] = slots;
            merge.push(MergeWork { req: r as i32, first: slots as i32, count: n as i32, token: t as i32 });
            slots += n;
        }
    }
    if slots > i32::MAX as usize {
        return Err(PlanError::Invalid(format!("the cascade needs {slots} partial states, more than the 2^31 - 1 the kernels index")).into());
    }
    let mut used = vec![0usize; b]; // slots of each request's tokens taken so far
    let mut work: Vec<(usize, PrefillWork)> = Vec::new();
    let mut table: Vec<[i32; 4]> = Vec::new();
    let mut used_chunk = 0;
    for g in &groups {
        let piece = split_piece(g.len, chunk, tile, det);
        let n = g.len.div_ceil(piece);
        if n > 1 {
            used_chunk = used_chunk.max(piece);
        }
        let members: Vec<(usize, usize)> = g.requests.iter().flat_map(|&r| tokens(r).map(move |t| (r, t))).collect();
        for c in 0..n {
            let (s, e) = (g.kv_start + c * piece, (g.kv_start + (c + 1) * piece).min(g.kv_start + g.len));
            for block in members.chunks(per_item) {
                let at = table.len();
                table.extend(block.iter().map(|&(r, t)| [r as i32, t as i32, (base[t] + used[r] + c) as i32, 0]));
                let item = PrefillWork { req: g.requests[0] as i32, row_start: at as i32, kv_begin: s as i32, kv_end: e as i32, partial: -1, stride: -(block.len() as i32) };
                work.push(((e - s) * block.len(), item));
            }
        }
        for &r in &g.requests {
            used[r] += n;
        }
    }
    if table.len() > i32::MAX as usize {
        return Err(PlanError::Invalid(format!("the cascade's group table has {} entries, more than the kernels index", table.len())).into());
    }
    work.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
    let work: Vec<PrefillWork> = work.into_iter().map(|(_, w)| w).collect();
    Ok(PrefillPlan {
        mode,
        merge_grid: merge.len(),
        merge,
        num_partials: slots,
        workspace_bytes: DecodePlan::workspace_for(slots, batch.qo_heads, kv.head_dim_vo),
        chunk: used_chunk,
        grid: work.len(),
        work,
        rows,
        batch_size: b,
        qo_heads: batch.qo_heads,
        batch_fingerprint: batch.fingerprint(),
        groups: table,
        group_slots: 0,
    })
}

/// When an eager decode cascade's suffixes run in its prefix launch instead of a decode launch
/// of their own: their keys × KV heads × the prefill tile's rows (each one-token suffix item
/// pays for a whole tile) at most this many per SM. A model from the H200's cascade sweep
/// (`bench --suite cascade`): a launch and its merge gap cost about what 8192 key-rows of
/// prefill tile per SM do; below it (n 4-8 sharing 4096) the all-prefill cascade was 3-7 µs
/// faster, above it (B 128 × 256 own keys) the decode launch saved 86 µs of padding.
pub const FOLD_KEY_ROWS_PER_SM: usize = 8192;

/// Prefill CTAs (per KV head) a fixed-grid decode cascade reserves for its shared levels: one
/// wave of the prefill target. A captured graph launches this many whatever the step shares.
pub fn decode_cascade_prefix_ctas(prefill_target: PlanTarget, kv_heads: usize) -> usize {
    prefill_target.ctas.div_ceil(kv_heads.max(1)).max(1)
}

/// The empty prefix section of a fixed-grid decode plan that can host a cascade: `ctas` prefill
/// CTAs (all exit: no work), a group table of `ctas × per_item` entries, and the workspace of
/// `slots` partial states (the decode capacity plus the prefix's).
fn fixed_prefix(batch: &ValidBatch<'_>, rows: usize, ctas: usize, per_item: usize, slots: usize, head_dim_vo: usize) -> PrefillPlan {
    PrefillPlan {
        mode: PlanMode::FixedGrid { max_ctas: ctas },
        work: Vec::new(),
        merge: Vec::new(),
        num_partials: slots,
        grid: ctas,
        merge_grid: 0,
        chunk: 0,
        workspace_bytes: DecodePlan::workspace_for(slots, batch.qo_heads, head_dim_vo),
        rows,
        batch_size: batch.batch_size(),
        qo_heads: batch.qo_heads,
        batch_fingerprint: batch.fingerprint(),
        groups: Vec::new(),
        group_slots: ctas * per_item,
    }
}

/// Gives a fixed-grid decode plan the (empty) prefix section of a decode cascade, so that a graph
/// captured on it also replays steps planned by [`plan_decode_cascade`] in the same mode and
/// with the same `rows` and `prefill_target`: the packed buffer, the launches and the workspace
/// layout are those of every fixed-grid decode cascade of the batch's shape. Other plans are
/// returned unchanged.
pub fn with_cascade_capacity(mut plan: DecodePlan, batch: &ValidBatch<'_>, rows: usize, prefill_target: PlanTarget) -> DecodePlan {
    let PlanMode::FixedGrid { max_ctas } = plan.mode else { return plan };
    if plan.prefix.is_some() {
        return plan;
    }
    let per_item = (rows / batch.group().max(1)).max(1);
    let ctas = decode_cascade_prefix_ctas(prefill_target, batch.kv.kv_heads);
    let slots = max_ctas + ctas * per_item;
    plan.prefix_slots = ctas * per_item;
    plan.workspace_bytes = DecodePlan::workspace_for(slots, batch.qo_heads, plan.head_dim_vo);
    plan.prefix = Some(Box::new(fixed_prefix(batch, rows, ctas, per_item, slots, plan.head_dim_vo)));
    plan
}

/// Plans a decode batch (one query token per request, or none) through its cascade with the
/// levels split by kind: every group that two or more requests' queries read (a shared prefix)
/// becomes group items on the prefill kernel (`rows` per block, as [`plan_cascade`]), returned
/// as the plan's [`DecodePlan::prefix`]; the rest of each request's keys (its suffix, and the
/// groups only it reads, coalesced where they touch) become decode work items, split into equal
/// chunks when they alone cannot fill `decode_target.ctas` (a suffix as one-token tiles on the
/// prefill kernel left 97% of its MMAs as padding: BENCHMARKS.md, issue 15). Each token's
/// partial states are contiguous slots — its shared groups' chunks, then its own spans' — and
/// one merge item per token combines them (the sink added there, once); a request outside every
/// shared group with one piece writes its output directly. The prefix launch runs first, then
/// the decode launch and the merge, over one workspace.
///
/// An eager ([`PlanMode::Default`]) plan whose suffixes all belong to shared requests and are
/// small ([`FOLD_KEY_ROWS_PER_SM`]) runs them in the prefix launch as one-request items: no
/// decode launch (the plan's grid is 0), one launch and one merge.
///
/// In fixed-grid (CUDA-graph) mode the plan has the layout of [`with_cascade_capacity`]: the
/// prefix runs on [`decode_cascade_prefix_ctas`] CTAs per KV head, its chunk is the smallest
/// that fits them, and the shared groups whose blocks do not fit (those saving the fewest reads
/// last) are read by each member's decode items instead, with a warning. The decode items, the
/// merges and the decode partial slots must fit `max_ctas`, as for a plain fixed-grid plan.
#[allow(clippy::too_many_arguments)]
pub fn plan_decode_cascade(
    variant: &Variant,
    params: &ParamValues,
    batch: &ValidBatch<'_>,
    cascade: &Cascade,
    rows: usize,
    prefill_target: PlanTarget,
    decode_target: PlanTarget,
    mode: PlanMode,
) -> Result<DecodePlan> {
    use crate::abi::{DecodeWork, PrefillWork};
    let kv = batch.kv;
    let b = batch.batch_size();
    let per_item = cascade_tokens_per_item(variant, params, batch, rows, mode, None)?;
    if let Some(r) = (0..b).find(|&r| batch.q_len(r) > 1) {
        return Err(Error::InvalidBatch(crate::kv::LayoutError::Mismatch { what: "query tokens of a decode request (use prefill)", expected: 1, got: batch.q_len(r) }));
    }
    let det = matches!(mode, PlanMode::Deterministic { .. });
    let fixed = match mode {
        PlanMode::FixedGrid { max_ctas } => Some((max_ctas, decode_cascade_prefix_ctas(prefill_target, kv.kv_heads))),
        _ => None,
    };
    // Shared groups (their members with a query token), and each request's own key ranges.
    let mut shared: Vec<(&crate::cascade::Group, Vec<usize>)> = Vec::new();
    let mut own: Vec<Vec<(usize, usize)>> = vec![Vec::new(); b];
    for g in cascade.levels.iter().flat_map(|l| &l.groups).filter(|g| g.len > 0) {
        let members: Vec<usize> = g.requests.iter().copied().filter(|&r| batch.q_len(r) == 1).collect();
        match members.len() {
            0 => {}
            1 => own[members[0]].push((g.kv_start, g.kv_start + g.len)),
            _ => shared.push((g, members)),
        }
    }
    let blocks = |m: &[usize]| m.len().div_ceil(per_item);
    if let Some((_, wp)) = fixed {
        // The prefix CTAs hold one block per item. Groups are decided outer level first (by
        // position), those saving the most reads first within it; once a request's group is
        // demoted, every later group of that request is too, so its own keys stay one span (a
        // demoted outer level under admitted inner ones would split them in two and could
        // outgrow the grid).
        shared.sort_by_key(|(g, m)| (g.kv_start, std::cmp::Reverse((m.len() - 1) * g.len)));
        let mut taken = 0;
        let mut demoted = 0;
        let mut blocked = vec![false; b];
        shared.retain(|(g, m)| {
            let fits = taken + blocks(m) <= wp && !m.iter().any(|&r| blocked[r]);
            if !fits {
                m.iter().for_each(|&r| blocked[r] = true);
            }
            if fits {
                taken += blocks(m);
            } else {
                demoted += 1;
                for &r in m {
                    own[r].push((g.kv_start, g.kv_start + g.len));
                }
            }
            fits
        });
        if demoted > 0 {
            crate::diagnostics::warn(&format!("the fixed-grid decode cascade has {wp} prefill CTAs per KV head: {demoted} shared prefixes are read by each of their requests instead"));
        }
    }
    // One span per run of touching own ranges; narrowed to what the query sees (the kernel
    // narrows each item again).
    let heads = range_heads(variant, kv.kv_heads);
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    for (r, ranges) in own.iter_mut().enumerate() {
        ranges.sort_unstable();
        let (mut vlo, mut vhi) = (0, usize::MAX);
        if variant.kv_range.is_some() {
            let kv_len = batch.kv_len(r);
            (vlo, vhi) = (kv_len, 0);
            for h in 0..heads {
                let (l, hi) = visible_span(variant, params, r, 1, kv_len, h);
                if hi > l {
                    (vlo, vhi) = (vlo.min(l), vhi.max(hi));
                }
            }
        }
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &(s, e) in ranges.iter() {
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
        }
        spans.extend(runs.into_iter().map(|(s, e)| (r, s.max(vlo), e.min(vhi))).filter(|s| s.2 > s.1));
    }
    let mut in_shared = vec![false; b];
    for (_, m) in &shared {
        for &r in m {
            in_shared[r] = true;
        }
    }
    // Small suffixes of shared requests ride in the prefix launch as one-request items (their
    // tile's other rows padding) instead of taking a decode launch of their own (eager plans
    // only: a fixed grid keeps its layout, a deterministic plan must not depend on the batch).
    let span_keys = |spans: &[(usize, usize, usize)]| spans.iter().map(|s| s.2 - s.1).sum::<usize>();
    let fold = matches!(mode, PlanMode::Default)
        && !shared.is_empty()
        && !spans.is_empty()
        && spans.iter().all(|s| in_shared[s.0])
        && span_keys(&spans).saturating_mul(kv.kv_heads).saturating_mul(rows) <= FOLD_KEY_ROWS_PER_SM.saturating_mul(decode_target.ctas.max(1));
    let folded: Vec<(usize, usize, usize)> = if fold { std::mem::take(&mut spans) } else { Vec::new() };
    let (tile_p, tile_d) = (prefill_target.kv_tile.max(1), decode_target.kv_tile.max(1));
    let pieces = |len: usize, chunk: usize, tile: usize| len.div_ceil(split_piece(len, chunk, tile, det));
    let chunk_p = match mode {
        PlanMode::Deterministic { chunk } => chunk,
        _ => {
            let total: usize = shared.iter().map(|(g, m)| blocks(m) * g.len).sum::<usize>() + span_keys(&folded);
            match fixed {
                _ if total == 0 => usize::MAX,
                None => wave_chunk(total, kv.kv_heads, prefill_target),
                Some((_, wp)) => {
                    // The smallest wave chunk whose items fit the prefix CTAs (one piece per
                    // group always does: the groups were admitted so).
                    let taken: usize = shared.iter().map(|(_, m)| blocks(m)).sum();
                    let spare = PlanTarget { ctas: (wp - taken).max(1) * kv.kv_heads, ..prefill_target };
                    let mut chunk = wave_chunk(total, kv.kv_heads, spare);
                    while shared.iter().map(|(g, m)| blocks(m) * pieces(g.len, chunk, tile_p)).sum::<usize>() > wp {
                        chunk = chunk.saturating_mul(2);
                    }
                    chunk
                }
            }
        }
    };
    let suffix_total = span_keys(&spans);
    let mut chunk_d = match mode {
        PlanMode::Deterministic { chunk } => chunk,
        _ if spans.len() * kv.kv_heads >= decode_target.ctas || suffix_total == 0 => usize::MAX,
        _ => wave_chunk(suffix_total, kv.kv_heads, decode_target),
    };
    if let Some((max_ctas, _)) = fixed {
        // A split that does not fit the grid is not made (the spans alone must fit).
        if spans.iter().map(|s| pieces(s.2 - s.1, chunk_d, tile_d)).sum::<usize>() > max_ctas {
            chunk_d = usize::MAX;
        }
        if spans.len() > max_ctas {
            return Err(PlanError::FixedGridTooSmall { needed: spans.len(), max_ctas }.into());
        }
    }
    // What the prefix launch reads, as (first key, keys, readers): the shared groups, then the
    // folded suffixes (one reader each).
    let prefix_items: Vec<(usize, usize, &[usize])> = shared.iter().map(|(g, m)| (g.kv_start, g.len, m.as_slice())).chain(folded.iter().map(|s| (s.1, s.2 - s.1, std::slice::from_ref(&s.0)))).collect();
    let mut count = vec![0usize; b];
    for &(_, len, m) in &prefix_items {
        for &r in m {
            count[r] += pieces(len, chunk_p, tile_p);
        }
    }
    for s in &spans {
        count[s.0] += pieces(s.2 - s.1, chunk_d, tile_d);
    }
    // Slots, token-major; a request outside the shared groups with one piece writes directly.
    let direct = |r: usize| !in_shared[r] && count[r] == 1;
    let mut base = vec![0usize; b];
    let mut merge = Vec::new();
    let mut slots = 0usize;
    for r in (0..b).filter(|&r| batch.q_len(r) == 1) {
        if direct(r) {
            continue;
        }
        base[r] = slots;
        merge.push(MergeWork { req: r as i32, first: slots as i32, count: count[r] as i32, token: batch.qo_indptr[r] });
        slots += count[r];
    }
    if slots > i32::MAX as usize {
        return Err(PlanError::Invalid(format!("the cascade needs {slots} partial states, more than the 2^31 - 1 the kernels index")).into());
    }
    let mut used = vec![0usize; b];
    let mut work_p: Vec<(usize, PrefillWork)> = Vec::new();
    let mut table: Vec<[i32; 4]> = Vec::new();
    let mut used_chunk_p = 0;
    for &(start, len, m) in &prefix_items {
        let piece = split_piece(len, chunk_p, tile_p, det);
        let n = len.div_ceil(piece);
        if n > 1 {
            used_chunk_p = used_chunk_p.max(piece);
        }
        for c in 0..n {
            let (s, e) = (start + c * piece, (start + (c + 1) * piece).min(start + len));
            for block in m.chunks(per_item) {
                let at = table.len();
                table.extend(block.iter().map(|&r| [r as i32, batch.qo_indptr[r], (base[r] + used[r] + c) as i32, 0]));
                work_p.push(((e - s) * block.len(), PrefillWork { req: m[0] as i32, row_start: at as i32, kv_begin: s as i32, kv_end: e as i32, partial: -1, stride: -(block.len() as i32) }));
            }
        }
        for &r in m {
            used[r] += n;
        }
    }
    if table.len() > i32::MAX as usize {
        return Err(PlanError::Invalid(format!("the cascade's group table has {} entries, more than the kernels index", table.len())).into());
    }
    let mut work_d = Vec::with_capacity(spans.len());
    let mut used_chunk_d = 0;
    let mut decode_partials = 0;
    for &(r, lo, hi) in &spans {
        let piece = split_piece(hi - lo, chunk_d, tile_d, det);
        let n = (hi - lo).div_ceil(piece);
        if n > 1 {
            used_chunk_d = used_chunk_d.max(piece);
        }
        for c in 0..n {
            let s = lo + c * piece;
            let partial = if direct(r) { -1 } else { (base[r] + used[r] + c) as i32 };
            decode_partials += usize::from(partial >= 0);
            work_d.push(DecodeWork { req: r as i32, kv_begin: s as i32, kv_end: (s + piece).min(hi) as i32, partial });
        }
        used[r] += n;
    }
    work_p.sort_by_key(|(cost, _)| std::cmp::Reverse(*cost));
    work_d.sort_by_key(|w| std::cmp::Reverse(w.kv_end - w.kv_begin));
    let work_p: Vec<PrefillWork> = work_p.into_iter().map(|(_, w)| w).collect();
    let n_work = work_d.len();
    let Some((max_ctas, wp)) = fixed else {
        let workspace_bytes = DecodePlan::workspace_for(slots, batch.qo_heads, kv.head_dim_vo);
        let prefix = PrefillPlan {
            mode,
            merge: Vec::new(),
            merge_grid: 0,
            num_partials: slots,
            workspace_bytes,
            chunk: used_chunk_p,
            grid: work_p.len(),
            work: work_p,
            rows,
            batch_size: b,
            qo_heads: batch.qo_heads,
            batch_fingerprint: batch.fingerprint(),
            groups: table,
            group_slots: 0,
        };
        return Ok(DecodePlan {
            mode,
            work: work_d,
            merge_grid: merge.len(),
            merge,
            num_partials: slots,
            grid: n_work,
            stride: n_work,
            per_cta: 1,
            chunk: used_chunk_d,
            workspace_bytes,
            batch_size: b,
            qo_heads: batch.qo_heads,
            head_dim_vo: kv.head_dim_vo,
            kv_heads: kv.kv_heads,
            batch_fingerprint: batch.fingerprint(),
            prefix: Some(Box::new(prefix)),
            prefix_slots: 0,
        });
    };
    // Fixed grid: the layout of `with_cascade_capacity`, whatever this step shares.
    // (Decode work items, merges, decode partial states.)
    for needed in [n_work, merge.len(), decode_partials] {
        if needed > max_ctas {
            return Err(PlanError::FixedGridTooSmall { needed, max_ctas }.into());
        }
    }
    let capacity = max_ctas + wp * per_item;
    debug_assert!(work_p.len() <= wp && table.len() <= wp * per_item && slots <= capacity);
    let mut prefix = fixed_prefix(batch, rows, wp, per_item, capacity, kv.head_dim_vo);
    (prefix.work, prefix.groups, prefix.chunk) = (work_p, table, used_chunk_p);
    let per_head = decode_target.resident / kv.kv_heads.max(1);
    let grid = super::decode::fixed_launch(max_ctas, per_head);
    let stride = n_work.min(grid);
    // A list longer than the wave is dealt out as a plain fixed-grid plan's is.
    super::decode::deal_to_wave(&mut work_d, stride, decode_target.kv_tile.max(1), max_ctas);
    let per_cta = super::decode::items_per_cta(work_d.len(), stride);
    Ok(DecodePlan {
        mode,
        work: work_d,
        merge_grid: super::decode::fixed_merge_launch(max_ctas, decode_target, batch.qo_heads),
        merge,
        num_partials: slots,
        grid,
        stride,
        per_cta,
        chunk: used_chunk_d,
        workspace_bytes: DecodePlan::workspace_for(capacity, batch.qo_heads, kv.head_dim_vo),
        batch_size: b,
        qo_heads: batch.qo_heads,
        head_dim_vo: kv.head_dim_vo,
        kv_heads: kv.kv_heads,
        batch_fingerprint: batch.fingerprint(),
        prefix: Some(Box::new(prefix)),
        prefix_slots: wp * per_item,
    })
}

impl Plan for PrefillPlan {
    fn is_cascade(&self) -> bool {
        !self.groups.is_empty()
    }
    fn packed(&self) -> Vec<i32> {
        PrefillPlan::packed(self)
    }
    fn packed_len(&self) -> usize {
        PrefillPlan::packed_len(self)
    }
    fn merge_offset(&self) -> usize {
        PrefillPlan::merge_offset(self)
    }
    fn workspace_bytes(&self) -> usize {
        self.workspace_bytes
    }
    fn partial_slots(&self) -> usize {
        self.num_partials
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
