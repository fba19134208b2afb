//! The eight scenarios, in the order the test runs them (NAT last: it changes the topology).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use node::DataDir;
use node::local_testnet::{self, docker};

use super::{Fed, Route, SOURCE, ok, p, pct, secs, wait};

const MINUTE: Duration = Duration::from_secs(60);

fn value(v: &serde_json::Value) -> i64 {
    v.as_i64().unwrap_or(i64::MIN)
}

/// Round trips of `n` sequential `square` tasks from `from` to `to`: (p50, p95).
async fn round_trips(fed: &Fed, from: &str, to: &'static str, n: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let (v, _) = fed
            .run_one(
                from,
                "square",
                serde_json::json!([i]),
                &Route::to(to),
                MINUTE,
            )
            .await
            .expect("round trip");
        times.push(t.elapsed());
        assert_eq!(value(&v), (i * i) as i64);
    }
    times.sort();
    (pct(&times, 0.5), pct(&times, 0.95))
}

/// How `a` is connected to `b`, as `a` sees it: `direct`, `relayed` or `none`.
async fn path(fed: &Fed, a: &str, b: &str) -> String {
    let peer = fed.peer_id(b);
    let peers = fed.client(a).peers().await.unwrap_or_default();
    match peers.iter().find(|x| x.peer_id == peer) {
        None => "none".into(),
        Some(x) if x.connections.iter().any(|c| !c.contains("p2p-circuit")) => {
            format!("direct ({})", x.connections.join(", "))
        }
        Some(x) if x.connections.is_empty() => "member, no open connection".into(),
        Some(x) => format!("relayed ({})", x.connections.join(", ")),
    }
}

/// Scenario 1: Every node joins; the registry converges everywhere.
pub(crate) async fn s1_join_and_converge(fed: &Fed, report: &mut BTreeMap<&str, String>) {
    let t = fed.converged(MINUTE).await;
    let src = fed.dir.join("scenario-functions.py");
    std::fs::write(&src, SOURCE).expect("write functions");
    let a1 = fed.node_dir("a1");
    let t_reg = Instant::now();
    for f in ["square", "nap", "where"] {
        ok(&[
            "function",
            "register",
            "--name",
            f,
            "--python",
            p(&src),
            "--entrypoint",
            f,
            "--node",
            p(&a1),
        ]);
    }
    let names = fed.names();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    fed.functions_everywhere(&all, &["square", "nap", "where"], MINUTE)
        .await
        .expect("functions reach every node");
    let spread = t_reg.elapsed();
    for n in &all {
        let c = fed.client(n);
        wait(&format!("{n} to list the 3 endpoints"), MINUTE, || async {
            c.endpoints().await.map(|e| e.len()).unwrap_or(0) >= 3
        })
        .await
        .expect("endpoints everywhere");
        let st = c.registry_status().await.expect("registry status");
        assert!(st.entries > 0, "{n} has registry entries");
    }
    println!(
        "1 join: all 5 nodes list each other ({} after up); 3 functions registered on a1 reached \
         all 5 registries in {}; every node lists endpoints a1, a2, b1",
        secs(t),
        secs(spread)
    );
    report.insert("1 registry spread (3 functions to 5 nodes)", secs(spread));
}

