//! Acceptance 1: replicas that receive the same changes in any order, duplicated, in any batches,
//! end with identical typed views.

use crdt_registry::record::{Body, Kind};
use crdt_registry::{Registry, SyncState};
use proptest::prelude::*;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::support::{FED, Member, Toy};

#[derive(Debug, Clone)]
enum Op {
    Register {
        who: usize,
        name: u8,
    },
    Endpoint {
        who: usize,
        tag: u8,
    },
    DeleteLast {
        who: usize,
    },
    /// `to` learns everything `from` has: later writes of `to` depend on them.
    Merge {
        from: usize,
        to: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..5, 0u8..6).prop_map(|(who, name)| Op::Register { who, name }),
        (0usize..5, 0u8..4).prop_map(|(who, tag)| Op::Endpoint { who, tag }),
        (0usize..5).prop_map(|who| Op::DeleteLast { who }),
        (0usize..5, 0usize..5).prop_map(|(from, to)| Op::Merge { from, to }),
    ]
}

/// Runs the script on `writers` members (of two institutions) and returns every change made,
/// and how many of the first are the members' own records (made before the script runs).
fn run_script(toy: &Toy, writers: usize, ops: &[Op]) -> (usize, Vec<Vec<u8>>) {
    let mut members = Vec::new();
    let mut all = Vec::new();
    for i in 0..writers {
        let (m, changes) = Member::new(toy, 10 + (i % 2) as u8, 20 + i as u8);
        all.extend(changes);
        members.push((m, Vec::<String>::new()));
    }
    let setup = all.len();
    for (t, op) in ops.iter().enumerate() {
        let now = 100 + t as u64;
        match *op {
            Op::Register { who, name } => {
                let (m, mine) = &mut members[who % writers];
                let (id, c) = m.register(&format!("f{name}"), now);
                mine.push(id);
                all.push(c);
            }
            Op::Endpoint { who, tag } => {
                let (m, _) = &mut members[who % writers];
                let (_, c) = m.endpoint("main", &format!("t{tag}"), now);
                all.push(c);
            }
            Op::DeleteLast { who } => {
                let (m, mine) = &mut members[who % writers];
                if let Some(id) = mine.pop() {
                    let node = m.node.clone();
                    let (_, c) = m
                        .reg
                        .write(&node, id, Body::Deleted { of: Kind::Function }, now)
                        .unwrap();
                    all.push(c);
                }
            }
            Op::Merge { from, to } => {
                let (from, to) = (from % writers, to % writers);
                if from != to {
                    let changes = members[from].0.reg.all_changes();
                    members[to].0.reg.apply_changes(&changes).unwrap();
                }
            }
        }
    }
    (setup, all)
}

