//! Decode plan invariants: every visible position is covered exactly once, splits merge into
//! the right rows, modes behave as documented, and bad batches are errors.

use std::collections::HashMap;

use attnforge::kv::{KvLayout, KvShape, PageTable};
use attnforge::plan::{plan_decode, visible_span, DecodePlan, PlanMode, PlanTarget};
use attnforge::spec::params::{Dims, ParamInput};
use attnforge::spec::shipped;
use proptest::prelude::*;

fn kv(num_pages: usize) -> KvShape {
    KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 }
}

fn plan(variant: &str, params: &[(&str, f64)], lens: &[usize], target: usize, mode: PlanMode) -> attnforge::Result<(DecodePlan, PageTable, Vec<i32>)> {
    plan_resident(variant, params, lens, target, 0, mode)
}

fn plan_resident(variant: &str, params: &[(&str, f64)], lens: &[usize], target: usize, resident: usize, mode: PlanMode) -> attnforge::Result<(DecodePlan, PageTable, Vec<i32>)> {
    let v = shipped::resolve(variant).unwrap();
    let pages = PageTable::from_lens(lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
    let qo: Vec<i32> = (0..=lens.len() as i32).collect();
    let given: HashMap<String, ParamInput> = params.iter().map(|(k, x)| (k.to_string(), ParamInput::Scalar(*x))).collect();
    let p = v.bind(&given, Dims { qo_heads: 32, kv_heads: 8, batch: lens.len() }).unwrap();
    let n = pages.indices.len();
    let batch = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(n), qo_heads: 32 };
    let plan = plan_decode(&v, &p, &batch.validated()?, PlanTarget { ctas: target, kv_tile: 32, resident, always_balance: false }, mode)?;
    Ok((plan, pages, qo))
}

/// The merge list the kernels read at `merge_offset` bytes into the packed plan is the plan's.
fn check_merge_offset(packed: &[i32], merge_offset: usize, merge: &[attnforge::abi::MergeWork]) {
    assert_eq!(merge_offset % 4, 0);
    assert_eq!(packed[1] as usize, merge.len());
    let at = merge_offset / 4;
    for (i, m) in merge.iter().enumerate() {
        assert_eq!(packed[at + 4 * i..at + 4 * i + 4], [m.req, m.first, m.count, m.token], "merge item {i}");
    }
}

/// Each request's visible span is covered exactly once, and split requests merge their slots.
fn check_cover(plan: &DecodePlan, spans: &[(usize, usize)]) {
    let mut covered: Vec<Vec<(i32, i32)>> = vec![Vec::new(); spans.len()];
    for w in plan.work.iter().filter(|w| w.req >= 0) {
        covered[w.req as usize].push((w.kv_begin, w.kv_end));
    }
    // Only a balanced plan or a fixed grid dealing out a longer list pads (with req -1) and runs
    // several items per CTA; the kernel walks items x, x + stride, … of CTA x < stride, as the
    // header says.
    assert!(plan.per_cta > 1 || plan.work.iter().all(|w| w.req >= 0));
    assert!(plan.work.len() <= plan.stride * plan.per_cta && plan.stride <= plan.grid);
    assert_eq!(plan.packed()[..4], [plan.work.len() as i32, plan.merge.len() as i32, plan.stride as i32, 0]);
    for (req, c) in covered.iter_mut().enumerate() {
        c.sort();
        let (lo, hi) = spans[req];
        assert!(!c.is_empty(), "request {req} has no work item");
        assert_eq!(c[0].0 as usize, lo, "request {req}");
        assert_eq!(c.last().unwrap().1 as usize, hi, "request {req}");
        for w in c.windows(2) {
            assert_eq!(w[0].1, w[1].0, "request {req}: gap or overlap");
        }
    }
    let mut slots = vec![false; plan.num_partials];
    for w in plan.work.iter().filter(|w| w.partial >= 0) {
        assert!(!std::mem::replace(&mut slots[w.partial as usize], true), "slot {} used twice", w.partial);
        let m = plan.merge.iter().find(|m| m.req == w.req).expect("a split request has a merge entry");
        assert!((m.first..m.first + m.count).contains(&w.partial));
    }
    assert!(slots.iter().all(|s| *s));
    check_merge_offset(&plan.packed(), plan.merge_offset(), &plan.merge);
    if plan.per_cta == 1 {
        assert!(plan.work.windows(2).all(|w| w[0].kv_end - w[0].kv_begin >= w[1].kv_end - w[1].kv_begin), "longest first");
    }
    let slots = match plan.mode {
        PlanMode::FixedGrid { max_ctas } => max_ctas,
        _ => plan.num_partials,
    };
    assert_eq!(plan.workspace_bytes, DecodePlan::workspace_for(slots, 32, 128));
}

