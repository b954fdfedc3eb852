//! The CPU back end: evaluates a typed hook for one (query, key) pair.
//!
//! Generic over the float type so the reference can run hooks in `f64` while the evaluator's own
//! tests run the `f32` the kernels use. Integer semantics match the CUDA emitter exactly:
//! wrapping `+ - *`, and `/` and `%` by zero give 0 (see `templates/common/hooks.cuh`).

use super::ast::{BinOp, Lit, UnOp};
use super::params::ParamValues;
use super::typed::{Builtin, Func, TExpr, TKind};

/// The float operations hooks need, for `f32` and `f64`.
pub trait Real: Copy + PartialOrd + std::fmt::Debug + Send + Sync + 'static {
    /// `x` in this type (exact).
    fn from_f32(x: f32) -> Self;
    /// `x` in this type (rounded to nearest for `f32` beyond 2^24).
    fn from_i32(x: i32) -> Self;
    /// `x` in this type (rounded to nearest for `f32`).
    fn from_f64(x: f64) -> Self;
    /// The value as an `f64` (exact).
    fn to_f64(self) -> f64;
    /// Truncation toward zero, saturating, NaN to 0 (CUDA's `__float2int_rz`).
    fn to_i32(self) -> i32;
    /// `self + o`.
    fn add(self, o: Self) -> Self;
    /// `self - o`.
    fn sub(self, o: Self) -> Self;
    /// `self * o`.
    fn mul(self, o: Self) -> Self;
    /// `self / o` (IEEE: by zero gives an infinity or NaN).
    fn div(self, o: Self) -> Self;
    /// `-self`.
    fn neg(self) -> Self;
    /// Unary float function `f` applied to `self`; `min`, `max`, `select`, `float`, `int` and `bit`,
    /// which are not ones, return `self`.
    fn apply(self, f: Func) -> Self;
    /// The smaller of the two; if one is NaN, the other.
    fn min(self, o: Self) -> Self;
    /// The larger of the two; if one is NaN, the other.
    fn max(self, o: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            fn from_i32(x: i32) -> Self {
                x as $t
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn to_i32(self) -> i32 {
                self as i32
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
            fn neg(self) -> Self {
                -self
            }
            fn min(self, o: Self) -> Self {
                <$t>::min(self, o)
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
            fn apply(self, f: Func) -> Self {
                match f {
                    Func::Tanh => self.tanh(),
                    Func::Exp => self.exp(),
                    Func::Exp2 => self.exp2(),
                    Func::Log => self.ln(),
                    Func::Log2 => self.log2(),
                    Func::Sqrt => self.sqrt(),
                    Func::Abs => self.abs(),
                    Func::Floor => self.floor(),
                    Func::Sigmoid => 1.0 / (1.0 + (-self).exp()),
                    // Not unary float functions; the checker never routes them here.
                    Func::Min | Func::Max | Func::Select | Func::Float | Func::Int | Func::Bit => self,
                }
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// Integer division as the kernels do it: by zero gives 0, `i32::MIN / -1` wraps.
pub fn idiv(a: i32, b: i32) -> i32 {
    if b == 0 {
        0
    } else {
        a.wrapping_div(b)
    }
}

/// Integer remainder as the kernels do it: by zero gives 0, sign follows the dividend (C).
pub fn irem(a: i32, b: i32) -> i32 {
    if b == 0 {
        0
    } else {
        a.wrapping_rem(b)
    }
}

/// The values a hook reads for one (query row, key) pair.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a, F> {
    /// The raw (unscaled) dot product of the query and the key.
    pub score: F,
    /// The launch's softmax scale.
    pub sm_scale: F,
    /// The query's position in its request's KV sequence (`kv_len - q_len + row`).
    pub q_pos: i32,
    /// The key's position in its request's KV sequence, from 0.
    pub kv_pos: i32,
    /// The query (and output) head.
    pub qo_head: i32,
    /// The KV head that `qo_head` reads.
    pub kv_head: i32,
    /// The request's index in the batch.
    pub req: i32,
    /// The request's number of query tokens.
    pub q_len: i32,
    /// The request's number of KV tokens.
    pub kv_len: i32,
    /// The launch's bound parameter values.
    pub params: &'a ParamValues,
}

/// A hook value: a bool, an integer or a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<F> {
    /// A `bool`.
    B(bool),
    /// An `i32`.
    I(i32),
    /// A float, in the evaluator's float type.
    F(F),
}

impl<F: Real> Val<F> {
    /// The value as a float (a bool is 0 or 1).
    pub fn as_f(self) -> F {
        match self {
            Val::F(x) => x,
            Val::I(i) => F::from_i32(i),
            Val::B(b) => F::from_i32(i32::from(b)),
        }
    }

    /// The value as an `i32`: a float truncates toward zero, saturating, NaN to 0; a bool is 0 or 1.
    pub fn as_i(self) -> i32 {
        match self {
            Val::I(i) => i,
            Val::F(x) => x.to_i32(),
            Val::B(b) => i32::from(b),
        }
    }

    /// The value as a bool: nonzero (NaN included) is true.
    pub fn as_b(self) -> bool {
        match self {
            Val::B(b) => b,
            Val::I(i) => i != 0,
            Val::F(x) => x.to_f64() != 0.0,
        }
    }
}

impl<F: Real> Env<'_, F> {
    fn builtin(&self, b: Builtin) -> Val<F> {
        match b {
            Builtin::Score => Val::F(self.score),
            Builtin::SmScale => Val::F(self.sm_scale),
            Builtin::QPos => Val::I(self.q_pos),
            Builtin::KvPos => Val::I(self.kv_pos),
            Builtin::QoHead => Val::I(self.qo_head),
            Builtin::KvHead => Val::I(self.kv_head),
            Builtin::Req => Val::I(self.req),
            Builtin::QLen => Val::I(self.q_len),
            Builtin::KvLen => Val::I(self.kv_len),
        }
    }
}

/// Evaluates a type-checked expression. Never panics: the checker guarantees the shapes of the
/// tree, and bound parameters guarantee array lengths.
pub fn eval<F: Real>(e: &TExpr, env: &Env<'_, F>) -> Val<F> {
    match &e.kind {
        TKind::Lit(Lit::Bool(b)) => Val::B(*b),
        TKind::Lit(Lit::Int(i)) => Val::I(*i),
        TKind::Lit(Lit::Float(x)) => Val::F(F::from_f32(*x)),
        TKind::Builtin(b) => env.builtin(*b),
        TKind::Param(i) => {
            let index = |b| env.builtin(b).as_i();
            env.params.get::<F>(*i, index)
        }
        TKind::ToF32(a) => Val::F(eval(a, env).as_f()),
        TKind::Unary(UnOp::Neg, a) => match eval(a, env) {
            Val::I(i) => Val::I(i.wrapping_neg()),
            v => Val::F(v.as_f().neg()),
        },
        TKind::Unary(UnOp::Not, a) => Val::B(!eval(a, env).as_b()),
        TKind::Binary(op, a, b) => binary(*op, eval(a, env), eval(b, env)),
        TKind::Call(f, args) => call(*f, args, env),
    }
}

fn binary<F: Real>(op: BinOp, a: Val<F>, b: Val<F>) -> Val<F> {
    use BinOp::*;
    match (a, b) {
        (Val::I(x), Val::I(y)) => match op {
            Add => Val::I(x.wrapping_add(y)),
            Sub => Val::I(x.wrapping_sub(y)),
            Mul => Val::I(x.wrapping_mul(y)),
            Div => Val::I(idiv(x, y)),
            Rem => Val::I(irem(x, y)),
            Lt => Val::B(x < y),
            Le => Val::B(x <= y),
            Gt => Val::B(x > y),
            Ge => Val::B(x >= y),
            Eq => Val::B(x == y),
            Ne => Val::B(x != y),
            And | Or => Val::B(false),
        },
        (Val::B(x), Val::B(y)) => match op {
            And => Val::B(x && y),
            Or => Val::B(x || y),
            Eq => Val::B(x == y),
            Ne => Val::B(x != y),
            _ => Val::B(false),
        },
        (a, b) => {
            let (x, y) = (a.as_f(), b.as_f());
            match op {
                Add => Val::F(x.add(y)),
                Sub => Val::F(x.sub(y)),
                Mul => Val::F(x.mul(y)),
                Div => Val::F(x.div(y)),
                Rem => Val::F(x),
                Lt => Val::B(x < y),
                Le => Val::B(x <= y),
                Gt => Val::B(x > y),
                Ge => Val::B(x >= y),
                Eq => Val::B(x == y),
                Ne => Val::B(x != y),
                And | Or => Val::B(false),
            }
        }
    }
}

fn call<F: Real>(f: Func, args: &[TExpr], env: &Env<'_, F>) -> Val<F> {
    let arg = |i: usize| args.get(i).map_or(Val::I(0), |a| eval(a, env));
    match f {
        Func::Select => {
            // Both branches are evaluated on the GPU too; neither has side effects.
            let (c, x, y) = (arg(0), arg(1), arg(2));
            if c.as_b() {
                x
            } else {
                y
            }
        }
        Func::Min | Func::Max => match (arg(0), arg(1)) {
            (Val::I(x), Val::I(y)) => Val::I(if f == Func::Min { x.min(y) } else { x.max(y) }),
            (x, y) => {
                let (x, y) = (x.as_f(), y.as_f());
                Val::F(if f == Func::Min { x.min(y) } else { x.max(y) })
            }
        },
        Func::Abs => match arg(0) {
            Val::I(i) => Val::I(i.wrapping_abs()),
            v => Val::F(v.as_f().apply(Func::Abs)),
        },
        Func::Int => Val::I(arg(0).as_i()),
        Func::Bit => match args.first().map(|a| &a.kind) {
            Some(TKind::Param(i)) => {
                let row = env.q_pos.wrapping_sub(env.kv_len.wrapping_sub(env.q_len));
                Val::B(env.params.bit(*i, env.req, row, env.kv_pos, env.kv_len))
            }
            _ => Val::B(false),
        },
        Func::Float => Val::F(arg(0).as_f()),
        _ => Val::F(arg(0).as_f().apply(f)),
    }
}
