//! The flows crate's integration tests, one binary.

mod definition;
mod engine;
mod expr;
