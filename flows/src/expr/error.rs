//! What can go wrong parsing or evaluating an expression, and where.

/// Why an expression could not be parsed or evaluated.
///
/// Every variant but [`Error::TooLong`] carries the 1-based column (counted in characters) of
/// the token the problem was found at; [`Error::column`] returns it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The source is longer than [`MAX_SOURCE_LEN`](super::MAX_SOURCE_LEN) bytes.
    #[error("expression is {len} bytes long, more than the limit of {limit} bytes")]
    TooLong {
        /// Length of the source in bytes.
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The source is not a valid expression: a bad character or literal, or a construct the
    /// language does not have (lambdas, sets, f-strings, bitwise operators).
    #[error("{problem} at column {column}")]
    Syntax {
        /// What is wrong, e.g. "unterminated string".
        problem: String,
        /// Where.
        column: usize,
    },
    /// A token where the grammar does not allow it.
    #[error("unexpected {found} at column {column}: expected {expected}")]
    Unexpected {
        /// The token found, e.g. "')'" or "end of expression".
        found: String,
        /// What the grammar allows there, e.g. "an expression".
        expected: String,
        /// Where.
        column: usize,
    },
    /// Brackets, operators and comprehension clauses nest deeper than
    /// [`MAX_DEPTH`](super::MAX_DEPTH).
    #[error("expression nests deeper than {limit} levels at column {column}")]
    TooDeep {
        /// The limit.
        limit: usize,
        /// Where the limit was crossed.
        column: usize,
    },
    /// A name that is neither a comprehension variable nor a key of the context.
    #[error("unknown name '{name}' at column {column}: the context has no such key")]
    UnknownName {
        /// The name.
        name: String,
        /// Where.
        column: usize,
    },
    /// A call of a function the language does not have.
    #[error("unknown function '{name}' at column {column} (the functions are {})", super::FUNCTIONS.join(", "))]
    UnknownFunction {
        /// The name called.
        name: String,
        /// Where.
        column: usize,
    },
    /// A key looked up (`a.key`, `a['key']`) that the object does not have.
    #[error("no key '{key}' at column {column}{}", keys_hint(available))]
    MissingKey {
        /// The key.
        key: String,
        /// Some of the keys the object does have (at most eight), to spot a typo.
        available: Vec<String>,
        /// Where.
        column: usize,
    },
    /// An index past either end of a list or string.
    #[error("index {index} is out of range for a {kind} of length {len} at column {column}")]
    IndexOutOfRange {
        /// The index as written (may be negative).
        index: i64,
        /// Length of the list or string.
        len: usize,
        /// "list" or "str".
        kind: &'static str,
        /// Where.
        column: usize,
    },
    /// An operation applied to a value of the wrong type, like Python's `TypeError`.
    #[error("{message} at column {column}")]
    Type {
        /// What, e.g. "unsupported operand types for +: 'str' and 'int'".
        message: String,
        /// Where.
        column: usize,
    },
    /// An argument of the right type but a wrong value, like Python's `ValueError`.
    #[error("{message} at column {column}")]
    Value {
        /// What, e.g. "invalid literal for int() with base 10: 'x'".
        message: String,
        /// Where.
        column: usize,
    },
    /// Division or modulo by zero.
    #[error("division by zero at column {column}")]
    ZeroDivision {
        /// Where.
        column: usize,
    },
    /// A number that does not fit: integers are 64-bit and floats must be finite (JSON has
    /// neither big integers nor infinities).
    #[error("numeric overflow at column {column}: {detail}")]
    Overflow {
        /// Which kind of number overflowed.
        detail: &'static str,
        /// Where.
        column: usize,
    },
    /// Evaluation would build more data than [`MAX_BUILD_BYTES`](super::MAX_BUILD_BYTES) or take
    /// more than [`MAX_STEPS`](super::MAX_STEPS) steps. Expressions come from flow definitions
    /// written by anyone, so both are bounded.
    #[error("{what} at column {column}")]
    Limit {
        /// Which limit and by how much, e.g. "a string of 1000000000000 bytes exceeds ...".
        what: String,
        /// Where.
        column: usize,
    },
}

impl Error {
    /// The 1-based column (in characters) the problem was found at; `None` for
    /// [`Error::TooLong`], which is about the whole source.
    pub fn column(&self) -> Option<usize> {
        match self {
            Error::TooLong { .. } => None,
            Error::Syntax { column, .. }
            | Error::Unexpected { column, .. }
            | Error::TooDeep { column, .. }
            | Error::UnknownName { column, .. }
            | Error::UnknownFunction { column, .. }
            | Error::MissingKey { column, .. }
            | Error::IndexOutOfRange { column, .. }
            | Error::Type { column, .. }
            | Error::Value { column, .. }
            | Error::ZeroDivision { column }
            | Error::Overflow { column, .. }
            | Error::Limit { column, .. } => Some(*column),
        }
    }
}

fn keys_hint(available: &[String]) -> String {
    if available.is_empty() {
        return ": the object is empty".to_owned();
    }
    let keys: Vec<String> = available.iter().map(|k| format!("'{k}'")).collect();
    format!(" (the object has {})", keys.join(", "))
}

/// A runtime error before the evaluator knows which node it belongs to: value-level
/// operations return these and the evaluator adds the column with [`Fault::at`].
#[derive(Debug)]
pub(crate) enum Fault {
    Type(String),
    Value(String),
    MissingKey {
        key: String,
        available: Vec<String>,
    },
    IndexOutOfRange {
        index: i64,
        len: usize,
        kind: &'static str,
    },
    ZeroDivision,
    Overflow(&'static str),
    Limit(String),
}

/// Result of a value-level operation.
pub(crate) type Res<T> = Result<T, Fault>;

/// Most keys [`Error::MissingKey`] lists.
const HINT_KEYS: usize = 8;

impl Fault {
    pub(crate) fn at(self, column: usize) -> Error {
        match self {
            Fault::Type(message) => Error::Type { message, column },
            Fault::Value(message) => Error::Value { message, column },
            Fault::MissingKey { key, available } => Error::MissingKey {
                key,
                available,
                column,
            },
            Fault::IndexOutOfRange { index, len, kind } => Error::IndexOutOfRange {
                index,
                len,
                kind,
                column,
            },
            Fault::ZeroDivision => Error::ZeroDivision { column },
            Fault::Overflow(detail) => Error::Overflow { detail, column },
            Fault::Limit(what) => Error::Limit { what, column },
        }
    }

    /// A missing key in `map`, listing a few of the keys it has.
    pub(crate) fn missing_key(
        key: &str,
        map: &serde_json::Map<String, serde_json::Value>,
    ) -> Fault {
        Fault::MissingKey {
            key: key.to_owned(),
            available: map.keys().take(HINT_KEYS).cloned().collect(),
        }
    }

    pub(crate) const INT_OVERFLOW: Fault = Fault::Overflow("integers are limited to 64 bits");
    pub(crate) const FLOAT_OVERFLOW: Fault =
        Fault::Overflow("the result is not a finite floating-point number");
}
