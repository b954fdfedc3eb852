//! Factoring a logits hook for the prefill loops: `logits = unit · raw`, with `unit` the same for
//! every score of a launch and provably positive and finite.
//!
//! The prefill loops keep a row's running max in the units of what they compute per score and
//! fold the rest into the exponent: `p = exp2(raw · unit · log2 e − base)`, one FFMA. For the
//! default `score * sm_scale` that saves the multiply per score; for a soft cap,
//! `cap * tanh(score * sm_scale / cap)`, it saves the outer multiply, and the argument's
//! `score * sm_scale / cap` becomes `score * (sm_scale / cap)` (the uniform part computed once),
//! saving another: four instructions per score (FMUL, MUFU.TANH, FFMA, MUFU.EX2) instead of six.
//!
//! Soundness: the max of `unit · raw` over a row is `unit · max raw` only when `unit > 0`; the
//! proof is interval arithmetic over the factors (`sm_scale`, which the host checks is positive
//! and finite; positive literals; scalar `f32` parameters whose declared `range`, which every
//! bind enforces, is positive). Any other hook is left whole (`None`): the kernels then evaluate
//! it per score as written. The rewrite reassociates floating-point products and nothing else.
//!
//! A factored hook's `raw` may also be proven bounded ([`raw_bounds`]: a soft cap's `tanh` lies
//! in [-1, 1] whatever the score). The prefill loops then exponentiate every row against a fixed
//! max instead of a running one — no per-tile max, vote or rescale — where the bounds' width,
//! times the unit in log2 units, keeps every weight a normal number of the P operand's type
//! (`prefill_rows.cuh`). The output does not depend on the max, only its rounding does; a bound
//! not proven (`None`) keeps the running max.

use super::ast::{BinOp, Lit, UnOp};
use super::params::ParamDecl;
use super::typed::{Builtin, Func, TExpr, TKind, Ty};

/// A factored logits hook: `logits = unit · raw`.
#[derive(Debug, Clone, PartialEq)]
pub struct Factored {
    /// The uniform factor, proven in [1e-35, 1e35].
    pub unit: TExpr,
    /// What the loops compute per score (with uniform sub-products regrouped).
    pub raw: TExpr,
    /// Bounds `raw` provably stays in for every score (finite or not) and every bound parameter
    /// value, widened for the kernels' f32 evaluation (see [`raw_bounds`]); `None`: not proven.
    pub raw_bounds: Option<(f64, f64)>,
}

/// Bounds a unit must provably lie in: far from 0 (the exponent scale is `unit · log2 e`) and
/// from the f32 overflow; the same bound on the magnitude of a regrouped uniform product.
const UNIT_MIN: f64 = 1e-35;
const UNIT_MAX: f64 = 1e35;
/// The bounds every entry point enforces on `sm_scale` (`params::resolve_sm_scale`).
const SM_SCALE: (f64, f64) = (super::params::SM_SCALE_RANGE.0 as f64, super::params::SM_SCALE_RANGE.1 as f64);

/// Factors `logits` (the variant's typed hook) when its top-level product has a provably positive
/// uniform part; `None` when it has none (the loops use the hook whole).
pub fn factor_logits(logits: &TExpr, params: &[ParamDecl]) -> Option<Factored> {
    if logits.ty != Ty::F32 {
        return None;
    }
    let mut factors = Vec::new();
    flatten(logits, false, &mut factors);
    let (uniform, rest): (Vec<_>, Vec<_>) = factors.into_iter().partition(|(f, _)| uniform_bounds(f, params, true).is_some());
    if uniform.is_empty() {
        return None;
    }
    let unit = product(uniform.into_iter().map(|(f, inv)| (f.clone(), inv)).collect());
    let (lo, hi) = uniform_bounds(&unit, params, true)?;
    if !(lo >= UNIT_MIN && hi <= UNIT_MAX) {
        return None;
    }
    let rest: Vec<(TExpr, bool)> = rest.into_iter().map(|(f, inv)| (regroup(f, params), inv)).collect();
    let raw = product(rest);
    let raw_bounds = raw_bounds(&raw, params);
    Some(Factored { unit, raw, raw_bounds })
}

/// Relative widening of an interval per operation, for the kernels' f32 arithmetic (a few ulps)
/// and for their approximate functions (`tanh.approx` and the MUFU's exp2 are good to about
/// 2^-11 relative).
const ROUNDING: f64 = 1e-6;
const APPROX: f64 = 1e-3;
/// The largest magnitude a bound may have: far inside f32's range, so the kernels' f32
/// evaluation of every part of the hook stays finite where its bounds are proven, and the bounds
/// render as finite f32 literals.
pub const BOUND_MAX: f64 = 18446744073709551616.0; // 2^64

