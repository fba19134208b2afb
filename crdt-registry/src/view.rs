//! The typed view: what the registry says once every entry has been checked.
//!
//! Automerge accepts any change; this is where trust is decided. An entry counts only if its
//! signature verifies (checked when it entered the document), its author may write it, and its
//! author is not revoked. The rules:
//!
//! * an **institution** counts if its admission verifies under the federation key and it is not
//!   revoked; any member may publish it (the admission is the proof);
//! * a **node** counts if its membership proof verifies for the author's key, and neither the node
//!   nor its institution is revoked;
//! * **endpoints, functions and flows** count if their author is a counted node, the record names
//!   the author as its node/owner, and the id is the one derived from the author (so nobody can
//!   write under another's id);
//! * a **revocation** counts if its author issued what it revokes: the federation key for an
//!   institution; the federation key or the node's institution key for a node; for a token, any
//!   admitted institution or counted node key (the capability verifier checks that the author is
//!   the key that signed the revoked block);
//! * among the counted entries for one record, the highest `(seq, at_ms, entry key)` wins, so that
//!   every replica picks the same one; a winning deletion removes the record.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::entry::{EntryKey, Held, HeldBody};
use crate::key::Key;
use crate::record::{
    EndpointRecord, FlowRecord, FunctionRecord, Kind, NodeRecord, RevocationRecord, Target,
};

/// What a verified institution admission says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstitutionFacts {
    /// The institution's name.
    pub name: String,
    /// Its key.
    pub key: Key,
    /// When it was admitted, Unix seconds.
    pub admitted_at: u64,
}

/// What a verified membership proof says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's peer id.
    pub peer_id: String,
    /// Its institution's name and key (`None` for coordinators).
    pub institution: Option<(String, Key)>,
    /// Its role (`coordinator`, `endpoint`, `client`).
    pub role: String,
    /// The invite it joined with and when it was admitted (`None` for coordinators): an invite
    /// admits one node, the one admitted first.
    pub invite: Option<(String, u64)>,
}

/// Verifies the federation's documents for the view. The mesh implements it with the membership
/// chain; the registry itself knows nothing about it.
pub trait Authority {
    /// The federation's root key.
    fn federation_key(&self) -> Key;
    /// Verifies an institution admission (JSON) under the federation key.
    fn admission(&self, admission: &str) -> Result<InstitutionFacts, String>;
    /// Verifies a membership proof (JSON) presented by the holder of `node_key`.
    fn membership(&self, proof: &str, node_key: &Key) -> Result<NodeFacts, String>;
}

/// An institution of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Institution {
    /// Its name.
    pub name: String,
    /// Its key.
    pub key: Key,
    /// When the federation admitted it, Unix seconds.
    pub admitted_at: u64,
}

/// A member node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Its key (the registry author key).
    pub key: Key,
    /// Its peer id.
    pub peer_id: String,
    /// Its name.
    pub name: String,
    /// Its institution (none for coordinators).
    pub institution: Option<String>,
    /// Its institution's key.
    #[serde(default)]
    pub institution_key: Option<Key>,
    /// Its role.
    pub role: String,
    /// Mesh addresses.
    pub addrs: Vec<String>,
    /// Data-plane address.
    pub data_addr: Option<String>,
    /// Last update, Unix milliseconds.
    pub updated_ms: u64,
}

/// An endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Its id.
    pub id: String,
    /// The peer id of the node running it.
    pub peer_id: String,
    /// The node's institution.
    pub institution: Option<String>,
    /// The record.
    #[serde(flatten)]
    pub record: EndpointRecord,
    /// Last update, Unix milliseconds.
    pub updated_ms: u64,
}

/// A function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    /// Its content-derived id.
    pub id: String,
    /// The owner's peer id.
    pub owner_peer: String,
    /// The owner's institution.
    pub institution: Option<String>,
    /// The record (shared with the registry's entry: cloning a function is cheap).
    #[serde(flatten)]
    pub record: std::sync::Arc<FunctionRecord>,
}

/// A flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Its id.
    pub id: String,
    /// The owner's peer id.
    pub owner_peer: String,
    /// The record.
    #[serde(flatten)]
    pub record: FlowRecord,
}

/// A revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Its id (`node:…`, `institution:…`, `token:…`).
    pub id: String,
    /// Who revoked.
    pub revoked_by: Key,
    /// When, Unix milliseconds (the revoker's clock).
    pub at_ms: u64,
    /// The record.
    #[serde(flatten)]
    pub record: RevocationRecord,
}