/// The property of dealing a list longest first to the least loaded CTA (each item costing its
/// keys plus one tile): the CTA with the most work took its last (smallest) item when it had the
/// least, so without that item it has no more than the least loaded CTA has now. The walk by
/// stride over a sorted list breaks it whenever a CTA runs one item more than another.
fn check_lpt(plan: &DecodePlan, tile: usize) {
    let cost = |w: &attnforge::abi::DecodeWork| (w.kv_end - w.kv_begin) as usize + tile;
    let mut loads = vec![0usize; plan.stride];
    let mut smallest = vec![usize::MAX; plan.stride];
    for (i, w) in plan.work.iter().enumerate().filter(|(_, w)| w.req >= 0) {
        loads[i % plan.stride] += cost(w);
        smallest[i % plan.stride] = smallest[i % plan.stride].min(cost(w));
    }
    let (most, &max) = loads.iter().enumerate().max_by_key(|&(_, l)| *l).unwrap();
    let min = *loads.iter().min().unwrap();
    assert!(max - smallest[most] <= min, "CTA {most}: {max} - {} > {min}: {loads:?}", smallest[most]);
}

/// Positions each CTA of a balanced plan reads.
fn cta_loads(plan: &DecodePlan) -> Vec<usize> {
    let mut load = vec![0usize; plan.stride];
    for (i, w) in plan.work.iter().enumerate() {
        load[i % plan.stride] += (w.kv_end - w.kv_begin) as usize;
    }
    load
}

proptest! {
    #[test]
    fn fixed_grids_deal_a_longer_list_out_evenly(lens in prop::collection::vec(0usize..1000, 66..200)) {
        // Where no length is past a share of 33 CTAs (no balancing): one item per request on
        // 33 CTAs.
        let cap = 2 * lens.len() + 40;
        let (f, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::FixedGrid { max_ctas: cap }).unwrap();
        let spans: Vec<(usize, usize)> = lens.iter().map(|&l| (0, l)).collect();
        check_cover(&f, &spans);
        prop_assert!(f.work.len() <= cap && f.stride <= 33);
        let total: usize = lens.iter().sum();
        let skewed = lens.iter().any(|&l| l > total.div_ceil(33));
        if !skewed && f.per_cta > 1 {
            prop_assert!(f.merge.is_empty());
            check_lpt(&f, 32);
        }
    }

    #[test]
    fn balanced_plans_cover_once_and_even_out_the_ctas(lens in prop::collection::vec(0usize..20000, 1..300), resident in 8usize..600) {
        let (p, _, _) = plan_resident("default", &[], &lens, 132, resident, PlanMode::Default).unwrap();
        let spans: Vec<(usize, usize)> = lens.iter().map(|&l| (0, l)).collect();
        check_cover(&p, &spans);
        let per_head = resident / 8;
        let share = lens.iter().sum::<usize>().div_ceil(per_head.max(1));
        if lens.len() > per_head && lens.iter().any(|&l| l > share) {
            prop_assert_eq!((p.grid, p.stride), (per_head, per_head));
            // Every CTA's share is within a tile (snapping) per cut of the even share.
            let share = lens.iter().sum::<usize>().div_ceil(p.stride);
            for l in cta_loads(&p) {
                prop_assert!(l <= share + 32, "{} > {} + 32", l, share);
            }
        } else {
            prop_assert_eq!(p.per_cta, 1);
        }
    }

    #[test]
    fn every_visible_position_is_covered_once(lens in prop::collection::vec(0usize..20000, 1..40), target in 1usize..2000, det in prop::option::of(1usize..3000)) {
        let mode = det.map_or(PlanMode::Default, |chunk| PlanMode::Deterministic { chunk });
        let (p, _, _) = plan("causal", &[], &lens, target, mode).unwrap();
        let spans: Vec<(usize, usize)> = lens.iter().map(|&l| (0, l)).collect();
        check_cover(&p, &spans);
        if let PlanMode::Deterministic { chunk } = mode {
            for w in &p.work {
                prop_assert_eq!(w.kv_begin as usize % chunk, 0);
            }
        }
    }
}

