//! JSONPath in flow definitions: the `"key.$"` parameters, `InputPath`, `ItemsPath`, a
//! `Choice` rule's `Variable`, and `ResultPath`.
//!
//! A [`Path`] is an RFC 9535 query (parsed and run by `serde_json_path`). A query that names
//! one place (only member names and indices: `$.a.b[0]['c d']`) selects that value, and
//! selecting it where nothing is fails; any other query (wildcards, slices, filters,
//! descendants) selects the list of what it finds, as the Amazon States Language does.
//!
//! A [`RefPath`] is where a state writes its result: only member names and indices, so that it
//! names one place, made on the way if missing.
//!
//! ```
//! use serde_json::json;
//! use flows::path::{Path, RefPath};
//!
//! let doc = json!({"files": [{"name": "a"}, {"name": "b"}]});
//! assert_eq!(Path::parse("$.files[1].name")?.select(&doc)?, json!("b"));
//! assert_eq!(Path::parse("$.files[*].name")?.select(&doc)?, json!(["a", "b"]));
//!
//! let mut doc = json!({"input": 1});
//! RefPath::parse("$.result.value")?.set(&mut doc, json!(2))?;
//! assert_eq!(doc, json!({"input": 1, "result": {"value": 2}}));
//! # Ok::<(), String>(())
//! ```

use serde_json::Value;

/// Longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// One step of a path that names one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A member of an object.
    Name(String),
    /// An element of a list (negative: from the end).
    Index(i64),
}

/// A JSONPath query over a state's input.
#[derive(Debug, Clone)]
pub struct Path {
    text: String,
    query: serde_json_path::JsonPath,
    /// The steps, for a query that names one place.
    steps: Option<Vec<Step>>,
}

impl Path {
    /// Parses an RFC 9535 query; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Path, String> {
        if text.len() > MAX_PATH_LEN {
            return Err(format!("a path may be at most {MAX_PATH_LEN} bytes long"));
        }
        if !text.starts_with('$') {
            return Err(format!(
                "`{text}` is not a JSONPath: it must start with `$`"
            ));
        }
        let shown = text;
        let text = &context_path(text)?;
        let query = serde_json_path::JsonPath::parse(text)
            .map_err(|e| format!("`{text}` is not a valid JSONPath: {e}"))?;
        Ok(Path {
            text: shown.to_string(),
            query,
            steps: steps(text),
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the path names one place (rather than selecting a list).
    pub fn is_singular(&self) -> bool {
        self.steps.is_some()
    }

    /// What the path selects in `doc`: the value it names, or the list of what it finds. A
    /// path that names one place where there is nothing is an error.
    pub fn select(&self, doc: &Value) -> Result<Value, String> {
        match &self.steps {
            Some(steps) => get(doc, steps)
                .cloned()
                .ok_or_else(|| format!("the path `{}` selects nothing", self.text)),
            None => Ok(Value::Array(
                self.query.query(doc).all().into_iter().cloned().collect(),
            )),
        }
    }

    /// Whether anything is at the path in `doc`.
    pub fn is_present(&self, doc: &Value) -> bool {
        match &self.steps {
            Some(steps) => get(doc, steps).is_some(),
            None => !self.query.query(doc).is_empty(),
        }
    }
}

/// The Amazon States Language's context object (`$$.`), as this engine keeps it: under
/// `$._context` (`$$.Map.Item.Value` is `$._context.map_item.value`).
fn context_path(text: &str) -> Result<String, String> {
    let Some(rest) = text.strip_prefix("$$") else {
        return Ok(text.to_string());
    };
    for (asl, ours) in [
        (".Map.Item.Value", "$._context.map_item.value"),
        (".Map.Item.Index", "$._context.map_item.index"),
        (".Execution.Id", "$._context.run_id"),
    ] {
        if let Some(tail) = rest.strip_prefix(asl) {
            if tail.is_empty() || tail.starts_with(['.', '[']) {
                return Ok(format!("{ours}{tail}"));
            }
        }
    }
    Err(format!(
        "`{text}`: of the context object `$$` only `$$.Map.Item.Value`, `$$.Map.Item.Index` \
         and `$$.Execution.Id` are known; the run context is `$._context`"
    ))
}

/// Where a state puts its result (`ResultPath`), or a path of the run context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPath {
    text: String,
    steps: Vec<Step>,
}

impl RefPath {
    /// Parses a path that names one place: `$`, then member names (`.name`, `['name']`) and
    /// indices (`[0]`).
    pub fn parse(text: &str) -> Result<RefPath, String> {
        if text.len() > MAX_PATH_LEN {
            return Err(format!("a path may be at most {MAX_PATH_LEN} bytes long"));
        }
        match steps(text) {
            Some(steps) => Ok(RefPath {
                text: text.to_string(),
                steps,
            }),
            None => Err(format!(
                "`{text}` must name one place: `$` followed by `.name`, `['name']` or `[index]` \
                 steps, without wildcards, slices or filters"
            )),
        }
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The steps after `$`.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Puts `value` at the path in `doc`, making objects on the way where members are
    /// missing (or are not objects, as the Amazon States Language does). An index must name
    /// an element that exists.
    pub fn set(&self, doc: &mut Value, value: Value) -> Result<(), String> {
        let mut at = doc;
        for step in &self.steps {
            at = match step {
                Step::Name(name) => {
                    if !at.is_object() {
                        *at = Value::Object(serde_json::Map::new());
                    }
                    match at {
                        Value::Object(map) => map.entry(name.clone()).or_insert(Value::Null),
                        _ => return Err(format!("cannot write at `{}`", self.text)),
                    }
                }
                Step::Index(i) => {
                    let len = at.as_array().map_or(0, Vec::len);
                    match (at, index(*i, len)) {
                        (Value::Array(items), Some(k)) => &mut items[k],
                        _ => {
                            return Err(format!(
                                "cannot write at `{}`: index {i} is not in a list there",
                                self.text
                            ));
                        }
                    }
                }
            };
        }
        *at = value;
        Ok(())
    }
}

fn index(i: i64, len: usize) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let k = if i < 0 { len.checked_add(i)? } else { i };
    (0..len).contains(&k).then_some(k as usize)
}

/// The value at `steps` in `doc`.
pub fn get<'a>(doc: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    let mut at = doc;
    for step in steps {
        at = match (step, at) {
            (Step::Name(name), Value::Object(map)) => map.get(name)?,
            (Step::Index(i), Value::Array(items)) => items.get(index(*i, items.len())?)?,
            _ => return None,
        };
    }
    Some(at)
}