/// An entry the view ignored, and why: for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ignored {
    /// The entry's document key.
    pub entry: String,
    /// Its kind and id.
    pub kind: Kind,
    /// Its id.
    pub id: String,
    /// Its author.
    pub author: Key,
    /// Why it does not count.
    pub reason: String,
}

/// The registry as the typed view sees it. Maps are ordered, so two views of the same entries
/// compare (and serialise) equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Institutions by key.
    pub institutions: BTreeMap<Key, Institution>,
    /// Nodes by peer id.
    pub nodes: BTreeMap<String, Node>,
    /// Endpoints by id.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Functions by id.
    pub functions: BTreeMap<String, Function>,
    /// Flows by id.
    pub flows: BTreeMap<String, Flow>,
    /// Revocations in force, by id then revoker. A token may be "revoked" by several members;
    /// the capability verifier honours only the one by the key that signed the revoked block.
    pub revocations: Vec<Revocation>,
    /// For each invite used, the peer id of the one node it admitted.
    pub used_invites: BTreeMap<String, String>,
    /// The checkpoints written with the federation key: the base's last change (hex) by the
    /// epoch each starts.
    #[serde(default)]
    pub checkpoints: BTreeMap<u64, String>,
    /// Entries that did not count.
    pub ignored: Vec<Ignored>,
}

impl View {
    /// Whether `key` (a node or institution key) is revoked.
    pub fn is_revoked_key(&self, key: &Key) -> bool {
        self.revocations.iter().any(|r| match &r.record.target {
            Target::Node { key: k } | Target::Institution { key: k } => k == key,
            Target::Token { .. } => false,
        })
    }

    /// Whether `signer` revoked the token block with this revocation id.
    pub fn token_revoked_by(&self, revocation_id: &str, signer: &Key) -> bool {
        let id = format!("token:{revocation_id}");
        self.revocations
            .iter()
            .any(|r| r.id == id && &r.revoked_by == signer)
    }

    /// The node with this key.
    pub fn node_by_key(&self, key: &Key) -> Option<&Node> {
        self.nodes.values().find(|n| &n.key == key)
    }
}

/// Cache of proof verifications, by entry key: entries are immutable, so a verdict holds.
#[derive(Debug, Default)]
pub(crate) struct Verdicts {
    nodes: HashMap<EntryKey, Result<NodeFacts, String>>,
    institutions: HashMap<EntryKey, Result<InstitutionFacts, String>>,
}

/// What a view's build concluded about the members, kept with the view: an endpoint, function
/// or flow entry (what most changes bring) is judged only by its author's standing and its own
/// slot, so new ones are placed in the view without rebuilding it ([`extend`]).
#[derive(Debug, Default)]
pub(crate) struct Basis {
    /// The member nodes, by key (none whose invite another node used first).
    node_facts: HashMap<Key, NodeFacts>,
    /// Nodes that are not members because another node used their invite first, and why.
    reused: HashMap<Key, String>,
    /// Revoked node and institution keys.
    revoked: HashSet<Key>,
    /// For each endpoint, function and flow slot with a counted entry: the winner's rank.
    winners: HashMap<(Kind, String), Rank>,
    /// Slots with a deletion entry, counted or not: whether a deletion counts depends on the
    /// slot's owner, so a new entry there means a full rebuild.
    deleted: HashSet<(Kind, String)>,
}

/// The order among the counted entries of one record: the highest wins.
pub(crate) type Rank = (u64, u64, EntryKey);

fn rank(e: &Held) -> Rank {
    // Keys compare as their text does, so replicas of every version pick the same entry.
    (e.seq, e.at_ms, e.key)
}

impl Basis {
    /// A node that may write: a member, not revoked, of an institution not revoked.
    fn node_ok(&self, key: &Key) -> Result<&NodeFacts, String> {
        if let Some(reason) = self.reused.get(key) {
            return Err(format!("{key} is not a member: {reason}"));
        }
        let facts = self
            .node_facts
            .get(key)
            .ok_or_else(|| format!("{key} is not a member node of the federation"))?;
        if self.revoked.contains(key) {
            return Err(format!("{key} is revoked"));
        }
        if let Some((name, inst)) = &facts.institution {
            if self.revoked.contains(inst) {
                return Err(format!("{key}'s institution {name} is revoked"));
            }
        }
        Ok(facts)
    }