/// A replica's entries are read change by change as they arrive, and its view is kept up to date
/// entry by entry where it can be; a replica loaded from its saved document reads every key at
/// once and builds its view whole. Both must hold the same entries and view.
fn same_as_reloaded(reg: &mut Registry, toy: &Toy) -> Result<(), TestCaseError> {
    let (mut reloaded, skipped) = Registry::load(FED, Some(&reg.save().unwrap()), &[]).unwrap();
    prop_assert_eq!(skipped, 0);
    prop_assert_eq!(reloaded.len(), reg.len());
    prop_assert_eq!(reloaded.view(toy), reg.view(toy));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn a_view_kept_up_to_date_entry_by_entry_matches_one_built_whole(
        writers in 2usize..=4,
        ops in proptest::collection::vec(op(), 1..40),
        seed in any::<u64>(),
    ) {
        // The members first, so that most of what follows is placed in the view, not rebuilt:
        // updates arriving older after newer, endpoints, deletions, all one change at a time.
        let toy = Toy::new();
        let (setup, all) = run_script(&toy, writers, &ops);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut reg = Registry::new(FED);
        reg.apply_changes(&all[..setup]).unwrap();
        same_as_reloaded(&mut reg, &toy)?;
        let mut rest: Vec<&Vec<u8>> = all[setup..].iter().collect();
        rest.shuffle(&mut rng);
        for change in rest {
            reg.apply_changes(std::slice::from_ref(change)).unwrap();
            same_as_reloaded(&mut reg, &toy)?;
        }
    }

    #[test]
    fn replicas_converge_whatever_the_delivery_order(
        writers in 2usize..=4,
        ops in proptest::collection::vec(op(), 1..40),
        replicas in 3usize..=5,
        seed in any::<u64>(),
    ) {
        let toy = Toy::new();
        let (_, all) = run_script(&toy, writers, &ops);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut views = Vec::new();
        let mut heads = Vec::new();
        for _ in 0..replicas {
            // Every change at least once, some twice, shuffled, in random batches.
            let mut delivery: Vec<&Vec<u8>> = all.iter().collect();
            for _ in 0..rng.gen_range(0..=all.len()) {
                delivery.push(&all[rng.gen_range(0..all.len())]);
            }
            delivery.shuffle(&mut rng);
            let mut reg = Registry::new(FED);
            let mut rest = &delivery[..];
            while !rest.is_empty() {
                let n = rng.gen_range(1..=rest.len().min(5));
                let batch: Vec<Vec<u8>> = rest[..n].iter().map(|c| (*c).clone()).collect();
                reg.apply_changes(&batch).unwrap();
                rest = &rest[n..];
                // The view after every batch: each next one is placed in it, or rebuilds it.
                same_as_reloaded(&mut reg, &toy)?;
            }
            same_as_reloaded(&mut reg, &toy)?;
            let mut h = reg.heads();
            h.sort();
            heads.push(h);
            views.push(reg.view(&toy).clone());
        }
        for (v, h) in views.iter().zip(&heads).skip(1) {
            prop_assert_eq!(v, &views[0]);
            prop_assert_eq!(h, &heads[0]);
        }
        // Nothing honest was ignored, and every writer's node is listed.
        prop_assert!(views[0].ignored.is_empty(), "{:?}", views[0].ignored);
        prop_assert_eq!(views[0].nodes.len(), writers);
    }

    #[test]
    fn pairwise_sync_reaches_the_same_view_as_delivery(
        writers in 2usize..=4,
        ops in proptest::collection::vec(op(), 1..30),
        seed in any::<u64>(),
    ) {
        let toy = Toy::new();
        let (_, all) = run_script(&toy, writers, &ops);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Two replicas each hold a random half; they sync pairwise until quiet.
        let mut a = Registry::new(FED);
        let mut b = Registry::new(FED);
        let mut full = Registry::new(FED);
        full.apply_changes(&all).unwrap();
        for c in &all {
            let target = if rng.gen_bool(0.5) { &mut a } else { &mut b };
            target.apply_changes(std::slice::from_ref(c)).unwrap();
        }
        let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
        let mut quiet = false;
        for _ in 0..50 {
            let m1 = a.generate_sync(&mut sa);
            if let Some(m) = &m1 {
                b.receive_sync(&mut sb, m).unwrap();
                same_as_reloaded(&mut b, &toy)?;
            }
            let m2 = b.generate_sync(&mut sb);
            if let Some(m) = &m2 {
                a.receive_sync(&mut sa, m).unwrap();
            }
            if m1.is_none() && m2.is_none() {
                if a.heads() == b.heads() && !a.has_missing_deps() && !b.has_missing_deps() {
                    quiet = true;
                    break;
                }
                // A session can stall when one side holds changes it cannot apply yet; the
                // mesh starts a new session (anti-entropy), which this mirrors.
                sa.reset();
                sb.reset();
            }
        }
        prop_assert!(quiet, "the sync session never went quiet");
        same_as_reloaded(&mut a, &toy)?;
        same_as_reloaded(&mut b, &toy)?;
        prop_assert_eq!(a.view(&toy).clone(), full.view(&toy).clone());
        prop_assert_eq!(b.view(&toy).clone(), full.view(&toy).clone());
    }
}

