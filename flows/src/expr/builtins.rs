//! The built-in functions, except `is_present` and `getattr`, which look names up in the
//! evaluation scope and so live in the evaluator.

use std::borrow::Cow;

use serde_json::Value;

use super::error::{Fault, Res};
use super::meter::{Meter, SLOT};
use super::value::{self, float_value, index_value, less, num, to_str, truthy, type_name};

/// Evaluated call arguments.
pub(crate) struct Args<'v> {
    pub(crate) positional: Vec<Cow<'v, Value>>,
    pub(crate) keyword: Vec<(&'v str, Cow<'v, Value>)>,
}

impl<'v> Args<'v> {
    /// Binds the arguments to `params` (each positional or keyword); the first `required`
    /// must be given.
    pub(crate) fn bind<const N: usize>(
        self,
        function: &str,
        params: [&str; N],
        required: usize,
    ) -> Res<[Option<Cow<'v, Value>>; N]> {
        let Args {
            positional,
            keyword,
        } = self;
        if positional.len() > N {
            return Err(Fault::Type(format!(
                "{function}() takes at most {N} argument{} ({} given)",
                if N == 1 { "" } else { "s" },
                positional.len()
            )));
        }
        let mut slots: [Option<Cow<'v, Value>>; N] = std::array::from_fn(|_| None);
        for (slot, arg) in slots.iter_mut().zip(positional) {
            *slot = Some(arg);
        }
        for (name, arg) in keyword {
            let slot = params
                .iter()
                .position(|p| *p == name)
                .and_then(|i| slots.get_mut(i))
                .ok_or_else(|| {
                    Fault::Type(format!(
                        "{function}() got an unexpected keyword argument '{name}'"
                    ))
                })?;
            if slot.is_some() {
                return Err(Fault::Type(format!(
                    "{function}() got multiple values for argument '{name}'"
                )));
            }
            *slot = Some(arg);
        }
        for (slot, param) in slots.iter().zip(params).take(required) {
            if slot.is_none() {
                return Err(Fault::Type(format!(
                    "{function}() missing required argument '{param}'"
                )));
            }
        }
        Ok(slots)
    }

    fn no_keywords(&self, function: &str) -> Res<()> {
        match self.keyword.first() {
            Some((name, _)) => Err(Fault::Type(format!(
                "{function}() got an unexpected keyword argument '{name}'"
            ))),
            None => Ok(()),
        }
    }
}

/// The single required argument `slot` of `function`.
pub(crate) fn required<'v>(slot: Option<Cow<'v, Value>>, function: &str) -> Res<Cow<'v, Value>> {
    slot.ok_or_else(|| Fault::Type(format!("{function}() missing a required argument")))
}

pub(crate) fn expect_str<'a>(v: &'a Value, function: &str) -> Res<&'a str> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(Fault::Type(format!(
            "{function}() argument must be str, not '{}'",
            type_name(other)
        ))),
    }
}

/// A list of strings, charged to the budget.
pub(crate) fn string_list<'a>(
    parts: impl IntoIterator<Item = &'a str>,
    meter: &mut Meter,
) -> Res<Value> {
    let mut out = Vec::new();
    for part in parts {
        meter.build(SLOT + part.len() as u64, "a list")?;
        out.push(Value::String(part.to_owned()));
    }
    Ok(Value::Array(out))
}

/// The items `for x in v` goes through: a list's items, a string's characters, a dict's keys.
pub(crate) fn iterate<'a>(v: &'a Value, meter: &mut Meter) -> Res<Vec<Cow<'a, Value>>> {
    match v {
        Value::Array(items) => {
            meter.scan(items.len())?;
            Ok(items.iter().map(Cow::Borrowed).collect())
        }
        Value::String(s) => {
            let mut out = Vec::new();
            for c in s.chars() {
                meter.build(SLOT + 4, "a list of characters")?;
                out.push(Cow::Owned(Value::String(c.to_string())));
            }
            Ok(out)
        }
        Value::Object(map) => {
            let mut out = Vec::new();
            for key in map.keys() {
                meter.build(SLOT + key.len() as u64, "a list of keys")?;
                out.push(Cow::Owned(Value::String(key.clone())));
            }
            Ok(out)
        }
        other => Err(Fault::Type(format!(
            "'{}' object is not iterable",
            type_name(other)
        ))),
    }
}

