//! Endpoint advertisements and the router, sans-IO.
//!
//! Every node with endpoints gossips an [`Advert`] on `funcmesh/<fed>/adverts/1` on change (at
//! most about once a second) and as a heartbeat: per endpoint, its free and total workers, its
//! queue, and per environment its idle warm workers and measured cold start. The heartbeat
//! stretches with the federation ([`advert_heartbeat`]: every 2 s up to 10 endpoint nodes, then
//! so that all of them together send about [`ADVERT_BUDGET`] per second, at most every 60 s), so
//! an idle node's cost of hearing them does not grow with the federation; and a node is lost
//! only after three missed heartbeats. Task answers carry the endpoint's fresh load in between.
//! Gossipsub signs each message with the author's node key, and the mesh accepts gossip only from
//! verified members, so an advert speaks for its author alone. Adverts are load, not state: they
//! stay out of the registry.
//!
//! The [`Router`] on the submitting node filters the registry's endpoints by what the task needs
//! (runtime and image, tags, an explicit endpoint, an institution), by access policy, and by
//! liveness (a recent advert), then picks one by [`Strategy`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::Environment;
use crdt_registry::record::Policy;
use mesh::PeerId;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::{Deserialize, Serialize};

/// Queued and running tasks per worker beyond which `warm-aware` stops queueing behind warm
/// workers and pays for a cold start elsewhere.
const OVERLOADED: f64 = 4.0;

/// Gossip topic of adverts (under `funcmesh/<fed>/`).
pub const ADVERT_TOPIC: &str = "adverts/1";
/// Largest advert accepted.
pub const MAX_ADVERT_BYTES: usize = 64 << 10;
/// Most environments one endpoint's load may list when it comes in an answer.
const MAX_ENVIRONMENTS: usize = 1024;
/// Advert format version.
pub const ADVERT_VERSION: u32 = 1;
/// Heartbeat adverts per second the whole federation sends at rest (changes add their own, at
/// most one per endpoint node per second).
pub const ADVERT_BUDGET: f64 = 5.0;
/// The shortest and longest heartbeat.
const HEARTBEAT_BOUNDS: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(60));

/// How often a node with endpoints advertises at rest, in a federation with `endpoint_nodes`
/// nodes that have endpoints: every two seconds in a small one; in a large one, as often as
/// keeps the federation's heartbeats near [`ADVERT_BUDGET`] per second (every node computes the
/// same from its registry).
pub fn advert_heartbeat(endpoint_nodes: usize) -> Duration {
    let (min, max) = HEARTBEAT_BOUNDS;
    Duration::from_secs_f64(endpoint_nodes as f64 / ADVERT_BUDGET).clamp(min, max)
}

/// A node's advertisement of its endpoints' load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advert {
    /// Format version.
    pub v: u32,
    /// Increases with every advert of this node (a newer one replaces an older one).
    pub seq: u64,
    /// When it was made, Unix milliseconds.
    pub at_ms: u64,
    /// Its endpoints.
    pub endpoints: Vec<EndpointLoad>,
}

/// One endpoint's load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointLoad {
    /// Its name on the node.
    pub name: String,
    /// Most workers.
    pub max_workers: u32,
    /// Workers running.
    pub workers: u32,
    /// Idle workers.
    pub idle: u32,
    /// Tasks queued or running.
    pub queued: u32,
    /// Per environment.
    pub environments: Vec<EnvironmentLoad>,
}

/// One environment's workers on an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentLoad {
    /// `host` or `<runtime>:<image>`.
    pub env: String,
    /// Idle (warm) workers.
    pub idle: u32,
    /// Busy workers.
    pub busy: u32,
    /// Starting workers.
    pub starting: u32,
    /// Measured cold start, milliseconds.
    pub cold_start_ms: Option<u64>,
}

impl Advert {
    /// Decodes an advert from gossip, size-checked first.
    pub fn decode(bytes: &[u8]) -> Result<Advert, String> {
        if bytes.len() > MAX_ADVERT_BYTES {
            return Err(format!(
                "advert of {} bytes is over the limit of {MAX_ADVERT_BYTES}",
                bytes.len()
            ));
        }
        let a: Advert = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if a.v != ADVERT_VERSION {
            return Err(format!("advert version {} is not {ADVERT_VERSION}", a.v));
        }
        if a.endpoints.len() > 256 {
            return Err("advert lists more than 256 endpoints".into());
        }
        Ok(a)
    }

    /// Encodes it for gossip.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("adverts serialise")
    }
}

/// How the router picks among eligible endpoints.
///
/// `warm-aware` ranks endpoints by warmth for the task's environment: a warm idle worker first;
/// then an endpoint already running (or starting) workers for it and not overloaded, where the
/// task queues instead of paying a cold start (as the funcX warming-aware scheduler does); then
/// the rest. Within a rank: least loaded, then lowest RTT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// A warm idle worker for the task's environment first, then least loaded, then lowest RTT.
    #[default]
    WarmAware,
    /// Least loaded (queued and running per worker), then lowest RTT.
    LeastLoaded,
    /// Uniformly at random.
    Random,
    /// In turn.
    RoundRobin,
}

