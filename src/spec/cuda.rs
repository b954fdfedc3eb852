//! The CUDA back end: typed hook → one C++ expression.
//!
//! The output is built only from the typed tree, never from the spec's text, so nothing a spec
//! says can reach the template as raw CUDA: identifiers become fixed built-in names or fields of
//! the params struct (`p.u_<name>`, prefixed so no parameter can collide with a C++ keyword or a
//! macro), and every operation is fully parenthesised. Integer arithmetic goes through the
//! helpers in `templates/common/hooks.cuh`, which wrap and divide exactly as
//! [`super::eval`] does.

use super::ast::{format_f32, BinOp, Lit, UnOp};
use super::params::ParamDecl;
use super::typed::{Func, TExpr, TKind, Ty};

/// The C++ name of a parameter's field in the params struct.
pub fn param_field(name: &str) -> String {
    format!("u_{name}")
}

/// The C++ name of a `bits` parameter's second field (the per-request bit offsets). Its prefix
/// differs from [`param_field`]'s, so no parameter name can collide with it (a `bits` parameter
/// `t` beside a parameter `t_off` once declared `u_t_off` twice).
pub fn bits_offsets_field(name: &str) -> String {
    format!("o_{name}")
}

/// The C++ expression for typed hook `e`, fully parenthesised; `params` are the variant's
/// declarations, which `TKind::Param` indexes.
pub fn emit(e: &TExpr, params: &[ParamDecl]) -> String {
    match &e.kind {
        TKind::Lit(Lit::Bool(b)) => b.to_string(),
        TKind::Lit(Lit::Int(i)) => format!("{i}"),
        TKind::Lit(Lit::Float(x)) => format!("{}f", format_f32(*x)),
        TKind::Builtin(b) => b.name().to_string(),
        TKind::Param(i) => {
            let p = &params[*i];
            match p.ty.dim {
                None => format!("p.{}", param_field(&p.name)),
                Some(d) => format!("p.{}[{}]", param_field(&p.name), d.index().name()),
            }
        }
        TKind::ToF32(a) => format!("((float)({}))", emit(a, params)),
        TKind::Unary(UnOp::Neg, a) if a.ty == Ty::I32 => format!("af_ineg({})", emit(a, params)),
        TKind::Unary(UnOp::Neg, a) => format!("(-({}))", emit(a, params)),
        TKind::Unary(UnOp::Not, a) => format!("(!({}))", emit(a, params)),
        TKind::Binary(op, a, b) => {
            let (x, y) = (emit(a, params), emit(b, params));
            let ints = a.ty == Ty::I32;
            let helper = match op {
                BinOp::Add if ints => Some("af_iadd"),
                BinOp::Sub if ints => Some("af_isub"),
                BinOp::Mul if ints => Some("af_imul"),
                BinOp::Div if ints => Some("af_idiv"),
                BinOp::Rem => Some("af_irem"),
                _ => None,
            };
            match helper {
                Some(h) => format!("{h}({x}, {y})"),
                None => format!("({x} {} {y})", op.symbol()),
            }
        }
        TKind::Call(Func::Bit, args) => match args.first().map(|a| &a.kind) {
            Some(TKind::Param(i)) => {
                let (f, off) = (param_field(&params[*i].name), bits_offsets_field(&params[*i].name));
                format!("af_bit(p.{f}, p.{off}, req, af_isub(q_pos, af_isub(kv_len, q_len)), kv_pos, kv_len)")
            }
            _ => "false".to_string(),
        },
        TKind::Call(f, args) => {
            let a: Vec<String> = args.iter().map(|x| emit(x, params)).collect();
            let ints = args.first().is_some_and(|x| x.ty == Ty::I32);
            match f {
                Func::Select => format!("(({}) ? ({}) : ({}))", a[0], a[1], a[2]),
                Func::Min if ints => format!("min({}, {})", a[0], a[1]),
                Func::Max if ints => format!("max({}, {})", a[0], a[1]),
                Func::Min => format!("fminf({}, {})", a[0], a[1]),
                Func::Max => format!("fmaxf({}, {})", a[0], a[1]),
                Func::Abs if ints => format!("af_iabs({})", a[0]),
                Func::Abs => format!("fabsf({})", a[0]),
                Func::Int if ints => a[0].clone(),
                Func::Int => format!("__float2int_rz({})", a[0]),
                Func::Float => format!("((float)({}))", a[0]),
                Func::Tanh => format!("tanhf({})", a[0]),
                Func::Exp => format!("expf({})", a[0]),
                Func::Exp2 => format!("exp2f({})", a[0]),
                Func::Log => format!("logf({})", a[0]),
                Func::Log2 => format!("log2f({})", a[0]),
                Func::Sqrt => format!("sqrtf({})", a[0]),
                Func::Floor => format!("floorf({})", a[0]),
                Func::Sigmoid => format!("af_sigmoid({})", a[0]),
                Func::Bit => "false".to_string(),
            }
        }
    }
}
