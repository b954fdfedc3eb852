//! The type checker: untyped [`Expr`] → typed [`TExpr`].
//!
//! Every implicit conversion the language allows (an `i32` meeting an `f32` in arithmetic or a
//! comparison, an integer literal where a float is wanted) is made explicit here as a
//! [`TKind::ToF32`] node, so the CUDA emitter and the CPU evaluator never decide a type on their
//! own and cannot disagree about one.

use super::ast::{BinOp, Expr, ExprKind, Lit, Span, UnOp};

/// The type of a value in the expression language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ty {
    /// A boolean.
    Bool,
    /// A 32-bit signed integer; `+ - *` wrap.
    I32,
    /// A 32-bit float, the precision the kernels use.
    F32,
}

impl Ty {
    /// The type's name as written in specs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::I32 => "i32",
            Ty::F32 => "f32",
        }
    }

    fn is_numeric(self) -> bool {
        self != Ty::Bool
    }
}

/// Values every hook may read (subject to [`Hook::allows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    /// `score`: the raw (unscaled) dot product of the query and the key.
    Score,
    /// `sm_scale`: the softmax scale of the launch.
    SmScale,
    /// `q_pos`: the query's position in its request's KV sequence.
    QPos,
    /// `kv_pos`: the key's position in its request's KV sequence, from 0.
    KvPos,
    /// `qo_head`: the query (and output) head.
    QoHead,
    /// `kv_head`: the KV head that the query head reads.
    KvHead,
    /// `req`: the request's index in the batch.
    Req,
    /// `q_len`: the request's number of query tokens.
    QLen,
    /// `kv_len`: the request's number of KV tokens.
    KvLen,
}

impl Builtin {
    /// Every built-in, in declaration order.
    pub const ALL: [Builtin; 9] = [
        Builtin::Score,
        Builtin::SmScale,
        Builtin::QPos,
        Builtin::KvPos,
        Builtin::QoHead,
        Builtin::KvHead,
        Builtin::Req,
        Builtin::QLen,
        Builtin::KvLen,
    ];

    /// The name hooks read it by, which is also its variable name in the kernels.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Score => "score",
            Builtin::SmScale => "sm_scale",
            Builtin::QPos => "q_pos",
            Builtin::KvPos => "kv_pos",
            Builtin::QoHead => "qo_head",
            Builtin::KvHead => "kv_head",
            Builtin::Req => "req",
            Builtin::QLen => "q_len",
            Builtin::KvLen => "kv_len",
        }
    }

    /// The built-in's type: `f32` for `score` and `sm_scale`, `i32` for the rest.
    pub fn ty(self) -> Ty {
        match self {
            Builtin::Score | Builtin::SmScale => Ty::F32,
            _ => Ty::I32,
        }
    }

    /// The built-in called `s`, if any.
    pub fn from_name(s: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == s)
    }
}

/// A built-in function hooks may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Func {
    /// `tanh(x)`: hyperbolic tangent, in `f32`.
    Tanh,
    /// `exp(x)`: e to the power `x`, in `f32`.
    Exp,
    /// `exp2(x)`: 2 to the power `x`, in `f32`.
    Exp2,
    /// `log(x)`: natural logarithm, in `f32`.
    Log,
    /// `log2(x)`: base-2 logarithm, in `f32`.
    Log2,
    /// `sqrt(x)`: square root, in `f32`.
    Sqrt,
    /// `abs(x)`: absolute value, of the argument's type (wrapping for `i32::MIN`).
    Abs,
    /// `min(a, b)`: the smaller operand, in their common type.
    Min,
    /// `max(a, b)`: the larger operand, in their common type.
    Max,
    /// `floor(x)`: rounding toward negative infinity, in `f32`.
    Floor,
    /// `sigmoid(x)`: `1 / (1 + exp(-x))`, in `f32`.
    Sigmoid,
    /// `select(c, a, b)`: `a` if `c` holds, else `b` (both are evaluated).
    Select,
    /// `float(x)`: conversion to `f32`.
    Float,
    /// `int(x)`: conversion to `i32`, truncating toward zero and saturating, NaN to 0.
    Int,
    /// `bit(m)`: the bit of `bits` parameter `m` for this (query, key).
    Bit,
}

