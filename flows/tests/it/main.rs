//! The flows crate's integration tests, one binary.

mod definition;
mod expr;
