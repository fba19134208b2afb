//! Task benchmarks, on a local multi-process testnet (real processes, loopback).
//!
//! * `noop`: two endpoint nodes of one institution; the client submits through a1's API and the
//!   tasks run on a2's endpoint (two warm host workers). Round trip of one no-op Python task
//!   (p50, p99, mean over `M` samples after a warm-up, and the CPU each round trip cost every
//!   process), then throughput: `N` tasks in batches of `B`, `C` batches in flight, from one
//!   client, with its CPU per task. Prints one JSON line, in the format of
//!   `bench/competitors/noop.py`, so that `bench/run.sh` puts it beside Dask, Parsl and Ray.
//! * `routing`: the warming-aware routing experiment of the funcX paper: `N` tasks (3,000) of
//!   four functions, each in its own container image, over three endpoints of two workers each,
//!   submitted as a stream (`C` tasks in flight); `warm-aware` against `random`. Prints the
//!   completion time of each and the reduction.
//! * `coldstart`: each environment's cold start: an endpoint with the `cold` strategy (a fresh
//!   worker per task) runs `K` no-op tasks on the host and `K` in a container; the cold start is
//!   the time from the task waiting for its worker to the worker running it (task timestamps).
//!
//! ```sh
//! cargo build --release -p node --bin funcmesh --example bench_tasks && \
//!   FUNCMESH_BIN=$CARGO_TARGET_DIR/release/funcmesh \
//!   $CARGO_TARGET_DIR/release/examples/bench_tasks noop
//! ```

// A benchmark: a broken setup should stop loudly.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use mesh::membership::Role;
use node::client::Client;
use node::local_testnet;
use node::tasks::NewTask;
use node::{DataDir, registry::NewFunction};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("noop") => noop(false).await,
        Some("noop-cap") => noop(true).await,
        Some("routing") => routing().await,
        Some("coldstart") => coldstart().await,
        _ => anyhow::bail!("usage: bench_tasks noop|noop-cap|routing|coldstart"),
    }
}

/// CPU time (user + system) so far of process `pid` and of its live child processes (an
/// endpoint's workers), microseconds, from `/proc`.
fn cpu_us(pid: u32) -> (u64, u64) {
    let tick_us = 1_000_000 / clock_ticks();
    let stat = |path: &std::path::Path| -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(path).ok()?;
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((ppid, ticks * tick_us))
    };
    let own = stat(&std::path::PathBuf::from(format!("/proc/{pid}/stat"))).map_or(0, |s| s.1);
    let mut children = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some((ppid, us)) = stat(&e.path().join("stat")) {
                if ppid == pid {
                    children += us;
                }
            }
        }
    }
    (own, children)
}

/// CPU time so far of the processes a task crosses: the submitting node, the endpoint's node and
/// its workers, and this client.
struct CpuSnapshot {
    submitter: (u64, u64),
    endpoint: (u64, u64),
    client: (u64, u64),
}

impl CpuSnapshot {
    fn take(submitter_pid: u32, endpoint_pid: u32) -> CpuSnapshot {
        CpuSnapshot {
            submitter: cpu_us(submitter_pid),
            endpoint: cpu_us(endpoint_pid),
            client: cpu_us(std::process::id()),
        }
    }

    /// Microseconds of CPU per task since `before`, over `tasks` tasks, per process.
    fn per_task_since(&self, before: &CpuSnapshot, tasks: usize) -> serde_json::Value {
        let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / tasks as f64;
        json!({
            "submitter_node": per(self.submitter.0, before.submitter.0),
            "endpoint_node": per(self.endpoint.0, before.endpoint.0),
            "endpoint_workers": per(self.endpoint.1, before.endpoint.1),
            "client": per(self.client.0, before.client.0),
        })
    }
}

fn clock_ticks() -> u64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (sorted.len() as f64 - 1.0) * p;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn task(function: &str, i: usize, endpoint: Option<&str>, strategy: &str) -> NewTask {
    NewTask {
        function: function.into(),
        args: json!([i]),
        endpoint: endpoint.map(str::to_owned),
        strategy: Some(strategy.into()),
        ..Default::default()
    }
}

async fn register(
    client: &Client,
    name: &str,
    container: Option<String>,
) -> anyhow::Result<String> {
    let f = NewFunction {
        name: name.into(),
        python: Some(format!("def {name}(x):\n    return None\n")),
        entrypoint: Some(name.into()),
        payload: None,
        shell: None,
        container,
        description: "no-op".into(),
    };
    Ok(client.register_function(&f).await?.id)
}

