//! The registry across a live in-process federation: propagation, partitions, restarts, forged
//! entries and corrupt bytes from a member.

use std::time::Duration;

use crdt_registry::entry::{Entry, Payload};
use crdt_registry::record::{Body, EndpointRecord, InstitutionRecord, RevocationRecord, Target};
use crdt_registry::{Key, Registry};
use mesh::Event;
use testnet::{Federation, shell_function, wait_for};

const FIVE_S: Duration = Duration::from_secs(5);

async fn ready(institutions: usize, per: usize) -> Federation {
    let net = Federation::start(institutions, per).await.unwrap();
    wait_for("full mesh", FIVE_S, || net.fully_connected())
        .await
        .unwrap();
    // Every endpoint node's endpoint is listed everywhere.
    let want = net.members.len();
    let listed = wait_for("every endpoint to be listed everywhere", FIVE_S, || async {
        for n in net.running() {
            if n.mesh().registry().await.unwrap().endpoints.len() != want {
                return false;
            }
        }
        true
    })
    .await;
    if let Err(e) = listed {
        for n in net.running() {
            let v = n.mesh().registry().await.unwrap();
            let s = n.mesh().registry_status().await.unwrap();
            eprintln!(
                "{}: {} endpoints, {} nodes, ignored {:?}, {s:?}",
                n.peer_id(),
                v.endpoints.len(),
                v.nodes.len(),
                v.ignored
            );
        }
        panic!("{e}");
    }
    net
}

fn signer(node: &node::Node) -> ed25519_dalek::SigningKey {
    let kp = mesh::keys::read_node_key(&node.data_dir().node_key()).unwrap();
    mesh::registry::signing_key(&kp).unwrap()
}

/// Waits until every node but `except` has penalised `peer`, and returns the reasons.
async fn penalised_by_all(
    net: &Federation,
    peer: mesh::PeerId,
    mut subs: Vec<tokio::sync::broadcast::Receiver<Event>>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    for rx in subs.iter_mut() {
        let r = tokio::time::timeout(FIVE_S, async {
            loop {
                match rx.recv().await {
                    Ok(Event::Penalised {
                        peer: p, reason, ..
                    }) if p == peer => return reason,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("event stream closed: {e}"),
                }
            }
        })
        .await
        .expect("a peer penalises the sender within 5 s");
        reasons.push(r);
    }
    let _ = net;
    reasons
}

