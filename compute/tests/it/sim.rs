//! A deterministic simulation of the task path: the submitting side's sans-IO core
//! ([`Machine`], with its router) against endpoint nodes that follow the serving side's
//! contract, over a simulated network that delays, drops, reorders and duplicates messages,
//! with endpoints that fill up, die and come back, and a submitter that crashes and restarts
//! from what it stored.
//!
//! After every step the checks hold: each task concludes at most once, an answer or a result is
//! credited only to the task and attempt it was about (a refusal only to a task its endpoint
//! refused, a result only from the task's current endpoint), and at the end of each run, once
//! the network heals, no accepted task is lost. A failing seed is printed; run it alone with
//! `FUNCMESH_SIM_SEED=<seed> cargo test -p compute --test it sim::` (`FUNCMESH_SIM_SEEDS=N`
//! runs more seeds).

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compute::access::Access;
use compute::routing::{Advert, Candidate, EndpointLoad, Requirements, Strategy};
use compute::submit::machine::{Machine, Now, Settings};
use compute::submit::{Request, Submitted};
use compute::task::{Encoding, FailureKind, Outcome, Record, Status, TaskId, Times};
use compute::wire::{Answer, TaskRequest, TaskResponse};
use crdt_registry::record::{FunctionKind, FunctionRecord, FunctionSpec, Policy};
use mesh::PeerId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const ENDPOINTS: usize = 3;
const TASKS: usize = 40;
const LOST_AFTER: Duration = Duration::from_secs(2);
/// When a request or its answer is lost, the sender hears of it this late (the link's timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Faults stop here; the run then goes on, healed, until every task has concluded.
const CHAOS_UNTIL: Duration = Duration::from_secs(60);
const GIVE_UP_AT: Duration = Duration::from_secs(900);

/// What happens at a moment of the simulation.
#[derive(Debug)]
enum Ev {
    /// A caller submits task `n`.
    Submit(usize),
    /// A caller cancels task `n`.
    Cancel(usize),
    /// A cancel reaches an endpoint node.
    CancelArrives {
        ep: usize,
        life: u64,
        id: TaskId,
        request: TaskRequest,
    },
    /// The answer to a cancel reaches the submitter.
    CancelAnswer {
        life: u64,
        id: TaskId,
        res: Result<TaskResponse, String>,
    },
    SubmitterTick,
    /// The submitter crashes; it comes back `down` later.
    SubmitterCrash {
        down: Duration,
    },
    SubmitterRestart,
    /// A Submit batch reaches an endpoint node.
    SubmitArrives {
        ep: usize,
        life: u64,
        ids: Vec<TaskId>,
        tasks: Vec<compute::Submission>,
    },
    /// The answer to a Submit reaches the submitter (`life`: the submitter's run that sent it).
    Answer {
        ep: usize,
        life: u64,
        ids: Vec<TaskId>,
        res: Result<TaskResponse, String>,
    },
    /// Results reach the submitter.
    Results {
        ep: usize,
        records: Vec<Record>,
    },
    /// The submitter's acknowledgement reaches an endpoint.
    Ack {
        ep: usize,
        ids: Vec<TaskId>,
    },
    Advert {
        ep: usize,
        seq: u64,
    },
    Connected {
        ep: usize,
        up: bool,
    },
    /// An endpoint's worker finishes what it runs (`life`: the endpoint's run that started it).
    WorkDone {
        ep: usize,
        life: u64,
        wire: TaskId,
    },
    EndpointTick(usize),
    EndpointCrash {
        ep: usize,
        down: Duration,
    },
    EndpointRestart(usize),
}

struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // A max-heap: the earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum EpState {
    Queued,
    Running,
    Done(Box<Record>),
}

#[derive(Debug)]
struct EpTask {
    sub: compute::Submission,
    state: EpState,
}

