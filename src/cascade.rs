//! Composable formats: a batch decomposed into *levels* over the same paged cache — a prefix
//! shared by several requests read once for all their queries, then each request's own suffix —
//! whose partial attention states merge by `(o, lse)` (associative and commutative).
//!
//! A [`Cascade`] decomposes an ordinary (single-level) [`Batch`], which stays the source of truth
//! for positions: a group's keys are the logical positions `kv_start..kv_start + len` of each of
//! its requests, so every hook sees the positions it would see without the cascade, and a sink
//! is added once, after the merge. [`detect`] finds shared leading pages in an ordinary batch
//! (what a radix / prefix cache produces) and builds the levels when [`Policy`] says it pays;
//! [`crate::reference::attention_cascade`] is the multi-level formulation's reference.
//!
//! On the GPU a cascade runs through [`crate::plan::plan_cascade`]: every group as tiles of many
//! query rows on the prefill kernel, one merge per token; or, for a decode batch, through
//! [`crate::plan::plan_decode_cascade`]: the shared groups on the prefill kernel, the suffixes
//! on the decode kernel, one merge. Not yet in CUDA-graph (fixed-grid) mode.

use crate::kv::{Batch, LayoutError, ValidBatch};

/// Keys shared by some requests at one level: the same pages, at the same logical positions of
/// each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The requests (indices into the batch) whose queries read these keys.
    pub requests: Vec<usize>,
    /// The logical position of the group's first key, a multiple of the page size.
    pub kv_start: usize,
    /// The pages, in order: page `j` holds positions `kv_start + j * page_size ..`.
    pub pages: Vec<i32>,
    /// Keys in the group (`(pages - 1) * page_size < len <= pages * page_size`, or 0 without
    /// pages).
    pub len: usize,
}

/// One level: groups, each request in at most one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Level {
    /// The level's groups.
    pub groups: Vec<Group>,
}

/// A batch as levels; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cascade {
    /// The levels, shared prefixes first, suffixes last (the order does not change the result
    /// beyond floating-point reassociation).
    pub levels: Vec<Level>,
}

fn err(level: usize, group: usize, message: String) -> LayoutError {
    LayoutError::Cascade { level, group, message }
}

impl Cascade {
    /// Checks that the levels decompose `batch` exactly: every group is a page-aligned run of
    /// each of its requests' pages (the batch's own page indices) within its keys; no request
    /// is in two groups of one level; and each request's groups, across levels, cover its keys
    /// `0..kv_len` once each, without gap or overlap. `batch` is validated first.
    pub fn validate(&self, batch: &Batch<'_>) -> Result<(), LayoutError> {
        batch.validated()?;
        let ps = batch.kv.page_size;
        let n = batch.batch_size();
        // Per request: (kv_start, len, level, group) of the groups it is in.
        let mut spans: Vec<Vec<(usize, usize, usize, usize)>> = vec![Vec::new(); n];
        for (li, level) in self.levels.iter().enumerate() {
            let mut seen = vec![usize::MAX; n];
            for (gi, g) in level.groups.iter().enumerate() {
                if g.requests.is_empty() {
                    return Err(err(li, gi, "a group without requests".into()));
                }
                if g.kv_start % ps != 0 {
                    return Err(err(li, gi, format!("kv_start {} is not a multiple of the page size {ps}", g.kv_start)));
                }
                let np = g.pages.len();
                let fits = if np == 0 { g.len == 0 } else { g.len > (np - 1) * ps && g.len <= np * ps };
                if !fits {
                    return Err(err(li, gi, format!("{} keys on {np} pages of {ps}", g.len)));
                }
                let first = g.kv_start / ps;
                let Some(end) = first.checked_add(np) else {
                    return Err(err(li, gi, format!("pages {first}..+{np} overflow")));
                };
                for &r in &g.requests {
                    if r >= n {
                        return Err(err(li, gi, format!("request {r} is outside the batch of {n}")));
                    }
                    if seen[r] != usize::MAX {
                        return Err(err(li, gi, format!("request {r} is also in group {} of this level", seen[r])));
                    }
                    seen[r] = gi;
                    let kv_len = batch.kv_len(r);
                    if g.len > kv_len || g.kv_start > kv_len - g.len {
                        return Err(err(li, gi, format!("keys {}..+{} are past request {r}'s {kv_len}", g.kv_start, g.len)));
                    }
                    let own = batch.pages.pages(r);
                    if own.get(first..end) != Some(&g.pages[..]) {
                        return Err(err(li, gi, format!("its pages are not request {r}'s pages {first}..{end}")));
                    }
                    spans[r].push((g.kv_start, g.len, li, gi));
                }
            }
        }
        for (r, s) in spans.iter_mut().enumerate() {
            s.sort_unstable();
            let mut at = 0;
            for &(start, len, li, gi) in s.iter() {
                if start != at {
                    let what = if start > at { "leaves a gap" } else { "overlaps" };
                    return Err(err(li, gi, format!("request {r}: keys {start}..{} {what} after {at}", start + len)));
                }
                at += len;
            }
            if at != batch.kv_len(r) {
                return Err(LayoutError::Cascade { level: self.levels.len(), group: 0, message: format!("request {r}: the levels cover {at} of its {} keys", batch.kv_len(r)) });
            }
        }
        Ok(())
    }