/// Scenario 2: B's client runs A's function on A's endpoint with the capability grant.
pub(crate) async fn s2_cross_institution_grant(fed: &Fed, report: &mut BTreeMap<&str, String>) {
    let caps = fed.client("b2").capabilities().await.expect("b2's tokens");
    assert!(!caps.is_empty(), "b2 holds inst-a's grants");
    let (v, task) = fed
        .run_one(
            "b2",
            "square",
            serde_json::json!([7]),
            &Route::to("a1"),
            MINUTE,
        )
        .await
        .expect("b2 runs square on a1");
    assert_eq!(value(&v), 49);
    let ran_on = task.endpoint.clone().unwrap_or_default();
    assert!(ran_on.starts_with("a1"), "ran on {ran_on}");
    let (host, _) = fed
        .run_one(
            "b2",
            "where",
            serde_json::json!([]),
            &Route::to("a1"),
            MINUTE,
        )
        .await
        .expect("where");
    assert_eq!(
        host,
        serde_json::json!("a1"),
        "the task ran in a1's container"
    );
    let (b_p50, b_p95) = round_trips(fed, "b2", "a1", 30).await;
    let (a_p50, a_p95) = round_trips(fed, "a2", "a1", 30).await;
    let via = path(fed, "b2", "a1").await;
    println!(
        "2 grant: b2 (inst-b) ran square(7) = 49 on a1 (inst-a) under inst-a's grant, in a1's \
         container; round trip b2→a1 p50 {:.1} ms p95 {:.1} ms ({via}), a2→a1 p50 {:.1} ms \
         p95 {:.1} ms",
        b_p50.as_secs_f64() * 1e3,
        b_p95.as_secs_f64() * 1e3,
        a_p50.as_secs_f64() * 1e3,
        a_p95.as_secs_f64() * 1e3
    );
    report.insert(
        "2 task round trip b2→a1 (across the router), p50/p95",
        format!(
            "{:.1} / {:.1} ms",
            b_p50.as_secs_f64() * 1e3,
            b_p95.as_secs_f64() * 1e3
        ),
    );
    report.insert(
        "2 task round trip a2→a1 (same network), p50/p95",
        format!(
            "{:.1} / {:.1} ms",
            a_p50.as_secs_f64() * 1e3,
            a_p95.as_secs_f64() * 1e3
        ),
    );

    // Data between containers: 64 MiB from a1's data root to a2's and to b1's.
    let size: usize = 64 << 20;
    let big = fed.node_dir("a1").join("data/big.bin");
    let mut bytes = vec![0u8; size];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    std::fs::write(&big, &bytes).expect("write big.bin");
    for to in ["a2", "b1"] {
        let t = Instant::now();
        ok(&[
            "transfer",
            "copy",
            "a1:big.bin",
            &format!("{to}:big.bin"),
            "--node",
            p(&fed.node_dir(to)),
        ]);
        let took = t.elapsed();
        let got = std::fs::read(fed.node_dir(to).join("data/big.bin")).expect("copied file");
        assert!(got == bytes, "{to} got the same 64 MiB");
        let rate = size as f64 / took.as_secs_f64() / (1 << 20) as f64;
        println!(
            "2 transfer: 64 MiB a1 → {to} in {} ({rate:.0} MiB/s, verified)",
            secs(took)
        );
        report.insert(
            if to == "a2" {
                "2 transfer a1→a2 64 MiB (same network)"
            } else {
                "2 transfer a1→b1 64 MiB (across the router)"
            },
            format!("{rate:.0} MiB/s"),
        );
    }
}