/// An endpoint node, as the serving side behaves: ids are idempotency keys, a full endpoint
/// answers `Busy`, what it refuses it says so, results stay in its outbox until acknowledged,
/// and after a crash what was running fails `EndpointLost` while what was queued runs.
struct EndpointNode {
    peer: PeerId,
    name: String,
    alive: bool,
    life: u64,
    tasks: HashMap<TaskId, EpTask>,
    order: Vec<TaskId>,
    running: Option<TaskId>,
    outbox: HashSet<TaskId>,
    /// Every wire id it ever refused.
    refused: HashSet<TaskId>,
    /// Unfinished tasks it holds at most.
    cap: usize,
    advert_seq: u64,
}

impl EndpointNode {
    fn unfinished(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| !matches!(t.state, EpState::Done(_)))
            .count()
    }

    fn load(&self) -> EndpointLoad {
        EndpointLoad {
            name: self.name.clone(),
            max_workers: 1,
            workers: 1,
            idle: u32::from(self.running.is_none()),
            queued: self.unfinished() as u32,
            environments: Vec::new(),
        }
    }
}

/// What the simulation checks, kept as it runs.
#[derive(Default)]
struct Ledger {
    /// Tasks the submitter accepted (its store holds them), by id.
    accepted: HashSet<TaskId>,
    /// How each task concluded, and how often.
    concluded: HashMap<TaskId, Vec<Arc<Submitted>>>,
}

struct Sim {
    rng: StdRng,
    now: Duration,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Scheduled>,
    submitter: PeerId,
    machine: Option<Machine>,
    /// The submitter's run (answers to requests of an earlier run are dropped with it).
    life: u64,
    /// What the submitter has stored: unfinished tasks, and the ids of concluded ones.
    stored: BTreeMap<TaskId, Submitted>,
    stored_done: HashSet<TaskId>,
    endpoints: Vec<EndpointNode>,
    candidates: Vec<Candidate>,
    /// Task number → the id it was accepted under.
    ids: HashMap<usize, TaskId>,
    /// Which tasks the endpoints refuse.
    refuse: HashSet<usize>,
    /// Which tasks a caller cancels.
    cancel: HashSet<usize>,
    ledger: Ledger,
    access: Arc<Access>,
    chaos: bool,
    /// The latest events, for the report of a failing seed.
    log: std::collections::VecDeque<String>,
}

