//! Whether a variant's `mask` follows from its `kv_range`, so that kernels may skip the mask.
//!
//! Kernels already clamp every query to its `kv_range`. When each conjunct of the mask is a
//! bound on `kv_pos` that is one of the range's own bounds, a key inside the range is visible
//! without evaluating the mask: tiles inside every row's range run with no per-element test at
//! all, and boundary tiles only compare positions. `kv_pos <= q_pos` under `hi: q_pos` is the
//! common case; `q_pos - kv_pos < window` under `lo: q_pos - window + 1` is recognised too.
//!
//! The decision is a proof, not a sample: both sides are reduced to integer linear forms and
//! compared exactly, and the reduction is accepted only where interval arithmetic shows that no
//! sub-expression can wrap in i32 (positions and lengths are below [`crate::kv::MAX_TOKENS`],
//! parameters within their declared `range` clamped to i32, which is all a binding accepts).
//! The arithmetic of the proof itself is i128 and checked, so it cannot wrap either; any doubt
//! — an overflow, an unknown node, a hook too large to analyse — answers "not proven", and the
//! kernels keep the per-element mask.

use std::collections::BTreeMap;

use super::ast::{BinOp, Lit, UnOp};
use super::params::ParamDecl;
use super::typed::{Builtin, Func, TExpr, TKind, Ty};
use super::Variant;

/// `Σ coef · term + constant` over mathematical integers; terms are keyed by their tree.
///
/// Coefficients and the constant are i128 and every operation is checked: a form whose
/// arithmetic would overflow even i128 is no form at all (`None`), never a wrapped one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lin {
    terms: BTreeMap<String, i128>,
    c: i128,
}

impl Lin {
    fn constant(c: i128) -> Lin {
        Lin { terms: BTreeMap::new(), c }
    }
    fn term(key: String) -> Lin {
        Lin { terms: BTreeMap::from([(key, 1)]), c: 0 }
    }
    fn scaled(mut self, k: i128) -> Option<Lin> {
        self.c = self.c.checked_mul(k)?;
        for v in self.terms.values_mut() {
            *v = v.checked_mul(k)?;
        }
        self.terms.retain(|_, v| *v != 0);
        Some(self)
    }
    fn plus(mut self, o: Lin) -> Option<Lin> {
        self.c = self.c.checked_add(o.c)?;
        for (k, v) in o.terms {
            let e = self.terms.entry(k).or_insert(0);
            *e = e.checked_add(v)?;
        }
        self.terms.retain(|_, v| *v != 0);
        Some(self)
    }
}

/// A closed interval of mathematical integers.
type Iv = (i128, i128);

const I32: Iv = (i32::MIN as i128, i32::MAX as i128);

/// Expressions whose typed tree has more nodes than this are not analysed ("not proven"), so a
/// hostile spec cannot make the proof expensive.
pub const MAX_PROOF_NODES: usize = 1024;

fn fits(iv: Iv) -> Option<Iv> {
    (iv.0 >= I32.0 && iv.1 <= I32.1).then_some(iv)
}

/// The values an i32 parameter can take: its declared `range` intersected with i32 (binding
/// refuses anything else), or all of i32 without one. `None` if no i32 lies in the range.
fn param_interval(d: &ParamDecl) -> Option<Iv> {
    let Some((lo, hi)) = d.range else { return Some(I32) };
    if lo.is_nan() || hi.is_nan() {
        return None;
    }
    // Clamp in f64 first: every i32 is exact in f64, so ceil/floor of the clamped bounds are
    // the smallest and largest i32 inside the declared range.
    let lo = lo.max(I32.0 as f64).ceil();
    let hi = hi.min(I32.1 as f64).floor();
    (lo <= hi).then_some((lo as i128, hi as i128))
}

