//! The scale harness: a federation of in-process nodes (one tokio runtime, the real node — mesh,
//! registry, RocksDB, endpoints — over loopback TCP/QUIC), measured at rest and while the
//! registry changes.
//!
//! ```text
//! cargo run --release -p testnet --example scale -- --members 100 --per-institution 10
//! ```
//!
//! It starts a coordinator and `--members` endpoint nodes (institutions of
//! `--per-institution`), with the mesh's default timers, one join after another (or
//! `--join-wave N` at once), and waits until every node's registry lists every node. Then, one JSON line on stdout:
//!
//! * `idle`: over `--window` seconds at rest (after `--settle` seconds), the process's CPU time
//!   and resident memory divided by the number of nodes, and the member connections per node;
//! * `function_reach_ms`: a function registered on one node, the time until each other node's
//!   registry has it (p50, p99, max; `--functions` of them, each from another node);
//! * `member_listed_ms`: a new member joined, the time from its start (the invite, `join`,
//!   opening its store) until every other node's registry lists it; `member_join_ms`, the part
//!   of that before its node was running;
//! * `partition`: the federation cut in two (the coordinator and the first half of the members,
//!   the rest; every node blocks every node of the other side), a function registered on each
//!   side while cut, then healed: the time from the heal until each node's registry has both
//!   (p50, p99, max) — the registry's convergence after a partition.
//!
//! Run one size per process (memory is not returned to the system between sizes);
//! `bench/run.sh scale` runs the curve.
//!
//! `--funcx` runs the funcX paper's scale experiment instead, simulated: `--members` nodes with
//! `--endpoints` endpoints each, every endpoint with `--workers` simulated workers (no process:
//! a task returns `null` after `--task-ms`), and `--tasks` no-op tasks submitted from
//! `--submitters` nodes (at most `--window` unfinished at once), routed by the real
//! dispatchers to any endpoint; one JSON line with the completion time and throughput.

use std::time::{Duration, Instant};

use anyhow::Context as _;

// What a deployed node runs on (`node/src/main.rs`): the figures are a `funcmesh` process's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    funcx: bool,
    endpoints: usize,
    workers: usize,
    tasks: usize,
    task_ms: u64,
    submitters: usize,
    window_tasks: usize,
    members: usize,
    per: usize,
    settle: u64,
    window: u64,
    functions: usize,
    wave: usize,
    sets: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        funcx: false,
        endpoints: 16,
        workers: 128,
        tasks: 1_310_720,
        task_ms: 0,
        submitters: 4,
        window_tasks: 40_000,
        members: 10,
        per: 10,
        settle: 20,
        window: 30,
        functions: 5,
        wave: 1,
        sets: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--members" => a.members = value()?.parse()?,
            "--per-institution" => a.per = value()?.parse()?,
            "--settle" => a.settle = value()?.parse()?,
            "--window" => a.window = value()?.parse()?,
            "--functions" => a.functions = value()?.parse()?,
            "--join-wave" => a.wave = value()?.parse::<usize>()?.max(1),
            "--set" => a.sets.push(value()?),
            "--funcx" => a.funcx = true,
            "--endpoints" => a.endpoints = value()?.parse()?,
            "--workers" => a.workers = value()?.parse()?,
            "--tasks" => a.tasks = value()?.parse()?,
            "--task-ms" => a.task_ms = value()?.parse()?,
            "--submitters" => a.submitters = value()?.parse()?,
            "--window-tasks" => a.window_tasks = value()?.parse()?,
            other => anyhow::bail!(
                "unknown flag {other}; use --members N --per-institution K --settle S --window S \
                 --functions N --join-wave N --set section.key=value, or --funcx --members N --endpoints E \
                 --workers W --tasks T --task-ms MS --submitters S --window-tasks N"
            ),
        }
    }
    anyhow::ensure!(
        a.members >= 2 && a.per >= 1,
        "--members ≥ 2, --per-institution ≥ 1"
    );
    Ok(a)
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the command.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory of this process, MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// How many nodes each running node's registry lists (the smallest).
async fn fewest_listed(net: &testnet::Federation) -> usize {
    let mut least = usize::MAX;
    for n in net.running() {
        let listed = n.mesh().registry_with(|v| v.nodes.len()).await.unwrap_or(0);
        least = least.min(listed);
    }
    least
}