impl Func {
    /// Every function, in declaration order.
    pub const ALL: [Func; 15] = [
        Func::Tanh,
        Func::Exp,
        Func::Exp2,
        Func::Log,
        Func::Log2,
        Func::Sqrt,
        Func::Abs,
        Func::Min,
        Func::Max,
        Func::Floor,
        Func::Sigmoid,
        Func::Select,
        Func::Float,
        Func::Int,
        Func::Bit,
    ];

    /// The name a hook calls it by.
    pub fn name(self) -> &'static str {
        match self {
            Func::Tanh => "tanh",
            Func::Exp => "exp",
            Func::Exp2 => "exp2",
            Func::Log => "log",
            Func::Log2 => "log2",
            Func::Sqrt => "sqrt",
            Func::Abs => "abs",
            Func::Min => "min",
            Func::Max => "max",
            Func::Floor => "floor",
            Func::Sigmoid => "sigmoid",
            Func::Select => "select",
            Func::Float => "float",
            Func::Int => "int",
            Func::Bit => "bit",
        }
    }

    /// How many arguments it takes.
    pub fn arity(self) -> usize {
        match self {
            Func::Min | Func::Max => 2,
            Func::Select => 3,
            _ => 1,
        }
    }

    /// The function called `s`, if any.
    pub fn from_name(s: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// The hooks of a variant; each has its own result type and its own set of readable values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `logits`: the logit of a (query, key) pair, an `f32`.
    Logits,
    /// `mask`: whether a key is visible to a query, a `bool`.
    Mask,
    /// `kv_range.lo`: the first visible `kv_pos` of a query, inclusive, an `i32`.
    KvLo,
    /// `kv_range.hi`: the last visible `kv_pos` of a query, inclusive, an `i32`.
    KvHi,
    /// `sink`: one extra logit per query row, added to the softmax denominator, an `f32`.
    Sink,
}

impl Hook {
    /// The hook's name in specs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Logits => "logits",
            Hook::Mask => "mask",
            Hook::KvLo => "kv_range.lo",
            Hook::KvHi => "kv_range.hi",
            Hook::Sink => "sink",
        }
    }

    /// Whether this hook may read `b`, and if not, why.
    pub fn allows(self, b: Builtin) -> Result<(), &'static str> {
        use Builtin::*;
        match (self, b) {
            (Hook::Mask, Score) => Err("a mask depends on positions only, never on the data"),
            (Hook::KvLo | Hook::KvHi, Score | KvPos) => {
                Err("kv_range bounds the visible kv_pos for a query, so it cannot depend on a key")
            }
            (Hook::KvLo | Hook::KvHi, QoHead) => Err(
                "the query heads of one kv head share every KV load, so kv_range may depend on \
                 kv_head but not qo_head",
            ),
            (Hook::Sink, Score | KvPos) => {
                Err("a sink is one logit per query row, so it cannot depend on a key")
            }
            _ => Ok(()),
        }
    }

    fn result(self) -> Ty {
        match self {
            Hook::Logits | Hook::Sink => Ty::F32,
            Hook::Mask => Ty::Bool,
            Hook::KvLo | Hook::KvHi => Ty::I32,
        }
    }
}

/// What a per-element parameter array is indexed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamDim {
    /// One element per query head, indexed by `qo_head`.
    QoHeads,
    /// One element per KV head, indexed by `kv_head`.
    KvHeads,
    /// One element per request, indexed by `req`.
    Batch,
    /// A `bits` matrix: one bit per (query, key) of each request, read with `bit(name)`.
    QueryKey,
}

impl ParamDim {
    /// The dimension's name in messages; the array dimensions are also spelt so in types (`f32[qo_heads]`).
    pub fn name(self) -> &'static str {
        match self {
            ParamDim::QoHeads => "qo_heads",
            ParamDim::KvHeads => "kv_heads",
            ParamDim::Batch => "batch",
            ParamDim::QueryKey => "query × key",
        }
    }

    /// The built-in that indexes an array of this dimension.
    pub fn index(self) -> Builtin {
        match self {
            ParamDim::QoHeads => Builtin::QoHead,
            ParamDim::KvHeads => Builtin::KvHead,
            ParamDim::Batch => Builtin::Req,
            ParamDim::QueryKey => Builtin::KvPos,
        }
    }
}

/// The declared type of a runtime parameter: a scalar, or an array indexed implicitly by
/// `qo_head`, `kv_head` or `req`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamTy {
    /// The element type (`bool` for a `bits` matrix).
    pub elem: Ty,
    /// What an array is indexed by; `None` for a scalar.
    pub dim: Option<ParamDim>,
}