/// The steps of a path that names one place, or `None` for any other path.
fn steps(text: &str) -> Option<Vec<Step>> {
    let rest = text.strip_prefix('$')?;
    let chars: Vec<char> = rest.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let start = i + 1;
                let mut j = start;
                while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                if j == start || chars[start].is_ascii_digit() {
                    return None;
                }
                out.push(Step::Name(chars[start..j].iter().collect()));
                i = j;
            }
            '[' => {
                let quote = *chars.get(i + 1)?;
                if quote == '\'' || quote == '"' {
                    let mut name = String::new();
                    let mut j = i + 2;
                    loop {
                        let c = *chars.get(j)?;
                        if c == '\\' {
                            name.push(match *chars.get(j + 1)? {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                'b' => '\u{8}',
                                'f' => '\u{c}',
                                '/' => '/',
                                '\\' => '\\',
                                '\'' => '\'',
                                '"' => '"',
                                _ => return None,
                            });
                            j += 2;
                        } else if c == quote {
                            break;
                        } else {
                            name.push(c);
                            j += 1;
                        }
                    }
                    if chars.get(j + 1) != Some(&']') {
                        return None;
                    }
                    out.push(Step::Name(name));
                    i = j + 2;
                } else {
                    let mut j = i + 1;
                    let neg = chars.get(j) == Some(&'-');
                    if neg {
                        j += 1;
                    }
                    let start = j;
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    if j == start || chars.get(j) != Some(&']') {
                        return None;
                    }
                    let digits: String = chars[start..j].iter().collect();
                    // RFC 9535: no leading zeros, and within I-JSON's exact integers.
                    if digits.len() > 1 && digits.starts_with('0') {
                        return None;
                    }
                    let n: i64 = digits.parse().ok().filter(|n| *n < (1 << 53))?;
                    out.push(Step::Index(if neg { -n } else { n }));
                    i = j + 1;
                }
            }
            _ => return None,
        }
    }
    Some(out)
}
