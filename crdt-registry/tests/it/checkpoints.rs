//! Checkpoints: replicas cross into the next epoch, prune superseded entries, and converge
//! whatever order they learn things in; members behind catch up; bad checkpoints are refused.

use crdt_registry::record::{Body, CheckpointRecord, RevocationRecord, Target};
use crdt_registry::{Crossing, Key, Registry, SyncState, View};

use crate::support::{FED, Member, Toy, key};

/// A federation of two members whose endpoints were updated many times: most entries are
/// superseded. Returns the members (each holding everything) and every change.
fn busy_federation(toy: &Toy) -> (Member, Member, Vec<Vec<u8>>) {
    let (mut a, mut all) = Member::new(toy, 10, 20);
    let (mut b, changes) = Member::new(toy, 11, 21);
    all.extend(changes);
    a.reg.apply_changes(&all).unwrap();
    for i in 0..30u64 {
        all.push(a.endpoint("gpu", &format!("v{i}"), 100 + i).1);
    }
    for i in 0..5u64 {
        all.push(a.register(&format!("fn-{i}"), 200 + i).1);
    }
    // One function deleted: the deletion wins and must survive the checkpoint.
    let (gone, c) = a.register("gone", 300);
    all.push(c);
    let (_, c) = a
        .reg
        .write(
            &a.node.clone(),
            gone,
            Body::Deleted {
                of: crdt_registry::record::Kind::Function,
            },
            301,
        )
        .unwrap();
    all.push(c);
    b.reg.apply_changes(&all).unwrap();
    a.reg.apply_changes(&all).unwrap();
    assert_eq!(a.reg.heads(), b.reg.heads());
    (a, b, all)
}

/// The view without the diagnostics of which entries did not count.
fn counted(reg: &mut Registry, toy: &Toy) -> View {
    let mut v = reg.view(toy).clone();
    v.ignored.clear();
    v
}

/// Runs a sync session between two replicas until neither has anything to say, crossing
/// whatever checkpoint a message brings.
fn sync(a: &mut Registry, b: &mut Registry, toy: &Toy) {
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    for _ in 0..64 {
        let m1 = a.generate_sync(&mut sa);
        if let Some(m) = &m1 {
            if b.receive_sync(&mut sb, m).unwrap().checkpoint {
                b.cross(toy);
            }
        }
        let m2 = b.generate_sync(&mut sb);
        if let Some(m) = &m2 {
            if a.receive_sync(&mut sa, m).unwrap().checkpoint {
                a.cross(toy);
            }
        }
        if m1.is_none() && m2.is_none() {
            return;
        }
    }
    panic!("the sync session did not end");
}

fn write_checkpoint(reg: &mut Registry, toy: &Toy) -> Vec<u8> {
    reg.write_checkpoint(&toy.fed, toy, 1_000).unwrap().1
}

#[test]
fn a_checkpoint_prunes_superseded_entries_and_every_replica_derives_the_same_document() {
    let toy = Toy::new();
    let (mut a, mut b, _) = busy_federation(&toy);
    let before = a.reg.len();
    assert_eq!(
        a.reg.prunable(&toy),
        29 + 1,
        "29 old endpoint versions, the deleted function"
    );
    let cp = write_checkpoint(&mut a.reg, &toy);
    let view_before = counted(&mut a.reg, &toy);
    assert_eq!(view_before.checkpoints.len(), 1);

    assert!(
        a.reg
            .write_checkpoint(&toy.fed, &toy, 1_001)
            .unwrap_err()
            .to_string()
            .contains("exists already"),
        "a second checkpoint of one epoch would split the federation"
    );
    assert_eq!(a.reg.cross(&toy), Crossing::Crossed(1));
    assert_eq!(a.reg.epoch(), 1);
    assert_eq!(
        a.reg.len(),
        before + 1 - 30,
        "the checkpoint in, 30 superseded entries out"
    );
    assert_eq!(
        counted(&mut a.reg, &toy),
        view_before,
        "a checkpoint changes no outcome"
    );

    // b learns the checkpoint by gossip, in the old epoch's format, and derives the same base.
    let applied = b.reg.receive_gossip(&a_gossip_of(&cp)).unwrap();
    assert!(applied.checkpoint);
    assert_eq!(b.reg.cross(&toy), Crossing::Crossed(1));
    assert_eq!(
        b.reg.heads(),
        a.reg.heads(),
        "the same document, change for change"
    );
    assert_eq!(counted(&mut b.reg, &toy), view_before);
    // Crossing twice does nothing.
    assert_eq!(b.reg.cross(&toy), Crossing::Nothing);
}

