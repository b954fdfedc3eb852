//! Composable formats on the host: multi-level validation errors, shared-prefix detection on
//! random tries, and the multi-level reference against the single-level one for every variant.

use std::collections::HashMap;

use attnforge::cascade::{detect, Cascade, Group, Level, Policy};
use attnforge::kv::{Batch, KvLayout, KvShape, LayoutError, PageTable};
use attnforge::spec::params::{sample, Dims};
use attnforge::spec::shipped;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const PS: usize = 4;

/// A batch whose requests share prefixes along a random trie: request `r` takes the pages of a
/// random earlier request's first `k` pages (nested sharing), then pages of its own; lengths
/// end anywhere (a partial last page).
struct Case {
    pages: PageTable,
    qo_indptr: Vec<i32>,
    num_pages: usize,
}

fn case(rng: &mut impl Rng, n: usize, share: f64, q_lens: &[usize]) -> Case {
    let mut next = 0i32;
    let mut lists: Vec<Vec<i32>> = Vec::new();
    let mut lens = Vec::new();
    for r in 0..n {
        let mut list: Vec<i32> = Vec::new();
        if r > 0 && rng.random_bool(share) {
            let from = rng.random_range(0..r);
            // Only whole pages of the other request can be shared.
            let full = lens[from] / PS;
            let k = rng.random_range(0..=full);
            list.extend_from_slice(&lists[from][..k]);
        }
        let extra = rng.random_range(0..5usize);
        for _ in 0..extra {
            list.push(next);
            next += 1;
        }
        let len = if list.is_empty() { 0 } else { (list.len() - 1) * PS + rng.random_range(1..=PS) };
        // A request whose own pages ended early must end on one of them, not on a shared page's
        // slot past its owner's length: keep the shared pages full.
        let len = len.max(if extra == 0 { list.len() * PS } else { 0 });
        lens.push(len);
        lists.push(list);
    }
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    let mut last = Vec::new();
    for (l, &len) in lists.iter().zip(&lens) {
        indices.extend_from_slice(l);
        indptr.push(indices.len() as i32);
        last.push(if l.is_empty() { 0 } else { (len - (l.len() - 1) * PS) as i32 });
    }
    let mut qo = vec![0i32];
    for (r, &len) in lens.iter().enumerate() {
        let q = q_lens[r % q_lens.len()].min(len);
        qo.push(qo[r] + q as i32);
    }
    Case { pages: PageTable { indptr, indices, last_page_len: last }, qo_indptr: qo, num_pages: next.max(1) as usize }
}

fn kv(num_pages: usize) -> KvShape {
    KvShape { layout: KvLayout::Nhd, interleaved: false, num_pages, page_size: PS, kv_heads: 2, head_dim_qk: 16, head_dim_vo: 8 }
}

fn batch<'a>(c: &'a Case) -> Batch<'a> {
    Batch { qo_indptr: &c.qo_indptr, pages: &c.pages, kv: kv(c.num_pages), qo_heads: 4 }
}

/// Any sharing at all pays (the tests look at the structure, not the cost model).
fn eager() -> Policy {
    Policy { min_saved_bytes: 0, weigh_states: false, ..Policy::default() }
}

