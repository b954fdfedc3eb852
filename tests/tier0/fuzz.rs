//! A typed spec fuzzer: random well-typed specs with random parameter ranges (inside, at and far
//! beyond their types' limits) through everything a user's spec meets before the GPU — load,
//! the kv_range soundness check, the mask proof, rendering for both ops, the CPU reference.
//! Nothing may panic (overflow checks are on in the profile the tests use), and every "implied"
//! answer is brute-forced at parameter values at the ends of their ranges.

#[path = "../support/gen.rs"]
mod gen;

use std::collections::HashMap;

use attnforge::jit::{render::render, KernelConfig};
use attnforge::kv::{DType, KvLayout};
use attnforge::reference::attention;
use attnforge::spec::eval::{eval, Env};
use attnforge::spec::params::{Dims, ParamInput};
use attnforge::testing::workload::{Workload, WorkloadSpec};
use proptest::prelude::{any, prop_assert, proptest, ProptestConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A declaration with a random range: none, ordinary, at the type's ends, or far beyond them.
fn decl(rng: &mut StdRng, ty: &str) -> serde_json::Value {
    let ints = [None, Some((1.0, 1000.0)), Some((-5.0, -1.0)), Some((-1e30, 1e30)), Some((0.0, 2147483647.0)), Some((-2147483648.0, 2147483647.0)), Some((0.0, 0.0))];
    let floats = [None, Some((0.001, 1e6)), Some((-1e30, 1e30)), Some((-1e300, 1e300)), Some((-1.0, 1.0)), Some((0.0, 0.0))];
    let range = if ty.starts_with("i32") { ints[rng.random_range(0..ints.len())] } else { floats[rng.random_range(0..floats.len())] };
    match range {
        None => ty.into(),
        Some((lo, hi)) => serde_json::json!({ "type": ty, "range": [lo, hi] }),
    }
}

fn random_spec(rng: &mut StdRng) -> String {
    let all_i = ["q_pos", "kv_pos", "qo_head", "kv_head", "req", "q_len", "kv_len", "w", "pre"];
    let range_i = ["q_pos", "kv_head", "req", "q_len", "kv_len", "w", "pre"];
    let mut spec = serde_json::json!({
        "name": "fuzz",
        "params": { "w": decl(rng, "i32"), "s": decl(rng, "f32"), "sl": decl(rng, "f32[qo_heads]"), "pre": decl(rng, "i32[batch]"), "kh": decl(rng, "f32[kv_heads]") },
        "logits": gen::gen(rng, 'f', 4, &all_i, &["score", "sm_scale", "s", "sl", "kh"]),
    });
    let o = spec.as_object_mut().unwrap();
    if rng.random_bool(0.8) {
        o.insert("mask".into(), gen::gen(rng, 'b', 3, &all_i, &["sm_scale", "s", "sl"]).into());
    }
    if rng.random_bool(0.7) {
        let (lo, hi) = (gen::gen(rng, 'i', 2, &range_i, &[]), gen::gen(rng, 'i', 2, &range_i, &[]));
        let mut r = serde_json::Map::new();
        r.insert("hi".into(), hi.clone().into());
        if rng.random_bool(0.5) {
            r.insert("lo".into(), lo.clone().into());
        }
        // Often a mask spelled from the range's own bounds (shifted by a term on both sides, so
        // it equals them mathematically but may wrap differently): the prover's territory.
        if rng.random_bool(0.5) {
            let t = gen::gen(rng, 'i', 1, &range_i, &[]);
            let mut m = format!("kv_pos + {t} <= {hi} + {t}");
            if r.contains_key("lo") && rng.random_bool(0.5) {
                m = format!("{m} && kv_pos - {t} >= {lo} - {t}");
            }
            o.insert("mask".into(), m.into());
        }
        o.insert("kv_range".into(), r.into());
    }
    if rng.random_bool(0.3) {
        o.insert("sink".into(), gen::gen(rng, 'f', 2, &["q_pos", "qo_head", "req"], &["s", "sl"]).into());
    } else if rng.random_bool(0.2) {
        o.insert("normalize".into(), "none".into());
    }
    spec.to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_specs_never_panic_and_claims_hold(seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let text = random_spec(&mut rng);
        // The generator is well typed, but a declared range may hold no value (an error, fine).
        let Ok(v) = attnforge::spec::load("fuzz.json", &text) else { return Ok(()) };
        let _ = attnforge::spec::soundness::check_kv_range_within(&v, 20, seed, 2_000_000);
        for cfg in [KernelConfig::decode(64, 64, DType::Bf16, 2).unwrap(), KernelConfig::prefill(64, 64, DType::F16, 2).unwrap()] {
            render(&v, &cfg).unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
        // The CPU reference on a small ragged batch with sampled parameters.
        let spec = WorkloadSpec {
            lens: vec![(rng.random_range(0..4), rng.random_range(0..40)), (1, rng.random_range(0..40))],
            qo_heads: 4, kv_heads: 2, head_dim_qk: 16, head_dim_vo: 16, page_size: [1, 3, 16][rng.random_range(0..3)],
            layout: KvLayout::Nhd, interleaved: true, permute: true, spare_pages: 1,
        };
        let w = Workload::<f32>::random(&spec, &mut rng).unwrap();
        let dims = Dims { qo_heads: 4, kv_heads: 2, batch: 2 };
        let p = attnforge::spec::params::sample(&v.params, dims, &spec.lens, |lo, hi| if lo >= hi { lo } else { rng.random_range(lo..=hi) });
        attention(&v, &p, &w.batch(), &w.q, &w.k, w.v(), None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Every claimed implication, at parameter values at the ends of `w`'s range.
        if !attnforge::spec::implied::mask_implied_by_range(&v) {
            return Ok(());
        }
        let (mask, range) = (v.mask.as_ref().unwrap(), v.kv_range.as_ref().unwrap());
        let w_decl = v.params.iter().find(|d| d.name == "w").unwrap();
        let (lo, hi) = w_decl.range.unwrap_or((i32::MIN as f64, i32::MAX as f64));
        let (lo, hi) = (lo.max(i32::MIN as f64).ceil(), hi.min(i32::MAX as f64).floor());
        for wv in [lo, hi, (lo + hi) / 2.0] {
            let mut given: HashMap<String, ParamInput> = HashMap::new();
            given.insert("w".into(), ParamInput::Scalar(wv.round().clamp(lo, hi)));
            // `pre` (i32[batch]) at the low end of its range; the f32 parameters at their defaults
            // (none) are bound from their ranges' low ends too.
            for d in v.params.iter().filter(|d| d.name != "w") {
                let (a, _) = d.range.unwrap_or((0.0, 0.0));
                let x = if d.ty.elem == attnforge::spec::typed::Ty::I32 { a.max(i32::MIN as f64).ceil() } else { a.max(-(f32::MAX as f64)) };
                given.insert(d.name.clone(), ParamInput::Scalar(x));
            }
            let Ok(params) = v.bind(&given, Dims { qo_heads: 4, kv_heads: 2, batch: 1 }) else { continue };
            for (kv_len, q_len) in [(1, 1), (17, 3), (1 << 30, 1), (1 << 30, 1 << 30)] {
                for i in [0, q_len - 1] {
                    let mut env = Env { score: 0.0f64, sm_scale: 0.1, q_pos: kv_len - q_len + i, kv_pos: 0, qo_head: 1, kv_head: 0, req: 0, q_len, kv_len, params: &params };
                    let l = range.lo.as_ref().map_or(0, |h| eval(&h.typed, &env).as_i()).max(0);
                    let h = range.hi.as_ref().map_or(kv_len - 1, |h| eval(&h.typed, &env).as_i()).min(kv_len - 1);
                    if l > h {
                        continue;
                    }
                    for kv_pos in [l, h, l + (h - l) / 2] {
                        env.kv_pos = kv_pos;
                        prop_assert!(eval(&mask.typed, &env).as_b(), "claimed implied, but kv_pos {kv_pos} in [{l}, {h}] fails (w {wv}, kv_len {kv_len}):\n{text}");
                    }
                }
            }
        }
    }
}