/// The values an integer expression can take, if it never wraps in i32; `None` if it might (or
/// if its value cannot be bounded). Every sub-expression's interval is checked to fit i32, so a
/// `Some` means the kernels' wrapping i32 arithmetic computes the mathematical value.
fn interval(e: &TExpr, params: &[ParamDecl]) -> Option<Iv> {
    let max = crate::kv::MAX_TOKENS as i128;
    let iv = match &e.kind {
        TKind::Lit(Lit::Int(v)) => (i128::from(*v), i128::from(*v)),
        TKind::Builtin(b) => match b {
            Builtin::KvPos | Builtin::QLen | Builtin::KvLen => (0, max),
            // q_pos = kv_len - q_len + i with 0 <= i < q_len.
            Builtin::QPos => (-max, max),
            Builtin::QoHead | Builtin::KvHead | Builtin::Req => (0, I32.1),
            Builtin::Score | Builtin::SmScale => return None,
        },
        TKind::Param(i) => {
            let d = params.get(*i)?;
            if d.ty.elem != Ty::I32 || d.ty.dim == Some(super::typed::ParamDim::QueryKey) {
                return None;
            }
            param_interval(d)?
        }
        TKind::Unary(UnOp::Neg, a) => {
            let (lo, hi) = interval(a, params)?;
            (hi.checked_neg()?, lo.checked_neg()?)
        }
        TKind::Binary(op, a, b) => {
            let (x, y) = (interval(a, params)?, interval(b, params)?);
            match op {
                BinOp::Add => (x.0.checked_add(y.0)?, x.1.checked_add(y.1)?),
                BinOp::Sub => (x.0.checked_sub(y.1)?, x.1.checked_sub(y.0)?),
                BinOp::Mul => {
                    let p = [x.0.checked_mul(y.0)?, x.0.checked_mul(y.1)?, x.1.checked_mul(y.0)?, x.1.checked_mul(y.1)?];
                    (*p.iter().min()?, *p.iter().max()?)
                }
                // |a / b| <= |a| and |a % b| <= |a| (division by zero gives 0), except
                // i32::MIN / -1, which wraps: excluded by requiring a > i32::MIN. A quotient is
                // non-negative only when both operands are; a remainder takes the dividend's sign.
                BinOp::Div | BinOp::Rem if x.0 > I32.0 => {
                    let m = x.0.abs().max(x.1.abs());
                    let nonneg = x.0 >= 0 && (*op == BinOp::Rem || y.0 >= 0);
                    if nonneg {
                        (0, m)
                    } else {
                        (-m, m)
                    }
                }
                _ => return None,
            }
        }
        TKind::Call(Func::Min | Func::Max, args) if args.len() == 2 => {
            let (x, y) = (interval(&args[0], params)?, interval(&args[1], params)?);
            (x.0.min(y.0), x.1.max(y.1))
        }
        _ => return None,
    };
    fits(iv)
}

/// The linear form of a wrap-free integer expression. Sub-trees that are not sums, differences,
/// negations or products by a literal become opaque terms.
fn linear(e: &TExpr, params: &[ParamDecl]) -> Option<Lin> {
    // One interval pass over the whole tree: it fails if any sub-expression may wrap.
    interval(e, params)?;
    linear_form(e)
}

fn linear_form(e: &TExpr) -> Option<Lin> {
    Some(match &e.kind {
        TKind::Lit(Lit::Int(v)) => Lin::constant(i128::from(*v)),
        TKind::Unary(UnOp::Neg, a) => linear_form(a)?.scaled(-1)?,
        TKind::Binary(BinOp::Add, a, b) => linear_form(a)?.plus(linear_form(b)?)?,
        TKind::Binary(BinOp::Sub, a, b) => linear_form(a)?.plus(linear_form(b)?.scaled(-1)?)?,
        TKind::Binary(BinOp::Mul, a, b) => match (&a.kind, &b.kind) {
            (TKind::Lit(Lit::Int(k)), _) => linear_form(b)?.scaled(i128::from(*k))?,
            (_, TKind::Lit(Lit::Int(k))) => linear_form(a)?.scaled(i128::from(*k))?,
            _ => opaque(e)?,
        },
        _ => opaque(e)?,
    })
}

