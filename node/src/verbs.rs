//! The CLI's verbs, one module per group: its clap types and what it does. `cli.rs` holds the
//! top-level command and dispatches to them; `output.rs` what they print.

pub mod cap;
pub mod endpoint;
pub mod flow;
pub mod function;
pub mod run;
pub mod start;
pub mod task;
pub mod transfer;