/// The longest common prefix of full pages of two requests.
fn lcp(b: &Batch<'_>, x: usize, y: usize) -> usize {
    let full = |r: usize| &b.pages.pages(r)[..b.kv_len(r) / PS];
    full(x).iter().zip(full(y)).take_while(|(a, b)| a == b).count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Detection on random tries: the cascade decomposes the batch, every group of several
    /// requests is a run of pages all of them share at the same place, no two requests that
    /// share a first full page end up reading it separately at the first level, and keys are
    /// read no more often than without the cascade.
    #[test]
    fn detection_on_random_tries_decomposes_the_batch(seed in any::<u64>(), n in 1usize..24, share in 0.0f64..1.0, levels in 2usize..5) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = case(&mut rng, n, share, &[1]);
        let b = batch(&c);
        b.validated().unwrap();
        let policy = Policy { max_levels: levels, ..eager() };
        let Some(cascade) = detect(&b.validated().unwrap(), &policy) else {
            // None: no two requests share their first full page.
            for x in 0..n {
                for y in 0..x {
                    prop_assert_eq!(lcp(&b, x, y), 0, "requests {} and {} share a prefix, but no cascade", x, y);
                }
            }
            return Ok(());
        };
        cascade.validate(&b).unwrap();
        prop_assert!(cascade.levels.len() <= levels);
        prop_assert!(cascade.keys_read() < Cascade::single(&b).keys_read());
        for level in &cascade.levels[..cascade.levels.len() - 1] {
            for g in &level.groups {
                prop_assert!(g.requests.len() >= 2, "a shared level has a group of one");
                prop_assert_eq!(g.len, g.pages.len() * PS, "a shared run is whole pages");
                for &x in &g.requests {
                    for &y in &g.requests {
                        prop_assert!(lcp(&b, x, y) * PS >= g.kv_start + g.len);
                    }
                }
            }
        }
        // The first level's groups are the maximal sharing classes of the first page.
        let first: HashMap<usize, usize> = cascade.levels[0].groups.iter().enumerate().flat_map(|(gi, g)| g.requests.iter().map(move |&r| (r, gi))).collect();
        for x in 0..n {
            for y in 0..x {
                if lcp(&b, x, y) > 0 && cascade.levels.len() > 1 {
                    prop_assert_eq!(first.get(&x), first.get(&y), "requests {} and {} share page 0 but not a group", x, y);
                }
            }
        }
    }

    /// reference(multi-level) == reference(single-level) for every shipped variant, decode and
    /// append rows, on random shared-prefix batches (detected cascades and the trivial one).
    #[test]
    fn the_multi_level_reference_equals_the_single_level_one(seed in any::<u64>(), n in 1usize..10, share in 0.3f64..1.0) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = case(&mut rng, n, share, &[1, 3, 1, 7]);
        let b = batch(&c);
        b.validated().unwrap();
        let q: Vec<f32> = (0..b.q_elems()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let k: Vec<f32> = (0..b.kv.k_len()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..b.kv.v_len()).map(|_| rng.random_range(-1.0..1.0)).collect();
        let lens: Vec<(usize, usize)> = (0..n).map(|r| (b.q_len(r), b.kv_len(r))).collect();
        let cascades = [detect(&b.validated().unwrap(), &Policy { max_levels: 3, ..eager() }), detect(&b.validated().unwrap(), &Policy { max_levels: 2, ..eager() }), Some(Cascade::single(&b))];
        for variant in shipped::all().unwrap() {
            let params = sample(&variant.params, Dims { qo_heads: 4, kv_heads: 2, batch: n }, &lens, |lo, hi| rng.random_range(lo..=hi));
            let single = attnforge::reference::attention(&variant, &params, &b, &q, &k, &v, None).unwrap();
            for cascade in cascades.iter().flatten() {
                let multi = attnforge::reference::attention_cascade(&variant, &params, &b, cascade, &q, &k, &v, None).unwrap();
                for (i, (x, y)) in single.lse.iter().zip(&multi.lse).enumerate() {
                    prop_assert!((x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-5 * x.abs().max(1.0), "{}: lse[{}] {} vs {}", variant.name, i, x, y);
                }
                for (i, (x, y)) in single.o.iter().zip(&multi.o).enumerate() {
                    prop_assert!((x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-5 * x.abs().max(1.0), "{}: o[{}] {} vs {}", variant.name, i, x, y);
                }
            }
        }
    }
}

#[test]
fn no_shared_prefix_is_no_cascade_and_partial_last_pages_stay_with_their_request() {
    // Requests 0 and 1 share pages 0 and 1; request 0's page 2 is partial, so even though
    // request 1 lists page 2 too, page 2 is not shared.
    let pages = PageTable { indptr: vec![0, 3, 7, 8], indices: vec![0, 1, 2, 0, 1, 2, 3, 4], last_page_len: vec![2, 4, 3] };
    let qo = [0, 1, 2, 3];
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(5), qo_heads: 4 };
    let c = detect(&b.validated().unwrap(), &eager()).unwrap();
    c.validate(&b).unwrap();
    assert_eq!(c.levels.len(), 2);
    assert_eq!(c.levels[0].groups, vec![Group { requests: vec![0, 1], kv_start: 0, pages: vec![0, 1], len: 8 }]);
    let suffixes: Vec<(usize, usize, usize)> = c.levels[1].groups.iter().map(|g| (g.requests[0], g.kv_start, g.len)).collect();
    assert_eq!(suffixes, [(0, 8, 2), (1, 8, 8), (2, 0, 3)]);
    // Nothing shared: no cascade; off: no cascade; a cost model the saving does not meet: none.
    let lone = PageTable { indptr: vec![0, 2, 3], indices: vec![0, 1, 2], last_page_len: vec![4, 1] };
    let qo2 = [0, 1, 2];
    let b2 = Batch { qo_indptr: &qo2, pages: &lone, kv: kv(3), qo_heads: 4 };
    assert_eq!(detect(&b2.validated().unwrap(), &eager()), None);
    assert_eq!(detect(&b.validated().unwrap(), &Policy { enabled: false, ..eager() }), None);
    assert_eq!(detect(&b.validated().unwrap(), &Policy::default()), None, "two shared pages of 256 bytes do not pay for a launch");
    // Every request shares everything: the suffix level holds only what is past the prefix.
    let all = PageTable { indptr: vec![0, 2, 4, 6], indices: vec![7, 8, 7, 8, 7, 8], last_page_len: vec![4, 4, 4] };
    let b3 = Batch { qo_indptr: &qo, pages: &all, kv: kv(9), qo_heads: 4 };
    let c3 = detect(&b3.validated().unwrap(), &eager()).unwrap();
    c3.validate(&b3).unwrap();
    assert_eq!(c3.levels[0].groups.len(), 1);
    assert!(c3.levels[1].groups.is_empty());
}

