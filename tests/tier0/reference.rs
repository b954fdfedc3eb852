//! The CPU reference against a naive dense attention in f64 that materialises the mask and the
//! logits, on random page tables and every shipped variant; and hand-computed cases for the
//! semantics (sink, normalize none, fully masked rows).

use std::collections::HashMap;

use attnforge::kv::{Element, KvLayout};
use attnforge::reference::{attention, AttnOutput};
use attnforge::spec::eval::{eval, Env};
use attnforge::spec::params::{sample, Dims, ParamInput, ParamValues};
use attnforge::spec::{shipped, Normalize, Variant};
use attnforge::testing::workload::{Workload, WorkloadSpec};
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Dense attention: gathers each request's K and V into contiguous arrays, materialises the
/// full `[q_len, kv_len]` visibility and logit matrices, then normalises.
fn naive<T: Element>(v: &Variant, p: &ParamValues, w: &Workload<T>, sm_scale: f64) -> AttnOutput {
    let kv = w.kv;
    let (dqk, dvo, heads) = (kv.head_dim_qk, kv.head_dim_vo, w.qo_heads);
    let group = heads / kv.kv_heads;
    let total_q = *w.qo_indptr.last().unwrap() as usize;
    let mut out = AttnOutput { o: vec![f32::NAN; total_q * heads * dvo], lse: vec![f32::NAN; total_q * heads] };
    for b in 0..w.pages.batch_size() {
        // Gather: walk the page table token by token.
        let mut keys: Vec<Vec<Vec<f64>>> = Vec::new(); // [kv_pos][kv_head][d]
        let mut vals: Vec<Vec<Vec<f64>>> = Vec::new();
        let pages = &w.pages.indices[w.pages.indptr[b] as usize..w.pages.indptr[b + 1] as usize];
        for (n, &page) in pages.iter().enumerate() {
            let fill = if n + 1 == pages.len() { w.pages.last_page_len[b] as usize } else { kv.page_size };
            for slot in 0..fill {
                keys.push((0..kv.kv_heads).map(|h| (0..dqk).map(|d| w.k[kv.k_index(page as usize, slot, h) + d].to_f64()).collect()).collect());
                vals.push((0..kv.kv_heads).map(|h| (0..dvo).map(|d| w.v()[kv.v_index(page as usize, slot, h) + d].to_f64()).collect()).collect());
            }
        }
        let kv_len = keys.len();
        let (q0, q1) = (w.qo_indptr[b] as usize, w.qo_indptr[b + 1] as usize);
        let q_len = q1 - q0;
        for h in 0..heads {
            let kvh = h / group;
            // Materialise visibility and logits for every (query, key) pair.
            let mut visible = vec![vec![false; kv_len]; q_len];
            let mut logits = vec![vec![0.0f64; kv_len]; q_len];
            let mut sinks = vec![None; q_len];
            for i in 0..q_len {
                let t = q0 + i;
                for j in 0..kv_len {
                    let score: f64 = (0..dqk).map(|d| w.q[(t * heads + h) * dqk + d].to_f64() * keys[j][kvh][d]).sum();
                    let env = Env {
                        score,
                        sm_scale,
                        q_pos: kv_len as i32 - q_len as i32 + i as i32,
                        kv_pos: j as i32,
                        qo_head: h as i32,
                        kv_head: kvh as i32,
                        req: b as i32,
                        q_len: q_len as i32,
                        kv_len: kv_len as i32,
                        params: p,
                    };
                    let in_range = v.kv_range.as_ref().is_none_or(|r| {
                        r.lo.as_ref().is_none_or(|lo| j as i32 >= eval(&lo.typed, &env).as_i())
                            && r.hi.as_ref().is_none_or(|hi| j as i32 <= eval(&hi.typed, &env).as_i())
                    });
                    visible[i][j] = in_range && v.mask.as_ref().is_none_or(|m| eval(&m.typed, &env).as_b());
                    logits[i][j] = eval(&v.logits.typed, &env).as_f();
                    sinks[i] = v.sink.as_ref().map(|s| eval(&s.typed, &env).as_f());
                }
                if kv_len == 0 {
                    sinks[i] = None;
                }
            }
            for i in 0..q_len {
                let row = (q0 + i) * heads + h;
                let o = &mut out.o[row * dvo..(row + 1) * dvo];
                let vis: Vec<usize> = (0..kv_len).filter(|&j| visible[i][j]).collect();
                if vis.is_empty() {
                    o.fill(0.0);
                    out.lse[row] = f32::NEG_INFINITY;
                    continue;
                }
                let (weights, lse): (Vec<f64>, f64) = match v.normalize {
                    Normalize::None => (vis.iter().map(|&j| logits[i][j]).collect(), 0.0),
                    Normalize::Softmax => {
                        // Plain exp-sum with the max subtracted; the sink joins the denominator.
                        let mut m = vis.iter().map(|&j| logits[i][j]).fold(f64::NEG_INFINITY, f64::max);
                        if m == f64::NEG_INFINITY {
                            o.fill(0.0);
                            out.lse[row] = f32::NEG_INFINITY;
                            continue;
                        }
                        if let Some(s) = sinks[i] {
                            m = m.max(s);
                        }
                        let denom: f64 = vis.iter().map(|&j| (logits[i][j] - m).exp()).sum::<f64>()
                            + sinks[i].map_or(0.0, |s| (s - m).exp());
                        (vis.iter().map(|&j| (logits[i][j] - m).exp() / denom).collect(), m + denom.ln())
                    }
                };
                for d in 0..dvo {
                    o[d] = vis.iter().zip(&weights).map(|(&j, w)| w * vals[j][kvh][d]).sum::<f64>() as f32;
                }
                out.lse[row] = lse as f32;
            }
        }
    }
    out
}

