//! Flow runs on this node: the providers its engine has, and a definition's check against
//! them. The engine itself is `flows::engine`; the API's `/v1/flows/validate` and `/v1/runs`
//! and the CLI's `funcmesh flow` use what is here.

use serde::Serialize;

/// The action providers of this node's flow engine: so far the built-ins that need nothing
/// from the mesh (hello-world, expression-eval).
pub fn providers() -> flows::provider::Providers {
    flows::provider::Providers::builtin()
}

/// A definition that passed the check.
#[derive(Debug, Clone, Serialize)]
pub struct Validated {
    /// Always true (a definition that fails is an error).
    pub valid: bool,
    /// How many states it has at its top level.
    pub states: usize,
    /// The action URLs it uses.
    pub action_urls: Vec<String>,
}

/// Reads and checks `definition`, its action URLs against `providers`. The error names the
/// state and the field.
pub fn validate(
    definition: &serde_json::Value,
    providers: &flows::provider::Providers,
) -> Result<Validated, String> {
    let def = flows::definition::Definition::parse(definition).map_err(|e| e.to_string())?;
    def.check_actions(&|u| providers.knows(u))
        .map_err(|e| e.to_string())?;
    Ok(Validated {
        valid: true,
        states: def.states.len(),
        action_urls: def.action_urls().into_iter().collect(),
    })
}
