//! Python's semantics over JSON values: truthiness, equality, ordering, membership,
//! arithmetic, `str()`/`repr()`, indices and slices.
//!
//! The mapping: `null` is `None`, booleans are `bool` (and, as in Python, count as the
//! integers 0 and 1 in arithmetic and comparisons), numbers that fit `i64` are `int`, other
//! numbers are `float`, strings are `str`, arrays are `list` (tuples too), objects are `dict`.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Number, Value};

use super::ast::BinOp;
use super::error::{Fault, Res};
use super::meter::{MAX_VALUE_DEPTH, Meter, SLOT};

/// Refuses to recurse into values nested deeper than [`MAX_VALUE_DEPTH`]: JSON parsed by
/// serde_json is at most 128 deep, but a context built in code could be anything.
pub(crate) fn check_depth(depth: usize) -> Res<()> {
    if depth > MAX_VALUE_DEPTH {
        return Err(Fault::Limit(format!(
            "a value nested deeper than {MAX_VALUE_DEPTH} levels"
        )));
    }
    Ok(())
}

/// Python's name for the type of `v`, for error messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

/// A number as Python sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn float(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(x) => x,
        }
    }

    pub(crate) fn into_value(self) -> Res<Value> {
        match self {
            Num::Int(i) => Ok(Value::from(i)),
            Num::Float(x) => float_value(x),
        }
    }
}

/// A float as a JSON value; JSON has no infinities or NaN.
pub(crate) fn float_value(x: f64) -> Res<Value> {
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or(Fault::FLOAT_OVERFLOW)
}

/// `v` as a number, if it is one (booleans included). Integers beyond `i64` (JSON allows up
/// to `u64`) become floats.
pub(crate) fn num(v: &Value) -> Option<Num> {
    match v {
        Value::Bool(b) => Some(Num::Int(i64::from(*b))),
        Value::Number(n) => n
            .as_i64()
            .map(Num::Int)
            .or_else(|| n.as_f64().map(Num::Float)),
        _ => None,
    }
}

/// `v` as an integer, if it is one (booleans included).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match num(v) {
        Some(Num::Int(i)) => Some(i),
        _ => None,
    }
}

/// Exact comparison of an integer with a float, as Python does it.
fn cmp_int_float(i: i64, x: f64) -> Option<Ordering> {
    if x.is_nan() {
        return None;
    }
    // 2^63 is exactly representable; every float at or beyond it is beyond every i64.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if x >= LIMIT {
        return Some(Ordering::Less);
    }
    if x < -LIMIT {
        return Some(Ordering::Greater);
    }
    let whole = x.trunc();
    // In range and integral, so the conversion is exact.
    let ordering = i.cmp(&(whole as i64));
    Some(ordering.then_with(|| {
        if x > whole {
            Ordering::Less
        } else if x < whole {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    }))
}

fn cmp_num(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Float(y)) => cmp_int_float(x, y),
        (Num::Float(x), Num::Int(y)) => cmp_int_float(y, x).map(Ordering::reverse),
    }
}

/// Python's `==`: deep, `1 == 1.0 == True`, and values of unrelated types are just unequal.
pub(crate) fn eq(a: &Value, b: &Value, meter: &mut Meter) -> Res<bool> {
    eq_at(a, b, meter, 0)
}

fn eq_at(a: &Value, b: &Value, meter: &mut Meter, depth: usize) -> Res<bool> {
    meter.step(1)?;
    check_depth(depth)?;
    Ok(match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => {
            meter.scan(x.len().min(y.len()))?;
            x == y
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            for (p, q) in x.iter().zip(y) {
                if !eq_at(p, q, meter, depth + 1)? {
                    return Ok(false);
                }
            }
            true
        }
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return Ok(false);
            }
            for (key, p) in x {
                match y.get(key) {
                    Some(q) if eq_at(p, q, meter, depth + 1)? => {}
                    _ => return Ok(false),
                }
            }
            true
        }
        // The exact test first: two equal integers beyond i64 are equal even though they
        // compare as (rounded) floats.
        (Value::Number(x), Value::Number(y)) if x == y => true,
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => cmp_num(x, y) == Some(Ordering::Equal),
            _ => false,
        },
    })
}