fn assert_close(got: &AttnOutput, want: &AttnOutput, what: &str) {
    assert_eq!(got.o.len(), want.o.len(), "{what}");
    for (i, (a, b)) in got.o.iter().zip(&want.o).enumerate() {
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: o[{i}] = {a}, naive {b}");
    }
    for (i, (a, b)) in got.lse.iter().zip(&want.lse).enumerate() {
        assert!(a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: lse[{i}] = {a}, naive {b}");
    }
}

#[derive(Debug, Clone)]
struct Case {
    variant: usize,
    lens: Vec<(usize, usize)>,
    kv_heads: usize,
    group: usize,
    head_dims: (usize, usize),
    page_size: usize,
    layout: KvLayout,
    bf16: bool,
    seed: u64,
}

fn arb_case() -> impl Strategy<Value = Case> {
    let lens = prop::collection::vec((0usize..=70).prop_flat_map(|kv| (0usize..=kv.min(9) + 1, Just(kv))), 1..=4);
    (
        0..shipped::SHIPPED.len(),
        lens,
        1usize..=2,
        prop::sample::select(vec![1usize, 2, 4, 7, 8]),
        prop::sample::select(vec![(64usize, 64usize), (96, 96), (128, 128), (256, 256), (192, 128)]),
        prop::sample::select(vec![1usize, 3, 16]),
        prop::bool::ANY,
        prop::bool::ANY,
        any::<u64>(),
    )
        .prop_map(|(variant, lens, kv_heads, group, head_dims, page_size, hnd, bf16, seed)| Case {
            variant,
            lens,
            kv_heads,
            group,
            head_dims,
            page_size,
            layout: if hnd { KvLayout::Hnd } else { KvLayout::Nhd },
            bf16,
            seed,
        })
}

fn check_case<T: Element>(c: &Case) {
    let v = shipped::all().unwrap().swap_remove(c.variant);
    let mut rng = StdRng::seed_from_u64(c.seed);
    let spec = WorkloadSpec {
        lens: c.lens.clone(),
        qo_heads: c.kv_heads * c.group,
        kv_heads: c.kv_heads,
        head_dim_qk: c.head_dims.0,
        head_dim_vo: c.head_dims.1,
        page_size: c.page_size,
        layout: c.layout,
        interleaved: c.head_dims.0 == c.head_dims.1 && rng.random_bool(0.5),
        permute: true,
        spare_pages: rng.random_range(0..3),
    };
    let w = Workload::<T>::random(&spec, &mut rng).unwrap();
    let dims = Dims { qo_heads: spec.qo_heads, kv_heads: c.kv_heads, batch: c.lens.len() };
    let p = sample(&v.params, dims, &c.lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
    let scale = 1.0 / (c.head_dims.0 as f32).sqrt();
    let got = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    let want = naive(&v, &p, &w, f64::from(scale));
    assert_close(&got, &want, &format!("{} {c:?}", v.name));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn reference_equals_naive_dense_attention(c in arb_case()) {
        if c.bf16 { check_case::<bf16>(&c) } else { check_case::<f16>(&c) }
    }
}

/// A one-request, one-head cache built by hand: keys and values given per position.
fn tiny(variant: &str, params: &[(&str, ParamInput)], q: &[f32], keys: &[[f32; 2]], vals: &[[f32; 2]]) -> AttnOutput {
    let v = shipped::resolve(variant).unwrap();
    let spec = WorkloadSpec {
        lens: vec![(q.len() / 2, keys.len())],
        qo_heads: 1,
        kv_heads: 1,
        head_dim_qk: 2,
        head_dim_vo: 2,
        page_size: 2,
        layout: KvLayout::Nhd,
        interleaved: false,
        permute: false,
        spare_pages: 0,
    };
    let mut w = Workload::<f32>::random(&spec, &mut StdRng::seed_from_u64(0)).unwrap();
    w.q = q.to_vec();
    for (pos, (k, val)) in keys.iter().zip(vals).enumerate() {
        let (page, slot) = (pos / 2, pos % 2);
        w.k[w.kv.k_index(page, slot, 0)..][..2].copy_from_slice(k);
        w.v[w.kv.v_index(page, slot, 0)..][..2].copy_from_slice(val);
    }
    let given: HashMap<String, ParamInput> = params.iter().map(|(k, x)| (k.to_string(), x.clone())).collect();
    let p = v.bind(&given, Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    attention(&v, &p, &w.batch(), &w.q, &w.k, &w.v, Some(1.0)).unwrap()
}

#[test]
fn softmax_of_two_keys_by_hand() {
    // Scores 1 and 3 (scale 1): weights e/(e+e^3), e^3/(e+e^3).
    let out = tiny("default", &[], &[1.0, 0.0], &[[1.0, 0.0], [3.0, 0.0]], &[[1.0, 0.0], [0.0, 2.0]]);
    let (e1, e3) = (1f64.exp(), 3f64.exp());
    assert!((out.o[0] as f64 - e1 / (e1 + e3)).abs() < 1e-6);
    assert!((out.o[1] as f64 - 2.0 * e3 / (e1 + e3)).abs() < 1e-6);
    assert!((out.lse[0] as f64 - (e1 + e3).ln()).abs() < 1e-6);
}

#[test]
fn a_sink_joins_the_denominator_only() {
    let s = 2.0f64;
    let out = tiny("sink", &[("sinks", ParamInput::Scalar(s))], &[1.0, 0.0], &[[1.0, 0.0], [3.0, 0.0]], &[[1.0, 0.0], [0.0, 2.0]]);
    let (e1, e3, es) = (1f64.exp(), 3f64.exp(), s.exp());
    assert!((out.o[0] as f64 - e1 / (e1 + e3 + es)).abs() < 1e-6);
    assert!((out.o[1] as f64 - 2.0 * e3 / (e1 + e3 + es)).abs() < 1e-6);
    assert!((out.lse[0] as f64 - (e1 + e3 + es).ln()).abs() < 1e-6);
}

#[test]
fn normalize_none_sums_sigmoid_weights() {
    let out = tiny("sigmoid", &[("bias", ParamInput::Scalar(-1.0))], &[1.0, 0.0], &[[1.0, 0.0], [3.0, 0.0]], &[[1.0, 0.0], [0.0, 2.0]]);
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!((out.o[0] as f64 - sig(0.0)).abs() < 1e-6);
    assert!((out.o[1] as f64 - 2.0 * sig(2.0)).abs() < 1e-6);
    assert_eq!(out.lse[0], 0.0);
}

#[test]
fn fully_masked_rows_give_zero_and_minus_infinity_not_nan() {
    // Two queries over two keys: the first query sits at position 0 and a window of 1 shows it
    // only key 0; with q_len > kv_len the extra query sits at a negative position, sees nothing.
    let out = tiny("sliding_window", &[("window", ParamInput::Scalar(1.0))], &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], &[[1.0, 0.0], [3.0, 0.0]], &[[1.0, 0.0], [0.0, 2.0]]);
    assert_eq!(&out.o[0..2], &[0.0, 0.0]);
    assert_eq!(out.lse[0], f32::NEG_INFINITY);
    assert_eq!(&out.o[2..4], &[1.0, 0.0]);
    assert!((out.lse[1] - 1.0).abs() < 1e-6);
    // Empty KV with a sink: still no visible key, so 0 and -inf.
    let out = tiny("sink", &[("sinks", ParamInput::Scalar(3.0))], &[1.0, 0.0], &[], &[]);
    assert_eq!((out.o[0], out.o[1], out.lse[0]), (0.0, 0.0, f32::NEG_INFINITY));
    // Visible keys whose logits are all -inf count as none, sink or not (regression: the
    // reference once returned lse = sink here while the kernels return -inf).
    let v = attnforge::spec::load("t.json", r#"{ "name": "t", "params": { "s": "f32" }, "logits": "log(score * 0.0)", "sink": "s" }"#).unwrap();
    let spec = WorkloadSpec { lens: vec![(1, 3)], qo_heads: 1, kv_heads: 1, head_dim_qk: 16, head_dim_vo: 16, page_size: 2, layout: KvLayout::Nhd, interleaved: true, permute: false, spare_pages: 0 };
    let w = Workload::<f32>::random(&spec, &mut StdRng::seed_from_u64(4)).unwrap();
    let p = v.bind(&[("s".to_string(), ParamInput::Scalar(2.0))].into(), Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    let out = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    assert_eq!(out.lse[0], f32::NEG_INFINITY);
    assert!(out.o.iter().all(|x| *x == 0.0));
}

#[test]
fn mismatched_parameters_are_an_error_not_a_wrong_index() {
    let v = shipped::resolve("alibi").unwrap();
    let spec = WorkloadSpec {
        lens: vec![(1, 5)],
        qo_heads: 4,
        kv_heads: 2,
        head_dim_qk: 16,
        head_dim_vo: 16,
        page_size: 4,
        layout: KvLayout::Nhd,
        interleaved: true,
        permute: true,
        spare_pages: 0,
    };
    let w = Workload::<f16>::random(&spec, &mut StdRng::seed_from_u64(1)).unwrap();
    let p = sample(&v.params, Dims { qo_heads: 8, kv_heads: 2, batch: 1 }, &[(1, 5)], |lo, _| lo);
    let err = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap_err();
    assert!(err.to_string().contains("`slopes` has 8 values, expected 4"), "{err}");
}

#[test]
fn a_tree_mask_shows_exactly_its_bits() {
    // One request, 2 queries over 3 keys; row-major bits 101 / 011, packed little-endian from
    // bit offset 3: bits 3..9 of [0b1010_1000, 0b0000_0001] = 1,0,1, 0,1,1.
    let v = shipped::resolve("tree_mask").unwrap();
    let spec = WorkloadSpec { lens: vec![(2, 3)], qo_heads: 1, kv_heads: 1, head_dim_qk: 16, head_dim_vo: 16, page_size: 2, layout: KvLayout::Nhd, interleaved: true, permute: false, spare_pages: 0 };
    let w = Workload::<f32>::random(&spec, &mut StdRng::seed_from_u64(3)).unwrap();
    let given: HashMap<String, ParamInput> = [("tree".to_string(), ParamInput::Bits(vec![0b1010_1000, 0b0000_0001], vec![3]))].into();
    let p = v.bind(&given, Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    let got = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    // Expected: softmax over keys {0, 2} for query 0 and {1, 2} for query 1.
    let kv = w.kv;
    for (row, keys) in [(0usize, [0usize, 2]), (1, [1, 2])] {
        let score = |j: usize| (0..16).map(|d| f64::from(w.q[row * 16 + d]) * f64::from(w.k[kv.k_index(j / 2, j % 2, 0) + d])).sum::<f64>() * 0.25;
        let (s0, s1) = (score(keys[0]), score(keys[1]));
        let m = s0.max(s1);
        let (e0, e1) = ((s0 - m).exp(), (s1 - m).exp());
        for d in 0..16 {
            let want = (e0 * f64::from(w.k[kv.v_index(keys[0] / 2, keys[0] % 2, 0) + d]) + e1 * f64::from(w.k[kv.v_index(keys[1] / 2, keys[1] % 2, 0) + d])) / (e0 + e1);
            assert!((f64::from(got.o[row * 16 + d]) - want).abs() < 1e-5, "row {row} dim {d}");
        }
    }
    // Too few bits for the batch is an error, not a read past the end.
    let short: HashMap<String, ParamInput> = [("tree".to_string(), ParamInput::Bits(vec![0xff], vec![3]))].into();
    let p = v.bind(&short, Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    let err = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap_err();
    assert!(err.to_string().contains("needs bits [3, 3 + 2 × 3) but 8 bits were given"), "{err}");
}

/// Regression (hardening audit, item 9): NaN logits (here `sqrt` of a negative) were reported
/// as "fully masked" (o = 0, lse = -inf), because the row max skipped them. A visible NaN logit
/// makes its softmax row NaN; rows without one are untouched.
#[test]
fn a_nan_logit_makes_its_row_nan_not_fully_masked() {
    let v = attnforge::spec::load("t.json", r#"{ "name": "t", "logits": "select(q_pos == 2 && kv_pos == 0, sqrt(-1.0), score * sm_scale)" }"#).unwrap();
    let spec = WorkloadSpec { lens: vec![(3, 3)], qo_heads: 1, kv_heads: 1, head_dim_qk: 16, head_dim_vo: 16, page_size: 2, layout: KvLayout::Nhd, interleaved: true, permute: false, spare_pages: 0 };
    let w = Workload::<f32>::random(&spec, &mut StdRng::seed_from_u64(5)).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    let out = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    assert!(out.lse[2].is_nan() && out.o[32..48].iter().all(|x| x.is_nan()), "{:?}", &out.lse);
    assert!(out.lse[..2].iter().all(|x| x.is_finite()) && out.o[..32].iter().all(|x| x.is_finite()));
    // Every logit NaN: every row NaN, none "fully masked".
    let v = attnforge::spec::load("t.json", r#"{ "name": "t", "logits": "sqrt(-1.0 - abs(score))" }"#).unwrap();
    let out = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap();
    assert!(out.lse.iter().all(|x| x.is_nan()), "{:?}", out.lse);
}

/// Regression (hardening audit, item 9): `--sm-scale nan|inf|0|-1` was accepted on the CPU path
/// (NaN gave "128 fully masked rows" and exit 0). The reference refuses what the kernels refuse.
#[test]
fn the_softmax_scale_must_be_positive_and_finite() {
    let v = shipped::resolve("causal").unwrap();
    let spec = WorkloadSpec { lens: vec![(2, 5)], qo_heads: 2, kv_heads: 1, head_dim_qk: 16, head_dim_vo: 16, page_size: 4, layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 0 };
    let w = Workload::<f32>::random(&spec, &mut StdRng::seed_from_u64(6)).unwrap();
    let p = v.bind(&HashMap::new(), Dims { qo_heads: 2, kv_heads: 1, batch: 1 }).unwrap();
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, -1.0] {
        let e = attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), Some(s)).unwrap_err();
        assert!(e.to_string().contains("must be positive and finite"), "{s}: {e}");
    }
    attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), Some(1e-30)).unwrap();
}

/// The GPU check treats a NaN row as agreement only where the reference is NaN too (a NaN
/// logit): a NaN against a number, either way round, is a mismatch.
#[test]
fn compare_accepts_nan_only_where_the_reference_is_nan() {
    use attnforge::testing::harness::compare;
    use attnforge::kv::DType;
    let want = AttnOutput { o: vec![1.0, 2.0, f32::NAN, f32::NAN], lse: vec![0.5, f32::NAN] };
    let c = compare(&want.clone(), &want, DType::Bf16, 2);
    assert!(c.ok() && c.max_err == 0.0 && c.rel_l2 == 0.0, "{c}");
    let got = AttnOutput { o: vec![f32::NAN, 2.0, f32::NAN, f32::NAN], lse: vec![0.5, f32::NAN] };
    assert_eq!(compare(&got, &want, DType::Bf16, 2).bad, 1);
    let got = AttnOutput { o: vec![1.0, 2.0, 0.0, 0.0], lse: vec![0.5, f32::NEG_INFINITY] };
    let c = compare(&got, &want, DType::Bf16, 2);
    assert!(c.bad == 2 && c.bad_lse == 1, "{c}");
}