#[test]
fn a_window_plans_only_the_visible_span() {
    let v = shipped::resolve("gemma2").unwrap();
    let p = v.bind(&[("window".to_string(), ParamInput::Scalar(1024.0))].into(), Dims { qo_heads: 32, kv_heads: 8, batch: 64 }).unwrap();
    assert_eq!(visible_span(&v, &p, 0, 1, 4096, 0), (3072, 4096));
    assert_eq!(visible_span(&v, &p, 0, 1, 100, 0), (0, 100));
    assert_eq!(visible_span(&v, &p, 0, 1, 0, 0), (0, 0));
    // A batch that cannot fill the GPU is split by its visible spans only.
    let (split, _, _) = plan("gemma2", &[("window", 1024.0)], &[4096; 64], 1056, PlanMode::Default).unwrap();
    let read: i32 = split.work.iter().map(|w| w.kv_end - w.kv_begin).sum();
    assert_eq!(read, 64 * 1024, "a window of 1024 over 4096 reads a quarter of the KV");
    // One that fills it is not split; each CTA narrows its own span on the GPU.
    let (whole, _, _) = plan("gemma2", &[("window", 1024.0)], &[4096; 64], 64, PlanMode::Default).unwrap();
    assert_eq!((whole.work.len(), whole.merge.len()), (64, 0));
    // Deterministic mode always uses the visible span, so chunk offsets never depend on the batch.
    let (det, _, _) = plan("gemma2", &[("window", 1024.0)], &[4096; 2], 64, PlanMode::Deterministic { chunk: 512 }).unwrap();
    assert!(det.work.iter().all(|w| w.kv_begin >= 3072 && (w.kv_begin - 3072) % 512 == 0));
}

#[test]
fn small_batches_split_into_one_even_wave() {
    // 64 requests × 8 heads = 512 CTAs for 1056 slots: each request splits in two, 1024 CTAs.
    let (p, _, _) = plan("default", &[], &[4096; 64], 1056, PlanMode::Default).unwrap();
    assert_eq!(p.work.len(), 128);
    assert!(p.work.iter().all(|w| w.kv_end - w.kv_begin == 2048));
    assert_eq!(p.merge.len(), 64);
    // Enough requests to fill the GPU: no split.
    let (p, _, _) = plan("default", &[], &[4096; 256], 1056, PlanMode::Default).unwrap();
    assert_eq!((p.work.len(), p.merge.len(), p.num_partials), (256, 0, 0));
}