/// Calls the built-in `function` (one of [`FUNCTIONS`](super::FUNCTIONS) but `is_present` and
/// `getattr`).
pub(crate) fn call<'v>(function: &str, args: Args<'v>, meter: &mut Meter) -> Res<Cow<'v, Value>> {
    let owned = Cow::Owned;
    match function {
        "len" => {
            let [obj] = args.bind("len", ["obj"], 1)?;
            let obj = required(obj, "len")?;
            let len = match &*obj {
                Value::String(s) => {
                    meter.scan(s.len())?;
                    s.chars().count()
                }
                Value::Array(items) => items.len(),
                Value::Object(map) => map.len(),
                other => {
                    return Err(Fault::Type(format!(
                        "object of type '{}' has no len()",
                        type_name(other)
                    )));
                }
            };
            Ok(owned(Value::from(len)))
        }
        "pathsplit" => {
            let [path] = args.bind("pathsplit", ["path"], 1)?;
            let path = required(path, "pathsplit")?;
            let (head, tail) = pathsplit(expect_str(&path, "pathsplit")?);
            string_list([head, tail], meter).map(owned)
        }
        "str" => {
            let [object] = args.bind("str", ["object"], 0)?;
            match object {
                Some(object) => Ok(owned(Value::String(to_str(&object, meter)?))),
                None => Ok(owned(Value::String(String::new()))),
            }
        }
        "int" => {
            let [x, base] = args.bind("int", ["x", "base"], 0)?;
            to_int(x.as_deref(), base.as_deref()).map(|i| owned(Value::from(i)))
        }
        "float" => {
            let [x] = args.bind("float", ["x"], 0)?;
            to_float(x.as_deref()).and_then(float_value).map(owned)
        }
        "bool" => {
            let [x] = args.bind("bool", ["x"], 0)?;
            Ok(owned(Value::Bool(x.is_some_and(|x| truthy(&x)))))
        }
        "abs" => {
            let [x] = args.bind("abs", ["x"], 1)?;
            let x = required(x, "abs")?;
            match num(&x) {
                Some(value::Num::Int(i)) => i
                    .checked_abs()
                    .map(|i| owned(Value::from(i)))
                    .ok_or(Fault::INT_OVERFLOW),
                Some(value::Num::Float(f)) => float_value(f.abs()).map(owned),
                None => Err(Fault::Type(format!(
                    "bad operand type for abs(): '{}'",
                    type_name(&x)
                ))),
            }
        }
        "min" | "max" => extremum(function, args, meter),
        "sum" => {
            let [iterable, start] = args.bind("sum", ["iterable", "start"], 1)?;
            let iterable = required(iterable, "sum")?;
            let mut total = start.unwrap_or(Cow::Owned(Value::from(0)));
            if let Value::String(_) = &*total {
                return Err(Fault::Type(
                    "sum() can't sum strings (use ''.join(seq) instead)".to_owned(),
                ));
            }
            for item in iterate(&iterable, meter)? {
                meter.step(1)?;
                total = Cow::Owned(value::binary(super::ast::BinOp::Add, total, &item, meter)?);
            }
            Ok(Cow::Owned(meter_own(total, meter)?))
        }
        "sorted" => {
            let [iterable, reverse] = args.bind("sorted", ["iterable", "reverse"], 1)?;
            let iterable = required(iterable, "sorted")?;
            let reverse = reverse.is_some_and(|r| truthy(&r));
            let mut items = Vec::new();
            for item in iterate(&iterable, meter)? {
                items.push(meter_own(item, meter)?);
            }
            let sorted = merge_sort(items, reverse, meter)?;
            Ok(owned(Value::Array(sorted)))
        }
        "range" => {
            args.no_keywords("range")?;
            let bounds: Vec<i64> = args
                .positional
                .iter()
                .map(|v| index_value(v, "range() argument"))
                .collect::<Res<_>>()?;
            let (start, stop, step) = match bounds.as_slice() {
                [stop] => (0, *stop, 1),
                [start, stop] => (*start, *stop, 1),
                [start, stop, step] => (*start, *stop, *step),
                _ => {
                    return Err(Fault::Type(format!(
                        "range() takes 1 to 3 arguments ({} given)",
                        bounds.len()
                    )));
                }
            };
            range(start, stop, step, meter).map(owned)
        }
        other => Err(Fault::Type(format!("'{other}' is not a function"))),
    }
}

/// `v` owned, charging a copy if it was borrowed.
pub(crate) fn meter_own(v: Cow<'_, Value>, meter: &mut Meter) -> Res<Value> {
    match v {
        Cow::Owned(v) => Ok(v),
        Cow::Borrowed(v) => meter.copy(v),
    }
}

