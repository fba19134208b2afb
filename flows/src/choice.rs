//! A `Choice` state's rules: the Amazon States Language's comparison operators over a
//! `Variable`, combined with `And`, `Or` and `Not`.
//!
//! ```
//! use serde_json::json;
//! use flows::choice::Rule;
//!
//! let (rule, next) = Rule::parse_top(&json!({
//!     "And": [
//!         {"Variable": "$.size", "NumericGreaterThan": 10},
//!         {"Variable": "$.name", "StringMatches": "*.h5"}
//!     ],
//!     "Next": "Big"
//! })).unwrap();
//! assert_eq!(next, "Big");
//! assert!(rule.matches(&json!({"size": 11, "name": "scan.h5"}))?);
//! assert!(!rule.matches(&json!({"size": 11, "name": "scan.txt"}))?);
//! # Ok::<(), String>(())
//! ```

use serde_json::{Map, Value};

use crate::path::Path;

/// How deep `And`, `Or` and `Not` may nest.
pub const MAX_DEPTH: usize = 32;

/// A comparison's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `StringEquals`.
    StringEquals,
    /// `StringLessThan`.
    StringLessThan,
    /// `StringGreaterThan`.
    StringGreaterThan,
    /// `StringLessThanEquals`.
    StringLessThanEquals,
    /// `StringGreaterThanEquals`.
    StringGreaterThanEquals,
    /// `StringMatches` (`*` matches any run of characters; `\*` and `\\` are literal).
    StringMatches,
    /// `NumericEquals`.
    NumericEquals,
    /// `NumericLessThan`.
    NumericLessThan,
    /// `NumericGreaterThan`.
    NumericGreaterThan,
    /// `NumericLessThanEquals`.
    NumericLessThanEquals,
    /// `NumericGreaterThanEquals`.
    NumericGreaterThanEquals,
    /// `BooleanEquals`.
    BooleanEquals,
    /// `TimestampEquals`.
    TimestampEquals,
    /// `TimestampLessThan`.
    TimestampLessThan,
    /// `TimestampGreaterThan`.
    TimestampGreaterThan,
    /// `TimestampLessThanEquals`.
    TimestampLessThanEquals,
    /// `TimestampGreaterThanEquals`.
    TimestampGreaterThanEquals,
    /// `IsNull`.
    IsNull,
    /// `IsPresent`.
    IsPresent,
    /// `IsNumeric`.
    IsNumeric,
    /// `IsString`.
    IsString,
    /// `IsBoolean`.
    IsBoolean,
    /// `IsTimestamp`.
    IsTimestamp,
}

const OPS: &[(&str, Op)] = &[
    ("StringEquals", Op::StringEquals),
    ("StringLessThan", Op::StringLessThan),
    ("StringGreaterThan", Op::StringGreaterThan),
    ("StringLessThanEquals", Op::StringLessThanEquals),
    ("StringGreaterThanEquals", Op::StringGreaterThanEquals),
    ("StringMatches", Op::StringMatches),
    ("NumericEquals", Op::NumericEquals),
    ("NumericLessThan", Op::NumericLessThan),
    ("NumericGreaterThan", Op::NumericGreaterThan),
    ("NumericLessThanEquals", Op::NumericLessThanEquals),
    ("NumericGreaterThanEquals", Op::NumericGreaterThanEquals),
    ("BooleanEquals", Op::BooleanEquals),
    ("TimestampEquals", Op::TimestampEquals),
    ("TimestampLessThan", Op::TimestampLessThan),
    ("TimestampGreaterThan", Op::TimestampGreaterThan),
    ("TimestampLessThanEquals", Op::TimestampLessThanEquals),
    ("TimestampGreaterThanEquals", Op::TimestampGreaterThanEquals),
    ("IsNull", Op::IsNull),
    ("IsPresent", Op::IsPresent),
    ("IsNumeric", Op::IsNumeric),
    ("IsString", Op::IsString),
    ("IsBoolean", Op::IsBoolean),
    ("IsTimestamp", Op::IsTimestamp),
];