#[test]
fn big_batches_balance_into_one_wave() {
    // One 32K request among 127 of 1K, 8 heads, 264 resident CTAs: 33 CTAs per head, each given
    // ceil(162816 / 33) = 4934 positions. The long request is cut at the share boundaries
    // (snapped to the 32-position tile) into 7 pieces on CTAs 0–6; 1K requests straddling a
    // boundary are cut in two.
    let mut lens = vec![1024; 128];
    lens[0] = 32768;
    let (p, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::Default).unwrap();
    assert_eq!((p.grid, p.stride), (33, 33));
    let loads = cta_loads(&p);
    assert!(loads.iter().all(|&l| l <= 4934 + 32), "{loads:?}");
    assert_eq!(loads.iter().sum::<usize>(), 162816);
    let long = p.merge.iter().find(|m| m.req == 0).unwrap();
    assert_eq!(long.count, 7);
    let cuts: Vec<i32> = (0..7).map(|k| p.work[k].kv_end).collect(); // CTA k's first item
    assert_eq!(cuts[..6], [4928, 9856, 14816, 19744, 24672, 29600]);
    assert!(p.merge.iter().filter(|m| m.req != 0).all(|m| m.count == 2));
    assert_eq!(p.workspace_bytes, DecodePlan::workspace_for(p.num_partials, 32, 128));
    let spans: Vec<(usize, usize)> = lens.iter().map(|&l| (0, l)).collect();
    check_cover(&p, &spans);
    // Similar lengths keep one item per CTA: the GPU schedules those as well, without merges.
    let (u, _, _) = plan_resident("default", &[], &[2048; 128], 132, 264, PlanMode::Default).unwrap();
    assert_eq!((u.per_cta, u.grid, u.merge.len()), (1, 128, 0));
    // A fixed grid runs the same balanced list on its 33 CTAs (one resident wave, not the
    // capacity), the lists padded to its capacity; the merge grid is 8 CTAs an SM over 32 heads.
    let cap = p.work.len().max(p.num_partials) + 10;
    let (f, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::FixedGrid { max_ctas: cap }).unwrap();
    assert_eq!((f.grid, f.stride, f.per_cta, f.merge_grid), (33, 33, p.per_cta, 33));
    assert_eq!(f.work, p.work);
    assert_eq!(f.packed().len(), f.packed_len());
    assert_eq!(f.workspace_bytes, DecodePlan::workspace_for(cap, 32, 128));
    // The cut requests' pieces outnumber the 33 launched CTAs: the workspace's layout (where the
    // LSEs start) is the capacity's, which its size is (it was the grid's, and those partials'
    // outputs overwrote LSEs).
    assert!(f.num_partials > f.grid, "{} partials over {} CTAs", f.num_partials, f.grid);
    {
        use attnforge::plan::Plan;
        assert_eq!(f.partial_slots(), cap);
    }
    check_merge_offset(&f.packed(), f.merge_offset(), &f.merge);
    // A fixed grid the balanced list does not fit runs the batch unbalanced, one item per
    // request, dealt to its 33 CTAs longest first to the least loaded: the 32K request alone on
    // one CTA, the 127 others 3 or 4 to each of the other 32 (columns padded to 4 × 33), when
    // that fits; smaller still is an error.
    let (n, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::FixedGrid { max_ctas: p.work.len() - 1 }).unwrap();
    assert_eq!((n.per_cta, n.stride, n.merge.len(), n.work.len()), (4, 33, 0, 132));
    let real: Vec<_> = n.work.iter().filter(|w| w.req >= 0).collect();
    assert_eq!(real.len(), lens.len());
    assert!(real.iter().all(|w| w.kv_begin == 0 && w.kv_end as usize == lens[w.req as usize]));
    let long_cta = n.work.iter().position(|w| w.req == 0).unwrap() % 33;
    assert_eq!(n.work.iter().enumerate().filter(|(i, w)| i % 33 == long_cta && w.req >= 0).count(), 1, "the 32K request runs alone");
    check_cover(&n, &spans);
    let err = plan_resident("default", &[], &lens, 132, 264, PlanMode::FixedGrid { max_ctas: lens.len() - 1 }).unwrap_err();
    assert!(err.to_string().contains("but the fixed grid holds"), "{err}");
    // Deterministic plans keep one item per CTA.
    let (d, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::Deterministic { chunk: 1024 }).unwrap();
    assert_eq!((d.per_cta, d.grid), (1, 159));
    // kv_range variants balance by their visible spans: causal sees the whole cache, so the
    // skewed batch balances as above; a 1024 window makes every span 1024 long, so it does not.
    let (c, _, _) = plan_resident("causal", &[], &lens, 132, 264, PlanMode::Default).unwrap();
    assert_eq!(c.work, p.work);
    let (w, _, _) = plan_resident("gemma2", &[("window", 1024.0)], &lens, 132, 264, PlanMode::Default).unwrap();
    assert_eq!((w.per_cta, w.grid, w.merge.len()), (1, 128, 0));
    let (w, _, _) = plan_resident("gemma2", &[("window", 1024.0)], &[4096; 64], 64, 264, PlanMode::Default).unwrap();
    assert_eq!((w.per_cta, w.grid), (1, 64));
}

#[test]
fn a_fixed_grid_launches_one_resident_wave_that_walks_a_longer_list() {
    // 128 similar requests, 33 resident CTAs per head: unbalanced, one item per request, walked
    // by 33 CTAs (CTA x runs items x, x + 33, …), dealt longest first to the least loaded CTA
    // and padded to whole columns; the capacity only pads the lists.
    let lens: Vec<usize> = (0..128).map(|i| 1000 + 8 * i).collect();
    let (f, _, _) = plan_resident("default", &[], &lens, 132, 264, PlanMode::FixedGrid { max_ctas: 500 }).unwrap();
    assert_eq!((f.grid, f.stride, f.merge.len()), (33, 33, 0));
    assert_eq!(f.work.len(), f.per_cta * 33);
    assert_eq!(f.work.iter().filter(|w| w.req >= 0).count(), 128);
    assert_eq!(f.packed()[..4], [f.work.len() as i32, 0, 33, 0]);
    assert_eq!(f.packed().len(), f.packed_len());
    // Each column runs its items longest first.
    for c in 0..33 {
        let col: Vec<i32> = f.work.iter().skip(c).step_by(33).filter(|w| w.req >= 0).map(|w| w.kv_end - w.kv_begin).collect();
        assert!(col.windows(2).all(|w| w[0] >= w[1]), "column {c}: {col:?}");
    }
    // Dealt longest first to the least loaded (the walk by stride over the sorted list gave CTA
    // 0 a fourth item, 2016 + 1752 + 1488 + 1224 keys, against 4488 for CTA 32).
    check_lpt(&f, 32);
    let spans: Vec<(usize, usize)> = lens.iter().map(|&l| (0, l)).collect();
    check_cover(&f, &spans);
    // A batch that needs fewer CTAs than the wave uses only those.
    let (s, _, _) = plan_resident("default", &[], &[4096; 4], 132, 264, PlanMode::FixedGrid { max_ctas: 500 }).unwrap();
    assert_eq!(s.grid, 33);
    assert_eq!(s.stride, s.work.len());
    assert!(s.stride <= 33 && s.merge_grid == 33);
    check_merge_offset(&s.packed(), s.merge_offset(), &s.merge);
}

