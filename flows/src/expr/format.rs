//! `str.format`: replacement fields `{}`, `{0}` and `{name}`, conversions `!s` and `!r`, and
//! the common part of the format-spec language, `[[fill]align][sign][0][width][.precision]
//! [type]` with types `s`, `d`, `x`, `X`, `o`, `b`, `f`, `F`, `e`, `E` and `%`. Attribute and
//! index lookups inside fields, nested fields, `#`, grouping and the `g` type are not there.

use serde_json::Value;

use super::builtins::Args;
use super::error::{Fault, Res};
use super::meter::Meter;
use super::value::{Num, float_repr, num, repr, to_str, type_name};

fn invalid(message: impl Into<String>) -> Fault {
    Fault::Value(message.into())
}

pub(crate) fn format(template: &str, args: Args<'_>, meter: &mut Meter) -> Res<String> {
    let Args {
        positional,
        keyword,
    } = args;
    let mut out = String::new();
    let mut next_auto = 0usize;
    // Whether fields are numbered by hand ({0}) or automatically ({}): not both.
    let mut manual: Option<bool> = None;
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '}' => return Err(invalid("single '}' encountered in format string")),
            '{' => {
                let mut field = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') => {
                            return Err(invalid("nested replacement fields are not supported"));
                        }
                        Some(c) => field.push(c),
                        None => return Err(invalid("expected '}' before end of string")),
                    }
                }
                let (head, spec) = field.split_once(':').unwrap_or((&field, ""));
                let (name, conversion) = match head.split_once('!') {
                    Some((name, conversion)) => (name, Some(conversion)),
                    None => (head, None),
                };
                let value: &Value = if name.is_empty() {
                    if manual == Some(true) {
                        return Err(invalid(
                            "cannot switch from manual field numbering to automatic field numbering",
                        ));
                    }
                    manual = Some(false);
                    let index = next_auto;
                    next_auto += 1;
                    positional.get(index).ok_or_else(|| {
                        invalid(format!(
                            "replacement index {index} out of range for {} positional arguments",
                            positional.len()
                        ))
                    })?
                } else if name.chars().all(|c| c.is_ascii_digit()) {
                    if manual == Some(false) {
                        return Err(invalid(
                            "cannot switch from automatic field numbering to manual field numbering",
                        ));
                    }
                    manual = Some(true);
                    name.parse::<usize>()
                        .ok()
                        .and_then(|index| positional.get(index))
                        .ok_or_else(|| {
                            invalid(format!(
                                "replacement index {name} out of range for {} positional arguments",
                                positional.len()
                            ))
                        })?
                } else if name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    keyword
                        .iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| &**v)
                        .ok_or_else(|| {
                            invalid(format!("format() has no keyword argument '{name}'"))
                        })?
                } else {
                    return Err(invalid(format!(
                        "format field '{name}' is not supported: use a position or a keyword \
                         argument name"
                    )));
                };
                let rendered = match conversion {
                    None => render(value, spec, meter)?,
                    Some("s") => render(&Value::String(to_str(value, meter)?), spec, meter)?,
                    Some("r") => render(&Value::String(repr(value, meter)?), spec, meter)?,
                    Some(other) => {
                        return Err(invalid(format!("unknown conversion specifier '{other}'")));
                    }
                };
                out.push_str(&rendered);
            }
            c => out.push(c),
        }
        if out.len() as u64 > meter.bytes_left() {
            meter.build(out.len() as u64, "a string")?;
        }
    }
    meter.build(out.len() as u64, "a string")?;
    Ok(out)
}

#[derive(Debug, Default)]
struct Spec {
    fill: Option<char>,
    align: Option<char>,
    sign: Option<char>,
    zero: bool,
    width: u64,
    precision: Option<u64>,
    kind: Option<char>,
}

fn digits(chars: &[char], i: &mut usize) -> Option<u64> {
    let start = *i;
    let mut value: u64 = 0;
    while let Some(d) = chars.get(*i).and_then(|c| c.to_digit(10)) {
        value = value.saturating_mul(10).saturating_add(u64::from(d));
        *i += 1;
    }
    (*i > start).then_some(value)
}

impl Spec {
    fn parse(spec: &str) -> Res<Spec> {
        let chars: Vec<char> = spec.chars().collect();
        let is_align = |c: &char| matches!(c, '<' | '>' | '^' | '=');
        let mut out = Spec::default();
        let mut i = 0;
        if chars.get(1).is_some_and(is_align) {
            out.fill = chars.first().copied();
            out.align = chars.get(1).copied();
            i = 2;
        } else if chars.first().is_some_and(is_align) {
            out.align = chars.first().copied();
            i = 1;
        }
        if let Some(sign @ ('+' | '-' | ' ')) = chars.get(i) {
            out.sign = Some(*sign);
            i += 1;
        }
        if chars.get(i) == Some(&'#') {
            return Err(invalid("'#' in format specifiers is not supported"));
        }
        if chars.get(i) == Some(&'0') {
            out.zero = true;
            i += 1;
        }
        out.width = digits(&chars, &mut i).unwrap_or(0);
        if matches!(chars.get(i), Some(',' | '_')) {
            return Err(invalid(
                "digit grouping in format specifiers is not supported",
            ));
        }
        if chars.get(i) == Some(&'.') {
            i += 1;
            out.precision = Some(
                digits(&chars, &mut i)
                    .ok_or_else(|| invalid("format specifier missing precision"))?,
            );
        }
        if let Some(kind) = chars.get(i) {
            out.kind = Some(*kind);
            i += 1;
        }
        if i < chars.len() {
            return Err(invalid(format!("invalid format specifier '{spec}'")));
        }
        Ok(out)
    }
}