#[test]
fn nested_prefixes_become_levels() {
    // All three share page 10; requests 0 and 1 also share page 11.
    let pages = PageTable { indptr: vec![0, 3, 6, 8], indices: vec![10, 11, 0, 10, 11, 1, 10, 2], last_page_len: vec![1, 1, 1] };
    let qo = [0, 1, 2, 3];
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(12), qo_heads: 4 };
    let c = detect(&b.validated().unwrap(), &eager()).unwrap();
    c.validate(&b).unwrap();
    let shape: Vec<Vec<(Vec<usize>, usize, usize)>> = c.levels.iter().map(|l| l.groups.iter().map(|g| (g.requests.clone(), g.kv_start, g.len)).collect()).collect();
    assert_eq!(shape, vec![vec![(vec![0, 1, 2], 0, 4)], vec![(vec![0, 1], 4, 4)], vec![(vec![0], 8, 1), (vec![1], 8, 1), (vec![2], 4, 1)]]);
    // Two levels at most: the deeper run joins the suffixes.
    let c2 = detect(&b.validated().unwrap(), &Policy { max_levels: 2, ..eager() }).unwrap();
    c2.validate(&b).unwrap();
    assert_eq!(c2.levels.len(), 2);
    assert_eq!(c2.levels[1].groups[0].len, 5);
}

#[test]
fn a_cascade_that_does_not_decompose_its_batch_is_an_error() {
    let pages = PageTable { indptr: vec![0, 2, 4], indices: vec![0, 1, 0, 2], last_page_len: vec![3, 4] };
    let qo = [0, 1, 2];
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(3), qo_heads: 4 };
    let g = |requests: Vec<usize>, kv_start: usize, pages: Vec<i32>, len: usize| Group { requests, kv_start, pages, len };
    let good = Cascade { levels: vec![Level { groups: vec![g(vec![0, 1], 0, vec![0], 4)] }, Level { groups: vec![g(vec![0], 4, vec![1], 3), g(vec![1], 4, vec![2], 4)] }] };
    good.validate(&b).unwrap();
    let message = |c: Cascade| match c.validate(&b) {
        Err(LayoutError::Cascade { level, group, message }) => format!("{level}/{group}: {message}"),
        other => panic!("expected a cascade error, got {other:?}"),
    };
    let mut c = good.clone();
    c.levels[1].groups.pop();
    assert!(message(c).contains("request 1: the levels cover 4 of its 8 keys"));
    let mut c = good.clone();
    c.levels[1].groups[0].pages = vec![2];
    assert!(message(c).contains("not request 0's pages 1..2"));
    let mut c = good.clone();
    c.levels[0].groups[0].kv_start = 2;
    assert!(message(c).starts_with("0/0: kv_start 2 is not a multiple"));
    let mut c = good.clone();
    c.levels[1].groups[1].requests = vec![0];
    assert!(message(c).contains("request 0 is also in group 0"));
    let mut c = good.clone();
    c.levels[0].groups[0].requests = vec![0, 5];
    assert!(message(c).contains("request 5 is outside the batch of 2"));
    let mut c = good.clone();
    c.levels[1].groups[0].len = 4;
    assert!(message(c).contains("past request 0's 7"));
    let mut c = good.clone();
    c.levels[0].groups[0].len = 5;
    assert!(message(c).contains("5 keys on 1 pages of 4"));
    let mut c = good.clone();
    c.levels.push(Level { groups: vec![g(vec![1], 0, vec![0], 4)] });
    assert!(message(c).contains("overlaps"));
    let mut c = good.clone();
    c.levels[0].groups[0].requests.clear();
    assert!(message(c).contains("without requests"));
    // And the reference refuses it too.
    let v = shipped::resolve("causal").unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: 2 }).unwrap();
    let mut c = good.clone();
    c.levels[1].groups.pop();
    let zeros = vec![0.0f32; 2 * 4 * 16];
    let kvz = vec![0.0f32; b.kv.k_len()];
    let vz = vec![0.0f32; b.kv.v_len()];
    assert!(attnforge::reference::attention_cascade(&v, &p, &b, &c, &zeros, &kvz, &vz, None).is_err());
}