    /// Whether an endpoint, function or flow entry counts: its author is a node in good
    /// standing, the record names the author, and the id is the one derived from them.
    fn judge_owned(&self, e: &Held) -> Result<(), String> {
        self.node_ok(&e.author)?;
        let (owner, what, derived_from) = match &e.body {
            HeldBody::Endpoint(rec) => (&rec.node, "an endpoint of node", "its node and name"),
            HeldBody::Function(rec) => (&rec.owner, "a function owned by", "its content and owner"),
            HeldBody::Flow(rec) => (&rec.owner, "a flow owned by", "its owner and nonce"),
            _ => return Err("not an endpoint, function or flow".into()),
        };
        if *owner != e.author {
            Err(format!("{} may not write {what} {owner}", e.author))
        } else if !e.id_derived {
            Err(format!(
                "the {} id is not derived from {derived_from}",
                e.body.kind().as_str()
            ))
        } else {
            Ok(())
        }
    }
}

fn is_owned(kind: Kind) -> bool {
    matches!(kind, Kind::Endpoint | Kind::Function | Kind::Flow)
}

/// Puts a winning endpoint, function or flow into the view.
fn place_owned(view: &mut View, basis: &Basis, e: &Held) {
    let author_facts = basis.node_facts.get(&e.author);
    let peer = || author_facts.map(|f| f.peer_id.clone()).unwrap_or_default();
    let inst = || author_facts.and_then(|f| f.institution.as_ref().map(|(n, _)| n.clone()));
    let id = &e.id;
    match &e.body {
        HeldBody::Endpoint(rec) => {
            view.endpoints.insert(
                id.clone(),
                Endpoint {
                    id: id.clone(),
                    peer_id: peer(),
                    institution: inst(),
                    record: EndpointRecord::clone(rec),
                    updated_ms: e.at_ms,
                },
            );
        }
        HeldBody::Function(rec) => {
            view.functions.insert(
                id.clone(),
                Function {
                    id: id.clone(),
                    owner_peer: peer(),
                    institution: inst(),
                    record: rec.clone(),
                },
            );
        }
        HeldBody::Flow(rec) => {
            view.flows.insert(
                id.clone(),
                Flow {
                    id: id.clone(),
                    owner_peer: peer(),
                    record: FlowRecord::clone(rec),
                },
            );
        }
        _ => {}
    }
}

fn ignored(e: &Held, reason: String) -> Ignored {
    Ignored {
        entry: e.key.to_string(),
        kind: e.body.kind(),
        id: e.id.clone(),
        author: e.author,
        reason,
    }
}

/// Places entries new since `view` was built, if they are all endpoints, functions and flows in
/// slots without deletions: each is judged and ranked as [`build`] would, against what the build
/// concluded. Returns `false`, having changed nothing, if any needs a full rebuild instead.
pub(crate) fn extend(view: &mut View, basis: &mut Basis, fresh: &[&Held]) -> bool {
    let placeable = fresh.iter().all(|e| {
        let kind = e.body.kind();
        is_owned(kind)
            && !matches!(e.body, HeldBody::Deleted { .. })
            && !basis.deleted.contains(&(kind, e.id.clone()))
    });
    if !placeable {
        return false;
    }
    for e in fresh {
        if let Err(reason) = basis.judge_owned(e) {
            let entry = ignored(e, reason);
            let at = view
                .ignored
                .partition_point(|i| i.entry.as_str() < entry.entry.as_str());
            view.ignored.insert(at, entry);
            continue;
        }
        let slot = (e.body.kind(), e.id.clone());
        match basis.winners.get(&slot) {
            Some(best) if *best >= rank(e) => {}
            _ => {
                basis.winners.insert(slot, rank(e));
                place_owned(view, basis, e);
            }
        }
    }
    true
}