    /// The single level of `batch` itself: one group per request holding all its keys.
    pub fn single(batch: &Batch<'_>) -> Cascade {
        let groups = (0..batch.batch_size())
            .filter(|&r| batch.kv_len(r) > 0)
            .map(|r| Group { requests: vec![r], kv_start: 0, pages: batch.pages.pages(r).to_vec(), len: batch.kv_len(r) })
            .collect();
        Cascade { levels: vec![Level { groups }] }
    }

    /// Keys read, summed over groups (what a cascade saves against [`Cascade::single`]).
    pub fn keys_read(&self) -> usize {
        self.levels.iter().flat_map(|l| &l.groups).map(|g| g.len).sum()
    }
}

/// When [`detect`] builds a cascade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Off: never.
    pub enabled: bool,
    /// Most levels, the suffix level included (deeper shared prefixes join the suffixes).
    pub max_levels: usize,
    /// Bytes of K/V a cascade must save, beyond the partial states it writes and reads back (a
    /// state per query token and level), for its extra launch and merge to pay. A model, not a
    /// measurement: 16 MiB is about 4 µs of the H200's read bandwidth, a launch and a merge pass.
    pub min_saved_bytes: usize,
    /// Bytes of K and V per page (page_size × kv_heads × (head_dim_qk + head_dim_vo) × element
    /// size); 0: computed from the batch with 2-byte elements.
    pub page_bytes: usize,
    /// Whether the partial states count against the bytes saved (off: any sharing of at least
    /// `min_saved_bytes` pays, as tests that want a cascade on tiny batches ask).
    pub weigh_states: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { enabled: true, max_levels: 3, min_saved_bytes: 16 << 20, page_bytes: 0, weigh_states: true }
    }
}