#[test]
fn merge_state_handles_empty_and_nan_sides() {
    use attnforge::reference::{merge_state, State};
    use attnforge::spec::Normalize;
    let a = State { o: vec![1.0, 2.0], lse: 0.5 };
    let b = State { o: vec![3.0, -1.0], lse: -0.25 };
    let ab = merge_state(Normalize::Softmax, &a, &b);
    let ba = merge_state(Normalize::Softmax, &b, &a);
    assert!((ab.lse - (0.5f64.exp() + (-0.25f64).exp()).ln()).abs() < 1e-15);
    for (x, y) in ab.o.iter().zip(&ba.o) {
        assert!((x - y).abs() < 1e-15);
    }
    let wa = (0.5 - ab.lse).exp();
    assert!((ab.o[0] - (wa * 1.0 + (1.0 - wa) * 3.0)).abs() < 1e-12);
    let e = State::empty(2);
    assert_eq!(merge_state(Normalize::Softmax, &a, &e), a);
    assert_eq!(merge_state(Normalize::Softmax, &e, &e), e);
    assert!(merge_state(Normalize::Softmax, &a, &State { o: vec![0.0; 2], lse: f64::NAN }).lse.is_nan());
    assert_eq!(merge_state(Normalize::None, &State { o: vec![1.0, 1.0], lse: 0.0 }, &State { o: vec![2.0, 0.5], lse: 0.0 }).o, vec![3.0, 1.5]);
    // The sink joins once, at the end; a row without keys stays (0, -inf) with a sink.
    let fin = a.clone().finish(Normalize::Softmax, Some(0.5));
    assert!((fin.lse - (0.5 + 2f64.ln())).abs() < 1e-15);
    assert!((fin.o[0] - 0.5).abs() < 1e-15);
    assert_eq!(e.clone().finish(Normalize::Softmax, Some(3.0)), e);
}

#[test]
fn requests_without_queries_share_nothing_and_hostile_groups_are_errors_not_panics() {
    // Request 1 has no query: sharing its pages would save nothing.
    let pages = PageTable { indptr: vec![0, 4, 8], indices: vec![0, 1, 2, 3, 0, 1, 2, 3], last_page_len: vec![4, 4] };
    let qo = [0, 1, 1];
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(4), qo_heads: 4 };
    assert_eq!(detect(&b.validated().unwrap(), &Policy { min_saved_bytes: 1, page_bytes: 1, ..eager() }), None);
    // A group whose kv_start + len overflows is an error.
    let c = Cascade { levels: vec![Level { groups: vec![Group { requests: vec![0], kv_start: usize::MAX & !3, pages: vec![0], len: 4 }] }] };
    assert!(matches!(c.validate(&b), Err(LayoutError::Cascade { .. })));
}

/// Deeply nested runs cost O(total pages): a long pair plus many requests branching off it at
/// every page, with unlimited levels (comparing tails re-scanned the pair at every branch).
#[test]
fn detection_of_deeply_nested_runs_is_linear() {
    let long: Vec<i32> = (0..4000).collect();
    let mut indptr = vec![0i32];
    let mut indices: Vec<i32> = Vec::new();
    let mut next = 4000;
    for _ in 0..2 {
        indices.extend(&long);
        indptr.push(indices.len() as i32);
    }
    for i in 1..2000usize {
        indices.extend(&long[..i]);
        indices.push(next);
        next += 1;
        indptr.push(indices.len() as i32);
    }
    let n = indptr.len() - 1;
    let pages = PageTable { indptr, indices, last_page_len: vec![1; n] };
    let qo: Vec<i32> = (0..=n as i32).collect();
    let shape = KvShape { page_size: 1, ..kv(next as usize) };
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: shape, qo_heads: 4 };
    let t = std::time::Instant::now();
    let c = detect(&b.validated().unwrap(), &Policy { max_levels: usize::MAX, ..eager() }).unwrap();
    let secs = t.elapsed().as_secs_f64();
    c.validate(&b).unwrap();
    // ~2M pages: linear is a few ms; the quadratic rescan took seconds. Generous for CI.
    assert!(secs < 2.0, "detection took {secs:.2} s");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The GPU plan of a cascade on random tries: every query token gets one merge item, every
    /// partial slot is written by exactly one group-item row, and a token's slots cover its
    /// request's keys exactly once; group items hold at most a tile's tokens; the packed buffer
    /// carries the group table at the offset its header names.
    #[test]
    fn the_cascade_plan_covers_every_token_s_keys_once(seed in any::<u64>(), n in 1usize..16, share in 0.3f64..1.0, ctas in 1usize..300, rows in prop::sample::select(vec![2usize, 16, 64]), det in any::<bool>()) {
        use attnforge::plan::{plan_cascade, PlanMode, PlanTarget};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = case(&mut rng, n, share, &[1, 3, 0, 5, 1]);
        let b = batch(&c);
        let valid = b.validated().unwrap();
        let Some(cascade) = detect(&valid, &eager()) else { return Ok(()) };
        let v = shipped::resolve("causal").unwrap();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: n }).unwrap();
        let target = PlanTarget { ctas, kv_tile: 4, resident: 0, always_balance: false };
        let mode = if det { PlanMode::Deterministic { chunk: 8 } } else { PlanMode::Default };
        let plan = plan_cascade(&v, &p, &valid, &cascade, rows, target, mode).unwrap();
        let total_q = *c.qo_indptr.last().unwrap() as usize;
        prop_assert_eq!(plan.merge.len(), total_q);
        let mut slot_range: Vec<Option<(i32, i32)>> = vec![None; plan.num_partials];
        for w in &plan.work {
            prop_assert!(w.stride < 0 && w.partial == -1, "{:?}", w);
            let entries = &plan.groups[w.row_start as usize..(w.row_start - w.stride) as usize];
            prop_assert!(entries.len() <= rows / 2);
            for &[r, t, slot, _] in entries {
                let (r, t) = (r as usize, t as usize);
                prop_assert!((c.qo_indptr[r] as usize..c.qo_indptr[r + 1] as usize).contains(&t));
                prop_assert!(w.kv_begin < w.kv_end && w.kv_end as usize <= b.kv_len(r));
                let m = plan.merge[t];
                prop_assert_eq!(m.token as usize, t);
                prop_assert!(slot >= m.first && slot < m.first + m.count, "slot {} outside token {}'s {:?}", slot, t, m);
                prop_assert!(slot_range[slot as usize].replace((w.kv_begin, w.kv_end)).is_none(), "slot {} written twice", slot);
            }
        }
        for m in &plan.merge {
            let mut spans: Vec<(i32, i32)> = (m.first..m.first + m.count).map(|s| slot_range[s as usize].expect("every slot is written")).collect();
            spans.sort();
            let mut at = 0;
            for (lo, hi) in spans {
                prop_assert_eq!(lo, at, "token {}: a gap or an overlap", m.token);
                at = hi;
            }
            prop_assert_eq!(at as usize, b.kv_len(m.req as usize));
        }
        let packed = plan.packed();
        prop_assert_eq!(packed.len(), plan.packed_len());
        let at = packed[3] as usize;
        prop_assert_eq!(at % 4, 0);
        let table: Vec<i32> = plan.groups.iter().flatten().copied().collect();
        prop_assert_eq!(&packed[at..], &table[..]);
        prop_assert_eq!(packed[1] as usize, plan.merge.len());
    }
}