/// `os.path.split`, except that Globus Transfer's home directory `/~/` is never split.
pub(crate) fn pathsplit(path: &str) -> (&str, &str) {
    let cut = path.rfind('/').map_or(0, |i| i + 1);
    let head = path.get(..cut).unwrap_or_default();
    let tail = path.get(cut..).unwrap_or_default();
    if head == "/~/" || head.chars().all(|c| c == '/') {
        return (head, tail);
    }
    (head.trim_end_matches('/'), tail)
}

fn to_int(x: Option<&Value>, base: Option<&Value>) -> Res<i64> {
    let Some(x) = x else {
        return Ok(0);
    };
    if let Some(base) = base {
        let base = index_value(base, "int() base")?;
        let Value::String(s) = x else {
            return Err(Fault::Type(
                "int() can't convert non-string with explicit base".to_owned(),
            ));
        };
        let base = u32::try_from(base)
            .ok()
            .filter(|b| (2..=36).contains(b))
            .ok_or_else(|| Fault::Value("int() base must be from 2 to 36".to_owned()))?;
        return parse_int(s, base);
    }
    match x {
        Value::String(s) => parse_int(s, 10),
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::Number(_) => match num(x) {
            Some(value::Num::Int(i)) => Ok(i),
            Some(value::Num::Float(f)) => {
                const LIMIT: f64 = 9_223_372_036_854_775_808.0;
                let whole = f.trunc();
                if (-LIMIT..LIMIT).contains(&whole) {
                    // In range and integral: the conversion is exact.
                    Ok(whole as i64)
                } else {
                    Err(Fault::INT_OVERFLOW)
                }
            }
            None => Err(Fault::INT_OVERFLOW),
        },
        other => Err(Fault::Type(format!(
            "int() argument must be a string or a number, not '{}'",
            type_name(other)
        ))),
    }
}

/// Python's `int(s, base)`: surrounding whitespace, a sign, an optional `0x`/`0o`/`0b`
/// prefix matching the base, and digits with single underscores between them.
fn parse_int(s: &str, base: u32) -> Res<i64> {
    let invalid = || {
        let mut meter = Meter::new();
        let shown = value::repr(&Value::String(s.chars().take(50).collect()), &mut meter)
            .unwrap_or_default();
        Fault::Value(format!(
            "invalid literal for int() with base {base}: {shown}"
        ))
    };
    let trimmed = s.trim();
    let (negative, digits) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, trimmed.get(1..).unwrap_or_default()),
        Some(b'+') => (false, trimmed.get(1..).unwrap_or_default()),
        _ => (false, trimmed),
    };
    let prefix = match base {
        16 => Some(["0x", "0X"]),
        8 => Some(["0o", "0O"]),
        2 => Some(["0b", "0B"]),
        _ => None,
    };
    let (digits, prefixed) =
        match prefix.and_then(|ps| ps.iter().find_map(|p| digits.strip_prefix(p))) {
            Some(rest) => (rest, true),
            None => (digits, false),
        };
    let mut total: i128 = 0;
    let mut seen_digit = false;
    let mut last_underscore = false;
    for c in digits.chars() {
        if c == '_' {
            if last_underscore || (!seen_digit && !prefixed) {
                return Err(invalid());
            }
            last_underscore = true;
            continue;
        }
        let digit = c.to_digit(base).ok_or_else(invalid)?;
        total = total * i128::from(base) + i128::from(digit);
        if total > i128::from(i64::MAX) + 1 {
            return Err(Fault::INT_OVERFLOW);
        }
        seen_digit = true;
        last_underscore = false;
    }
    if !seen_digit || last_underscore {
        return Err(invalid());
    }
    let total = if negative { -total } else { total };
    i64::try_from(total).map_err(|_| Fault::INT_OVERFLOW)
}

fn to_float(x: Option<&Value>) -> Res<f64> {
    let Some(x) = x else {
        return Ok(0.0);
    };
    match x {
        Value::String(s) => {
            let trimmed = s.trim();
            // Underscores only between digits, as in Python.
            let chars: Vec<char> = trimmed.chars().collect();
            let underscores_ok = chars.iter().enumerate().all(|(i, c)| {
                *c != '_'
                    || (i > 0
                        && chars.get(i - 1).is_some_and(char::is_ascii_digit)
                        && chars.get(i + 1).is_some_and(char::is_ascii_digit))
            });
            let cleaned: String = chars.iter().filter(|c| **c != '_').collect();
            match cleaned.parse::<f64>() {
                Ok(f) if underscores_ok && !trimmed.is_empty() => Ok(f),
                _ => Err(Fault::Value(format!(
                    "could not convert string to float: '{}'",
                    s.chars().take(50).collect::<String>()
                ))),
            }
        }
        other => match num(other) {
            Some(n) => Ok(match n {
                value::Num::Int(i) => i as f64,
                value::Num::Float(f) => f,
            }),
            None => Err(Fault::Type(format!(
                "float() argument must be a string or a number, not '{}'",
                type_name(other)
            ))),
        },
    }
}

