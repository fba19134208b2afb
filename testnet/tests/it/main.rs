//! Multi-node tests of the foundation, through the in-process testnet.

mod membership;
mod refusals;
