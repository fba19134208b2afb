//! The methods of strings, lists and dicts.

use serde_json::{Map, Value};

use super::builtins::{Args, expect_str, iterate, meter_own, required, string_list};
use super::error::{Fault, Res};
use super::format::format;
use super::meter::{Meter, SLOT};
use super::value::{self, index_value, type_name};

/// Calls method `name` of `receiver`.
pub(crate) fn call(receiver: &Value, name: &str, args: Args<'_>, meter: &mut Meter) -> Res<Value> {
    match receiver {
        Value::String(s) => str_method(s, name, args, meter),
        Value::Array(items) => list_method(items, name, args, meter),
        Value::Object(map) => dict_method(map, name, args, meter),
        other => Err(Fault::Type(format!(
            "'{}' object has no method '{name}'",
            type_name(other)
        ))),
    }
}

/// Names of the methods of strings, lists and dicts.
pub(crate) const STR_METHODS: &[&str] = &[
    "endswith",
    "find",
    "format",
    "join",
    "lower",
    "lstrip",
    "partition",
    "replace",
    "rpartition",
    "rsplit",
    "rstrip",
    "split",
    "startswith",
    "strip",
    "upper",
];
pub(crate) const LIST_METHODS: &[&str] = &["count", "index"];
pub(crate) const DICT_METHODS: &[&str] = &["get", "items", "keys", "values"];

fn no_method(kind: &str, name: &str, methods: &[&str]) -> Fault {
    Fault::Type(format!(
        "'{kind}' object has no method '{name}' (its methods are {})",
        methods.join(", ")
    ))
}

