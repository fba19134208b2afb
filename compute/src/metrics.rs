//! The task path's metrics, declared in one place with a help text each; the node exports them
//! in Prometheus' text format (`GET /metrics`).

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::routing::EndpointLoad;
use crate::submit::machine::Submitted;
use crate::task::Outcome;

/// How a task ended, and why if it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ending {
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: String,
    /// The failure's kind (`Exception`, `EndpointLost`, `Refused`, …); empty otherwise.
    pub kind: String,
}

/// One endpoint of this node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Its name.
    pub endpoint: String,
}

/// One environment of one endpoint, and a state of its workers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The endpoint.
    pub endpoint: String,
    /// `host` or `<runtime>:<image>`.
    pub environment: String,
    /// `idle`, `busy` or `starting`.
    pub state: String,
}

/// An environment.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvironmentLabel {
    /// `host` or `<runtime>:<image>`.
    pub environment: String,
}

type IntGauge = Gauge<i64, AtomicI64>;

/// The task path's metrics (cheap to update: atomics).
#[derive(Debug, Default)]
pub struct Metrics {
    submitted: Counter,
    not_routed: Counter,
    finished: Family<Ending, Counter>,
    cold_starts: Family<EnvironmentLabel, Counter>,
    live: IntGauge,
    awaiting_route: IntGauge,
    queued: Family<EndpointLabel, IntGauge>,
    workers: Family<WorkerLabel, IntGauge>,
}

impl Metrics {
    /// Declares the metrics in `registry` (under `funcmesh_`) and returns them.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("funcmesh");
        r.register(
            "tasks_submitted",
            "Tasks this node accepted from its callers (stored, and sent to an endpoint)",
            m.submitted.clone(),
        );
        r.register(
            "tasks_not_routed",
            "Tasks this node refused at submission because no endpoint could run them",
            m.not_routed.clone(),
        );
        r.register(
            "tasks_finished",
            "Tasks this node submitted that ended, by outcome and failure kind",
            m.finished.clone(),
        );
        r.register(
            "cold_starts",
            "Finished tasks of this node that needed a worker to start, by environment",
            m.cold_starts.clone(),
        );
        r.register(
            "tasks_live",
            "Tasks this node submitted that have not ended yet",
            m.live.clone(),
        );
        r.register(
            "tasks_awaiting_route",
            "Tasks whose endpoint was lost, waiting for another endpoint to take their retry",
            m.awaiting_route.clone(),
        );
        r.register(
            "endpoint_queued",
            "Unfinished tasks held by each endpoint of this node (queued or running)",
            m.queued.clone(),
        );
        r.register(
            "endpoint_workers",
            "Workers of each endpoint of this node, by environment and state",
            m.workers.clone(),
        );
        Arc::new(m)
    }

    /// A submission was accepted (`true`) or found no route.
    pub(crate) fn submitted(&self, accepted: bool) {
        if accepted {
            self.submitted.inc();
        } else {
            self.not_routed.inc();
        }
    }

    /// A task this node submitted ended.
    pub(crate) fn finished(&self, t: &Submitted) {
        let (outcome, kind) = match &t.outcome {
            Some(Outcome::Succeeded { .. }) => ("succeeded", String::new()),
            Some(Outcome::Failed { error, .. }) => ("failed", format!("{:?}", error.kind)),
            Some(Outcome::Cancelled { .. }) => ("cancelled", String::new()),
            None => ("unknown", String::new()),
        };
        self.finished
            .get_or_create(&Ending {
                outcome: outcome.into(),
                kind,
            })
            .inc();
        if let Some(r) = t.record.as_ref().filter(|r| r.cold_start) {
            self.cold_starts
                .get_or_create(&EnvironmentLabel {
                    environment: r.environment.clone(),
                })
                .inc();
        }
    }

    /// The dispatcher's live tasks, and how many of them wait for a route.
    pub(crate) fn live(&self, live: usize, awaiting_route: usize) {
        self.live.set(live as i64);
        self.awaiting_route.set(awaiting_route as i64);
    }

    /// This node's endpoints' load, as advertised.
    pub(crate) fn loads(&self, loads: &[EndpointLoad]) {
        // Environments come and go: only the current ones are reported.
        self.workers.clear();
        for l in loads {
            self.queued
                .get_or_create(&EndpointLabel {
                    endpoint: l.name.clone(),
                })
                .set(i64::from(l.queued));
            for e in &l.environments {
                for (state, n) in [("idle", e.idle), ("busy", e.busy), ("starting", e.starting)] {
                    self.workers
                        .get_or_create(&WorkerLabel {
                            endpoint: l.name.clone(),
                            environment: e.env.clone(),
                            state: state.into(),
                        })
                        .set(i64::from(n));
                }
            }
        }
    }
}