/// The gossip message an epoch-0 replica sends for `change`.
fn a_gossip_of(change: &[u8]) -> Vec<u8> {
    Registry::new(FED).gossip_for(change)
}

#[test]
fn writes_made_while_a_checkpoint_spreads_reach_every_replica() {
    let toy = Toy::new();
    let (mut a, mut b, _) = busy_federation(&toy);
    let cp = write_checkpoint(&mut a.reg, &toy);
    assert_eq!(a.reg.cross(&toy), Crossing::Crossed(1));
    // b has not heard of the checkpoint and writes in the old epoch; a writes in the new one.
    let (fb, old_epoch) = b.register("written-before-crossing", 2_000);
    let (fa, new_epoch) = a.register("written-after-crossing", 2_001);
    let old_gossip = b.reg.gossip_for(&old_epoch);
    let new_gossip = a.reg.gossip_for(&new_epoch);
    // a keeps b's entry, put on its base.
    let applied = a.reg.receive_gossip(&old_gossip).unwrap();
    assert_eq!(applied.new_entries, 1);
    assert!(a.reg.view(&toy).functions.contains_key(&fb));
    // b cannot apply a's new-epoch gossip yet: it asks for a sync.
    let applied = b.reg.receive_gossip(&new_gossip).unwrap();
    assert!(applied.missing_deps);
    assert_eq!(applied.new_entries, 0);
    // The checkpoint arrives; b crosses, carrying its own write over.
    assert!(b.reg.receive_gossip(&a_gossip_of(&cp)).unwrap().checkpoint);
    assert_eq!(b.reg.cross(&toy), Crossing::Crossed(1));
    sync(&mut a.reg, &mut b.reg, &toy);
    assert_eq!(a.reg.heads(), b.reg.heads());
    for r in [&mut a.reg, &mut b.reg] {
        let v = r.view(&toy);
        assert!(v.functions.contains_key(&fa) && v.functions.contains_key(&fb));
    }
    assert_eq!(counted(&mut a.reg, &toy), counted(&mut b.reg, &toy));
}

#[test]
fn a_replica_that_missed_the_checkpoint_crosses_by_sync_and_a_new_one_is_sent_the_base() {
    let toy = Toy::new();
    let (mut a, mut b, _) = busy_federation(&toy);
    write_checkpoint(&mut a.reg, &toy);
    assert_eq!(a.reg.cross(&toy), Crossing::Crossed(1));
    let (f, _) = a.register("after", 3_000);

    // b holds the checkpoint's history: told of it in a sync, it derives the base itself.
    sync(&mut b.reg, &mut a.reg, &toy);
    assert_eq!(b.reg.epoch(), 1);
    assert_eq!(b.reg.heads(), a.reg.heads());

    // A replica that holds nothing cannot derive the base: it is sent it and checks it.
    let mut fresh = Registry::new(FED);
    sync(&mut fresh, &mut a.reg, &toy);
    assert_eq!(fresh.epoch(), 1);
    assert_eq!(fresh.heads(), a.reg.heads());
    assert!(fresh.view(&toy).functions.contains_key(&f));
    assert_eq!(counted(&mut fresh, &toy), counted(&mut a.reg, &toy));
    // The same the other way round: the new replica starts the session.
    let mut other = Registry::new(FED);
    sync(&mut a.reg, &mut other, &toy);
    assert_eq!(other.heads(), a.reg.heads());
}

#[test]
fn a_late_old_copy_of_a_pruned_entry_stays_out() {
    let toy = Toy::new();
    let (mut a, _, all) = busy_federation(&toy);
    write_checkpoint(&mut a.reg, &toy);
    assert_eq!(a.reg.cross(&toy), Crossing::Crossed(1));
    let len = a.reg.len();
    let view = counted(&mut a.reg, &toy);
    // Every change of the old epoch comes back, from a member that never crossed.
    for c in &all {
        a.reg.receive_gossip(&a_gossip_of(c)).unwrap();
    }
    assert_eq!(a.reg.len(), len, "nothing pruned came back");
    assert_eq!(counted(&mut a.reg, &toy), view);
    // So too after a restart, once the view has worked out again what the base superseded.
    let (mut back, _) = Registry::load(FED, Some(&a.reg.save().unwrap()), &[]).unwrap();
    assert_eq!(back.epoch(), 1);
    assert_eq!(back.heads(), a.reg.heads());
    assert_eq!(counted(&mut back, &toy), view);
    for c in &all {
        back.receive_gossip(&a_gossip_of(c)).unwrap();
    }
    assert_eq!(back.len(), len);
}