#[test]
fn cascade_plans_refuse_a_fixed_grid_and_a_tile_smaller_than_a_token() {
    use attnforge::plan::{plan_cascade, PlanMode, PlanTarget};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let c = case(&mut rng, 6, 1.0, &[1]);
    let b = batch(&c);
    let valid = b.validated().unwrap();
    let cascade = Cascade::single(&b);
    let v = shipped::resolve("causal").unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: 6 }).unwrap();
    let target = PlanTarget { ctas: 100, kv_tile: 4, resident: 0, always_balance: false };
    let err = plan_cascade(&v, &p, &valid, &cascade, 64, target, PlanMode::FixedGrid { max_ctas: 1000 }).unwrap_err();
    assert!(err.to_string().contains("fixed-grid"), "{err}");
    let err = plan_cascade(&v, &p, &valid, &cascade, 1, target, PlanMode::Default).unwrap_err();
    assert!(err.to_string().contains("at least one token"), "{err}");
    // The decode cascade has a fixed-grid form, which must fit its grid; it refuses a tile
    // smaller than a token, and appends.
    use attnforge::plan::plan_decode_cascade;
    plan_decode_cascade(&v, &p, &valid, &cascade, 64, target, target, PlanMode::FixedGrid { max_ctas: 1000 }).unwrap();
    let err = plan_decode_cascade(&v, &p, &valid, &cascade, 64, target, target, PlanMode::FixedGrid { max_ctas: 2 }).unwrap_err();
    assert!(err.to_string().contains("fixed grid") || err.to_string().contains("CTAs"), "{err}");
    let err = plan_decode_cascade(&v, &p, &valid, &cascade, 1, target, target, PlanMode::Default).unwrap_err();
    assert!(err.to_string().contains("at least one token"), "{err}");
    let c = case(&mut rng, 6, 1.0, &[3]);
    let b = batch(&c);
    let valid = b.validated().unwrap();
    let cascade = Cascade::single(&b);
    assert!((0..6).any(|r| b.kv_len(r) >= 2), "the case has a request of several query tokens");
    let err = plan_decode_cascade(&v, &p, &valid, &cascade, 64, target, target, PlanMode::Default).unwrap_err();
    assert!(err.to_string().contains("decode request"), "{err}");
}