/// An opaque term may not hide `kv_pos`: the bound must be linear in it.
fn opaque(e: &TExpr) -> Option<Lin> {
    if e.reads(Builtin::KvPos) && e.kind != TKind::Builtin(Builtin::KvPos) {
        return None;
    }
    Some(Lin::term(format!("{:?}", e.kind)))
}

/// `kv_pos <= U` (upper) or `kv_pos >= L` (lower).
#[derive(Debug, PartialEq)]
enum Bound {
    Upper(Lin),
    Lower(Lin),
}

fn kv_pos_key() -> String {
    format!("{:?}", TKind::Builtin(Builtin::KvPos))
}

/// The bound a comparison puts on `kv_pos`, if it is one with coefficient ±1.
fn bound(e: &TExpr, params: &[ParamDecl]) -> Option<Bound> {
    let TKind::Binary(op, a, b) = &e.kind else { return None };
    if !matches!(op, BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge) || a.ty != Ty::I32 || b.ty != Ty::I32 {
        return None;
    }
    // a op b  <=>  d op 0 with d = a - b (mathematically: neither side wraps).
    let mut d = linear(a, params)?.plus(linear(b, params)?.scaled(-1)?)?;
    let coef = d.terms.remove(&kv_pos_key())?;
    // d = coef · kv_pos + r.
    let r = d;
    let (upper, strict) = match (op, coef) {
        (BinOp::Le, 1) | (BinOp::Ge, -1) => (true, false),
        (BinOp::Lt, 1) | (BinOp::Gt, -1) => (true, true),
        (BinOp::Ge, 1) | (BinOp::Le, -1) => (false, false),
        (BinOp::Gt, 1) | (BinOp::Lt, -1) => (false, true),
        _ => return None,
    };
    // coef = 1: kv_pos op -r; coef = -1: -kv_pos op -r, i.e. kv_pos op' r.
    let rhs = if coef == 1 { r.scaled(-1)? } else { r };
    let adjust = |l: Lin, k: i128| l.plus(Lin::constant(k));
    Some(match (upper, strict) {
        (true, false) => Bound::Upper(rhs),
        (true, true) => Bound::Upper(adjust(rhs, -1)?),
        (false, false) => Bound::Lower(rhs),
        (false, true) => Bound::Lower(adjust(rhs, 1)?),
    })
}

fn conjuncts<'a>(e: &'a TExpr, out: &mut Vec<&'a TExpr>) {
    match &e.kind {
        TKind::Binary(BinOp::And, a, b) => {
            conjuncts(a, out);
            conjuncts(b, out);
        }
        _ => out.push(e),
    }
}

/// The linear forms a range bound is at most (`min`, for hi) or at least (`max`, for lo).
fn sides(e: &TExpr, f: Func, params: &[ParamDecl], out: &mut Vec<Lin>) -> Option<()> {
    interval(e, params)?;
    match &e.kind {
        TKind::Call(g, args) if *g == f && args.len() == 2 => {
            // Either argument alone may fail to be linear; the other can still match.
            let _ = sides(&args[0], f, params, out);
            let _ = sides(&args[1], f, params, out);
        }
        _ => out.push(linear(e, params)?),
    }
    Some(())
}

/// The answer of [`prove_mask_implied`]: a proof, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Every key inside the range satisfies the mask; kernels may skip it.
    Proven,
    /// No proof (the mask may still hold); kernels evaluate the mask.
    NotProven(String),
}

impl Proof {
    /// Whether it is [`Proof::Proven`].
    pub fn is_proven(&self) -> bool {
        *self == Proof::Proven
    }
}

