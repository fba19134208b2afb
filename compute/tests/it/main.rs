//! Integration tests of the compute crate: real worker processes on the host.

mod endpoint;