/// Python's ordering for `<`, `<=`, `>`, `>=` (named by `op` in errors): numbers with
/// numbers, strings with strings, lists element-wise; anything else is a type error.
pub(crate) fn compare(a: &Value, b: &Value, op: &str, meter: &mut Meter) -> Res<Ordering> {
    compare_at(a, b, op, meter, 0)
}

fn compare_at(a: &Value, b: &Value, op: &str, meter: &mut Meter, depth: usize) -> Res<Ordering> {
    meter.step(1)?;
    check_depth(depth)?;
    match (a, b) {
        (Value::String(x), Value::String(y)) => {
            meter.scan(x.len().min(y.len()))?;
            // Byte order of UTF-8 is code point order, which is Python's order.
            Ok(x.cmp(y))
        }
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                if !eq_at(p, q, meter, depth + 1)? {
                    return compare_at(p, q, op, meter, depth + 1);
                }
            }
            Ok(x.len().cmp(&y.len()))
        }
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => cmp_num(x, y).ok_or_else(|| not_comparable(a, b, op)),
            _ => Err(not_comparable(a, b, op)),
        },
    }
}

fn not_comparable(a: &Value, b: &Value, op: &str) -> Fault {
    Fault::Type(format!(
        "'{op}' not supported between instances of '{}' and '{}'",
        type_name(a),
        type_name(b)
    ))
}

/// `a < b`, for sorting, `min` and `max`.
pub(crate) fn less(a: &Value, b: &Value, meter: &mut Meter) -> Res<bool> {
    Ok(compare(a, b, "<", meter)? == Ordering::Less)
}

/// Python's `is`: identity, which for JSON values means the same type and equal. Meant for
/// `x is None`, `x is True`.
pub(crate) fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.is_f64() == y.is_f64() && x == y,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b) && a == b,
    }
}