/// Builds the view from the document's entries, with what it concluded about the members.
pub(crate) fn build<'a>(
    entries: impl Iterator<Item = &'a Held>,
    authority: &dyn Authority,
    cache: &mut Verdicts,
) -> (View, Basis) {
    let fed_key = authority.federation_key();
    let mut view = View::default();
    let entries: Vec<&Held> = entries.collect();
    let ignore = |view: &mut View, e: &Held, reason: String| {
        view.ignored.push(ignored(e, reason));
    };

    // 1. Node facts from proofs (independent of everything else).
    let mut node_facts: HashMap<Key, NodeFacts> = HashMap::new();
    for &e in &entries {
        let HeldBody::Node(rec) = &e.body else {
            continue;
        };
        let verdict = cache
            .nodes
            .entry(e.key)
            .or_insert_with(|| node_verdict(e.id.as_str(), &e.author, rec, authority));
        if let Ok(facts) = verdict {
            node_facts.entry(e.author).or_insert_with(|| facts.clone());
        }
    }
    // An invite admits one node: the one admitted first (then the lowest peer id), the same
    // choice on every replica. The others are not members.
    let mut first_use: HashMap<&str, (u64, &str)> = HashMap::new();
    for facts in node_facts.values() {
        if let Some((invite, at)) = &facts.invite {
            let candidate = (*at, facts.peer_id.as_str());
            first_use
                .entry(invite.as_str())
                .and_modify(|best| *best = (*best).min(candidate))
                .or_insert(candidate);
        }
    }
    view.used_invites = first_use
        .iter()
        .map(|(invite, (_, peer))| (invite.to_string(), peer.to_string()))
        .collect();
    let mut reused: HashMap<Key, String> = HashMap::new();
    for (key, facts) in &node_facts {
        if let Some((invite, _)) = &facts.invite {
            let first = first_use[invite.as_str()].1;
            if first != facts.peer_id {
                reused.insert(
                    *key,
                    format!("its invite was used first by node {first}: an invite admits one node"),
                );
            }
        }
    }
    node_facts.retain(|key, _| !reused.contains_key(key));
    // 2. Institution facts from admissions.
    let mut inst_facts: HashMap<EntryKey, InstitutionFacts> = HashMap::new();
    for e in &entries {
        let HeldBody::Institution(rec) = &e.body else {
            continue;
        };
        let verdict = cache.institutions.entry(e.key).or_insert_with(|| {
            let facts = authority.admission(&rec.admission)?;
            if facts.key.to_string() != e.id {
                return Err(format!(
                    "the entry's id {} is not the admitted key {}",
                    e.id, facts.key
                ));
            }
            Ok(facts)
        });
        if let Ok(f) = verdict {
            inst_facts.insert(e.key, f.clone());
        }
    }
    let admitted_keys: HashSet<Key> = inst_facts.values().map(|f| f.key).collect();

    // 3. Revocations, by authority.
    let mut revoked: HashSet<Key> = HashSet::new();
    let mut revocations: Vec<(&Held, &RevocationRecord)> = Vec::new();
    for &e in &entries {
        let HeldBody::Revocation(rec) = &e.body else {
            continue;
        };
        if e.id != rec.target.id() {
            ignore(
                &mut view,
                e,
                "the revocation's id does not name its target".into(),
            );
            continue;
        }
        let allowed = match &rec.target {
            Target::Institution { .. } => e.author == fed_key,
            Target::Node { key } => {
                e.author == fed_key
                    || node_facts
                        .get(key)
                        .and_then(|f| f.institution.as_ref())
                        .is_some_and(|(_, inst)| *inst == e.author)
            }
            Target::Token { .. } => {
                e.author == fed_key
                    || admitted_keys.contains(&e.author)
                    || node_facts.contains_key(&e.author)
            }
        };
        if !allowed {
            ignore(
                &mut view,
                e,
                format!("{} may not revoke {}", e.author, rec.target.id()),
            );
            continue;
        }
        if let Target::Node { key } | Target::Institution { key } = &rec.target {
            revoked.insert(*key);
        }
        revocations.push((e, rec));
    }
    for (e, rec) in revocations {
        let r = Revocation {
            id: e.id.clone(),
            revoked_by: e.author,
            at_ms: e.at_ms,
            record: rec.clone(),
        };
        // One per (target, revoker): the earliest, so that every replica keeps the same one.
        match view
            .revocations
            .iter_mut()
            .find(|o| o.id == r.id && o.revoked_by == r.revoked_by)
        {
            Some(old) if old.at_ms <= r.at_ms => {}
            Some(old) => *old = r,
            None => view.revocations.push(r),
        }
    }
    view.revocations
        .sort_by(|a, b| (&a.id, &a.revoked_by).cmp(&(&b.id, &b.revoked_by)));
    // A revoked author is revoked for every key acting for it: a node of a revoked institution
    // is revoked too (`Basis::node_ok`).
    let mut basis = Basis {
        node_facts,
        reused,
        revoked,
        ..Basis::default()
    };

    // 4. Every other entry: check its authority, then keep the winner per record.
    let mut winners: HashMap<(Kind, &str), &Held> = HashMap::new();
    let mut owners: HashMap<(Kind, &str), Key> = HashMap::new();
    let mut deletions: Vec<&Held> = Vec::new();
    for &e in &entries {
        let verdict: Result<(), String> = match &e.body {
            HeldBody::Revocation(_) => continue,
            HeldBody::Checkpoint(rec) => {
                if e.author != fed_key {
                    ignore(
                        &mut view,
                        e,
                        format!(
                            "{} may not write a checkpoint: only the federation key",
                            e.author
                        ),
                    );
                } else if e.id != crate::record::CheckpointRecord::id_for(rec.epoch) {
                    ignore(
                        &mut view,
                        e,
                        "the checkpoint's id does not name its epoch".into(),
                    );
                } else {
                    view.checkpoints.insert(rec.epoch, rec.base.clone());
                }
                continue;
            }
            HeldBody::Deleted { .. } => {
                deletions.push(e);
                continue;
            }
            HeldBody::Institution(_) => match inst_facts.get(&e.key) {
                None => Err(cache
                    .institutions
                    .get(&e.key)
                    .and_then(|v| v.as_ref().err().cloned())
                    .unwrap_or_else(|| "the admission does not verify".into())),
                Some(f) if basis.revoked.contains(&f.key) => Err(format!("{} is revoked", f.name)),
                Some(_) => {
                    if e.author == fed_key
                        || admitted_keys.contains(&e.author)
                        || basis.node_facts.contains_key(&e.author)
                    {
                        Ok(())
                    } else {
                        Err(format!(
                            "{} is neither a member nor an institution of the federation",
                            e.author
                        ))
                    }
                }
            },
            HeldBody::Node(_) => match cache.nodes.get(&e.key) {
                Some(Err(reason)) => Err(reason.clone()),
                _ => basis.node_ok(&e.author).map(|_| ()),
            },
            HeldBody::Endpoint(_) | HeldBody::Function(_) | HeldBody::Flow(_) => {
                basis.judge_owned(e)
            }
        };
        if let Err(reason) = verdict {
            ignore(&mut view, e, reason);
            continue;
        }
        let slot = (e.body.kind(), e.id.as_str());
        owners.entry(slot).or_insert(e.author);
        pick(&mut winners, slot, e);
    }
    // Deletions count only from the owner of the record they delete.
    for e in deletions {
        let slot = (e.body.kind(), e.id.as_str());
        if is_owned(slot.0) {
            basis.deleted.insert((slot.0, slot.1.to_string()));
        }
        if is_owned(slot.0) && !owners.contains_key(&slot) && basis.node_ok(&e.author).is_ok() {
            // Nothing that counts is here to delete (a checkpoint pruned the record this
            // deleted, or it has not arrived): inert, and not an error to report.
            continue;
        }
        let owner_ok = match e.body.kind() {
            Kind::Institution | Kind::Revocation | Kind::Checkpoint => false,
            _ => owners.get(&slot) == Some(&e.author) && basis.node_ok(&e.author).is_ok(),
        };
        if !owner_ok {
            ignore(
                &mut view,
                e,
                format!("{} may not delete {} {}", e.author, slot.0.as_str(), slot.1),
            );
            continue;
        }
        pick(&mut winners, slot, e);
    }
    for ((kind, id), e) in &winners {
        if is_owned(*kind) && !matches!(e.body, HeldBody::Deleted { .. }) {
            basis.winners.insert((*kind, id.to_string()), rank(e));
        }
    }

    // 5. The winners, typed.
    let mut sorted: Vec<_> = winners.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, e) in sorted {
        let author_facts = basis.node_facts.get(&e.author);
        let inst = || author_facts.and_then(|f| f.institution.as_ref().map(|(n, _)| n.clone()));
        match &e.body {
            HeldBody::Deleted { .. } | HeldBody::Revocation(_) | HeldBody::Checkpoint(_) => {}
            HeldBody::Institution(_) => {
                if let Some(f) = inst_facts.get(&e.key) {
                    view.institutions.insert(
                        f.key,
                        Institution {
                            name: f.name.clone(),
                            key: f.key,
                            admitted_at: f.admitted_at,
                        },
                    );
                }
            }
            HeldBody::Node(rec) => {
                let NodeRecord {
                    name,
                    addrs,
                    data_addr,
                    ..
                } = &**rec;
                if let Some(f) = author_facts {
                    view.nodes.insert(
                        f.peer_id.clone(),
                        Node {
                            key: e.author,
                            peer_id: f.peer_id.clone(),
                            name: name.clone(),
                            institution: inst(),
                            institution_key: f.institution.as_ref().map(|(_, k)| *k),
                            role: f.role.clone(),
                            addrs: addrs.clone(),
                            data_addr: data_addr.clone(),
                            updated_ms: e.at_ms,
                        },
                    );
                }
            }
            HeldBody::Endpoint(_) | HeldBody::Function(_) | HeldBody::Flow(_) => {
                place_owned(&mut view, &basis, e);
            }
        }
    }
    view.ignored.sort_by(|a, b| a.entry.cmp(&b.entry));
    (view, basis)
}