/// Submits until the endpoint is routable (adverts take a moment after start).
async fn until_routable(client: &Client, t: NewTask) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = client
            .submit_tasks(vec![t.clone()], Duration::from_secs(60))
            .await?;
        let ok = list.tasks[0]
            .task
            .as_ref()
            .is_some_and(|t| t.status.is_terminal());
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not routable: {:?}",
            list.tasks[0].error
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The no-op round trip and throughput. `cap`: across institutions, each task carrying a
/// capability token that the endpoint verifies (b1 → a1, instead of a1 → a2).
async fn noop(cap: bool) -> anyhow::Result<()> {
    let samples = env_usize("M", 500);
    // 100,000 tasks: about 4–5 s here, as long as the competitors' throughput runs (5,000 tasks
    // at about 1,000 per second). A one-second run (20,000) mostly measures the VM's hiccups,
    // and the pipeline filling and draining.
    let n = env_usize("N", 100_000);
    let batch = env_usize("B", 1000);
    let in_flight = env_usize("C", 4);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("net");
    let started = Instant::now();
    let (institutions, per) = if cap { (2, 1) } else { (1, 2) };
    let net = local_testnet::up(
        &dir,
        institutions,
        per,
        Role::Endpoint,
        &node::ops::TestnetEndpoint::default(),
    )
    .await?;
    // The submitting node, and the endpoint it runs on.
    let (submitter, target) = if cap { (1, "a1") } else { (0, "a2") };
    let a1 = Client::for_node(&DataDir::new(&net.nodes[submitter].data_dir))?;
    register(&a1, "noop", None).await?;
    if cap {
        let endpoint = a1.endpoint(target).await?.id;
        let (_, seed, _) = node::capabilities::institution_key(&net.institutions[0].key)?;
        let (_, _, b) = node::capabilities::institution_key(&net.institutions[1].key)?;
        let token = node::capabilities::grant(
            &seed,
            &capability::Grant {
                paths: vec![],
                to: b,
                endpoint,
                functions: vec![],
                abilities: vec![],
                expires: compute::task::now_us() / 1_000_000 + 3600,
                not_before: None,
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while a1.add_capability(&token).await?.status != "usable" {
            anyhow::ensure!(Instant::now() < deadline, "the token never became usable");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    until_routable(&a1, task("noop", 0, Some(target), "warm-aware")).await?;
    let startup_s = started.elapsed().as_secs_f64();

    // Warm-up: both workers of a2 started, code paths hot.
    for i in 0..50 {
        a1.submit_tasks(
            vec![task("noop", i, Some(target), "warm-aware")],
            Duration::from_secs(10),
        )
        .await?;
    }
    a1.submit_tasks(
        (0..1000)
            .map(|i| task("noop", i, Some(target), "warm-aware"))
            .collect(),
        Duration::from_secs(60),
    )
    .await?;

    // CPU per task of the round trips (one task at a time): nothing is amortised over a batch.
    let endpoint_node = net
        .nodes
        .iter()
        .find(|n| n.name == target)
        .map(|n| n.pid)
        .ok_or_else(|| anyhow::anyhow!("no node {target}"))?;
    let submitter_pid = net.nodes[submitter].pid;
    let lat_cpu_before = CpuSnapshot::take(submitter_pid, endpoint_node);
    let mut lat = Vec::with_capacity(samples);
    let mut endpoint_ms = Vec::with_capacity(samples);
    // Where the time goes, from the task's own timestamps (one clock: same machine).
    let (mut to_submitter, mut to_endpoint, mut back) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let sent_us = compute::task::now_us();
        let t0 = Instant::now();
        let list = a1
            .submit_tasks(
                vec![task("noop", i, Some(target), "warm-aware")],
                Duration::from_secs(10),
            )
            .await?;
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t = list.tasks[0].task.as_ref().unwrap();
        anyhow::ensure!(t.status == compute::Status::Succeeded, "task failed: {t:?}");
        endpoint_ms.push(t.times.finished_us.saturating_sub(t.times.received_us) as f64 / 1000.0);
        let done_us = compute::task::now_us();
        to_submitter.push(t.times.submitted_us.saturating_sub(sent_us) as f64 / 1000.0);
        to_endpoint.push(t.times.received_us.saturating_sub(t.times.submitted_us) as f64 / 1000.0);
        back.push(done_us.saturating_sub(t.times.finished_us) as f64 / 1000.0);
    }
    let latency_cpu =
        CpuSnapshot::take(submitter_pid, endpoint_node).per_task_since(&lat_cpu_before, samples);
    for v in [&mut to_submitter, &mut to_endpoint, &mut back] {
        v.sort_by(f64::total_cmp);
    }
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    lat.sort_by(f64::total_cmp);
    endpoint_ms.sort_by(f64::total_cmp);

    // CPU per task during the throughput run: the submitting node, the endpoint's node, its
    // workers, and this client.
    let cpu_before = CpuSnapshot::take(submitter_pid, endpoint_node);
    let t0 = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut joins = tokio::task::JoinSet::new();
    for start in (0..n).step_by(batch) {
        let permit = sem.clone().acquire_owned().await?;
        let client = a1.clone();
        let tasks: Vec<NewTask> = (start..(start + batch).min(n))
            .map(|i| task("noop", i, Some(target), "warm-aware"))
            .collect();
        joins.spawn(async move {
            let list = client.submit_tasks(tasks, Duration::from_secs(300)).await;
            drop(permit);
            list
        });
    }
    let mut done = 0;
    while let Some(r) = joins.join_next().await {
        let list = r??;
        for s in list.tasks {
            let t = s
                .task
                .ok_or_else(|| anyhow::anyhow!("refused: {:?}", s.error))?;
            anyhow::ensure!(t.status == compute::Status::Succeeded, "task failed: {t:?}");
            done += 1;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = CpuSnapshot::take(submitter_pid, endpoint_node).per_task_since(&cpu_before, done);
    let line = json!({
        "engine": "funcmesh",
        "version": env!("CARGO_PKG_VERSION"),
        "workers": 2,
        "startup_s": startup_s,
        "config": if cap {
            format!("testnet of 2 institutions, 1 endpoint node each; client → b1's API (HTTP) → a1's endpoint over the mesh, every task carrying a capability token; batches of {batch}, {in_flight} in flight")
        } else {
            format!("testnet of 2 endpoint nodes; client → a1's API (HTTP) → a2's endpoint over the mesh; batches of {batch}, {in_flight} in flight")
        },
        "latency_api": "POST /v1/tasks with wait (one task), from a Rust HTTP client with keep-alive",
        "latency_samples": samples,
        "latency_ms": {
            "p50": percentile(&lat, 0.5),
            "p99": percentile(&lat, 0.99),
            "mean": mean,
            "min": lat[0],
            "max": lat[lat.len() - 1],
        },
        "latency_cpu_us_per_task": latency_cpu,
        "endpoint_ms": {"p50": percentile(&endpoint_ms, 0.5), "p99": percentile(&endpoint_ms, 0.99)},
        "breakdown_p50_ms": {
            "client_to_submitter_stored": percentile(&to_submitter, 0.5),
            "submitter_to_endpoint_received": percentile(&to_endpoint, 0.5),
            "endpoint_received_to_finished": percentile(&endpoint_ms, 0.5),
            "endpoint_finished_to_client": percentile(&back, 0.5),
        },
        "throughput_api": format!("POST /v1/tasks with {batch} tasks and wait, {in_flight} in flight"),
        "tasks": done,
        "throughput_wall_s": wall,
        "throughput_tasks_per_s": done as f64 / wall,
        "throughput_cpu_us_per_task": cpu,
    });
    println!("{line}");
    local_testnet::down(&net).await;
    Ok(())
}

async fn routing() -> anyhow::Result<()> {
    let n = env_usize("N", 3000);
    let in_flight = env_usize("C", 12);
    let images = env_usize("IMAGES", 4);
    let base = std::env::var("IMAGE").unwrap_or_else(|_| "funcmesh/python:bookworm".into());
    // Distinct image names are distinct environments, each with a real container cold start.
    for i in 0..images {
        let status = std::process::Command::new("docker")
            .args(["tag", &base, &format!("funcmesh/bench-fn:{i}")])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "docker tag {base} failed: build it with scripts/build-image.sh"
        );
    }
    // `STRATEGIES=warm-aware` runs one half alone (its spread between runs, say).
    let strategies = std::env::var("STRATEGIES").unwrap_or_else(|_| "warm-aware,random".into());
    let mut results = Vec::new();
    for strategy in strategies.split(',') {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("net");
        let endpoint = node::ops::TestnetEndpoint {
            runtimes: vec!["host".into(), "docker".into()],
            ..Default::default()
        };
        // a1 submits and runs nothing (the tasks need docker; a1 offers it too, so it is one of
        // the three endpoints: a1, a2, a3).
        let net = local_testnet::up(&dir, 1, 3, Role::Endpoint, &endpoint).await?;
        let a1 = Client::for_node(&DataDir::new(&net.nodes[0].data_dir))?;
        let mut names = Vec::new();
        for i in 0..images {
            let name = format!("f{i}");
            register(&a1, &name, Some(format!("docker:funcmesh/bench-fn:{i}"))).await?;
            names.push(name);
        }
        // Routable everywhere before the clock starts (no container is warm yet: the first task
        // of each function goes to a1 explicitly, then the pools are emptied by a restart-free
        // idle: simply start the clock after it — a1's warm containers count for both runs).
        let probe = NewTask {
            function: "f0".into(),
            args: json!([0]),
            endpoint: Some("a3".into()),
            ..Default::default()
        };
        until_routable(&a1, probe).await?;
        let mut rng_state: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state
        };
        let order: Vec<usize> = (0..n).map(|_| (next() % images as u64) as usize).collect();
        let t0 = Instant::now();
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut joins = tokio::task::JoinSet::new();
        for (i, f) in order.iter().enumerate() {
            let permit = sem.clone().acquire_owned().await?;
            let client = a1.clone();
            let t = task(&names[*f], i, None, strategy);
            joins.spawn(async move {
                let r = client.submit_tasks(vec![t], Duration::from_secs(600)).await;
                drop(permit);
                r
            });
        }
        let (mut ok, mut cold) = (0usize, 0usize);
        while let Some(r) = joins.join_next().await {
            for s in r??.tasks {
                if let Some(t) = s.task {
                    if t.status == compute::Status::Succeeded {
                        ok += 1;
                    }
                    if t.cold_start {
                        cold += 1;
                    }
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"strategy": strategy, "tasks": n, "succeeded": ok, "cold_starts": cold, "completion_s": wall, "images": images, "endpoints": 3, "workers_per_endpoint": 2, "in_flight": in_flight})
        );
        results.push(wall);
        local_testnet::down(&net).await;
    }
    if let [warm, random] = results[..] {
        println!(
            "{}",
            json!({"warm_aware_s": warm, "random_s": random, "reduction_pct": 100.0 * (1.0 - warm / random)})
        );
    }
    Ok(())
}

async fn coldstart() -> anyhow::Result<()> {
    let k = env_usize("K", 10);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("net");
    let endpoint = node::ops::TestnetEndpoint {
        runtimes: vec!["host".into(), "docker".into()],
        ..Default::default()
    };
    let net = local_testnet::up(&dir, 1, 2, Role::Endpoint, &endpoint).await?;
    // a2's endpoint starts a fresh worker for every task.
    let a2_dir = DataDir::new(&net.nodes[1].data_dir);
    let text = std::fs::read_to_string(a2_dir.config())?;
    let mut table: toml::Table = text.parse()?;
    let eps = table
        .get_mut("endpoint")
        .and_then(|e| e.as_array_mut())
        .ok_or_else(|| anyhow::anyhow!("a2 has no endpoint"))?;
    eps[0]
        .as_table_mut()
        .unwrap()
        .insert("strategy".into(), toml::Value::String("cold".into()));
    std::fs::write(a2_dir.config(), toml::to_string(&table)?)?;
    let net = local_testnet::restart(&dir, "a2").await?;
    let a1 = Client::for_node(&DataDir::new(&net.nodes[0].data_dir))?;
    let image = std::env::var("IMAGE").unwrap_or_else(|_| "funcmesh/python:bookworm".into());
    register(&a1, "noop_host", None).await?;
    register(&a1, "noop_docker", Some(format!("docker:{image}"))).await?;
    until_routable(&a1, task("noop_host", 0, Some("a2"), "warm-aware")).await?;
    for (function, env) in [
        ("noop_host", "host".to_string()),
        ("noop_docker", format!("docker:{image}")),
    ] {
        let mut cold = Vec::new();
        let mut round = Vec::new();
        for i in 0..k {
            let t0 = Instant::now();
            let list = a1
                .submit_tasks(
                    vec![task(function, i, Some("a2"), "warm-aware")],
                    Duration::from_secs(60),
                )
                .await?;
            round.push(t0.elapsed().as_secs_f64() * 1000.0);
            let t = list.tasks[0].task.as_ref().unwrap();
            anyhow::ensure!(
                t.cold_start && t.status == compute::Status::Succeeded,
                "not a cold start: {t:?}"
            );
            cold.push(t.times.running_us.saturating_sub(t.times.waiting_us) as f64 / 1000.0);
        }
        cold.sort_by(f64::total_cmp);
        round.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({"environment": env, "samples": k,
                   "cold_start_ms": {"p50": percentile(&cold, 0.5), "min": cold[0], "max": cold[k - 1]},
                   "round_trip_ms": {"p50": percentile(&round, 0.5)}})
        );
    }
    local_testnet::down(&net).await;
    Ok(())
}
