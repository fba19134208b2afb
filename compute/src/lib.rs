//! funcmesh compute: the task lifecycle on both sides, and the endpoints that run tasks.
//!
//! Submitting: [`submit::Dispatcher`] routes a task ([`routing::Router`], with access verdicts
//! from [`access`]), stores it, sends it to its endpoint's node as a [`wire::TaskRequest`], follows
//! its answers and result, and retries it elsewhere when its endpoint is lost. Serving:
//! `serve` answers those requests for this node's endpoints after the access check, and sends
//! results back. [`service::start`] wires both sides to the mesh; they reach other nodes only
//! through the mesh's links, and this node's own endpoints the same way minus the wire.
//!
//! An [`Endpoint`] owns a pool of workers per [`Environment`] (the host, or a container image
//! under docker, podman or apptainer). Workers are processes speaking the framed pipe
//! [`protocol`]; the Python worker ships inside this crate (`worker.py`) and runs Python source
//! functions, pickled functions from the SDK, and shell command templates. The scheduler
//! ([`pool::Pool`]) is sans-IO: it decides which worker runs what, when workers start and stop,
//! and when a task has run too long. Tasks are stored in RocksDB at every step of their life
//! ([`task::Record`]).
//!
pub mod access;
pub mod blobs;
pub mod config;
mod endpoint;
pub mod environment;
mod isolation;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod routing;
mod serve;
pub mod service;
pub mod shell_worker;
pub mod submit;
pub mod task;
pub mod wire;
mod worker;

pub use config::{EndpointConfig, Strategy};
pub use endpoint::{Endpoint, Error, Results};
pub use environment::{Environment, Runtime};
pub use task::{FailureKind, Outcome, Record, Status, Submission, TaskError, TaskId, ValueRef};