#[test]
fn the_default_policy_weighs_the_partial_states_against_the_reads_saved() {
    // Requests sharing a 4096-token prefix (256 pages of 16), then 16 pages of their own;
    // 32/8 heads, d 128. Decoding, a cascade pays; appending 2048 tokens each, the partial
    // states (2 per token × 32 heads × 129 floats, written and read) outweigh the 112 MiB saved.
    let shape = |b: usize, q: usize| {
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        for r in 0..b as i32 {
            indices.extend(0..256);
            indices.extend((0..16).map(|j| 256 + r * 16 + j));
            indptr.push(indices.len() as i32);
        }
        let pages = PageTable { indptr, indices, last_page_len: vec![16; b] };
        let qo: Vec<i32> = (0..=b as i32).map(|r| r * q as i32).collect();
        (pages, qo)
    };
    let kv = |n: usize| KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: n, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
    let (pages, qo) = shape(8, 1);
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(256 + 8 * 16), qo_heads: 32 };
    assert!(detect(&b.validated().unwrap(), &Policy::default()).is_some(), "8 decodes sharing 4096 tokens");
    let (pages, qo) = shape(8, 2048);
    let b = Batch { qo_indptr: &qo, pages: &pages, kv: kv(256 + 8 * 16), qo_heads: 32 };
    assert_eq!(detect(&b.validated().unwrap(), &Policy::default()), None, "8 appends of 2048 tokens");
    assert!(detect(&b.validated().unwrap(), &Policy { weigh_states: false, ..Policy::default() }).is_some());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The decode cascade plan on random tries of decode batches (one query token or none): the
    /// prefix level holds groups of two or more requests (and, folded, small suffixes of their
    /// members), the decode items only one request's keys; every partial slot is written exactly once (by a group-item row or a
    /// decode item), a token's slots cover its request's keys exactly once, a request without
    /// a merge item has one direct decode item over all its keys, and the packed buffer carries
    /// the prefix level's own plan at the offset the plan names.
    #[test]
    fn the_decode_cascade_plan_covers_every_token_s_keys_once(seed in any::<u64>(), n in 1usize..16, share in 0.3f64..1.0, ctas in 1usize..300, rows in prop::sample::select(vec![2usize, 16, 64]), kind in 0usize..3) {
        use attnforge::plan::{plan_decode, plan_decode_cascade, with_cascade_capacity, Plan, PlanMode, PlanTarget};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = case(&mut rng, n, share, &[1, 1, 0, 1]);
        let b = batch(&c);
        let valid = b.validated().unwrap();
        let Some(cascade) = detect(&valid, &eager()) else { return Ok(()) };
        let v = shipped::resolve("causal").unwrap();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 4, kv_heads: 2, batch: n }).unwrap();
        let pt = PlanTarget { ctas, kv_tile: 4, resident: 0, always_balance: false };
        let dt = PlanTarget { ctas: ctas / 2 + 1, kv_tile: 8, resident: 0, always_balance: false };
        // Fixed grid: the capacity of a graph wrapper of 2n requests (a request's own keys are at
        // most two runs, around a shared middle level), and a prefix of ctas / 2 CTAs per KV head,
        // so that groups are demoted.
        let bound = attnforge::plan::decode_fixed_grid_bound(&v, dt, 2, 2 * n);
        let mode = [PlanMode::Default, PlanMode::Deterministic { chunk: 8 }, PlanMode::FixedGrid { max_ctas: bound }][kind];
        let plan = plan_decode_cascade(&v, &p, &valid, &cascade, rows, pt, dt, mode).unwrap();
        let pre = plan.prefix.as_deref().expect("a decode cascade has a prefix level");
        prop_assert_eq!(pre.num_partials, plan.partial_slots());
        prop_assert_eq!(pre.workspace_bytes, plan.workspace_bytes);
        prop_assert!(pre.merge.is_empty());
        if let PlanMode::FixedGrid { max_ctas } = mode {
            // The layout of every fixed-grid plan of the shape, sharing or not.
            let wp = ctas.div_ceil(2);
            prop_assert!(pre.work.len() <= wp && pre.grid == wp && pre.groups.len() <= wp * (rows / 2));
            prop_assert!(plan.num_partials <= plan.partial_slots() && plan.work.len() <= max_ctas && plan.merge.len() <= max_ctas);
            let plain = with_cascade_capacity(plan_decode(&v, &p, &valid, dt, mode).unwrap(), &valid, rows, pt);
            prop_assert_eq!((plain.packed_len(), plain.prefix_offset(), plain.merge_offset()), (plan.packed_len(), plan.prefix_offset(), plan.merge_offset()));
            prop_assert_eq!((plain.workspace_bytes, plain.partial_slots(), plain.grid, plain.merge_grid), (plan.workspace_bytes, plan.partial_slots(), plan.grid, plan.merge_grid));
            let pp = plain.prefix.as_deref().unwrap();
            prop_assert_eq!((pp.grid, pp.rows, pp.packed_len(), pp.num_partials), (pre.grid, pre.rows, pre.packed_len(), pre.num_partials));
            prop_assert!(pp.work.is_empty() && !plain.is_cascade());
            prop_assert_eq!(plan.is_cascade(), !pre.work.is_empty());
        }
        let mut slot_range: Vec<Option<(i32, i32)>> = vec![None; plan.num_partials];
        let merge_of = |r: usize| plan.merge.iter().find(|m| m.req as usize == r);
        for w in &pre.work {
            let entries = &pre.groups[w.row_start as usize..(w.row_start - w.stride) as usize];
            prop_assert!(!entries.is_empty() && entries.len() <= rows / 2);
            for &[r, t, slot, _] in entries {
                let r = r as usize;
                prop_assert_eq!(t, c.qo_indptr[r]);
                prop_assert!(w.kv_begin < w.kv_end && w.kv_end as usize <= b.kv_len(r));
                let m = merge_of(r).expect("a request in a shared group is merged");
                prop_assert!(slot >= m.first && slot < m.first + m.count);
                prop_assert!(slot_range[slot as usize].replace((w.kv_begin, w.kv_end)).is_none(), "slot {} written twice", slot);
            }
        }
        for w in &plan.work {
            let r = w.req as usize;
            prop_assert!(w.kv_begin < w.kv_end && w.kv_end as usize <= b.kv_len(r));
            match merge_of(r) {
                Some(m) => {
                    prop_assert!(w.partial >= m.first && w.partial < m.first + m.count, "{:?} outside {:?}", w, m);
                    prop_assert!(slot_range[w.partial as usize].replace((w.kv_begin, w.kv_end)).is_none(), "slot {} written twice", w.partial);
                }
                None => {
                    prop_assert_eq!(w.partial, -1);
                    prop_assert_eq!((w.kv_begin, w.kv_end as usize), (0, b.kv_len(r)));
                    prop_assert_eq!(plan.work.iter().filter(|x| x.req == w.req).count(), 1);
                }
            }
        }
        for r in 0..n {
            let q = (c.qo_indptr[r + 1] - c.qo_indptr[r]) as usize;
            let direct = plan.work.iter().any(|w| w.req as usize == r && w.partial == -1);
            prop_assert_eq!(q == 1, direct || merge_of(r).is_some(), "request {} (q {}) is not written", r, q);
        }
        for m in &plan.merge {
            prop_assert_eq!(m.token, c.qo_indptr[m.req as usize]);
            let mut spans: Vec<(i32, i32)> = (m.first..m.first + m.count).map(|s| slot_range[s as usize].expect("every slot is written")).collect();
            spans.sort();
            let mut at = 0;
            for (lo, hi) in spans {
                prop_assert_eq!(lo, at, "token {}: a gap or an overlap", m.token);
                at = hi;
            }
            prop_assert_eq!(at as usize, b.kv_len(m.req as usize));
        }
        let packed = plan.packed();
        prop_assert_eq!(packed.len(), plan.packed_len());
        let (pp, off) = plan.prefix().unwrap();
        prop_assert_eq!(off % 4, 0);
        prop_assert_eq!(&packed[off..], &pp.packed()[..]);
        prop_assert_eq!(packed[1] as usize, plan.merge.len());
        prop_assert_eq!(packed[0] as usize, plan.work.len());
    }
}

