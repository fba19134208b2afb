//! The transfer crate's integration tests: one binary.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

mod blob;
mod copy;
mod net;
mod root;
