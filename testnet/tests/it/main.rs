//! Multi-node tests of the foundation, through the in-process testnet.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

mod membership;
mod refusals;
mod registry;
mod scale;
mod tasks;
mod transfer;
