//! Variant specs: JSON files whose hooks are expressions in a small, closed language.
//!
//! `load` parses the JSON, parses each hook ([`parser`]), type-checks it against the hook's
//! rules ([`typed`]) and returns a [`Variant`]: typed hooks plus parameter declarations. Two back
//! ends read a `Variant`: [`cuda`] (for the templates) and [`eval`] (for the CPU reference). Every
//! error names the file, the hook, the column and what was expected.

pub mod ast;
pub mod cuda;
pub mod eval;
pub mod factor;
mod lexer;
pub mod params;
pub mod parser;
pub mod shipped;
pub mod implied;
pub mod soundness;
pub mod typed;

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use self::ast::{Expr, Span};
use self::params::{Dims, ParamDecl, ParamInput, ParamValues};
use self::typed::{Builtin, Func, Hook, ParamDim, ParamSig, ParamTy, TExpr, Ty};

/// How logits become weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Normalize {
    /// `softmax` over the visible keys (plus the sink, if any); the default.
    Softmax,
    /// The logit *is* the weight (e.g. sigmoid attention): `o = Σ logit · v`.
    None,
}

/// One checked hook: its text, its tree and its typed tree.
#[derive(Debug, Clone)]
pub struct HookExpr {
    /// Which hook this is.
    pub hook: Hook,
    /// The expression as written in the spec.
    pub source: String,
    /// The parsed tree, with spans into `source`.
    pub ast: Expr,
    /// The type-checked tree the back ends read.
    pub typed: TExpr,
}

/// Optional bounds on the visible `kv_pos` of a query, inclusive. A missing side is open.
#[derive(Debug, Clone)]
pub struct KvRange {
    /// The first visible `kv_pos`; `None` leaves the range open below.
    pub lo: Option<HookExpr>,
    /// The last visible `kv_pos`; `None` leaves the range open above.
    pub hi: Option<HookExpr>,
}

/// A parsed and type-checked variant.
#[derive(Debug, Clone)]
pub struct Variant {
    /// The variant's name: a lowercase identifier of at most [`MAX_NAME_LEN`] characters.
    pub name: String,
    /// Free text from the spec (empty when absent); never rendered.
    pub description: String,
    /// Where the spec came from (a path, or `shipped:<name>`), for messages.
    pub origin: String,
    /// The parameter declarations, in the spec's order (the params blob's order).
    pub params: Vec<ParamDecl>,
    /// The `logits` hook (`score * sm_scale` when the spec gives none).
    pub logits: HookExpr,
    /// The `mask` hook; `None` admits every key.
    pub mask: Option<HookExpr>,
    /// Bounds on the visible keys of a query; `None` when the spec declares no `kv_range`.
    pub kv_range: Option<KvRange>,
    /// The `sink` hook; `None` when the variant has no sink.
    pub sink: Option<HookExpr>,
    /// How logits become weights (`Softmax` unless the spec says `"none"`).
    pub normalize: Normalize,
}