/// Whether every key inside the variant's `kv_range` satisfies its `mask` (see the module
/// docs), with the reason when it cannot be shown. Hooks larger than [`MAX_PROOF_NODES`] are
/// not analysed.
pub fn prove_mask_implied(v: &Variant) -> Proof {
    let not = |why: &str| Proof::NotProven(why.to_string());
    let Some(mask) = &v.mask else { return not("the variant has no mask") };
    let Some(range) = &v.kv_range else { return not("the variant has no kv_range") };
    let nodes: usize = [Some(mask), range.lo.as_ref(), range.hi.as_ref()].into_iter().flatten().map(|h| h.typed.size()).sum();
    if nodes > MAX_PROOF_NODES {
        return Proof::NotProven(format!("mask and kv_range have {nodes} nodes, more than the {MAX_PROOF_NODES} the prover analyses"));
    }
    let mut his = Vec::new();
    let mut los = Vec::new();
    if let Some(hi) = &range.hi {
        let _ = sides(&hi.typed, Func::Min, &v.params, &mut his);
    }
    if let Some(lo) = &range.lo {
        let _ = sides(&lo.typed, Func::Max, &v.params, &mut los);
    }
    let mut atoms = Vec::new();
    conjuncts(&mask.typed, &mut atoms);
    let proven = atoms.iter().all(|a| match bound(a, &v.params) {
        Some(Bound::Upper(u)) => his.contains(&u),
        Some(Bound::Lower(l)) => los.contains(&l),
        None => false,
    });
    if proven {
        Proof::Proven
    } else {
        not("a conjunct of the mask is not one of kv_range's own bounds on kv_pos, or may wrap in i32")
    }
}

/// Whether every key inside the variant's `kv_range` satisfies its `mask`: `false` when there
/// is no mask or no range, or when it cannot be proven ([`prove_mask_implied`] says why).
pub fn mask_implied_by_range(v: &Variant) -> bool {
    prove_mask_implied(v).is_proven()
}

/// How an integer expression moves as `q_pos` grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Const,
    Up,
    Down,
}

impl Dir {
    fn flip(self) -> Dir {
        match self {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
            Dir::Const => Dir::Const,
        }
    }
    fn join(self, o: Dir) -> Option<Dir> {
        match (self, o) {
            (Dir::Const, d) | (d, Dir::Const) => Some(d),
            (a, b) if a == b => Some(a),
            _ => None,
        }
    }
}

fn direction(e: &TExpr) -> Option<Dir> {
    if !e.reads(Builtin::QPos) {
        return Some(Dir::Const);
    }
    match &e.kind {
        TKind::Builtin(Builtin::QPos) => Some(Dir::Up),
        TKind::Unary(UnOp::Neg, a) => Some(direction(a)?.flip()),
        TKind::Binary(BinOp::Add, a, b) => direction(a)?.join(direction(b)?),
        TKind::Binary(BinOp::Sub, a, b) => direction(a)?.join(direction(b)?.flip()),
        TKind::Binary(BinOp::Mul, a, b) => match (&a.kind, &b.kind) {
            (TKind::Lit(Lit::Int(k)), _) => Some(if *k >= 0 { direction(b)? } else { direction(b)?.flip() }),
            (_, TKind::Lit(Lit::Int(k))) => Some(if *k >= 0 { direction(a)? } else { direction(a)?.flip() }),
            _ => None,
        },
        // Truncating division by a positive constant keeps the order.
        TKind::Binary(BinOp::Div, a, b) => match &b.kind {
            TKind::Lit(Lit::Int(k)) if *k > 0 => direction(a),
            _ => None,
        },
        TKind::Call(Func::Min | Func::Max, args) if args.len() == 2 => direction(&args[0])?.join(direction(&args[1])?),
        _ => None,
    }
}

/// Whether a `kv_range` bound never decreases as `q_pos` grows (and never wraps), so that over
/// consecutive query tokens its extreme values are at the first and last token. The prefill
/// planner uses it to bound a block of rows by two evaluations instead of one per token.
pub fn nondecreasing_in_q_pos(hook: &TExpr, params: &[ParamDecl]) -> bool {
    hook.size() <= MAX_PROOF_NODES
        && interval(hook, params).is_some() && matches!(direction(hook), Some(Dir::Const | Dir::Up))
}
