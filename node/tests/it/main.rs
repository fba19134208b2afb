//! The real `funcmesh` binary, multi-process, on loopback.

mod cli;