impl std::fmt::Display for ParamTy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dim {
            None => f.write_str(self.elem.name()),
            Some(ParamDim::QueryKey) => f.write_str("bits"),
            Some(d) => write!(f, "{}[{}]", self.elem.name(), d.name()),
        }
    }
}

/// A type-checked expression node: its type and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TExpr {
    /// The node's type, with every implicit conversion already made explicit.
    pub ty: Ty,
    /// What the node is.
    pub kind: TKind,
}

/// What a [`TExpr`] node is.
#[derive(Debug, Clone, PartialEq)]
pub enum TKind {
    /// A literal.
    Lit(Lit),
    /// A built-in value.
    Builtin(Builtin),
    /// Index into the variant's parameter list.
    Param(usize),
    /// A prefix operator; the operand has the node's type.
    Unary(UnOp, Box<TExpr>),
    /// An infix operator; both operands have one type (a comparison's result is `bool`).
    Binary(BinOp, Box<TExpr>, Box<TExpr>),
    /// A function call; a `bit` call's one argument is the `Param` it reads.
    Call(Func, Vec<TExpr>),
    /// An `i32` used where an `f32` is wanted.
    ToF32(Box<TExpr>),
}

impl TExpr {
    /// Calls `f` on every node, children first.
    pub fn visit(&self, f: &mut dyn FnMut(&TExpr)) {
        match &self.kind {
            TKind::Unary(_, a) | TKind::ToF32(a) => a.visit(f),
            TKind::Binary(_, a, b) => {
                a.visit(f);
                b.visit(f);
            }
            TKind::Call(_, args) => args.iter().for_each(|a| a.visit(f)),
            TKind::Lit(_) | TKind::Builtin(_) | TKind::Param(_) => {}
        }
        f(self);
    }

    /// Whether the expression reads built-in `b`.
    pub fn reads(&self, b: Builtin) -> bool {
        let mut found = false;
        self.visit(&mut |e| found |= e.kind == TKind::Builtin(b));
        found
    }

    /// Nodes in the tree.
    pub fn size(&self) -> usize {
        let mut n = 0;
        self.visit(&mut |_| n += 1);
        n
    }
}

/// A type error: where, and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeError {
    /// The offending sub-expression's bytes in the hook's text.
    pub span: Span,
    /// What was wrong and what was expected.
    pub message: String,
}

/// A parameter as the checker sees it: its name and type.
pub struct ParamSig<'a> {
    /// The parameter's name.
    pub name: &'a str,
    /// The parameter's declared type.
    pub ty: ParamTy,
}

/// Type-checks `e` as hook `hook` with `params` in scope; an `i32` result is widened where the hook
/// wants an `f32`, and any other mismatch with the hook's type is an error.
pub fn check(e: &Expr, hook: Hook, params: &[ParamSig<'_>]) -> Result<TExpr, TypeError> {
    let t = Checker { hook, params }.expr(e)?;
    let want = hook.result();
    match (want, t.ty) {
        (w, got) if w == got => Ok(t),
        (Ty::F32, Ty::I32) => Ok(to_f32(t)),
        (Ty::Bool, got) => Err(TypeError {
            span: e.span,
            message: format!(
                "hook `{}` must be a bool, found {} (compare it, e.g. `x > 0`)",
                hook.name(),
                got.name()
            ),
        }),
        (Ty::I32, Ty::F32) => Err(TypeError {
            span: e.span,
            message: format!(
                "hook `{}` must be an i32 position, found f32 (convert with int(...))",
                hook.name()
            ),
        }),
        (w, got) => Err(TypeError {
            span: e.span,
            message: format!("hook `{}` must be {}, found {}", hook.name(), w.name(), got.name()),
        }),
    }
}

fn to_f32(t: TExpr) -> TExpr {
    if t.ty == Ty::I32 {
        TExpr { ty: Ty::F32, kind: TKind::ToF32(Box::new(t)) }
    } else {
        t
    }
}

fn err<T>(span: Span, message: String) -> Result<T, TypeError> {
    Err(TypeError { span, message })
}

struct Checker<'a> {
    hook: Hook,
    params: &'a [ParamSig<'a>],
}