/// For each endpoint, function and flow slot, the author and rank of the entry that counts
/// there (a record or its deletion), as [`build`] decides it: what a checkpoint keeps, and what
/// makes every other entry of the slot superseded for good ([`superseded`]).
pub(crate) type Winners = HashMap<(Kind, String), (Key, Rank)>;

/// The winners among `entries` (see [`Winners`]).
pub(crate) fn winners<'a>(
    entries: impl Iterator<Item = &'a Held> + Clone,
    authority: &dyn Authority,
    cache: &mut Verdicts,
) -> Winners {
    let (_, basis) = build(entries.clone(), authority, cache);
    let mut out = Winners::new();
    let mut owners: HashMap<(Kind, &str), Key> = HashMap::new();
    let mut deletions = Vec::new();
    let put = |out: &mut Winners, e: &Held| {
        let slot = (e.body.kind(), e.id.clone());
        match out.get(&slot) {
            Some((_, best)) if *best >= rank(e) => {}
            _ => {
                out.insert(slot, (e.author, rank(e)));
            }
        }
    };
    for e in entries {
        if !is_owned(e.body.kind()) {
            continue;
        }
        if matches!(e.body, HeldBody::Deleted { .. }) {
            deletions.push(e);
        } else if basis.judge_owned(e).is_ok() {
            owners
                .entry((e.body.kind(), e.id.as_str()))
                .or_insert(e.author);
            put(&mut out, e);
        }
    }
    // A deletion counts here as in the view, and also where the record it deleted is gone
    // (pruned at an earlier checkpoint): it can only ever supersede its own author's entries
    // ([`superseded`]), and in a slot whose id derives from that author.
    for e in deletions {
        if owners
            .get(&(e.body.kind(), e.id.as_str()))
            .is_none_or(|owner| *owner == e.author)
            && basis.node_ok(&e.author).is_ok()
        {
            put(&mut out, e);
        }
    }
    out
}

