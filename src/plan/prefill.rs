//! Prefill / append plans: each request's query rows cut into blocks, each block's visible KV
//! span split into chunks when the blocks cannot fill the GPU.

use super::{check_mode, merge_offset, pack, packed_len, range_heads, split_piece, visible_span, wave_chunk, Plan, PlanMode, PlanTarget};
use super::decode::DecodePlan;
use crate::abi::MergeWork;
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
}

impl PrefillPlan {
    /// The buffer the kernels read (see `pack`; the prefill kernel ignores the header's stride).
    pub fn packed(&self) -> Vec<i32> {
        let words = self.work.iter().map(|w| [w.req, w.row_start, w.kv_begin, w.kv_end, w.partial, w.stride]);
        pack(words, self.work.len(), self.grid, self.grid, &self.merge, self.merge_grid)
    }

    /// Length of [`PrefillPlan::packed`] in i32 words.
    pub fn packed_len(&self) -> usize {
        packed_len(PREFILL_WORK_INTS, self.grid, self.merge_grid)
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
    })
}

impl Plan for PrefillPlan {
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
