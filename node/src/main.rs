//! The `funcmesh` binary: parse the command line, run it, print errors on one line.

use std::process::ExitCode;

fn main() -> ExitCode {
    restore_sigpipe();
    node::cli::main()
}

/// Rust ignores SIGPIPE, so `funcmesh task status … | head` would panic on the closed pipe.
/// A command-line tool should end quietly there, as `cat` does.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

// Many small, short-lived allocations per task (records, JSON buffers, strings) on two or more
// threads: mimalloc's thread-local free lists serve them with less work than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