impl Strategy {
    /// Parses a strategy name.
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "warm-aware" => Ok(Strategy::WarmAware),
            "least-loaded" => Ok(Strategy::LeastLoaded),
            "random" => Ok(Strategy::Random),
            "round-robin" => Ok(Strategy::RoundRobin),
            other => Err(format!(
                "strategy `{other}` is not one of warm-aware, least-loaded, random, round-robin"
            )),
        }
    }
}

/// An endpoint as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its registry id.
    pub id: String,
    /// Its name on its node.
    pub name: String,
    /// Its node.
    pub peer: PeerId,
    /// Its node's peer id as text (kept: formatting a peer id is base58, costly per task).
    pub peer_text: String,
    /// Its node's name.
    pub node_name: String,
    /// Its node's institution.
    pub institution: Option<String>,
    /// That institution's key.
    pub institution_key: Option<crdt_registry::Key>,
    /// Runtimes it offers.
    pub runtimes: Vec<String>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Who may use it.
    pub policy: Policy,
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.name, self.node_name)
    }
}

/// What a task needs of an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    /// `--require key=value` tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// An explicit endpoint: its id, an id prefix of 6+ characters, or its name.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// An institution.
    #[serde(default)]
    pub institution: Option<String>,
}

/// No endpoint can take the task, and why not for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute {
    /// One line per endpoint considered.
    pub reasons: Vec<String>,
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reasons.is_empty() {
            return f.write_str(
                "no endpoint can run this task: the federation lists no endpoint (check \
                 `funcmesh endpoint list`)",
            );
        }
        write!(
            f,
            "no endpoint can run this task: {}",
            self.reasons.join("; ")
        )
    }
}

impl std::error::Error for NoRoute {}

struct Seen {
    advert: Advert,
    at: Instant,
    /// Where each endpoint is in `advert.endpoints`, by name (a node may host dozens: a
    /// choice among a thousand candidates looks each up).
    by_name: HashMap<String, usize>,
}

impl Seen {
    fn new(advert: Advert, at: Instant) -> Seen {
        let by_name = advert
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Seen {
            advert,
            at,
            by_name,
        }
    }
}

/// One kind of choice's work, kept for the next task like it (same function, environment,
/// requirements and strategy): which candidates are eligible, in id order, and their scores.
/// A change to what eligibility depends on (adverts, connections, RTTs, the candidates) drops
/// every memo; a task sent or a load in an answer rescores only its endpoint; a memo older than
/// `MEMO_FOR` is rebuilt (liveness, tokens). A choice among a thousand endpoints costs a pass
/// over a vector of scores instead of a thousand lookups.
struct Memo {
    epoch: u64,
    built: Instant,
    /// The candidates it indexes (their address and length: a guard, with the epoch).
    candidates: (usize, usize),
    /// How many of the router's `changes` it has taken in.
    seen: usize,
    env: String,
    /// Eligible candidates, as indices into the candidates, in id order.
    eligible: Vec<usize>,
    /// Their scores (warmth, load, RTT), in the same order.
    scores: Vec<Score>,
    /// Where each eligible endpoint is in `eligible`, by node and name.
    at: HashMap<PeerId, HashMap<String, usize>>,
}

/// A candidate's score: (warmth, load, RTT), compared in that order, lowest best.
type Score = (u8, f64, Duration);

fn by_score(a: &Score, b: &Score) -> std::cmp::Ordering {
    a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2))
}

/// How long a memo of a choice is used before it is built again.
const MEMO_FOR: Duration = Duration::from_millis(250);
/// Most memos kept (kinds of choice); past it they are all dropped.
const MAX_MEMOS: usize = 64;

/// Tasks sent to one endpoint since its node's last advert: in all, and per environment (an
/// endpoint sent a task for an environment has, or is starting, a worker for it).
#[derive(Default)]
struct Sent {
    total: u32,
    by_env: HashMap<String, u32>,
}

/// The router's state: the latest advert per node, tasks sent since, and RTTs.
pub struct Router {
    adverts: HashMap<PeerId, Seen>,
    /// Tasks sent to each endpoint since its node's last advert, by node and endpoint name
    /// (looked up by `&str`, without allocating, once per candidate per choice).
    inflight: HashMap<PeerId, HashMap<String, Sent>>,
    /// Memos of choices (`choose_memo`), and what they are current with: `epoch` counts the
    /// changes that drop them, `changes` lists the endpoints whose score changed since.
    memos: HashMap<String, Memo>,
    epoch: u64,
    changes: Vec<(PeerId, String)>,
    rtt: HashMap<PeerId, Duration>,
    /// Members connected now: alive until they advertise, even before their first advert.
    connected: HashSet<PeerId>,
    local: Option<PeerId>,
    rr: usize,
    rng: StdRng,
    /// The configured loss timeout, and the one in force (at least three heartbeats).
    configured_lost_after: Duration,
    lost_after: Duration,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("adverts", &self.adverts.len())
            .finish()
    }
}

/// Whether a member of `submitter` may use an endpoint with `policy` of `endpoint`'s institution
/// without a capability token ([`crate::access`] adds tokens).
pub fn may_use(
    policy: Policy,
    endpoint: Option<&str>,
    submitter: Option<&str>,
) -> Result<(), String> {
    let same = endpoint.is_some() && endpoint == submitter;
    match policy {
        Policy::Federation => Ok(()),
        Policy::Institution | Policy::InstitutionAndCapability if same => Ok(()),
        Policy::Institution => Err(format!(
            "only members of {} may use it",
            endpoint.unwrap_or("its institution")
        )),
        Policy::InstitutionAndCapability | Policy::Capability => Err(format!(
            "it admits {} and holders of a capability token",
            if policy == Policy::Capability {
                "only token holders".to_owned()
            } else {
                format!("members of {}", endpoint.unwrap_or("its institution"))
            }
        )),
    }
}