/// Scenario 3: The coordinator stops; tasks keep flowing between nodes that know each other.
pub(crate) async fn s3_coordinator_loss(fed: &mut Fed, report: &mut BTreeMap<&str, String>) {
    let t = Instant::now();
    local_testnet::stop(&fed.dir, "coordinator", false)
        .await
        .expect("stop the coordinator");
    let stopped = t.elapsed();
    let mut firsts = Vec::new();
    for (from, to) in [("b2", "a1"), ("a2", "a1"), ("b2", "b1"), ("a1", "b1")] {
        let t = Instant::now();
        let (v, _) = fed
            .run_one(
                from,
                "square",
                serde_json::json!([5]),
                &Route::to(to),
                MINUTE,
            )
            .await
            .unwrap_or_else(|e| panic!("{from}→{to} with the coordinator down: {e}"));
        assert_eq!(value(&v), 25);
        firsts.push(format!(
            "{from}→{to} {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
    }
    println!(
        "3 coordinator loss: coordinator stopped in {}; tasks then ran at once: {}",
        secs(stopped),
        firsts.join(", ")
    );
    report.insert(
        "3 coordinator loss: first task after the stop",
        firsts.join(", "),
    );
    let t = Instant::now();
    fed.restart("coordinator");
    let again = fed.converged(MINUTE).await;
    println!(
        "3 coordinator back: restarted and all list each other in {}",
        secs(t.elapsed().max(again))
    );
}

/// Scenario 4: A partition: each side serves what it can reach; after healing the registries converge
/// and tasks resume.
pub(crate) async fn s4_partition(fed: &mut Fed, report: &mut BTreeMap<&str, String>) {
    // B's side loses both ways out: the router and the coordinator leave inst-b.
    docker::disconnect("router", docker::INST_B)
        .await
        .expect("cut the router");
    docker::disconnect("coordinator", docker::INST_B)
        .await
        .expect("cut the coordinator");
    // Until both sides see it: the connections across time out.
    let cut = Instant::now();
    let (a1, b2) = (fed.peer_id("a1"), fed.peer_id("b2"));
    let (ca, cb) = (fed.client("a1"), fed.client("b2"));
    wait(
        "each side to drop the other",
        Duration::from_secs(90),
        || async {
            let a_lists = ca.peers().await.unwrap_or_default();
            let b_lists = cb.peers().await.unwrap_or_default();
            !a_lists.iter().any(|p| p.peer_id == b2) && !b_lists.iter().any(|p| p.peer_id == a1)
        },
    )
    .await
    .expect("the partition is noticed");
    let noticed = cut.elapsed();
    let src = fed.dir.join("scenario-functions.py");
    // Each side changes the registry while cut off.
    for (node, name) in [("a2", "side_a"), ("b1", "side_b")] {
        ok(&[
            "function",
            "register",
            "--name",
            name,
            "--python",
            p(&src),
            "--entrypoint",
            "square",
            "--node",
            p(&fed.node_dir(node)),
        ]);
    }
    fed.functions_everywhere(&["coordinator", "a1", "a2"], &["side_a"], MINUTE)
        .await
        .expect("side A converges alone");
    fed.functions_everywhere(&["b1", "b2"], &["side_b"], MINUTE)
        .await
        .expect("side B converges alone");
    let b_sees_a = fed.client("b2").functions().await.expect("functions");
    assert!(
        !b_sees_a.iter().any(|f| f.record.name == "side_a"),
        "the partition holds: b2 cannot know side A's new function"
    );
    for (from, to) in [("b2", "b1"), ("a2", "a1")] {
        let (v, _) = fed
            .run_one(
                from,
                "square",
                serde_json::json!([6]),
                &Route::to(to),
                MINUTE,
            )
            .await
            .unwrap_or_else(|e| panic!("{from}→{to} during the partition: {e}"));
        assert_eq!(value(&v), 36);
    }
    // A cross-partition task is refused or waits; it is not lost: it runs after the heal.
    let across = fed
        .submit(
            "b2",
            "square",
            vec![serde_json::json!([9])],
            &Route {
                institution: Some("inst-a"),
                retries: 3,
                ..Default::default()
            },
        )
        .await
        .ok();
    println!(
        "4 partition: router and coordinator cut from inst-b, noticed by both sides in {}; each \
         side registered a function and converged alone; b2→b1 and a2→a1 ran; a task \
         b2→inst-a was {}",
        secs(noticed),
        if across.is_some() {
            "accepted and waits"
        } else {
            "refused (no route)"
        }
    );

    let healed = Instant::now();
    docker::connect("router", docker::INST_B)
        .await
        .expect("heal the router");
    docker::connect("coordinator", docker::INST_B)
        .await
        .expect("heal the coordinator");
    let names = fed.names();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    fed.functions_everywhere(&all, &["side_a", "side_b"], MINUTE)
        .await
        .expect("registries converge after the heal");
    let converged = healed.elapsed();
    let (v, _) = fed
        .run_one(
            "b2",
            "square",
            serde_json::json!([8]),
            &Route::to("a1"),
            MINUTE,
        )
        .await
        .expect("tasks resume across");
    assert_eq!(value(&v), 64);
    let resumed = healed.elapsed();
    if let Some(ids) = across {
        let views = fed
            .finish("b2", &ids, MINUTE)
            .await
            .expect("the waiting task");
        assert!(
            matches!(
                views[0].outcome,
                Some(compute::task::Outcome::Succeeded { .. })
            ),
            "the task accepted during the partition finished: {:?}",
            views[0].outcome
        );
    }
    println!(
        "4 heal: registries converged on all 5 nodes {} after reconnecting; b2→a1 ran {} after",
        secs(converged),
        secs(resumed)
    );
    report.insert("4 partition heal → converged registry", secs(converged));
    report.insert("4 partition heal → first task across", secs(resumed));
    fed.converged(MINUTE).await;
}

/// Scenario 5: An endpoint container is killed while it runs retryable tasks: they finish elsewhere.
pub(crate) async fn s5_endpoint_killed(fed: &mut Fed, report: &mut BTreeMap<&str, String>) {
    let n = 8;
    let route = Route {
        institution: Some("inst-a"),
        retries: 3,
        strategy: Some("round-robin"),
        ..Default::default()
    };
    let args = (0..n).map(|i| serde_json::json!([i, 2])).collect();
    let ids = fed
        .submit("b2", "nap", args, &route)
        .await
        .expect("submit naps");
    let c = fed.client("b2");
    wait("a nap to run on a1", MINUTE, || async {
        let mut running = false;
        for id in &ids {
            if let Ok(v) = c.task(id).await {
                running |= v.status == compute::task::Status::Running
                    && v.endpoint.as_deref().is_some_and(|e| e.starts_with("a1"));
            }
        }
        running
    })
    .await
    .expect("tasks reach a1");
    let killed = Instant::now();
    local_testnet::stop(&fed.dir, "a1", true)
        .await
        .expect("kill a1");
    let views = fed
        .finish("b2", &ids, Duration::from_secs(120))
        .await
        .expect("every nap finishes");
    let recovered = killed.elapsed();
    let mut moved = 0;
    for (i, v) in views.iter().enumerate() {
        match &v.outcome {
            Some(compute::task::Outcome::Succeeded { value: x, .. }) => {
                assert_eq!(value(x), i as i64)
            }
            other => panic!("nap {i} was lost: {other:?}"),
        }
        if v.attempts > 1 {
            moved += 1;
            assert!(
                v.endpoint.as_deref().is_some_and(|e| e.starts_with("a2")),
                "a retried task ran on a2: {:?}",
                v.endpoint
            );
        }
    }
    assert!(moved > 0, "some naps were on a1 and moved");
    println!(
        "5 endpoint loss: a1 killed with naps running; all {n} finished, {moved} of them \
         re-routed to a2, the last {} after the kill",
        secs(recovered)
    );
    report.insert(
        "5 endpoint loss → all re-routed tasks done (2 s tasks)",
        secs(recovered),
    );
    fed.restart("a1");
    fed.converged(MINUTE).await;
}

/// Scenario 6: A flow spanning both institutions (compute on A, transfer A → B) completes across a
/// restart of the node hosting it.
pub(crate) async fn s6_flow_across_institutions(
    fed: &mut Fed,
    report: &mut BTreeMap<&str, String>,
) {
    let input = fed.node_dir("a1").join("data/in");
    std::fs::create_dir_all(&input).expect("input dir");
    std::fs::write(input.join("numbers.txt"), "1\n2\n3\n").expect("input file");
    let def = fed.dir.join("cross-flow.json");
    std::fs::write(
        &def,
        serde_json::json!({
            "StartAt": "Nap",
            "States": {
                "Nap": {"Type": "Action", "ActionUrl": "https://compute.actions.globus.org",
                    "Parameters": {"function": "nap", "args": [1, 6], "endpoint": "a1"},
                    "ResultPath": "$.napped", "Next": "Move"},
                "Move": {"Type": "Action", "ActionUrl": "https://transfer.actions.globus.org/transfer",
                    "Parameters": {"source_endpoint": "a1", "destination_endpoint": "b1",
                        "DATA": [{"source_path": "/~/in", "destination_path": "/~/from-a",
                                  "recursive": true}]},
                    "ResultPath": "$.moved", "Next": "Square"},
                "Square": {"Type": "Action", "ActionUrl": "https://compute.actions.globus.org",
                    "Parameters": {"function": "square", "args": [12], "endpoint": "a1"},
                    "ResultPath": "$.squared", "End": true}
            }
        })
        .to_string(),
    )
    .expect("flow file");
    let b2 = fed.node_dir("b2");
    let t = Instant::now();
    ok(&["flow", "run", p(&def), "--id", "cross-1", "--node", p(&b2)]);
    let c = fed.client("b2");
    wait("the run's first action to be under way", MINUTE, || async {
        c.run("cross-1")
            .await
            .map(|r| serde_json::to_value(&r).unwrap_or_default()["status"] == "ACTIVE")
            .unwrap_or(false)
    })
    .await
    .expect("run active");
    let r = Instant::now();
    fed.restart("b2");
    let restart = r.elapsed();
    let c = fed.client("b2");
    let mut run = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(120);
    while run["status"] != "SUCCEEDED" && run["status"] != "FAILED" {
        assert!(
            Instant::now() < deadline,
            "the run did not end within 120 s after b2's restart: {run}"
        );
        if let Ok(r) = c.run("cross-1").await {
            run = serde_json::to_value(&r).unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(run["status"], "SUCCEEDED", "{run}");
    let output = run["details"]["output"].to_string();
    assert!(output.contains("144"), "square(12) in the output: {output}");
    let moved = std::fs::read_to_string(fed.node_dir("b1").join("data/from-a/numbers.txt"))
        .expect("the file arrived on b1");
    assert_eq!(moved, "1\n2\n3\n");
    println!(
        "6 flow: hosted on b2 (inst-b): nap on a1, copy a1:/in → b1:/from-a, square on a1; b2 \
         restarted mid-run ({}); the run succeeded in {} with the file on b1 and 144",
        secs(restart),
        secs(t.elapsed())
    );
    report.insert(
        "6 cross-institution flow with a host restart",
        secs(t.elapsed()),
    );
    fed.converged(MINUTE).await;
}

/// Scenario 8: Every node restarts, one at a time, while b2 submits a stream of tasks: none is lost.
pub(crate) async fn s8_rolling_restart(fed: &mut Fed, report: &mut BTreeMap<&str, String>) {
    let accepted: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let dir = fed.dir.clone();
    let stream = {
        let accepted = accepted.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i: i64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !stop.is_cancelled() {
                tick.tick().await;
                let Ok(c) = node::client::Client::for_node(&DataDir::new(dir.join("b2"))) else {
                    continue;
                };
                let task = node::tasks::NewTask {
                    function: "square".into(),
                    args: serde_json::json!([i]),
                    kwargs: serde_json::json!({}),
                    retries: 5,
                    ..Default::default()
                };
                if let Ok(list) = c.submit_tasks(vec![task], Duration::ZERO).await
                    && let Some(t) = list.tasks.into_iter().next().and_then(|t| t.task)
                {
                    accepted.lock().expect("lock").push((t.id, i));
                    i += 1;
                }
            }
        })
    };
    let mut restarts = Vec::new();
    for name in ["coordinator", "a1", "a2", "b1", "b2"] {
        let t = Instant::now();
        fed.restart(name);
        fed.converged(MINUTE).await;
        restarts.push(format!("{name} {:.1} s", t.elapsed().as_secs_f64()));
    }
    // A little more stream after the last restart.
    let before = accepted.lock().expect("lock").len();
    wait(
        "the stream to go on after the last restart",
        MINUTE,
        || async { accepted.lock().expect("lock").len() >= before + 10 },
    )
    .await
    .expect("stream goes on");
    stop.cancel();
    stream.await.expect("stream task");
    let tasks = accepted.lock().expect("lock").clone();
    let ids: Vec<String> = tasks.iter().map(|(id, _)| id.clone()).collect();
    let t = Instant::now();
    let views = fed
        .finish("b2", &ids, Duration::from_secs(180))
        .await
        .expect("every accepted task finishes");
    let mut per_endpoint: BTreeMap<String, usize> = BTreeMap::new();
    for ((_, i), v) in tasks.iter().zip(&views) {
        match &v.outcome {
            Some(compute::task::Outcome::Succeeded { value: x, .. }) => {
                assert_eq!(value(x), i * i, "task {i}")
            }
            other => panic!("task {i} ({}) was lost: {other:?}", v.id),
        }
        let ep = v.endpoint.clone().unwrap_or_default();
        let ep = ep.split('@').next().unwrap_or_default().to_string();
        *per_endpoint.entry(ep).or_default() += 1;
    }
    println!(
        "8 rolling restart: {} (each restart + full convergence); {} tasks accepted by b2 during \
         it all succeeded ({per_endpoint:?}), the last {} after the stream stopped",
        restarts.join(", "),
        tasks.len(),
        secs(t.elapsed())
    );
    report.insert(
        "8 rolling restart (restart + converge per node)",
        restarts.join(", "),
    );
    report.insert(
        "8 rolling restart: tasks accepted / lost",
        format!("{} / 0", tasks.len()),
    );
}

/// Scenario 7: NAT. B's nodes behind a masquerading router, the coordinator public only: A and
/// B still run tasks on each other's endpoints. Then a stricter firewall lets B reach only the
/// coordinator, so that A and B meet through its relay. Reports how each A–B pair is connected.
pub(crate) async fn s7_nat(fed: &mut Fed, report: &mut BTreeMap<&str, String>) {
    // The NAT first, so that B's first packets to the coordinator's public address are already
    // translated; then the coordinator's private leg goes.
    docker::router("nat").await.expect("router in NAT mode");
    docker::disconnect("coordinator", docker::INST_B)
        .await
        .expect("the coordinator leaves inst-b");
    // B now reaches the coordinator at its public (inst-a) address, through the router.
    let coordinator = format!(
        "/ip4/{}/tcp/4001/p2p/{}",
        docker::address("coordinator", docker::INST_A).expect("address"),
        fed.peer_id("coordinator")
    );
    for b in ["b1", "b2"] {
        node::ops::set_config_list(
            &DataDir::new(fed.node_dir(b)),
            "bootstrap",
            std::slice::from_ref(&coordinator),
        )
        .expect("bootstrap");
    }
    for (mode, label) in [
        ("nat", "7 NAT"),
        ("strict", "7 firewall (B reaches only the coordinator)"),
    ] {
        docker::router(mode).await.expect("router mode");
        // Connections from before the change die with the router's new rules; restarting B's
        // nodes makes them start afresh at once.
        let t = Instant::now();
        fed.restart("b1");
        fed.restart("b2");
        fed.converged(Duration::from_secs(120)).await;
        let joined = t.elapsed();
        let mut lines = Vec::new();
        for (from, to) in [
            ("a1", "b1"),
            ("a2", "b1"),
            ("b2", "a1"),
            ("b2", "a2"),
            ("b1", "a1"),
        ] {
            let t = Instant::now();
            let (v, _) = fed
                .run_one(
                    from,
                    "square",
                    serde_json::json!([3]),
                    &Route::to(to),
                    MINUTE,
                )
                .await
                .unwrap_or_else(|e| panic!("{from}→{to} ({mode}): {e}"));
            assert_eq!(value(&v), 9);
            lines.push(format!(
                "{from}→{to} {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            ));
        }
        let (p50, p95) = round_trips(fed, "a1", "b1", 20).await;
        // Data both ways. b1 pulling from a1 dials a1's data address: directly through the NAT,
        // through the mesh behind the firewall. a1 pulling from b1 cannot dial in: its data
        // plane goes through the mesh (the connection b1 opened, or the relay).
        let mut rates = Vec::new();
        // Each twice: the first finds the path (and waits out the direct attempt), the second
        // goes on the connection that is open.
        for (src, dst, n) in [
            ("a1", "b1", 1),
            ("a1", "b1", 2),
            ("b1", "a1", 1),
            ("b1", "a1", 2),
        ] {
            let size: usize = 16 << 20;
            let name = format!("{mode}-{src}-to-{dst}-{n}.bin");
            let bytes: Vec<u8> = (0..size)
                .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
                .collect();
            std::fs::write(fed.node_dir(src).join("data").join(&name), &bytes)
                .expect("source file");
            let t = Instant::now();
            ok(&[
                "transfer",
                "copy",
                &format!("{src}:{name}"),
                &format!("{dst}:{name}"),
                "--node",
                p(&fed.node_dir(dst)),
            ]);
            let took = t.elapsed();
            let got =
                std::fs::read(fed.node_dir(dst).join("data").join(&name)).expect("copied file");
            assert!(got == bytes, "{src}→{dst} ({mode}): the same 16 MiB");
            rates.push(format!(
                "{src}→{dst} #{n} {:.1} MiB/s",
                size as f64 / took.as_secs_f64() / (1 << 20) as f64
            ));
        }
        let mut pairs = Vec::new();
        for a in ["a1", "a2"] {
            for b in ["b1", "b2"] {
                let how = path(fed, a, b).await;
                if mode == "strict" {
                    assert!(
                        how.starts_with("relayed"),
                        "{a}–{b} must go through the relay: {how}"
                    );
                } else {
                    // A cannot dial in: B's connections come from the router's public address.
                    assert!(
                        how.contains("10.231.1.254"),
                        "{a}–{b} must come through the NAT: {how}"
                    );
                }
                pairs.push(format!("{a}–{b}: {how}"));
            }
        }
        let relay_listen = fed
            .client("b1")
            .status()
            .await
            .map(|s| s.listen_addrs.iter().any(|a| a.contains("p2p-circuit")))
            .unwrap_or(false);
        println!(
            "{label}: B's nodes restarted behind it and all 5 listed each other in {}; tasks \
             across: {}; a1→b1 p50 {:.1} ms p95 {:.1} ms; 16 MiB copies (verified): {}; b1 \
             holds a relay reservation: {relay_listen}; connections: {}",
            secs(joined),
            lines.join(", "),
            p50.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            rates.join(", "),
            pairs.join("; ")
        );
        let (k_join, k_rtt, k_pairs, k_rates) = if mode == "nat" {
            (
                "7 NAT: B restarted behind NAT → all converged",
                "7 NAT: task round trip a1→b1 p50/p95",
                "7 NAT: A–B connections",
                "7 NAT: 16 MiB copies (b1 pulls directly; a1 pulls through the mesh)",
            )
        } else {
            (
                "7 firewall: B restarted → all converged through the relay",
                "7 firewall: task round trip a1→b1 through the relay p50/p95",
                "7 firewall: A–B connections",
                "7 firewall: 16 MiB copies through the relay",
            )
        };
        report.insert(k_rates, rates.join(", "));
        report.insert(k_join, secs(joined));
        report.insert(
            k_rtt,
            format!(
                "{:.1} / {:.1} ms",
                p50.as_secs_f64() * 1e3,
                p95.as_secs_f64() * 1e3
            ),
        );
        report.insert(k_pairs, pairs.join("; "));
    }
}
