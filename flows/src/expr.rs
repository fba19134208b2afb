//! The expression language of Globus Flows: the `"name.=": "<expression>"` parameters of
//! `Action`, `Pass` and `ExpressionEval` states, and the `expression` of the expression-eval
//! action.
//!
//! An expression is a restricted subset of Python expressions evaluated over a JSON context,
//! the run's state (with the run context under `_context`):
//!
//! * **Literals**: strings in single or double quotes (with Python's escapes, `r''` raw
//!   strings, adjacent literals concatenated), integers (64-bit; `0x`, `0o`, `0b`, `_`),
//!   floats, `True`, `False`, `None`, lists `[..]`, tuples `(..)` (which become lists), dicts
//!   `{'key': value}` (keys must be strings, as in JSON).
//! * **Names** are keys of the context (or comprehension variables). `a.b` looks up key `b`
//!   of object `a`; `a['b']`, `a[0]`, `a[-1]`, `a[1:]`, `a[::-1]` index and slice lists,
//!   strings and objects as Python does.
//! * **Operators**, with Python's precedence and semantics: `+ - * / // % **` (`str + str`,
//!   `list + list`, `str * int`, `list * int`; `/` always gives a float), comparisons
//!   (chainable: `0 <= i < n`), `in`, `not in`, `is`, `is not`, `and`/`or` (short-circuit,
//!   returning an operand), `not`, and `a if condition else b`.
//! * **Comprehensions**: `[x.name for x in items if x.size > 0]`, with several `for` and
//!   `if` clauses, `for k, v in d.items()` unpacking, dict comprehensions, and generator
//!   expressions as sole argument (`sum(x for x in xs)`).
//! * **Functions** ([`FUNCTIONS`]): Globus' `pathsplit(path)` (`os.path.split` that never
//!   splits the `/~/` home directory), `is_present('a.b')` and `getattr('a.b', default)`,
//!   which look a dotted path up in the context; and Python's `len`, `str`, `int`, `float`,
//!   `bool`, `abs`, `min`, `max`, `sum`, `sorted`, `range`.
//! * **Methods**: of strings `startswith endswith strip lstrip rstrip split rsplit partition
//!   rpartition lower upper replace join find format`, of lists `index count`, of dicts
//!   `get keys values items`.
//!
//! Values are [`serde_json::Value`]s: integers stay integers (overflow is an error, not a big
//! integer), `1 == 1.0 == True` as in Python, and a result that is not finite is an error
//! because JSON cannot hold it. Objects keep their keys sorted (the workspace does not enable
//! serde_json's `preserve_order`), so iterating a dict goes in key order, where Python would
//! go in insertion order.
//!
//! Flow definitions are written by anyone, so nothing here trusts its input: the source
//! length ([`MAX_SOURCE_LEN`]), the nesting depth ([`MAX_DEPTH`]), the work
//! ([`MAX_STEPS`]) and the data one evaluation builds ([`MAX_BUILD_BYTES`]) are bounded, and
//! any input gives a value or an [`Error`] naming the problem and its column.
//!
//! ```
//! use serde_json::json;
//!
//! let state = json!({"source": {"path": "/~/data/"}, "_context": {"run_id": "r1"}});
//! let value = flows::expr::evaluate(
//!     "source.path.rstrip('/') + '/' + _context.run_id",
//!     &state,
//! )?;
//! assert_eq!(value, json!("/~/data/r1"));
//!
//! let error = flows::expr::evaluate("len(source.path", &state).unwrap_err();
//! assert_eq!(
//!     error.to_string(),
//!     "unexpected end of expression at column 16: expected ',' or ')' to close '(' at column 4"
//! );
//! # Ok::<(), flows::expr::Error>(())
//! ```

mod ast;
mod builtins;
mod error;
mod eval;
mod format;
mod lex;
mod meter;
mod methods;
mod parse;
mod value;

use std::str::FromStr;

use serde_json::Value;

pub use error::Error;

/// Longest source accepted, in bytes.
pub const MAX_SOURCE_LEN: usize = 64 * 1024;

/// How deep brackets, prefix operators (`not`, `-`), `**`, conditional expressions and
/// comprehension clauses may nest. Bounds the recursion of parsing and evaluation.
pub const MAX_DEPTH: usize = 64;

/// Most steps one evaluation may take: a step per node evaluated and per loop iteration, and
/// one per 64 bytes or items an operation walks.
pub const MAX_STEPS: u64 = 10_000_000;

/// Most bytes of data one evaluation may build (strings, lists, dicts, copies of context
/// values in the result), counting 32 bytes per value plus the bytes of strings and keys.
pub const MAX_BUILD_BYTES: u64 = 16 * 1024 * 1024;

/// The built-in functions, by name.
pub const FUNCTIONS: &[&str] = &[
    "abs",
    "bool",
    "float",
    "getattr",
    "int",
    "is_present",
    "len",
    "max",
    "min",
    "pathsplit",
    "range",
    "sorted",
    "str",
    "sum",
];

/// A parsed expression, ready to be evaluated any number of times.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    root: ast::Node,
}

impl Expr {
    /// Evaluates the expression with the keys of `ctx` (a JSON object, normally the run's
    /// state) as its names.
    pub fn eval(&self, ctx: &Value) -> Result<Value, Error> {
        eval::evaluate(&self.root, ctx)
    }
}

impl FromStr for Expr {
    type Err = Error;

    fn from_str(src: &str) -> Result<Expr, Error> {
        parse(src)
    }
}

/// Parses `src`, checking its syntax (but not its names, which depend on the context).
pub fn parse(src: &str) -> Result<Expr, Error> {
    parse::parse(src).map(|root| Expr { root })
}

/// Parses and evaluates `src` over `ctx`.
pub fn evaluate(src: &str, ctx: &Value) -> Result<Value, Error> {
    parse(src)?.eval(ctx)
}