/// `format(value, spec)`.
fn render(value: &Value, spec: &str, meter: &mut Meter) -> Res<String> {
    if spec.is_empty() {
        return to_str(value, meter);
    }
    let spec = Spec::parse(spec)?;
    meter.build(
        spec.width.saturating_add(spec.precision.unwrap_or(0)),
        "a formatted field",
    )?;
    match value {
        Value::String(s) => {
            if spec.sign.is_some() {
                return Err(invalid("sign not allowed in string format specifier"));
            }
            if let Some(kind) = spec.kind.filter(|k| *k != 's') {
                return Err(invalid(format!(
                    "unknown format code '{kind}' for object of type 'str'"
                )));
            }
            let body: String = match spec.precision {
                Some(p) => s
                    .chars()
                    .take(usize::try_from(p).unwrap_or(usize::MAX))
                    .collect(),
                None => s.clone(),
            };
            Ok(pad(&body, "", &spec, '<'))
        }
        Value::Bool(_) | Value::Number(_) => {
            let Some(n) = num(value) else {
                return Err(invalid("not a number"));
            };
            let precision = spec
                .precision
                .map(|p| usize::try_from(p).unwrap_or(usize::MAX));
            let (negative, body) = match (n, spec.kind) {
                (Num::Int(i), None | Some('d')) => {
                    if precision.is_some() {
                        return Err(invalid("precision not allowed in integer format specifier"));
                    }
                    (i < 0, i.unsigned_abs().to_string())
                }
                (Num::Int(i), Some('x')) => (i < 0, format!("{:x}", i.unsigned_abs())),
                (Num::Int(i), Some('X')) => (i < 0, format!("{:X}", i.unsigned_abs())),
                (Num::Int(i), Some('o')) => (i < 0, format!("{:o}", i.unsigned_abs())),
                (Num::Int(i), Some('b')) => (i < 0, format!("{:b}", i.unsigned_abs())),
                (Num::Float(x), None) => {
                    if precision.is_some() {
                        return Err(invalid(
                            "a precision for a float needs a type: use 'f', 'e' or '%'",
                        ));
                    }
                    (x.is_sign_negative(), float_repr(x.abs()))
                }
                (n, Some(kind @ ('f' | 'F' | 'e' | 'E' | '%'))) => {
                    let x = match n {
                        Num::Int(i) => i as f64,
                        Num::Float(x) => x,
                    };
                    let p = precision.unwrap_or(6);
                    let body = match kind {
                        'f' | 'F' => format!("{:.p$}", x.abs()),
                        '%' => format!("{:.p$}%", x.abs() * 100.0),
                        _ => scientific(x.abs(), p, kind == 'E'),
                    };
                    (x.is_sign_negative(), body)
                }
                (_, Some(kind)) => {
                    return Err(invalid(format!(
                        "unknown format code '{kind}' for object of type '{}'",
                        type_name(value)
                    )));
                }
            };
            let sign = match (negative, spec.sign) {
                (true, _) => "-",
                (false, Some('+')) => "+",
                (false, Some(' ')) => " ",
                (false, _) => "",
            };
            Ok(pad(&body, sign, &spec, '>'))
        }
        other => Err(Fault::Type(format!(
            "unsupported format string passed to {}.__format__",
            type_name(other)
        ))),
    }
}

/// Python's `e` format: `1.500000e+03`.
fn scientific(x: f64, precision: usize, upper: bool) -> String {
    let rust = format!("{x:.precision$e}");
    let (mantissa, exponent) = rust.split_once('e').unwrap_or((&rust, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let e = if upper { 'E' } else { 'e' };
    let exponent_sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}{e}{exponent_sign}{:02}", exponent.unsigned_abs())
}

fn pad(body: &str, sign: &str, spec: &Spec, default_align: char) -> String {
    let (fill, align) = match (spec.fill, spec.align, spec.zero) {
        (fill, Some(align), _) => (fill.unwrap_or(' '), align),
        (_, None, true) if default_align == '>' => ('0', '='),
        (_, None, true) => ('0', default_align),
        (_, None, false) => (' ', default_align),
    };
    let len = (sign.chars().count() + body.chars().count()) as u64;
    let missing = usize::try_from(spec.width.saturating_sub(len)).unwrap_or(0);
    let filler = |n: usize| fill.to_string().repeat(n);
    match align {
        '<' => format!("{sign}{body}{}", filler(missing)),
        '^' => {
            let left = missing / 2;
            format!("{}{sign}{body}{}", filler(left), filler(missing - left))
        }
        '=' => format!("{sign}{}{body}", filler(missing)),
        _ => format!("{}{sign}{body}", filler(missing)),
    }
}
