//! The tokenizer: source text to a list of tokens, each with its column.

use std::fmt;

use super::Error;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Name(String),
    Int(i64),
    Float(f64),
    Str(String),
    Kw(Kw),
    P(P),
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kw {
    And,
    Or,
    Not,
    In,
    Is,
    If,
    Else,
    For,
    True,
    False,
    None,
    Lambda,
}

/// Punctuation and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum P {
    LParen,
    RParen,
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    Comma,
    Colon,
    Dot,
    Assign,
    Plus,
    Minus,
    Star,
    Slash,
    DoubleSlash,
    Percent,
    DoubleStar,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    /// 1-based, in characters.
    pub(crate) column: usize,
}

impl Kw {
    fn from_name(name: &str) -> Option<Kw> {
        Some(match name {
            "and" => Kw::And,
            "or" => Kw::Or,
            "not" => Kw::Not,
            "in" => Kw::In,
            "is" => Kw::Is,
            "if" => Kw::If,
            "else" => Kw::Else,
            "for" => Kw::For,
            "True" => Kw::True,
            "False" => Kw::False,
            "None" => Kw::None,
            "lambda" => Kw::Lambda,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Kw::And => "and",
            Kw::Or => "or",
            Kw::Not => "not",
            Kw::In => "in",
            Kw::Is => "is",
            Kw::If => "if",
            Kw::Else => "else",
            Kw::For => "for",
            Kw::True => "True",
            Kw::False => "False",
            Kw::None => "None",
            Kw::Lambda => "lambda",
        }
    }
}

impl P {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            P::LParen => "(",
            P::RParen => ")",
            P::LBracket => "[",
            P::RBracket => "]",
            P::LBrace => "{",
            P::RBrace => "}",
            P::Comma => ",",
            P::Colon => ":",
            P::Dot => ".",
            P::Assign => "=",
            P::Plus => "+",
            P::Minus => "-",
            P::Star => "*",
            P::Slash => "/",
            P::DoubleSlash => "//",
            P::Percent => "%",
            P::DoubleStar => "**",
            P::Eq => "==",
            P::Ne => "!=",
            P::Lt => "<",
            P::Le => "<=",
            P::Gt => ">",
            P::Ge => ">=",
        }
    }
}

/// How a token reads in "unexpected ..." messages.
impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Name(name) => write!(f, "name '{name}'"),
            Tok::Int(i) => write!(f, "number {i}"),
            Tok::Float(x) => write!(f, "number {x}"),
            Tok::Str(s) if s.chars().count() > 20 => {
                let head: String = s.chars().take(20).collect();
                write!(f, "string '{head}...'")
            }
            Tok::Str(s) => write!(f, "string '{s}'"),
            Tok::Kw(kw) => write!(f, "keyword '{}'", kw.as_str()),
            Tok::P(p) => write!(f, "'{}'", p.as_str()),
            Tok::End => f.write_str("end of expression"),
        }
    }
}

/// Splits `src` into tokens; the last one is always [`Tok::End`].
pub(crate) fn tokenize(src: &str) -> Result<Vec<Token>, Error> {
    let chars: Vec<char> = src.chars().collect();
    let mut lexer = Lexer {
        chars: &chars,
        pos: 0,
    };
    let mut tokens = Vec::new();
    loop {
        let token = lexer.next_token()?;
        let end = token.tok == Tok::End;
        tokens.push(token);
        if end {
            return Ok(tokens);
        }
    }
}

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
}

fn syntax(problem: impl Into<String>, column: usize) -> Error {
    Error::Syntax {
        problem: problem.into(),
        column,
    }
}