#[test]
fn a_checkpoint_whose_base_leaves_out_a_revocation_is_refused_everywhere() {
    let toy = Toy::new();
    let (mut a, mut b, _) = busy_federation(&toy);
    // A replica without the revocation below: the base a dishonest checkpoint would name.
    let mut without = Registry::load(FED, Some(&a.reg.save().unwrap()), &[])
        .unwrap()
        .0;
    let target = Target::Node {
        key: Key::of(&b.node),
    };
    let (_, revoke) = a
        .reg
        .write(
            &b.inst.clone(),
            target.id(),
            Body::Revocation(RevocationRecord {
                target,
                reason: "compromised".into(),
            }),
            500,
        )
        .unwrap();
    b.reg.apply_changes(&[revoke]).unwrap();
    let (_, honest) = without.write_checkpoint(&toy.fed, &toy, 1_000).unwrap();
    let Body::Checkpoint(mut record) = first_entry(&honest).payload().body.clone() else {
        unreachable!()
    };
    // The forged checkpoint names a's heads (which hold the revocation) and the base without it.
    record.heads = a.reg.heads_hex();
    record.heads.sort();
    let (_, forged) = a
        .reg
        .write(
            &toy.fed,
            CheckpointRecord::id_for(1),
            Body::Checkpoint(record),
            1_001,
        )
        .unwrap();
    b.reg.apply_changes(std::slice::from_ref(&forged)).unwrap();
    for r in [&mut a.reg, &mut b.reg] {
        let Crossing::Refused(why) = r.cross(&toy) else {
            panic!("the forged checkpoint was not refused")
        };
        assert!(why.contains("the base derived here ends at"), "{why}");
        assert_eq!(r.epoch(), 0);
        assert!(r.view(&toy).is_revoked_key(&Key::of(&b.node)));
        assert_eq!(r.refused_checkpoint(), Some(why.as_str()));
        // Refused once, not retried on every message.
        assert_eq!(r.cross(&toy), Crossing::Nothing);
        // A peer that keeps offering it (a notice: tag 0xF2, the epoch, the entry) gets nothing
        // more in that session: no crossing, and no answer to ping-pong with.
        let mut notice = vec![0xF2];
        notice.extend_from_slice(&1u64.to_be_bytes());
        notice.extend_from_slice(first_entry(&forged).bytes());
        let mut state = SyncState::new();
        let applied = r.receive_sync(&mut state, &notice).unwrap();
        assert!(!applied.checkpoint);
        assert_eq!(r.generate_sync(&mut state), None);
        assert_eq!(r.epoch(), 0);
    }
}

#[test]
fn a_checkpoint_by_anyone_but_the_federation_key_is_ignored() {
    let toy = Toy::new();
    let (a, _, _) = busy_federation(&toy);
    let intruder = key(77);
    // The record made the honest way (on a copy), then signed by another key.
    let mut copy = Registry::load(FED, Some(&a.reg.save().unwrap()), &[])
        .unwrap()
        .0;
    let (_, c) = copy.write_checkpoint(&toy.fed, &toy, 1_000).unwrap();
    let Body::Checkpoint(record) = first_entry(&c).payload().body.clone() else {
        unreachable!()
    };
    let mut other = Registry::load(FED, Some(&a.reg.save().unwrap()), &[])
        .unwrap()
        .0;
    assert!(
        other
            .write_checkpoint(&a.node, &toy, 1_000)
            .unwrap_err()
            .to_string()
            .contains("federation key")
    );
    let (_, c) = other
        .write(
            &intruder,
            CheckpointRecord::id_for(1),
            Body::Checkpoint(record),
            1_001,
        )
        .unwrap();
    let mut b = Registry::load(FED, Some(&other.save().unwrap()), &[])
        .unwrap()
        .0;
    b.apply_changes(&[c]).unwrap();
    assert_eq!(b.cross(&toy), Crossing::Nothing);
    assert_eq!(b.epoch(), 0);
    assert!(
        b.view(&toy)
            .ignored
            .iter()
            .any(|i| i.reason.contains("only the federation key"))
    );
}