/// A peer id drawn from the seed.
fn peer(rng: &mut StdRng) -> PeerId {
    mesh::Keypair::ed25519_from_bytes(rng.r#gen::<[u8; 32]>())
        .expect("32 bytes are an ed25519 secret")
        .public()
        .to_peer_id()
}

fn function() -> crdt_registry::Function {
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
    crdt_registry::Function {
        id: record.content_id(),
        owner_peer: "owner".into(),
        institution: Some("inst".into()),
        record: record.into(),
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let submitter = peer(&mut rng);
        let endpoints: Vec<EndpointNode> = (0..ENDPOINTS)
            .map(|i| EndpointNode {
                peer: peer(&mut rng),
                name: format!("ep{i}"),
                alive: true,
                life: 0,
                tasks: HashMap::new(),
                order: Vec::new(),
                running: None,
                outbox: HashSet::new(),
                refused: HashSet::new(),
                cap: rng.gen_range(1..6),
                advert_seq: 0,
            })
            .collect();
        let candidates = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| Candidate {
                id: format!("endpoint-{i}"),
                name: e.name.clone(),
                peer: e.peer,
                peer_text: e.peer.to_string(),
                node_name: format!("node{i}"),
                institution: Some("inst".into()),
                institution_key: None,
                runtimes: vec!["host".into()],
                tags: Default::default(),
                policy: Policy::Federation,
            })
            .collect();
        let refuse = (0..TASKS).filter(|_| rng.gen_bool(0.15)).collect();
        let cancel: HashSet<usize> = (0..TASKS).filter(|_| rng.gen_bool(0.15)).collect();
        let access = Access::new(submitter, None);
        let mut sim = Sim {
            rng,
            now: Duration::ZERO,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            submitter,
            machine: None,
            life: 0,
            stored: BTreeMap::new(),
            stored_done: HashSet::new(),
            endpoints,
            candidates,
            ids: HashMap::new(),
            refuse,
            cancel: cancel.clone(),
            ledger: Ledger::default(),
            access,
            chaos: true,
            log: Default::default(),
        };
        sim.boot_submitter();
        for n in 0..TASKS {
            let at = Duration::from_millis(sim.rng.gen_range(0..6_000));
            sim.at(at, Ev::Submit(n));
            if cancel.contains(&n) {
                let later = at + Duration::from_millis(sim.rng.gen_range(0..3_000));
                sim.at(later, Ev::Cancel(n));
            }
        }
        for ep in 0..ENDPOINTS {
            sim.at(Duration::ZERO, Ev::Advert { ep, seq: 0 });
            sim.at(Duration::from_millis(100), Ev::EndpointTick(ep));
        }
        sim.at(Duration::from_millis(250), Ev::SubmitterTick);
        // Faults, at random moments while the chaos lasts.
        let crashes = sim.rng.gen_range(0..4);
        for _ in 0..crashes {
            let ep = sim.rng.gen_range(0..ENDPOINTS);
            let at =
                Duration::from_millis(sim.rng.gen_range(1_000..CHAOS_UNTIL.as_millis() as u64));
            let down = Duration::from_millis(sim.rng.gen_range(100..8_000));
            sim.at(at, Ev::EndpointCrash { ep, down });
        }
        if sim.rng.gen_bool(0.5) {
            let at = Duration::from_millis(sim.rng.gen_range(1_000..30_000));
            let down = Duration::from_millis(sim.rng.gen_range(100..5_000));
            sim.at(at, Ev::SubmitterCrash { down });
        }
        sim
    }

    /// Keeps an event for the report of a failing seed (the last 60).
    fn note(&mut self, event: String) {
        if self.log.len() == 60 {
            self.log.pop_front();
        }
        self.log.push_back(event);
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn clock(&self) -> Now {
        Now {
            at: self.instant(),
            unix_us: 1_800_000_000_000_000 + self.now.as_micros() as u64,
        }
    }

    fn at(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    /// Sends a message over the network: delayed, sometimes much; while the chaos lasts,
    /// sometimes dropped (`lost` is then delivered instead, if any, after the link's timeout)
    /// and sometimes duplicated (`dup`).
    fn send(&mut self, ev: Ev, lost: Option<Ev>, dup: Option<Ev>) {
        let slow = self.chaos && self.rng.gen_bool(0.05);
        let delay = if slow {
            Duration::from_millis(self.rng.gen_range(1_000..4_000))
        } else {
            Duration::from_micros(self.rng.gen_range(100..30_000))
        };
        if self.chaos && self.rng.gen_bool(0.05) {
            if let Some(lost) = lost {
                self.at(self.now + REQUEST_TIMEOUT, lost);
            }
            return;
        }
        self.at(self.now + delay, ev);
        if let Some(dup) = dup {
            if self.chaos && self.rng.gen_bool(0.03) {
                let later = delay + Duration::from_millis(self.rng.gen_range(0..500));
                self.at(self.now + later, dup);
            }
        }
    }

    fn boot_submitter(&mut self) {
        self.life += 1;
        let mut m = Machine::new(
            Settings {
                me: self.submitter,
                lost_after: LOST_AFTER,
                route_wait: Duration::from_secs(120),
                institution: Some("inst".into()),
                access: self.access.clone(),
                seed: self.rng.r#gen(),
            },
            self.instant(),
        );
        m.set_candidates(self.candidates.clone());
        for e in &self.endpoints {
            if e.alive {
                m.connected(e.peer, true);
            }
        }
        m.resume(self.stored.values().cloned().collect(), self.instant());
        self.machine = Some(m);
        self.flush();
    }

    /// The driver's turn end: store what changed, record what concluded, send what is due.
    fn flush(&mut self) {
        let now = self.clock();
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        for id in m.take_dirty() {
            if let Some(t) = m.live(&id) {
                self.stored.insert(id, t.clone());
            }
        }
        let done: Vec<Arc<Submitted>> = m.done().to_vec();
        m.end_turn();
        let sends = m.sends(None, now);
        for t in done {
            self.stored.remove(&t.id);
            self.stored_done.insert(t.id.clone());
            self.note(format!(
                "{:?} concluded {} as {:?}",
                self.now, t.id, t.outcome
            ));
            self.ledger
                .concluded
                .entry(t.id.clone())
                .or_default()
                .push(t);
        }
        for out in sends {
            self.dispatch(out.peer, out.ids, out.request);
        }
    }

    fn ep_of(&self, peer: PeerId) -> usize {
        self.endpoints
            .iter()
            .position(|e| e.peer == peer)
            .expect("tasks go to the simulated endpoints only")
    }

    fn dispatch(&mut self, peer: PeerId, ids: Vec<TaskId>, request: TaskRequest) {
        let ep = self.ep_of(peer);
        let TaskRequest::Submit { tasks, .. } = request else {
            panic!("the machine sends only Submit requests by itself");
        };
        self.note(format!(
            "{:?} send {} tasks to ep{ep}: {:?}",
            self.now,
            ids.len(),
            ids
        ));
        let life = self.life;
        let lost = Ev::Answer {
            ep,
            life,
            ids: ids.clone(),
            res: Err(format!("ep{ep} did not answer in time")),
        };
        let ev = Ev::SubmitArrives {
            ep,
            life,
            ids: ids.clone(),
            tasks: tasks.clone(),
        };
        let dup = Ev::SubmitArrives {
            ep,
            life,
            ids,
            tasks,
        };
        self.send(ev, Some(lost), Some(dup));
    }

    fn step(&mut self, ev: Ev) {
        let now = self.clock();
        match ev {
            Ev::Submit(n) => {
                let Some(m) = self.machine.as_mut() else {
                    // Nobody to submit to: the caller tries again shortly.
                    self.at(self.now + Duration::from_millis(500), Ev::Submit(n));
                    return;
                };
                let kwargs = if self.refuse.contains(&n) {
                    json!({"refuse": true})
                } else {
                    Value::Null
                };
                let r = Request {
                    function: function(),
                    args: json!([n]),
                    kwargs,
                    args_ref: None,
                    encoding: Encoding::Json,
                    timeout_ms: 0,
                    requirements: Requirements::default(),
                    strategy: Strategy::WarmAware,
                    retries: 3,
                    capability: None,
                    id: None,
                };
                let id = TaskId::try_from(format!("{:032x}", n + 1)).expect("a valid id");
                match m.accept(r, id.clone(), now) {
                    Ok(id) => {
                        self.ids.insert(n, id.clone());
                        self.ledger.accepted.insert(id);
                    }
                    // No endpoint can take it now (all lost): the caller tries again.
                    Err(_) => self.at(self.now + Duration::from_millis(500), Ev::Submit(n)),
                }
            }
            Ev::Cancel(n) => {
                let (Some(m), Some(id)) = (self.machine.as_ref(), self.ids.get(&n).cloned()) else {
                    // Not accepted yet, or nobody to ask: the caller tries again shortly.
                    self.at(self.now + Duration::from_millis(300), Ev::Cancel(n));
                    return;
                };
                let Some((Some(peer), request)) = m.cancel_request(&id) else {
                    return;
                };
                let ep = self.ep_of(peer);
                let life = self.life;
                self.note(format!("{:?} cancel {id} at ep{ep}", self.now));
                let lost = Ev::CancelAnswer {
                    life,
                    id: id.clone(),
                    res: Err(format!("ep{ep} did not answer in time")),
                };
                self.send(
                    Ev::CancelArrives {
                        ep,
                        life,
                        id,
                        request,
                    },
                    Some(lost),
                    None,
                );
            }
            Ev::CancelArrives {
                ep,
                life,
                id,
                request,
            } => {
                let TaskRequest::Cancel { id: wire, .. } = request else {
                    panic!("a cancel carries a Cancel request");
                };
                let res = if self.endpoints[ep].alive {
                    let e = &mut self.endpoints[ep];
                    let record = match e.tasks.get_mut(&wire) {
                        Some(t) => {
                            if !matches!(t.state, EpState::Done(_)) {
                                if e.running.as_ref() == Some(&wire) {
                                    e.running = None;
                                }
                                t.state = EpState::Done(Box::new(record(
                                    &t.sub,
                                    Outcome::Cancelled {
                                        reason: "cancelled by the submitter".into(),
                                    },
                                )));
                            }
                            match &t.state {
                                EpState::Done(r) => Some((**r).clone()),
                                _ => None,
                            }
                        }
                        None => None,
                    };
                    self.start_work(ep);
                    Ok(TaskResponse::Cancelled { record })
                } else {
                    Err(format!("the task stream to ep{ep} broke"))
                };
                let lost = Ev::CancelAnswer {
                    life,
                    id: id.clone(),
                    res: Err(format!("ep{ep} did not answer in time")),
                };
                self.send(Ev::CancelAnswer { life, id, res }, Some(lost), None);
            }
            Ev::CancelAnswer { life, id, res } => {
                if life != self.life {
                    return;
                }
                if let Some(m) = self.machine.as_mut() {
                    m.cancelled(&id, res, now);
                }
            }
            Ev::SubmitterTick => {
                if let Some(m) = self.machine.as_mut() {
                    m.tick(now);
                }
                self.at(self.now + Duration::from_millis(250), Ev::SubmitterTick);
            }
            Ev::SubmitterCrash { down } => {
                if self.machine.take().is_some() {
                    self.note(format!("{:?} submitter crashed", self.now));
                    self.at(self.now + down, Ev::SubmitterRestart);
                }
            }
            Ev::SubmitterRestart => {
                self.note(format!("{:?} submitter restarts", self.now));
                self.boot_submitter();
            }
            Ev::SubmitArrives {
                ep,
                life,
                ids,
                tasks,
            } => {
                if !self.endpoints[ep].alive {
                    // The link breaks: the sender hears of it soon.
                    let res = Err(format!("the task stream to ep{ep} broke"));
                    let at = self.now + Duration::from_millis(self.rng.gen_range(1..200));
                    self.at(at, Ev::Answer { ep, life, ids, res });
                    return;
                }
                let res = self.serve_submit(ep, tasks);
                self.note(format!(
                    "{:?} ep{ep} answers {} tasks: {}",
                    self.now,
                    ids.len(),
                    match &res {
                        TaskResponse::Busy { .. } => "busy".to_string(),
                        TaskResponse::Submitted { answers, .. } => format!("{answers:?}"),
                        o => format!("{o:?}"),
                    }
                ));
                let lost = Ev::Answer {
                    ep,
                    life,
                    ids: ids.clone(),
                    res: Err(format!("ep{ep} did not answer in time")),
                };
                self.send(
                    Ev::Answer {
                        ep,
                        life,
                        ids,
                        res: Ok(res),
                    },
                    Some(lost),
                    None,
                );
            }
            Ev::Answer { ep, life, ids, res } => {
                if life != self.life {
                    return;
                }
                let peer = self.endpoints[ep].peer;
                if let Some(m) = self.machine.as_mut() {
                    m.answered(peer, ids, res, now);
                }
            }
            Ev::Results { ep, records } => {
                let peer = self.endpoints[ep].peer;
                let Some(m) = self.machine.as_mut() else {
                    return;
                };
                let ids: Vec<TaskId> = records.iter().map(|r| r.id.clone()).collect();
                m.results(peer, records, Vec::new(), now);
                // Acknowledged once stored, which `flush` does at the end of this step.
                self.send(Ev::Ack { ep, ids }, None, None);
            }
            Ev::Ack { ep, ids } => {
                let e = &mut self.endpoints[ep];
                for id in ids {
                    e.outbox.remove(&id);
                }
            }
            Ev::Advert { ep, seq } => {
                let e = &self.endpoints[ep];
                if e.alive && seq == e.advert_seq {
                    let advert = Advert {
                        v: compute::routing::ADVERT_VERSION,
                        seq: e.advert_seq,
                        at_ms: now.unix_us / 1000,
                        endpoints: vec![e.load()],
                    };
                    let peer = e.peer;
                    if let Some(m) = self.machine.as_mut() {
                        m.advert(peer, advert, now.at);
                    }
                }
            }
            Ev::Connected { ep, up } => {
                let peer = self.endpoints[ep].peer;
                if let Some(m) = self.machine.as_mut() {
                    m.connected(peer, up);
                    if up {
                        for out in m.sends(Some(peer), now) {
                            self.dispatch(out.peer, out.ids, out.request);
                        }
                    }
                }
            }
            Ev::WorkDone { ep, life, wire } => {
                let e = &mut self.endpoints[ep];
                if !e.alive || e.life != life || e.running.as_ref() != Some(&wire) {
                    return;
                }
                e.running = None;
                let t = e.tasks.get_mut(&wire).expect("it runs what it holds");
                let n = t.sub.args[0].clone();
                let rec = record(
                    &t.sub,
                    Outcome::succeeded(json!({"n": n, "wire": wire.to_string(), "ep": ep})),
                );
                t.state = EpState::Done(Box::new(rec.clone()));
                e.outbox.insert(wire);
                self.send(
                    Ev::Results {
                        ep,
                        records: vec![rec.clone()],
                    },
                    None,
                    Some(Ev::Results {
                        ep,
                        records: vec![rec],
                    }),
                );
                self.start_work(ep);
            }
            Ev::EndpointTick(ep) => {
                self.at(self.now + Duration::from_millis(500), Ev::EndpointTick(ep));
                if !self.endpoints[ep].alive {
                    return;
                }
                // Its advert, and its outbox sent again.
                self.endpoints[ep].advert_seq += 1;
                let seq = self.endpoints[ep].advert_seq;
                self.send(Ev::Advert { ep, seq }, None, None);
                let e = &self.endpoints[ep];
                let records: Vec<Record> = e
                    .outbox
                    .iter()
                    .filter_map(|id| match &e.tasks[id].state {
                        EpState::Done(r) => Some((**r).clone()),
                        _ => None,
                    })
                    .collect();
                if !records.is_empty() && self.rng.gen_bool(0.25) {
                    self.send(Ev::Results { ep, records }, None, None);
                }
                self.start_work(ep);
            }
            Ev::EndpointCrash { ep, down } => {
                if !self.endpoints[ep].alive {
                    return;
                }
                self.note(format!("{:?} ep{ep} crashed", self.now));
                let e = &mut self.endpoints[ep];
                e.alive = false;
                e.life += 1;
                // What was running is lost; what was queued runs after the restart.
                if let Some(wire) = e.running.take() {
                    let t = e.tasks.get_mut(&wire).expect("it runs what it holds");
                    let rec = record(
                        &t.sub,
                        Outcome::failed(
                            FailureKind::EndpointLost,
                            "the endpoint restarted while the task ran",
                        ),
                    );
                    t.state = EpState::Done(Box::new(rec));
                    e.outbox.insert(wire);
                }
                let at = self.now + Duration::from_millis(self.rng.gen_range(1..300));
                self.at(at, Ev::Connected { ep, up: false });
                self.at(self.now + down, Ev::EndpointRestart(ep));
            }
            Ev::EndpointRestart(ep) => {
                self.endpoints[ep].alive = true;
                self.note(format!("{:?} ep{ep} restarts", self.now));
                let at = self.now + Duration::from_millis(self.rng.gen_range(1..300));
                self.at(at, Ev::Connected { ep, up: true });
                self.start_work(ep);
            }
        }
    }

    /// The serving side's answer to a Submit batch.
    fn serve_submit(&mut self, ep: usize, tasks: Vec<compute::Submission>) -> TaskResponse {
        let e = &mut self.endpoints[ep];
        let new = tasks
            .iter()
            .filter(|t| !e.tasks.contains_key(&t.id))
            .count();
        let held = e.unfinished();
        if held > 0 && new > 0 && held + new > e.cap {
            return TaskResponse::Busy {
                reason: format!("ep{ep} is full"),
            };
        }
        let mut answers = Vec::new();
        for t in tasks {
            if let Some(known) = e.tasks.get(&t.id) {
                answers.push(match &known.state {
                    EpState::Done(r) => Answer::Accepted((**r).clone()),
                    EpState::Running => Answer::Queued(Status::Running),
                    EpState::Queued => Answer::Queued(Status::Queued),
                });
                continue;
            }
            if t.endpoint != e.name {
                answers.push(Answer::Refused(format!(
                    "this node runs no endpoint named `{}`",
                    t.endpoint
                )));
                e.refused.insert(t.id.clone());
                continue;
            }
            if t.kwargs.get("refuse").is_some() {
                answers.push(Answer::Refused("access denied".into()));
                e.refused.insert(t.id.clone());
                continue;
            }
            e.order.push(t.id.clone());
            e.tasks.insert(
                t.id.clone(),
                EpTask {
                    sub: t,
                    state: EpState::Queued,
                },
            );
            answers.push(Answer::Queued(Status::Queued));
        }
        self.start_work(ep);
        TaskResponse::Submitted {
            answers,
            loads: Vec::new(),
        }
    }

    fn start_work(&mut self, ep: usize) {
        let e = &mut self.endpoints[ep];
        if !e.alive || e.running.is_some() {
            return;
        }
        let Some(next) = e
            .order
            .iter()
            .find(|id| e.tasks[*id].state == EpState::Queued)
            .cloned()
        else {
            return;
        };
        e.tasks.get_mut(&next).expect("listed").state = EpState::Running;
        e.running = Some(next.clone());
        let life = e.life;
        let took = Duration::from_millis(self.rng.gen_range(1..800));
        self.at(
            self.now + took,
            Ev::WorkDone {
                ep,
                life,
                wire: next,
            },
        );
    }

    /// The checks that hold after every step.
    fn check(&self) -> Result<(), String> {
        for (id, ends) in &self.ledger.concluded {
            if ends.len() > 1 {
                return Err(format!("task {id} concluded {} times", ends.len()));
            }
            let t = &ends[0];
            if !self.ledger.accepted.contains(id) {
                return Err(format!("task {id} concluded but was never accepted"));
            }
            let n = t.submission.args[0].as_u64().expect("args are [n]") as usize;
            let last = t.attempts.last().expect("a task has an attempt");
            let ep = self.ep_of(last.target.peer.parse().expect("a peer id"));
            match &t.outcome {
                Some(Outcome::Succeeded { value, .. }) => {
                    if value["n"] != json!(n) {
                        return Err(format!(
                            "task {id} (n = {n}) was credited another task's result: {value}"
                        ));
                    }
                    if value["wire"] != json!(last.wire_id.to_string()) || value["ep"] != json!(ep)
                    {
                        return Err(format!(
                            "task {id} took a result from an attempt that is not its current one \
                             ({value}; current: {} on ep{ep})",
                            last.wire_id
                        ));
                    }
                    if self.refuse.contains(&n) {
                        return Err(format!("task {id} should have been refused"));
                    }
                }
                Some(Outcome::Failed { error, .. }) if error.kind == FailureKind::Refused => {
                    if !self.endpoints[ep].refused.contains(&last.wire_id) {
                        return Err(format!(
                            "task {id} (n = {n}) was failed as refused by ep{ep}, which never \
                             refused its attempt {}: {}",
                            last.wire_id, error.message
                        ));
                    }
                }
                Some(Outcome::Failed { error, .. }) if error.kind == FailureKind::EndpointLost => {}
                Some(Outcome::Cancelled { .. }) if self.cancel.contains(&n) => {}
                other => return Err(format!("task {id} ended unexpectedly: {other:?}")),
            }
        }
        Ok(())
    }

    /// Runs to the end; `Err` says which check failed.
    fn run(&mut self) -> Result<(), String> {
        while let Some(s) = self.queue.pop() {
            self.now = s.at;
            if self.chaos && self.now >= CHAOS_UNTIL {
                self.chaos = false;
            }
            self.step(s.ev);
            self.flush();
            self.check()?;
            if !self.chaos && self.all_concluded() {
                return Ok(());
            }
            if self.now > GIVE_UP_AT {
                break;
            }
        }
        let open: Vec<String> = (0..TASKS)
            .filter(|n| {
                self.ids
                    .get(n)
                    .is_none_or(|id| !self.ledger.concluded.contains_key(id))
            })
            .map(|n| {
                let id = self.ids.get(&n);
                let state = id
                    .and_then(|id| self.machine.as_ref().and_then(|m| m.live(id)))
                    .map(|t| format!("{:?} attempts {:?}", t.status, t.attempts));
                format!("task {n} ({id:?}): {state:?}")
            })
            .collect();
        Err(format!(
            "{} tasks never concluded (lost) by {:?}: {}",
            open.len(),
            self.now,
            open.join("; ")
        ))
    }

    fn all_concluded(&self) -> bool {
        self.ids.len() == TASKS
            && self
                .ids
                .values()
                .all(|id| self.ledger.concluded.contains_key(id))
    }
}

fn record(sub: &compute::Submission, outcome: Outcome) -> Record {
    Record {
        v: compute::task::RECORD_VERSION,
        id: sub.id.clone(),
        endpoint: sub.endpoint.clone(),
        submitter: "submitter".into(),
        function_id: sub.function_id.clone(),
        status: outcome.status(),
        times: Times::default(),
        worker: None,
        environment: "host".into(),
        cold_start: false,
        outcome: Some(outcome),
    }
}

/// Runs one seed; the error carries the seed and the tail of its log.
fn run_seed(seed: u64) -> Result<(), String> {
    let mut sim = Sim::new(seed);
    sim.run().map_err(|e| {
        let tail: Vec<&str> = sim.log.iter().map(String::as_str).collect();
        format!(
            "seed {seed} failed: {e}\n(replay with FUNCMESH_SIM_SEED={seed})\nlast events:\n{}",
            tail.join("\n")
        )
    })
}

#[test]
fn the_task_path_survives_loss_reordering_duplication_and_crashes() {
    if let Ok(seed) = std::env::var("FUNCMESH_SIM_SEED") {
        let seed: u64 = seed.parse().expect("FUNCMESH_SIM_SEED is a number");
        run_seed(seed).unwrap_or_else(|e| panic!("{e}"));
        return;
    }
    let seeds: u64 = std::env::var("FUNCMESH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let t0 = Instant::now();
    // Seeds are independent: spread them over the cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let failures: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    (k..seeds)
                        .step_by(threads as usize)
                        .filter_map(|seed| run_seed(seed).err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        runs.into_iter()
            .flat_map(|r| r.join().expect("a simulation thread does not panic"))
            .collect()
    });
    eprintln!("{seeds} seeds in {:?}", t0.elapsed());
    if let Some(first) = failures.first() {
        panic!(
            "{} of {seeds} seeds failed; the first:\n{first}",
            failures.len()
        );
    }
}

/// A failure the simulation counts on seeing: a task refused by its endpoint ends refused.
#[test]
fn a_refusal_reaches_the_task_it_was_about() {
    let mut sim = Sim::new(7);
    sim.run().unwrap();
    let refused = sim
        .ledger
        .concluded
        .values()
        .filter(|t| {
            matches!(&t[0].outcome, Some(Outcome::Failed { error, .. }) if error.kind == FailureKind::Refused)
        })
        .count();
    assert!(refused > 0, "no task of seed 7 was refused");
}
