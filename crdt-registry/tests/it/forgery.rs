//! Acceptance 2 at the registry level: each forgery is ignored by every replica's view (or
//! refused at the door), and honest entries keep counting.

use crdt_registry::entry::{Entry, Payload};
use crdt_registry::record::{Body, InstitutionRecord, NodeRecord, RevocationRecord, Target};
use crdt_registry::{Key, MAX_CHANGE_BYTES, Registry, Rejected};

use crate::support::{FED, Member, Toy, endpoint, function, key};

/// An honest pair of members (two institutions) and a third replica that only listens.
fn federation(toy: &Toy) -> (Member, Member, Registry) {
    let (mut a, ca) = Member::new(toy, 1, 11);
    let (mut b, cb) = Member::new(toy, 2, 12);
    a.reg.apply_changes(&cb).unwrap();
    b.reg.apply_changes(&ca).unwrap();
    let mut listener = Registry::new(FED);
    listener.apply_changes(&ca).unwrap();
    listener.apply_changes(&cb).unwrap();
    (a, b, listener)
}

/// Delivers `change` to every replica and checks none of them counts anything new, that
/// `reason` is what the view says, and that honest writes still go through afterwards.
fn everyone_ignores(toy: &Toy, replicas: &mut [&mut Registry], change: Vec<u8>, reason: &str) {
    for r in replicas.iter_mut() {
        let before = r.view(toy).clone();
        r.apply_changes(std::slice::from_ref(&change)).unwrap();
        let after = r.view(toy).clone();
        assert_eq!(after.nodes, before.nodes);
        assert_eq!(after.endpoints, before.endpoints);
        assert_eq!(after.functions, before.functions);
        assert_eq!(after.institutions, before.institutions);
        assert!(
            after.ignored.iter().any(|i| i.reason.contains(reason)),
            "expected an entry ignored because {reason:?}, got {:?}",
            after.ignored
        );
    }
}

#[test]
fn an_entry_signed_by_the_wrong_key_is_refused_at_the_door() {
    let toy = Toy::new();
    let (mut a, b, mut listener) = federation(&toy);
    // b signs a function that claims a as its author and owner.
    let rec = function(&a.node, "stolen");
    let forged = Entry::sign(
        &b.node,
        Payload {
            federation: FED.into(),
            id: rec.content_id(),
            seq: 1,
            author: Key::of(&a.node),
            at_ms: 5,
            body: Body::Function(rec),
        },
    );
    let mut rogue = Registry::new(FED);
    let change = rogue.insert_unchecked(&forged, 5).unwrap();
    for r in [&mut a.reg, &mut listener] {
        let err = r.apply_changes(std::slice::from_ref(&change)).unwrap_err();
        assert!(
            matches!(err, Rejected::BadEntry { .. }) && err.to_string().contains("signature"),
            "{err}"
        );
        assert!(r.view(&toy).functions.is_empty());
    }
    // Still serving: an honest registration lands.
    let (id, c) = a.register("honest", 6);
    listener.apply_changes(&[c]).unwrap();
    assert!(listener.view(&toy).functions.contains_key(&id));
}

#[test]
fn a_node_writing_another_nodes_endpoint_is_ignored() {
    let toy = Toy::new();
    let (mut a, mut b, mut listener) = federation(&toy);
    let (ep, c) = a.endpoint("main", "real", 5);
    b.reg.apply_changes(std::slice::from_ref(&c)).unwrap();
    listener.apply_changes(&[c]).unwrap();
    // b overwrites a's endpoint, naming a's node, at a higher seq.
    let fake = endpoint(&a.node, "main", "fake");
    let node_b = b.node.clone();
    let (_, forged) = b
        .reg
        .write(&node_b, ep.clone(), Body::Endpoint(fake), 6)
        .unwrap();
    everyone_ignores(
        &toy,
        &mut [&mut a.reg, &mut listener],
        forged,
        "may not write an endpoint of node",
    );
    // b under its own node key but a's endpoint id.
    let fake = endpoint(&b.node, "main", "fake");
    let (_, forged) = b
        .reg
        .write(&node_b, ep.clone(), Body::Endpoint(fake), 7)
        .unwrap();
    everyone_ignores(
        &toy,
        &mut [&mut a.reg, &mut listener],
        forged,
        "not derived from its node and name",
    );
    assert_eq!(
        listener.view(&toy).endpoints[&ep].record.capabilities.tags["tag"],
        "real"
    );
}

