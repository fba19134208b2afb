//! What a registry of many functions costs a member:
//!
//! * memory: the live heap, counted by the allocator, of a registry of 10,000 functions (or the
//!   number given) loaded from its saved document, split into the Automerge document, the
//!   registry around it (decoded entries) and the typed view;
//! * time: what one more function, arriving by gossip from another member, costs to apply and
//!   to rebuild the view for;
//! * a checkpoint: the time to derive its base and cross, and the memory of the same registry
//!   loaded from the checkpointed document (one actor for the base instead of one per entry).
//!
//! ```sh
//! cargo run --release -p crdt-registry --example registry_cost [-- FUNCTIONS]
//! ```
//!
//! The bytes are the allocator's live bytes, not RSS: what each part holds, without the
//! allocator's own slack. `node`'s `bench_registry document` measures RSS in a fresh process.

// A benchmark: a broken setup should stop loudly.
#![allow(clippy::unwrap_used)]
// The counting allocator below forwards to the system allocator: the only unsafe code here.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crdt_registry::record::{Body, FunctionKind, FunctionRecord, FunctionSpec, NodeRecord};
use crdt_registry::{Authority, InstitutionFacts, Key, NodeFacts, Registry};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter only adds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Functions added one by one for the per-change cost.
const ROUNDS: usize = 100;

/// Admits every node: the probe measures memory, not proofs.
struct Everyone;

/// The federation key the probe's checkpoint is signed with.
fn federation_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

impl Authority for Everyone {
    fn federation_key(&self) -> Key {
        Key::of(&federation_key())
    }
    fn admission(&self, _: &str) -> Result<InstitutionFacts, String> {
        Err("no institutions here".into())
    }
    fn membership(&self, _: &str, key: &Key) -> Result<NodeFacts, String> {
        Ok(NodeFacts {
            peer_id: format!("peer-{key}"),
            institution: Some(("uni-a".into(), Key([1; 32]))),
            role: "endpoint".into(),
            invite: None,
        })
    }
}

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn per_function(bytes: usize, functions: usize) -> String {
    format!(
        "{:7.2} MiB ({:5} B per function)",
        bytes as f64 / 1048576.0,
        bytes / functions
    )
}

fn function(owner: Key, i: usize) -> FunctionRecord {
    FunctionRecord {
        name: format!("f{i}"),
        owner,
        kind: FunctionKind::Python,
        spec: FunctionSpec::PythonSource {
            source: format!("def f{i}(x):\n    return x + {i}\n"),
            entrypoint: format!("f{i}"),
        },
        container: None,
        description: format!("function number {i}"),
        created_ms: 1_000 + i as u64,
    }
}

/// Writes function number `i`, owned by `signer`.
fn register(
    reg: &mut Registry,
    signer: &ed25519_dalek::SigningKey,
    i: usize,
) -> (crdt_registry::Entry, Vec<u8>) {
    let rec = function(Key::of(signer), i);
    reg.write(
        signer,
        rec.content_id(),
        Body::Function(rec),
        1_000 + i as u64,
    )
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
}

fn main() {
    let functions: usize = std::env::args().nth(1).map_or(10_000, |a| {
        a.parse().expect("usage: registry_cost [FUNCTIONS]")
    });
    let signer = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let me = Key::of(&signer);
    let fed = "a-federation-id-of-typical-length-0123456789";
    let mut reg = Registry::new(fed);
    reg.write(
        &signer,
        me.to_string(),
        Body::Node(NodeRecord {
            name: "n".into(),
            proof: "{}".into(),
            addrs: vec![],
            data_addr: None,
        }),
        1,
    )
    .unwrap();
    let mut entry_bytes = 0;
    for i in 0..functions {
        let (entry, _) = register(&mut reg, &signer, i);
        entry_bytes += entry.bytes().len();
    }
    let snapshot = reg.save().unwrap();
    drop(reg);
    println!(
        "{functions} functions: entries {} in all, saved document {}",
        per_function(entry_bytes, functions),
        per_function(snapshot.len(), functions)
    );

    let base = live();
    let doc = automerge::Automerge::load(&snapshot).unwrap();
    let doc_only = live() - base;
    drop(doc);

    let base = live();
    let (mut reg, skipped) = Registry::load(fed, Some(&snapshot), &[]).unwrap();
    assert_eq!(skipped, 0);
    let loaded = live() - base;
    let n = reg.view(&Everyone).functions.len();
    assert_eq!(n, functions);
    let with_view = live() - base;
    println!(
        "Automerge document alone   {}",
        per_function(doc_only, functions)
    );
    println!(
        "registry around it         {}",
        per_function(loaded.saturating_sub(doc_only), functions)
    );
    println!(
        "typed view                 {}",
        per_function(with_view - loaded, functions)
    );
    println!(
        "registry with its view     {}",
        per_function(with_view, functions)
    );

    // One more function at a time, written by another member and gossiped here.
    let (mut peer, _) = Registry::load(fed, Some(&snapshot), &[]).unwrap();
    let (mut apply, mut view) = (Vec::new(), Vec::new());
    for i in functions..functions + ROUNDS {
        let (_, change) = register(&mut peer, &signer, i);
        let gossip = peer.gossip_for(&change);
        let t = Instant::now();
        assert_eq!(reg.receive_gossip(&gossip).unwrap().new_entries, 1);
        apply.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(reg.view(&Everyone).functions.len(), i + 1);
        view.push(t.elapsed());
    }
    apply.sort();
    view.sort();
    println!(
        "one more function, n={ROUNDS}: apply p50 {:.2} ms p99 {:.2} ms; view rebuild p50 {:.2} ms p99 {:.2} ms",
        percentile(&apply, 0.5),
        percentile(&apply, 0.99),
        percentile(&view, 0.5),
        percentile(&view, 0.99)
    );

    // A checkpoint of the same registry: cross it on a copy, then load what it saved.
    let (mut cp, _) = Registry::load(fed, Some(&snapshot), &[]).unwrap();
    cp.view(&Everyone);
    let t = Instant::now();
    cp.write_checkpoint(&federation_key(), &Everyone, 5_000)
        .unwrap();
    let write_ms = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    assert_eq!(cp.cross(&Everyone), crdt_registry::Crossing::Crossed(1));
    let cross_ms = t.elapsed().as_secs_f64() * 1000.0;
    let checkpointed = cp.save().unwrap();
    drop(cp);
    let base = live();
    let doc = automerge::Automerge::load(&checkpointed).unwrap();
    let doc_only = live() - base;
    drop(doc);
    let base = live();
    let (mut reg, _) = Registry::load(fed, Some(&checkpointed), &[]).unwrap();
    assert_eq!(reg.view(&Everyone).functions.len(), functions);
    let with_view = live() - base;
    println!(
        "checkpoint: written in {write_ms:.0} ms, crossed in {cross_ms:.0} ms; saved document {}",
        per_function(checkpointed.len(), functions)
    );
    println!(
        "after it: Automerge document {}",
        per_function(doc_only, functions)
    );
    println!(
        "after it: registry with its view {}",
        per_function(with_view, functions)
    );
}