fn str_method(s: &str, name: &str, args: Args<'_>, meter: &mut Meter) -> Res<Value> {
    meter.scan(s.len())?;
    let string = |out: String, meter: &mut Meter| -> Res<Value> {
        meter.build(out.len() as u64, "a string")?;
        Ok(Value::String(out))
    };
    match name {
        "startswith" | "endswith" => {
            let [affix, start, end] = args.bind(name, ["prefix", "start", "end"], 1)?;
            let affix = required(affix, name)?;
            let start = optional_index(start.as_deref(), name)?;
            let end = optional_index(end.as_deref(), name)?;
            let chars: Vec<char> = s.chars().collect();
            let (start, end) = value::find_bounds(chars.len(), start, end);
            let window = chars.get(start..end.max(start)).unwrap_or_default();
            let test = |affix: &str| {
                let affix: Vec<char> = affix.chars().collect();
                start <= end
                    && if name == "startswith" {
                        window.starts_with(&affix)
                    } else {
                        window.ends_with(&affix)
                    }
            };
            let found = match &*affix {
                Value::String(a) => test(a),
                Value::Array(options) => {
                    let mut any = false;
                    for option in options {
                        let Value::String(a) = option else {
                            return Err(affix_type(name, option));
                        };
                        any |= test(a);
                    }
                    any
                }
                other => return Err(affix_type(name, other)),
            };
            Ok(Value::Bool(found))
        }
        "strip" | "lstrip" | "rstrip" => {
            let [chars] = args.bind(name, ["chars"], 0)?;
            let set: Option<Vec<char>> = match chars.as_deref() {
                None | Some(Value::Null) => None,
                Some(Value::String(set)) => Some(set.chars().collect()),
                Some(other) => {
                    return Err(Fault::Type(format!(
                        "{name} arg must be None or str, not '{}'",
                        type_name(other)
                    )));
                }
            };
            let strip = |c: char| match &set {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            let out = match name {
                "strip" => s.trim_matches(strip),
                "lstrip" => s.trim_start_matches(strip),
                _ => s.trim_end_matches(strip),
            };
            string(out.to_owned(), meter)
        }
        "split" | "rsplit" => {
            let [sep, maxsplit] = args.bind(name, ["sep", "maxsplit"], 0)?;
            let maxsplit = match maxsplit.as_deref() {
                None => None,
                Some(m) => usize::try_from(index_value(m, "maxsplit")?).ok(),
            };
            let parts: Vec<&str> = match sep.as_deref() {
                None | Some(Value::Null) => split_whitespace(s, maxsplit, name == "rsplit"),
                Some(Value::String(sep)) if sep.is_empty() => {
                    return Err(Fault::Value("empty separator".to_owned()));
                }
                Some(Value::String(sep)) => match (maxsplit, name == "rsplit") {
                    (None, _) => s.split(sep.as_str()).collect(),
                    (Some(n), false) => s.splitn(n.saturating_add(1), sep.as_str()).collect(),
                    (Some(n), true) => {
                        let mut parts: Vec<&str> =
                            s.rsplitn(n.saturating_add(1), sep.as_str()).collect();
                        parts.reverse();
                        parts
                    }
                },
                Some(other) => {
                    return Err(Fault::Type(format!(
                        "must be str or None, not '{}'",
                        type_name(other)
                    )));
                }
            };
            string_list(parts, meter)
        }
        "partition" | "rpartition" => {
            let [sep] = args.bind(name, ["sep"], 1)?;
            let sep = required(sep, name)?;
            let sep = expect_str(&sep, name)?;
            if sep.is_empty() {
                return Err(Fault::Value("empty separator".to_owned()));
            }
            let found = if name == "partition" {
                s.find(sep)
            } else {
                s.rfind(sep)
            };
            let parts = match found {
                Some(at) => [
                    s.get(..at).unwrap_or_default(),
                    sep,
                    s.get(at + sep.len()..).unwrap_or_default(),
                ],
                None if name == "partition" => [s, "", ""],
                None => ["", "", s],
            };
            string_list(parts, meter)
        }
        "lower" => {
            args.bind(name, [], 0)?;
            string(s.to_lowercase(), meter)
        }
        "upper" => {
            args.bind(name, [], 0)?;
            string(s.to_uppercase(), meter)
        }
        "replace" => {
            let [old, new, count] = args.bind(name, ["old", "new", "count"], 2)?;
            let old = required(old, name)?;
            let new = required(new, name)?;
            let (old, new) = (expect_str(&old, name)?, expect_str(&new, name)?);
            let limit = match count.as_deref() {
                None => None,
                Some(c) => usize::try_from(index_value(c, "count")?).ok(),
            };
            let matches = s.matches(old).count();
            let replaced = limit.map_or(matches, |l| l.min(matches));
            let len = s.len().saturating_sub(replaced * old.len()) as u64;
            let added = (replaced as u64).saturating_mul(new.len() as u64);
            meter.build(len.saturating_add(added), "a string")?;
            Ok(Value::String(s.replacen(old, new, replaced)))
        }
        "join" => {
            let [iterable] = args.bind(name, ["iterable"], 1)?;
            let iterable = required(iterable, name)?;
            let items = iterate(&iterable, meter)?;
            let mut len: u64 = 0;
            for (i, item) in items.iter().enumerate() {
                let Value::String(part) = &**item else {
                    return Err(Fault::Type(format!(
                        "sequence item {i}: expected str instance, {} found",
                        type_name(item)
                    )));
                };
                len = len.saturating_add(part.len() as u64 + s.len() as u64);
            }
            meter.build(len, "a string")?;
            let parts: Vec<&str> = items.iter().filter_map(|i| i.as_str()).collect();
            Ok(Value::String(parts.join(s)))
        }
        "find" => {
            let [sub, start, end] = args.bind(name, ["sub", "start", "end"], 1)?;
            let sub = required(sub, name)?;
            let sub: Vec<char> = expect_str(&sub, name)?.chars().collect();
            let start = optional_index(start.as_deref(), name)?;
            let end = optional_index(end.as_deref(), name)?;
            let chars: Vec<char> = s.chars().collect();
            let (start, end) = value::find_bounds(chars.len(), start, end);
            let found = if end < start.saturating_add(sub.len()) {
                None
            } else if sub.is_empty() {
                Some(start)
            } else {
                chars
                    .get(start..end)
                    .and_then(|window| window.windows(sub.len()).position(|w| w == sub))
                    .map(|at| at + start)
            };
            Ok(found.map_or(Value::from(-1), Value::from))
        }
        "format" => {
            let out = format(s, args, meter)?;
            Ok(Value::String(out))
        }
        _ => Err(no_method("str", name, STR_METHODS)),
    }
}

fn affix_type(name: &str, v: &Value) -> Fault {
    Fault::Type(format!(
        "{name} first arg must be str or a list of str, not '{}'",
        type_name(v)
    ))
}

fn optional_index(v: Option<&Value>, function: &str) -> Res<Option<i64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => index_value(v, &format!("{function}() index")).map(Some),
    }
}