/// The access check of the policy alone, for a member of `institution` that holds no token.
pub fn by_policy(institution: Option<&str>) -> impl Fn(&Candidate) -> Result<(), String> + '_ {
    move |c| may_use(c.policy, c.institution.as_deref(), institution)
}

impl Router {
    /// A router; an endpoint whose node has not advertised for `lost_after` is considered gone.
    pub fn new(seed: u64, lost_after: Duration) -> Router {
        Router {
            adverts: HashMap::new(),
            inflight: HashMap::new(),
            memos: HashMap::new(),
            epoch: 0,
            changes: Vec::new(),
            rtt: HashMap::new(),
            connected: HashSet::new(),
            local: None,
            rr: 0,
            rng: StdRng::seed_from_u64(seed),
            configured_lost_after: lost_after,
            lost_after,
        }
    }

    /// The federation has `endpoint_nodes` nodes with endpoints: once it is large enough for
    /// heartbeats to stretch ([`advert_heartbeat`]), a node is lost after the configured time or
    /// three of its heartbeats, whichever is longer (the configured time is for the shortest
    /// heartbeat).
    pub fn set_endpoint_nodes(&mut self, endpoint_nodes: usize) {
        let heartbeat = advert_heartbeat(endpoint_nodes);
        let lost_after = if heartbeat > HEARTBEAT_BOUNDS.0 {
            self.configured_lost_after.max(heartbeat * 3)
        } else {
            self.configured_lost_after
        };
        if lost_after != self.lost_after {
            self.lost_after = lost_after;
            self.invalidate();
        }
    }

    /// The candidates changed (or anything else eligibility depends on): memos are dropped.
    pub fn invalidate(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.memos.clear();
        self.changes.clear();
    }

    /// An endpoint's score changed: memos rescore it at their next use.
    fn changed(&mut self, peer: PeerId, name: &str) {
        if self.memos.is_empty() {
            return;
        }
        if self.changes.len() >= 65_536 {
            self.invalidate();
            return;
        }
        self.changes.push((peer, name.to_owned()));
    }

    /// How long a node may go unheard before its endpoints are lost.
    pub fn lost_after(&self) -> Duration {
        self.lost_after
    }

    /// Takes a node's advert (older ones than the last are ignored).
    pub fn advert(&mut self, peer: PeerId, advert: Advert, now: Instant) {
        if let Some(seen) = self.adverts.get(&peer) {
            if seen.advert.seq >= advert.seq && now < seen.at + self.lost_after {
                return;
            }
        }
        self.inflight.remove(&peer);
        self.adverts.insert(peer, Seen::new(advert, now));
        self.invalidate();
    }

    /// An endpoint's load as its node just told us in an answer: it replaces that endpoint's
    /// entry of the node's last advert (and the tasks counted as sent since), without renewing
    /// the node's liveness. An endpoint the advert does not list waits for the next advert, so
    /// that answers cannot grow an advert past what its decoder allows.
    pub fn fresh_load(&mut self, peer: PeerId, load: EndpointLoad) {
        // An answer may be far larger than an advert: hold it to what an advert could carry.
        if load.environments.len() > MAX_ENVIRONMENTS {
            return;
        }
        let Some(seen) = self.adverts.get_mut(&peer) else {
            return;
        };
        let Some(e) = seen
            .by_name
            .get(&load.name)
            .and_then(|&i| seen.advert.endpoints.get_mut(i))
        else {
            return;
        };
        if let Some(sent) = self.inflight.get_mut(&peer) {
            sent.remove(&load.name);
        }
        let name = load.name.clone();
        *e = load;
        self.changed(peer, &name);
    }

    /// The latest advert of every node heard from.
    pub fn adverts(&self) -> Vec<(PeerId, Advert)> {
        self.adverts
            .iter()
            .map(|(p, s)| (*p, s.advert.clone()))
            .collect()
    }

    /// Records a round-trip time to a node.
    pub fn rtt(&mut self, peer: PeerId, rtt: Duration) {
        if self.rtt.insert(peer, rtt) != Some(rtt) {
            self.invalidate();
        }
    }

    /// Forgets a node (it disconnected for good).
    pub fn forget(&mut self, peer: &PeerId) {
        self.adverts.remove(peer);
        self.inflight.remove(peer);
        self.invalidate();
    }

    /// This node (its endpoints are at zero RTT, and always alive).
    pub fn set_local(&mut self, peer: PeerId) {
        self.local = Some(peer);
        self.invalidate();
    }

    /// A member connected or disconnected.
    pub fn connected(&mut self, peer: PeerId, up: bool) {
        self.invalidate();
        if up {
            self.connected.insert(peer);
        } else {
            self.connected.remove(&peer);
        }
    }

