//! Benchmark: time from `funcmesh join` to being listed by every member of a 10-node local
//! testnet, and the idle memory and CPU of a node. Real processes on loopback.
//!
//! ```sh
//! cargo build -p node --bin funcmesh && \
//!   FUNCMESH_BIN=$CARGO_TARGET_DIR/debug/funcmesh cargo run -p node --example bench_join
//! ```

// A benchmark: a missing address is a broken setup, so stop loudly.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh::membership::Role;
use node::client::Client;
use node::local_testnet;
use node::{DataDir, ops};

const JOINS: usize = 5;
const IDLE_WINDOW: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = std::env::var("FUNCMESH_BIN").map_err(|_| anyhow::anyhow!("set FUNCMESH_BIN"))?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("net");
    let t0 = Instant::now();
    let net = local_testnet::up(
        &dir,
        2,
        5,
        Role::Endpoint,
        &node::ops::TestnetEndpoint::default(),
    )
    .await?;
    println!(
        "testnet of {} members + coordinator up and converged in {:?}",
        net.nodes.len(),
        t0.elapsed()
    );
    let inst = &net.institutions[0];
    let addr = net
        .coordinator
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .unwrap()
        .clone();
    let mut clients: Vec<Client> = Vec::new();
    for n in std::iter::once(&net.coordinator).chain(&net.nodes) {
        clients.push(Client::for_node(&DataDir::new(&n.data_dir))?);
    }
    let mut samples = Vec::new();
    let mut joined = Vec::new();
    for i in 0..JOINS {
        let invite = ops::invite_create(
            &inst.key,
            &inst.admission,
            Role::Endpoint,
            Duration::from_secs(600),
        )?;
        let ndir = DataDir::new(tmp.path().join(format!("new{i}")));
        ops::init(&ndir, None)?;
        let peer = mesh::keys::read_node_key(&ndir.node_key())?
            .public()
            .to_peer_id()
            .to_string();
        let log = std::fs::File::create(tmp.path().join(format!("new{i}.log")))?;
        let start = Instant::now();
        let child = Command::new(&bin)
            .args([
                "join",
                &addr,
                "--invite",
                &invite,
                "--data-dir",
                ndir.root().to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        loop {
            let mut all = true;
            for c in &clients {
                let listed = c
                    .peers()
                    .await
                    .map(|p| p.iter().any(|m| m.peer_id == peer))
                    .unwrap_or(false);
                if !listed {
                    all = false;
                    break;
                }
            }
            if all {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "join {i} did not converge"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = start.elapsed();
        println!(
            "join {i}: listed by all {} members after {:.0} ms",
            clients.len(),
            took.as_secs_f64() * 1e3
        );
        samples.push(took);
        joined.push(child);
    }
    samples.sort();
    println!(
        "join -> listed by every member: median {:.0} ms, min {:.0} ms, max {:.0} ms (n={JOINS})",
        samples[JOINS / 2].as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[JOINS - 1].as_secs_f64() * 1e3
    );

    // Idle: every process of the testnet, after the joins settled.
    let pids: Vec<u32> = std::iter::once(net.coordinator.pid)
        .chain(net.nodes.iter().map(|n| n.pid))
        .chain(joined.iter().map(|c| c.id()))
        .collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let ticks = 100.0; // USER_HZ on Linux
    let mut cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / ticks / IDLE_WINDOW.as_secs_f64() * 100.0)
        .collect();
    let mut rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    cpu.sort_by(f64::total_cmp);
    rss.sort();
    println!(
        "idle ({} nodes, {}s window): CPU median {:.2}% max {:.2}% of one core; RSS median {:.1} MiB max {:.1} MiB",
        pids.len(),
        IDLE_WINDOW.as_secs(),
        cpu[cpu.len() / 2],
        cpu[cpu.len() - 1],
        rss[rss.len() / 2] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );
    for mut c in joined {
        let _ = c.kill();
        let _ = c.wait();
    }
    local_testnet::down(&net).await;
    Ok(())
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state(0) … utime(11) stime(12).
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