#[test]
fn a_base_that_does_not_match_its_checkpoint_is_refused() {
    let toy = Toy::new();
    let (mut a, _, _) = busy_federation(&toy);
    write_checkpoint(&mut a.reg, &toy);
    assert_eq!(a.reg.cross(&toy), Crossing::Crossed(1));
    // A fresh replica asks a for the base; the answer is tampered with on the way.
    let mut fresh = Registry::new(FED);
    let (mut sa, mut sf) = (SyncState::new(), SyncState::new());
    let hello = fresh.generate_sync(&mut sf).unwrap();
    a.reg.receive_sync(&mut sa, &hello).unwrap();
    let notice = a.reg.generate_sync(&mut sa).unwrap();
    assert!(fresh.receive_sync(&mut sf, &notice).unwrap().checkpoint);
    assert_eq!(fresh.cross(&toy), Crossing::NeedBase);
    let ask = fresh.generate_sync(&mut sf).unwrap();
    a.reg.receive_sync(&mut sa, &ask).unwrap();
    let bundle = a.reg.generate_sync(&mut sa).unwrap();
    // A byte of the last base change flipped on the way (inside an entry, which is most of it):
    // refused whole, whether the message or the base fails its checks.
    let mut bad = bundle.clone();
    let last_len = last_change_len(&bundle[9..]);
    let at = bad.len() - last_len / 2;
    bad[at] ^= 0x20;
    match fresh.receive_sync(&mut sf, &bad) {
        Err(_) => {}
        Ok(applied) => {
            assert!(applied.checkpoint);
            let Crossing::Refused(why) = fresh.cross(&toy) else {
                panic!("a corrupted base was adopted")
            };
            assert!(!why.is_empty());
        }
    }
    assert_eq!(fresh.epoch(), 0);
    // The whole base is adopted.
    assert!(fresh.receive_sync(&mut sf, &bundle).unwrap().checkpoint);
    assert_eq!(fresh.cross(&toy), Crossing::Crossed(1));
}

/// The length of the last of a run of length-prefixed changes.
fn last_change_len(mut rest: &[u8]) -> usize {
    let mut last = 0;
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        last = len;
        rest = &rest[4 + len..];
    }
    last
}

/// The entry a change from `write` puts.
fn first_entry(change: &[u8]) -> crdt_registry::Entry {
    let c = automerge::Change::from_bytes(change.to_vec()).unwrap();
    let op = c.decode().operations.into_iter().next().unwrap();
    let automerge::legacy::OpType::Put(automerge::ScalarValue::Bytes(b)) = op.action else {
        unreachable!()
    };
    crdt_registry::Entry::open(&b, FED).unwrap()
}

#[test]
fn replicas_that_cross_in_any_order_converge() {
    // Three replicas; the checkpoint, a write from before it and one from after it reach them in
    // every order, by gossip, then they sync pairwise.
    let toy = Toy::new();
    let (mut a, b, _) = busy_federation(&toy);
    let cp = write_checkpoint(&mut a.reg, &toy);
    let (_, during) = {
        let mut c = Registry::load(FED, Some(&b.reg.save().unwrap()), &[])
            .unwrap()
            .0;
        let (id, ch) = c
            .write(
                &b.node,
                crdt_registry::record::FunctionRecord::content_id(&crate::support::function(
                    &b.node, "during",
                )),
                Body::Function(crate::support::function(&b.node, "during")),
                4_000,
            )
            .unwrap();
        (id, c.gossip_for(&ch))
    };
    let messages = [a_gossip_of(&cp), during];
    let mut reference: Option<Vec<automerge::ChangeHash>> = None;
    for order in [[0, 1], [1, 0]] {
        let mut r = Registry::load(FED, Some(&b.reg.save().unwrap()), &[])
            .unwrap()
            .0;
        for i in order {
            if r.receive_gossip(&messages[i]).unwrap().checkpoint {
                assert_eq!(r.cross(&toy), Crossing::Crossed(1));
            }
        }
        assert_eq!(r.epoch(), 1);
        sync(&mut r, &mut a.reg, &toy);
        match &reference {
            None => reference = Some(r.heads()),
            Some(h) => assert_eq!(&r.heads(), h),
        }
        assert_eq!(r.heads(), a.reg.heads());
    }
}