impl Checker<'_> {
    fn expr(&self, e: &Expr) -> Result<TExpr, TypeError> {
        match &e.kind {
            ExprKind::Lit(l) => {
                let ty = match l {
                    Lit::Bool(_) => Ty::Bool,
                    Lit::Int(_) => Ty::I32,
                    Lit::Float(_) => Ty::F32,
                };
                Ok(TExpr { ty, kind: TKind::Lit(*l) })
            }
            ExprKind::Ident(name) => self.ident(name, e.span),
            ExprKind::Unary(op, a) => {
                let a = self.expr(a)?;
                match (op, a.ty) {
                    (UnOp::Neg, Ty::Bool) => err(
                        e.span,
                        "bool used as a number: `-` needs an i32 or f32 operand".into(),
                    ),
                    (UnOp::Not, t) if t != Ty::Bool => err(
                        e.span,
                        format!("`!` needs a bool operand, found {} (compare it first)", t.name()),
                    ),
                    _ => Ok(TExpr { ty: a.ty, kind: TKind::Unary(*op, Box::new(a)) }),
                }
            }
            ExprKind::Binary(op, a, b) => self.binary(*op, a, b, e.span),
            ExprKind::Call(name, args) => self.call(name, args, e.span),
        }
    }

    fn ident(&self, name: &str, span: Span) -> Result<TExpr, TypeError> {
        if let Some(b) = Builtin::from_name(name) {
            if let Err(why) = self.hook.allows(b) {
                return err(span, format!("hook `{}` cannot read `{name}`: {why}", self.hook.name()));
            }
            return Ok(TExpr { ty: b.ty(), kind: TKind::Builtin(b) });
        }
        if let Some(i) = self.params.iter().position(|p| p.name == name) {
            let ty = self.params[i].ty;
            if ty.dim == Some(ParamDim::QueryKey) {
                return err(span, format!("`{name}` is a bit matrix: read it with bit({name})"));
            }
            if let Some(dim) = ty.dim {
                if let Err(why) = self.hook.allows(dim.index()) {
                    return err(
                        span,
                        format!(
                            "hook `{}` cannot read `{name}`, an array indexed by {}: {why}",
                            self.hook.name(),
                            dim.index().name()
                        ),
                    );
                }
            }
            return Ok(TExpr { ty: ty.elem, kind: TKind::Param(i) });
        }
        if Func::from_name(name).is_some() {
            return err(span, format!("`{name}` is a function: call it as `{name}(...)`"));
        }
        let mut known: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
        known.extend(self.params.iter().map(|p| p.name));
        err(span, format!("unknown identifier `{name}`{}", suggest(name, &known)))
    }

    fn binary(&self, op: BinOp, a: &Expr, b: &Expr, span: Span) -> Result<TExpr, TypeError> {
        let ta = self.expr(a)?;
        let tb = self.expr(b)?;
        let sym = op.symbol();
        let mk = |ty, x, y| Ok(TExpr { ty, kind: TKind::Binary(op, Box::new(x), Box::new(y)) });
        match op {
            BinOp::And | BinOp::Or => {
                for (t, e) in [(&ta, a), (&tb, b)] {
                    if t.ty != Ty::Bool {
                        return err(
                            e.span,
                            format!("`{sym}` needs bool operands, found {}", t.ty.name()),
                        );
                    }
                }
                mk(Ty::Bool, ta, tb)
            }
            BinOp::Eq | BinOp::Ne if ta.ty == Ty::Bool && tb.ty == Ty::Bool => mk(Ty::Bool, ta, tb),
            _ => {
                for (t, e) in [(&ta, a), (&tb, b)] {
                    if t.ty == Ty::Bool {
                        return err(
                            e.span,
                            format!("bool used as a number: `{sym}` needs i32 or f32 operands"),
                        );
                    }
                }
                if op == BinOp::Rem && (ta.ty == Ty::F32 || tb.ty == Ty::F32) {
                    let e = if ta.ty == Ty::F32 { a } else { b };
                    return err(e.span, "`%` needs i32 operands, found f32".into());
                }
                if op == BinOp::Div
                    && ta.ty == Ty::I32
                    && tb.ty == Ty::F32
                    && !matches!(a.kind, ExprKind::Lit(_))
                {
                    return err(
                        span,
                        format!(
                            "integer division by a float: `{a}` is i32 and `{b}` is f32; write \
                             `float({a}) / {b}` to divide as floats or `{a} / int({b})` to divide \
                             as integers"
                        ),
                    );
                }
                let (ta, tb, ty) = unify(ta, tb);
                mk(if op.is_comparison() { Ty::Bool } else { ty }, ta, tb)
            }
        }
    }

    fn call(&self, name: &str, args: &[Expr], span: Span) -> Result<TExpr, TypeError> {
        let Some(f) = Func::from_name(name) else {
            let known: Vec<&str> = Func::ALL.iter().map(|f| f.name()).collect();
            return err(span, format!("unknown function `{name}`{}", suggest(name, &known)));
        };
        if args.len() != f.arity() {
            return err(
                span,
                format!(
                    "wrong number of arguments: `{name}` takes {}, found {}",
                    f.arity(),
                    args.len()
                ),
            );
        }
        if f == Func::Bit {
            let found = match &args[0].kind {
                ExprKind::Ident(n) => self.params.iter().position(|p| p.name == *n && p.ty.dim == Some(ParamDim::QueryKey)),
                _ => None,
            };
            let Some(i) = found else {
                return err(args[0].span, "`bit` takes the name of a `bits` parameter".into());
            };
            if let Err(why) = self.hook.allows(Builtin::KvPos) {
                return err(span, format!("hook `{}` cannot read a bit matrix: {why}", self.hook.name()));
            }
            let arg = TExpr { ty: Ty::Bool, kind: TKind::Param(i) };
            return Ok(TExpr { ty: Ty::Bool, kind: TKind::Call(f, vec![arg]) });
        }
        let mut targs = args.iter().map(|a| self.expr(a)).collect::<Result<Vec<_>, _>>()?;
        let numeric = |i: usize, t: &TExpr| {
            if t.ty.is_numeric() {
                Ok(())
            } else {
                err(args[i].span, format!("bool used as a number: `{name}` needs i32 or f32"))
            }
        };
        let ty = match f {
            Func::Select => {
                if targs[0].ty != Ty::Bool {
                    return err(
                        args[0].span,
                        format!("`select` needs a bool condition, found {}", targs[0].ty.name()),
                    );
                }
                let c = targs.remove(0);
                let (x, y) = (targs.remove(0), targs.remove(0));
                if (x.ty == Ty::Bool) != (y.ty == Ty::Bool) {
                    return err(
                        span,
                        format!(
                            "`select` branches must have one type, found {} and {}",
                            x.ty.name(),
                            y.ty.name()
                        ),
                    );
                }
                let (x, y, ty) = if x.ty == Ty::Bool { (x, y, Ty::Bool) } else { unify(x, y) };
                return Ok(TExpr { ty, kind: TKind::Call(f, vec![c, x, y]) });
            }
            Func::Min | Func::Max => {
                numeric(0, &targs[0])?;
                numeric(1, &targs[1])?;
                let (y, x) = (targs.pop().unwrap_or_else(dummy), targs.pop().unwrap_or_else(dummy));
                let (x, y, ty) = unify(x, y);
                return Ok(TExpr { ty, kind: TKind::Call(f, vec![x, y]) });
            }
            Func::Abs => {
                numeric(0, &targs[0])?;
                targs[0].ty
            }
            Func::Int => {
                numeric(0, &targs[0])?;
                Ty::I32
            }
            _ => {
                numeric(0, &targs[0])?;
                let a = targs.pop().unwrap_or_else(dummy);
                return Ok(TExpr { ty: Ty::F32, kind: TKind::Call(f, vec![to_f32(a)]) });
            }
        };
        Ok(TExpr { ty, kind: TKind::Call(f, targs) })
    }
}

/// Never reached (arity is checked first); keeps the checker free of panics.
fn dummy() -> TExpr {
    TExpr { ty: Ty::I32, kind: TKind::Lit(Lit::Int(0)) }
}

/// Brings two numeric operands to one type: `f32` if either is.
fn unify(a: TExpr, b: TExpr) -> (TExpr, TExpr, Ty) {
    if a.ty == Ty::F32 || b.ty == Ty::F32 {
        (to_f32(a), to_f32(b), Ty::F32)
    } else {
        (a, b, Ty::I32)
    }
}

/// ", did you mean `x`?" for the closest known name, or the list of known names.
fn suggest(name: &str, known: &[&str]) -> String {
    let best = known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .min()
        .filter(|(d, _)| *d <= 2.max(name.len() / 3));
    match best {
        Some((_, k)) => format!(", did you mean `{k}`?"),
        None => format!(" (expected one of: {})", known.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
