//! `funcmesh demo`: a local federation in a temp dir, shown step by step, then cleaned up.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use mesh::membership::{Admission, Invite, Proof, Role, SigningKey, unix_now};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::local_testnet::{self, Testnet};

/// Runs the demo.
pub async fn run() -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("funcmesh-demo-")
        .tempdir()
        .context("temp dir")?;
    let dir = tmp.path().join("testnet");
    println!("== funcmesh demo (in {})", tmp.path().display());
    println!(
        "\n-- 1. a federation: a coordinator and two institutions with two endpoint nodes each,"
    );
    println!("      each node a process that joined with an invite through `funcmesh join`;");
    println!("      in this demo every endpoint admits the whole federation (policy `federation`)");
    let endpoint = crate::ops::TestnetEndpoint {
        policy: "federation".into(),
        ..Default::default()
    };
    let net = local_testnet::up(&dir, 2, 2, Role::Endpoint, &endpoint).await?;
    let result = steps(&net, tmp.path()).await;
    let stopped = local_testnet::down(&net).await;
    println!(
        "\n-- cleaned up: stopped {stopped} node process(es), removed {}",
        tmp.path().display()
    );
    result?;
    println!("\ndemo finished: every step behaved as expected");
    Ok(())
}

async fn steps(net: &Testnet, tmp: &std::path::Path) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let view = Client::for_node(&DataDir::new(&a1.data_dir))?;
    println!(
        "\nmembers as node {} ({}) sees them:",
        a1.name,
        a1.institution.as_deref().unwrap_or("-")
    );
    crate::cli::print_peers(&view.peers().await?);

    registry_step(net, tmp).await?;
    compute_step(net).await?;

    println!(
        "\n-- 3. an uninvited node: its institution signed its own admission, not the federation"
    );
    let reason = uninvited_attempt(net, tmp).await?;
    println!("refused by the coordinator: {reason}");
    let listed = view.peers().await?.len();
    println!(
        "node {} still lists {listed} members; the stranger is not among them",
        a1.name
    );

    println!(
        "\n-- 4. stop the coordinator (SIGTERM, pid {})",
        net.coordinator.pid
    );
    local_testnet::kill(net.coordinator.pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while local_testnet::alive(net.coordinator.pid) {
        if Instant::now() > deadline {
            bail!("the coordinator did not stop");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wait until a1 has noticed the coordinator is gone, then show who it still sees.
    let deadline = Instant::now() + Duration::from_secs(10);
    let peers = loop {
        let peers = view.peers().await?;
        if !peers.iter().any(|p| p.peer_id == net.coordinator.peer_id) {
            break peers;
        }
        if Instant::now() > deadline {
            bail!("node {} still lists the stopped coordinator", a1.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("coordinator down; members as {} sees them now:", a1.name);
    crate::cli::print_peers(&peers);
    let expected = net.nodes.len() - 1;
    if peers.len() != expected {
        bail!(
            "expected {expected} members to stay connected, saw {}",
            peers.len()
        );
    }
    println!("the mesh kept running without its coordinator");
    Ok(())
}

/// Registers functions on a node of one institution and shows them on a node of the other.
async fn registry_step(net: &Testnet, tmp: &std::path::Path) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let b1 = net
        .nodes
        .iter()
        .find(|n| n.institution != a1.institution)
        .context("a node of the second institution")?;
    println!(
        "\n-- 2. the registry: {} ({}) registers two functions; {} ({}) lists them",
        a1.name,
        a1.institution.as_deref().unwrap_or("-"),
        b1.name,
        b1.institution.as_deref().unwrap_or("-")
    );
    let on_a = Client::for_node(&DataDir::new(&a1.data_dir))?;
    let on_b = Client::for_node(&DataDir::new(&b1.data_dir))?;
    let source = "def double(x):\n    return 2 * x\n";
    std::fs::write(tmp.join("double.py"), source).context("demo function file")?;
    let python = crate::registry::NewFunction {
        name: "double".into(),
        python: Some(source.into()),
        entrypoint: Some("double".into()),
        payload: None,
        shell: None,
        container: None,
        description: "doubles a number".into(),
    };
    let shell = crate::registry::NewFunction {
        name: "greet".into(),
        python: None,
        entrypoint: None,
        payload: None,
        shell: Some("echo hello {name}".into()),
        container: None,
        description: "says hello".into(),
    };
    let started = Instant::now();
    let ids = [
        on_a.register_function(&python).await?.id,
        on_a.register_function(&shell).await?.id,
    ];
    println!("registered on {}: {}", a1.name, ids.join(", "));
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let fs = on_b.functions().await?;
        if ids.iter().all(|id| fs.iter().any(|f| &f.id == id)) {
            break fs;
        }
        if Instant::now() > deadline {
            bail!(
                "{} does not list the functions registered on {}",
                b1.name,
                a1.name
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "listed on {} {} ms after registration:",
        b1.name,
        started.elapsed().as_millis()
    );
    crate::cli::print_functions(&listed);
    println!(
        "\nendpoints as {} sees them (one per endpoint node, from its config):",
        b1.name
    );
    crate::cli::print_endpoints(&on_b.endpoints().await?);
    Ok(())
}

/// Runs the registered functions from a node of one institution on endpoints of the other.
async fn compute_step(net: &Testnet) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let others: Vec<_> = net
        .nodes
        .iter()
        .filter(|n| n.institution != a1.institution)
        .collect();
    let (Some(b1), Some(b2)) = (others.first(), others.get(1)) else {
        bail!("the demo needs two nodes of the second institution");
    };
    println!(
        "\n-- 2b. compute: {} ({}) runs `double` on {}'s endpoint and `greet` on {}'s ({})",
        a1.name,
        a1.institution.as_deref().unwrap_or("-"),
        b1.name,
        b2.name,
        b1.institution.as_deref().unwrap_or("-"),
    );
    let on_a = Client::for_node(&DataDir::new(&a1.data_dir))?;
    let run = |function: &str, args: serde_json::Value, kwargs: serde_json::Value, on: &str| {
        crate::tasks::NewTask {
            function: function.into(),
            args,
            kwargs,
            endpoint: Some(on.into()),
            ..Default::default()
        }
    };
    let cases = [
        (
            "double",
            serde_json::json!([21]),
            serde_json::json!({}),
            &b1.name,
            "cold: a worker starts",
        ),
        (
            "double",
            serde_json::json!([50]),
            serde_json::json!({}),
            &b1.name,
            "warm: the same worker",
        ),
        (
            "greet",
            serde_json::json!([]),
            serde_json::json!({"name": "federation"}),
            &b2.name,
            "shell",
        ),
    ];
    for (function, args, kwargs, on, note) in cases {
        let started = Instant::now();
        let list = on_a
            .submit_tasks(
                vec![run(function, args.clone(), kwargs, on)],
                Duration::from_secs(30),
            )
            .await?;
        let elapsed = started.elapsed();
        let Some(task) = list.tasks.into_iter().next().and_then(|t| t.task) else {
            bail!("{function} was refused");
        };
        let value = match &task.outcome {
            Some(compute::Outcome::Succeeded { value }) => value.clone(),
            other => bail!("{function} did not succeed: {other:?}"),
        };
        let shown = match value.get("stdout").and_then(|v| v.as_str()) {
            Some(out) => out.trim().to_owned(),
            None => value.to_string(),
        };
        let ran_ms = task.times.finished_us.saturating_sub(task.times.running_us) as f64 / 1000.0;
        println!(
            "{function}({}) on {} = {shown}   [{note}; round trip {:.1} ms, ran {ran_ms:.1} ms{}]",
            if args.as_array().is_some_and(|a| a.is_empty()) {
                "name=federation".to_string()
            } else {
                args[0].to_string()
            },
            task.endpoint.as_deref().unwrap_or("?"),
            elapsed.as_secs_f64() * 1000.0,
            if task.cold_start { ", cold start" } else { "" },
        );
    }
    Ok(())
}

/// A stranger forges an "admission" into our federation with a key that is not the federation's,
/// invites itself, and dials the coordinator, which refuses it.
async fn uninvited_attempt(net: &Testnet, tmp: &std::path::Path) -> anyhow::Result<String> {
    let now = unix_now();
    let federation = DataDir::new(&net.coordinator.data_dir)
        .read_federation()?
        .context("the coordinator's federation")?;
    let not_the_federation_key = SigningKey::generate();
    let inst = SigningKey::generate();
    let admission = Admission::issue(
        &federation,
        &not_the_federation_key,
        "stranger-u",
        inst.public(),
        now,
    );
    let invite = Invite::sign(
        &admission,
        &inst,
        Role::Endpoint,
        Duration::from_secs(600),
        now,
    );
    let keypair = mesh::Keypair::generate_ed25519();
    let proof = Proof::sign_binding(&invite, &federation, &keypair, now);
    let db = tmp.join("stranger-db");
    let store = tokio::task::spawn_blocking(move || store::Store::open(&db)).await??;
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let config = mesh::Config {
        keypair,
        federation,
        proof,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        bootstrap: vec![],
        relay_server: false,
        proof_timeout: Duration::from_secs(5),
        redial_interval: Duration::from_secs(1),
        anti_entropy: Duration::from_secs(10),
        store,
    };
    let handle = mesh::network::spawn(config, cancel.child_token(), &tracker).await?;
    let addr = net
        .coordinator
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .context("coordinator address")?
        .parse()?;
    let outcome = handle.join(addr, Duration::from_secs(10)).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    match outcome {
        Err(mesh::network::Error::Refused { reason, .. }) => Ok(reason),
        Err(e) => bail!("the stranger was not refused as expected: {e}"),
        Ok(_) => bail!("the stranger was admitted: membership checks are broken"),
    }
}
