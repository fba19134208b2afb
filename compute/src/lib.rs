//! funcmesh endpoints: run registered functions in pools of long-lived workers.
//!
//! An [`Endpoint`] owns a pool of workers per [`Environment`] (the host, or a container image
//! under docker, podman or apptainer). Workers are processes speaking the framed pipe
//! [`protocol`]; the Python worker ships inside this crate (`worker.py`) and runs Python source
//! functions, pickled functions from the SDK, and shell command templates. The scheduler
//! ([`pool::Pool`]) is sans-IO: it decides which worker runs what, when workers start and stop,
//! and when a task has run too long. Tasks are stored in RocksDB at every step of their life
//! ([`task::Record`]).
//!
//! This crate does not know how tasks arrive: the mesh carries [`task::Submission`]s to the
//! node, and the node hands them to [`Endpoint::submit`].

pub mod config;
mod endpoint;
pub mod environment;
pub mod pool;
pub mod protocol;
pub mod shell_worker;
pub mod task;
mod worker;

pub use config::{EndpointConfig, Strategy};
pub use endpoint::{Endpoint, Error, Results};
pub use environment::{Environment, Runtime};
pub use task::{FailureKind, Outcome, Record, Status, Submission, TaskError, TaskId};