/// Python's `item in container`.
pub(crate) fn contains(container: &Value, item: &Value, meter: &mut Meter) -> Res<bool> {
    match (container, item) {
        (Value::String(haystack), Value::String(needle)) => {
            meter.scan(haystack.len())?;
            Ok(haystack.contains(needle.as_str()))
        }
        (Value::String(_), other) => Err(Fault::Type(format!(
            "'in <string>' requires string as left operand, not {}",
            type_name(other)
        ))),
        (Value::Array(items), _) => {
            for candidate in items {
                if eq(candidate, item, meter)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        (Value::Object(map), Value::String(key)) => Ok(map.contains_key(key)),
        (Value::Object(_), Value::Array(_) | Value::Object(_)) => Err(Fault::Type(format!(
            "unhashable type: '{}'",
            type_name(item)
        ))),
        // JSON keys are strings: no number or None is ever a key.
        (Value::Object(_), _) => Ok(false),
        (other, _) => Err(Fault::Type(format!(
            "argument of type '{}' is not iterable",
            type_name(other)
        ))),
    }
}

fn unsupported(op: BinOp, a: &Value, b: &Value) -> Fault {
    Fault::Type(format!(
        "unsupported operand types for {}: '{}' and '{}'",
        op.symbol(),
        type_name(a),
        type_name(b)
    ))
}

/// `a op b`. `a` by value so that `+` can append to a string or list it owns.
pub(crate) fn binary(op: BinOp, a: Cow<'_, Value>, b: &Value, meter: &mut Meter) -> Res<Value> {
    match op {
        BinOp::Add => add(a, b, meter),
        BinOp::Mul => multiply(&a, b, meter),
        _ => arithmetic(op, &a, b),
    }
}

fn add(a: Cow<'_, Value>, b: &Value, meter: &mut Meter) -> Res<Value> {
    match (a, b) {
        (Cow::Owned(Value::String(mut s)), Value::String(t)) => {
            meter.build(t.len() as u64, "a string")?;
            s.push_str(t);
            Ok(Value::String(s))
        }
        (Cow::Borrowed(Value::String(s)), Value::String(t)) => {
            meter.build((s.len() + t.len()) as u64, "a string")?;
            Ok(Value::String(format!("{s}{t}")))
        }
        (Cow::Owned(Value::Array(mut items)), Value::Array(more)) => {
            meter.build(SLOT * more.len() as u64, "a list")?;
            for item in more {
                items.push(meter.copy(item)?);
            }
            Ok(Value::Array(items))
        }
        (Cow::Borrowed(Value::Array(items)), Value::Array(more)) => {
            meter.build(SLOT * (items.len() + more.len()) as u64, "a list")?;
            let mut out = Vec::with_capacity(items.len() + more.len());
            for item in items.iter().chain(more) {
                out.push(meter.copy(item)?);
            }
            Ok(Value::Array(out))
        }
        (a, b) => arithmetic(BinOp::Add, &a, b),
    }
}

fn multiply(a: &Value, b: &Value, meter: &mut Meter) -> Res<Value> {
    let (sequence, count) = match (a, b) {
        (Value::String(_) | Value::Array(_), n) | (n, Value::String(_) | Value::Array(_))
            if num(n).is_some() =>
        {
            let sequence = if matches!(a, Value::String(_) | Value::Array(_)) {
                a
            } else {
                b
            };
            let Some(count) = int(n) else {
                return Err(Fault::Type(format!(
                    "can't multiply sequence by non-int of type '{}'",
                    type_name(n)
                )));
            };
            (sequence, count)
        }
        _ => return arithmetic(BinOp::Mul, a, b),
    };
    // Python: a count below one gives an empty sequence.
    let count = u64::try_from(count).unwrap_or(0);
    match sequence {
        Value::String(s) => {
            meter.build((s.len() as u64).saturating_mul(count), "a string")?;
            // Within the budget, so the count fits in memory and in usize.
            Ok(Value::String(s.repeat(usize::try_from(count).unwrap_or(0))))
        }
        // Repeating nothing any number of times is quick, and the loop below would not be.
        Value::Array(items) if items.is_empty() => Ok(Value::Array(Vec::new())),
        Value::Array(items) => {
            let mut one = SLOT * items.len() as u64;
            for item in items {
                let size = meter.size_of(item)?.unwrap_or(u64::MAX);
                one = one.saturating_add(size);
            }
            meter.build(one.saturating_mul(count), "a list")?;
            let count = usize::try_from(count).unwrap_or(0);
            let mut out = Vec::with_capacity(items.len().saturating_mul(count));
            for _ in 0..count {
                out.extend(items.iter().cloned());
            }
            Ok(Value::Array(out))
        }
        _ => arithmetic(BinOp::Mul, a, b),
    }
}

fn arithmetic(op: BinOp, a: &Value, b: &Value) -> Res<Value> {
    let (Some(x), Some(y)) = (num(a), num(b)) else {
        return Err(unsupported(op, a, b));
    };
    let result = match (x, y) {
        (Num::Int(x), Num::Int(y)) => int_arithmetic(op, x, y)?,
        (x, y) => Num::Float(float_arithmetic(op, x.float(), y.float())?),
    };
    result.into_value()
}

fn int_arithmetic(op: BinOp, x: i64, y: i64) -> Res<Num> {
    let overflow = || Fault::INT_OVERFLOW;
    Ok(Num::Int(match op {
        BinOp::Add => x.checked_add(y).ok_or_else(overflow)?,
        BinOp::Sub => x.checked_sub(y).ok_or_else(overflow)?,
        BinOp::Mul => x.checked_mul(y).ok_or_else(overflow)?,
        BinOp::Div => return float_arithmetic(op, x as f64, y as f64).map(Num::Float),
        BinOp::FloorDiv => {
            if y == 0 {
                return Err(Fault::ZeroDivision);
            }
            let q = x.checked_div(y).ok_or_else(overflow)?;
            if x % y != 0 && ((x < 0) != (y < 0)) {
                q - 1
            } else {
                q
            }
        }
        BinOp::Mod => {
            if y == 0 {
                return Err(Fault::ZeroDivision);
            }
            // wrapping: i64::MIN % -1 is 0, as in Python.
            let r = x.wrapping_rem(y);
            if r != 0 && ((r < 0) != (y < 0)) {
                r + y
            } else {
                r
            }
        }
        BinOp::Pow => {
            if y < 0 {
                return float_arithmetic(op, x as f64, y as f64).map(Num::Float);
            }
            match x {
                0 => i64::from(y == 0),
                1 => 1,
                -1 => {
                    if y % 2 == 0 {
                        1
                    } else {
                        -1
                    }
                }
                _ => {
                    let exponent = u32::try_from(y).map_err(|_| overflow())?;
                    x.checked_pow(exponent).ok_or_else(overflow)?
                }
            }
        }
    }))
}

fn float_arithmetic(op: BinOp, x: f64, y: f64) -> Res<f64> {
    let result = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => {
            if y == 0.0 {
                return Err(Fault::ZeroDivision);
            }
            x / y
        }
        BinOp::FloorDiv | BinOp::Mod => {
            if y == 0.0 {
                return Err(Fault::ZeroDivision);
            }
            let (div, modulo) = float_divmod(x, y);
            if op == BinOp::FloorDiv { div } else { modulo }
        }
        BinOp::Pow => {
            if x == 0.0 && y < 0.0 {
                return Err(Fault::ZeroDivision);
            }
            if x < 0.0 && y.fract() != 0.0 {
                return Err(Fault::Value(
                    "a negative number cannot be raised to a fractional power".to_owned(),
                ));
            }
            x.powf(y)
        }
    };
    if result.is_finite() {
        Ok(result)
    } else {
        Err(Fault::FLOAT_OVERFLOW)
    }
}

/// CPython's `float.__divmod__`: the floor quotient and a remainder with the divisor's sign.
fn float_divmod(x: f64, y: f64) -> (f64, f64) {
    let mut modulo = x % y;
    let mut div = (x - modulo) / y;
    if modulo != 0.0 {
        if (y < 0.0) != (modulo < 0.0) {
            modulo += y;
            div -= 1.0;
        }
    } else {
        modulo = 0.0f64.copysign(y);
    }
    let floor = if div != 0.0 {
        let floor = div.floor();
        if div - floor > 0.5 {
            floor + 1.0
        } else {
            floor
        }
    } else {
        0.0f64.copysign(x / y)
    };
    (floor, modulo)
}

/// Unary `-`.
pub(crate) fn negate(v: &Value) -> Res<Value> {
    match num(v) {
        Some(Num::Int(i)) => Ok(Value::from(i.checked_neg().ok_or(Fault::INT_OVERFLOW)?)),
        Some(Num::Float(x)) => float_value(-x),
        None => Err(Fault::Type(format!(
            "bad operand type for unary -: '{}'",
            type_name(v)
        ))),
    }
}

/// Unary `+`.
pub(crate) fn plus(v: &Value) -> Res<Value> {
    match num(v) {
        Some(n) => n.into_value(),
        None => Err(Fault::Type(format!(
            "bad operand type for unary +: '{}'",
            type_name(v)
        ))),
    }
}

/// Python's `str(v)`.
pub(crate) fn to_str(v: &Value, meter: &mut Meter) -> Res<String> {
    if let Value::String(s) = v {
        meter.build(s.len() as u64, "a string")?;
        return Ok(s.clone());
    }
    repr(v, meter)
}

/// Python's `repr(v)`.
pub(crate) fn repr(v: &Value, meter: &mut Meter) -> Res<String> {
    let mut out = String::new();
    write_repr(v, &mut out, meter, 0)?;
    meter.build(out.len() as u64, "a string")?;
    Ok(out)
}

fn write_repr(v: &Value, out: &mut String, meter: &mut Meter, depth: usize) -> Res<()> {
    meter.step(1)?;
    check_depth(depth)?;
    if out.len() as u64 > meter.bytes_left() {
        return meter.build(out.len() as u64, "a string");
    }
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(x)) => out.push_str(&float_repr(x)),
            (None, None, None) => out.push_str("nan"),
        },
        Value::String(s) => {
            meter.scan(s.len())?;
            quote(s, out);
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out, meter, depth + 1)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quote(key, out);
                out.push_str(": ");
                write_repr(item, out, meter, depth + 1)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// A string literal as Python's `repr` writes it.
