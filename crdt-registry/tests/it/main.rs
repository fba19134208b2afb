//! Registry tests: convergence under any delivery order, forgeries, corrupt input.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

mod support;

mod checkpoints;
mod convergence;
mod forgery;
mod input;
