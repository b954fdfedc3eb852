//! The expression language: round trip, no-panic parsing, and the evaluator against
//! hand-written formulas.

use std::collections::HashMap;

use attnforge::spec::ast::{BinOp, Expr, ExprKind, Lit, Span, UnOp};
use attnforge::spec::eval::{eval, Env, Val};
use attnforge::spec::params::{bind, Dims, ParamDecl, ParamInput, ParamValues};
use attnforge::spec::parser::parse;
use attnforge::spec::typed::{check, Hook, ParamSig, ParamTy, TKind, Ty};
use proptest::prelude::*;

fn node(kind: ExprKind) -> Expr {
    Expr::new(kind, Span::default())
}

fn arb_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(|b| node(ExprKind::Lit(Lit::Bool(b)))),
        (0..=i32::MAX).prop_map(|i| node(ExprKind::Lit(Lit::Int(i)))),
        (0.0f32..3.0e38).prop_map(|x| node(ExprKind::Lit(Lit::Float(x)))),
        "[a-z_][a-z0-9_]{0,6}"
            .prop_filter("literals", |s| s != "true" && s != "false")
            .prop_map(|s| node(ExprKind::Ident(s))),
    ];
    let unop = prop_oneof![Just(UnOp::Neg), Just(UnOp::Not)];
    let binop = prop::sample::select(vec![
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Rem,
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
        BinOp::Eq,
        BinOp::Ne,
        BinOp::And,
        BinOp::Or,
    ]);
    leaf.prop_recursive(5, 48, 4, move |inner| {
        prop_oneof![
            (unop.clone(), inner.clone()).prop_map(|(op, e)| node(ExprKind::Unary(op, Box::new(e)))),
            (binop.clone(), inner.clone(), inner.clone())
                .prop_map(|(op, a, b)| node(ExprKind::Binary(op, Box::new(a), Box::new(b)))),
            ("[a-z][a-z0-9]{0,4}", prop::collection::vec(inner, 0..4))
                .prop_map(|(f, args)| node(ExprKind::Call(f, args))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn printed_ast_reparses_to_the_same_ast(e in arb_expr()) {
        let text = e.to_string();
        let back = parse(&text).map_err(|err| TestCaseError::fail(format!("{text}: {err:?}")))?;
        prop_assert_eq!(back, e, "{}", text);
    }

    #[test]
    fn arbitrary_text_never_panics_the_parser(s in ".{0,200}") {
        let _ = parse(&s);
    }

    #[test]
    fn token_soup_never_panics_the_parser_or_checker(s in "[a-z0-9_ ().,+*/%<>=!&|-]{0,200}") {
        if let Ok(e) = parse(&s) {
            for hook in [Hook::Logits, Hook::Mask, Hook::KvLo, Hook::Sink] {
                let _ = check(&e, hook, &[]);
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics_the_loader(s in ".{0,300}") {
        let _ = attnforge::spec::load("fuzz.json", &s);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for text in ["(".repeat(100_000), "-".repeat(100_000) + "1", "f(".repeat(50_000)] {
        let e = parse(&text).unwrap_err();
        assert!(e.message.contains("nested deeper") || e.message.contains("bytes long"), "{}", e.message);
    }
    let ok = "(".repeat(30) + "1" + &")".repeat(30);
    assert!(parse(&ok).is_ok());
}

/// A context with f32 params `x`, `y` and i32 params `i`, `j`, for evaluating formulas.
struct Ctx {
    decls: Vec<ParamDecl>,
    values: ParamValues,
}

fn ctx(x: f32, y: f32, i: i32, j: i32) -> Ctx {
    let decl = |name: &str, elem| ParamDecl {
        name: name.into(),
        ty: ParamTy { elem, dim: None },
        description: String::new(),
        default: None,
        range: None,
        sample: None,
    };
    let decls = vec![decl("x", Ty::F32), decl("y", Ty::F32), decl("i", Ty::I32), decl("j", Ty::I32)];
    let given: HashMap<String, ParamInput> = [("x", x as f64), ("y", y as f64), ("i", i as f64), ("j", j as f64)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ParamInput::Scalar(v)))
        .collect();
    let values = bind("t", &decls, &given, Dims { qo_heads: 1, kv_heads: 1, batch: 1 }).unwrap();
    Ctx { decls, values }
}

impl Ctx {
    fn eval(&self, text: &str, score: f32) -> Val<f32> {
        let sigs: Vec<ParamSig<'_>> = self.decls.iter().map(|d| ParamSig { name: &d.name, ty: d.ty }).collect();
        let typed = check(&parse(text).unwrap(), Hook::Logits, &sigs)
            .or_else(|_| check(&parse(text).unwrap(), Hook::Mask, &sigs))
            .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        let env = Env {
            score,
            sm_scale: 0.125,
            q_pos: 40,
            kv_pos: 7,
            qo_head: 3,
            kv_head: 1,
            req: 2,
            q_len: 5,
            kv_len: 44,
            params: &self.values,
        };
        // The logits hook promotes an i32 result to f32; evaluate integer formulas unpromoted.
        match &typed.kind {
            TKind::ToF32(inner) => eval(inner, &env),
            _ => eval(&typed, &env),
        }
    }

    fn f(&self, text: &str) -> f32 {
        match self.eval(text, 1.5) {
            Val::F(v) => v,
            other => panic!("{text} gave {other:?}"),
        }
    }
}

fn close(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-6 * (1.0 + b.abs())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn evaluator_matches_hand_written_formulas(x in -20.0f32..20.0, y in -20.0f32..20.0, i in -1000i32..1000, j in -50i32..50) {
        let c = ctx(x, y, i, j);
        let cases: Vec<(&str, f32)> = vec![
            ("tanh(x)", x.tanh()),
            ("exp(x)", x.exp()),
            ("exp2(x)", x.exp2()),
            ("log(abs(x) + 1.0)", (x.abs() + 1.0).ln()),
            ("log2(abs(x) + 1.0)", (x.abs() + 1.0).log2()),
            ("sqrt(abs(x))", x.abs().sqrt()),
            ("abs(x)", x.abs()),
            ("min(x, y)", x.min(y)),
            ("max(x, y)", x.max(y)),
            ("floor(x)", x.floor()),
            ("sigmoid(x)", 1.0 / (1.0 + (-x).exp())),
            ("select(x < y, x, y)", if x < y { x } else { y }),
            ("x / y", x / y),
            ("x * y - x", x * y - x),
            ("x + i", x + i as f32),
            ("float(i) / 7.0", i as f32 / 7.0),
            ("1 / (abs(x) + 1.0)", 1.0 / (x.abs() + 1.0)),
            ("30.0 * tanh(score * sm_scale / 30.0)", 30.0 * (1.5f32 * 0.125 / 30.0).tanh()),
            ("score * sm_scale - x * (q_pos - kv_pos)", 1.5 * 0.125 - x * 33.0),
        ];
        for (text, want) in cases {
            let got = c.f(text);
            prop_assert!(close(got, want), "{}: got {} want {}", text, got, want);
        }
        // Integer semantics: C truncation, and 0 for division by zero (as the CUDA helpers do).
        let trunc_div = if j == 0 { 0 } else { (i as f64 / j as f64).trunc() as i32 };
        let c_rem = if j == 0 { 0 } else { i - j * trunc_div };
        let ints: Vec<(&str, i32)> = vec![
            ("i / j", trunc_div),
            ("i % j", c_rem),
            ("i * j + i - j", i * j + i - j),
            ("-i", -i),
            ("abs(i)", i.abs()),
            ("min(i, j)", i.min(j)),
            ("max(i, j)", i.max(j)),
            ("int(x)", x.trunc() as i32),
            ("select(i < j, i, j)", i.min(j)),
            ("q_pos - kv_pos + req * qo_head - kv_head + q_len - kv_len", 40 - 7 + 6 - 1 + 5 - 44),
        ];
        for (text, want) in ints {
            prop_assert_eq!(c.eval(text, 0.0), Val::I(want), "{}", text);
        }
        let bools: Vec<(&str, bool)> = vec![
            ("x < y && i >= j", x < y && i >= j),
            ("!(x <= y) || i == j", x > y || i == j),
            ("i != j", i != j),
            ("x > i", x > i as f32),
            ("(x < y) == (i < j)", (x < y) == (i < j)),
        ];
        for (text, want) in bools {
            prop_assert_eq!(c.eval(text, 0.0), Val::B(want), "{}", text);
        }
    }
}

#[test]
fn integer_edge_cases_wrap_instead_of_panicking() {
    let c = ctx(0.0, 0.0, i32::MIN, -1);
    assert_eq!(c.eval("i / j", 0.0), Val::I(i32::MIN));
    assert_eq!(c.eval("i % j", 0.0), Val::I(0));
    assert_eq!(c.eval("i - 1", 0.0), Val::I(i32::MAX));
    assert_eq!(c.eval("-i", 0.0), Val::I(i32::MIN));
    assert_eq!(c.eval("i / 0", 0.0), Val::I(0));
    assert_eq!(c.eval("int(1.0e30)", 0.0), Val::I(i32::MAX));
}

#[test]
fn cuda_emitter_output_is_fully_typed_and_parenthesised() {
    let v = attnforge::spec::shipped::resolve("gemma2").unwrap();
    let logits = attnforge::spec::cuda::emit(&v.logits.typed, &v.params);
    assert_eq!(logits, "(p.u_soft_cap * tanhf(((score * sm_scale) / p.u_soft_cap)))");
    let mask = attnforge::spec::cuda::emit(&v.mask.as_ref().unwrap().typed, &v.params);
    assert_eq!(mask, "((kv_pos <= q_pos) && (af_isub(q_pos, kv_pos) < p.u_window))");
    let alibi = attnforge::spec::shipped::resolve("alibi").unwrap();
    assert_eq!(
        attnforge::spec::cuda::emit(&alibi.logits.typed, &alibi.params),
        "((score * sm_scale) - (p.u_slopes[qo_head] * ((float)(af_isub(q_pos, kv_pos)))))"
    );
}
