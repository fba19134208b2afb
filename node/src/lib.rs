//! The funcmesh node: configuration, the daemon that wires store, mesh and local API together,
//! the federation operations behind the CLI, the local multi-process testnet and the demo.
//!
//! The binary (`src/main.rs`) only parses the command line and calls [`cli::run`]; everything
//! else is a library so that tests drive it without spawning processes.

pub mod api;
pub mod capabilities;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod demo;
pub mod globus_compute;
pub mod local_testnet;
pub mod ops;
pub mod output;
pub mod registry;
pub mod remote_runs;
pub mod run_rights;
pub mod runs;
pub mod tasks;
pub mod transfers;
pub mod values;
pub mod verbs;

pub use config::Config;
pub use daemon::Node;
pub use datadir::DataDir;