/// Bounds of a hook expression over every score (finite or ±inf; a NaN score gives a NaN, which
/// no bound constrains and which makes its row NaN anyway), every position and every parameter
/// value the binds allow: interval arithmetic where each operand is bounded — literals,
/// `sm_scale`, scalar `f32` parameters with a declared range, and the functions whose values are
/// bounded whatever their argument (`tanh` in [-1, 1], `sigmoid` in [0, 1]) — each result
/// widened for f32 evaluation. `None` where any part is unbounded or not understood (the score
/// itself, positions, per-head arrays, `exp` of an unbounded argument, …).
///
/// The prefill loops use the bounds of a factored hook's `raw` to exponentiate against a fixed
/// row max (no running max, no rescale) where the bounds keep every weight within a safe range
/// of exponents: the result does not depend on the max (only its rounding does), so the bound
/// must hold to within a few log2 units, not exactly.
pub fn raw_bounds(e: &TExpr, params: &[ParamDecl]) -> Option<(f64, f64)> {
    let widen = |(lo, hi): (f64, f64), rel: f64| {
        let w = rel * lo.abs().max(hi.abs());
        let (lo, hi) = (lo - w, hi + w);
        (lo >= -BOUND_MAX && hi <= BOUND_MAX && lo <= hi).then_some((lo, hi))
    };
    if e.ty != Ty::F32 {
        return None;
    }
    if let Some(b) = uniform_bounds(e, params, false) {
        return widen(b, ROUNDING);
    }
    match &e.kind {
        TKind::Unary(UnOp::Neg, a) => raw_bounds(a, params).map(|(lo, hi)| (-hi, -lo)),
        TKind::Binary(op, a, b) => widen(interval(*op, raw_bounds(a, params)?, raw_bounds(b, params)?)?, ROUNDING),
        TKind::Call(f, args) => {
            let arg = |i: usize| args.get(i).and_then(|a| raw_bounds(a, params));
            match f {
                Func::Tanh => widen(arg(0).map_or((-1.0, 1.0), |(lo, hi)| (lo.tanh(), hi.tanh())), APPROX),
                Func::Sigmoid => {
                    let s = |x: f64| 1.0 / (1.0 + (-x).exp());
                    widen(arg(0).map_or((0.0, 1.0), |(lo, hi)| (s(lo), s(hi))), APPROX)
                }
                Func::Exp => arg(0).and_then(|(lo, hi)| widen((lo.exp(), hi.exp()), APPROX)),
                Func::Exp2 => arg(0).and_then(|(lo, hi)| widen((lo.exp2(), hi.exp2()), APPROX)),
                Func::Abs => arg(0).map(|(lo, hi)| if lo >= 0.0 { (lo, hi) } else if hi <= 0.0 { (-hi, -lo) } else { (0.0, hi.max(-lo)) }),
                Func::Floor => arg(0).map(|(lo, hi)| (lo.floor(), hi.floor())),
                // fminf / fmaxf (and the reference's f64 min / max) return the other operand when
                // one is NaN (a NaN score), so the result is either operand: the hull of both,
                // not the tighter [min, min] / [max, max].
                Func::Min | Func::Max | Func::Select => {
                    let (i, j) = if *f == Func::Select { (1, 2) } else { (0, 1) };
                    let (x, y) = (arg(i)?, arg(j)?);
                    Some((x.0.min(y.0), x.1.max(y.1)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// `e`'s factors under `*` and `/` (a factor under an odd number of divisors is inverted), in
/// order; only `f32` products are taken apart.
fn flatten<'a>(e: &'a TExpr, inv: bool, out: &mut Vec<(&'a TExpr, bool)>) {
    match &e.kind {
        TKind::Binary(BinOp::Mul, a, b) if e.ty == Ty::F32 => {
            flatten(a, inv, out);
            flatten(b, inv, out);
        }
        TKind::Binary(BinOp::Div, a, b) if e.ty == Ty::F32 => {
            flatten(a, inv, out);
            flatten(b, !inv, out);
        }
        _ => out.push((e, inv)),
    }
}

/// The product of `factors` (`x / y` for an inverted one; `1` for none), left to right.
fn product(factors: Vec<(TExpr, bool)>) -> TExpr {
    let f32 = |kind| TExpr { ty: Ty::F32, kind };
    let mut acc: Option<TExpr> = None;
    for (f, inv) in factors {
        acc = Some(match acc {
            None if inv => f32(TKind::Binary(BinOp::Div, Box::new(f32(TKind::Lit(Lit::Float(1.0)))), Box::new(f))),
            None => f,
            Some(a) => f32(TKind::Binary(if inv { BinOp::Div } else { BinOp::Mul }, Box::new(a), Box::new(f))),
        });
    }
    acc.unwrap_or_else(|| f32(TKind::Lit(Lit::Float(1.0))))
}

/// `x op y` over intervals (+, -, *, /; a divisor must keep away from 0), from the corners; `None`
/// for any other operator or a divisor whose interval reaches 0.
fn interval(op: BinOp, x: (f64, f64), y: (f64, f64)) -> Option<(f64, f64)> {
    let c = match op {
        BinOp::Add => [x.0 + y.0, x.1 + y.1, x.0 + y.0, x.1 + y.1],
        BinOp::Sub => [x.0 - y.1, x.1 - y.0, x.0 - y.1, x.1 - y.0],
        BinOp::Mul => [x.0 * y.0, x.0 * y.1, x.1 * y.0, x.1 * y.1],
        BinOp::Div if y.0 > 0.0 || y.1 < 0.0 => [x.0 / y.0, x.0 / y.1, x.1 / y.0, x.1 / y.1],
        _ => return None,
    };
    Some((c.iter().copied().fold(f64::INFINITY, f64::min), c.iter().copied().fold(f64::NEG_INFINITY, f64::max)))
}

/// Bounds of a factor that is the same for every score of a launch and finite: `sm_scale`, a
/// finite `f32` literal, a scalar `f32` parameter with a finite declared range, or products and
/// quotients of those (a divisor kept away from 0). With `positive`, every factor and every
/// partial product must be provably positive.
fn uniform_bounds(e: &TExpr, params: &[ParamDecl], positive: bool) -> Option<(f64, f64)> {
    let ok = |lo: f64, hi: f64| (lo.is_finite() && hi.is_finite() && lo <= hi && (!positive || lo > 0.0)).then_some((lo, hi));
    match &e.kind {
        TKind::Builtin(Builtin::SmScale) => Some(SM_SCALE),
        TKind::Lit(Lit::Float(x)) => ok(f64::from(*x), f64::from(*x)),
        TKind::Param(i) => {
            let p = params.get(*i)?;
            if p.ty.dim.is_some() || p.ty.elem != Ty::F32 {
                return None;
            }
            let (lo, hi) = p.range?;
            ok(lo, hi)
        }
        TKind::Binary(op @ (BinOp::Mul | BinOp::Div), a, b) if e.ty == Ty::F32 => {
            let (lo, hi) = interval(*op, uniform_bounds(a, params, positive)?, uniform_bounds(b, params, positive)?)?;
            ok(lo, hi)
        }
        _ => None,
    }
}

/// `e` with every `f32` product regrouped as `(its per-score factors) * (its uniform factors)`,
/// so the uniform part is one value the compiler computes once (`score * sm_scale / cap` becomes
/// `score * (sm_scale / cap)`), where the uniform part is bounded in magnitude by [`UNIT_MAX`]
/// and, where it is a divisor's reciprocal, away from 0. Everything else is rebuilt as it was.
fn regroup(e: &TExpr, params: &[ParamDecl]) -> TExpr {
    let rebuilt = |kind| TExpr { ty: e.ty, kind };
    match &e.kind {
        TKind::Binary(op @ (BinOp::Mul | BinOp::Div), a, b) if e.ty == Ty::F32 => {
            let mut factors = Vec::new();
            flatten(e, false, &mut factors);
            let (uniform, rest): (Vec<_>, Vec<_>) = factors.into_iter().partition(|(f, _)| uniform_bounds(f, params, false).is_some());
            let grouped = product(uniform.iter().map(|(f, inv)| ((*f).clone(), *inv)).collect());
            let fits = uniform_bounds(&grouped, params, false).is_some_and(|(lo, hi)| lo.abs().max(hi.abs()) <= UNIT_MAX);
            if uniform.len() < 2 || rest.is_empty() || !fits {
                // Nothing to gain (or no proof the regrouped product stays finite): only the
                // operands are regrouped.
                return rebuilt(TKind::Binary(*op, Box::new(regroup(a, params)), Box::new(regroup(b, params))));
            }
            let mut all: Vec<(TExpr, bool)> = rest.into_iter().map(|(f, inv)| (regroup(f, params), inv)).collect();
            all.push((grouped, false));
            product(all)
        }
        TKind::Unary(op, a) => rebuilt(TKind::Unary(*op, Box::new(regroup(a, params)))),
        TKind::Binary(op, a, b) => rebuilt(TKind::Binary(*op, Box::new(regroup(a, params)), Box::new(regroup(b, params)))),
        TKind::Call(f, args) => rebuilt(TKind::Call(*f, args.iter().map(|a| regroup(a, params)).collect())),
        TKind::ToF32(a) => rebuilt(TKind::ToF32(Box::new(regroup(a, params)))),
        TKind::Lit(_) | TKind::Builtin(_) | TKind::Param(_) => e.clone(),
    }
}