/// Finds the prefixes that requests of `batch` share — the same leading page indices, whole
/// pages only (a request's partial last page is its own) — and returns the cascade that reads
/// each shared run once, when `policy` says the saved reads pay; `None` otherwise (and for a
/// batch with no shared first page, after a check of O(batch)). Requests without query tokens
/// read nothing and share nothing. It takes a validated batch (a serving step validates its
/// batch once, for the plan as well).
///
/// Along a request's leading full pages, the requests that share them so far only shrink, so
/// its shared part splits into runs of constant membership (a trie's chains): run `k` of a
/// request is its group at level `k`, and what follows its last shared run is its suffix, the
/// last level. O(total pages), by splitting sets of requests that agree.
pub fn detect(batch: &ValidBatch<'_>, policy: &Policy) -> Option<Cascade> {
    if !policy.enabled || policy.max_levels < 2 {
        return None;
    }
    let ps = batch.kv.page_size.max(1);
    let n = batch.batch_size();
    // A request's leading full pages; none for a request without queries (it reads nothing).
    let full = |r: usize| if batch.q_len(r) == 0 { &[][..] } else { &batch.pages.pages(r)[..batch.kv_len(r) / ps] };
    // Fast path: no two requests share their first full page (sorting beats hashing here:
    // criterion, B = 256, 5.6 µs with a HashMap).
    let mut first: Vec<i32> = (0..n).filter_map(|r| full(r).first().copied()).collect();
    first.sort_unstable();
    if !first.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    // The runs, found by splitting sets of requests that agree so far: a set's run is the
    // common prefix of its members' remaining full pages; at its end the set splits by the next
    // page, and parts of two or more are sets of the next level (what a trie gives, without
    // building one: on B = 256 all sharing 32K, hashing every page took 17 ms).
    let mut runs: Vec<(usize, Vec<usize>, usize, usize)> = Vec::new(); // (level, members, first page, pages)
    let mut shared = vec![0usize; n]; // full pages of each request read by its shared runs
    let mut stack: Vec<(Vec<usize>, usize, usize)> = vec![((0..n).filter(|&r| !full(r).is_empty()).collect(), 0, 0)];
    while let Some((members, depth, level)) = stack.pop() {
        let len = common_run(&members.iter().map(|&r| &full(r)[depth..]).collect::<Vec<_>>());
        let next_level = if len > 0 {
            runs.push((level, members.clone(), depth, len));
            for &r in &members {
                shared[r] = depth + len;
            }
            level + 1
        } else {
            level
        };
        // Deeper runs than the levels allow join the suffixes.
        if next_level >= policy.max_levels - 1 {
            continue;
        }
        let at = depth + len;
        let mut rest: Vec<(i32, usize)> = members.iter().filter_map(|&r| full(r).get(at).map(|&p| (p, r))).collect();
        rest.sort_unstable();
        for part in rest.chunk_by(|a, b| a.0 == b.0) {
            if part.len() >= 2 {
                stack.push((part.iter().map(|&(_, r)| r).collect(), at, next_level));
            }
        }
    }
    let page_bytes = if policy.page_bytes > 0 { policy.page_bytes } else { ps * batch.kv.kv_heads * (batch.kv.head_dim_qk + batch.kv.head_dim_vo) * 2 };
    let depth = runs.iter().map(|r| r.0 + 1).max().unwrap_or(0);
    let mut levels: Vec<Level> = vec![Level::default(); depth];
    runs.sort_by_key(|r| (r.0, r.1[0]));
    let mut saved_pages = 0usize;
    for (level, members, first_page, pages) in runs {
        saved_pages += (members.len() - 1) * pages;
        let run = full(members[0])[first_page..first_page + pages].to_vec();
        levels[level].groups.push(Group { requests: members, kv_start: first_page * ps, pages: run, len: pages * ps });
    }
    // What the cascade adds: a partial state per token and group (f32 o and lse per query head),
    // written and read back once — at appends of thousands of tokens, more than the reads saved.
    let state_bytes = if policy.weigh_states { batch.qo_heads * (batch.kv.head_dim_vo + 1) * 4 * 2 } else { 0 };
    let slots: usize = (0..n).map(|r| batch.q_len(r)).sum::<usize>() + levels.iter().flat_map(|l| &l.groups).map(|g| g.requests.iter().map(|&r| batch.q_len(r)).sum::<usize>()).sum::<usize>();
    if saved_pages.saturating_mul(page_bytes) < policy.min_saved_bytes.saturating_add(slots.saturating_mul(state_bytes)) {
        return None;
    }
    let suffixes = (0..n)
        .filter_map(|r| {
            let (kv_start, len) = (shared[r] * ps, batch.kv_len(r));
            (len > kv_start).then(|| Group { requests: vec![r], kv_start, pages: batch.pages.pages(r)[shared[r]..].to_vec(), len: len - kv_start })
        })
        .collect();
    levels.push(Level { groups: suffixes });
    Some(Cascade { levels })
}

/// The length of the common prefix of all `rows`, column by column (512, then 64 at a time
/// while whole windows agree), so a node costs its members × its run (plus a window):
/// detection stays O(total pages) however the runs nest (comparing against the first member's whole tail re-scanned long pairs).
fn common_run(rows: &[&[i32]]) -> usize {
    let n = rows.iter().map(|r| r.len()).min().unwrap_or(0);
    let lead = rows[0];
    let mut i = 0;
    // Windows of 512, then 64, then single columns: a node costs its members × (run + 512) at
    // most, and long shared runs compare in long memcmps (criterion, B = 256 sharing 2048 pages:
    // 166 µs with 64-column windows only, 127 µs with these).
    for w in [512, 64] {
        while i + w <= n && rows[1..].iter().all(|r| r[i..i + w] == lead[i..i + w]) {
            i += w;
        }
    }
    while i < n && rows[1..].iter().all(|r| r[i] == lead[i]) {
        i += 1;
    }
    i
}