fn quote(s: &str, out: &mut String) {
    let delimiter = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(delimiter);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == delimiter => {
                out.push('\\');
                out.push(c);
            }
            c if c < ' ' || ('\u{7f}'..='\u{9f}').contains(&c) => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push(delimiter);
}

/// Python's `repr(float)`: the shortest digits that read back as the same float, in fixed
/// notation for exponents from -4 to 15 and scientific notation otherwise.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-7".
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let point = exponent.unsigned_abs() as usize + 1;
            let (int_part, frac_part) = if digits.len() <= point {
                (
                    format!("{digits}{}", "0".repeat(point - digits.len())),
                    "0".to_owned(),
                )
            } else {
                (
                    digits.get(..point).unwrap_or_default().to_owned(),
                    digits.get(point..).unwrap_or_default().to_owned(),
                )
            };
            format!("{sign}{int_part}.{frac_part}")
        } else {
            let zeros = "0".repeat(exponent.unsigned_abs() as usize - 1);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let first = digits.get(..1).unwrap_or_default();
        let rest = digits.get(1..).unwrap_or_default();
        let mantissa = if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first}.{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{sign}{mantissa}e{exponent_sign}{:02}",
            exponent.unsigned_abs()
        )
    }
}

/// `v` as an index or slice bound (`what` names it in the error).
pub(crate) fn index_value(v: &Value, what: &str) -> Res<i64> {
    match v {
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::Number(n) if !n.is_f64() => n
            .as_i64()
            .ok_or_else(|| Fault::Type(format!("{what} {n} does not fit in a 64-bit integer"))),
        other => Err(Fault::Type(format!(
            "{what} must be an integer, not '{}'",
            type_name(other)
        ))),
    }
}