impl Lexer<'_> {
    fn peek(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn next_token(&mut self) -> Result<Token, Error> {
        while matches!(self.peek(0), Some(' ' | '\t' | '\n' | '\r' | '\x0c')) {
            self.pos += 1;
        }
        let column = self.pos + 1;
        let Some(c) = self.peek(0) else {
            return Ok(Token {
                tok: Tok::End,
                column,
            });
        };
        let tok = if c.is_alphabetic() || c == '_' {
            self.name_or_string()?
        } else if c.is_ascii_digit()
            || (c == '.' && self.peek(1).is_some_and(|d| d.is_ascii_digit()))
        {
            self.number()?
        } else if c == '\'' || c == '"' {
            Tok::Str(self.string(false)?)
        } else {
            Tok::P(self.punct(c)?)
        };
        Ok(Token { tok, column })
    }

    fn name_or_string(&mut self) -> Result<Tok, Error> {
        let start = self.pos;
        while self
            .peek(0)
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        let name: String = self
            .chars
            .get(start..self.pos)
            .unwrap_or_default()
            .iter()
            .collect();
        if matches!(self.peek(0), Some('\'' | '"')) {
            match name.to_ascii_lowercase().as_str() {
                "u" => return Ok(Tok::Str(self.string(false)?)),
                "r" => return Ok(Tok::Str(self.string(true)?)),
                "f" | "rf" | "fr" => {
                    return Err(syntax("f-strings are not supported", start + 1));
                }
                "b" | "rb" | "br" => {
                    return Err(syntax("bytes literals are not supported", start + 1));
                }
                _ => {}
            }
        }
        Ok(match Kw::from_name(&name) {
            Some(kw) => Tok::Kw(kw),
            None => Tok::Name(name),
        })
    }

    fn number(&mut self) -> Result<Tok, Error> {
        let start = self.pos;
        let column = start + 1;
        let invalid = |what: &str| syntax(format!("invalid {what} literal"), column);
        let radix = match (self.peek(0), self.peek(1).map(|c| c.to_ascii_lowercase())) {
            (Some('0'), Some('x')) => Some(16),
            (Some('0'), Some('o')) => Some(8),
            (Some('0'), Some('b')) => Some(2),
            _ => None,
        };
        if let Some(radix) = radix {
            self.pos += 2;
            let digits = self.digits(radix, column)?;
            self.reject_suffix(column)?;
            if digits.is_empty() {
                return Err(invalid("integer"));
            }
            return i64::from_str_radix(&digits, radix)
                .map(Tok::Int)
                .map_err(|_| syntax("integer literal is too large for 64 bits", column));
        }
        let int_part = self.digits(10, column)?;
        let mut is_float = false;
        let mut frac_part = String::new();
        if self.peek(0) == Some('.') {
            self.pos += 1;
            is_float = true;
            frac_part = self.digits(10, column)?;
        }
        let mut exponent = String::new();
        if matches!(self.peek(0), Some('e' | 'E')) {
            let sign = match self.peek(1) {
                Some(s @ ('+' | '-')) => Some(s),
                _ => None,
            };
            let first_digit = self.peek(if sign.is_some() { 2 } else { 1 });
            if first_digit.is_some_and(|d| d.is_ascii_digit()) {
                self.pos += if sign.is_some() { 2 } else { 1 };
                is_float = true;
                exponent.extend(sign);
                exponent.push_str(&self.digits(10, column)?);
            }
        }
        self.reject_suffix(column)?;
        if !is_float {
            if int_part.len() > 1 && int_part.starts_with('0') && int_part.chars().any(|d| d != '0')
            {
                return Err(syntax(
                    "leading zeros in decimal integer literals are not permitted",
                    column,
                ));
            }
            return int_part
                .parse::<i64>()
                .map(Tok::Int)
                .map_err(|_| syntax("integer literal is too large for 64 bits", column));
        }
        // Rebuilt in a form Rust's float parser accepts for sure ("1." and ".5" included).
        let int_part = if int_part.is_empty() { "0" } else { &int_part };
        let frac_part = if frac_part.is_empty() {
            "0"
        } else {
            &frac_part
        };
        let exponent = if exponent.is_empty() { "0" } else { &exponent };
        let value: f64 = format!("{int_part}.{frac_part}e{exponent}")
            .parse()
            .map_err(|_| invalid("float"))?;
        if !value.is_finite() {
            return Err(syntax("float literal is out of range", column));
        }
        Ok(Tok::Float(value))
    }

    /// Digits of `radix` with Python's single underscores between them; returns them without
    /// the underscores.
    fn digits(&mut self, radix: u32, column: usize) -> Result<String, Error> {
        let mut out = String::new();
        let mut last_underscore = false;
        while let Some(c) = self.peek(0) {
            if c == '_' {
                if out.is_empty() && radix == 10 || last_underscore {
                    return Err(syntax("invalid underscore in number literal", column));
                }
                last_underscore = true;
            } else if c.is_digit(radix) {
                out.push(c);
                last_underscore = false;
            } else {
                break;
            }
            self.pos += 1;
        }
        if last_underscore {
            return Err(syntax("invalid underscore in number literal", column));
        }
        Ok(out)
    }

    /// A number running straight into a name (`1abc`, `1j`, `0x1g`) is not a number.
    fn reject_suffix(&self, column: usize) -> Result<(), Error> {
        match self.peek(0) {
            Some(c) if c.is_alphanumeric() || c == '_' => {
                Err(syntax("invalid number literal", column))
            }
            _ => Ok(()),
        }
    }

    /// A string literal starting at the current quote.
    fn string(&mut self, raw: bool) -> Result<String, Error> {
        let column = self.pos + 1;
        let Some(quote) = self.peek(0) else {
            return Err(syntax("unterminated string", column));
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek(0) else {
                return Err(syntax("unterminated string", column));
            };
            self.pos += 1;
            match c {
                c if c == quote => return Ok(out),
                '\n' => return Err(syntax("unterminated string", column)),
                '\\' if raw => {
                    // A raw string keeps the backslash but it still protects a quote.
                    out.push('\\');
                    if let Some(next) = self.peek(0) {
                        out.push(next);
                        self.pos += 1;
                    }
                }
                '\\' => self.escape(&mut out)?,
                c => out.push(c),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), Error> {
        let column = self.pos;
        let Some(c) = self.peek(0) else {
            return Err(syntax("unterminated string", column));
        };
        self.pos += 1;
        let simple = match c {
            '\n' => return Ok(()),
            '\\' => '\\',
            '\'' => '\'',
            '"' => '"',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'a' => '\x07',
            'b' => '\x08',
            'f' => '\x0c',
            'v' => '\x0b',
            '0'..='7' => {
                let mut code = c.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match self.peek(0).and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            code = code * 8 + d;
                            self.pos += 1;
                        }
                        None => break,
                    }
                }
                char::from_u32(code).ok_or_else(|| syntax("invalid octal escape", column))?
            }
            'x' => self.hex_escape(2, column)?,
            'u' => self.hex_escape(4, column)?,
            'U' => self.hex_escape(8, column)?,
            'N' => return Err(syntax("\\N{...} escapes are not supported", column)),
            // Python keeps unknown escapes as they are.
            other => {
                out.push('\\');
                other
            }
        };
        out.push(simple);
        Ok(())
    }

    fn hex_escape(&mut self, len: usize, column: usize) -> Result<char, Error> {
        let mut code: u32 = 0;
        for _ in 0..len {
            let digit = self.peek(0).and_then(|d| d.to_digit(16)).ok_or_else(|| {
                syntax(
                    format!("truncated escape: expected {len} hex digits"),
                    column,
                )
            })?;
            code = code * 16 + digit;
            self.pos += 1;
        }
        char::from_u32(code).ok_or_else(|| {
            syntax(
                format!("escape \\x{code:x} is not a Unicode scalar value"),
                column,
            )
        })
    }

    fn punct(&mut self, c: char) -> Result<P, Error> {
        let column = self.pos + 1;
        let next = self.peek(1);
        let (p, len) = match (c, next) {
            ('*', Some('*')) => (P::DoubleStar, 2),
            ('/', Some('/')) => (P::DoubleSlash, 2),
            ('=', Some('=')) => (P::Eq, 2),
            ('!', Some('=')) => (P::Ne, 2),
            ('<', Some('=')) => (P::Le, 2),
            ('>', Some('=')) => (P::Ge, 2),
            ('<', Some('<')) | ('>', Some('>')) => {
                return Err(syntax("bitwise operators are not supported", column));
            }
            ('(', _) => (P::LParen, 1),
            (')', _) => (P::RParen, 1),
            ('[', _) => (P::LBracket, 1),
            (']', _) => (P::RBracket, 1),
            ('{', _) => (P::LBrace, 1),
            ('}', _) => (P::RBrace, 1),
            (',', _) => (P::Comma, 1),
            (':', _) => (P::Colon, 1),
            ('.', _) => (P::Dot, 1),
            ('=', _) => (P::Assign, 1),
            ('+', _) => (P::Plus, 1),
            ('-', _) => (P::Minus, 1),
            ('*', _) => (P::Star, 1),
            ('/', _) => (P::Slash, 1),
            ('%', _) => (P::Percent, 1),
            ('<', _) => (P::Lt, 1),
            ('>', _) => (P::Gt, 1),
            ('&' | '|' | '^' | '~', _) => {
                return Err(syntax("bitwise operators are not supported", column));
            }
            (other, _) => {
                return Err(syntax(format!("unexpected character {other:?}"), column));
            }
        };
        self.pos += len;
        Ok(p)
    }
}
