//! The logits hook's factoring (`spec::factor`): which hooks factor, the proof that the unit is
//! positive (a unit the kernels fold into the exponent while keeping the row max in raw units),
//! and `unit · raw == logits` up to reassociation, on random products of uniform and per-score
//! factors.

#[path = "../support/gen.rs"]
mod gen;

use std::collections::HashMap;

use attnforge::spec::cuda::emit;
use attnforge::spec::eval::{eval, Env};
use attnforge::spec::factor::{factor_logits, raw_bounds};
use attnforge::spec::params::{Dims, ParamInput, SM_SCALE_RANGE};
use attnforge::spec::{shipped, Variant};
use proptest::prelude::{any, prop_assert, proptest, ProptestConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn factored(v: &Variant) -> Option<(String, String)> {
    factor_logits(&v.logits.typed, &v.params).map(|f| (emit(&f.unit, &v.params), emit(&f.raw, &v.params)))
}

/// The shipped variants: the plain scale and the soft cap factor (the soft cap's argument
/// regrouped so its uniform part is one value); sums, per-head slopes and sigmoids do not.
#[test]
fn shipped_hooks_factor_where_a_positive_uniform_factor_exists() {
    let f = |name: &str| factored(&shipped::resolve(name).unwrap());
    for name in ["default", "causal", "sliding_window", "chunked", "prefix_lm", "tree_mask"] {
        assert_eq!(f(name), Some(("sm_scale".into(), "score".into())), "{name}");
    }
    for name in ["soft_cap", "gemma2"] {
        assert_eq!(f(name), Some(("p.u_soft_cap".into(), "tanhf((score * (sm_scale / p.u_soft_cap)))".into())), "{name}");
    }
    assert_eq!(f("alibi"), None, "a sum has no common factor");
    // Rendered: prefill folds the unit (softmax only); decode evaluates the hook whole.
    use attnforge::jit::{render::render, KernelConfig};
    use attnforge::kv::DType;
    let prefill = KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap();
    let code = |name: &str, cfg: &KernelConfig| render(&shipped::resolve(name).unwrap(), cfg).unwrap().code;
    let sc = code("soft_cap", &prefill);
    assert!(sc.contains("#define LOGITS_FACTORED 1") && sc.contains("return tanhf((score * (sm_scale / p.u_soft_cap)));"));
    assert!(code("soft_cap", &prefill.sm90_prefill().unwrap()).contains("#define LOGITS_FACTORED 1"));
    for name in ["sigmoid", "alibi"] {
        assert!(code(name, &prefill).contains("#define LOGITS_FACTORED 0"), "{name}");
    }
    assert!(code("soft_cap", &KernelConfig::decode(128, 128, DType::Bf16, 4).unwrap()).contains("#define LOGITS_FACTORED 0"));
}

fn spec(logits: &str, params: &str) -> Variant {
    attnforge::spec::load("t.json", &format!(r#"{{"name": "t", "params": {{{params}}}, "logits": "{logits}"}}"#)).unwrap_or_else(|e| panic!("{logits}: {e}"))
}

/// The proof refuses every factor whose sign or bounds are not known: a range that reaches 0 or
/// below, no range, an array parameter, a negative or zero literal, an integer parameter, and a
/// product whose bounds leave [1e-35, 1e35].
#[test]
fn the_unit_is_only_taken_where_it_is_proven_positive_and_finite() {
    let p = r#""a": {"type": "f32", "range": [0.5, 4.0]}, "z": {"type": "f32", "range": [0.0, 4.0]}, "n": {"type": "f32", "range": [-2.0, -1.0]},
              "u": {"type": "f32"}, "h": {"type": "f32[qo_heads]", "range": [1.0, 2.0]}, "i": {"type": "i32", "range": [1, 9]},
              "t": {"type": "f32", "range": [1e-20, 1e-10]}"#;
    let unit = |logits: &str| factored(&spec(logits, p)).map(|(u, _)| u);
    assert_eq!(unit("a * tanh(score)"), Some("p.u_a".into()));
    assert_eq!(unit("score / a"), Some("(1.0f / p.u_a)".into()));
    assert_eq!(unit("2.0 * a * score * sm_scale"), Some("((2.0f * p.u_a) * sm_scale)".into()));
    for refused in ["z * score", "n * score", "u * score", "h * score", "float(i) * score", "-2.0 * score", "0.0 * score", "score / z"] {
        assert_eq!(unit(refused), None, "{refused}");
    }
    // The sign-unknown factors stay in the raw part.
    assert_eq!(factored(&spec("u * score * a", p)), Some(("p.u_a".into(), "(p.u_u * score)".into())));
    // t · t · t reaches 1e-60: no proof it stays a normal f32 (sm_scale · t: 8e-51, neither).
    assert_eq!(unit("t * t * t * score"), None);
    assert_eq!(unit("sm_scale * t * score"), None);
    assert_eq!(unit("t * score"), Some("p.u_t".into()));
}

/// The raw part's bounds (the prefill loops' fixed max): proven for the soft caps (tanh, widened
/// for its approximation), for sigmoids and bounded arithmetic on ranged parameters; refused
/// wherever a score, a position, an unranged or array parameter, or a divisor that may be 0
/// reaches the value unbounded. Rendered into the prefill source as LOGITS_RAW_BOUNDED.
#[test]
fn raw_bounds_are_proven_only_for_bounded_hooks() {
    let bounds = |name: &str| factor_logits(&shipped::resolve(name).unwrap().logits.typed, &shipped::resolve(name).unwrap().params).and_then(|f| f.raw_bounds);
    for name in ["soft_cap", "gemma2"] {
        let (lo, hi) = bounds(name).unwrap_or_else(|| panic!("{name}: no bounds"));
        assert!((-1.01..=-1.0).contains(&lo) && (1.0..=1.01).contains(&hi), "{name}: [{lo}, {hi}]");
    }
    for name in ["default", "causal", "sliding_window", "chunked", "prefix_lm", "tree_mask"] {
        assert_eq!(bounds(name), None, "{name}: the score is unbounded");
    }
    let p = r#""a": {"type": "f32", "range": [0.5, 4.0]}, "b": {"type": "f32", "range": [-2.0, 3.0]}, "u": {"type": "f32"}, "h": {"type": "f32[qo_heads]", "range": [1.0, 2.0]}"#;
    let of = |logits: &str| {
        let v = spec(logits, p);
        raw_bounds(&v.logits.typed, &v.params)
    };
    let near = |got: Option<(f64, f64)>, lo: f64, hi: f64| got.is_some_and(|(l, h)| l <= lo && h >= hi && l > lo - 0.01 && h < hi + 0.01);
    assert!(near(of("tanh(score)"), -1.0, 1.0));
    assert!(near(of("sigmoid(score * sm_scale)"), 0.0, 1.0));
    assert!(near(of("a * tanh(score / a) + b"), -6.0, 7.0), "{:?}", of("a * tanh(score / a) + b"));
    // A NaN score makes fmaxf / fminf return the other operand: the hull, not [max, max].
    assert!(near(of("max(tanh(score), -0.5)"), -1.0, 1.0));
    assert!(near(of("min(tanh(score), 5.0)"), -1.0, 5.0));
    assert!(near(of("select(kv_pos < q_pos, tanh(score), 2.0)"), -1.0, 2.0));
    assert!(near(of("-sigmoid(score)"), -1.0, 0.0));
    // Bounds past 2^64 (here from a declared range of ±1e30) are refused: the kernels evaluate in f32.
    let wide = spec("tanh(score) + c", r#""c": {"type": "f32", "range": [-1e30, 1e30]}"#);
    assert_eq!(raw_bounds(&wide.logits.typed, &wide.params), None);
    for refused in ["score", "tanh(score) * score", "u * tanh(score)", "h * tanh(score)", "tanh(score) / b", "float(q_pos) * tanh(score)", "exp(score)", "min(score, 1.0)"] {
        assert_eq!(of(refused), None, "{refused}");
    }
    use attnforge::jit::{render::render, KernelConfig};
    use attnforge::kv::DType;
    let prefill = KernelConfig::prefill(128, 128, DType::Bf16, 4).unwrap().sm90_prefill().unwrap();
    let code = |name: &str| render(&shipped::resolve(name).unwrap(), &prefill).unwrap().code;
    let sc = code("soft_cap");
    assert!(sc.contains("#define LOGITS_RAW_BOUNDED 1") && sc.contains("#define LOGITS_RAW_HI 1.001e0f"), "soft cap: bounds rendered");
    assert!(code("causal").contains("#define LOGITS_RAW_BOUNDED 0"));
}

/// Binds every parameter of `v` to a value of its range (`pick` in [0, 1] along it).
fn bind(v: &Variant, pick: &mut dyn FnMut() -> f64) -> attnforge::spec::params::ParamValues {
    let mut given = HashMap::new();
    for d in &v.params {
        let (lo, hi) = d.range.unwrap_or((-3.0, 3.0));
        let x = lo + (hi - lo) * pick();
        given.insert(d.name.clone(), ParamInput::Scalar(if d.ty.elem == attnforge::spec::typed::Ty::I32 { x.round() } else { x }));
    }
    v.bind(&given, Dims { qo_heads: 2, kv_heads: 1, batch: 1 }).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]
    /// Random products and quotients of uniform factors (positive, sign-unknown and ranged
    /// parameters, literals, `sm_scale`) and per-score ones (`score`, positions, `tanh` of
    /// products): where a hook factors, its unit is > 0 at every corner of the parameters'
    /// ranges and at sm_scale's bounds, and `unit · raw` equals the hook (f64, relative 1e-9).
    #[test]
    fn factoring_keeps_the_logits_and_proves_the_unit(seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let params = r#""a": {"type": "f32", "range": [0.25, 8.0]}, "b": {"type": "f32", "range": [-2.0, 3.0]}, "c": {"type": "f32", "range": [1.0, 1000.0]}, "w": {"type": "i32", "range": [1, 64]}"#;
        let uniform = ["a", "b", "c", "sm_scale", "2.5", "-0.5"];
        let per_score = ["score", "float(q_pos - kv_pos)", "tanh(score * sm_scale / c)", "(score + a)", "float(w) * score"];
        let n = rng.random_range(1..6);
        let mut logits = String::new();
        for k in 0..n {
            let f = if rng.random_bool(0.5) { uniform[rng.random_range(0..uniform.len())].to_string() } else if rng.random_bool(0.2) {
                format!("tanh({})", gen::gen(&mut rng, 'f', 2, &["q_pos", "kv_pos", "w"], &["score", "a", "sm_scale"]))
            } else {
                per_score[rng.random_range(0..per_score.len())].to_string()
            };
            if k > 0 {
                logits.push_str(if rng.random_bool(0.3) { " / " } else { " * " });
            }
            logits.push_str(&f);
        }
        let v = spec(&logits, params);
        let Some(fac) = factor_logits(&v.logits.typed, &v.params) else { return Ok(()) };
        // The unit at the corners of every parameter's range and at sm_scale's ends.
        for corner in 0..16u32 {
            let mut bits = (0..).map(move |i| f64::from((corner >> (i % 4)) & 1));
            let pv = bind(&v, &mut || bits.next().unwrap());
            for sm in [f64::from(SM_SCALE_RANGE.0), 0.125, f64::from(SM_SCALE_RANGE.1)] {
                let env = Env { score: 0.0f64, sm_scale: sm, q_pos: 0, kv_pos: 0, qo_head: 0, kv_head: 0, req: 0, q_len: 1, kv_len: 1, params: &pv };
                let u = eval(&fac.unit, &env).as_f();
                prop_assert!(u > 0.0 && u.is_finite(), "{logits}: unit {u} at corner {corner}, sm_scale {sm}");
            }
        }
        // unit · raw = logits at random points.
        for _ in 0..16 {
            let pv = bind(&v, &mut || rng.random_range(0.0..=1.0));
            let (kv_len, q_len) = (rng.random_range(1..100), 1);
            let env = Env { score: rng.random_range(-20.0f64..20.0), sm_scale: rng.random_range(0.01..1.0), q_pos: kv_len - 1, kv_pos: rng.random_range(0..kv_len), qo_head: 0, kv_head: 0, req: 0, q_len, kv_len, params: &pv };
            let (want, got): (f64, f64) = (eval(&v.logits.typed, &env).as_f(), eval(&fac.unit, &env).as_f() * eval(&fac.raw, &env).as_f());
            if want.is_finite() {
                prop_assert!((got - want).abs() <= 1e-9 * want.abs().max(1e-3), "{logits}: unit · raw {got}, logits {want}");
            }
        }
    }
}

const BOUND_PARAMS: &str = r#""a": {"type": "f32", "range": [0.25, 8.0]}, "b": {"type": "f32", "range": [-2.0, 3.0]}, "w": {"type": "i32", "range": [1, 64]}"#;

/// A random hook for the bounds' property: random expressions (gen.rs) alone, under `tanh`,
/// negated, and in differences, `min` / `max` and `select`s with bounded or unbounded sides.
fn random_hook(rng: &mut StdRng) -> String {
    let mut body = || gen::gen(rng, 'f', 3, &["q_pos", "kv_pos", "w"], &["score", "a", "b", "sm_scale"]);
    let (x, y) = (body(), body());
    match rng.random_range(0..7) {
        0 => x,
        1 => format!("tanh({x})"),
        2 => format!("-(sigmoid({x}) * {y})"),
        3 => format!("(tanh({x}) - {y})"),
        4 => format!("min(tanh({x}), {y})"),
        5 => format!("max(a * tanh({x}), {y})"),
        _ => format!("select(kv_pos < q_pos, tanh({x}), {y})"),
    }
}

/// The property below is not vacuous: a good share of the random hooks get bounds, and a good
/// share are refused.
#[test]
fn random_hooks_are_often_bounded_and_often_not() {
    let mut rng = StdRng::seed_from_u64(7);
    let bounded = (0..400)
        .filter(|_| {
            let v = spec(&random_hook(&mut rng), BOUND_PARAMS);
            raw_bounds(&v.logits.typed, &v.params).is_some()
        })
        .count();
    assert!((80..=320).contains(&bounded), "{bounded} of 400 random hooks bounded");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    /// Random hooks over scores, positions and ranged or unranged parameters: wherever bounds are
    /// proven, the hook's value (the f64 reference evaluator) lies inside them at random points —
    /// scores finite, huge and infinite, parameters anywhere in their ranges — or is NaN.
    #[test]
    fn proven_raw_bounds_hold_at_every_point(seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let logits = random_hook(&mut rng);
        let v = spec(&logits, BOUND_PARAMS);
        let Some((lo, hi)) = raw_bounds(&v.logits.typed, &v.params) else { return Ok(()) };
        for _ in 0..32 {
            let pv = bind(&v, &mut || rng.random_range(0.0..=1.0));
            let score = match rng.random_range(0..6) {
                0 => f64::INFINITY,
                1 => f64::NEG_INFINITY,
                2 => f64::NAN,
                3 => rng.random_range(-1e30..1e30),
                _ => rng.random_range(-50.0..50.0),
            };
            let kv_len = rng.random_range(1..100);
            // sm_scale log-uniform over its range.
            let sm_scale = f64::from(SM_SCALE_RANGE.0) * (f64::from(SM_SCALE_RANGE.1) / f64::from(SM_SCALE_RANGE.0)).powf(rng.random_range(0.0..=1.0));
            let env = Env { score, sm_scale, q_pos: kv_len - 1, kv_pos: rng.random_range(0..kv_len), qo_head: 0, kv_head: 0, req: 0, q_len: 1, kv_len, params: &pv };
            let x = eval(&v.logits.typed, &env).as_f();
            prop_assert!(x.is_nan() || (lo..=hi).contains(&x), "{logits}: {x} outside [{lo}, {hi}] at score {score}, sm_scale {sm_scale}");
        }
    }
}