#[test]
fn an_eager_decode_cascade_folds_small_suffixes_into_its_prefix_launch() {
    use attnforge::plan::{plan_decode_cascade, Plan, PlanMode, PlanTarget, FOLD_KEY_ROWS_PER_SM};
    // n requests share a 4096-token prefix (256 pages of 16), then `own` pages each; 32/8 heads.
    let run = |n: usize, own: usize, rows: usize, mode: PlanMode| {
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        for r in 0..n as i32 {
            indices.extend(0..256);
            indices.extend((0..own as i32).map(|j| 256 + r * own as i32 + j));
            indptr.push(indices.len() as i32);
        }
        let pages = PageTable { indptr, indices, last_page_len: vec![16; n] };
        let qo: Vec<i32> = (0..=n as i32).collect();
        let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 256 + n * own, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
        let b = Batch { qo_indptr: &qo, pages: &pages, kv, qo_heads: 32 };
        let valid = b.validated().unwrap();
        let cascade = detect(&valid, &Policy::default()).expect("a shared 4096-token prefix pays");
        let v = shipped::resolve("causal").unwrap();
        let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: n }).unwrap();
        let pt = PlanTarget { ctas: 132, kv_tile: 64, resident: 0, always_balance: false };
        let dt = PlanTarget { ctas: 132, kv_tile: 64, resident: 264, always_balance: false };
        let plan = plan_decode_cascade(&v, &p, &valid, &cascade, rows, pt, dt, mode).unwrap();
        let pre = plan.prefix.as_deref().unwrap();
        // Every own key is read once, by the prefix launch or by the decode items.
        let own_keys = |w_begin: i32, w_end: i32| (w_end.min(4096 + 16 * own as i32) - w_begin.max(4096)).max(0) as usize;
        let in_prefix: usize = pre.work.iter().map(|w| own_keys(w.kv_begin, w.kv_end) * (-w.stride) as usize).sum();
        let in_decode: usize = plan.work.iter().map(|w| own_keys(w.kv_begin, w.kv_end)).sum();
        assert_eq!(in_prefix + in_decode, n * own * 16);
        (plan.work.len(), plan.grid(), in_prefix)
    };
    // n 8, 32 own keys each, on the 32-row tile: 8 × 32 × 8 heads × 32 rows = 65 536 key-rows,
    // under the model's bound: one launch fewer.
    const { assert!(8 * 32 * 8 * 32 <= FOLD_KEY_ROWS_PER_SM * 132) };
    let (work, grid, in_prefix) = run(8, 2, 32, PlanMode::Default);
    assert_eq!((work, grid, in_prefix), (0, 0, 8 * 32));
    // B 128 × 256 own keys on the 128-row tile: 33.5 M key-rows, over it: decode items.
    let (work, grid, in_prefix) = run(128, 16, 128, PlanMode::Default);
    assert!(work >= 128 && grid > 0 && in_prefix == 0, "{work} {grid} {in_prefix}");
    // Deterministic and fixed-grid plans never fold (the batch must not change a request's
    // kernels; a graph's layout is fixed).
    for mode in [PlanMode::Deterministic { chunk: 512 }, PlanMode::FixedGrid { max_ctas: 4096 }] {
        let (work, _, in_prefix) = run(8, 2, 32, mode);
        assert!(work >= 8 && in_prefix == 0, "{mode:?}");
    }
}