/// Which nodes do not yet list which running nodes, and what their replicas say: on stderr
/// while the harness waits for the listings (a run that does not get there says why).
async fn listing_report(net: &testnet::Federation) -> serde_json::Value {
    let running: Vec<String> = net
        .running()
        .iter()
        .map(|n| n.peer_id().to_string())
        .collect();
    let mut lacking: std::collections::BTreeMap<String, usize> = Default::default();
    let mut laggards = Vec::new();
    for n in net.running() {
        let listed = n
            .mesh()
            .registry_with(|v| {
                v.nodes
                    .keys()
                    .cloned()
                    .collect::<std::collections::BTreeSet<_>>()
            })
            .await
            .unwrap_or_default();
        let missing: Vec<&String> = running.iter().filter(|p| !listed.contains(*p)).collect();
        if missing.is_empty() {
            continue;
        }
        for m in &missing {
            *lacking.entry((*m).clone()).or_default() += 1;
        }
        let status = n.mesh().registry_status().await.ok();
        let conns = n.mesh().members().await.map_or(0, |m| m.len());
        laggards.push(serde_json::json!({
            "node": n.peer_id().to_string(),
            "missing": missing.len(),
            "listed": listed.len(),
            "connections": conns,
            "entries": status.as_ref().map(|s| s.entries),
            "ignored": status.as_ref().map(|s| s.ignored),
            "heads": status.as_ref().map(|s| s.heads.len()),
            "missing_deps": status.as_ref().map(|s| s.missing_deps),
            "syncing": status.as_ref().map(|s| s.syncing),
        }));
    }
    laggards.sort_by_key(|l| std::cmp::Reverse(l["missing"].as_u64()));
    let worst: Vec<_> = laggards.iter().take(5).cloned().collect();
    let mut lacked: Vec<(usize, String)> = lacking.into_iter().map(|(p, c)| (c, p)).collect();
    lacked.sort();
    lacked.reverse();
    serde_json::json!({
        "laggards": laggards.len(),
        "records_lacked": lacked.len(),
        "most_lacked": lacked.iter().take(5).map(|(c, p)| format!("{p}: {c}")).collect::<Vec<_>>(),
        "worst": worst,
    })
}

/// Waits until every running node but `except` (the one the news started on) has `check` true
/// of its registry; returns, per node, the time from `t0` it was first seen true. Each node is
/// watched on its own and checked again at each change of its registry (and every 200 ms), so
/// a time is within one event-loop round trip of the change — a sweep asking the nodes in turn
/// lagged by up to its own length, most of a second at 100 members during a join.
async fn reach_times(
    net: &testnet::Federation,
    t0: Instant,
    timeout: Duration,
    except: Option<mesh::PeerId>,
    check: impl Fn(&crdt_registry::View) -> bool + Clone + Send + 'static,
) -> anyhow::Result<Vec<f64>> {
    let deadline = tokio::time::Instant::from_std(t0 + timeout);
    let mut watchers = tokio::task::JoinSet::new();
    for n in net.running() {
        if Some(n.peer_id()) == except {
            continue;
        }
        let mesh = n.mesh().clone();
        let check = check.clone();
        watchers.spawn(async move {
            let mut changes = mesh.registry_changes();
            loop {
                changes.borrow_and_update();
                let c = check.clone();
                if mesh.registry_with(move |v| c(v)).await.unwrap_or(false) {
                    return Some(t0.elapsed().as_secs_f64() * 1000.0);
                }
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                let wait = deadline.min(tokio::time::Instant::now() + Duration::from_millis(200));
                if let Ok(Err(_)) = tokio::time::timeout_at(wait, changes.changed()).await {
                    tokio::time::sleep_until(wait).await; // the node stopped: no more changes
                }
            }
        });
    }
    let mut times = Vec::new();
    while let Some(seen) = watchers.join_next().await {
        let seen = seen.context("a registry watcher failed")?;
        times.push(seen.with_context(|| format!("not everywhere within {timeout:?}"))?);
    }
    Ok(times)
}