/// What a comparison compares the variable with.
#[derive(Debug, Clone)]
pub enum Operand {
    /// A constant.
    Value(Value),
    /// The value at a path of the input (the operator's `…Path` form).
    Path(Path),
}

/// A rule.
#[derive(Debug, Clone)]
pub enum Rule {
    /// `Variable` compared by `op`.
    Compare {
        /// `Variable`.
        variable: Path,
        /// The operator.
        op: Op,
        /// What it is compared with.
        operand: Operand,
    },
    /// `And`: every rule matches.
    And(Vec<Rule>),
    /// `Or`: some rule matches.
    Or(Vec<Rule>),
    /// `Not`.
    Not(Box<Rule>),
}

/// An error while reading a rule: the field (relative to the rule, such as `.And[1].Variable`)
/// and what is wrong.
pub type ParseError = (String, String);

impl Rule {
    /// Reads a top-level rule of `Choices`, which names its `Next` state.
    pub fn parse_top(v: &Value) -> Result<(Rule, String), ParseError> {
        let Value::Object(map) = v else {
            return Err((String::new(), "a choice rule is a JSON object".into()));
        };
        let next = match map.get("Next") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err((".Next".into(), "must be a state name".into())),
            None => {
                return Err((
                    ".Next".into(),
                    "missing: the state to go to when the rule matches".into(),
                ));
            }
        };
        let rule = parse(map, true, 0)?;
        Ok((rule, next))
    }

    /// Whether the rule matches `input`. A variable that is absent fails the comparison (but
    /// for `IsPresent`); an operand path that selects nothing is an error.
    pub fn matches(&self, input: &Value) -> Result<bool, String> {
        match self {
            Rule::And(rules) => {
                for r in rules {
                    if !r.matches(input)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Rule::Or(rules) => {
                for r in rules {
                    if r.matches(input)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Rule::Not(r) => Ok(!r.matches(input)?),
            Rule::Compare {
                variable,
                op,
                operand,
            } => {
                let present = variable.is_present(input);
                let expected = match operand {
                    Operand::Value(v) => v.clone(),
                    Operand::Path(p) => p.select(input)?,
                };
                if *op == Op::IsPresent {
                    return Ok(present == (expected == Value::Bool(true)));
                }
                if !present {
                    return Ok(false);
                }
                let value = variable.select(input)?;
                Ok(compare(*op, &value, &expected))
            }
        }
    }
}

fn parse(map: &Map<String, Value>, top: bool, depth: usize) -> Result<Rule, ParseError> {
    if depth > MAX_DEPTH {
        return Err((
            String::new(),
            format!("rules nest more than {MAX_DEPTH} deep"),
        ));
    }
    let allowed_extra: &[&str] = if top {
        &["Next", "Comment"]
    } else {
        &["Comment"]
    };
    if !top {
        if map.contains_key("Next") {
            return Err((".Next".into(), "only a top-level rule names `Next`".into()));
        }
    }
    for (combinator, build) in [
        ("And", Rule::And as fn(Vec<Rule>) -> Rule),
        ("Or", Rule::Or),
    ] {
        if let Some(v) = map.get(combinator) {
            only(map, &[combinator], allowed_extra)?;
            let Value::Array(items) = v else {
                return Err((format!(".{combinator}"), "must be a list of rules".into()));
            };
            if items.is_empty() {
                return Err((format!(".{combinator}"), "needs at least one rule".into()));
            }
            let mut rules = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let Value::Object(m) = item else {
                    return Err((format!(".{combinator}[{i}]"), "a rule is an object".into()));
                };
                rules.push(
                    parse(m, false, depth + 1)
                        .map_err(|(f, e)| (format!(".{combinator}[{i}]{f}"), e))?,
                );
            }
            return Ok(build(rules));
        }
    }
    if let Some(v) = map.get("Not") {
        only(map, &["Not"], allowed_extra)?;
        let Value::Object(m) = v else {
            return Err((".Not".into(), "must be a rule".into()));
        };
        let inner = parse(m, false, depth + 1).map_err(|(f, e)| (format!(".Not{f}"), e))?;
        return Ok(Rule::Not(Box::new(inner)));
    }
    let variable = match map.get("Variable") {
        Some(Value::String(s)) => Path::parse(s).map_err(|e| (".Variable".to_string(), e))?,
        Some(_) => return Err((".Variable".into(), "must be a JSONPath string".into())),
        None => {
            return Err((
                ".Variable".into(),
                "missing: a rule compares a `Variable`, or combines rules with And, Or or Not"
                    .into(),
            ));
        }
    };
    let mut found = None;
    for key in map.keys() {
        if key == "Variable" || allowed_extra.contains(&key.as_str()) {
            continue;
        }
        let (name, by_path) = match key.strip_suffix("Path") {
            Some(n) if OPS.iter().any(|(o, _)| *o == n) => (n, true),
            _ => (key.as_str(), false),
        };
        let Some((_, op)) = OPS.iter().find(|(o, _)| *o == name) else {
            return Err((
                format!(".{key}"),
                "unknown field for a choice rule (not an ASL comparison operator)".into(),
            ));
        };
        if found.is_some() {
            return Err((
                format!(".{key}"),
                "a rule has exactly one comparison operator".into(),
            ));
        }
        let v = &map[key];
        let operand = if by_path {
            match v {
                Value::String(s) => {
                    Operand::Path(Path::parse(s).map_err(|e| (format!(".{key}"), e))?)
                }
                _ => return Err((format!(".{key}"), "must be a JSONPath string".into())),
            }
        } else {
            check_operand(*op, v).map_err(|e| (format!(".{key}"), e))?;
            Operand::Value(v.clone())
        };
        found = Some((*op, operand));
    }
    let Some((op, operand)) = found else {
        return Err((
            String::new(),
            "missing a comparison operator (StringEquals, NumericLessThan, IsPresent, ...)".into(),
        ));
    };
    Ok(Rule::Compare {
        variable,
        op,
        operand,
    })
}

fn only(map: &Map<String, Value>, fields: &[&str], extra: &[&str]) -> Result<(), ParseError> {
    for key in map.keys() {
        if !fields.contains(&key.as_str()) && !extra.contains(&key.as_str()) {
            return Err((
                format!(".{key}"),
                format!("unexpected beside `{}`", fields.join("`, `")),
            ));
        }
    }
    Ok(())
}

fn check_operand(op: Op, v: &Value) -> Result<(), String> {
    use Op::*;
    let ok = match op {
        StringEquals
        | StringLessThan
        | StringGreaterThan
        | StringLessThanEquals
        | StringGreaterThanEquals
        | StringMatches => v.is_string(),
        NumericEquals
        | NumericLessThan
        | NumericGreaterThan
        | NumericLessThanEquals
        | NumericGreaterThanEquals => v.is_number(),
        TimestampEquals
        | TimestampLessThan
        | TimestampGreaterThan
        | TimestampLessThanEquals
        | TimestampGreaterThanEquals => v
            .as_str()
            .is_some_and(|s| crate::time::parse_rfc3339(s).is_some()),
        BooleanEquals | IsNull | IsPresent | IsNumeric | IsString | IsBoolean | IsTimestamp => {
            v.is_boolean()
        }
    };
    if ok {
        Ok(())
    } else {
        Err(match op {
            StringEquals
            | StringLessThan
            | StringGreaterThan
            | StringLessThanEquals
            | StringGreaterThanEquals
            | StringMatches => "must be a string",
            NumericEquals
            | NumericLessThan
            | NumericGreaterThan
            | NumericLessThanEquals
            | NumericGreaterThanEquals => "must be a number",
            TimestampEquals
            | TimestampLessThan
            | TimestampGreaterThan
            | TimestampLessThanEquals
            | TimestampGreaterThanEquals => "must be an RFC 3339 timestamp string",
            _ => "must be true or false",
        }
        .into())
    }
}

/// `value` (the variable's) against `expected` by `op`; values of the wrong type never match.
fn compare(op: Op, value: &Value, expected: &Value) -> bool {
    use Op::*;
    use std::cmp::Ordering::*;
    let ord = |want: &[std::cmp::Ordering], got: Option<std::cmp::Ordering>| {
        got.is_some_and(|o| want.contains(&o))
    };
    let strings = || match (value, expected) {
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    };
    let numbers = || match (value.as_f64(), expected.as_f64()) {
        (Some(a), Some(b)) if value.is_number() && expected.is_number() => {
            match (value.as_i64(), expected.as_i64()) {
                (Some(x), Some(y)) => Some(x.cmp(&y)),
                _ => a.partial_cmp(&b),
            }
        }
        _ => None,
    };
    let times = || match (value.as_str(), expected.as_str()) {
        (Some(a), Some(b)) => {
            match (crate::time::parse_rfc3339(a), crate::time::parse_rfc3339(b)) {
                (Some(x), Some(y)) => Some(x.cmp(&y)),
                _ => None,
            }
        }
        _ => None,
    };
    let is = expected == &Value::Bool(true);
    match op {
        StringEquals => ord(&[Equal], strings()),
        StringLessThan => ord(&[Less], strings()),
        StringGreaterThan => ord(&[Greater], strings()),
        StringLessThanEquals => ord(&[Less, Equal], strings()),
        StringGreaterThanEquals => ord(&[Greater, Equal], strings()),
        StringMatches => match (value.as_str(), expected.as_str()) {
            (Some(s), Some(p)) => glob(p, s),
            _ => false,
        },
        NumericEquals => ord(&[Equal], numbers()),
        NumericLessThan => ord(&[Less], numbers()),
        NumericGreaterThan => ord(&[Greater], numbers()),
        NumericLessThanEquals => ord(&[Less, Equal], numbers()),
        NumericGreaterThanEquals => ord(&[Greater, Equal], numbers()),
        BooleanEquals => matches!((value, expected), (Value::Bool(a), Value::Bool(b)) if a == b),
        TimestampEquals => ord(&[Equal], times()),
        TimestampLessThan => ord(&[Less], times()),
        TimestampGreaterThan => ord(&[Greater], times()),
        TimestampLessThanEquals => ord(&[Less, Equal], times()),
        TimestampGreaterThanEquals => ord(&[Greater, Equal], times()),
        IsNull => value.is_null() == is,
        IsNumeric => value.is_number() == is,
        IsString => value.is_string() == is,
        IsBoolean => value.is_boolean() == is,
        IsTimestamp => {
            value
                .as_str()
                .is_some_and(|s| crate::time::parse_rfc3339(s).is_some())
                == is
        }
        IsPresent => true,
    }
}

/// `StringMatches`: `*` is any run of characters, `\*` a star, `\\` a backslash. Linear in
/// time (no backtracking blow-up on many stars).
fn glob(pattern: &str, s: &str) -> bool {
    // Tokens: Some(c) a literal character, None a star.
    let mut toks = Vec::new();
    let mut it = pattern.chars();
    while let Some(c) = it.next() {
        match c {
            '\\' => toks.push(Some(it.next().unwrap_or('\\'))),
            '*' => toks.push(None),
            c => toks.push(Some(c)),
        }
    }
    let s: Vec<char> = s.chars().collect();
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match toks.get(p) {
            Some(Some(c)) if *c == s[i] => {
                p += 1;
                i += 1;
            }
            Some(None) => {
                star = Some((p, i));
                p += 1;
            }
            _ => match star {
                Some((sp, si)) => {
                    p = sp + 1;
                    i = si + 1;
                    star = Some((sp, si + 1));
                }
                None => return false,
            },
        }
    }
    toks[p.min(toks.len())..].iter().all(Option::is_none)
}