/// Review finding: a fixed-grid decode cascade that demoted an outer shared level (it did not
/// fit the prefix wave) while admitting the inner ones left each member two own spans, which
/// outgrew a grid a plain plan of the same batch fits (FixedGridTooSmall). Groups are now decided
/// outer level first and a request's later groups follow its demoted one, so each request's own
/// keys stay one span and the plan fits.
#[test]
fn a_fixed_grid_decode_cascade_keeps_each_request_s_own_keys_one_span_when_it_demotes() {
    use attnforge::plan::{decode_fixed_grid_bound, plan_decode, plan_decode_cascade, PlanMode, PlanTarget};
    // 256 requests share 256 tokens (16 pages); 16 sets of 16 share 8192 more; then 1 own page.
    let b = 256usize;
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    for r in 0..b as i32 {
        indices.extend(0..16);
        indices.extend((0..512).map(|j| 16 + (r / 16) * 512 + j));
        indices.push(16 + 16 * 512 + r);
        indptr.push(indices.len() as i32);
    }
    let pages = PageTable { indptr, indices, last_page_len: vec![5; b] };
    let qo: Vec<i32> = (0..=b as i32).collect();
    let kv = KvShape { layout: KvLayout::Nhd, interleaved: true, num_pages: 16 + 16 * 512 + b, page_size: 16, kv_heads: 8, head_dim_qk: 128, head_dim_vo: 128 };
    let batch = Batch { qo_indptr: &qo, pages: &pages, kv, qo_heads: 32 };
    let valid = batch.validated().unwrap();
    let cascade = detect(&valid, &Policy::default()).expect("the batch shares two levels");
    let v = shipped::resolve("causal").unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 32, kv_heads: 8, batch: b }).unwrap();
    let pt = PlanTarget { ctas: 132, kv_tile: 64, resident: 0, always_balance: false };
    let dt = PlanTarget { ctas: 132, kv_tile: 64, resident: 264, always_balance: false };
    let mode = PlanMode::FixedGrid { max_ctas: decode_fixed_grid_bound(&v, dt, 8, b) };
    plan_decode(&v, &p, &valid, dt, mode).expect("a plain fixed-grid plan fits");
    let plan = plan_decode_cascade(&v, &p, &valid, &cascade, 128, pt, dt, mode).expect("the cascade fits the grid");
    let pre = plan.prefix.as_deref().unwrap();
    // The root (8 blocks of 32 rows) is admitted first; 9 of the 16 inner groups fit beside it.
    assert_eq!(pre.work.iter().filter(|w| w.kv_begin == 0).map(|w| -w.stride as usize).sum::<usize>(), b, "the root's blocks cover every request");
    for r in 0..b {
        let mut own: Vec<(i32, i32)> = plan.work.iter().filter(|w| w.req as usize == r).map(|w| (w.kv_begin, w.kv_end)).collect();
        own.sort();
        assert!(!own.is_empty() && own.windows(2).all(|x| x[0].1 == x[1].0), "request {r}: own keys {own:?} are not one span");
        assert_eq!(own.last().unwrap().1 as usize, valid.kv_len(r));
    }
}