#[test]
fn fixed_grid_pads_to_its_capacity_and_refuses_to_overflow() {
    // No residency known: the launch is the capacity; the merge grid is 8 CTAs an SM over 32 heads.
    let (p, _, _) = plan("default", &[], &[300, 0, 5000], 64, PlanMode::FixedGrid { max_ctas: 100 }).unwrap();
    assert_eq!((p.grid, p.merge_grid), (100, 16));
    assert_eq!(p.packed().len(), p.packed_len());
    assert_eq!(p.packed()[0] as usize, p.work.len());
    assert_eq!(p.workspace_bytes, DecodePlan::workspace_for(100, 32, 128), "sized for the capacity");
    let err = plan("default", &[], &[5000; 8], 64, PlanMode::FixedGrid { max_ctas: 4 }).unwrap_err();
    assert!(err.to_string().contains("fixed grid holds 4"), "{err}");
}

#[test]
fn empty_requests_still_get_an_output_row_and_bad_batches_are_errors() {
    let (p, _, _) = plan("default", &[], &[0, 10, 0], 1000, PlanMode::Default).unwrap();
    assert_eq!(p.work.iter().filter(|w| w.kv_begin == w.kv_end).count(), 2);
    let err = plan("default", &[], &[10], 1000, PlanMode::Deterministic { chunk: 0 }).unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
    let v = shipped::resolve("default").unwrap();
    let pages = PageTable::from_lens(&[10, 10], 16, &mut (0..).map(|i| i as usize)).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: 2 }).unwrap();
    let qo = [0, 2, 3];
    let b = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(2), qo_heads: 32 };
    let err = plan_decode(&v, &p, &b.validated().unwrap(), PlanTarget { ctas: 100, kv_tile: 32, resident: 0, always_balance: false }, PlanMode::Default).unwrap_err();
    assert!(err.to_string().contains("use prefill"), "{err}");
    let bad = PageTable { indices: vec![0, 7], ..pages.clone() };
    let b = attnforge::kv::Batch { qo_indptr: &[0, 1, 2], pages: &bad, kv: kv(2), qo_heads: 32 };
    // A malformed table is refused before planning: planners take only validated batches.
    assert!(b.validated().is_err());
}

#[test]
fn prefill_blocks_cover_every_query_row_once_longest_first() {
    use attnforge::plan::plan_prefill;
    let v = shipped::resolve("causal").unwrap();
    let lens = [(100usize, 100usize), (0, 50), (7, 3000), (2000, 2000)];
    let kv_lens: Vec<usize> = lens.iter().map(|l| l.1).collect();
    let pages = PageTable::from_lens(&kv_lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
    let mut qo = vec![0i32];
    for l in &lens {
        qo.push(qo.last().unwrap() + l.0 as i32);
    }
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: 4 }).unwrap();
    let b = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(pages.indices.len()), qo_heads: 32 };
    // A target the blocks already fill: no split.
    let plan = plan_prefill(&v, &p, &b.validated().unwrap(), 64, PlanTarget { ctas: 100, kv_tile: 64, resident: 0, always_balance: false }, PlanMode::Default).unwrap();
    assert!(plan.merge.is_empty() && plan.work.iter().all(|w| w.partial == -1));
    for (req, &(q, _)) in lens.iter().enumerate() {
        let mut starts: Vec<i32> = plan.work.iter().filter(|w| w.req == req as i32).map(|w| w.row_start).collect();
        starts.sort();
        let want: Vec<i32> = (0..(q * 4) as i32).step_by(64).collect();
        assert_eq!(starts, want, "request {req}");
    }
    // The 7-token append over 3000 keys is the biggest block, then the 2000-token prompt's last.
    assert_eq!((plan.work[0].req, plan.work[0].row_start), (2, 0));
    assert_eq!((plan.work[1].req, plan.work[1].row_start), (3, 7936));
    assert_eq!(plan.packed().len(), 4 + 6 * plan.work.len());
}

