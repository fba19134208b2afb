//! Registry benchmarks.
//!
//! * `propagation`: time for a function registered on one node to be listed by every node of a
//!   20-node local testnet (4 institutions x 5 endpoint nodes, plus the coordinator; real
//!   processes on loopback), over repeated registrations.
//! * `document`: a registry of 10,000 functions: stored size, load time and memory, before and
//!   after compaction, and the time to build the typed view.
//!
//! ```sh
//! cargo build --release -p node --bin funcmesh --example bench_registry && \
//!   FUNCMESH_BIN=$CARGO_TARGET_DIR/release/funcmesh \
//!   $CARGO_TARGET_DIR/release/examples/bench_registry propagation
//! $CARGO_TARGET_DIR/release/examples/bench_registry document
//! ```

// A benchmark: a broken setup should stop loudly.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crdt_registry::record::Body;
use crdt_registry::{Key, Registry};
use mesh::membership::{Admission, Genesis, Invite, Proof, Receipt, Role, SigningKey, unix_now};
use mesh::registry::MeshAuthority;
use node::client::Client;
use node::local_testnet;
use node::{DataDir, registry::NewFunction};

const REGISTRATIONS: usize = 100;
const FUNCTIONS: usize = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("propagation") => propagation().await,
        Some("document") => document(),
        Some("load") => {
            let a: Vec<String> = std::env::args().collect();
            load(std::path::Path::new(&a[2]), &a[3])
        }
        _ => anyhow::bail!("usage: bench_registry propagation|document"),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn propagation() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("net");
    let t0 = Instant::now();
    let net = local_testnet::up(
        &dir,
        4,
        5,
        Role::Endpoint,
        &node::ops::TestnetEndpoint::default(),
    )
    .await?;
    println!(
        "testnet of {} endpoint nodes + coordinator up in {:?}",
        net.nodes.len(),
        t0.elapsed()
    );
    let mut clients = Vec::new();
    for n in std::iter::once(&net.coordinator).chain(&net.nodes) {
        clients.push(Client::for_node(&DataDir::new(&n.data_dir))?);
    }
    let writer = clients[1].clone();
    let mut samples = Vec::new();
    for i in 0..REGISTRATIONS {
        let f = NewFunction {
            name: format!("bench-{i}"),
            python: None,
            entrypoint: None,
            payload: None,
            shell: Some(format!("echo {i} {{x}}")),
            container: None,
            description: String::new(),
        };
        let started = Instant::now();
        let id = writer.register_function(&f).await?.id;
        // Every node polled concurrently; the sample is when the last one lists it.
        let mut waits = Vec::new();
        for c in &clients {
            let c = c.clone();
            let id = id.clone();
            waits.push(tokio::spawn(async move {
                loop {
                    if c.function(&id).await.is_ok() {
                        return started.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        let mut last = Duration::ZERO;
        for w in waits {
            last = last.max(tokio::time::timeout(Duration::from_secs(30), w).await??);
        }
        samples.push(last.as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "function reaching all {} nodes, n={REGISTRATIONS}: median {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        clients.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[0],
        samples[samples.len() - 1]
    );
    local_testnet::down(&net).await;
    Ok(())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn load(dir: &std::path::Path, which: &str) -> anyhow::Result<()> {
    let genesis: Genesis = serde_json::from_slice(&std::fs::read(dir.join("genesis.json"))?)?;
    let federation = genesis.verify()?;
    let authority = MeshAuthority::new(federation.clone());
    let (snapshot, changes) = if which == "after" {
        (Some(std::fs::read(dir.join("doc"))?), Vec::new())
    } else {
        let framed = std::fs::read(dir.join("changes"))?;
        let mut changes = Vec::new();
        let mut rest = &framed[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes(rest[..4].try_into()?) as usize;
            changes.push(rest[4..4 + n].to_vec());
            rest = &rest[4 + n..];
        }
        (None, changes)
    };
    let rss0 = rss_kib();
    let t = Instant::now();
    let (mut loaded, skipped) = Registry::load(&federation.id.0, snapshot.as_deref(), &changes)?;
    let load = t.elapsed();
    let t = Instant::now();
    let n = loaded.view(&authority).functions.len();
    let view = t.elapsed();
    let rss1 = rss_kib();
    assert_eq!((n, skipped), (FUNCTIONS, 0));
    println!(
        "load {which} compaction: {load:?} (+ {view:?} for the typed view); RSS {:.1} MiB, of which the registry {:.1} MiB",
        rss1 as f64 / 1024.0,
        rss1.saturating_sub(rss0) as f64 / 1024.0
    );
    Ok(())
}

fn document() -> anyhow::Result<()> {
    // A real membership chain, so that the view checks real proofs.
    let now = unix_now();
    let fed_key = SigningKey::generate();
    let federation = Genesis::create("bench", &fed_key, now).verify()?;
    let inst = SigningKey::generate();
    let admission = Admission::issue(&federation, &fed_key, "uni-a", inst.public(), now);
    let invite = Invite::issue(
        &admission,
        &inst,
        Role::Endpoint,
        Duration::from_secs(600),
        now,
    )?;
    let keypair = mesh::Keypair::generate_ed25519();
    let (_, joining) = Proof::bind(&invite, &keypair, now)?;
    let coordinator = mesh::Keypair::generate_ed25519();
    let cert = Proof::coordinator(
        &federation,
        &fed_key,
        coordinator.public().to_peer_id(),
        now,
    );
    let admitted = joining.verify_joining(&federation, &keypair.public().to_peer_id(), now)?;
    let receipt = Receipt::issue(&cert, &coordinator, &admitted, now).expect("a coordinator");
    let proof = joining.with_receipt(receipt);
    let signer = mesh::registry::signing_key(&keypair).unwrap();
    let me = Key::of(&signer);
    let authority = MeshAuthority::new(federation.clone());
    let fed = federation.id.0.clone();

    let mut reg = Registry::new(&fed);
    let mut changes = Vec::new();
    let (_, c) = reg.write(
        &signer,
        me.to_string(),
        Body::Node(crdt_registry::record::NodeRecord {
            name: "n".into(),
            proof: String::from_utf8(proof.to_bytes())?,
            addrs: vec![],
            data_addr: None,
        }),
        1,
    )?;
    changes.push(c);
    let t = Instant::now();
    for i in 0..FUNCTIONS {
        let f = NewFunction {
            name: format!("f{i}"),
            python: Some(format!("def f{i}(x):\n    return x + {i}\n")),
            entrypoint: Some(format!("f{i}")),
            payload: None,
            shell: None,
            container: None,
            description: format!("function number {i}"),
        };
        let rec = f.record(me, 1_000 + i as u64)?;
        let (_, c) = reg.write(
            &signer,
            rec.content_id(),
            Body::Function(rec),
            1_000 + i as u64,
        )?;
        changes.push(c);
    }
    println!(
        "{FUNCTIONS} registrations, one change each: {:?} ({:.0} µs each)",
        t.elapsed(),
        t.elapsed().as_secs_f64() * 1e6 / FUNCTIONS as f64
    );
    let t = Instant::now();
    let view_functions = reg.view(&authority).functions.len();
    println!(
        "typed view, first build: {:?} ({view_functions} functions)",
        t.elapsed()
    );
    assert_eq!(view_functions, FUNCTIONS);

    let uncompacted: usize = changes.iter().map(Vec::len).sum();
    let t = Instant::now();
    let snapshot = reg.save()?;
    let save_time = t.elapsed();
    println!(
        "stored size: before compaction {:.2} MiB ({} change records); after {:.2} MiB (one document, saved in {:?})",
        uncompacted as f64 / 1048576.0,
        changes.len(),
        snapshot.len() as f64 / 1048576.0,
        save_time
    );
    drop(reg);

    // Each load in a fresh process, so that its memory is its own.
    let tmp = tempfile::tempdir()?;
    std::fs::write(
        tmp.path().join("genesis.json"),
        serde_json::to_vec(&federation.genesis)?,
    )?;
    std::fs::write(tmp.path().join("doc"), &snapshot)?;
    let mut framed = Vec::new();
    for c in &changes {
        framed.extend_from_slice(&(c.len() as u32).to_be_bytes());
        framed.extend_from_slice(c);
    }
    std::fs::write(tmp.path().join("changes"), framed)?;
    let me_exe = std::env::current_exe()?;
    for which in ["before", "after"] {
        let out = std::process::Command::new(&me_exe)
            .args(["load", tmp.path().to_str().unwrap(), which])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