/// `min` and `max`: of one iterable argument or of several arguments, with an optional
/// `default` for an empty iterable. The first of equal extremes wins, as in Python.
fn extremum<'v>(function: &str, args: Args<'v>, meter: &mut Meter) -> Res<Cow<'v, Value>> {
    let Args {
        positional,
        keyword,
    } = args;
    let mut default = None;
    for (name, value) in keyword {
        if name != "default" || default.is_some() {
            return Err(Fault::Type(format!(
                "{function}() got an unexpected keyword argument '{name}'"
            )));
        }
        default = Some(value);
    }
    let max = function == "max";
    let pick = |items: Vec<Cow<'_, Value>>, meter: &mut Meter| -> Res<Option<Value>> {
        let mut best: Option<Cow<'_, Value>> = None;
        for item in items {
            best = Some(match best {
                None => item,
                Some(current) => {
                    let better = if max {
                        less(&current, &item, meter)?
                    } else {
                        less(&item, &current, meter)?
                    };
                    if better { item } else { current }
                }
            });
        }
        best.map(|b| meter_own(b, meter)).transpose()
    };
    let best = match positional.len() {
        0 => {
            return Err(Fault::Type(format!(
                "{function}() expected at least 1 argument, got 0"
            )));
        }
        1 => {
            let iterable = positional
                .into_iter()
                .next()
                .unwrap_or(Cow::Owned(Value::Null));
            pick(iterate(&iterable, meter)?, meter)?
        }
        _ if default.is_some() => {
            return Err(Fault::Type(format!(
                "cannot specify a default for {function}() with multiple positional arguments"
            )));
        }
        _ => pick(positional, meter)?,
    };
    match (best, default) {
        (Some(best), _) => Ok(Cow::Owned(best)),
        (None, Some(default)) => Ok(default),
        (None, None) => Err(Fault::Value(format!(
            "{function}() arg is an empty sequence"
        ))),
    }
}

/// A stable merge sort whose comparisons may fail (Python's `sorted` of mixed types raises):
/// `slice::sort_by` needs an infallible, consistent order and may panic without one.
fn merge_sort(mut items: Vec<Value>, reverse: bool, meter: &mut Meter) -> Res<Vec<Value>> {
    if items.len() <= 1 {
        return Ok(items);
    }
    let right = items.split_off(items.len() / 2);
    let left = merge_sort(items, reverse, meter)?;
    let right = merge_sort(right, reverse, meter)?;
    let mut out = Vec::with_capacity(left.len() + right.len());
    let mut left = left.into_iter().peekable();
    let mut right = right.into_iter().peekable();
    while let (Some(l), Some(r)) = (left.peek(), right.peek()) {
        // Take from the right only if strictly before the left: equal items keep their order,
        // in either direction (Python's reverse=True is stable too).
        let right_first = if reverse {
            less(l, r, meter)?
        } else {
            less(r, l, meter)?
        };
        let next = if right_first {
            right.next()
        } else {
            left.next()
        };
        out.extend(next);
    }
    out.extend(left);
    out.extend(right);
    Ok(out)
}

fn range(start: i64, stop: i64, step: i64, meter: &mut Meter) -> Res<Value> {
    if step == 0 {
        return Err(Fault::Value("range() arg 3 must not be zero".to_owned()));
    }
    let (start, stop, step) = (i128::from(start), i128::from(stop), i128::from(step));
    let count = if step > 0 && stop > start {
        (stop - start - 1) / step + 1
    } else if step < 0 && start > stop {
        (start - stop - 1) / (-step) + 1
    } else {
        0
    };
    let bytes = u64::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(SLOT))
        .unwrap_or(u64::MAX);
    meter.build(bytes, "a range")?;
    let out = (0..count)
        .filter_map(|k| i64::try_from(start + k * step).ok())
        .map(Value::from)
        .collect();
    Ok(Value::Array(out))
}