/// A prefill batch of `(q_len, kv_len)` requests with 32/8 heads (GQA 4).
fn prefill_plan(variant: &str, params: &[(&str, f64)], lens: &[(usize, usize)], rows: usize, ctas: usize, mode: PlanMode) -> attnforge::Result<(attnforge::plan::PrefillPlan, Vec<i32>)> {
    let v = shipped::resolve(variant).unwrap();
    let kv_lens: Vec<usize> = lens.iter().map(|l| l.1).collect();
    let pages = PageTable::from_lens(&kv_lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
    let mut qo = vec![0i32];
    for l in lens {
        qo.push(qo.last().unwrap() + l.0 as i32);
    }
    let given: HashMap<String, ParamInput> = params.iter().map(|(k, x)| (k.to_string(), ParamInput::Scalar(*x))).collect();
    let p = v.bind(&given, Dims { qo_heads: 32, kv_heads: 8, batch: lens.len() }).unwrap();
    let b = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(pages.indices.len().max(1)), qo_heads: 32 };
    let plan = attnforge::plan::plan_prefill(&v, &p, &b.validated()?, rows, PlanTarget { ctas, kv_tile: 32, resident: 0, always_balance: false }, mode)?;
    Ok((plan, qo))
}

/// Split blocks: every (token, visible position) is in exactly one chunk of its block, each
/// token of a split block has one merge item over contiguous, unique slots.
fn check_prefill_split(plan: &attnforge::plan::PrefillPlan, lens: &[(usize, usize)], qo: &[i32], group: usize, visible: impl Fn(usize, usize) -> (usize, usize)) {
    let mut slots_seen = vec![0u32; plan.num_partials];
    for (req, &(q, kv_len)) in lens.iter().enumerate() {
        for token in 0..q {
            let row = token * group;
            let items: Vec<_> = plan.work.iter().filter(|w| w.req == req as i32 && (w.row_start as usize..w.row_start as usize + plan.rows).contains(&row)).collect();
            let (lo, hi) = visible(token, kv_len);
            if items.len() == 1 && items[0].partial < 0 {
                assert!(items[0].kv_begin <= lo as i32 && items[0].kv_end >= hi as i32);
                continue;
            }
            // Chunks are disjoint and cover the token's visible span.
            for pos in lo..hi {
                let n = items.iter().filter(|w| (w.kv_begin as usize..w.kv_end as usize).contains(&pos)).count();
                assert_eq!(n, 1, "request {req} token {token} position {pos}");
            }
            let m: Vec<_> = plan.merge.iter().filter(|m| m.token == qo[req] + token as i32).collect();
            assert_eq!(m.len(), 1, "request {req} token {token}: one merge item");
            assert_eq!(m[0].count as usize, items.len());
            for w in &items {
                let slot = w.partial as usize + (token - w.row_start as usize / group) * w.stride as usize;
                assert!((m[0].first as usize..(m[0].first + m[0].count) as usize).contains(&slot));
                slots_seen[slot] += 1;
            }
        }
    }
    assert!(slots_seen.iter().all(|&n| n == 1), "every partial slot is written exactly once");
    assert_eq!(plan.workspace_bytes, plan.num_partials * 32 * 129 * 4);
    assert_eq!(plan.packed().len(), 4 + 6 * plan.grid + 4 * plan.merge_grid);
    check_merge_offset(&plan.packed(), plan.merge_offset(), &plan.merge);
}

#[test]
fn prefill_splits_long_kv_when_the_blocks_cannot_fill_the_gpu() {
    // Draft tokens against long caches: 3 blocks × 8 KV heads = 24 CTAs for a 264-CTA GPU.
    let lens = [(8usize, 20000usize), (5, 9000), (8, 100)];
    let (plan, qo) = prefill_plan("causal", &[], &lens, 32, 264, PlanMode::Default).unwrap();
    assert!(plan.merge.len() >= 8 && plan.chunk > 0 && plan.chunk % 32 == 0, "{:?}", (plan.merge.len(), plan.chunk));
    check_prefill_split(&plan, &lens, &qo, 4, |t, kv| (0, kv - 8.min(kv) + t + 1));
    // Sliding window: chunks cover only the window, not the whole cache.
    let (plan, qo) = prefill_plan("sliding_window", &[("window", 3000.0)], &lens, 32, 264, PlanMode::Default).unwrap();
    let q = |req: usize| lens[req].0;
    assert!(plan.work.iter().filter(|w| w.req == 0).all(|w| w.kv_begin >= 20000 - 8 - 3000), "{:?}", plan.work);
    check_prefill_split(&plan, &lens, &qo, 4, |t, kv| {
        let q_len = if kv == 20000 { q(0) } else if kv == 9000 { q(1) } else { q(2) };
        let qpos = kv - q_len + t;
        ((qpos + 1).saturating_sub(3000), qpos + 1)
    });
    // chunked has a kv_range bound that is not provably monotone: every token is evaluated.
    let (plan, qo) = prefill_plan("chunked", &[("chunk", 4096.0)], &lens, 32, 264, PlanMode::Default).unwrap();
    check_prefill_split(&plan, &lens, &qo, 4, |t, kv| {
        let q_len = if kv == 20000 { 8 } else if kv == 9000 { 5 } else { 8 };
        let qpos = kv - q_len + t;
        (qpos - qpos % 4096, qpos + 1)
    });
}