/// After an attack: every node still answers, and a fresh honest registration reaches all.
async fn still_serving(net: &Federation, from: usize) {
    let id = net
        .node(from)
        .register_function(&shell_function("after-the-attack"))
        .await
        .unwrap();
    wait_for("an honest function after the attack", FIVE_S, || {
        net.everyone_has_function(&id)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_and_endpoints_reach_every_node() {
    let net = ready(2, 2).await;
    let id = net
        .node(0)
        .register_function(&shell_function("hello"))
        .await
        .unwrap();
    wait_for("the function everywhere", FIVE_S, || {
        net.everyone_has_function(&id)
    })
    .await
    .unwrap();
    let view = net.node(3).mesh().registry().await.unwrap();
    let f = &view.functions[&id];
    assert_eq!(f.record.name, "hello");
    assert_eq!(f.institution.as_deref(), Some("inst-a"));
    assert_eq!(f.owner_peer, net.node(0).peer_id().to_string());
    // Endpoints carry their node and institution; institutions and nodes are listed.
    let ep = view
        .endpoints
        .values()
        .find(|e| e.record.name == "b2")
        .unwrap();
    assert_eq!(ep.peer_id, net.node(3).peer_id().to_string());
    assert_eq!(ep.institution.as_deref(), Some("inst-b"));
    assert_eq!(ep.record.capabilities.tags["institution"], "inst-b");
    assert_eq!(view.institutions.len(), 2);
    assert_eq!(view.nodes.len(), 5);
    assert!(view.ignored.is_empty(), "{:?}", view.ignored);
    // Sync sessions end once replicas agree (they do not ping-pong forever).
    wait_for("every sync session to end", FIVE_S, || async {
        for n in net.running() {
            if n.mesh().registry_status().await.unwrap().syncing != 0 {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_halves_register_while_cut_off_and_converge_within_5s_of_healing() {
    let net = ready(2, 2).await;
    // Halves: the coordinator with inst-a's nodes, and inst-b's nodes.
    let coordinator = net.coordinator().unwrap();
    let left: Vec<&node::Node> = vec![coordinator, net.node(0), net.node(1)];
    let right: Vec<&node::Node> = vec![net.node(2), net.node(3)];
    for l in &left {
        for r in &right {
            l.mesh().block(r.peer_id(), true).await.unwrap();
            r.mesh().block(l.peer_id(), true).await.unwrap();
        }
    }
    wait_for("the halves to lose each other", FIVE_S, || async {
        for l in &left {
            let members = l.mesh().members().await.unwrap();
            if right
                .iter()
                .any(|r| members.iter().any(|m| m.peer_id == r.peer_id().to_string()))
            {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    let mut left_ids = Vec::new();
    let mut right_ids = Vec::new();
    for i in 0..3 {
        left_ids.push(
            net.node(0)
                .register_function(&shell_function(&format!("left-{i}")))
                .await
                .unwrap(),
        );
        right_ids.push(
            net.node(3)
                .register_function(&shell_function(&format!("right-{i}")))
                .await
                .unwrap(),
        );
    }
    // Each half converges on its own functions, and does not see the other's.
    wait_for("each half to converge", FIVE_S, || async {
        for (side, ids) in [(&left, &left_ids), (&right, &right_ids)] {
            for n in side.iter() {
                let v = n.mesh().registry().await.unwrap();
                if !ids.iter().all(|id| v.functions.contains_key(id)) {
                    return false;
                }
            }
        }
        true
    })
    .await
    .unwrap();
    let v = net.node(1).mesh().registry().await.unwrap();
    assert!(right_ids.iter().all(|id| !v.functions.contains_key(id)));
    // Heal.
    let healed = std::time::Instant::now();
    for l in &left {
        for r in &right {
            l.mesh().block(r.peer_id(), false).await.unwrap();
            r.mesh().block(l.peer_id(), false).await.unwrap();
        }
    }
    wait_for("every node to list all six functions", FIVE_S, || async {
        for id in left_ids.iter().chain(&right_ids) {
            if !net.everyone_has_function(id).await {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    eprintln!("converged {:?} after healing", healed.elapsed());
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_has_its_registry_and_catches_up() {
    let mut net = ready(2, 2).await;
    let before = net
        .node(0)
        .register_function(&shell_function("before"))
        .await
        .unwrap();
    wait_for("before everywhere", FIVE_S, || {
        net.everyone_has_function(&before)
    })
    .await
    .unwrap();
    let entries_before = net.node(3).mesh().registry_status().await.unwrap().entries;
    net.stop(3).await.unwrap();
    let missed = net
        .node(0)
        .register_function(&shell_function("missed"))
        .await
        .unwrap();
    net.restart(3).await.unwrap();
    // Straight from disk: the registry it had (at least; sync may already add to it).
    let status = net.node(3).mesh().registry_status().await.unwrap();
    assert!(status.entries >= entries_before, "{status:?}");
    assert!(
        net.node(3)
            .mesh()
            .registry()
            .await
            .unwrap()
            .functions
            .contains_key(&before)
    );
    wait_for("the restarted node to catch up", FIVE_S, || async {
        net.node(3)
            .mesh()
            .registry()
            .await
            .unwrap()
            .functions
            .contains_key(&missed)
    })
    .await
    .unwrap();
    net.shutdown().await;
}

/// A crafted change, gossiped by member `from` as if it were its own.
async fn gossip_change(net: &Federation, from: usize, change: Vec<u8>) {
    let fed = net.node(from).federation().id.0.clone();
    let scratch = Registry::new(&fed);
    let bytes = scratch.gossip_for(&change);
    net.node(from)
        .mesh()
        .publish(mesh::registry::TOPIC, bytes)
        .await
        .unwrap();
}

fn subscribe_all_but(
    net: &Federation,
    except: usize,
) -> Vec<tokio::sync::broadcast::Receiver<Event>> {
    let sender = net.node(except).peer_id();
    net.running()
        .into_iter()
        .filter(|n| n.peer_id() != sender)
        .map(|n| n.mesh().subscribe())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_an_entry_signed_by_the_wrong_key_is_refused_and_its_sender_penalised() {
    let net = ready(2, 1).await;
    let fed = net.node(0).federation().id.0.clone();
    // Member a1 signs a function that claims b1 as author and owner.
    let victim = net.node(1).registry_key();
    let mut rec = testnet::shell_function("stolen").record(victim, 1).unwrap();
    rec.description = "forged".into();
    let forged = Entry::sign(
        &signer(net.node(0)),
        Payload {
            federation: fed.clone(),
            id: rec.content_id(),
            seq: 1,
            author: victim,
            at_ms: 1,
            body: Body::Function(rec.clone()),
        },
    );
    let change = Registry::new(&fed).insert_unchecked(&forged, 1).unwrap();
    let subs = subscribe_all_but(&net, 0);
    gossip_change(&net, 0, change).await;
    let reasons = penalised_by_all(&net, net.node(0).peer_id(), subs).await;
    assert!(
        reasons.iter().all(|r| r.contains("signature")),
        "{reasons:?}"
    );
    for n in net.running() {
        assert!(
            !n.mesh()
                .registry()
                .await
                .unwrap()
                .functions
                .contains_key(&rec.content_id())
        );
    }
    still_serving(&net, 1).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_a_node_writing_another_nodes_endpoint_is_ignored_everywhere() {
    let net = ready(2, 1).await;
    let victim = net.node(1).registry_key();
    let view = net.node(1).mesh().registry().await.unwrap();
    let real = view
        .endpoints
        .values()
        .find(|e| e.record.node == victim)
        .unwrap()
        .clone();
    let mut fake: EndpointRecord = real.record.clone();
    fake.capabilities
        .tags
        .insert("hijacked".into(), "yes".into());
    // a1 writes b1's endpoint with its own (valid) signature.
    net.node(0)
        .mesh()
        .registry_write(real.id.clone(), Body::Endpoint(fake))
        .await
        .unwrap();
    wait_for(
        "every node to see and ignore the forgery",
        FIVE_S,
        || async {
            for n in net.running() {
                let v = n.mesh().registry().await.unwrap();
                let ignored = v
                    .ignored
                    .iter()
                    .any(|i| i.id == real.id && i.reason.contains("may not write an endpoint"));
                if !ignored {
                    return false;
                }
                assert!(
                    !v.endpoints[&real.id]
                        .record
                        .capabilities
                        .tags
                        .contains_key("hijacked")
                );
            }
            true
        },
    )
    .await
    .unwrap();
    still_serving(&net, 0).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_an_institution_without_admission_is_ignored_everywhere() {
    use mesh::membership::{Admission, Genesis, SigningKey, unix_now};
    let net = ready(2, 1).await;
    // An admission signed by a key that is not the federation's.
    let rogue_fed_key = SigningKey::generate();
    let rogue_fed = Genesis::create("test", &rogue_fed_key, unix_now())
        .verify()
        .unwrap();
    let inst = SigningKey::generate();
    let admission = Admission::issue(
        &rogue_fed,
        &rogue_fed_key,
        "rogue-u",
        inst.public(),
        unix_now(),
    );
    let id = Key(inst.public().0).to_string();
    net.node(0)
        .mesh()
        .registry_write(
            id.clone(),
            Body::Institution(InstitutionRecord {
                admission: serde_json::to_string(&admission).unwrap(),
            }),
        )
        .await
        .unwrap();
    wait_for("every node to see and ignore it", FIVE_S, || async {
        for n in net.running() {
            let v = n.mesh().registry().await.unwrap();
            if !v.ignored.iter().any(|i| i.id == id) {
                return false;
            }
            assert_eq!(v.institutions.len(), 2);
            assert!(v.institutions.values().all(|i| i.name != "rogue-u"));
        }
        true
    })
    .await
    .unwrap();
    still_serving(&net, 1).await;
    net.shutdown().await;
}

/// A signing key from its file.
fn key_file_signer(path: &std::path::Path, kind: mesh::keys::KeyKind) -> ed25519_dalek::SigningKey {
    let (_, key) = mesh::keys::read_signing_key(path, kind).unwrap();
    ed25519_dalek::SigningKey::from_bytes(&key.secret())
}

/// Writes a revocation of `target`, signed by `by`, through node 0's replica.
async fn revoke(net: &Federation, by: &ed25519_dalek::SigningKey, target: Target, reason: &str) {
    let revocation = Entry::sign(
        by,
        Payload {
            federation: net.node(0).federation().id.0.clone(),
            id: target.id(),
            seq: 1,
            author: Key::of(by),
            at_ms: 1,
            body: Body::Revocation(RevocationRecord {
                target,
                reason: reason.into(),
            }),
        },
    );
    net.node(0)
        .mesh()
        .registry_insert(revocation.bytes().to_vec())
        .await
        .unwrap();
}

/// inst-a's admin revokes its node `i` (with the institution key).
async fn revoke_node(net: &Federation, i: usize) {
    let by = key_file_signer(&net.institutions[0].key, mesh::keys::KeyKind::Institution);
    let target = Target::Node {
        key: net.node(i).registry_key(),
    };
    revoke(net, &by, target, "key lost").await;
}

/// The federation revokes institution `i` (with the federation key).
async fn revoke_institution(net: &Federation, i: usize) {
    let by = key_file_signer(&net.federation_key(), mesh::keys::KeyKind::Federation);
    let institution = key_file_signer(&net.institutions[i].key, mesh::keys::KeyKind::Institution);
    let target = Target::Institution {
        key: Key::of(&institution),
    };
    revoke(net, &by, target, "left the federation").await;
}

/// An institution the federation revokes keeps valid admission proofs on its nodes — only the
/// registry says it is revoked — so every member of the other institutions cuts all of its
/// nodes and refuses them when they dial again, naming the institution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_revoked_institution_is_cut_and_refused_when_it_dials_again() {
    let net = ready(2, 2).await;
    let (inst_a, inst_b): (Vec<&testnet::Slot>, Vec<&testnet::Slot>) =
        net.members.iter().partition(|s| s.institution == 0);
    let a: Vec<mesh::PeerId> = inst_a
        .iter()
        .map(|s| s.node.as_ref().unwrap().peer_id())
        .collect();
    let b: Vec<mesh::PeerId> = inst_b
        .iter()
        .map(|s| s.node.as_ref().unwrap().peer_id())
        .collect();
    assert!(!a.is_empty() && !b.is_empty());
    let a0 = inst_a[0].node.as_ref().unwrap();
    let mut refusals = a0.mesh().subscribe();
    revoke_institution(&net, 1).await;
    wait_for(
        "every node of the other institution and the coordinator to cut institution b's nodes",
        FIVE_S,
        || async {
            net.running()
                .into_iter()
                .filter(|n| !b.contains(&n.peer_id()))
                .all(|n| b.iter().all(|p| !n.mesh().is_member(p)))
        },
    )
    .await
    .unwrap();
    // Institution a's own nodes stay members of each other.
    for s in &inst_a {
        let n = s.node.as_ref().unwrap();
        for p in &a {
            if *p != n.peer_id() {
                assert!(n.mesh().is_member(p), "{} lost a fellow member", s.name);
            }
        }
    }
    // A node of b dials a0 again: refused, for its institution being revoked.
    let b0 = inst_b[0].node.as_ref().unwrap();
    let _ = b0
        .mesh()
        .dial(a0.dial_addrs().await.unwrap().remove(0))
        .await;
    let refused = tokio::time::timeout(FIVE_S, async {
        loop {
            match refusals.recv().await {
                Ok(Event::Refused { peer, reason }) if peer == b[0] => {
                    let reason = reason.to_string();
                    if reason.contains("revoked") {
                        return reason;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("a0 refused b's node for its institution being revoked");
    assert!(refused.contains("institution"), "{refused}");
    assert!(!a0.mesh().is_member(&b[0]));
    net.shutdown().await;
}

/// A revoked node's membership proof stays valid — only the registry says it is revoked — so
/// every member that learns of the revocation cuts it, drops it from the directory, and refuses
/// it when it dials again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_by_every_member_and_refused_when_it_dials_again() {
    let net = ready(2, 2).await;
    let revoked = net.node(1).peer_id();
    let mut refusals = net.node(0).mesh().subscribe();
    revoke_node(&net, 1).await;
    wait_for(
        "every other node to cut the revoked node",
        FIVE_S,
        || async {
            for n in net.running() {
                if n.peer_id() != revoked && n.mesh().is_member(&revoked) {
                    return false;
                }
            }
            true
        },
    )
    .await
    .unwrap();
    // It dials node 0 again: refused, for being revoked.
    let addr = net.node(0).dial_addrs().await.unwrap().remove(0);
    let _ = net.node(1).mesh().dial(addr).await;
    let refused = tokio::time::timeout(FIVE_S, async {
        loop {
            match refusals.recv().await {
                Ok(Event::Refused { peer, reason }) if peer == revoked => {
                    let reason = reason.to_string();
                    if reason.contains("revoked") {
                        return reason;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("node 0 refused the revoked node for being revoked");
    assert!(refused.contains(&format!("node {revoked}")), "{refused}");
    // Node 0 refuses it on every attempt: it is never a member again.
    let _ = net
        .node(1)
        .mesh()
        .dial(net.node(0).dial_addrs().await.unwrap().remove(0))
        .await;
    wait_for("the revoked node to be refused again", FIVE_S, || async {
        !net.node(0).mesh().is_member(&revoked)
            && !net
                .node(0)
                .mesh()
                .members()
                .await
                .unwrap()
                .iter()
                .any(|m| m.peer_id == revoked.to_string())
    })
    .await
    .unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_entries_by_a_revoked_author_are_ignored_everywhere() {
    let net = ready(2, 2).await;
    let early = net
        .node(1)
        .register_function(&shell_function("early"))
        .await
        .unwrap();
    wait_for("early everywhere", FIVE_S, || {
        net.everyone_has_function(&early)
    })
    .await
    .unwrap();
    revoke_node(&net, 1).await;
    // a2 keeps writing: nobody counts it.
    let late = net
        .node(1)
        .register_function(&shell_function("late"))
        .await
        .unwrap();
    // a2 itself is cut by every member that learns of the revocation (and may never hear of
    // it), so its late entry reaches those its gossip got to before: ignored there, counted
    // nowhere.
    let a2 = net.node(1).peer_id();
    let others = || net.running().into_iter().filter(|n| n.peer_id() != a2);
    wait_for("every node to drop a2's entries", FIVE_S, || async {
        for n in others() {
            let v = n.mesh().registry().await.unwrap();
            let dropped = !v.functions.contains_key(&early)
                && !v.functions.contains_key(&late)
                && v.ignored
                    .iter()
                    .filter(|i| i.id == late)
                    .all(|i| i.reason.contains("revoked"))
                && v.revocations.len() == 1;
            if !dropped {
                return false;
            }
        }
        true
    })
    .await
    .unwrap();
    let after = net
        .node(2)
        .register_function(&shell_function("after-the-revocation"))
        .await
        .unwrap();
    wait_for(
        "an honest function after the revocation",
        FIVE_S,
        || async {
            for n in others() {
                if !n
                    .mesh()
                    .registry()
                    .await
                    .unwrap()
                    .functions
                    .contains_key(&after)
                {
                    return false;
                }
            }
            true
        },
    )
    .await
    .unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_an_oversize_change_is_refused_and_its_sender_penalised() {
    let net = ready(2, 1).await;
    let fed = net.node(0).federation().id.0.clone();
    let me = signer(net.node(0));
    // Six legal 200 KiB entries in one change: over the 1 MiB change limit.
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    for i in 0..6 {
        let mut rec = shell_function(&format!("big{i}"))
            .record(Key::of(&me), 1)
            .unwrap();
        rec.description = "x".repeat(200 * 1024);
        let e = Entry::sign(
            &me,
            Payload {
                federation: fed.clone(),
                id: rec.content_id(),
                seq: 1,
                author: Key::of(&me),
                at_ms: 1,
                body: Body::Function(rec),
            },
        );
        use automerge::transaction::Transactable as _;
        tx.put(
            automerge::ROOT,
            e.doc_key(),
            automerge::ScalarValue::Bytes(e.bytes().to_vec()),
        )
        .unwrap();
    }
    tx.commit();
    let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
    assert!(change.len() > crdt_registry::MAX_CHANGE_BYTES);
    let msg = automerge::sync::Message {
        heads: vec![],
        need: vec![],
        have: vec![],
        changes: automerge::sync::ChunkList::from(vec![change]),
        supported_capabilities: None,
        version: automerge::sync::MessageVersion::V1,
    }
    .encode();
    let sub = net.node(1).mesh().subscribe();
    net.node(0)
        .mesh()
        .registry_sync_raw(net.node(1).peer_id(), msg)
        .await
        .unwrap();
    let reasons = penalised_by_all(&net, net.node(0).peer_id(), vec![sub]).await;
    assert!(reasons[0].contains("at most"), "{reasons:?}");
    assert!(
        net.node(1)
            .mesh()
            .registry()
            .await
            .unwrap()
            .functions
            .is_empty()
    );
    still_serving(&net, 1).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_gossip_and_sync_bytes_are_rejected_and_the_sender_cut_off_after_three() {
    let net = ready(2, 1).await;
    let attacker = net.node(0).peer_id();
    let subs = subscribe_all_but(&net, 0);
    net.node(0)
        .mesh()
        .publish(
            mesh::registry::TOPIC,
            b"\x01\x00\x00\x00\x05garbage-not-a-change".to_vec(),
        )
        .await
        .unwrap();
    let reasons = penalised_by_all(&net, attacker, subs).await;
    assert!(
        reasons.iter().all(|r| r.contains("registry gossip")),
        "{reasons:?}"
    );
    // Garbage sync messages to b1: strikes two and three, then b1 cuts a1 off.
    let mut events = net.node(1).mesh().subscribe();
    for garbage in [b"\x42\xff\xff".to_vec(), vec![0u8; 100]] {
        net.node(0)
            .mesh()
            .registry_sync_raw(net.node(1).peer_id(), garbage)
            .await
            .unwrap();
    }
    let cut = tokio::time::timeout(FIVE_S, async {
        loop {
            if let Ok(Event::Penalised {
                peer,
                strikes,
                reason,
            }) = events.recv().await
            {
                assert!(reason.contains("registry sync"), "{reason}");
                if peer == attacker && strikes >= 3 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "b1 did not penalise three times");
    wait_for("b1 to cut a1 off", FIVE_S, || async {
        !net.node(1)
            .mesh()
            .members()
            .await
            .unwrap()
            .iter()
            .any(|m| m.peer_id == attacker.to_string())
    })
    .await
    .unwrap();
    // Everyone else still serves, and b1 still gets a1's honest writes through the others.
    still_serving(&net, 1).await;
    net.shutdown().await;
}

/// Every running node and the coordinator: each one's registry status.
async fn statuses(net: &Federation) -> Vec<mesh::registry::Status> {
    let mut out = Vec::new();
    for n in net.running().into_iter().chain(net.coordinator()) {
        out.push(n.mesh().registry_status().await.unwrap());
    }
    out
}

/// The coordinator holds the federation key and writes a checkpoint once enough entries pile
/// up. Every member crosses it, the superseded entries (functions that were deleted) are gone
/// everywhere, every replica holds the same document, a restarted member keeps its epoch, and a
/// member that joins afterwards is sent the base and checks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_prunes_every_replica_alike_and_a_newcomer_is_sent_the_base() {
    let mut net = Federation::start_with(2, 1, &["mesh.checkpoint_every=20".into()])
        .await
        .unwrap();
    wait_for("full mesh", FIVE_S, || net.fully_connected())
        .await
        .unwrap();
    let mut kept = Vec::new();
    for i in 0..10 {
        let id = net
            .node(0)
            .register_function(&shell_function(&format!("f{i}")))
            .await
            .unwrap();
        if i % 2 == 0 {
            net.node(0)
                .mesh()
                .registry_write(
                    id,
                    Body::Deleted {
                        of: crdt_registry::record::Kind::Function,
                    },
                )
                .await
                .unwrap();
        } else {
            kept.push(id);
        }
    }
    let crossed = wait_for(
        "every replica to cross the checkpoint into the same document",
        Duration::from_secs(20),
        || async {
            let all = statuses(&net).await;
            all.iter()
                .all(|s| s.epoch == 1 && s.heads == all[0].heads && !s.missing_deps)
        },
    )
    .await;
    if let Err(e) = crossed {
        panic!("{e}: {:#?}", statuses(&net).await);
    }
    for s in statuses(&net).await {
        assert!(s.refused_checkpoint.is_none(), "{s:?}");
    }
    for n in net.running() {
        let v = n.mesh().registry().await.unwrap();
        assert_eq!(v.functions.len(), kept.len());
        assert!(kept.iter().all(|id| v.functions.contains_key(id)));
        assert_eq!(v.checkpoints.len(), 1);
        assert!(v.ignored.is_empty(), "{:?}", v.ignored);
    }
    // Restarted from its store: the same epoch, and the pruned entries stay gone (it publishes
    // its node record again on start, so the heads move on).
    let entries = statuses(&net).await[0].entries;
    net.stop(1).await.unwrap();
    net.restart(1).await.unwrap();
    let s = net.node(1).mesh().registry_status().await.unwrap();
    assert_eq!(s.epoch, 1, "{s:?}");
    assert!(
        s.entries <= entries + 2,
        "{} entries, {entries} before: {s:?}",
        s.entries
    );
    let v = net.node(1).mesh().registry().await.unwrap();
    assert_eq!(v.functions.len(), kept.len());
    // A newcomer holds none of the history: it is sent the base and checks it.
    let new = net.add_member(1).await.unwrap();
    wait_for("the newcomer to adopt the base", FIVE_S, || async {
        let s = net.node(new).mesh().registry_status().await.unwrap();
        s.epoch == 1
            && net
                .node(new)
                .mesh()
                .registry()
                .await
                .unwrap()
                .functions
                .len()
                == kept.len()
    })
    .await
    .unwrap();
    wait_for(
        "every replica, the newcomer's too, to agree",
        FIVE_S,
        || async {
            let all = statuses(&net).await;
            all.iter().all(|s| s.epoch == 1 && s.heads == all[0].heads)
        },
    )
    .await
    .unwrap();
    net.shutdown().await;
}
