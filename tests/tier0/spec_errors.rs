//! Every kind of malformed spec gives an error naming the file, the hook, the column and what
//! was expected.

use attnforge::spec::{load, SpecError};

/// Loads a spec whose `params` and one hook are given, and returns the error.
fn err_of(params: &str, hook: &str, expr: &str) -> SpecError {
    let text = format!(
        "{{\n  \"name\": \"t\",\n  \"params\": {{ {params} }},\n  \"{hook}\": \"{expr}\"\n}}\n"
    );
    load("bad.json", &text).expect_err(&format!("{hook}: {expr} should be rejected"))
}

/// Asserts hook, 1-based column, and a phrase of the message.
fn check(e: &SpecError, hook: &str, column: usize, phrase: &str) {
    assert_eq!(e.file, "bad.json");
    assert_eq!(e.hook.as_deref(), Some(hook), "{e}");
    assert_eq!(e.column, Some(column), "{e}");
    assert!(e.message.contains(phrase), "`{}` lacks `{phrase}`", e.message);
    assert_eq!(e.line, Some(4), "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with("bad.json:4: hook `"), "{shown}");
}

#[test]
fn unknown_identifier_suggests_the_closest_name() {
    let e = err_of("", "mask", "kvpos <= q_pos");
    check(&e, "mask", 1, "unknown identifier `kvpos`, did you mean `kv_pos`?");
    let e = err_of(r#""window": "i32""#, "mask", "q_pos - kv_pos < windw");
    check(&e, "mask", 18, "did you mean `window`?");
}

#[test]
fn mask_must_be_bool() {
    let e = err_of("", "mask", "kv_pos - q_pos");
    check(&e, "mask", 1, "must be a bool, found i32");
}

#[test]
fn bool_used_as_number() {
    let e = err_of("", "logits", "score * (kv_pos < q_pos)");
    check(&e, "logits", 10, "bool used as a number");
    let e = err_of("", "logits", "-(kv_pos < q_pos)");
    check(&e, "logits", 1, "bool used as a number");
    let e = err_of("", "logits", "tanh(true)");
    check(&e, "logits", 6, "bool used as a number");
}

#[test]
fn integer_division_by_a_float() {
    let e = err_of("", "logits", "score + kv_pos / 2.5");
    check(&e, "logits", 9, "integer division by a float");
    let e = err_of("", "logits", "score + kv_pos % 2.5");
    check(&e, "logits", 18, "`%` needs i32 operands");
}

#[test]
fn unknown_function_and_wrong_arity() {
    let e = err_of("", "logits", "score * tahn(score)");
    check(&e, "logits", 9, "unknown function `tahn`, did you mean `tanh`?");
    let e = err_of("", "logits", "max(score)");
    check(&e, "logits", 1, "wrong number of arguments: `max` takes 2, found 1");
    let e = err_of("", "logits", "score + tanh");
    check(&e, "logits", 9, "`tanh` is a function");
}

#[test]
fn type_mismatches() {
    let e = err_of("", "mask", "kv_pos <= q_pos && 1");
    check(&e, "mask", 20, "`&&` needs bool operands, found i32");
    let e = err_of("", "mask", "!kv_pos");
    check(&e, "mask", 1, "`!` needs a bool operand");
    let e = err_of("", "logits", "select(1, score, 0.0)");
    check(&e, "logits", 8, "`select` needs a bool condition");
    let e = err_of("", "logits", "select(kv_pos < 3, score, true)");
    check(&e, "logits", 1, "`select` branches must have one type");
    let e = err_of("", "logits", "kv_pos < q_pos");
    check(&e, "logits", 1, "must be f32, found bool");
}

#[test]
fn hooks_cannot_read_what_they_must_not_depend_on() {
    let e = err_of("", "mask", "score > 0.0");
    check(&e, "mask", 1, "cannot read `score`");
    let e = err_of("", "sink", "kv_pos * 1.0");
    check(&e, "sink", 1, "cannot read `kv_pos`");
    // kv_range lives one level down; its line is the `lo`/`hi` key's.
    let text = r#"{ "name": "t", "params": { "s": "i32[qo_heads]" },
  "kv_range": { "lo": "q_pos - s" } }"#;
    let e = load("bad.json", text).unwrap_err();
    assert_eq!(e.hook.as_deref(), Some("kv_range.lo"));
    assert_eq!(e.column, Some(9));
    assert!(e.message.contains("may depend on kv_head but not qo_head"), "{}", e.message);
    let text = r#"{ "name": "t", "kv_range": { "hi": "kv_pos" } }"#;
    let e = load("bad.json", text).unwrap_err();
    assert!(e.message.contains("cannot depend on a key"), "{}", e.message);
    let text = r#"{ "name": "t", "kv_range": { "hi": "q_pos * 0.5" } }"#;
    let e = load("bad.json", text).unwrap_err();
    assert!(e.message.contains("must be an i32 position, found f32"), "{}", e.message);
}

#[test]
fn syntax_errors_point_at_the_column() {
    let e = err_of("", "mask", "kv_pos <= q_pos &");
    check(&e, "mask", 17, "unexpected character `&` (did you mean `&&`?)");
    let e = err_of("", "mask", "kv_pos = q_pos");
    check(&e, "mask", 8, "did you mean `==`?");
    let e = err_of("", "logits", "(score * 2.0");
    check(&e, "logits", 13, "expected `)`, found end of expression");
    let e = err_of("", "mask", "0 < kv_pos < q_pos");
    check(&e, "mask", 12, "comparisons do not chain");
    let e = err_of("", "logits", "score 2.0");
    check(&e, "logits", 7, "expected an operator or the end");
    let e = err_of("", "logits", "");
    check(&e, "logits", 1, "expected an expression");
    let e = err_of("", "logits", "score * 99999999999");
    check(&e, "logits", 9, "does not fit in i32");
    let e = err_of("", "logits", "score * 1e99");
    check(&e, "logits", 9, "does not fit in f32");
    let e = err_of("", "logits", "score * 2.0f");
    check(&e, "logits", 9, "no suffixes");
    let e = err_of("", "logits", "score; asm(\\\"trap;\\\")");
    check(&e, "logits", 6, "unexpected character `;`");
}

#[test]
fn malformed_json_and_structure() {
    let e = load("bad.json", "{ \"name\": \"t\",\n  \"mask\": }").unwrap_err();
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("invalid JSON"), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "t", "logit": "score" }"#).unwrap_err();
    assert!(e.message.contains("unknown key `logit`"), "{}", e.message);

    let e = load("bad.json", r#"{ "logits": "score" }"#).unwrap_err();
    assert!(e.message.contains("missing `name`"), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "Bad Name" }"#).unwrap_err();
    assert!(e.message.contains("[a-z0-9_]"), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "t", "mask": 3 }"#).unwrap_err();
    assert_eq!(e.hook.as_deref(), Some("mask"));
    assert!(e.message.contains("expected a string expression, found a number"), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "t", "normalize": "sum" }"#).unwrap_err();
    assert!(e.message.contains("\"softmax\" or \"none\""), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "t", "normalize": "none", "sink": "1.0" }"#).unwrap_err();
    assert!(e.message.contains("needs `normalize: \"softmax\"`"), "{}", e.message);

    let e = load("bad.json", r#"{ "name": "t", "kv_range": { "low": "0" } }"#).unwrap_err();
    assert!(e.message.contains("unknown key `low` in `kv_range`"), "{}", e.message);

    let e = load("bad.json", "[1, 2]").unwrap_err();
    assert!(e.message.contains("expected a JSON object"), "{}", e.message);
}