#[test]
fn an_institution_without_admission_and_its_nodes_are_ignored() {
    let toy = Toy::new();
    let (mut a, _, mut listener) = federation(&toy);
    // An institution that admitted itself, and a node it "invited".
    let inst = key(77);
    let node = key(78);
    let self_admitted = toy.admission_signed_by("rogue-u", &inst, &inst);
    let mut rogue = Registry::new(FED);
    let (_, c1) = rogue
        .write(
            &node,
            Key::of(&inst).to_string(),
            Body::Institution(InstitutionRecord {
                admission: self_admitted.clone(),
            }),
            5,
        )
        .unwrap();
    let (_, c2) = rogue
        .write(
            &node,
            Key::of(&node).to_string(),
            Body::Node(NodeRecord {
                name: "rogue".into(),
                proof: toy.proof(&self_admitted, &inst, &node),
                addrs: vec![],
                data_addr: None,
            }),
            6,
        )
        .unwrap();
    let rec = function(&node, "evil");
    let (_, c3) = rogue
        .write(&node, rec.content_id(), Body::Function(rec), 7)
        .unwrap();
    for r in [&mut a.reg, &mut listener] {
        r.apply_changes(&[c1.clone(), c2.clone(), c3.clone()])
            .unwrap();
        let v = r.view(&toy);
        assert_eq!(v.institutions.len(), 2, "{:?}", v.institutions);
        assert_eq!(v.nodes.len(), 2);
        assert!(v.functions.is_empty());
        assert!(
            v.ignored
                .iter()
                .any(|i| i.reason.contains("not signed by the federation key")),
            "{:?}",
            v.ignored
        );
    }
}

#[test]
fn entries_by_a_revoked_author_are_ignored_and_only_the_issuer_may_revoke() {
    let toy = Toy::new();
    let (mut a, mut b, mut listener) = federation(&toy);
    let (fa, c) = a.register("before", 5);
    listener.apply_changes(std::slice::from_ref(&c)).unwrap();
    b.reg.apply_changes(&[c]).unwrap();
    let target = Target::Node {
        key: Key::of(&a.node),
    };
    // b's institution may not revoke a's node.
    let (_, bogus) = b
        .reg
        .write(
            &b.inst.clone(),
            target.id(),
            Body::Revocation(RevocationRecord {
                target: target.clone(),
                reason: "spite".into(),
            }),
            6,
        )
        .unwrap();
    listener.apply_changes(&[bogus]).unwrap();
    assert!(listener.view(&toy).functions.contains_key(&fa));
    assert!(listener.view(&toy).revocations.is_empty());
    // a's own institution may.
    let (_, revoke) = a
        .reg
        .write(
            &a.inst.clone(),
            target.id(),
            Body::Revocation(RevocationRecord {
                target,
                reason: "key lost".into(),
            }),
            7,
        )
        .unwrap();
    let (fa2, after) = a.register("after", 8);
    for r in [&mut b.reg, &mut listener] {
        r.apply_changes(&[revoke.clone(), after.clone()]).unwrap();
        let v = r.view(&toy);
        assert!(!v.functions.contains_key(&fa));
        assert!(!v.functions.contains_key(&fa2));
        assert!(v.node_by_key(&Key::of(&a.node)).is_none());
        assert!(v.is_revoked_key(&Key::of(&a.node)));
        assert!(v.ignored.iter().any(|i| i.reason.contains("is revoked")));
    }
}

#[test]
fn an_oversize_change_or_entry_is_refused() {
    let toy = Toy::new();
    let (mut a, _, mut listener) = federation(&toy);
    // Many entries of legal size in one change.
    let mut rogue = Registry::new(FED);
    let big = "x".repeat(200 * 1024);
    let mut last = Vec::new();
    let mut total = 0;
    let mut entries = Vec::new();
    for i in 0..6 {
        let mut rec = function(&a.node, &format!("big{i}"));
        rec.description = big.clone();
        let e = Entry::sign(
            &a.node,
            Payload {
                federation: FED.into(),
                id: rec.content_id(),
                seq: 1,
                author: Key::of(&a.node),
                at_ms: 5,
                body: Body::Function(rec),
            },
        );
        total += e.bytes().len();
        entries.push(e);
    }
    assert!(total > MAX_CHANGE_BYTES);
    // One transaction holding all of them: build through the raw document API.
    for e in &entries {
        last = rogue.insert_unchecked(e, 5).unwrap();
    }
    // Separately they are fine; bundled they are not: make the bundle with automerge directly.
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    for e in &entries {
        use automerge::transaction::Transactable as _;
        tx.put(
            automerge::ROOT,
            e.doc_key(),
            automerge::ScalarValue::Bytes(e.bytes().to_vec()),
        )
        .unwrap();
    }
    tx.commit();
    let bundle = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
    assert!(bundle.len() > MAX_CHANGE_BYTES);
    for r in [&mut a.reg, &mut listener] {
        let err = r.apply_changes(std::slice::from_ref(&bundle)).unwrap_err();
        assert!(matches!(err, Rejected::TooLarge { .. }), "{err}");
        assert!(r.view(&toy).functions.is_empty());
    }
    // An entry over the entry limit is refused even alone.
    let mut rec = function(&a.node, "huge");
    rec.description = "y".repeat(300 * 1024);
    let huge = Entry::forge(
        [0; 64],
        Payload {
            federation: FED.into(),
            id: rec.content_id(),
            seq: 1,
            author: Key::of(&a.node),
            at_ms: 5,
            body: Body::Function(rec),
        },
    );
    let c = Registry::new(FED).insert_unchecked(&huge, 5).unwrap();
    let err = listener.apply_changes(&[c]).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    // A single legal big entry is fine.
    let _ = last;
    listener.apply_changes(&rogue.all_changes()).unwrap();
    assert_eq!(listener.view(&toy).functions.len(), 6);
    // And the honest writer is unaffected.
    let node = a.node.clone();
    assert!(
        a.reg
            .write(
                &node,
                "x".into(),
                Body::Deleted {
                    of: crdt_registry::record::Kind::Flow
                },
                9
            )
            .is_ok()
    );
}

