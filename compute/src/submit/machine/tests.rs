//! Unit tests of the dispatcher's sans-IO core, with a clock that moves only when told.

use super::*;
use crdt_registry::record::{FunctionKind, FunctionRecord, FunctionSpec, Policy};

fn peer(n: u8) -> PeerId {
    mesh::Keypair::ed25519_from_bytes([n; 32])
        .expect("32 bytes are an ed25519 secret")
        .public()
        .to_peer_id()
}

fn candidate(n: u8) -> Candidate {
    let p = peer(n);
    Candidate {
        id: format!("endpoint-{n}"),
        name: format!("ep{n}"),
        peer: p,
        peer_text: p.to_string(),
        node_name: format!("node{n}"),
        institution: Some("inst".into()),
        institution_key: None,
        runtimes: vec!["host".into()],
        tags: Default::default(),
        policy: Policy::Federation,
    }
}

fn request(n: u64, retries: u32) -> Request {
    let record = FunctionRecord {
        name: "echo".into(),
        owner: crdt_registry::Key([7; 32]),
        kind: FunctionKind::Python,
        spec: FunctionSpec::PythonSource {
            source: "def echo(n):\n    return n\n".into(),
            entrypoint: "echo".into(),
        },
        container: None,
        description: String::new(),
        created_ms: 1,
    };
    Request {
        function: crdt_registry::Function {
            id: record.content_id(),
            owner_peer: "owner".into(),
            institution: Some("inst".into()),
            record: record.into(),
        },
        args: serde_json::json!([n]),
        kwargs: Value::Null,
        args_ref: None,
        encoding: Encoding::Json,
        timeout_ms: 0,
        requirements: Requirements::default(),
        strategy: Strategy::RoundRobin,
        retries,
        capability: None,
        id: None,
    }
}

fn id(n: u64) -> TaskId {
    TaskId::try_from(format!("{n:032x}")).expect("a valid id")
}

/// A clock that only moves when told.
struct Clock {
    base: Instant,
    ms: u64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base: Instant::now(),
            ms: 0,
        }
    }
    fn now(&self) -> Now {
        Now {
            at: self.base + Duration::from_millis(self.ms),
            unix_us: 1_800_000_000_000_000 + self.ms * 1000,
        }
    }
    fn advance(&mut self, ms: u64) -> Now {
        self.ms += ms;
        self.now()
    }
}

fn machine(clock: &Clock, endpoints: &[u8]) -> Machine {
    let me = peer(0);
    let mut m = Machine::new(
        Settings {
            me,
            lost_after: Duration::from_secs(2),
            route_wait: Duration::from_secs(10),
            institution: Some("inst".into()),
            access: Access::new(me, None),
            seed: 1,
        },
        clock.now().at,
    );
    m.set_candidates(endpoints.iter().map(|n| candidate(*n)).collect());
    for n in endpoints {
        m.connected(peer(*n), true);
    }
    m
}

fn advert(m: &mut Machine, n: u8, at: Now) {
    m.advert(
        peer(n),
        Advert {
            v: crate::routing::ADVERT_VERSION,
            seq: at.unix_us,
            at_ms: at.unix_us / 1000,
            endpoints: vec![EndpointLoad {
                name: format!("ep{n}"),
                max_workers: 1,
                workers: 1,
                idle: 1,
                queued: 0,
                environments: Vec::new(),
            }],
        },
        at.at,
    );
}

fn result(wire: &TaskId, value: Value) -> Record {
    let outcome = Outcome::succeeded(value);
    Record {
        v: crate::task::RECORD_VERSION,
        id: wire.clone(),
        endpoint: "ep".into(),
        submitter: "me".into(),
        function_id: "f".into(),
        status: outcome.status(),
        times: Default::default(),
        worker: None,
        environment: "host".into(),
        cold_start: false,
        outcome: Some(outcome),
    }
}

fn submit_ids(out: &Outgoing) -> Vec<TaskId> {
    match &out.request {
        TaskRequest::Submit { tasks, .. } => tasks.iter().map(|t| t.id.clone()).collect(),
        other => panic!("not a Submit: {other:?}"),
    }
}