#[test]
fn an_update_by_the_owner_wins_and_a_deletion_removes() {
    let toy = Toy::new();
    let (mut m, _) = Member::new(&toy, 1, 2);
    let (ep, _) = m.endpoint("main", "old", 10);
    m.endpoint("main", "new", 11);
    let (f, _) = m.register("f", 12);
    assert_eq!(
        m.reg.view(&toy).endpoints[&ep].record.capabilities.tags["tag"],
        "new"
    );
    assert!(m.reg.view(&toy).functions.contains_key(&f));
    // The view is what the API serves: it must survive JSON both ways.
    let view = m.reg.view(&toy).clone();
    let json = serde_json::to_string(&view).unwrap();
    assert_eq!(
        serde_json::from_str::<crdt_registry::View>(&json).unwrap(),
        view
    );
    let node = m.node.clone();
    m.reg
        .write(&node, f.clone(), Body::Deleted { of: Kind::Function }, 13)
        .unwrap();
    assert!(!m.reg.view(&toy).functions.contains_key(&f));
}

#[test]
fn concurrent_updates_of_one_record_resolve_the_same_everywhere() {
    let toy = Toy::new();
    let (mut a, base) = Member::new(&toy, 1, 2);
    let mut b = Registry::new(FED);
    b.apply_changes(&base).unwrap();
    // The same node key writing from two replicas (a restored backup, say): same seq, so the
    // tie is broken by time, then by entry key.
    let (ep, c1) = a.endpoint("main", "one", 50);
    let rec = crate::support::endpoint(&a.node, "main", "two");
    let (_, c2) = b
        .write(&a.node, ep.clone(), Body::Endpoint(rec), 50)
        .unwrap();
    // Each view built before the other's update arrives, so that the update is placed in it
    // (ranked against the winner) rather than the view rebuilt.
    let (one, two) = (a.reg.view(&toy).clone(), b.view(&toy).clone());
    assert_eq!(one.endpoints[&ep].record.capabilities.tags["tag"], "one");
    assert_eq!(two.endpoints[&ep].record.capabilities.tags["tag"], "two");
    a.reg.apply_changes(&[c2]).unwrap();
    b.apply_changes(&[c1]).unwrap();
    assert_eq!(a.reg.view(&toy), b.view(&toy));
    assert_eq!(a.reg.view(&toy).endpoints.len(), 1);
    let (mut whole, _) = Registry::load(FED, Some(&b.save().unwrap()), &[]).unwrap();
    assert_eq!(whole.view(&toy), b.view(&toy));
}

#[test]
fn save_load_and_compaction_keep_the_view() {
    let toy = Toy::new();
    let (mut m, mut changes) = Member::new(&toy, 1, 2);
    for i in 0..20 {
        changes.push(m.register(&format!("f{i}"), 10 + i).1);
    }
    // Incremental persistence: the changes alone.
    let (mut from_changes, skipped) = Registry::load(FED, None, &changes).unwrap();
    assert_eq!(skipped, 0);
    // Compacted: one snapshot.
    let snapshot = m.reg.save().unwrap();
    let (mut from_snapshot, _) = Registry::load(FED, Some(&snapshot), &[]).unwrap();
    // Both, overlapping.
    let (mut both, _) = Registry::load(FED, Some(&snapshot), &changes[5..]).unwrap();
    let want = m.reg.view(&toy).clone();
    assert_eq!(want.functions.len(), 20);
    assert_eq!(from_changes.view(&toy), &want);
    assert_eq!(from_snapshot.view(&toy), &want);
    assert_eq!(both.view(&toy), &want);
    // A loaded replica keeps writing without clashing with its old self.
    let (_, c) = from_snapshot
        .write(
            &m.node.clone(),
            "x".into(),
            Body::Deleted { of: Kind::Flow },
            99,
        )
        .unwrap();
    m.reg.apply_changes(&[c]).unwrap();
}

#[test]
fn a_replica_reloaded_from_a_compacted_document_writes_changes_peers_accept() {
    let toy = Toy::new();
    let (mut m, mut changes) = Member::new(&toy, 1, 2);
    for i in 0..5 {
        changes.push(m.register(&format!("f{i}"), 10 + i).1);
    }
    let snapshot = m.reg.save().unwrap();
    let (mut reloaded, _) = Registry::load(FED, Some(&snapshot), &[]).unwrap();
    let node = m.node.clone();
    let rec = crate::support::function(&node, "after-reload");
    let (_, c) = reloaded
        .write(&node, rec.content_id(), Body::Function(rec), 99)
        .unwrap();
    let mut peer = Registry::new(FED);
    peer.apply_changes(&changes).unwrap();
    peer.apply_changes(&[c]).unwrap();
    assert_eq!(peer.view(&toy).functions.len(), 6);
}

