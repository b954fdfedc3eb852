//! Tokens of the expression language. The lexer never panics: any byte it does not know is an
//! error with its column.

use super::ast::Span;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Int(i64),
    /// Parsed directly as `f32` (not via `f64`), so printing and re-reading is exact.
    Float(f32),
    Ident(String),
    LParen,
    RParen,
    Comma,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Lt,
    Le,
    Gt,
    Ge,
    EqEq,
    Ne,
    AndAnd,
    OrOr,
    Bang,
    Eof,
}

impl Tok {
    pub fn describe(&self) -> String {
        match self {
            Tok::Int(i) => format!("number `{i}`"),
            Tok::Float(x) => format!("number `{x}`"),
            Tok::Ident(s) => format!("identifier `{s}`"),
            Tok::Eof => "end of expression".to_string(),
            other => format!("`{}`", other.text()),
        }
    }

    fn text(&self) -> &'static str {
        match self {
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::Comma => ",",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Percent => "%",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::EqEq => "==",
            Tok::Ne => "!=",
            Tok::AndAnd => "&&",
            Tok::OrOr => "||",
            Tok::Bang => "!",
            _ => "",
        }
    }
}

/// A lexing failure: where, and what was found.
#[derive(Debug, Clone, PartialEq)]
pub struct LexError {
    pub span: Span,
    pub message: String,
}

pub fn lex(src: &str) -> Result<Vec<(Tok, Span)>, LexError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            let (tok, end) = lex_number(src, i)?;
            out.push((tok, Span::new(start, end)));
            i = end;
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(src[start..i].to_string()), Span::new(start, i)));
            continue;
        }
        let two = bytes.get(i + 1).copied();
        let (tok, len) = match (c, two) {
            (b'<', Some(b'=')) => (Tok::Le, 2),
            (b'>', Some(b'=')) => (Tok::Ge, 2),
            (b'=', Some(b'=')) => (Tok::EqEq, 2),
            (b'!', Some(b'=')) => (Tok::Ne, 2),
            (b'&', Some(b'&')) => (Tok::AndAnd, 2),
            (b'|', Some(b'|')) => (Tok::OrOr, 2),
            (b'(', _) => (Tok::LParen, 1),
            (b')', _) => (Tok::RParen, 1),
            (b',', _) => (Tok::Comma, 1),
            (b'+', _) => (Tok::Plus, 1),
            (b'-', _) => (Tok::Minus, 1),
            (b'*', _) => (Tok::Star, 1),
            (b'/', _) => (Tok::Slash, 1),
            (b'%', _) => (Tok::Percent, 1),
            (b'<', _) => (Tok::Lt, 1),
            (b'>', _) => (Tok::Gt, 1),
            (b'!', _) => (Tok::Bang, 1),
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                let hint = match c {
                    b'=' => " (did you mean `==`?)",
                    b'&' => " (did you mean `&&`?)",
                    b'|' => " (did you mean `||`?)",
                    b'?' | b':' => " (write select(cond, a, b))",
                    _ => "",
                };
                // An invisible character (a NUL, U+2028) is named by its code point, and any other
                // non-ASCII one carries it too (look-alikes of ASCII exist).
                let what = match ch {
                    c if super::invisible(c) => format!("U+{:04X}", c as u32),
                    c if c.is_ascii() => format!("`{c}`"),
                    c => format!("`{c}` (U+{:04X})", c as u32),
                };
                return Err(LexError { span: Span::new(i, i + ch.len_utf8()), message: format!("unexpected character {what}{hint}") });
            }
        };
        out.push((tok, Span::new(i, i + len)));
        i += len;
    }
    out.push((Tok::Eof, Span::new(src.len(), src.len())));
    Ok(out)
}

fn lex_number(src: &str, start: usize) -> Result<(Tok, usize), LexError> {
    let bytes = src.as_bytes();
    let mut i = start;
    let mut is_float = false;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    if i < bytes.len() && bytes[i] == b'.' {
        is_float = true;
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            is_float = true;
            i = j;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    if i < bytes.len() && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
        return Err(LexError {
            span: Span::new(start, i + 1),
            message: format!(
                "malformed number `{}` (no suffixes: write `2.0`, not `2.0f`)",
                &src[start..=i]
            ),
        });
    }
    let text = &src[start..i];
    let span = Span::new(start, i);
    if is_float {
        let x: f32 = text.parse().map_err(|_| LexError {
            span,
            message: format!("malformed number `{text}`"),
        })?;
        Ok((Tok::Float(x), i))
    } else {
        // The parser rejects anything beyond i32; a literal beyond i64 is rejected here, as
        // written (never as a saturated value).
        let v = text.parse::<i64>().map_err(|_| LexError { span, message: format!("integer literal {text} does not fit in i32") })?;
        Ok((Tok::Int(v), i))
    }
}
