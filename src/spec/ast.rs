//! The expression language's syntax tree, as the parser produces it.
//!
//! This is the *untyped* tree: it keeps source spans so the type checker can point at a column,
//! and it pretty-prints back to source text that re-parses to the same tree (the round-trip
//! property tests rely on that). The checker turns it into [`super::typed::TExpr`], which is what
//! both back ends (CUDA emitter, CPU evaluator) consume.

use std::fmt;

/// A half-open byte range `[start, end)` inside one hook's expression text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    /// First byte of the range.
    pub start: usize,
    /// One past the last byte of the range.
    pub end: usize,
}

impl Span {
    /// The span `[start, end)`.
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// A prefix operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    /// `-x`: negation (wrapping for `i32`).
    Neg,
    /// `!x`: logical negation of a bool.
    Not,
}

/// An infix operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    /// `+` (wrapping for `i32`).
    Add,
    /// `-` (wrapping for `i32`).
    Sub,
    /// `*` (wrapping for `i32`).
    Mul,
    /// `/`: truncating for `i32`, where division by zero gives 0.
    Div,
    /// `%`: `i32` only; the sign follows the dividend, and by zero it gives 0.
    Rem,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `==`, on two numbers or two bools.
    Eq,
    /// `!=`, on two numbers or two bools.
    Ne,
    /// `&&`, on bools.
    And,
    /// `||`, on bools.
    Or,
}

impl BinOp {
    /// The operator as written in source, which is also its C++ spelling.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "&&",
            BinOp::Or => "||",
        }
    }

    /// Binding strength; higher binds tighter. Comparisons do not chain.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 5,
        }
    }

    /// Whether the operator is a comparison (`< <= > >= == !=`): it yields a bool and does not chain.
    pub fn is_comparison(self) -> bool {
        self.precedence() == 3
    }
}

/// A literal as written. Float literals are stored as `f32`, the precision the kernels use, so
/// printing with `{:?}` and re-parsing is exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lit {
    /// `true` or `false`.
    Bool(bool),
    /// An integer literal.
    Int(i32),
    /// A float literal, rounded to `f32`.
    Float(f32),
}

/// What an [`Expr`] node is.
#[derive(Debug, Clone)]
pub enum ExprKind {
    /// A literal.
    Lit(Lit),
    /// A name: a built-in or a parameter, resolved by the checker.
    Ident(String),
    /// A prefix operator and its operand.
    Unary(UnOp, Box<Expr>),
    /// An infix operator and its left and right operands.
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// A call: the function's name and its arguments.
    Call(String, Vec<Expr>),
}

/// A node and where it came from. Equality ignores spans: two trees are equal when they mean the
/// same thing, wherever they were written.
#[derive(Debug, Clone)]
pub struct Expr {
    /// What the node is.
    pub kind: ExprKind,
    /// Where the node was written in the hook's text.
    pub span: Span,
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        match (&self.kind, &other.kind) {
            (ExprKind::Lit(a), ExprKind::Lit(b)) => match (a, b) {
                // Bitwise, so that the round trip of -0.0 and 0.0 is told apart.
                (Lit::Float(x), Lit::Float(y)) => x.to_bits() == y.to_bits(),
                _ => a == b,
            },
            (ExprKind::Ident(a), ExprKind::Ident(b)) => a == b,
            (ExprKind::Unary(o1, a), ExprKind::Unary(o2, b)) => o1 == o2 && a == b,
            (ExprKind::Binary(o1, a1, b1), ExprKind::Binary(o2, a2, b2)) => {
                o1 == o2 && a1 == a2 && b1 == b2
            }
            (ExprKind::Call(f1, a1), ExprKind::Call(f2, a2)) => f1 == f2 && a1 == a2,
            _ => false,
        }
    }
}

impl Expr {
    /// A node of `kind` written at `span`.
    pub fn new(kind: ExprKind, span: Span) -> Self {
        Expr { kind, span }
    }
}

/// Prints fully parenthesised source that parses back to the same tree.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Lit(Lit::Bool(b)) => write!(f, "{b}"),
            ExprKind::Lit(Lit::Int(i)) => write!(f, "{i}"),
            ExprKind::Lit(Lit::Float(x)) => write!(f, "{}", format_f32(*x)),
            ExprKind::Ident(name) => f.write_str(name),
            ExprKind::Unary(UnOp::Neg, e) => write!(f, "(-{e})"),
            ExprKind::Unary(UnOp::Not, e) => write!(f, "(!{e})"),
            ExprKind::Binary(op, a, b) => write!(f, "({a} {} {b})", op.symbol()),
            ExprKind::Call(name, args) => {
                write!(f, "{name}(")?;
                for (i, a) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Shortest text that reads back as the same `f32`, always with a `.` or an exponent so that it
/// lexes as a float (and is a valid C++ floating literal once suffixed with `f`).
pub fn format_f32(x: f32) -> String {
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}