#[test]
fn a_task_is_sent_followed_and_concluded_once() {
    let clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let t = m.accept(request(1, 0), id(1), clock.now()).unwrap();
    assert_eq!(m.take_dirty(), vec![t.clone()], "stored before it is sent");
    let out = m.sends(None, clock.now());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].peer, peer(1));
    assert_eq!(out[0].ids, vec![t.clone()]);
    assert!(m.sends(None, clock.now()).is_empty(), "sent once");
    m.answered(
        peer(1),
        out[0].ids.clone(),
        Ok(TaskResponse::Submitted {
            answers: vec![Answer::Queued(Status::Running)],
            loads: Vec::new(),
        }),
        clock.now(),
    );
    assert_eq!(m.live(&t).unwrap().status, Status::Running);
    let rec = result(&t, serde_json::json!(1));
    m.results(peer(1), vec![rec.clone()], Vec::new(), clock.now());
    assert!(m.live(&t).is_none());
    assert_eq!(m.done().len(), 1);
    // The same result again (an endpoint re-sends until acknowledged) changes nothing.
    m.results(peer(1), vec![rec], Vec::new(), clock.now());
    assert_eq!(m.end_turn(), 1);
    assert!(m.done().is_empty());
}

#[test]
fn answers_pair_with_the_tasks_actually_sent() {
    let mut clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let ids: Vec<TaskId> = (1..=3)
        .map(|n| m.accept(request(n, 0), id(n), clock.now()).unwrap())
        .collect();
    let out = m.sends(None, clock.now());
    assert_eq!(out[0].ids, ids);
    // Busy: the node takes them later; until the backoff has passed nothing is sent.
    m.answered(
        peer(1),
        out[0].ids.clone(),
        Ok(TaskResponse::Busy {
            reason: "full".into(),
        }),
        clock.now(),
    );
    assert!(m.sends(None, clock.advance(100)).is_empty());
    // Meanwhile the first is cancelled (its endpoint never had it).
    m.cancelled(
        &ids[0],
        Ok(TaskResponse::Cancelled { record: None }),
        clock.now(),
    );
    assert!(m.live(&ids[0]).is_none());
    let out = m.sends(None, clock.advance(200));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].ids,
        ids[1..].to_vec(),
        "the cancelled task is not sent"
    );
    assert_eq!(submit_ids(&out[0]), ids[1..].to_vec());
    // The answers are about tasks 2 and 3, in that order.
    m.answered(
        peer(1),
        out[0].ids.clone(),
        Ok(TaskResponse::Submitted {
            answers: vec![
                Answer::Refused("access denied".into()),
                Answer::Queued(Status::Queued),
            ],
            loads: Vec::new(),
        }),
        clock.now(),
    );
    let refused = m.done_task(&ids[1]).expect("task 2 was refused");
    assert!(matches!(
        &refused.outcome,
        Some(Outcome::Failed { error, .. }) if error.kind == FailureKind::Refused
    ));
    assert_eq!(m.live(&ids[2]).unwrap().status, Status::Queued);
}

#[test]
fn a_task_whose_endpoint_is_lost_is_retried_elsewhere_and_the_old_one_is_not_heard() {
    let mut clock = Clock::new();
    let mut m = machine(&clock, &[1, 2]);
    let t = m.accept(request(1, 1), id(1), clock.now()).unwrap();
    let first = m.sends(None, clock.now()).remove(0);
    let old = first.peer;
    let other = if old == peer(1) { 2 } else { 1 };
    // Only the other endpoint goes on advertising; the first goes quiet.
    let mut now = clock.now();
    for _ in 0..6 {
        now = clock.advance(500);
        advert(&mut m, other, now);
        m.connected(old, false);
        m.tick(now);
    }
    let task = m.live(&t).expect("retried, not failed");
    assert_eq!(task.attempts.len(), 2);
    assert!(task.attempts[0].lost.is_some());
    let wire = task.attempts[1].wire_id.clone();
    assert_ne!(wire, t, "the retry has an id of its own");
    let out = m.sends(None, now);
    assert_eq!(out[0].peer, peer(other));
    // The first endpoint comes back and speaks of the task: it no longer counts.
    m.answered(
        old,
        first.ids.clone(),
        Ok(TaskResponse::Submitted {
            answers: vec![Answer::Refused("gone".into())],
            loads: Vec::new(),
        }),
        now,
    );
    m.results(
        old,
        vec![result(&t, serde_json::json!("old"))],
        Vec::new(),
        now,
    );
    assert!(
        m.live(&t).is_some(),
        "the old endpoint no longer speaks for it"
    );
    m.results(
        peer(other),
        vec![result(&wire, serde_json::json!("new"))],
        Vec::new(),
        now,
    );
    let done = m.done_task(&t).expect("concluded by its current endpoint");
    assert_eq!(
        done.outcome,
        Some(Outcome::succeeded(serde_json::json!("new")))
    );
}

