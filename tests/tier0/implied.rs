//! `spec::implied`: when a mask follows from the kv_range, proven exactly, and confirmed by
//! brute force over sampled shapes for every variant where it is claimed.

use attnforge::spec::eval::{eval, Env};
use attnforge::spec::implied::mask_implied_by_range;
use attnforge::spec::params::{sample, Dims, ParamInput};
use attnforge::spec::{load, shipped};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn spec(mask: &str, lo: Option<&str>, hi: Option<&str>, params: &str) -> attnforge::spec::Variant {
    let mut range = serde_json::Map::new();
    if let Some(lo) = lo {
        range.insert("lo".into(), lo.into());
    }
    if let Some(hi) = hi {
        range.insert("hi".into(), hi.into());
    }
    let text = format!(r#"{{ "name": "t", "params": {{ {params} }}, "mask": {mask:?}, "kv_range": {} }}"#, serde_json::Value::Object(range));
    load("t.json", &text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_variants_whose_mask_is_their_range() {
    for (name, implied) in [
        ("causal", true),
        ("sliding_window", true),
        ("gemma2", true),
        ("soft_cap", true),
        ("sigmoid", true),
        ("sink", true),
        ("alibi", true),
        // `kv_pos / chunk == q_pos / chunk` is not a bound on kv_pos.
        ("chunked", false),
        // A disjunction.
        ("prefix_lm", false),
        // No range.
        ("tree_mask", false),
        // No mask.
        ("default", false),
    ] {
        let v = shipped::resolve(name).expect(name);
        assert_eq!(mask_implied_by_range(&v), implied, "{name}");
    }
}

#[test]
fn bounds_are_matched_exactly() {
    let window = r#""window": { "type": "i32", "range": [1, 1000] }"#;
    let free = r#""window": { "type": "i32" }"#;
    let cases = [
        // Strict against inclusive: off by one.
        ("kv_pos < q_pos", None, Some("q_pos"), "", false),
        ("kv_pos < q_pos", None, Some("q_pos - 1"), "", true),
        ("q_pos > kv_pos", None, Some("q_pos - 1"), "", true),
        ("q_pos >= kv_pos", None, Some("min(q_pos, kv_len)"), "", true),
        ("kv_pos <= q_pos", None, Some("q_pos + 1"), "", false),
        // The same window written three ways.
        ("kv_pos <= q_pos && q_pos - kv_pos < window", Some("q_pos - window + 1"), Some("q_pos"), window, true),
        ("kv_pos <= q_pos && kv_pos >= q_pos + 1 - window", Some("max(q_pos - window + 1, 0)"), Some("q_pos"), window, true),
        ("kv_pos <= q_pos && kv_pos > q_pos - window", Some("q_pos - window"), Some("q_pos"), window, false),
        // Without a declared range, q_pos - window could wrap: no proof.
        ("kv_pos <= q_pos && q_pos - kv_pos < window", Some("q_pos - window + 1"), Some("q_pos"), free, false),
        // kv_pos scaled, or hidden in a product: not a unit bound.
        ("2 * kv_pos <= q_pos", None, Some("q_pos / 2"), "", false),
        ("kv_pos * kv_pos <= q_pos", None, Some("q_pos"), "", false),
        // A bound the range does not state.
        ("kv_pos <= q_pos && kv_pos >= 3", None, Some("q_pos"), "", false),
        ("kv_pos <= q_pos || kv_pos < 4", None, Some("max(q_pos, 3)"), "", false),
    ];
    for (mask, lo, hi, params, want) in cases {
        let v = spec(mask, lo, hi, params);
        assert_eq!(mask_implied_by_range(&v), want, "mask {mask}, lo {lo:?}, hi {hi:?}, params {{{params}}}");
    }
}

/// Wherever the proof says yes, every key inside the range passes the mask.
#[test]
fn a_proven_mask_holds_everywhere_inside_the_range() {
    let mut checked = 0;
    for (name, _) in shipped::SHIPPED {
        let v = shipped::resolve(name).expect(name);
        if !mask_implied_by_range(&v) {
            continue;
        }
        checked += 1;
        let (mask, range) = (v.mask.as_ref().expect("mask"), v.kv_range.as_ref().expect("range"));
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let dims = Dims { qo_heads: 2, kv_heads: 1, batch: 2 };
            let kv_len = rng.random_range(0..=200i32);
            let q_len = rng.random_range(1..=kv_len.clamp(1, 40));
            let lens = vec![(q_len as usize, kv_len as usize); 2];
            let params = sample(&v.params, dims, &lens, |lo, hi| if lo == hi { lo } else { rng.random_range(lo..=hi) });
            for i in 0..q_len {
                let mut env = Env { score: 0.0f64, sm_scale: 0.1, q_pos: kv_len - q_len + i, kv_pos: 0, qo_head: 1, kv_head: 0, req: 1, q_len, kv_len, params: &params };
                let lo = range.lo.as_ref().map_or(0, |h| eval(&h.typed, &env).as_i()).max(0);
                let hi = range.hi.as_ref().map_or(kv_len - 1, |h| eval(&h.typed, &env).as_i()).min(kv_len - 1);
                for kv_pos in lo..=hi {
                    env.kv_pos = kv_pos;
                    assert!(eval(&mask.typed, &env).as_b(), "{name}: q_pos {} kv_pos {kv_pos} inside [{lo}, {hi}] fails the mask", env.q_pos);
                }
            }
        }
    }
    assert!(checked >= 7, "only {checked} shipped variants have a proven mask");
}

#[test]
fn range_bounds_monotone_in_q_pos() {
    use attnforge::spec::implied::nondecreasing_in_q_pos;
    let mono = |name: &str| {
        let v = shipped::resolve(name).unwrap();
        let r = v.kv_range.as_ref().unwrap();
        [&r.lo, &r.hi].map(|h| h.as_ref().map(|h| nondecreasing_in_q_pos(&h.typed, &v.params)))
    };
    assert_eq!(mono("causal"), [None, Some(true)]);
    assert_eq!(mono("sliding_window"), [Some(true), Some(true)]);
    // max(q_pos, prefix_len - 1)
    assert_eq!(mono("prefix_lm"), [None, Some(true)]);
    // q_pos - q_pos % chunk is monotone, but the remainder is not provably so: no claim.
    assert_eq!(mono("chunked"), [Some(false), Some(true)]);
    let w = r#""w": { "type": "i32", "range": [1, 1000] }"#;
    // `q_pos * 2` may wrap (positions reach 2^30): no claim.
    for (hi, want) in [("q_pos / 2", true), ("0 - q_pos", false), ("kv_len - q_pos", false), ("q_pos * 2 - w", false), ("q_pos - w + 1", true), ("min(q_pos, w) + 3", true), ("q_pos * q_pos", false), ("w", true)] {
        let v = spec("kv_pos <= q_pos", None, Some(hi), w);
        let h = &v.kv_range.as_ref().unwrap().hi.as_ref().unwrap().typed;
        assert_eq!(nondecreasing_in_q_pos(h, &v.params), want, "{hi}");
    }
}

mod soundness {
    use super::*;
    use proptest::prelude::*;

    /// A bound on kv_pos in one of several spellings: `kv_pos OP q_pos + c`, its mirror, or
    /// `q_pos - kv_pos OP c`.
    fn atom() -> impl Strategy<Value = String> {
        let op = prop::sample::select(vec!["<", "<=", ">", ">="]);
        (0..3usize, op, -2i32..3).prop_map(|(form, op, c)| match form {
            0 => format!("kv_pos {op} q_pos + {c}"),
            1 => format!("q_pos + {c} {op} kv_pos"),
            _ => format!("q_pos - kv_pos {op} {c}"),
        })
    }

    fn bound() -> impl Strategy<Value = Option<String>> {
        prop::option::of((0..3usize, -2i32..3).prop_map(|(form, c)| match form {
            0 => format!("q_pos + {c}"),
            1 => format!("q_pos - {}", c.abs()),
            _ => format!("max(q_pos + {c}, 0)"),
        }))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Whenever the prover claims the mask follows from the range, no key inside the range
        /// fails the mask (checked exhaustively on small shapes). About 3% of the drawn specs are
        /// claimed (roughly a hundred per run); the rest must simply not be claimed wrongly.
        #[test]
        fn a_claimed_implication_holds(a in atom(), b in prop::option::of(atom()), lo in bound(), hi in bound()) {
            let mask = match &b { Some(b) => format!("{a} && {b}"), None => a.clone() };
            let v = spec(&mask, lo.as_deref(), hi.as_deref(), "");
            if !mask_implied_by_range(&v) {
                return Ok(());
            }
            let (m, r) = (v.mask.as_ref().unwrap(), v.kv_range.as_ref().unwrap());
            let params = attnforge::spec::params::ParamValues::default();
            for kv_len in [1, 5, 17] {
                for q_pos in -2..kv_len + 2 {
                    let mut env = Env { score: 0.0f64, sm_scale: 0.1, q_pos, kv_pos: 0, qo_head: 0, kv_head: 0, req: 0, q_len: 1, kv_len, params: &params };
                    let l = r.lo.as_ref().map_or(0, |h| eval(&h.typed, &env).as_i()).max(0);
                    let h = r.hi.as_ref().map_or(kv_len - 1, |h| eval(&h.typed, &env).as_i()).min(kv_len - 1);
                    for kv_pos in l..=h {
                        env.kv_pos = kv_pos;
                        prop_assert!(eval(&m.typed, &env).as_b(), "mask {mask}, lo {lo:?}, hi {hi:?}: q_pos {q_pos} kv_pos {kv_pos} in [{l}, {h}]");
                    }
                }
            }
        }
    }
}

/// Regression (hardening audit, item 1): an i32 parameter whose declared range exceeds i32 was
/// cast to i64 with saturation, and the interval additions then overflowed, so this mask —
/// which wraps in i32 once `q_pos + w` does — was "proven" to follow from `hi: q_pos`, and the
/// kernels skipped it. The range is now clamped to i32 and the arithmetic is checked.
#[test]
fn a_parameter_range_beyond_i32_does_not_prove_a_mask_that_wraps() {
    let w = r#""w": { "type": "i32", "default": 0, "range": [-1e30, 1e30] }"#;
    let mask = "kv_pos + (q_pos + w) <= q_pos + (q_pos + w)";
    let v = spec(mask, None, Some("q_pos"), w);
    assert!(!mask_implied_by_range(&v));
    // And the reference really disagrees with "implied": at w = 2147483630 and q_pos 10, every
    // key 0..=7 inside the range fails the mask, because q_pos + (q_pos + w) wraps.
    let params = v.bind(&[("w".to_string(), ParamInput::Scalar(2147483630.0))].into(), Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    for kv_pos in 0..=7 {
        let env = Env { score: 0.0f64, sm_scale: 0.1, q_pos: 10, kv_pos, qo_head: 0, kv_head: 0, req: 0, q_len: 1, kv_len: 11, params: &params };
        assert!(!eval(&v.mask.as_ref().unwrap().typed, &env).as_b(), "kv_pos {kv_pos}");
    }
    // A shift by a parameter whose declared range keeps every side inside i32 is still proven;
    // the same shift with the huge range is not.
    let small = r#""w": { "type": "i32", "range": [-1000, 1000] }"#;
    assert!(mask_implied_by_range(&spec("kv_pos + w <= q_pos + w", None, Some("q_pos"), small)));
    assert!(!mask_implied_by_range(&spec("kv_pos + w <= q_pos + w", None, Some("q_pos"), w)));
}

/// Regression (hardening audit, item 1): a quotient was assumed non-negative whenever its
/// dividend was, which is false for a negative divisor: `q_len / w` with `w < 0` reaches −2^30,
/// so `t = q_len / w - 1100000000` can wrap, and the old prover called this mask implied.
#[test]
fn a_quotient_by_a_negative_parameter_may_be_negative() {
    let neg = r#""w": { "type": "i32", "range": [-5, -1] }"#;
    let t = "(q_len / w - 1100000000)";
    let mask = format!("kv_pos + {t} <= kv_len - 1 + {t}");
    let v = spec(&mask, None, Some("kv_len - 1"), neg);
    assert!(!mask_implied_by_range(&v));
    // The wrap is real: q_len = kv_len = 2^30 and w = -1 hide key 0, which is inside the range.
    let params = v.bind(&[("w".to_string(), ParamInput::Scalar(-1.0))].into(), Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    let len = 1 << 30;
    let env = Env { score: 0.0f64, sm_scale: 0.1, q_pos: len - 1, kv_pos: 0, qo_head: 0, kv_head: 0, req: 0, q_len: len, kv_len: len, params: &params };
    assert!(!eval(&v.mask.as_ref().unwrap().typed, &env).as_b());
    // With a positive divisor the quotient is non-negative, nothing wraps, and it is proven.
    let pos = r#""w": { "type": "i32", "range": [1, 5] }"#;
    assert!(mask_implied_by_range(&spec(&mask, None, Some("kv_len - 1"), pos)));
}

/// Regression (hardening audit, item 12): a hook too large to analyse is "not proven", with the
/// reason, instead of being analysed at any cost.
#[test]
fn a_mask_too_large_to_analyse_is_not_proven() {
    use attnforge::spec::implied::{prove_mask_implied, Proof, MAX_PROOF_NODES};
    // `kv_pos <= q_pos + 0 + 0 + …`: the bound is q_pos however long the sum.
    let bound = |zeros: usize| spec(&format!("kv_pos <= q_pos{}", "+0".repeat(zeros)), None, Some("q_pos"), "");
    assert_eq!(prove_mask_implied(&bound(10)), Proof::Proven);
    match prove_mask_implied(&bound(MAX_PROOF_NODES / 2)) {
        Proof::NotProven(why) => assert!(why.contains("nodes"), "{why}"),
        Proof::Proven => panic!("a mask over the node limit was analysed"),
    }
}

/// Random linear masks, ranges and parameter ranges (including ranges beyond i32, ranges with no
/// i32 in them and negative divisors): every "implied" answer is brute-forced at sampled
/// positions up to `MAX_TOKENS` and at parameter values at the ends of their ranges, in the
/// evaluator's wrapping i32 arithmetic (the kernels' semantics). Likewise every "non-decreasing
/// in q_pos" answer.
mod random_linear {
    use super::*;
    use attnforge::kv::MAX_TOKENS;
    use proptest::prelude::{any, prop_assert, proptest, ProptestConfig};

    const RANGES: [Option<(f64, f64)>; 9] = [
        None,
        Some((1.0, 1000.0)),
        Some((-5.0, -1.0)),
        Some((-1e30, 1e30)),
        Some((0.0, 2147483647.0)),
        Some((-2147483648.0, 2147483647.0)),
        Some((2147483000.0, 1e12)),
        Some((1e10, 1e12)),
        Some((-0.5, 0.5)),
    ];

    /// A random integer term over positions, lengths, `w` and literals (some near i32's ends).
    fn term(rng: &mut StdRng, depth: u32) -> String {
        if depth == 0 || rng.random_bool(0.35) {
            return match rng.random_range(0..8) {
                0 | 1 => "q_pos".into(),
                2 => "kv_len".into(),
                3 => "q_len".into(),
                4 | 5 => "w".into(),
                _ => ["0", "1", "3", "7", "1073741824", "2147483647", "(0 - 2147483647 - 1)", "1500000000"][rng.random_range(0..8)].into(),
            };
        }
        let (a, b) = (term(rng, depth - 1), term(rng, depth - 1));
        match rng.random_range(0..9) {
            0 | 1 => format!("({a} + {b})"),
            2 | 3 => format!("({a} - {b})"),
            4 => format!("({a} * {})", ["2", "-1", "3", "w"][rng.random_range(0..4)]),
            5 => format!("({a} / {b})"),
            6 => format!("({a} % {b})"),
            7 => format!("min({a}, {b})"),
            _ => format!("(-{a})"),
        }
    }

    /// An atom bounding kv_pos by `h` (upper) or `l` (lower), in a spelling that equals the bound
    /// mathematically but may wrap differently, sometimes off by one.
    fn atom(rng: &mut StdRng, h: &str, l: &str) -> String {
        let t = term(rng, 2);
        let off = ["", "", "", " + 1", " - 1"][rng.random_range(0..5)];
        match rng.random_range(0..8) {
            0 => format!("kv_pos <= {h}{off}"),
            1 => format!("kv_pos + {t} <= {h} + {t}{off}"),
            2 => format!("kv_pos - {t} < {h} - {t} + 1{off}"),
            3 => format!("{h}{off} >= kv_pos"),
            4 => format!("kv_pos >= {l}{off}"),
            5 => format!("kv_pos + {t} >= {l} + {t}{off}"),
            6 => format!("{l} - {t}{off} <= kv_pos - {t}"),
            _ => format!("kv_pos <= {}", term(rng, 2)),
        }
    }

    /// Parameter values to try: the ends of the range clamped to i32, their neighbours, zero.
    fn w_values(range: Option<(f64, f64)>) -> Vec<f64> {
        let (lo, hi) = range.unwrap_or((i32::MIN as f64, i32::MAX as f64));
        let (lo, hi) = (lo.max(i32::MIN as f64).ceil(), hi.min(i32::MAX as f64).floor());
        [lo, lo + 1.0, hi - 1.0, hi, 0.0, 1.0, -1.0].into_iter().filter(|x| *x >= lo && *x <= hi).collect()
    }

    fn shapes(rng: &mut StdRng) -> Vec<(i32, i32, i32)> {
        let max = MAX_TOKENS as i32;
        let mut out = Vec::new();
        for kv_len in [1, 2, 17, max - 1, max, rng.random_range(1..=max)] {
            for q_len in [1, kv_len, rng.random_range(1..=kv_len), max] {
                for i in [0, q_len - 1, rng.random_range(0..q_len)] {
                    out.push((kv_len, q_len, i));
                }
            }
        }
        out
    }

    fn variant(mask: &str, lo: Option<&str>, hi: Option<&str>, range: Option<(f64, f64)>) -> Option<attnforge::spec::Variant> {
        let w = match range {
            Some((a, b)) => format!(r#""w": {{ "type": "i32", "range": [{a:?}, {b:?}] }}"#),
            None => r#""w": "i32""#.to_string(),
        };
        let mut r = serde_json::Map::new();
        lo.map(|l| r.insert("lo".into(), l.into()));
        hi.map(|h| r.insert("hi".into(), h.into()));
        let text = format!(r#"{{ "name": "t", "params": {{ {w} }}, "mask": {mask:?}, "kv_range": {} }}"#, serde_json::Value::Object(r));
        // Some draws are ill-formed (an i32 range without an i32 in it): nothing to prove then.
        load("t.json", &text).ok()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

        #[test]
        fn claimed_implications_hold_at_the_extremes(seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let range = RANGES[rng.random_range(0..RANGES.len())];
            let (h, l) = (term(&mut rng, 2), term(&mut rng, 2));
            let (hi, lo) = (rng.random_bool(0.85).then(|| h.clone()), rng.random_bool(0.5).then(|| l.clone()));
            let mut mask = atom(&mut rng, &h, &l);
            if rng.random_bool(0.4) {
                mask = format!("{mask} && {}", atom(&mut rng, &h, &l));
            }
            let Some(v) = variant(&mask, lo.as_deref(), hi.as_deref(), range) else { return Ok(()) };
            let r = v.kv_range.as_ref().unwrap();
            let dims = Dims { qo_heads: 1, kv_heads: 1, batch: 1 };
            let implied = mask_implied_by_range(&v);
            let mono: Vec<&attnforge::spec::HookExpr> = [&r.lo, &r.hi].into_iter().flatten().filter(|e| attnforge::spec::implied::nondecreasing_in_q_pos(&e.typed, &v.params)).collect();
            if !implied && mono.is_empty() {
                return Ok(());
            }
            for w in w_values(range) {
                let Ok(params) = v.bind(&[("w".to_string(), ParamInput::Scalar(w))].into(), dims) else { continue };
                for (kv_len, q_len, i) in shapes(&mut rng) {
                    let mut env = Env { score: 0.0f64, sm_scale: 0.1, q_pos: kv_len - q_len + i, kv_pos: 0, qo_head: 0, kv_head: 0, req: 0, q_len, kv_len, params: &params };
                    if implied {
                        let lo_v = r.lo.as_ref().map_or(0, |e| eval(&e.typed, &env).as_i()).max(0);
                        let hi_v = r.hi.as_ref().map_or(kv_len - 1, |e| eval(&e.typed, &env).as_i()).min(kv_len - 1);
                        if lo_v <= hi_v {
                            let mid = rng.random_range(lo_v..=hi_v);
                            for kv_pos in [lo_v, hi_v, mid, lo_v.saturating_add(1).min(hi_v), hi_v.saturating_sub(1).max(lo_v)] {
                                env.kv_pos = kv_pos;
                                prop_assert!(eval(&v.mask.as_ref().unwrap().typed, &env).as_b(),
                                    "claimed implied but fails: mask {mask}, lo {lo:?}, hi {hi:?}, w {w} (range {range:?}), kv_len {kv_len}, q_pos {}, kv_pos {kv_pos}", env.q_pos);
                            }
                        }
                    }
                    // Non-decreasing: the bound at a later query is never below an earlier one.
                    for e in &mono {
                        env.q_pos = kv_len - q_len + i;
                        let a = eval(&e.typed, &env).as_i();
                        let later = rng.random_range(i..q_len);
                        env.q_pos = kv_len - q_len + later;
                        let b = eval(&e.typed, &env).as_i();
                        prop_assert!(a <= b, "claimed non-decreasing but {} at q_pos {} > {} at q_pos {} (w {w})", a, kv_len - q_len + i, b, env.q_pos);
                    }
                }
            }
        }
    }
}
