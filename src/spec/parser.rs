//! Recursive-descent parser for one hook expression.
//!
//! Grammar, loosest first: `||`, `&&`, comparisons (non-associative), `+ -`, `* / %`, unary
//! `- !`, then literals, identifiers, calls and parentheses. Nesting depth and length are bounded
//! so that no input, however hostile, can overflow the stack.

use super::ast::{BinOp, Expr, ExprKind, Lit, Span, UnOp};
use super::lexer::{lex, Tok};

/// Longest hook text accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 4096;
/// Deepest nesting accepted (parentheses, unary operators and calls all count).
pub const MAX_DEPTH: usize = 64;

/// A parse failure: where, and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// The offending bytes in the expression's text.
    pub span: Span,
    /// What was expected, and what was found.
    pub message: String,
}

/// Parses one hook expression; text over [`MAX_EXPR_LEN`] bytes, nesting deeper than [`MAX_DEPTH`]
/// and any syntax error are errors.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    if src.len() > MAX_EXPR_LEN {
        return Err(ParseError {
            span: Span::new(0, src.len()),
            message: format!("expression is {} bytes long; the limit is {MAX_EXPR_LEN}", src.len()),
        });
    }
    let toks = lex(src).map_err(|e| ParseError { span: e.span, message: e.message })?;
    let mut p = Parser { toks, pos: 0, depth: 0 };
    if p.peek() == &Tok::Eof {
        return Err(p.error("an expression, found nothing"));
    }
    let e = p.expr(0)?;
    if p.peek() != &Tok::Eof {
        return Err(p.error(&format!("an operator or the end, found {}", p.peek().describe())));
    }
    Ok(e)
}

struct Parser {
    toks: Vec<(Tok, Span)>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].0
    }

    fn span(&self) -> Span {
        self.toks[self.pos].1
    }

    fn bump(&mut self) -> (Tok, Span) {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> ParseError {
        ParseError { span: self.span(), message: format!("expected {expected}") }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ParseError {
                span: self.span(),
                message: format!("expression nested deeper than {MAX_DEPTH} levels"),
            });
        }
        Ok(())
    }

    fn binop(&self) -> Option<BinOp> {
        Some(match self.peek() {
            Tok::OrOr => BinOp::Or,
            Tok::AndAnd => BinOp::And,
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            Tok::EqEq => BinOp::Eq,
            Tok::Ne => BinOp::Ne,
            Tok::Plus => BinOp::Add,
            Tok::Minus => BinOp::Sub,
            Tok::Star => BinOp::Mul,
            Tok::Slash => BinOp::Div,
            Tok::Percent => BinOp::Rem,
            _ => return None,
        })
    }

    /// Precedence climbing: parses operators binding tighter than `min_prec`.
    fn expr(&mut self, min_prec: u8) -> Result<Expr, ParseError> {
        self.enter()?;
        let mut lhs = self.unary()?;
        while let Some(op) = self.binop() {
            let prec = op.precedence();
            if prec <= min_prec {
                break;
            }
            let op_span = self.span();
            self.bump();
            let rhs = self.expr(prec)?;
            if op.is_comparison() {
                if let Some(next) = self.binop().filter(|o| o.is_comparison()) {
                    return Err(ParseError {
                        span: self.span(),
                        message: format!(
                            "comparisons do not chain: `a {} b {} c` must be written with `&&`",
                            op.symbol(),
                            next.symbol()
                        ),
                    });
                }
            }
            let span = lhs.span.to(rhs.span).to(op_span);
            lhs = Expr::new(ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span);
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        let op = match self.peek() {
            Tok::Minus => UnOp::Neg,
            Tok::Bang => UnOp::Not,
            _ => return self.primary(),
        };
        self.enter()?;
        let (_, start) = self.bump();
        let inner = self.unary()?;
        self.depth -= 1;
        let span = start.to(inner.span);
        Ok(Expr::new(ExprKind::Unary(op, Box::new(inner)), span))
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let (tok, span) = self.bump();
        match tok {
            Tok::Int(v) => {
                let v = i32::try_from(v).map_err(|_| ParseError {
                    span,
                    message: format!("integer literal {v} does not fit in i32"),
                })?;
                Ok(Expr::new(ExprKind::Lit(Lit::Int(v)), span))
            }
            Tok::Float(f) => {
                if !f.is_finite() {
                    return Err(ParseError {
                        span,
                        message: "float literal does not fit in f32".to_string(),
                    });
                }
                Ok(Expr::new(ExprKind::Lit(Lit::Float(f)), span))
            }
            Tok::Ident(name) => match name.as_str() {
                "true" => Ok(Expr::new(ExprKind::Lit(Lit::Bool(true)), span)),
                "false" => Ok(Expr::new(ExprKind::Lit(Lit::Bool(false)), span)),
                _ if self.peek() == &Tok::LParen => self.call(name, span),
                _ => Ok(Expr::new(ExprKind::Ident(name), span)),
            },
            Tok::LParen => {
                self.enter()?;
                let inner = self.expr(0)?;
                self.depth -= 1;
                if self.peek() != &Tok::RParen {
                    return Err(self.error(&format!("`)`, found {}", self.peek().describe())));
                }
                self.bump();
                Ok(inner)
            }
            other => {
                self.pos -= usize::from(other != Tok::Eof);
                Err(self.error(&format!("a value, found {}", other.describe())))
            }
        }
    }

    fn call(&mut self, name: String, name_span: Span) -> Result<Expr, ParseError> {
        self.enter()?;
        self.bump(); // `(`
        let mut args = Vec::new();
        if self.peek() != &Tok::RParen {
            loop {
                args.push(self.expr(0)?);
                match self.peek() {
                    Tok::Comma => {
                        self.bump();
                    }
                    Tok::RParen => break,
                    other => {
                        return Err(self.error(&format!("`,` or `)`, found {}", other.describe())))
                    }
                }
            }
        }
        let (_, close) = self.bump();
        self.depth -= 1;
        Ok(Expr::new(ExprKind::Call(name, args), name_span.to(close)))
    }
}
