//! The recursive-descent parser. Binary operators are parsed by precedence climbing (one
//! function for all levels, so that each level of brackets costs few stack frames); the
//! grammar is Python's:
//!
//! ```text
//! test       := or_test ['if' or_test 'else' test]
//! or_test    := and_test ('or' and_test)*
//! and_test   := not_test ('and' not_test)*
//! not_test   := 'not' not_test | comparison
//! comparison := arith (('<'|'>'|'=='|'>='|'<='|'!='|'in'|'not' 'in'|'is'|'is' 'not') arith)*
//! arith      := term (('+'|'-') term)*
//! term       := factor (('*'|'/'|'//'|'%') factor)*
//! factor     := ('+'|'-') factor | power
//! power      := primary ['**' factor]
//! primary    := atom ('.' NAME | '.' NAME '(' args ')' | '[' subscript ']')*
//!             | NAME '(' args ')' (...)*
//! atom       := NAME | NUMBER | STRING+ | 'True' | 'False' | 'None'
//!             | '(' [test (',' test)* [','] | test comp_for] ')'
//!             | '[' [test (',' test)* [','] | test comp_for] ']'
//!             | '{' [test ':' test (',' test ':' test)* [','] | test ':' test comp_for] '}'
//! comp_for   := 'for' NAME (',' NAME)* 'in' or_test ('for' ... | 'if' or_test)*
//! ```

use serde_json::Value;

use super::ast::{Args, BinOp, Clause, CmpOp, Kind, Node, Target, Trailer};
use super::lex::{Kw, P, Tok, Token, tokenize};
use super::{Error, MAX_DEPTH, MAX_SOURCE_LEN};

/// Levels of the binary operators (and `not`), loosest first.
const OR: u8 = 1;
const AND: u8 = 2;
const NOT: u8 = 3;
const CMP: u8 = 4;
const ADD: u8 = 5;
const MUL: u8 = 6;

#[derive(Debug, Clone, Copy)]
enum Infix {
    Or,
    And,
    Cmp(CmpOp),
    Arith(BinOp),
}

pub(crate) fn parse(src: &str) -> Result<Node, Error> {
    if src.len() > MAX_SOURCE_LEN {
        return Err(Error::TooLong {
            len: src.len(),
            limit: MAX_SOURCE_LEN,
        });
    }
    let tokens = tokenize(src)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        depth: 0,
    };
    let node = parser.test()?;
    if parser.peek() != &Tok::End {
        return Err(parser.unexpected("an operator or the end of the expression"));
    }
    Ok(node)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// How many levels of nesting the parser is inside; bounded by [`MAX_DEPTH`].
    depth: usize,
}

const END: Token = Token {
    tok: Tok::End,
    column: 0,
};

impl Parser {
    fn token(&self) -> &Token {
        // The tokenizer always ends the list with `End`, and the parser never moves past it.
        self.tokens
            .get(self.pos)
            .or(self.tokens.last())
            .unwrap_or(&END)
    }

    fn peek(&self) -> &Tok {
        &self.token().tok
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.tokens
            .get(self.pos + ahead)
            .map_or(&Tok::End, |t| &t.tok)
    }

    fn column(&self) -> usize {
        self.token().column
    }

