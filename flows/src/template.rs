//! `Parameters` (and `Result` where it holds paths): a JSON template whose keys ending in `.$`
//! take the value a [`Path`] selects from the state's input, and whose keys ending in `.=` take
//! the value of an [`expr`] expression evaluated over it. Everything else is a
//! constant. Compiled once, when the definition is read, so that a bad path or expression is
//! an error before anything runs.
//!
//! ```
//! use serde_json::json;
//! use flows::template::Template;
//!
//! let t = Template::compile(&json!({
//!     "echo_string.$": "$.message",
//!     "size.=": "len(message)",
//!     "fixed": [1, {"nested.$": "$.message"}],
//! }))?;
//! let input = json!({"message": "hello"});
//! assert_eq!(
//!     t.render(&input)?,
//!     json!({"echo_string": "hello", "size": 5, "fixed": [1, {"nested": "hello"}]})
//! );
//! # Ok::<(), String>(())
//! ```

use serde_json::{Map, Value};

use crate::expr;
use crate::path::Path;

/// Deepest template accepted.
pub const MAX_DEPTH: usize = 64;

/// A compiled template.
#[derive(Debug, Clone)]
pub enum Template {
    /// A value with no paths or expressions in it.
    Constant(Value),
    /// An object, some of whose members are computed.
    Object(Vec<(String, Template)>),
    /// A list, some of whose elements are computed.
    List(Vec<Template>),
    /// The value a path selects from the input.
    Path(Path),
    /// The value of an expression over the input.
    Expr(Box<expr::Expr>, String),
}

impl Template {
    /// Compiles `value`. The error names the key whose path or expression is bad.
    pub fn compile(value: &Value) -> Result<Template, String> {
        compile(value, 0)
    }

    /// Whether nothing in the template is computed.
    pub fn is_constant(&self) -> bool {
        matches!(self, Template::Constant(_))
    }

    /// The template's value over `input`: paths selected and expressions evaluated in it.
    pub fn render(&self, input: &Value) -> Result<Value, String> {
        Ok(match self {
            Template::Constant(v) => v.clone(),
            Template::Path(p) => p.select(input)?,
            Template::Expr(e, text) => e
                .eval(input)
                .map_err(|err| format!("the expression `{text}` failed: {err}"))?,
            Template::List(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.render(input))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Object(members) => {
                let mut map = Map::new();
                for (k, t) in members {
                    let v = t.render(input).map_err(|e| format!("`{k}`: {e}"))?;
                    map.insert(k.clone(), v);
                }
                Value::Object(map)
            }
        })
    }
}

fn compile(value: &Value, depth: usize) -> Result<Template, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested more than {MAX_DEPTH} levels deep"));
    }
    match value {
        Value::Object(map) => {
            let mut members = Vec::with_capacity(map.len());
            let mut computed = false;
            for (key, v) in map {
                let (name, t) = if let Some(name) = key.strip_suffix(".$") {
                    let text = v.as_str().ok_or_else(|| {
                        format!("`{key}`: a `.$` key's value must be a path string")
                    })?;
                    let path = Path::parse(text).map_err(|e| format!("`{key}`: {e}"))?;
                    (name, Template::Path(path))
                } else if let Some(name) = key.strip_suffix(".=") {
                    let text = v.as_str().ok_or_else(|| {
                        format!("`{key}`: a `.=` key's value must be an expression string")
                    })?;
                    let e = expr::parse(text).map_err(|e| format!("`{key}`: {e}"))?;
                    (name, Template::Expr(Box::new(e), text.to_string()))
                } else {
                    let t = compile(v, depth + 1).map_err(|e| format!("`{key}`: {e}"))?;
                    (key.as_str(), t)
                };
                if name.is_empty() {
                    return Err(format!("`{key}`: the key names nothing before its suffix"));
                }
                computed |= !t.is_constant();
                members.push((name.to_string(), t));
            }
            let mut names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!(
                    "`{}` is given twice (with and without a suffix)",
                    w[0]
                ));
            }
            if !computed {
                return Ok(Template::Constant(value.clone()));
            }
            Ok(Template::Object(members))
        }
        Value::Array(items) => {
            let items: Vec<Template> = items
                .iter()
                .enumerate()
                .map(|(i, v)| compile(v, depth + 1).map_err(|e| format!("[{i}]: {e}")))
                .collect::<Result<_, _>>()?;
            if items.iter().all(Template::is_constant) {
                return Ok(Template::Constant(value.clone()));
            }
            Ok(Template::List(items))
        }
        other => Ok(Template::Constant(other.clone())),
    }
}
