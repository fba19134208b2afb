//! Capability tokens against the verifier: one test per case of the list, the
//! delegation property test, and the token fuzz target.
#![allow(missing_docs, clippy::unwrap_used)]

mod fuzz;
mod prop;
mod scenarios;
mod support;