#[test]
fn malformed_parameter_declarations() {
    let cases = [
        (r#""w": "u8""#, "unknown type `u8`"),
        (r#""w": "i32[heads]""#, "unknown array dimension `heads`"),
        (r#""score": "f32""#, "reserved"),
        (r#""tanh": "f32""#, "reserved"),
        (r#""a-b": "f32""#, "must be an identifier"),
        (r#""w": { "type": "i32", "default": 0, "range": [1, 10] }"#, "outside the range"),
        (r#""w": { "type": "i32", "default": 1.5 }"#, "must be an integer"),
        (r#""w": { "type": "i32", "range": [10, 1] }"#, "is empty"),
        (r#""w": { "type": "i32", "defualt": 1 }"#, "unknown key `defualt`"),
        (r#""w": 3"#, "expected a type string or an object"),
    ];
    for (params, phrase) in cases {
        let text = format!("{{ \"name\": \"t\", \"params\": {{ {params} }} }}");
        let e = load("bad.json", &text).unwrap_err();
        assert!(e.message.contains(phrase), "{params}: `{}` lacks `{phrase}`", e.message);
    }
}

#[test]
fn the_language_is_closed_to_raw_cuda() {
    // Anything that is not a token of the language stops at the lexer; a parameter name cannot
    // smuggle code either, and emitted names are prefixed fields of the params struct.
    for expr in ["score /* x */", "score # 1", "__syncthreads()", "p.u_x", "score[0]", "{score}", "'a'"] {
        let e = err_of(r#""x": "f32""#, "logits", expr);
        assert!(e.column.is_some(), "{expr}: {e}");
    }
    let text = r#"{ "name": "t", "params": { "x);asm(\"trap\");//": "f32" } }"#;
    assert!(load("bad.json", text).unwrap_err().message.contains("must be an identifier"));
}

#[test]
fn every_shipped_variant_loads_and_its_kv_range_is_sound() {
    let all = attnforge::spec::shipped::all().unwrap();
    assert_eq!(all.len(), 11);
    for v in &all {
        attnforge::spec::soundness::check_kv_range(v, 200, 1).unwrap_or_else(|c| panic!("{}: {c}", v.name));
    }
}

#[test]
fn an_unsound_kv_range_is_reported_with_a_counterexample() {
    let text = r#"{ "name": "bad_window", "params": { "window": { "type": "i32", "sample": [1, 16] } },
      "mask": "kv_pos <= q_pos && q_pos - kv_pos < window",
      "kv_range": { "lo": "q_pos - window + 2", "hi": "q_pos" } }"#;
    let v = load("bad.json", text).unwrap();
    let c = attnforge::spec::soundness::check_kv_range(&v, 200, 1).unwrap_err();
    assert_eq!(c.kv_pos as i64, c.lo - 1, "{c}");
    assert!(c.q_pos - c.kv_pos < 16 && c.kv_pos <= c.q_pos, "{c}");
    assert!(c.to_string().contains("the mask admits kv_pos"), "{c}");
}

#[test]
fn bits_parameters_are_read_only_through_bit() {
    let e = err_of(r#""t": "bits""#, "mask", "t");
    check(&e, "mask", 1, "`t` is a bit matrix: read it with bit(t)");
    let e = err_of(r#""w": "i32""#, "mask", "bit(w)");
    check(&e, "mask", 5, "`bit` takes the name of a `bits` parameter");
    let text = r#"{ "name": "t", "params": { "t": "bits" }, "sink": "select(bit(t), 1.0, 0.0)" }"#;
    let e = load("bad.json", text).unwrap_err();
    assert!(e.message.contains("cannot read a bit matrix"), "{}", e.message);
    let text = r#"{ "name": "t", "params": { "t": { "type": "bits", "default": 1 } } }"#;
    assert!(load("bad.json", text).unwrap_err().message.contains("no default, range or sample"));
    let v = load("ok.json", r#"{ "name": "t", "params": { "t": "bits" }, "mask": "bit(t) && kv_pos <= q_pos" }"#).unwrap();
    assert_eq!(
        attnforge::spec::cuda::emit(&v.mask.unwrap().typed, &v.params),
        "(af_bit(p.u_t, p.o_t, req, af_isub(q_pos, af_isub(kv_len, q_len)), kv_pos, kv_len) && (kv_pos <= q_pos))"
    );
}

/// Regression (hardening audit, item 11): `check` accepted specs that could never compile or
/// bind. Each is now refused by the loader, naming the parameter and the rule.
#[test]
fn specs_that_could_never_compile_or_bind_are_refused() {
    let bad = |params: &str| load("bad.json", &format!(r#"{{ "name": "t", "params": {{ {params} }} }}"#)).unwrap_err().to_string();
    // More than the 128 bytes of the kernels' params blob (17 arrays of 8-byte pointers).
    let many: Vec<String> = (0..17).map(|i| format!(r#""a{i}": "f32[qo_heads]""#)).collect();
    let e = bad(&many.join(", "));
    assert!(e.contains("136 bytes") && e.contains("at most 128"), "{e}");
    assert!(load("ok.json", &format!(r#"{{ "name": "t", "params": {{ {} }} }}"#, many[..16].join(", "))).is_ok());
    // An i32 default no i32 can hold: every run would fail.
    let e = bad(r#""w": { "type": "i32", "default": 1e20 }"#);
    assert!(e.contains("parameter `w`") && e.contains("must be an integer in i32, found 100000000000000000000"), "{e}");
    let e = bad(r#""s": { "type": "f32", "default": 1e300 }"#);
    assert!(e.contains("does not fit in f32"), "{e}");
    // A sample outside the declared range (it made bogus counterexamples), or holding no value.
    let e = bad(r#""w": { "type": "i32", "range": [1, 100], "sample": [0, 50] }"#);
    assert!(e.contains("`sample` [0, 50] is outside the declared `range` [1, 100]"), "{e}");
    let e = bad(r#""w": { "type": "i32", "sample": [0.2, 0.8] }"#);
    assert!(e.contains("holds no i32 value"), "{e}");
    let e = bad(r#""w": { "type": "i32", "range": [3e9, 4e9] }"#);
    assert!(e.contains("holds no i32 value"), "{e}");
    let e = bad(r#""t": { "type": "bits", "sample": [0, 1] }"#);
    assert!(e.contains("no default, range or sample"), "{e}");
    // A bits parameter beside one named like its old offsets field is fine now (see render).
    assert!(load("ok.json", r#"{ "name": "t", "params": { "t": "bits", "t_off": "i32" }, "mask": "bit(t) && kv_pos != t_off" }"#).is_ok());
}

/// Regression (hardening audit, item 11): duplicate JSON keys (a hook or a parameter given twice)
/// were silently last-wins. They are an error naming the key and its line.
#[test]
fn duplicate_keys_are_an_error_not_last_wins() {
    for (text, key, line) in [
        ("{\n \"name\": \"t\",\n \"mask\": \"kv_pos <= q_pos\",\n \"mask\": \"true\"\n}", "mask", 4),
        ("{\n \"name\": \"t\",\n \"params\": {\n  \"w\": \"i32\",\n  \"w\": \"f32\"\n }\n}", "w", 5),
        ("{ \"name\": \"t\", \"kv_range\": { \"hi\": \"q_pos\", \"hi\": \"q_pos - 1\" } }", "hi", 1),
        ("{ \"name\": \"t\", \"params\": { \"w\": { \"type\": \"i32\", \"type\": \"f32\" } } }", "type", 1),
    ] {
        let e = load("dup.json", text).unwrap_err();
        assert!(e.message.contains(&format!("duplicate key `{key}`")), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
    }
}

/// Regression (hardening audit, item 12): a 4 KB spec (a long mask over an empty `kv_range`)
/// took 18–25 s in `check`. The soundness sampling is charged per evaluated node; when the
/// budget runs out the check stops and says how far it got. The shipped variants are never cut.
#[test]
fn the_soundness_check_is_bounded_and_says_when_it_was_cut_short() {
    use attnforge::spec::soundness::{check_kv_range, check_kv_range_within, EVAL_BUDGET};
    let mask = vec!["kv_pos"; 570].join("+") + "<0-1";
    let v = load("long.json", &format!(r#"{{ "name": "long", "mask": "{mask}", "kv_range": {{ "hi": "-1" }} }}"#)).unwrap();
    let c = check_kv_range(&v, 300, 0).unwrap();
    assert!(c.cut_short() && c.trials < 300 && c.evaluated <= EVAL_BUDGET, "{c:?}");
    for s in attnforge::spec::shipped::all().unwrap() {
        let c = check_kv_range(&s, 300, 0).unwrap();
        assert!(!c.cut_short() && c.evaluated < EVAL_BUDGET / 4, "{}: {c:?}", s.name);
    }
    // A budget too small for one shape checks none, and says so.
    let c = check_kv_range_within(&v, 10, 0, 1).unwrap();
    assert_eq!((c.trials, c.wanted), (0, 10));
}

/// Regression (hardening audit, item 13): an integer literal beyond i64 was reported as the
/// saturated value 9223372036854775807; NUL and U+2028 printed as invisible characters.
#[test]
fn messages_show_what_was_written_and_name_invisible_characters() {
    let e = err_of("", "mask", "kv_pos < 99999999999999999999999999999");
    check(&e, "mask", 10, "integer literal 99999999999999999999999999999 does not fit in i32");
    for (c, name) in [('\u{0}', "U+0000"), ('\u{2028}', "U+2028"), ('\u{200b}', "U+200B")] {
        let text = format!("{{\n  \"name\": \"t\",\n  \"params\": {{}},\n  \"mask\": \"kv_pos {c}< q_pos\"\n}}\n").replace('\u{0}', "\\u0000");
        let e = load("bad.json", &text).unwrap_err();
        assert!(e.message.contains(&format!("unexpected character {name}")), "{e}");
        let shown = e.to_string();
        assert!(!shown.contains(c), "an invisible character reached the message: {shown:?}");
    }
    // A hostile name is shown escaped and cut, not printed whole.
    let long = format!("{{ \"name\": \"{}\\u2028\" }}", "v".repeat(100_000));
    let e = load("bad.json", &long).unwrap_err().to_string();
    assert!(e.len() < 400 && e.contains("characters)"), "{}", &e[..e.len().min(400)]);
    let e = load("bad.json", "{ \"name\": \"a\\u2028b\" }").unwrap_err().to_string();
    assert!(e.contains("\\u{2028}") && !e.contains('\u{2028}'), "{e:?}");
}