    fn eat(&mut self, p: P) -> bool {
        if self.peek() == &Tok::P(p) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_kw(&mut self, kw: Kw) -> bool {
        if self.peek() == &Tok::Kw(kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn unexpected(&self, expected: impl Into<String>) -> Error {
        Error::Unexpected {
            found: self.peek().to_string(),
            expected: expected.into(),
            column: self.column(),
        }
    }

    fn expect(&mut self, p: P, expected: impl FnOnce() -> String) -> Result<(), Error> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(self.unexpected(expected()))
        }
    }

    /// A full expression, one nesting level deeper: every bracketed sub-expression is parsed
    /// here.
    fn test(&mut self) -> Result<Node, Error> {
        self.enter()?;
        let result = self.conditional();
        self.depth -= 1;
        result
    }

    /// Counts one more level of nesting, refusing to go past [`MAX_DEPTH`].
    fn enter(&mut self) -> Result<(), Error> {
        if self.depth >= MAX_DEPTH {
            return Err(Error::TooDeep {
                limit: MAX_DEPTH,
                column: self.column(),
            });
        }
        self.depth += 1;
        Ok(())
    }

    // The functions on the recursive path (`test`, `conditional`, `binary`, `factor`,
    // `primary`, `atom`, `parenthesized`, `list`, `dict`) do the common case and hand the rest
    // to separate functions: in unoptimized builds a frame holds the temporaries of all of a
    // function's code, and a frame per function per nesting level adds up.

    /// `or_test ['if' or_test 'else' test]`.
    fn conditional(&mut self) -> Result<Node, Error> {
        if self.peek() == &Tok::Kw(Kw::Lambda) {
            return Err(self.lambda());
        }
        let then = self.binary(0)?;
        if self.peek() == &Tok::Kw(Kw::If) {
            self.conditional_rest(then)
        } else {
            Ok(then)
        }
    }

    fn lambda(&self) -> Error {
        Error::Syntax {
            problem: "lambda expressions are not supported".to_owned(),
            column: self.column(),
        }
    }

    /// `if condition else otherwise`, after `then`.
    fn conditional_rest(&mut self, then: Node) -> Result<Node, Error> {
        let column = self.column();
        self.pos += 1;
        let condition = self.binary(0)?;
        if !self.eat_kw(Kw::Else) {
            return Err(self.unexpected(format!(
                "'else' to complete the conditional expression at column {column}"
            )));
        }
        let otherwise = self.test()?;
        Ok(Node {
            kind: Kind::IfElse(Box::new([condition, then, otherwise])),
            column,
        })
    }

    /// The binary operator at the current token, its level, and how many tokens it takes.
    fn infix(&self) -> Option<(Infix, u8, usize)> {
        let cmp = |op| Some((Infix::Cmp(op), CMP, 1));
        let arith = |op, level| Some((Infix::Arith(op), level, 1));
        match (self.peek(), self.peek_at(1)) {
            (Tok::Kw(Kw::Or), _) => Some((Infix::Or, OR, 1)),
            (Tok::Kw(Kw::And), _) => Some((Infix::And, AND, 1)),
            (Tok::P(P::Eq), _) => cmp(CmpOp::Eq),
            (Tok::P(P::Ne), _) => cmp(CmpOp::Ne),
            (Tok::P(P::Lt), _) => cmp(CmpOp::Lt),
            (Tok::P(P::Le), _) => cmp(CmpOp::Le),
            (Tok::P(P::Gt), _) => cmp(CmpOp::Gt),
            (Tok::P(P::Ge), _) => cmp(CmpOp::Ge),
            (Tok::Kw(Kw::In), _) => cmp(CmpOp::In),
            (Tok::Kw(Kw::Not), Tok::Kw(Kw::In)) => Some((Infix::Cmp(CmpOp::NotIn), CMP, 2)),
            (Tok::Kw(Kw::Is), Tok::Kw(Kw::Not)) => Some((Infix::Cmp(CmpOp::IsNot), CMP, 2)),
            (Tok::Kw(Kw::Is), _) => cmp(CmpOp::Is),
            (Tok::P(P::Plus), _) => arith(BinOp::Add, ADD),
            (Tok::P(P::Minus), _) => arith(BinOp::Sub, ADD),
            (Tok::P(P::Star), _) => arith(BinOp::Mul, MUL),
            (Tok::P(P::Slash), _) => arith(BinOp::Div, MUL),
            (Tok::P(P::DoubleSlash), _) => arith(BinOp::FloorDiv, MUL),
            (Tok::P(P::Percent), _) => arith(BinOp::Mod, MUL),
            _ => None,
        }
    }

    /// Precedence climbing: an operand, then runs of binary operators of level `min` or
    /// tighter. `not` is a prefix operator between `and` and the comparisons.
    fn binary(&mut self, min: u8) -> Result<Node, Error> {
        let left = if min <= NOT && self.peek() == &Tok::Kw(Kw::Not) {
            self.not()?
        } else {
            self.factor()?
        };
        if self.infix().is_some_and(|(_, level, _)| level >= min) {
            self.runs(left, min)
        } else {
            Ok(left)
        }
    }

    fn runs(&mut self, mut left: Node, min: u8) -> Result<Node, Error> {
        while let Some((_, level, _)) = self.infix() {
            if level < min {
                break;
            }
            left = self.run(left, level)?;
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Node, Error> {
        let column = self.column();
        self.pos += 1;
        self.enter()?;
        let operand = self.binary(NOT);
        self.depth -= 1;
        Ok(Node {
            kind: Kind::Not(Box::new(operand?)),
            column,
        })
    }

    /// `first` followed by the operators of one `level` and their right operands, as one flat
    /// node: `a + b - c`, `a < b < c`, `a or b or c`.
    fn run(&mut self, first: Node, level: u8) -> Result<Node, Error> {
        let column = first.column;
        let kind = match level {
            OR | AND => {
                let mut operands = vec![first];
                while let Some((_, l, len)) = self.infix() {
                    if l != level {
                        break;
                    }
                    self.pos += len;
                    operands.push(self.binary(level + 1)?);
                }
                if level == OR {
                    Kind::Or(operands)
                } else {
                    Kind::And(operands)
                }
            }
            CMP => {
                let mut rest = Vec::new();
                while let Some((Infix::Cmp(op), _, len)) = self.infix() {
                    let column = self.column();
                    self.pos += len;
                    rest.push((op, column, self.binary(CMP + 1)?));
                }
                Kind::Compare {
                    first: Box::new(first),
                    rest,
                }
            }
            _ => {
                let mut rest = Vec::new();
                while let Some((Infix::Arith(op), l, len)) = self.infix() {
                    if l != level {
                        break;
                    }
                    let column = self.column();
                    self.pos += len;
                    rest.push((op, column, self.binary(level + 1)?));
                }
                Kind::Arith {
                    first: Box::new(first),
                    rest,
                }
            }
        };
        Ok(Node { kind, column })
    }

    /// `('+'|'-') factor | primary ['**' factor]`.
    fn factor(&mut self) -> Result<Node, Error> {
        if let Tok::P(P::Minus | P::Plus) = self.peek() {
            return self.unary();
        }
        let base = self.primary()?;
        if self.peek() == &Tok::P(P::DoubleStar) {
            self.power(base)
        } else {
            Ok(base)
        }
    }

    fn unary(&mut self) -> Result<Node, Error> {
        let column = self.column();
        let neg = self.peek() == &Tok::P(P::Minus);
        self.pos += 1;
        self.enter()?;
        let operand = self.factor();
        self.depth -= 1;
        let operand = Box::new(operand?);
        let kind = if neg {
            Kind::Neg(operand)
        } else {
            Kind::Pos(operand)
        };
        Ok(Node { kind, column })
    }

    /// `base ** factor`: right-associative, and binds tighter than a unary minus on its left.
    fn power(&mut self, base: Node) -> Result<Node, Error> {
        let column = self.column();
        self.pos += 1;
        self.enter()?;
        let exponent = self.factor();
        self.depth -= 1;
        let start = base.column;
        Ok(Node {
            kind: Kind::Arith {
                first: Box::new(base),
                rest: vec![(BinOp::Pow, column, exponent?)],
            },
            column: start,
        })
    }

    fn primary(&mut self) -> Result<Node, Error> {
        let base = self.atom()?;
        match self.peek() {
            Tok::P(P::Dot | P::LBracket | P::LParen) => self.trailers(base),
            _ => Ok(base),
        }
    }

    /// `.name`, `[subscript]` and `(args)` after `base`.
    fn trailers(&mut self, mut base: Node) -> Result<Node, Error> {
        let mut trailers = Vec::new();
        loop {
            let column = self.column();
            match self.peek() {
                Tok::P(P::Dot) => {
                    self.pos += 1;
                    let Tok::Name(name) = self.peek().clone() else {
                        return Err(self.unexpected("an attribute name after '.'"));
                    };
                    self.pos += 1;
                    trailers.push(Trailer::Attr { name, column });
                }
                Tok::P(P::LBracket) => {
                    self.pos += 1;
                    trailers.push(self.subscript(column)?);
                }
                Tok::P(P::LParen) => {
                    let args = self.call_args()?;
                    match (trailers.pop(), &base.kind) {
                        (Some(Trailer::Attr { name, column }), _) => {
                            trailers.push(Trailer::Method(Box::new((name, args)), column));
                        }
                        (None, Kind::Name(function)) => {
                            base = Node {
                                kind: Kind::Call(Box::new((function.clone(), args))),
                                column: base.column,
                            };
                        }
                        _ => {
                            return Err(Error::Syntax {
                                problem: "only functions and methods can be called".to_owned(),
                                column,
                            });
                        }
                    }
                }
                _ => break,
            }
        }
        if trailers.is_empty() {
            return Ok(base);
        }
        let column = base.column;
        Ok(Node {
            kind: Kind::Postfix {
                base: Box::new(base),
                trailers,
            },
            column,
        })
    }

    /// After `[`: an index or a slice, and the closing `]`.
    fn subscript(&mut self, column: usize) -> Result<Trailer, Error> {
        let close = || format!("']' to close '[' at column {column}");
        let lower = if self.peek() == &Tok::P(P::Colon) {
            None
        } else {
            let index = self.test()?;
            if self.peek() != &Tok::P(P::Colon) {
                self.expect(P::RBracket, close)?;
                return Ok(Trailer::Index { index, column });
            }
            Some(index)
        };
        self.expect(P::Colon, close)?;
        let bound = |p: &mut Self| -> Result<Option<Node>, Error> {
            match p.peek() {
                Tok::P(P::Colon | P::RBracket) => Ok(None),
                _ => p.test().map(Some),
            }
        };
        let upper = bound(self)?;
        let step = if self.eat(P::Colon) {
            bound(self)?
        } else {
            None
        };
        self.expect(P::RBracket, close)?;
        Ok(Trailer::Slice {
            lower,
            upper,
            step,
            column,
        })
    }

    /// `( args )`: positional and `name=value` arguments, or a lone generator expression.
    fn call_args(&mut self) -> Result<Args, Error> {
        let open = self.column();
        self.pos += 1;
        let close = || format!("',' or ')' to close '(' at column {open}");
        let mut args = Args::default();
        while !self.eat(P::RParen) {
            let column = self.column();
            if let (Tok::Name(name), Tok::P(P::Assign)) = (self.peek(), self.peek_at(1)) {
                let name = name.clone();
                if args.keyword.iter().any(|(n, _)| *n == name) {
                    return Err(Error::Syntax {
                        problem: format!("keyword argument '{name}' repeated"),
                        column,
                    });
                }
                self.pos += 2;
                args.keyword.push((name, self.test()?));
            } else {
                if !args.keyword.is_empty() {
                    return Err(Error::Syntax {
                        problem: "positional argument follows keyword argument".to_owned(),
                        column,
                    });
                }
                let arg = self.test()?;
                if self.peek() == &Tok::Kw(Kw::For) && args.positional.is_empty() {
                    let comprehension = self.comprehension(arg)?;
                    self.expect(P::RParen, || {
                        format!("')' to close '(' at column {open}: a generator expression must be the only argument")
                    })?;
                    args.positional.push(comprehension);
                    return Ok(args);
                }
                args.positional.push(arg);
            }
            if !self.eat(P::Comma) {
                self.expect(P::RParen, close)?;
                break;
            }
        }
        Ok(args)
    }

    /// Kept small: it is on the recursive path of every bracket.
    fn atom(&mut self) -> Result<Node, Error> {
        match self.peek() {
            Tok::P(P::LParen) => self.parenthesized(),
            Tok::P(P::LBracket) => self.list(),
            Tok::P(P::LBrace) => self.dict(),
            _ => self.simple_atom(),
        }
    }

    /// A name or a literal.
    fn simple_atom(&mut self) -> Result<Node, Error> {
        let Token { tok, column } = self.token().clone();
        let kind = match tok {
            Tok::Name(name) => Kind::Name(name),
            Tok::Int(i) => Kind::Literal(Value::from(i)),
            Tok::Float(x) => Kind::Literal(Value::from(x)),
            Tok::Str(mut s) => {
                // Adjacent literals concatenate, as in Python.
                while let Tok::Str(more) = self.peek_at(1) {
                    s.push_str(more);
                    self.pos += 1;
                }
                Kind::Literal(Value::String(s))
            }
            Tok::Kw(Kw::True) => Kind::Literal(Value::Bool(true)),
            Tok::Kw(Kw::False) => Kind::Literal(Value::Bool(false)),
            Tok::Kw(Kw::None) => Kind::Literal(Value::Null),
            _ => return Err(self.unexpected("an expression")),
        };
        self.pos += 1;
        Ok(Node { kind, column })
    }

    /// `(x)`, a tuple `(x, y)` (a list here), `()`, or a generator expression.
    fn parenthesized(&mut self) -> Result<Node, Error> {
        let open = self.column();
        self.pos += 1;
        if self.eat(P::RParen) {
            return Ok(Node {
                kind: Kind::List(Vec::new()),
                column: open,
            });
        }
        let first = self.test()?;
        if self.eat(P::RParen) {
            Ok(first)
        } else {
            self.parenthesized_rest(first, open)
        }
    }

    /// A tuple or generator expression after its first item.
    fn parenthesized_rest(&mut self, first: Node, open: usize) -> Result<Node, Error> {
        let close = || format!("')' to close '(' at column {open}");
        if self.peek() == &Tok::Kw(Kw::For) {
            let comprehension = self.comprehension(first)?;
            self.expect(P::RParen, close)?;
            return Ok(comprehension);
        }
        if !self.eat(P::Comma) {
            return Err(self.unexpected(format!("',' or ')' to close '(' at column {open}")));
        }
        let mut items = vec![first];
        self.items(P::RParen, open, &mut items)?;
        Ok(Node {
            kind: Kind::List(items),
            column: open,
        })
    }

    fn list(&mut self) -> Result<Node, Error> {
        let open = self.column();
        self.pos += 1;
        if self.eat(P::RBracket) {
            return Ok(Node {
                kind: Kind::List(Vec::new()),
                column: open,
            });
        }
        let first = self.test()?;
        self.list_rest(first, open)
    }

    /// The rest of a list display or comprehension after its first item.
    fn list_rest(&mut self, first: Node, open: usize) -> Result<Node, Error> {
        if self.peek() == &Tok::Kw(Kw::For) {
            let comprehension = self.comprehension(first)?;
            self.expect(P::RBracket, || format!("']' to close '[' at column {open}"))?;
            return Ok(comprehension);
        }
        let mut items = vec![first];
        if self.eat(P::Comma) {
            self.items(P::RBracket, open, &mut items)?;
        } else {
            self.expect(P::RBracket, || {
                format!("',' or ']' to close '[' at column {open}")
            })?;
        }
        Ok(Node {
            kind: Kind::List(items),
            column: open,
        })
    }

    /// The rest of a comma-separated display after a comma, up to and including `close`.
    fn items(&mut self, close: P, open: usize, items: &mut Vec<Node>) -> Result<(), Error> {
        while !self.eat(close) {
            items.push(self.test()?);
            if !self.eat(P::Comma) {
                return self.expect(close, || {
                    format!(
                        "',' or '{}' to close the bracket at column {open}",
                        close.as_str()
                    )
                });
            }
        }
        Ok(())
    }

    fn dict(&mut self) -> Result<Node, Error> {
        let open = self.column();
        self.pos += 1;
        let mut entries = Vec::new();
        while !self.eat(P::RBrace) {
            let key = self.test()?;
            if !self.eat(P::Colon) {
                return Err(self.no_colon(open));
            }
            let value = self.test()?;
            if let Some(comprehension) = self.dict_entry(&mut entries, key, value, open)? {
                return Ok(comprehension);
            }
            if !self.eat(P::Comma) {
                self.expect(P::RBrace, || {
                    format!("',' or '}}' to close '{{' at column {open}")
                })?;
                break;
            }
        }
        Ok(Node {
            kind: Kind::Dict(entries),
            column: open,
        })
    }

    fn no_colon(&self, open: usize) -> Error {
        match self.peek() {
            Tok::P(P::Comma | P::RBrace) => Error::Syntax {
                problem: "sets are not supported".to_owned(),
                column: open,
            },
            _ => self.unexpected("':' after a dict key"),
        }
    }

    /// Adds `key: value` to `entries`, or, if a `for` follows the first entry, parses the
    /// dict comprehension it starts.
    fn dict_entry(
        &mut self,
        entries: &mut Vec<(Node, Node)>,
        key: Node,
        value: Node,
        open: usize,
    ) -> Result<Option<Node>, Error> {
        if entries.is_empty() && self.peek() == &Tok::Kw(Kw::For) {
            let clauses = self.clauses()?;
            self.expect(P::RBrace, || format!("'}}' to close '{{' at column {open}"))?;
            return Ok(Some(Node {
                kind: Kind::DictComp {
                    key: Box::new(key),
                    value: Box::new(value),
                    clauses,
                },
                column: open,
            }));
        }
        entries.push((key, value));
        Ok(None)
    }

    fn comprehension(&mut self, element: Node) -> Result<Node, Error> {
        let column = element.column;
        let clauses = self.clauses()?;
        Ok(Node {
            kind: Kind::ListComp {
                element: Box::new(element),
                clauses,
            },
            column,
        })
    }

    /// `for ... in ... (for ... in ... | if ...)*`. Each clause nests the rest of the
    /// comprehension one level deeper when evaluated, so each counts towards the depth limit.
    fn clauses(&mut self) -> Result<Vec<Clause>, Error> {
        let outer = self.depth;
        let result = self.clauses_inner();
        self.depth = outer;
        result
    }

    fn clauses_inner(&mut self) -> Result<Vec<Clause>, Error> {
        let mut clauses = Vec::new();
        loop {
            if self.depth >= MAX_DEPTH {
                return Err(Error::TooDeep {
                    limit: MAX_DEPTH,
                    column: self.column(),
                });
            }
            if self.eat_kw(Kw::For) {
                self.depth += 1;
                let target = self.target()?;
                if !self.eat_kw(Kw::In) {
                    return Err(self.unexpected("'in' after the names of a 'for' clause"));
                }
                let iter = self.binary(0)?;
                clauses.push(Clause::For { target, iter });
            } else if self.eat_kw(Kw::If) {
                self.depth += 1;
                clauses.push(Clause::If(self.binary(0)?));
            } else {
                return Ok(clauses);
            }
        }
    }

    /// `name`, `a, b` or `(a, b)`.
    fn target(&mut self) -> Result<Target, Error> {
        let parenthesized = self.eat(P::LParen);
        let mut names = Vec::new();
        let mut tuple = false;
        loop {
            let Tok::Name(name) = self.peek().clone() else {
                return Err(self.unexpected("a variable name in a 'for' clause"));
            };
            self.pos += 1;
            names.push(name);
            if !self.eat(P::Comma) {
                break;
            }
            tuple = true;
            if !matches!(self.peek(), Tok::Name(_)) {
                break;
            }
        }
        if parenthesized {
            self.expect(P::RParen, || {
                "')' to close the names of a 'for' clause".to_owned()
            })?;
        }
        match names.pop() {
            Some(name) if !tuple => Ok(Target::Name(name)),
            Some(last) => {
                names.push(last);
                Ok(Target::Tuple(names))
            }
            None => Err(self.unexpected("a variable name in a 'for' clause")),
        }
    }
}