/// `str.split()` / `str.rsplit()` without a separator: runs of whitespace separate, and
/// leading and trailing whitespace make no empty parts.
fn split_whitespace(s: &str, maxsplit: Option<usize>, from_right: bool) -> Vec<&str> {
    let mut parts = Vec::new();
    if from_right {
        let mut rest = s.trim_end();
        while !rest.is_empty() {
            if maxsplit == Some(parts.len()) {
                parts.push(rest);
                break;
            }
            let start = rest
                .char_indices()
                .rev()
                .find(|(_, c)| c.is_whitespace())
                .map_or(0, |(i, c)| i + c.len_utf8());
            parts.push(rest.get(start..).unwrap_or_default());
            rest = rest.get(..start).unwrap_or_default().trim_end();
        }
        parts.reverse();
    } else {
        let mut rest = s.trim_start();
        while !rest.is_empty() {
            if maxsplit == Some(parts.len()) {
                parts.push(rest);
                break;
            }
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            parts.push(rest.get(..end).unwrap_or_default());
            rest = rest.get(end..).unwrap_or_default().trim_start();
        }
    }
    parts
}

fn list_method(items: &[Value], name: &str, args: Args<'_>, meter: &mut Meter) -> Res<Value> {
    match name {
        "index" => {
            let [x] = args.bind(name, ["value"], 1)?;
            let x = required(x, name)?;
            for (i, item) in items.iter().enumerate() {
                if value::eq(item, &x, meter)? {
                    return Ok(Value::from(i));
                }
            }
            let shown = value::repr(&x, meter)?;
            Err(Fault::Value(format!("{shown} is not in list")))
        }
        "count" => {
            let [x] = args.bind(name, ["value"], 1)?;
            let x = required(x, name)?;
            let mut count: usize = 0;
            for item in items {
                if value::eq(item, &x, meter)? {
                    count += 1;
                }
            }
            Ok(Value::from(count))
        }
        _ => Err(no_method("list", name, LIST_METHODS)),
    }
}

fn dict_method(
    map: &Map<String, Value>,
    name: &str,
    args: Args<'_>,
    meter: &mut Meter,
) -> Res<Value> {
    match name {
        "get" => {
            let [key, default] = args.bind(name, ["key", "default"], 1)?;
            let key = required(key, name)?;
            let found = match &*key {
                Value::String(k) => map.get(k),
                Value::Array(_) | Value::Object(_) => {
                    return Err(Fault::Type(format!(
                        "unhashable type: '{}'",
                        type_name(&key)
                    )));
                }
                _ => None,
            };
            match (found, default) {
                (Some(v), _) => meter.copy(v),
                (None, Some(default)) => meter_own(default, meter),
                (None, None) => Ok(Value::Null),
            }
        }
        "keys" => {
            args.bind(name, [], 0)?;
            string_list(map.keys().map(String::as_str), meter)
        }
        "values" => {
            args.bind(name, [], 0)?;
            let mut out = Vec::with_capacity(map.len());
            for v in map.values() {
                out.push(meter.copy(v)?);
            }
            Ok(Value::Array(out))
        }
        "items" => {
            args.bind(name, [], 0)?;
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                meter.build(SLOT * 2 + k.len() as u64, "a list")?;
                out.push(Value::Array(vec![Value::String(k.clone()), meter.copy(v)?]));
            }
            Ok(Value::Array(out))
        }
        _ => Err(no_method("dict", name, DICT_METHODS)),
    }
}