#[test]
fn a_foreign_entry_at_the_highest_seq_neither_crashes_nor_blocks_the_owner() {
    let toy = Toy::new();
    let (mut a, b, _) = federation(&toy);
    let (ep, _) = a.endpoint("main", "real", 5);
    // b writes a's endpoint id at seq u64::MAX (ignored by the view: wrong author).
    let fake = endpoint(&b.node, "main", "fake");
    let forged = Entry::sign(
        &b.node,
        Payload {
            federation: FED.into(),
            id: ep.clone(),
            seq: u64::MAX,
            author: Key::of(&b.node),
            at_ms: 6,
            body: Body::Endpoint(fake),
        },
    );
    a.reg.insert_unchecked(&forged, 6).unwrap();
    // The owner's next write neither panics nor loses.
    let (_, _) = a.endpoint("main", "updated", 7);
    assert_eq!(
        a.reg.view(&toy).endpoints[&ep].record.capabilities.tags["tag"],
        "updated"
    );
}

/// Two nodes that joined with the same invite (concurrently, through two coordinators): every
/// replica keeps the one admitted first, whatever order it learns them in, and ignores the
/// other and everything it writes.
#[test]
fn an_invite_admits_one_node_the_same_on_every_replica() {
    let toy = Toy::new();
    let inst = key(1);
    let admission = toy.admit("inst1", &inst);
    let node_entry = |node: &ed25519_dalek::SigningKey, at: u64| {
        let mut scratch = Registry::new(FED);
        let (_, c) = scratch
            .write(
                node,
                Key::of(node).to_string(),
                Body::Node(NodeRecord {
                    name: "n".into(),
                    proof: toy.proof_with_invite(&admission, &inst, node, Some(("inv-1", at))),
                    addrs: vec![],
                    data_addr: None,
                }),
                at,
            )
            .unwrap();
        let rec = function(node, "f");
        let (_, f) = scratch
            .write(node, rec.content_id(), Body::Function(rec), at + 1)
            .unwrap();
        vec![c, f]
    };
    let (first, second) = (key(20), key(21));
    let early = node_entry(&first, 100);
    let late = node_entry(&second, 200);
    let mut inst_reg = Registry::new(FED);
    let (_, i) = inst_reg
        .write(
            &first,
            Key::of(&inst).to_string(),
            Body::Institution(InstitutionRecord {
                admission: admission.clone(),
            }),
            1,
        )
        .unwrap();
    let mut a = Registry::new(FED);
    let mut b = Registry::new(FED);
    a.apply_changes(std::slice::from_ref(&i)).unwrap();
    b.apply_changes(&[i]).unwrap();
    // a learns the late one first and counts it until it hears of the earlier use.
    a.apply_changes(&late).unwrap();
    assert_eq!(a.view(&toy).nodes.len(), 1);
    a.apply_changes(&early).unwrap();
    b.apply_changes(&early).unwrap();
    b.apply_changes(&late).unwrap();
    for r in [&mut a, &mut b] {
        let v = r.view(&toy);
        let peers: Vec<&String> = v.nodes.keys().collect();
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(v.nodes.values().next().unwrap().key, Key::of(&first));
        assert_eq!(v.used_invites.len(), 1);
        assert_eq!(
            v.functions.len(),
            1,
            "the second node's function does not count"
        );
        assert!(
            v.ignored.iter().any(|i| i.reason.contains("used first")),
            "{:?}",
            v.ignored
        );
    }
    assert_eq!(a.view(&toy), b.view(&toy));
}