/// A malformed spec, located as precisely as possible.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    /// The spec's file: a path, or `shipped:<name>`.
    pub file: String,
    /// 1-based line of the hook (or of the JSON error) in the file, when known.
    pub line: Option<usize>,
    /// The hook the error is in, when it is in one.
    pub hook: Option<String>,
    /// 1-based column inside the hook's expression.
    pub column: Option<usize>,
    /// What was wrong and what was expected.
    pub message: String,
    /// The hook's text and the span to underline (boxed: it is rare, and every `Result` of the
    /// spec loader would otherwise carry its size).
    pub snippet: Option<Box<(String, Span)>>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if let Some(h) = &self.hook {
            write!(f, ": hook `{h}`")?;
        }
        if let Some(c) = self.column {
            write!(f, ", column {c}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some((src, span)) = self.snippet.as_deref() {
            // Show at most ~100 characters around the span, so long hooks stay readable.
            let chars: Vec<char> = src.chars().collect();
            let start = src[..span.start.min(src.len())].chars().count();
            let end = src.get(..span.end.min(src.len())).map_or(start + 1, |s| s.chars().count()).max(start + 1);
            let from = start.saturating_sub(40);
            let to = (from + 100).min(chars.len()).max(start);
            // One column per character, so the caret stays aligned; invisible ones (a NUL, a
            // line separator) would break the line or vanish.
            let shown: String = chars[from..to].iter().map(|&c| if invisible(c) { '\u{fffd}' } else { c }).collect();
            let (pre, post) = (if from > 0 { "…" } else { "" }, if to < chars.len() { "…" } else { "" });
            let width = end.min(to.max(start + 1)) - start;
            let pad = start - from + pre.chars().count();
            write!(f, "\n    {pre}{shown}{post}\n    {}{}", " ".repeat(pad), "^".repeat(width.max(1)))?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

const KNOWN_KEYS: [&str; 8] =
    ["name", "description", "params", "logits", "mask", "kv_range", "sink", "normalize"];

/// Whether a character would be invisible (or move the cursor) in a message.
pub fn invisible(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

/// A user's text for a message: invisible characters written as code points (a NUL or U+2028 is
/// shown as `\u{0}`, `\u{2028}`), and cut at 60 characters.
pub fn shown(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(60) {
        if invisible(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    if s.chars().nth(60).is_some() {
        out.push_str(&format!("… ({} characters)", s.chars().count()));
    }
    out
}

/// Reserved words that can never name a parameter.
fn reserved(name: &str) -> bool {
    Builtin::from_name(name).is_some()
        || Func::from_name(name).is_some()
        || matches!(name, "true" | "false")
}

/// The longest variant or parameter name: names become kernel, file and field names.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `s` is a plain identifier (`[A-Za-z_][A-Za-z0-9_]*`) of at most [`MAX_NAME_LEN`]
/// characters: the only names that reach rendered source or file names.
pub fn is_plain_identifier(s: &str) -> bool {
    let mut c = s.chars();
    s.len() <= MAX_NAME_LEN
        && c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

struct Loader<'a> {
    file: &'a str,
    text: &'a str,
}

impl Loader<'_> {
    fn error(&self, key: Option<&str>, message: impl Into<String>) -> SpecError {
        SpecError {
            file: self.file.to_string(),
            line: key.and_then(|k| self.line_of(k)),
            hook: None,
            column: None,
            message: message.into(),
            snippet: None,
        }
    }

    /// The line of the first `"key":` in the file, to point a reader at the right place.
    fn line_of(&self, key: &str) -> Option<usize> {
        let needle = format!("\"{key}\"");
        let mut from = 0;
        while let Some(at) = self.text[from..].find(&needle) {
            let after = from + at + needle.len();
            if self.text[after..].trim_start().starts_with(':') {
                return Some(self.text[..from + at].matches('\n').count() + 1);
            }
            from = after;
        }
        None
    }

    fn hook(&self, hook: Hook, key: &str, v: &Value, params: &[ParamSig<'_>]) -> Result<HookExpr, SpecError> {
        let Value::String(src) = v else {
            return Err(SpecError {
                hook: Some(hook.name().into()),
                ..self.error(Some(key), format!("expected a string expression, found {}", kind(v)))
            });
        };
        let located = |span: Span, message: String| SpecError {
            file: self.file.to_string(),
            line: self.line_of(key),
            hook: Some(hook.name().to_string()),
            column: Some(src[..span.start.min(src.len())].chars().count() + 1),
            message,
            snippet: Some(Box::new((src.clone(), span))),
        };
        let ast = parser::parse(src).map_err(|e| located(e.span, e.message))?;
        let typed = typed::check(&ast, hook, params).map_err(|e| located(e.span, e.message))?;
        Ok(HookExpr { hook, source: src.clone(), ast, typed })
    }

    fn param(&self, name: &str, v: &Value) -> Result<ParamDecl, SpecError> {
        let err = |m: String| self.error(Some(name), format!("parameter `{}`: {m}", shown(name)));
        if !is_plain_identifier(name) {
            return Err(err(format!("a parameter name must be an identifier ([A-Za-z_][A-Za-z0-9_]*) of at most {MAX_NAME_LEN} characters")));
        }
        if reserved(name) {
            return Err(err("the name is reserved (a built-in, a function or a literal)".into()));
        }
        let (ty_text, obj) = match v {
            Value::String(s) => (s.as_str(), None),
            Value::Object(o) => match o.get("type") {
                Some(Value::String(s)) => (s.as_str(), Some(o)),
                _ => return Err(err("expected `\"type\": \"f32\"` (or i32, f32[qo_heads], …)".into())),
            },
            other => {
                return Err(err(format!("expected a type string or an object, found {}", kind(other))))
            }
        };
        let ty = parse_param_ty(ty_text).map_err(err)?;
        let mut decl = ParamDecl {
            name: name.to_string(),
            ty,
            description: String::new(),
            default: None,
            range: None,
            sample: None,
        };
        for (k, val) in obj.into_iter().flatten() {
            match k.as_str() {
                "type" => {}
                "description" => decl.description = val.as_str().unwrap_or_default().to_string(),
                "default" => {
                    decl.default = Some(val.as_f64().ok_or_else(|| err("`default` must be a number".into()))?)
                }
                "range" => decl.range = Some(pair(val).map_err(|m| err(format!("`range`: {m}")))?),
                "sample" => decl.sample = Some(pair(val).map_err(|m| err(format!("`sample`: {m}")))?),
                other => {
                    return Err(err(format!(
                        "unknown key `{other}` (expected type, description, default, range, sample)"
                    )))
                }
            }
        }
        if ty.dim == Some(ParamDim::QueryKey) && (decl.default.is_some() || decl.range.is_some() || decl.sample.is_some()) {
            return Err(err("a bits parameter has no default, range or sample".into()));
        }
        // Every value this declaration admits must be one that binds: a range must hold a value
        // of the type, a sample must lie in the range, a default must be a value of the type.
        let holds_type = |(lo, hi): (f64, f64)| match ty.elem {
            Ty::I32 => lo.max(i32::MIN as f64).ceil() <= hi.min(i32::MAX as f64).floor(),
            _ => lo <= f32::MAX as f64 && hi >= -(f32::MAX as f64),
        };
        for (what, r) in [("range", decl.range), ("sample", decl.sample)] {
            if let Some((lo, hi)) = r.filter(|r| !holds_type(*r)) {
                return Err(err(format!("`{what}` [{lo}, {hi}] holds no {} value", ty.elem.name())));
            }
        }
        if let (Some((slo, shi)), Some((lo, hi))) = (decl.sample, decl.range) {
            if slo < lo || shi > hi {
                return Err(err(format!("`sample` [{slo}, {shi}] is outside the declared `range` [{lo}, {hi}]")));
            }
        }
        if let Some(x) = decl.default {
            if ty.elem == Ty::I32 && (x.fract() != 0.0 || x < i32::MIN as f64 || x > i32::MAX as f64) {
                return Err(err(format!("the default of an i32 parameter must be an integer in i32, found {x}")));
            }
            if ty.elem == Ty::F32 && x.abs() > f32::MAX as f64 {
                return Err(err(format!("the default {x} does not fit in f32")));
            }
            if let Some((lo, hi)) = decl.range.filter(|&(lo, hi)| x < lo || x > hi) {
                return Err(err(format!("default {x} is outside the range [{lo}, {hi}]")));
            }
        }
        Ok(decl)
    }
}

fn pair(v: &Value) -> Result<(f64, f64), String> {
    match v.as_array().map(|a| a.iter().map(Value::as_f64).collect::<Vec<_>>()) {
        Some(xs) if xs.len() == 2 && xs.iter().all(Option::is_some) => {
            let (lo, hi) = (xs[0].unwrap_or(0.0), xs[1].unwrap_or(0.0));
            if lo > hi {
                Err(format!("[{lo}, {hi}] is empty"))
            } else {
                Ok((lo, hi))
            }
        }
        _ => Err("expected [lo, hi]".into()),
    }
}

fn parse_param_ty(s: &str) -> Result<ParamTy, String> {
    if s == "bits" {
        return Ok(ParamTy { elem: Ty::Bool, dim: Some(ParamDim::QueryKey) });
    }
    let (elem, dim) = match s.split_once('[') {
        None => (s, None),
        Some((e, rest)) => {
            let d = rest.strip_suffix(']').ok_or_else(|| format!("malformed type `{s}`"))?;
            let dim = match d {
                "qo_heads" => ParamDim::QoHeads,
                "kv_heads" => ParamDim::KvHeads,
                "batch" => ParamDim::Batch,
                other => {
                    return Err(format!(
                        "unknown array dimension `{other}` (expected qo_heads, kv_heads or batch)"
                    ))
                }
            };
            (e, Some(dim))
        }
    };
    let elem = match elem {
        "f32" => Ty::F32,
        "i32" => Ty::I32,
        other => return Err(format!("unknown type `{other}` (expected f32, i32 or bits)")),
    };
    Ok(ParamTy { elem, dim })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value whose objects must not repeat a key (serde_json keeps the last one silently,
/// so `"mask"` given twice, or a parameter declared twice, would lose one without a word).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strict;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Strict, E> {
                Ok(Strict(Value::Bool(b)))
            }
            fn visit_i64<E>(self, x: i64) -> Result<Strict, E> {
                Ok(Strict(Value::from(x)))
            }
            fn visit_u64<E>(self, x: u64) -> Result<Strict, E> {
                Ok(Strict(Value::from(x)))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Strict, E> {
                Ok(Strict(Value::from(x)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Strict, E> {
                Ok(Strict(Value::String(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Strict, E> {
                Ok(Strict(Value::String(s)))
            }
            fn visit_unit<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Strict, E> {
                Ok(Strict(Value::Null))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
                let mut v = Vec::new();
                while let Some(Strict(x)) = seq.next_element()? {
                    v.push(x);
                }
                Ok(Strict(Value::Array(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
                let mut m = Map::new();
                while let Some(k) = map.next_key::<String>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key `{}`", shown(&k))));
                    }
                    let Strict(v) = map.next_value()?;
                    m.insert(k, v);
                }
                Ok(Strict(Value::Object(m)))
            }
        }
        d.deserialize_any(V)
    }
}

fn strict_json(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str::<Strict>(text).map(|s| s.0)
}

/// Parses and checks a spec. `file` names it in errors (a path, or `shipped:<name>`).
pub fn load(file: &str, text: &str) -> Result<Variant, SpecError> {
    let l = Loader { file, text };
    let root: Value = strict_json(text).map_err(|e| SpecError {
        line: Some(e.line()),
        column: Some(e.column()),
        ..l.error(None, format!("invalid JSON: {e}"))
    })?;
    let Value::Object(obj) = root else {
        return Err(l.error(None, format!("expected a JSON object, found {}", kind(&root))));
    };
    for k in obj.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            return Err(l.error(
                Some(k),
                format!("unknown key `{k}` (expected one of: {})", KNOWN_KEYS.join(", ")),
            ));
        }
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if is_plain_identifier(s) && !s.chars().any(|c| c.is_ascii_uppercase()) => s.clone(),
        Some(v) => {
            return Err(l.error(
                Some("name"),
                format!("`name` must be a lowercase identifier ([a-z_][a-z0-9_]*) of at most {MAX_NAME_LEN} characters, found {}", shown(&v.to_string())),
            ))
        }
        None => return Err(l.error(None, "missing `name`")),
    };
    let description = obj.get("description").and_then(Value::as_str).unwrap_or_default().to_string();

    let params = match obj.get("params") {
        None => Vec::new(),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| l.param(k, v)).collect::<Result<Vec<_>, _>>()?,
        Some(v) => return Err(l.error(Some("params"), format!("`params` must be an object, found {}", kind(v)))),
    };
    // The kernels take the parameters in one fixed-size blob: a spec that cannot fit it would
    // never compile.
    params::param_layout(&params).map_err(|m| l.error(Some("params"), m))?;
    let sigs: Vec<ParamSig<'_>> = params.iter().map(|p| ParamSig { name: &p.name, ty: p.ty }).collect();

    let logits_default = Value::String("score * sm_scale".into());
    let logits = l.hook(Hook::Logits, "logits", obj.get("logits").unwrap_or(&logits_default), &sigs)?;
    let opt = |hook, key: &str, m: &Map<String, Value>| {
        m.get(key).map(|v| l.hook(hook, key, v, &sigs)).transpose()
    };
    let mask = opt(Hook::Mask, "mask", &obj)?;
    let sink = opt(Hook::Sink, "sink", &obj)?;
    let kv_range = match obj.get("kv_range") {
        None => None,
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| *k != "lo" && *k != "hi") {
                return Err(l.error(Some("kv_range"), format!("unknown key `{k}` in `kv_range` (expected lo, hi)")));
            }
            Some(KvRange { lo: opt(Hook::KvLo, "lo", m)?, hi: opt(Hook::KvHi, "hi", m)? })
        }
        Some(v) => {
            return Err(l.error(Some("kv_range"), format!("`kv_range` must be an object {{\"lo\": …, \"hi\": …}}, found {}", kind(v))))
        }
    };
    let normalize = match obj.get("normalize") {
        None => Normalize::Softmax,
        Some(Value::String(s)) if s == "softmax" => Normalize::Softmax,
        Some(Value::String(s)) if s == "none" => Normalize::None,
        Some(v) => return Err(l.error(Some("normalize"), format!("`normalize` must be \"softmax\" or \"none\", found {v}"))),
    };
    if normalize == Normalize::None && sink.is_some() {
        return Err(SpecError {
            hook: Some("sink".into()),
            ..l.error(Some("sink"), "a sink adds to the softmax denominator, so it needs `normalize: \"softmax\"`")
        });
    }
    Ok(Variant { name, description, origin: file.to_string(), params, logits, mask, kv_range, sink, normalize })
}

impl Variant {
    /// Binds user-given parameter values (see [`params::bind`]).
    pub fn bind(&self, given: &HashMap<String, ParamInput>, dims: Dims) -> Result<ParamValues, crate::Error> {
        params::bind(&self.name, &self.params, given, dims).map_err(crate::Error::Param)
    }

    /// Every hook present, in a fixed order.
    pub fn hooks(&self) -> Vec<&HookExpr> {
        let mut v = vec![&self.logits];
        v.extend(self.mask.as_ref());
        if let Some(r) = &self.kv_range {
            v.extend(r.lo.as_ref());
            v.extend(r.hi.as_ref());
        }
        v.extend(self.sink.as_ref());
        v
    }
}
