//! Integration tests of the compute crate: real worker processes on the host.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

mod endpoint;
mod sim;