/// Whether `e` can never count again once `winners` hold: it is an endpoint, function or flow
/// entry (or its deletion), the slot's winner is by the same author and outranks it, and it
/// passes the checks that do not depend on standing (so it counts exactly when the winner does,
/// and then loses to it). Such an entry is pruned at a checkpoint and dropped if an old copy
/// comes back.
pub(crate) fn superseded(winners: &Winners, e: &Held) -> bool {
    let kind = e.body.kind();
    if !is_owned(kind) {
        return false;
    }
    let statically_valid = match &e.body {
        HeldBody::Deleted { .. } => true,
        HeldBody::Endpoint(rec) => rec.node == e.author && e.id_derived,
        HeldBody::Function(rec) => rec.owner == e.author && e.id_derived,
        HeldBody::Flow(rec) => rec.owner == e.author && e.id_derived,
        _ => false,
    };
    statically_valid
        && winners
            .get(&(kind, e.id.clone()))
            .is_some_and(|(author, best)| *author == e.author && *best > rank(e))
}

fn node_verdict(
    id: &str,
    author: &Key,
    rec: &NodeRecord,
    authority: &dyn Authority,
) -> Result<NodeFacts, String> {
    if id != author.to_string() {
        return Err(format!("{author} may not write the node entry of {id}"));
    }
    authority.membership(&rec.proof, author)
}

/// Keeps the entry with the highest `(seq, at_ms, entry key)` for `slot`.
fn pick<'a>(winners: &mut HashMap<(Kind, &'a str), &'a Held>, slot: (Kind, &'a str), e: &'a Held) {
    match winners.get(&slot) {
        Some(cur) if rank(cur) >= rank(e) => {}
        _ => {
            winners.insert(slot, e);
        }
    }
}
