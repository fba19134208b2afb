//! Globus Flows compatibility for funcmesh's flow engine.
//!
//! So far: [`expr`], the expression language of flow definitions (the `"name.=":
//! "<expression>"` parameters), a restricted, bounded subset of Python expressions evaluated
//! over the run's JSON state.
//!
//! ```
//! use serde_json::json;
//!
//! let state = json!({"state_manager": {"counter": 41}});
//! let counter = flows::expr::evaluate("state_manager.counter + 1", &state)?;
//! assert_eq!(counter, json!(42));
//! # Ok::<(), flows::expr::Error>(())
//! ```

pub mod choice;
pub mod definition;
pub mod engine;
pub mod expr;
pub mod path;
pub mod provider;
pub mod schema;
pub mod template;
pub mod time;