#[test]
fn prefill_split_modes() {
    let lens = [(8usize, 20000usize), (3, 700)];
    // A fixed grid never splits.
    let (plan, _) = prefill_plan("causal", &[], &lens, 32, 264, PlanMode::FixedGrid { max_ctas: 16 }).unwrap();
    assert!(plan.merge.is_empty() && plan.work.iter().all(|w| w.partial == -1));
    // A GQA group that does not divide the block: blocks straddle tokens, so no split.
    let v = shipped::resolve("causal").unwrap();
    let pages = PageTable::from_lens(&[20000], 16, &mut (0..).map(|i| i as usize)).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 7, kv_heads: 1, batch: 1 }).unwrap();
    let b = attnforge::kv::Batch { qo_indptr: &[0, 8], pages: &pages, kv: KvShape { kv_heads: 1, ..kv(pages.indices.len()) }, qo_heads: 7 };
    let plan = attnforge::plan::plan_prefill(&v, &p, &b.validated().unwrap(), 32, PlanTarget { ctas: 264, kv_tile: 32, resident: 0, always_balance: false }, PlanMode::Default).unwrap();
    assert!(plan.merge.is_empty());
    // Deterministic: chunks at fixed offsets, the same whatever else is in the batch.
    let mode = PlanMode::Deterministic { chunk: 1000 };
    let (alone, _) = prefill_plan("causal", &[], &lens[..1], 32, 264, mode).unwrap();
    let (both, qo) = prefill_plan("causal", &[], &lens, 32, 264, mode).unwrap();
    let chunks = |p: &attnforge::plan::PrefillPlan| {
        let mut c: Vec<(i32, i32, i32)> = p.work.iter().filter(|w| w.req == 0).map(|w| (w.row_start, w.kv_begin, w.kv_end)).collect();
        c.sort();
        c
    };
    assert_eq!(chunks(&alone), chunks(&both));
    assert!(chunks(&alone).iter().all(|&(_, b, e)| b % 1000 == 0 && (e - b == 1000 || e == 20000)));
    check_prefill_split(&both, &lens, &qo, 4, |t, kv| (0, kv - if kv == 20000 { 8 } else { 3 } + t + 1));
    assert!(prefill_plan("causal", &[], &lens, 32, 264, PlanMode::Deterministic { chunk: 0 }).is_err());
}