    /// Whether the node advertised recently, or (never having advertised) is connected now.
    pub fn is_alive(&self, peer: &PeerId, now: Instant) -> bool {
        if self.local.as_ref() == Some(peer) {
            return true;
        }
        match self.adverts.get(peer) {
            Some(s) => now < s.at + self.lost_after,
            None => self.connected.contains(peer),
        }
    }

    /// The latest advert of a node's endpoint.
    pub fn load_of(&self, peer: &PeerId, name: &str) -> Option<&EndpointLoad> {
        let seen = self.adverts.get(peer)?;
        seen.advert.endpoints.get(*seen.by_name.get(name)?)
    }

    /// Notes that a task went to an endpoint, so that the next choice counts it before the
    /// endpoint's next advert does.
    pub fn dispatched(&mut self, peer: PeerId, name: &str, env: &Environment) {
        let sent = self
            .inflight
            .entry(peer)
            .or_default()
            .entry(name.to_owned())
            .or_default();
        sent.total += 1;
        *sent.by_env.entry(env.to_string()).or_default() += 1;
        self.changed(peer, name);
    }

    /// Picks an endpoint for a task that runs in `env`, submitted by a member of `institution`.
    /// `exclude` lists endpoints (by id) already tried and lost.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &mut self,
        env: &Environment,
        req: &Requirements,
        access: &dyn Fn(&Candidate) -> Result<(), String>,
        strategy: Strategy,
        candidates: &[Candidate],
        exclude: &HashSet<String>,
        now: Instant,
    ) -> Result<Candidate, NoRoute> {
        let mut reasons = Vec::new();
        let mut eligible: Vec<&Candidate> = Vec::new();
        let explicit = req.endpoint.as_deref();
        for c in candidates {
            if let Some(want) = explicit {
                if !Self::named(c, want) {
                    continue;
                }
            }
            let why = self.refusal(c, env, req, access, exclude, now);
            match why {
                None => eligible.push(c),
                Some(why) => reasons.push(format!("{c}: {why}")),
            }
        }
        if let (Some(want), true) = (explicit, reasons.is_empty() && eligible.is_empty()) {
            reasons.push(format!(
                "no endpoint is named `{want}` (see `funcmesh endpoint list`)"
            ));
        }
        if eligible.is_empty() {
            return Err(NoRoute { reasons });
        }
        let key = env.to_string();
        let pick = match strategy {
            Strategy::Random => eligible[self.rng.gen_range(0..eligible.len())],
            Strategy::RoundRobin => {
                eligible.sort_by(|a, b| a.id.cmp(&b.id));
                self.rr = self.rr.wrapping_add(1);
                eligible[self.rr % eligible.len()]
            }
            // Each candidate scored once; ties go to the lowest id.
            Strategy::LeastLoaded | Strategy::WarmAware => {
                eligible
                    .iter()
                    .map(|c| (self.score(c, &key, strategy), *c))
                    .min_by(|a, b| by_score(&a.0, &b.0).then(a.1.id.cmp(&b.1.id)))
                    .expect("not empty")
                    .1
            }
        };
        Ok(pick.clone())
    }

    /// [`Router::choose`], with the work kept for the next task like it (see `Memo`).
    /// `kind` names what the access check depends on besides the endpoint (the function, and
    /// whether a token was given): choices of one kind share a memo. A choice with endpoints
    /// to exclude, or none eligible (whose reasons are wanted), is not memoised.
    #[allow(clippy::too_many_arguments)]
    pub fn choose_memo(
        &mut self,
        kind: &str,
        env: &Environment,
        req: &Requirements,
        access: &dyn Fn(&Candidate) -> Result<(), String>,
        strategy: Strategy,
        candidates: &[Candidate],
        exclude: &HashSet<String>,
        now: Instant,
    ) -> Result<Candidate, NoRoute> {
        if !exclude.is_empty() {
            return self.choose(env, req, access, strategy, candidates, exclude, now);
        }
        let key = format!("{kind}\0{env}\0{req:?}\0{strategy:?}");
        let at = (candidates.as_ptr() as usize, candidates.len());
        let memo = match self.memos.remove(&key) {
            Some(m)
                if m.epoch == self.epoch
                    && m.candidates == at
                    && now.saturating_duration_since(m.built) < MEMO_FOR =>
            {
                Some(m)
            }
            _ => None,
        };
        let mut memo = match memo {
            Some(m) => m,
            None => {
                let explicit = req.endpoint.as_deref();
                let mut eligible: Vec<usize> = (0..candidates.len())
                    .filter(|&i| {
                        let c = &candidates[i];
                        explicit.is_none_or(|want| Self::named(c, want))
                            && self.refusal(c, env, req, access, exclude, now).is_none()
                    })
                    .collect();
                if eligible.is_empty() {
                    return self.choose(env, req, access, strategy, candidates, exclude, now);
                }
                eligible.sort_by(|a, b| candidates[*a].id.cmp(&candidates[*b].id));
                let env = env.to_string();
                let scores = eligible
                    .iter()
                    .map(|&i| self.score(&candidates[i], &env, strategy))
                    .collect();
                let mut at_map: HashMap<PeerId, HashMap<String, usize>> = HashMap::new();
                for (pos, &i) in eligible.iter().enumerate() {
                    let c = &candidates[i];
                    at_map
                        .entry(c.peer)
                        .or_default()
                        .insert(c.name.clone(), pos);
                }
                if self.memos.len() >= MAX_MEMOS {
                    self.memos.clear();
                }
                Memo {
                    epoch: self.epoch,
                    built: now,
                    candidates: at,
                    seen: self.changes.len(),
                    env,
                    eligible,
                    scores,
                    at: at_map,
                }
            }
        };
        // Rescore the endpoints whose load changed since the memo last looked.
        for (peer, name) in &self.changes[memo.seen.min(self.changes.len())..] {
            if let Some(&pos) = memo.at.get(peer).and_then(|m| m.get(name)) {
                memo.scores[pos] = self.score(&candidates[memo.eligible[pos]], &memo.env, strategy);
            }
        }
        memo.seen = self.changes.len();
        let pos = match strategy {
            Strategy::Random => self.rng.gen_range(0..memo.eligible.len()),
            Strategy::RoundRobin => {
                self.rr = self.rr.wrapping_add(1);
                self.rr % memo.eligible.len()
            }
            // The first of the lowest scores: ties go to the lowest id, as in `choose`.
            Strategy::LeastLoaded | Strategy::WarmAware => {
                let mut best = 0;
                for (i, s) in memo.scores.iter().enumerate().skip(1) {
                    if by_score(s, &memo.scores[best]).is_lt() {
                        best = i;
                    }
                }
                best
            }
        };
        let pick = candidates[memo.eligible[pos]].clone();
        self.memos.insert(key, memo);
        Ok(pick)
    }

    /// A candidate's score for a strategy that orders by it: (warmth, load, RTT), lowest best.
    fn score(&self, c: &Candidate, env: &str, strategy: Strategy) -> Score {
        let warmth = match strategy {
            Strategy::WarmAware => self.warmth(c, env),
            _ => 0,
        };
        (warmth, self.load(c), self.rtt_of(c))
    }

    /// Whether `want` names this candidate: its id, an id prefix of 6+, its name, or name@node.
    fn named(c: &Candidate, want: &str) -> bool {
        c.id == want
            || c.name == want
            || format!("{}@{}", c.name, c.node_name) == want
            || (want.len() >= 6 && c.id.starts_with(want))
    }

    fn refusal(
        &self,
        c: &Candidate,
        env: &Environment,
        req: &Requirements,
        access: &dyn Fn(&Candidate) -> Result<(), String>,
        exclude: &HashSet<String>,
        now: Instant,
    ) -> Option<String> {
        if exclude.contains(&c.id) {
            return Some("already tried and lost".into());
        }
        if !c.runtimes.iter().any(|r| r == env.runtime.as_str()) {
            return Some(format!(
                "it offers {} and the function needs {}",
                c.runtimes.join(", "),
                env.runtime.as_str()
            ));
        }
        if let Some(want) = &req.institution {
            if c.institution.as_deref() != Some(want.as_str()) {
                return Some(format!("it is not at institution {want}"));
            }
        }
        for (k, v) in &req.tags {
            if c.tags.get(k) != Some(v) {
                return Some(format!("it lacks the tag {k}={v}"));
            }
        }
        if let Err(why) = access(c) {
            return Some(why);
        }
        if !self.is_alive(&c.peer, now) {
            return Some(format!(
                "its node has not advertised for {} (it may be down)",
                humantime::format_duration(self.lost_after)
            ));
        }
        if self.adverts.contains_key(&c.peer) && self.load_of(&c.peer, &c.name).is_none() {
            return Some("its node does not advertise it (not running)".into());
        }
        None
    }

    fn sent(&self, c: &Candidate) -> Option<&Sent> {
        self.inflight.get(&c.peer)?.get(&c.name)
    }

    fn inflight_of(&self, c: &Candidate) -> u32 {
        self.sent(c).map_or(0, |s| s.total)
    }

    fn inflight_env_of(&self, c: &Candidate, env: &str) -> u32 {
        self.sent(c)
            .and_then(|s| s.by_env.get(env))
            .copied()
            .unwrap_or(0)
    }

    /// 0: a warm idle worker for `env` is free; 1: the endpoint has workers for `env` (busy or
    /// starting) and is not overloaded, so the task waits in a queue that is cheaper than a cold
    /// start elsewhere; 2: a task there needs a cold start (or it is overloaded).
    fn warmth(&self, c: &Candidate, env: &str) -> u8 {
        if self.warm_idle(c, env) > 0 {
            return 0;
        }
        // Counts come from peers' adverts: any value may arrive, so sums saturate.
        let present = self
            .load_of(&c.peer, &c.name)
            .map_or(0, |l| {
                l.environments
                    .iter()
                    .filter(|e| e.env == env)
                    .fold(0u32, |n, e| {
                        n.saturating_add(e.idle)
                            .saturating_add(e.busy)
                            .saturating_add(e.starting)
                    })
            })
            .saturating_add(self.inflight_env_of(c, env));
        if present > 0 && self.load(c) < OVERLOADED {
            1
        } else {
            2
        }
    }

    fn warm_idle(&self, c: &Candidate, env: &str) -> u32 {
        let idle = self.load_of(&c.peer, &c.name).map_or(0, |l| {
            l.environments
                .iter()
                .filter(|e| e.env == env)
                .fold(0u32, |n, e| n.saturating_add(e.idle))
        });
        idle.saturating_sub(self.inflight_env_of(c, env))
    }

    /// Queued and running tasks per worker, counting tasks sent since the last advert.
    fn load(&self, c: &Candidate) -> f64 {
        let l = self.load_of(&c.peer, &c.name);
        let queued = l
            .map_or(0, |l| l.queued)
            .saturating_add(self.inflight_of(c));
        let workers = l.map_or(1, |l| l.max_workers.max(1));
        f64::from(queued) / f64::from(workers)
    }

    fn rtt_of(&self, c: &Candidate) -> Duration {
        if self.local == Some(c.peer) {
            return Duration::ZERO;
        }
        self.rtt.get(&c.peer).copied().unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{any, proptest};

    fn cand(n: u8, inst: &str, runtimes: &[&str]) -> Candidate {
        let peer = PeerId::random();
        Candidate {
            id: format!("e{n:02}aaaaaaaa"),
            name: format!("ep{n}"),
            peer,
            peer_text: peer.to_string(),
            node_name: format!("node{n}"),
            institution: Some(inst.into()),
            institution_key: None,
            runtimes: runtimes.iter().map(|s| s.to_string()).collect(),
            tags: BTreeMap::new(),
            policy: Policy::InstitutionAndCapability,
        }
    }

    fn advert(c: &Candidate, seq: u64, queued: u32, warm: &[(&str, u32)]) -> Advert {
        Advert {
            v: ADVERT_VERSION,
            seq,
            at_ms: 0,
            endpoints: vec![EndpointLoad {
                name: c.name.clone(),
                max_workers: 4,
                workers: 4,
                idle: warm.iter().map(|w| w.1).sum(),
                queued,
                environments: warm
                    .iter()
                    .map(|(env, idle)| EnvironmentLoad {
                        env: env.to_string(),
                        idle: *idle,
                        ..Default::default()
                    })
                    .collect(),
            }],
        }
    }

    const IMG: &str = "docker:funcmesh/python:bookworm";

    fn setup() -> (Router, Vec<Candidate>, Instant) {
        let now = Instant::now();
        let mut r = Router::new(7, Duration::from_secs(5));
        let cs = vec![
            cand(1, "a", &["host", "docker"]),
            cand(2, "a", &["host", "docker"]),
            cand(3, "a", &["host"]),
        ];
        for c in &cs {
            r.advert(c.peer, advert(c, 1, 0, &[]), now);
        }
        (r, cs, now)
    }

    fn choose(r: &mut Router, cs: &[Candidate], env: &str, s: Strategy, now: Instant) -> String {
        r.choose(
            &Environment::parse(env).unwrap(),
            &Requirements::default(),
            &by_policy(Some("a")),
            s,
            cs,
            &HashSet::new(),
            now,
        )
        .map(|c| c.name)
        .unwrap_or_else(|e| e.to_string())
    }

    proptest! {
        /// Issue 22: a memoised choice is the choice: under any sequence of tasks sent, loads
        /// in answers and adverts, `choose_memo` picks what `choose` picks, for the strategies
        /// that order by score.
        #[test]
        fn a_memoised_choice_is_the_plain_choice(
            ops in proptest::collection::vec((0u8..4, 0usize..12, 0u32..6, any::<bool>()), 1..120),
        ) {
            let now = Instant::now();
            let mut r = Router::new(7, Duration::from_secs(5));
            let cs: Vec<Candidate> = (0..12u8)
                .map(|n| cand(n, "a", if n % 3 == 0 { &["host"] } else { &["host", "docker"] }))
                .collect();
            for c in &cs {
                r.advert(c.peer, advert(c, 1, 0, &[]), now);
            }
            let env = Environment::parse(IMG).unwrap();
            let mut seq = 2;
            for (op, i, n, warm) in ops {
                let c = &cs[i];
                match op {
                    0 => r.dispatched(c.peer, &c.name, &env),
                    1 => {
                        let mut a = advert(c, seq, n, if warm { &[(IMG, 1)] } else { &[] });
                        let load = a.endpoints.remove(0);
                        r.fresh_load(c.peer, load);
                    }
                    2 => {
                        seq += 1;
                        r.advert(c.peer, advert(c, seq, n, if warm { &[(IMG, 1)] } else { &[] }), now);
                    }
                    _ => {}
                }
                for s in [Strategy::LeastLoaded, Strategy::WarmAware] {
                    let plain = r
                        .choose(&env, &Requirements::default(), &by_policy(Some("a")), s, &cs, &HashSet::new(), now)
                        .map(|c| c.id);
                    let memo = r
                        .choose_memo("f", &env, &Requirements::default(), &by_policy(Some("a")), s, &cs, &HashSet::new(), now)
                        .map(|c| c.id);
                    proptest::prop_assert_eq!(plain.ok(), memo.ok(), "{:?}", s);
                }
                // What the submitter does with a pick: the next choice counts it.
                if let Ok(c) = r.choose_memo("f", &env, &Requirements::default(), &by_policy(Some("a")), Strategy::WarmAware, &cs, &HashSet::new(), now) {
                    r.dispatched(c.peer, &c.name, &env);
                }
            }
        }
    }

    #[test]
    fn warm_aware_prefers_the_endpoint_with_a_warm_worker_for_the_image() {
        let (mut r, cs, now) = setup();
        // ep1 is busier, but it has a warm container for the image; ep2 is idle and cold.
        r.advert(cs[0].peer, advert(&cs[0], 2, 3, &[(IMG, 1)]), now);
        r.advert(cs[1].peer, advert(&cs[1], 2, 0, &[("host", 2)]), now);
        assert_eq!(choose(&mut r, &cs, IMG, Strategy::WarmAware, now), "ep1");
        // Its warm worker is now busy (a task was sent since the advert): queueing behind it
        // still beats a cold start on ep2 ...
        let img = Environment::parse(IMG).unwrap();
        r.dispatched(cs[0].peer, "ep1", &img);
        assert_eq!(choose(&mut r, &cs, IMG, Strategy::WarmAware, now), "ep1");
        assert_eq!(choose(&mut r, &cs, IMG, Strategy::LeastLoaded, now), "ep2");
        // ... until ep1 is overloaded (4 tasks per worker).
        for _ in 0..12 {
            r.dispatched(cs[0].peer, "ep1", &img);
        }
        assert_eq!(choose(&mut r, &cs, IMG, Strategy::WarmAware, now), "ep2");
        // ep2 was sent one: it is starting a worker for the image, so the next goes there too.
        r.dispatched(cs[1].peer, "ep2", &img);
        assert_eq!(choose(&mut r, &cs, IMG, Strategy::WarmAware, now), "ep2");
    }

    #[test]
    fn heartbeats_stretch_with_the_federation_and_loss_waits_for_three() {
        assert_eq!(advert_heartbeat(1), Duration::from_secs(2));
        assert_eq!(advert_heartbeat(10), Duration::from_secs(2));
        assert_eq!(advert_heartbeat(200), Duration::from_secs(40));
        assert_eq!(advert_heartbeat(100_000), Duration::from_secs(60));
        // The federation's heartbeat rate stays within the budget from 20 nodes on.
        for n in [10, 100, 200, 300] {
            let per_sec = n as f64 / advert_heartbeat(n).as_secs_f64();
            assert!(per_sec <= ADVERT_BUDGET + 1e-9, "{n}: {per_sec}");
        }
        let mut r = Router::new(1, Duration::from_secs(6));
        r.set_endpoint_nodes(10);
        assert_eq!(r.lost_after(), Duration::from_secs(6));
        let mut quick = Router::new(1, Duration::from_secs(1));
        quick.set_endpoint_nodes(2);
        assert_eq!(quick.lost_after(), Duration::from_secs(1), "as configured");
        r.set_endpoint_nodes(100);
        assert_eq!(r.lost_after(), Duration::from_secs(60));
        let (p, t0) = (PeerId::random(), Instant::now());
        r.advert(
            p,
            Advert {
                v: ADVERT_VERSION,
                seq: 1,
                at_ms: 0,
                endpoints: vec![],
            },
            t0,
        );
        assert!(r.is_alive(&p, t0 + Duration::from_secs(59)));
        assert!(!r.is_alive(&p, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn least_loaded_counts_tasks_sent_since_the_last_advert() {
        let (mut r, cs, now) = setup();
        let host = "host";
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..12 {
            let name = choose(&mut r, &cs, host, Strategy::LeastLoaded, now);
            let c = cs.iter().find(|c| c.name == name).unwrap();
            r.dispatched(c.peer, &c.name, &Environment::host());
            *counts.entry(name).or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
    }

    #[test]
    fn round_robin_takes_turns_and_random_spreads() {
        let (mut r, cs, now) = setup();
        let picks: Vec<String> = (0..6)
            .map(|_| choose(&mut r, &cs, "host", Strategy::RoundRobin, now))
            .collect();
        assert_eq!(picks[0..3], picks[3..6]);
        let distinct: HashSet<&String> = picks.iter().collect();
        assert_eq!(distinct.len(), 3);
        let mut seen = HashSet::new();
        for _ in 0..100 {
            seen.insert(choose(&mut r, &cs, "host", Strategy::Random, now));
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn filters_say_why_each_endpoint_was_left_out() {
        let (mut r, mut cs, now) = setup();
        cs[1].institution = Some("b".into());
        cs[1].policy = Policy::Institution;
        let later = now + Duration::from_secs(6);
        r.advert(cs[0].peer, advert(&cs[0], 2, 0, &[]), later);
        let err = choose(&mut r, &cs, IMG, Strategy::WarmAware, later);
        assert_eq!(err, "ep1");
        let err = r
            .choose(
                &Environment::parse(IMG).unwrap(),
                &Requirements {
                    tags: [("gpu".to_string(), "yes".to_string())].into(),
                    ..Default::default()
                },
                &by_policy(Some("a")),
                Strategy::WarmAware,
                &cs,
                &HashSet::new(),
                later,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ep1 on node1: it lacks the tag gpu=yes"),
            "{err}"
        );
        assert!(
            err.contains("ep2 on node2: it lacks the tag gpu=yes"),
            "{err}"
        );
        assert!(
            err.contains("ep3 on node3: it offers host and the function needs docker"),
            "{err}"
        );
        let err = r
            .choose(
                &Environment::host(),
                &Requirements {
                    endpoint: Some("nope".into()),
                    ..Default::default()
                },
                &by_policy(Some("a")),
                Strategy::WarmAware,
                &cs,
                &HashSet::new(),
                later,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("no endpoint is named `nope`"), "{err}");
        let err = r
            .choose(
                &Environment::host(),
                &Requirements {
                    endpoint: Some("ep3".into()),
                    ..Default::default()
                },
                &by_policy(Some("a")),
                Strategy::WarmAware,
                &cs,
                &HashSet::new(),
                later,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("has not advertised for 5s"), "{err}");
        let err = r
            .choose(
                &Environment::host(),
                &Requirements {
                    endpoint: Some("ep2".into()),
                    ..Default::default()
                },
                &by_policy(Some("a")),
                Strategy::WarmAware,
                &cs,
                &HashSet::new(),
                later,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("only members of b may use it"), "{err}");
    }

    #[test]
    fn a_fresh_load_updates_only_an_endpoint_the_advert_lists() {
        let (mut r, cs, _) = setup();
        let peer = cs[0].peer;
        let known = EndpointLoad {
            name: cs[0].name.clone(),
            queued: 9,
            ..Default::default()
        };
        r.fresh_load(peer, known.clone());
        r.fresh_load(
            peer,
            EndpointLoad {
                name: "not-advertised".into(),
                ..Default::default()
            },
        );
        let huge = EndpointLoad {
            name: cs[0].name.clone(),
            environments: vec![EnvironmentLoad::default(); MAX_ENVIRONMENTS + 1],
            ..Default::default()
        };
        r.fresh_load(peer, huge);
        let (_, advert) = r.adverts().into_iter().find(|(p, _)| *p == peer).unwrap();
        assert_eq!(advert.endpoints, vec![known]);
    }

    #[test]
    fn policies_admit_the_right_submitters() {
        assert!(may_use(Policy::Federation, Some("a"), Some("b")).is_ok());
        assert!(may_use(Policy::Institution, Some("a"), Some("a")).is_ok());
        assert!(may_use(Policy::Institution, Some("a"), Some("b")).is_err());
        assert!(may_use(Policy::InstitutionAndCapability, Some("a"), Some("a")).is_ok());
        assert!(may_use(Policy::InstitutionAndCapability, Some("a"), None).is_err());
        assert!(may_use(Policy::Capability, Some("a"), Some("a")).is_err());
    }

    /// A count as a peer may advertise it: the extremes often, anything else too.
    fn count() -> impl proptest::strategy::Strategy<Value = u32> {
        use proptest::prelude::{Just, prop_oneof};
        prop_oneof![Just(0), Just(1), Just(u32::MAX), any::<u32>()]
    }

    fn any_environment() -> impl proptest::strategy::Strategy<Value = EnvironmentLoad> {
        use proptest::prelude::{Just, prop_oneof};
        use proptest::strategy::Strategy as _;
        (
            prop_oneof![Just("host".to_owned()), Just(IMG.to_owned()), ".{0,8}"],
            count(),
            count(),
            count(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(env, idle, busy, starting, cold_start_ms)| EnvironmentLoad {
                    env,
                    idle,
                    busy,
                    starting,
                    cold_start_ms,
                },
            )
    }

    fn any_load(names: Vec<String>) -> impl proptest::strategy::Strategy<Value = EndpointLoad> {
        use proptest::strategy::Strategy as _;
        (
            proptest::sample::select(names),
            count(),
            count(),
            count(),
            count(),
            proptest::collection::vec(any_environment(), 0..4),
        )
            .prop_map(|(name, max_workers, workers, idle, queued, environments)| {
                EndpointLoad {
                    name,
                    max_workers,
                    workers,
                    idle,
                    queued,
                    environments,
                }
            })
    }

    proptest! {
        #[test]
        fn arbitrary_advert_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Advert::decode(&bytes);
        }

        /// Whatever counts a member advertises (extreme ones included), every strategy still
        /// picks an eligible endpoint, and nothing overflows.
        #[test]
        fn any_advertised_load_still_routes(
            loads in proptest::collection::vec(
                proptest::collection::vec(any_load(vec!["ep1".into(), "ep2".into(), "ep3".into()]), 0..3),
                3,
            ),
            fresh in proptest::collection::vec(any_load(vec!["ep1".into(), "ep2".into(), "ep3".into()]), 0..3),
            seqs in proptest::collection::vec(any::<u64>(), 3),
        ) {
            let (mut r, cs, now) = setup();
            for ((c, endpoints), seq) in cs.iter().zip(loads).zip(seqs) {
                // Through the decoder, as gossip arrives.
                let advert = Advert { v: ADVERT_VERSION, seq, at_ms: 0, endpoints };
                let decoded = Advert::decode(&advert.encode()).unwrap();
                r.advert(c.peer, decoded, now);
                r.dispatched(c.peer, &c.name, &Environment::host());
            }
            for l in fresh {
                r.fresh_load(cs[0].peer, l);
            }
            for s in [Strategy::WarmAware, Strategy::LeastLoaded, Strategy::Random, Strategy::RoundRobin] {
                for env in ["host", IMG] {
                    let got = r.choose(
                        &Environment::parse(env).unwrap(),
                        &Requirements::default(),
                        &by_policy(Some("a")),
                        s,
                        &cs,
                        &HashSet::new(),
                        now,
                    );
                    if let Ok(c) = got {
                        assert!(cs.iter().any(|x| x.id == c.id));
                    }
                }
            }
        }
    }
}
