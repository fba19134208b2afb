//! The `funcmesh` binary: parse the command line, run it, print errors on one line.

use std::process::ExitCode;

fn main() -> ExitCode {
    node::cli::main()
}