#[derive(Debug, Clone)]
enum Step {
    /// Replica `who` writes a function (as its member).
    Register { who: usize, name: u8 },
    /// Replica `who` updates its member's endpoint: the old version is superseded.
    Endpoint { who: usize, tag: u8 },
    /// Replica `who` deletes the last function it wrote.
    Delete { who: usize },
    /// Gossip message `msg` (of those sent so far) reaches replica `to`.
    Deliver { msg: usize, to: usize },
    /// Replicas `a` and `b` run a sync session.
    Sync { a: usize, b: usize },
    /// Replica 0 writes the next checkpoint with the federation key (once it has crossed the
    /// last one) and crosses it.
    Checkpoint,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0usize..3, 0u8..8).prop_map(|(who, name)| Step::Register { who, name }),
        2 => (0usize..3, 0u8..4).prop_map(|(who, tag)| Step::Endpoint { who, tag }),
        1 => (0usize..3).prop_map(|who| Step::Delete { who }),
        4 => (0usize..64, 0usize..3).prop_map(|(msg, to)| Step::Deliver { msg, to }),
        2 => (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Sync { a, b }),
        1 => Just(Step::Checkpoint),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, .. Default::default() })]

    /// Three replicas write, gossip, sync and cross checkpoints (up to several epochs) in any
    /// interleaving. Once they have synced, they hold the same document, and their view is the
    /// one a replica that never checkpointed builds from every entry written.
    #[test]
    fn replicas_that_write_and_cross_in_any_interleaving_converge_on_the_same_view(
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let toy = Toy::new();
        let (a, b, setup) = busy_federation(&toy);
        let (c, c_own) = Member::new(&toy, 12, 22);
        let mut replicas = vec![a, b, c];
        for r in replicas.iter_mut() {
            r.reg.apply_changes(&setup).unwrap();
            r.reg.apply_changes(&c_own).unwrap();
        }
        // Every entry written, for the reference replica.
        let mut written: Vec<Vec<u8>> = Vec::new();
        let mut gossip: Vec<Vec<u8>> = Vec::new();
        let mut mine: Vec<Vec<String>> = vec![Vec::new(); 3];
        let mut epochs = 0;
        for (t, s) in steps.iter().enumerate() {
            let now = 10_000 + t as u64;
            match *s {
                Step::Register { who, name } => {
                    let (id, ch) = replicas[who].register(&format!("p{name}"), now);
                    mine[who].push(id);
                    written.push(first_entry(&ch).bytes().to_vec());
                    gossip.push(replicas[who].reg.gossip_for(&ch));
                }
                Step::Endpoint { who, tag } => {
                    let (_, ch) = replicas[who].endpoint("gpu", &format!("t{tag}"), now);
                    written.push(first_entry(&ch).bytes().to_vec());
                    gossip.push(replicas[who].reg.gossip_for(&ch));
                }
                Step::Delete { who } => {
                    if let Some(id) = mine[who].pop() {
                        let node = replicas[who].node.clone();
                        let (_, ch) = replicas[who]
                            .reg
                            .write(&node, id, Body::Deleted { of: crdt_registry::record::Kind::Function }, now)
                            .unwrap();
                        written.push(first_entry(&ch).bytes().to_vec());
                        gossip.push(replicas[who].reg.gossip_for(&ch));
                    }
                }
                Step::Deliver { msg, to } => {
                    if !gossip.is_empty() {
                        let m = &gossip[msg % gossip.len()];
                        if replicas[to].reg.receive_gossip(m).unwrap().checkpoint {
                            replicas[to].reg.cross(&toy);
                        }
                    }
                }
                Step::Sync { a, b } => {
                    if a != b {
                        let (x, y) = two(&mut replicas, a, b);
                        sync(&mut x.reg, &mut y.reg, &toy);
                    }
                }
                Step::Checkpoint => {
                    let r = &mut replicas[0].reg;
                    if let Ok((entry, ch)) = r.write_checkpoint(&toy.fed, &toy, now) {
                        epochs += 1;
                        written.push(entry.bytes().to_vec());
                        gossip.push(r.gossip_for(&ch));
                        proptest::prop_assert!(matches!(r.cross(&toy), Crossing::Crossed(_)));
                    }
                }
            }
        }
        for _ in 0..2 {
            for (a, b) in [(0, 1), (1, 2), (0, 2)] {
                let (x, y) = two(&mut replicas, a, b);
                sync(&mut x.reg, &mut y.reg, &toy);
            }
        }
        let mut reference = Registry::new(FED);
        reference.apply_changes(&setup).unwrap();
        reference.apply_changes(&c_own).unwrap();
        for e in &written {
            let _ = reference.insert_signed(e, 0);
        }
        let want = counted(&mut reference, &toy);
        let heads = replicas[0].reg.heads();
        for r in replicas.iter_mut() {
            proptest::prop_assert_eq!(r.reg.epoch(), epochs);
            proptest::prop_assert_eq!(r.reg.heads(), heads.clone());
            proptest::prop_assert_eq!(r.reg.refused_checkpoint(), None);
            proptest::prop_assert_eq!(&counted(&mut r.reg, &toy), &want);
        }
    }
}

/// Two distinct members of `v`, both mutable.
fn two(v: &mut [Member], a: usize, b: usize) -> (&mut Member, &mut Member) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = v.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}
