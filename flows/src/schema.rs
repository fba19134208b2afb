//! A flow's `input_schema` (JSON Schema): checked when the flow is deployed, and every run's
//! input checked against it before the run starts. References are resolved only inside the
//! schema (no fetching of URLs or files: a schema is anyone's document).
//!
//! ```
//! use serde_json::json;
//!
//! let schema = json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}});
//! assert!(flows::schema::check_input(&schema, &json!({"n": 3})).is_ok());
//! let e = flows::schema::check_input(&schema, &json!({"n": "three"})).unwrap_err();
//! assert!(e.contains("/n"), "{e}");
//! ```

use serde_json::Value;

/// Most errors one check reports.
const SHOWN: usize = 5;

/// Whether `schema` is a JSON Schema this engine can check inputs against (`{}` and `null`:
/// any input).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    if schema.is_null() {
        return Ok(());
    }
    jsonschema::validator_for(schema)
        .map(|_| ())
        .map_err(|e| format!("the input schema is not a valid JSON Schema: {e}"))
}

/// Checks `input` against `schema`; the error lists what is wrong, each with where in the
/// input.
pub fn check_input(schema: &Value, input: &Value) -> Result<(), String> {
    if schema.is_null() {
        return Ok(());
    }
    let validator = jsonschema::validator_for(schema)
        .map_err(|e| format!("the flow's input schema is not a valid JSON Schema: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(input)
        .take(SHOWN + 1)
        .map(|e| {
            let at = e.instance_path.to_string();
            format!("{}: {e}", if at.is_empty() { "/".to_string() } else { at })
        })
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    let more = if errors.len() > SHOWN {
        "; and more"
    } else {
        ""
    };
    Err(format!(
        "the input does not match the flow's input schema: {}{more}",
        errors[..errors.len().min(SHOWN)].join("; ")
    ))
}
