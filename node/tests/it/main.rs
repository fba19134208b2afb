//! The real `funcmesh` binary, multi-process, on loopback.

// Tests stop at the first surprise; unwrapping is how they say so.
#![allow(clippy::unwrap_used)]

mod caps;
mod cli;
mod compat;
mod flows;
mod layout;
mod tasks;
mod transfer;