#[test]
fn a_replica_far_behind_catches_up_in_bounded_batches() {
    let toy = Toy::new();
    let (mut m, mut all) = Member::new(&toy, 10, 20);
    for i in 0..400u64 {
        all.push(m.register(&format!("fn-{i}"), 100 + i).1);
    }
    let mut a = Registry::new(FED);
    a.apply_changes(&all).unwrap();
    let total: usize = all.iter().map(Vec::len).sum();
    let budget = total / 10;
    let mut b = Registry::new(FED);
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    let mut rounds = 0;
    let mut largest = 0;
    for _ in 0..200 {
        let m1 = a.generate_sync_within(&mut sa, budget);
        if let Some(m) = &m1 {
            largest = largest.max(m.len());
            rounds += 1;
            b.receive_sync(&mut sb, m).unwrap();
        }
        let m2 = b.generate_sync_within(&mut sb, budget);
        if let Some(m) = &m2 {
            a.receive_sync(&mut sa, m).unwrap();
        }
        if m1.is_none() && m2.is_none() {
            break;
        }
    }
    assert_eq!(
        b.heads(),
        a.heads(),
        "b did not catch up in {rounds} rounds"
    );
    assert_eq!(b.view(&toy).clone(), a.view(&toy).clone());
    // Every message stayed near the budget (one change over it at most), over several rounds.
    let biggest_change = all.iter().map(Vec::len).max().unwrap();
    assert!(
        largest <= budget + biggest_change + 4096,
        "{largest} > {budget}"
    );
    assert!(rounds >= 10, "{rounds} rounds for 10 budgets' worth");
}

/// Two replicas that hold the same wide history — forty members that each wrote their
/// institution and node entries before they had synced anything, then a chain of writes on top of
/// all of them, as a federation's first minutes leave it — agree in one exchange and send each
/// other nothing. Automerge 0.7.0 cached vector clocks that missed part of such a history (the
/// cache walk dropped the parents of the node where it stopped), so a replica believed its peer
/// lacked old changes and sent them again in every round of every session, forever: the sync
/// storm seen at rest in federations of 40–100 members.
#[test]
fn replicas_with_the_same_wide_history_agree_without_sending_anything() {
    let toy = Toy::new();
    let mut all = Vec::new();
    let mut members = Vec::new();
    for i in 0..40u8 {
        let (m, changes) = Member::new(&toy, i + 1, i + 101);
        all.extend(changes);
        members.push(m);
    }
    let mut a = Registry::new(FED);
    a.apply_changes(&all).unwrap();
    let mut writer = members.swap_remove(0);
    writer.reg.apply_changes(&all).unwrap();
    for i in 0..40u64 {
        all.push(writer.register(&format!("fn-{i}"), 1_000 + i).1);
    }
    a.apply_changes(&all).unwrap();
    // The other replica learns the same changes in another order: the members' last first.
    let mut b = Registry::new(FED);
    for pair in all[..80].chunks(2).rev() {
        b.apply_changes(pair).unwrap();
    }
    b.apply_changes(&all[80..]).unwrap();
    assert_eq!(a.heads(), b.heads());

    // A first session finds they share everything; a second starts from those shared heads, as
    // the mesh's anti-entropy does every few seconds.
    let (mut sa, mut sb) = (SyncState::new(), SyncState::new());
    for session in 1..=2 {
        sa.reset();
        sb.reset();
        let (mut rounds, mut carried) = (0, 0);
        loop {
            let m1 = a.generate_sync(&mut sa);
            if let Some(m) = &m1 {
                carried += b.receive_sync(&mut sb, m).unwrap().received;
            }
            let m2 = b.generate_sync(&mut sb);
            if let Some(m) = &m2 {
                carried += a.receive_sync(&mut sa, m).unwrap().received;
            }
            if m1.is_none() && m2.is_none() {
                break;
            }
            rounds += 1;
            assert!(
                rounds < 20,
                "session {session} did not end: {carried} changes sent between replicas that \
                 hold the same"
            );
        }
        assert_eq!(
            carried, 0,
            "session {session}: changes sent between replicas that hold the same"
        );
    }
}