/// Where the time goes between a new member's start (`t0`) and its listing, seen from the new
/// node: its first verified member connection, its own record in its own registry (written by
/// the node at start, to be sent on that connection), and its registry listing every node
/// (caught up). In ms from `t0`; `null` for what did not happen within 30 s.
async fn join_phases(mesh: mesh::Handle, t0: Instant, nodes: usize) -> serde_json::Value {
    let own = mesh.peer_id().to_string();
    let (mut member, mut record, mut caught_up) = (None, None, None);
    while t0.elapsed() < Duration::from_secs(30) && caught_up.is_none() {
        let at = t0.elapsed().as_secs_f64() * 1000.0;
        if member.is_none() && mesh.members().await.is_ok_and(|m| !m.is_empty()) {
            member = Some(at);
        }
        let own = own.clone();
        let (has_own, listed) = mesh
            .registry_with(move |v| (v.nodes.contains_key(&own), v.nodes.len()))
            .await
            .unwrap_or((false, 0));
        if record.is_none() && has_own {
            record = Some(at);
        }
        if listed >= nodes {
            caught_up = Some(at);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    serde_json::json!({
        "first_member_connection": member,
        "own_record": record,
        "caught_up": caught_up,
    })
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "n": ms.len(),
        "p50": percentile(&ms, 0.5),
        "p99": percentile(&ms, 0.99),
        "max": ms.last().copied().unwrap_or(f64::NAN),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // The nodes' logs (`RUST_LOG`; errors only by default) go to stderr with the progress
    // lines, so that stdout holds the JSON line alone.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let a = args()?;
    let institutions = a.members.div_ceil(a.per);
    // The mesh's own defaults (the test configuration's quick timers are for tests).
    let mut sets = vec![
        "mesh.proof_timeout=5s".to_string(),
        "mesh.redial_interval=500ms".to_string(),
        "mesh.anti_entropy=10s".to_string(),
        "mesh.endpoint_lost_after=6s".to_string(),
    ];
    sets.extend(a.sets.iter().cloned());
    if a.funcx {
        return funcx(&a, &sets).await;
    }
    let rss0 = rss_mib();
    let started = Instant::now();
    let mut net = testnet::Federation::start_with(0, 0, &sets).await?;
    // Any member may use any endpoint (the first-task measurement picks one across the
    // federation).
    net.member_config = Some(std::sync::Arc::new(|_, _, config| {
        for e in &mut config.endpoint {
            e.policy = "federation".into();
        }
    }));
    for i in 0..institutions {
        net.add_institution(&format!("inst-{i:03}"))?;
    }
    let joining: Vec<usize> = (0..a.members).map(|m| m / a.per).collect();
    for (w, wave) in joining.chunks(a.wave).enumerate() {
        join_wave(&mut net, wave).await?;
        let joined = (w + 1) * a.wave;
        if joined % 20 < a.wave {
            eprintln!(
                "{} members joined, {:.1} s in",
                joined.min(a.members),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let joined_s = started.elapsed().as_secs_f64();
    let total = a.members + 1;
    // After a burst of joins on a saturated machine the listings are completed by
    // anti-entropy, minutes at 200 in-process nodes (ARCHITECTURE.md, known limits).
    let deadline = Instant::now() + Duration::from_secs(60 + 3 * a.members as u64);
    let mut next_report = Instant::now() + Duration::from_secs(60);
    while fewest_listed(&net).await < total {
        if Instant::now() >= next_report || Instant::now() >= deadline {
            next_report = Instant::now() + Duration::from_secs(60);
            eprintln!("listing: {}", listing_report(&net).await);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the registries did not list all {total} nodes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up_s = started.elapsed().as_secs_f64();
    eprintln!("{total} nodes up and listed everywhere in {up_s:.1} s; settling");
    tokio::time::sleep(Duration::from_secs(a.settle)).await;

    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(a.window)).await;
    let (cpu1, elapsed) = (cpu_seconds(), t0.elapsed().as_secs_f64());
    let rss = rss_mib();
    let mut conns = Vec::new();
    for n in net.running().into_iter().skip(1) {
        conns.push(n.mesh().members().await.map_or(0, |m| m.len()) as f64);
    }
    let coordinator_conns = match net.coordinator() {
        Some(c) => c.mesh().members().await.map_or(0, |m| m.len()),
        None => 0,
    };
    conns.sort_by(f64::total_cmp);
    let idle = serde_json::json!({
        "cpu_pct_per_node": (cpu1 - cpu0) / elapsed / total as f64 * 100.0,
        "cpu_pct_total": (cpu1 - cpu0) / elapsed * 100.0,
        "rss_mib_per_node": (rss - rss0) / total as f64,
        "rss_mib_total": rss,
        "member_connections": {
            "mean": conns.iter().sum::<f64>() / conns.len().max(1) as f64,
            "max": conns.last().copied().unwrap_or(0.0),
            "coordinator": coordinator_conns,
        },
    });
    eprintln!("idle: {idle}");

    let mut reach = Vec::new();
    for f in 0..a.functions {
        let from = (f * 7919) % a.members;
        let name = format!("reach-{f}");
        let t = Instant::now();
        let id = net
            .node(from)
            .register_function(&testnet::shell_function(&name))
            .await?;
        let origin = Some(net.node(from).peer_id());
        let times = reach_times(&net, t, Duration::from_secs(60), origin, move |v| {
            v.functions.contains_key(&id)
        })
        .await?;
        reach.extend(times);
    }
    let reach = summary(reach);
    eprintln!("function reach: {reach}");

    let t = Instant::now();
    // Markers for `RUST_LOG=scale=info,mesh=debug`: the nodes' logs around the join.
    tracing::info!("joining a new member");
    let i = join(&mut net, 0).await?;
    tracing::info!(peer = %net.node(i).peer_id(), "the new member is running");
    let join_ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!("new member running after {join_ms:.0} ms");
    let peer = net.node(i).peer_id().to_string();
    let phases = tokio::spawn(join_phases(net.node(i).mesh().clone(), t, total + 1));
    let listed = {
        let peer = peer.clone();
        let origin = Some(net.node(i).peer_id());
        reach_times(&net, t, Duration::from_secs(60), origin, move |v| {
            v.nodes.contains_key(&peer)
        })
        .await?
    };
    let first_listed = listed.iter().copied().fold(f64::INFINITY, f64::min);
    let listed = summary(listed);
    let mut phases = phases.await?;
    phases["first_other_lists"] = serde_json::json!(first_listed);
    eprintln!("new member listed: {listed}; on the way: {phases}");

    let partition = partition_heal(&net).await?;
    eprintln!("partition and heal: {partition}");

    let first_task = first_task_latency(&net).await?;
    eprintln!("first task: {first_task}");

    // Registry checkpoints crossed, and whether every replica holds the same document (a
    // checkpoint written during the run, with `--set mesh.checkpoint_every=N`, must leave them
    // alike).
    let mut epochs = Vec::new();
    let mut heads = std::collections::BTreeSet::new();
    for n in net.running().into_iter().chain(net.coordinator()) {
        let s = n.mesh().registry_status().await?;
        epochs.push(s.epoch);
        heads.insert(s.heads);
    }
    let registry = serde_json::json!({
        "epoch_min": epochs.iter().min(),
        "epoch_max": epochs.iter().max(),
        "distinct_heads": heads.len(),
    });
    eprintln!("registry: {registry}");

    let line = serde_json::json!({
        "bench": "scale",
        "members": a.members,
        "nodes": total,
        "per_institution": a.per,
        "settings": a.sets,
        "joined_s": joined_s,
        "up_s": up_s,
        "window_s": a.window,
        "idle": idle,
        "function_reach_ms": reach,
        "member_listed_ms": listed,
        "member_join_ms": join_ms,
        "member_join_phases_ms": phases,
        "partition": partition,
        "first_task_ms": first_task,
        "registry": registry,
    });
    println!("{line}");
    net.shutdown().await;
    Ok(())
}

/// The funcX scale experiment, simulated (see the module's documentation).
async fn funcx(a: &Args, sets: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut net = testnet::Federation::start_with(0, 0, sets).await?;
    let (endpoints, workers, task_ms) = (a.endpoints, a.workers, a.task_ms);
    net.member_config = Some(std::sync::Arc::new(move |name, _inst, config| {
        let template = config.endpoint[0].clone();
        config.endpoint = (0..endpoints)
            .map(|e| node::config::EndpointSection {
                name: format!("{name}-e{e}"),
                policy: "federation".into(),
                max_workers: workers,
                max_queued: 1_000_000,
                simulate_ms: Some(task_ms),
                ..template.clone()
            })
            .collect();
    }));
    let institutions = a.members.div_ceil(a.per);
    for i in 0..institutions {
        net.add_institution(&format!("inst-{i:03}"))?;
    }
    for m in 0..a.members {
        net.add_member(m / a.per).await?;
    }
    let total_endpoints = a.members * a.endpoints;
    let submitters: Vec<usize> = (0..a.submitters.min(a.members))
        .map(|i| i * a.members / a.submitters.min(a.members))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120 + a.members as u64);
    loop {
        let mut ready = true;
        for &s in &submitters {
            let n = net.node(s);
            let listed = n.mesh().registry_with(|v| v.endpoints.len()).await?;
            let heard = n.dispatcher().adverts().await?.len();
            ready &= listed >= total_endpoints && heard >= a.members;
        }
        if ready {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the endpoints were not routable in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up_s = started.elapsed().as_secs_f64();
    eprintln!(
        "{} nodes, {total_endpoints} endpoints, {} simulated workers up in {up_s:.1} s",
        a.members + 1,
        total_endpoints * a.workers
    );
    let function = net
        .node(0)
        .register_function(&testnet::shell_function("noop"))
        .await?;
    testnet::wait_for(
        "the function at every submitter",
        Duration::from_secs(30),
        || {
            let ids: Vec<_> = submitters
                .iter()
                .map(|s| net.node(*s).mesh().clone())
                .collect();
            let f = function.clone();
            async move {
                for m in ids {
                    let f = f.clone();
                    if !m
                        .registry_with(move |v| v.functions.contains_key(&f))
                        .await
                        .unwrap_or(false)
                    {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await?;

    let t0 = Instant::now();
    let per = a.tasks / submitters.len();
    let window = (a.window_tasks / submitters.len()).max(1);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Progress every 10 s on stderr, so that a run cut short still tells its rate.
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let now = done.load(std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "{:.0} s: {now} finished, {} tasks/s in the last 10 s",
                    t0.elapsed().as_secs_f64(),
                    (now - last) / 10
                );
                last = now;
            }
        })
    };
    let runs = submitters.iter().enumerate().map(|(k, &s)| {
        let count = if k + 1 == submitters.len() {
            a.tasks - per * k
        } else {
            per
        };
        submit_all(net.node(s), &function, count, window, done.clone())
    });
    let ids = futures::future::try_join_all(runs).await?;
    let elapsed = t0.elapsed().as_secs_f64();
    progress.abort();
    // Every task's outcome, from the submitters' stores.
    let (mut ok, mut failed) = (0usize, 0usize);
    for (&s, ids) in submitters.iter().zip(ids) {
        for chunk in ids.chunks(10_000) {
            for t in net.node(s).dispatcher().get(chunk.to_vec()).await? {
                match t.map(|t| t.status) {
                    Some(compute::Status::Succeeded) => ok += 1,
                    _ => failed += 1,
                }
            }
        }
    }
    let line = serde_json::json!({
        "bench": "funcx-scale-simulated",
        "nodes": a.members + 1,
        "endpoints": total_endpoints,
        "workers": total_endpoints * a.workers,
        "tasks": a.tasks,
        "task_ms": a.task_ms,
        "submitters": submitters.len(),
        "window_tasks": a.window_tasks,
        "succeeded": ok,
        "failed": failed,
        "up_s": up_s,
        "completion_s": elapsed,
        "tasks_per_s": a.tasks as f64 / elapsed,
        "paper_completion_s": 989.0,
    });
    println!("{line}");
    net.shutdown().await;
    Ok(())
}

/// Submits `count` no-op tasks of `function` on `node`, keeping at most `window` unfinished,
/// until all have finished; returns their ids.
async fn submit_all(
    node: &node::Node,
    function: &str,
    count: usize,
    window: usize,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<Vec<compute::TaskId>> {
    use tokio::sync::broadcast::error::RecvError;
    let mut finished = node.dispatcher().finished_tasks();
    let (mut sent, mut done) = (0usize, 0usize);
    let mut ids = Vec::with_capacity(count);
    while done < count {
        while sent < count && sent - done < window {
            let n = (count - sent).min(1000).min(window - (sent - done));
            let tasks = (0..n)
                .map(|_| node::tasks::NewTask {
                    function: function.to_string(),
                    args: serde_json::json!([]),
                    kwargs: serde_json::json!({}),
                    strategy: Some("least-loaded".into()),
                    ..Default::default()
                })
                .collect();
            let answers = node.submit(tasks).await?;
            for a in answers {
                match a {
                    Ok(t) => ids.push(t.id),
                    Err(e) => anyhow::bail!("a task was refused: {e:?}"),
                }
            }
            sent += n;
        }
        let n = match finished.recv().await {
            Ok(_) => 1,
            // Missed some: only this node's tasks finish here; their outcomes are read after.
            Err(RecvError::Lagged(n)) => n as usize,
            Err(RecvError::Closed) => anyhow::bail!("the dispatcher stopped"),
        };
        done += n;
        progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(ids)
}

/// Cuts the federation in two, registers a function on each side, heals, and measures the time
/// from the heal until every node has both (see the module's documentation).
async fn partition_heal(net: &testnet::Federation) -> anyhow::Result<serde_json::Value> {
    let nodes = net.running();
    let (left, right) = nodes.split_at(nodes.len() / 2);
    let t = Instant::now();
    // One command per node, all nodes at once (the cut and the heal each land within a few
    // milliseconds everywhere).
    let ids = |side: &[&node::Node]| side.iter().map(|n| n.peer_id()).collect::<Vec<_>>();
    let (left_ids, right_ids) = (ids(left), ids(right));
    let cut = |blocked: bool| {
        let calls = left
            .iter()
            .map(|n| (n, right_ids.clone()))
            .chain(right.iter().map(|n| (n, left_ids.clone())))
            .map(move |(n, other)| n.mesh().block_all(other, blocked));
        async move {
            futures::future::try_join_all(calls).await?;
            anyhow::Ok(())
        }
    };
    cut(true).await?;
    let right_peers: std::collections::HashSet<String> =
        right.iter().map(|r| r.peer_id().to_string()).collect();
    testnet::wait_for(
        "the halves to lose each other",
        Duration::from_secs(60),
        || async {
            for l in left {
                let members = l.mesh().members().await.unwrap_or_default();
                if members.iter().any(|m| right_peers.contains(&m.peer_id)) {
                    return false;
                }
            }
            true
        },
    )
    .await?;
    let cut_s = t.elapsed().as_secs_f64();
    let mut ids = Vec::new();
    for (side, node) in [
        ("left", left[left.len() / 2]),
        ("right", right[right.len() / 2]),
    ] {
        ids.push(
            node.register_function(&testnet::shell_function(&format!("while-cut-{side}")))
                .await?,
        );
    }
    // Each side converges on its own function, and does not see the other's.
    for (side, id) in [(left, &ids[0]), (right, &ids[1])] {
        testnet::wait_for("each side to converge", Duration::from_secs(60), || async {
            for n in side {
                let id = id.clone();
                if !n
                    .mesh()
                    .registry_with(move |v| v.functions.contains_key(&id))
                    .await
                    .unwrap_or(false)
                {
                    return false;
                }
            }
            true
        })
        .await?;
    }
    let other = ids[1].clone();
    anyhow::ensure!(
        !left[0]
            .mesh()
            .registry_with(move |v| v.functions.contains_key(&other))
            .await?,
        "the cut did not hold: the left side has the right side's function"
    );
    let healed = Instant::now();
    cut(false).await?;
    let both = ids.clone();
    let times = reach_times(net, healed, Duration::from_secs(120), None, move |v| {
        both.iter().all(|id| v.functions.contains_key(id))
    })
    .await?;
    Ok(serde_json::json!({
        "left": left.len(),
        "right": right.len(),
        "cut_s": cut_s,
        "converged_after_heal_ms": summary(times),
    }))
}

/// One task's time from submission to result on node 0, in ms.
async fn one_task(
    net: &testnet::Federation,
    function: &str,
    endpoint: &str,
) -> anyhow::Result<f64> {
    let n = net.node(0);
    let t = Instant::now();
    let task = node::tasks::NewTask {
        function: function.to_string(),
        args: serde_json::json!([]),
        kwargs: serde_json::json!({"x": 1}),
        endpoint: Some(endpoint.to_string()),
        ..Default::default()
    };
    let id = match n.submit(vec![task]).await?.pop() {
        Some(Ok(t)) => t.id,
        other => anyhow::bail!("the task was not accepted: {other:?}"),
    };
    let done = n
        .dispatcher()
        .wait(vec![id], Duration::from_secs(60))
        .await?
        .pop()
        .flatten()
        .context("no such task")?;
    anyhow::ensure!(
        done.status == compute::Status::Succeeded,
        "the task ended {:?}: {:?}",
        done.status,
        done.outcome
    );
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// The first task's latency from node 0 to endpoints whose nodes it is not connected to,
/// beside endpoints it is connected to (on both, the first task also starts a worker), and the
/// second task to each: up to five endpoints of each kind, medians in ms. The first tasks'
/// difference is what dialling on demand adds.
async fn first_task_latency(net: &testnet::Federation) -> anyhow::Result<serde_json::Value> {
    let me = net.node(0);
    let connected: std::collections::HashSet<String> = me
        .mesh()
        .members()
        .await?
        .into_iter()
        .map(|m| m.peer_id)
        .collect();
    let view = me.mesh().registry().await?;
    let own = me.peer_id().to_string();
    let pick = |want: bool| -> Vec<String> {
        view.endpoints
            .values()
            .filter(|e| e.peer_id != own && connected.contains(&e.peer_id) == want)
            .take(5)
            .map(|e| e.id.clone())
            .collect()
    };
    let (near, far) = (pick(true), pick(false));
    let function = me
        .register_function(&testnet::shell_function("first-task"))
        .await?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let mut out = serde_json::Map::new();
    for (label, endpoints) in [("connected", near), ("unconnected", far)] {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for endpoint in &endpoints {
            first.push(one_task(net, &function, endpoint).await?);
            second.push(one_task(net, &function, endpoint).await?);
        }
        out.insert(
            label.into(),
            serde_json::json!({
                "endpoints": endpoints.len(),
                "first_median": median(first),
                "second_median": median(second),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// Joins a member of institution `inst`, as an operator would: again after a failure (a join
/// on a machine running a hundred nodes and more can miss the coordinator's 5 s proof
/// deadline), waiting longer each time; said on stderr.
async fn join(net: &mut testnet::Federation, inst: usize) -> anyhow::Result<usize> {
    Ok(join_wave(net, &[inst]).await?[0])
}

/// Joins a member of each institution in `wave` at once (`--join-wave`); the failed joins
/// again, up to `JOIN_ATTEMPTS` in all, after a pause that doubles from 2 s (a loaded machine
/// gets time to catch up); said on stderr.
async fn join_wave(net: &mut testnet::Federation, wave: &[usize]) -> anyhow::Result<Vec<usize>> {
    const JOIN_ATTEMPTS: u32 = 6;
    let mut joined = Vec::new();
    let mut left = wave.to_vec();
    for attempt in 1..=JOIN_ATTEMPTS {
        let mut failed = Vec::new();
        for (inst, got) in left.iter().zip(net.add_members(&left).await) {
            match got {
                Ok(i) => joined.push(i),
                Err(e) if attempt < JOIN_ATTEMPTS => {
                    eprintln!("a join failed (attempt {attempt}: {e:#}); joining again");
                    failed.push(*inst);
                }
                Err(e) => return Err(e.context(format!("{JOIN_ATTEMPTS} joins failed"))),
            }
        }
        if failed.is_empty() {
            break;
        }
        left = failed;
        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
    }
    Ok(joined)
}