#[test]
fn a_retry_waits_for_a_route_then_takes_one_or_fails_at_its_deadline() {
    let mut clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let a = m.accept(request(1, 2), id(1), clock.now()).unwrap();
    let b = m.accept(request(2, 2), id(2), clock.now()).unwrap();
    m.sends(None, clock.now());
    // Its endpoint reports the tasks lost (it restarted while they ran); nothing else is
    // listed yet.
    let lost = |wire: &TaskId| {
        let mut r = result(wire, Value::Null);
        r.outcome = Some(Outcome::failed(FailureKind::EndpointLost, "restarted"));
        r.status = Status::Failed;
        r
    };
    m.results(peer(1), vec![lost(&a), lost(&b)], Vec::new(), clock.now());
    assert_eq!(m.awaiting_route(), 2);
    assert!(m.done().is_empty(), "they wait instead of failing");
    assert!(
        m.sends(None, clock.now()).is_empty(),
        "nothing to send them to"
    );
    // A second endpoint appears: the tick routes both to it.
    m.set_candidates(vec![candidate(1), candidate(2)]);
    m.connected(peer(2), true);
    let now = clock.advance(2_500);
    advert(&mut m, 2, now);
    m.tick(now);
    assert_eq!(m.awaiting_route(), 0);
    let out = m.sends(None, now);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].peer, peer(2));
    assert_eq!(out[0].ids.len(), 2);

    // Another machine whose retry never finds a route fails at the deadline, saying why.
    let mut clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let c = m.accept(request(3, 1), id(3), clock.now()).unwrap();
    m.sends(None, clock.now());
    m.results(peer(1), vec![lost(&c)], Vec::new(), clock.now());
    m.tick(clock.advance(5_000));
    assert!(m.live(&c).is_some(), "still within its wait");
    m.tick(clock.advance(6_000));
    let failed = m.done_task(&c).expect("failed at its deadline");
    let Some(Outcome::Failed { error, .. }) = &failed.outcome else {
        panic!("{:?}", failed.outcome)
    };
    assert_eq!(error.kind, FailureKind::EndpointLost);
    assert!(
        error
            .message
            .contains("no other endpoint could take the retry"),
        "{}",
        error.message
    );
}

#[test]
fn a_resumed_machine_sends_unfinished_tasks_again_and_waiting_ones_wait() {
    let clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let a = m.accept(request(1, 1), id(1), clock.now()).unwrap();
    let mut stored = m.live(&a).unwrap().clone();
    let mut waiting = stored.clone();
    waiting.id = id(2);
    waiting.attempts[0].wire_id = id(2);
    waiting.attempts[0].lost = Some("its endpoint was lost".into());
    stored.status = Status::Running;
    let mut m = machine(&clock, &[1]);
    m.resume(vec![stored, waiting], clock.now().at);
    assert_eq!(m.live_count(), 2);
    assert_eq!(m.awaiting_route(), 1);
    let out = m.sends(None, clock.now());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].ids, vec![a]);
}

#[test]
fn a_waiter_is_ready_when_its_tasks_are_done_or_it_is_gone() {
    let clock = Clock::new();
    let mut m = machine(&clock, &[1]);
    let a = m.accept(request(1, 0), id(1), clock.now()).unwrap();
    m.add_waiter(7, vec![a.clone(), id(99)], HashMap::new());
    m.add_waiter(8, vec![a.clone()], HashMap::new());
    assert!(m.ready_waiters(|_| false).is_empty());
    let gone = m.ready_waiters(|w| w == 8);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].0, 8);
    m.results(
        peer(1),
        vec![result(&a, serde_json::json!(1))],
        Vec::new(),
        clock.now(),
    );
    let ready = m.ready_waiters(|_| false);
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].0, 7);
    assert!(ready[0].1[0].as_ref().is_some_and(|t| t.id == a));
    assert!(
        ready[0].1[1].is_none(),
        "an unknown id is answered as not found"
    );
}
