//! `spec::implied`: when a mask follows from the kv_range, proven exactly, and confirmed by
//! brute force over sampled shapes for every variant where it is claimed.

use attnforge::spec::eval::{eval, Env};
use attnforge::spec::implied::mask_implied_by_range;
use attnforge::spec::params::{sample, Dims};
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