/// The wide decode tile (twice the warps, here 128-key tiles) is for launches of at most one CTA
/// per SM over long spans, never for deterministic plans; 132 SMs, 8 KV heads, the H200's
/// resident count (2 CTAs per SM), the planner's 64-key tile.
#[test]
fn the_wide_decode_tile_is_for_one_cta_per_sm_over_long_spans() {
    use attnforge::plan::wants_wide_tile;
    let v = shipped::resolve("default").unwrap();
    let wide = |lens: &[usize], mode: PlanMode| {
        let pages = PageTable::from_lens(lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
        let qo: Vec<i32> = (0..=lens.len() as i32).collect();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: lens.len() }).unwrap();
        let batch = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(pages.indices.len()), qo_heads: 32 };
        let plan = plan_decode(&v, &p, &batch.validated().unwrap(), PlanTarget { ctas: 132, kv_tile: 64, resident: 264, always_balance: false }, mode).unwrap();
        (wants_wide_tile(&plan, 8, 132, 128), plan.stride)
    };
    // B16 L4096: 128 whole requests on 132 SMs.
    assert_eq!(wide(&[4096; 16], PlanMode::Default), (true, 16));
    // B1 L16384: split into 16 chunks of 1024 per head, 128 CTAs.
    assert_eq!(wide(&[16384], PlanMode::Default), (true, 16));
    // B1 L1024: 16 chunks of 64 keys fill half a wide tile each.
    assert!(!wide(&[1024], PlanMode::Default).0);
    // B64 L4096: 512 CTAs, two per SM on the configured tile.
    assert!(!wide(&[4096; 64], PlanMode::Default).0);
    // Deterministic plans keep the configured tile whatever the batch.
    assert!(!wide(&[4096; 16], PlanMode::Deterministic { chunk: 4096 }).0);
    // A fixed grid decides by the CTAs that take work, not its capacity: B16 has 16 per head
    // whatever the capacity; B64 has a wave of 33 per head (264 resident / 8), two per SM.
    assert_eq!(wide(&[4096; 16], PlanMode::FixedGrid { max_ctas: 16 }), (true, 16));
    assert_eq!(wide(&[4096; 16], PlanMode::FixedGrid { max_ctas: 2000 }), (true, 16));
    assert_eq!(wide(&[4096; 64], PlanMode::FixedGrid { max_ctas: 2000 }), (false, 33));
    // Empty requests do not count towards the average span.
    assert!(!wide(&[0, 0, 0, 600], PlanMode::Default).0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A fixed grid of `decode_fixed_grid_bound` CTAs plans every batch within its capacity
    /// (what a CUDA-graph wrapper sizes its buffers by before it sees a batch): random lengths,
    /// skewed or not, empty requests, for variants whose spans are whole or windowed, on targets
    /// like the H200's (132 SMs, 1–32 resident CTAs per SM).
    #[test]
    fn a_fixed_grid_of_the_bound_plans_every_batch_within_capacity(
        lens in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..64, 1usize..5000, 20000usize..70000], 1..64),
        variant in prop_oneof![Just("causal"), Just("default"), Just("sliding_window"), Just("gemma2")],
        per_sm in 1usize..33,
        kv_tile in prop_oneof![Just(32usize), Just(64), Just(128)],
        spare in 0usize..64,
    ) {
        use attnforge::plan::decode_fixed_grid_bound;
        let max_batch = lens.len() + spare;
        let target = PlanTarget { ctas: 132, kv_tile, resident: 132 * per_sm, always_balance: false };
        let v = shipped::resolve(variant).unwrap();
        let bound = decode_fixed_grid_bound(&v, target, 8, max_batch);
        let pages = PageTable::from_lens(&lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
        let qo: Vec<i32> = (0..=lens.len() as i32).collect();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: lens.len() }).unwrap();
        let batch = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(pages.indices.len().max(1)), qo_heads: 32 };
        let valid = batch.validated().unwrap();
        let fixed = plan_decode(&v, &p, &valid, target, PlanMode::FixedGrid { max_ctas: bound });
        prop_assert!(fixed.is_ok(), "bound {bound}: {:?}", fixed.err());
    }
}

/// A graph wrapper sized for exactly its batch plans a skewed batch as eager does: balanced,
/// the same items (before, its bound had no room for the balanced columns, and the unbalanced
/// fallback ran two whole requests in turn on some CTAs: 1396 against 1277 µs per 32-layer step
/// on the H200, `benches/graph_gap.py`).
#[test]
fn a_fixed_grid_at_capacity_plans_a_skewed_batch_as_eager_does() {
    use attnforge::plan::decode_fixed_grid_bound;
    let v = shipped::resolve("default").unwrap();
    for (b, per_sm) in [(40usize, 2usize), (24, 2), (40, 4)] {
        let lens: Vec<usize> = (0..b).map(|i| 150 + (i * 7919) % 1050).collect();
        let target = PlanTarget { ctas: 132, kv_tile: 64, resident: 132 * per_sm, always_balance: false };
        let pages = PageTable::from_lens(&lens, 16, &mut (0..).map(|i| i as usize)).unwrap();
        let qo: Vec<i32> = (0..=b as i32).collect();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: b }).unwrap();
        let batch = attnforge::kv::Batch { qo_indptr: &qo, pages: &pages, kv: kv(pages.indices.len()), qo_heads: 32 };
        let valid = batch.validated().unwrap();
        let eager = plan_decode(&v, &p, &valid, target, PlanMode::Default).unwrap();
        let fixed = plan_decode(&v, &p, &valid, target, PlanMode::FixedGrid { max_ctas: decode_fixed_grid_bound(&v, target, 8, b) }).unwrap();
        let items = |pl: &DecodePlan| pl.work.iter().map(|w| (w.req, w.kv_begin, w.kv_end, w.partial)).collect::<Vec<_>>();
        assert_eq!(items(&fixed), items(&eager), "B{b} per_sm {per_sm}");
        assert_eq!((fixed.stride, fixed.per_cta, fixed.merge.len()), (eager.stride, eager.per_cta, eager.merge.len()), "B{b} per_sm {per_sm}");
    }
}