/// The position `index` (negative counts from the end) designates in a sequence of `len`.
pub(crate) fn position(index: i64, len: usize, kind: &'static str) -> Res<usize> {
    let len_wide = i128::try_from(len).unwrap_or(i128::MAX);
    let wide = if index < 0 {
        i128::from(index) + len_wide
    } else {
        i128::from(index)
    };
    if (0..len_wide).contains(&wide) {
        usize::try_from(wide).map_err(|_| Fault::IndexOutOfRange { index, len, kind })
    } else {
        Err(Fault::IndexOutOfRange { index, len, kind })
    }
}

/// The positions `[lower:upper:step]` selects in a sequence of `len`, as Python's
/// `slice.indices` computes them.
pub(crate) fn slice_positions(
    len: usize,
    lower: Option<i64>,
    upper: Option<i64>,
    step: Option<i64>,
) -> Res<Vec<usize>> {
    let step = i128::from(step.unwrap_or(1));
    if step == 0 {
        return Err(Fault::Value("slice step cannot be zero".to_owned()));
    }
    let len = i128::try_from(len).unwrap_or(i128::MAX);
    let clamp = |bound: Option<i64>, default: i128| -> i128 {
        let Some(bound) = bound else {
            return default;
        };
        let mut bound = i128::from(bound);
        if bound < 0 {
            bound += len;
            if bound < 0 {
                bound = if step < 0 { -1 } else { 0 };
            }
        } else if bound >= len {
            bound = if step < 0 { len - 1 } else { len };
        }
        bound
    };
    let (start, stop) = if step > 0 {
        (clamp(lower, 0), clamp(upper, len))
    } else {
        (clamp(lower, len - 1), clamp(upper, -1))
    };
    let count = if step > 0 && stop > start {
        (stop - start - 1) / step + 1
    } else if step < 0 && start > stop {
        (start - stop - 1) / (-step) + 1
    } else {
        0
    };
    Ok((0..count)
        .filter_map(|k| usize::try_from(start + k * step).ok())
        .collect())
}

/// Python's `(start, end)` adjustment for `str.find` and friends: negative bounds count from
/// the end, and `end` is clamped to the length but `start` is not (a `start` past the end
/// finds nothing, not even the empty string).
pub(crate) fn find_bounds(len: usize, start: Option<i64>, end: Option<i64>) -> (usize, usize) {
    let len_wide = i128::try_from(len).unwrap_or(i128::MAX);
    let adjust = |bound: i64| -> i128 {
        let bound = i128::from(bound);
        if bound < 0 {
            (bound + len_wide).max(0)
        } else {
            bound
        }
    };
    let start = start.map_or(0, adjust);
    let end = end.map_or(len_wide, adjust).min(len_wide);
    (
        usize::try_from(start).unwrap_or(usize::MAX),
        usize::try_from(end).unwrap_or(0),
    )
}
