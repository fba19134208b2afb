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
    println!(
        "      every endpoint has the default policy: its own institution, and holders of a \
         capability token"
    );
    let endpoint = crate::ops::TestnetEndpoint::default();
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
    crate::output::print_peers(&view.peers().await?);

    registry_step(net, tmp).await?;
    compute_step(net).await?;
    transfer_step(net).await?;
    flow_step(net).await?;

    println!(
        "\n-- 3. an uninvited node: its institution signed its own admission, not the federation"
    );
    let reason = uninvited_attempt(net, tmp).await?;
    println!("refused by the coordinator: {reason}");
    println!(
        "\n-- 3b. an invite rebuilt from what {} shows every member (its membership proof)",
        a1.name
    );
    let reason = rebuilt_invite_attempt(net, tmp).await?;
    println!("refused: {reason}");
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
    crate::output::print_peers(&peers);
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

/// Copies a directory from an endpoint of the first institution to one of the second, under a
/// grant narrowed to that directory; shows a read outside it refused.
async fn transfer_step(net: &Testnet) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let b1 = net
        .nodes
        .iter()
        .find(|n| n.institution != a1.institution)
        .context("the demo needs a second institution")?;
    let (Some(inst_a), Some(inst_b)) = (a1.institution.as_deref(), b1.institution.as_deref())
    else {
        bail!("the demo needs two institutions");
    };
    let (on_a, on_b) = (
        Client::for_node(&DataDir::new(&a1.data_dir))?,
        Client::for_node(&DataDir::new(&b1.data_dir))?,
    );
    let data = a1.data_dir.join("data");
    let mut bytes = 0u64;
    for i in 0..20u32 {
        let dir = data.join(format!("shared/run{}", i % 3));
        std::fs::create_dir_all(&dir)?;
        let body: Vec<u8> = (0..(i as usize + 1) * 40_000)
            .map(|j| (j as u32).wrapping_mul(2_654_435_761).wrapping_add(i) as u8)
            .collect();
        bytes += body.len() as u64;
        std::fs::write(dir.join(format!("sample{i}.dat")), body)?;
    }
    std::fs::create_dir_all(data.join("private"))?;
    std::fs::write(data.join("private/notes.txt"), b"inst-a only")?;
    println!(
        "\n-- 2e. transfer: {} ({inst_a}) exposes {} as its data root; {inst_a}'s admin grants \
         {inst_b} transfer.read below `shared` only (`funcmesh cap grant --ability \
         transfer.read --path shared`)",
        a1.name,
        data.display()
    );
    let key_a = net
        .institutions
        .iter()
        .find(|i| i.name == inst_a)
        .context("institution key")?;
    let (_, seed, _) = crate::capabilities::institution_key(&key_a.key)?;
    let b_key = on_b
        .institutions()
        .await?
        .into_iter()
        .find(|i| i.name == inst_b)
        .context("institution b in the registry")?
        .key;
    let token = crate::capabilities::grant(
        &seed,
        &capability::Grant {
            paths: vec!["shared".into()],
            to: b_key,
            endpoint: on_a.endpoint(&a1.name).await?.id,
            functions: vec![],
            abilities: vec![capability::Ability::TransferRead],
            expires: unix_now() + 3600,
            not_before: None,
        },
    )?;
    on_b.add_capability(&token).await?;
    let started = Instant::now();
    let job = on_b
        .new_transfer(&crate::transfers::NewTransfer {
            request_id: Some("demo-copy".into()),
            source: format!("{}:shared", a1.name),
            destination: format!("{}:incoming", b1.name),
            recursive: true,
            sync: None,
            delete: false,
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let j = on_b.transfer(&job.id).await?;
        if j.state != transfer::copy::State::Active {
            break j;
        }
        if Instant::now() > deadline {
            bail!("the copy did not finish within a minute: {:?}", j.progress);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if job.state != transfer::copy::State::Succeeded || job.progress.bytes_done != bytes {
        bail!("the copy did not succeed: {job:?}");
    }
    println!(
        "{} pulled {}:shared into {}:incoming directly from {} over QUIC: {} files, {} bytes, \
         every 16 KiB verified against its BLAKE3 hash, in {} ms (`funcmesh transfer copy \
         {}:shared {}:incoming --recursive`)",
        b1.name,
        a1.name,
        b1.name,
        a1.name,
        job.progress.files_done,
        job.progress.bytes_done,
        started.elapsed().as_millis(),
        a1.name,
        b1.name
    );
    match on_b.ls(&format!("{}:private", a1.name)).await {
        Ok(_) => bail!(
            "{} listed {}:private without a grant for it",
            b1.name,
            a1.name
        ),
        Err(e) => println!("{} lists {}:private: refused, {e:#}", b1.name, a1.name),
    }
    Ok(())
}

/// Runs a flow on the second institution's node: it moves a directory from the first
/// institution's endpoint (under the grant of the transfer step), lists what arrived, and
/// analyses the listing with a function on its own endpoint; every transition is in the run's
/// log, in the node's store.
async fn flow_step(net: &Testnet) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let b1 = net
        .nodes
        .iter()
        .find(|n| n.institution != a1.institution)
        .context("the demo needs a second institution")?;
    let on_b = Client::for_node(&DataDir::new(&b1.data_dir))?;
    let summarize = crate::registry::NewFunction {
        name: "summarize".into(),
        python: Some(
            "def summarize(listing):\n    sizes = [f['size'] for f in listing if f['type'] == 'file']\n    \
             return {'files': len(sizes), 'bytes': sum(sizes), 'largest': max(sizes)}\n"
                .into(),
        ),
        entrypoint: Some("summarize".into()),
        payload: None,
        shell: None,
        container: None,
        description: "sums up a directory listing".into(),
    };
    on_b.register_function(&summarize).await?;
    let definition = serde_json::json!({
        "Comment": "Move a run's data from inst-a, then analyse what arrived",
        "StartAt": "Move",
        "States": {
            "Move": {
                "Type": "Action",
                "ActionUrl": "https://transfer.actions.globus.org/transfer",
                "Parameters": {
                    "source_endpoint.$": "$.source", "destination_endpoint.$": "$.destination",
                    "DATA": [{"source_path": "/~/shared/run2", "destination_path": "/~/analysis/run2"}]
                },
                "ResultPath": "$.moved", "Next": "List"
            },
            "List": {
                "Type": "Action",
                "ActionUrl": "https://transfer.actions.globus.org/ls",
                "Parameters": {"endpoint_id.$": "$.destination", "path": "/~/analysis/run2"},
                "ResultPath": "$.listing", "Next": "Analyse"
            },
            "Analyse": {
                "Type": "Action",
                "ActionUrl": "https://compute.actions.globus.org/v3",
                "Parameters": {
                    "endpoint_id.$": "$.destination",
                    "tasks": [{"function_id": "summarize", "kwargs": {"listing.$": "$.listing.details.DATA"}}]
                },
                "ResultPath": "$.analysis", "End": true
            }
        }
    });
    println!(
        "\n-- 2f. a flow on {}: move {}:shared/run2 here (transfer), list it (ls), analyse the \
         listing with a function on {}'s endpoint (compute) — Globus Flows' language, run durably \
         (`funcmesh flow run FILE --wait`)",
        b1.name, a1.name, b1.name
    );
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let mut run = on_b
            .start_run(&serde_json::json!({
                "definition": definition,
                "input": {"source": a1.name, "destination": b1.name},
                "run_id": format!("demo-flow-{}", started.elapsed().as_millis()),
            }))
            .await?;
        while !run.status.is_final() {
            if Instant::now() > deadline {
                bail!("the flow did not finish within a minute: {run:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            run = on_b.run(&run.run_id).await?;
        }
        // The first adverts take a moment: a run that found no route yet is tried again.
        let no_route = run.details.to_string().contains("no endpoint");
        if run.status == flows::engine::RunStatus::Succeeded || !no_route {
            break run;
        }
        if Instant::now() > deadline {
            bail!(
                "the flow found no endpoint within a minute: {}",
                run.details
            );
        }
    };
    if run.status != flows::engine::RunStatus::Succeeded {
        bail!("the flow did not succeed: {}", run.details);
    }
    let out = &run.details["output"];
    let log = on_b.run_log(&run.run_id).await?;
    println!(
        "run {} succeeded in {} ms, {} transitions in its log: moved {} files, listed {}, \
         analysis {}",
        run.run_id,
        started.elapsed().as_millis(),
        log.len(),
        out["moved"]["details"]["files_transferred"],
        out["listing"]["details"]["total"],
        out["analysis"]["details"]["result"][0]
    );
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
    crate::output::print_functions(&listed);
    println!(
        "\nendpoints as {} sees them (one per endpoint node, from its config):",
        b1.name
    );
    crate::output::print_endpoints(&on_b.endpoints().await?);
    Ok(())
}

/// Runs the registered functions from a node of one institution on endpoints of the other.
async fn compute_step(net: &Testnet) -> anyhow::Result<()> {
    let a1 = &net.nodes[0];
    let ours: Vec<_> = net
        .nodes
        .iter()
        .filter(|n| n.institution == a1.institution)
        .collect();
    let b1 = net
        .nodes
        .iter()
        .find(|n| n.institution != a1.institution)
        .context("the demo needs a second institution")?;
    let (Some(a2), Some(inst_a), Some(inst_b)) = (
        ours.get(1),
        a1.institution.as_deref(),
        b1.institution.as_deref(),
    ) else {
        bail!("the demo needs two nodes of the first institution");
    };
    let on_b = Client::for_node(&DataDir::new(&b1.data_dir))?;
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
    // Waits for the first adverts; returns the task, or why it was refused or failed.
    let submit = |task: crate::tasks::NewTask| {
        let on_b = on_b.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let list = on_b
                    .submit_tasks(vec![task.clone()], Duration::from_secs(30))
                    .await?;
                let one = list.tasks.into_iter().next().context("no answer")?;
                match (one.task, one.error) {
                    (Some(t), _) => return anyhow::Ok(Ok(t)),
                    (None, Some(e))
                        if e.contains("not advertised") && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    (None, e) => return Ok(Err(e.unwrap_or_default())),
                }
            }
        }
    };

    println!(
        "\n-- 2b. capabilities: {} ({inst_b}) asks for `double` on {}'s endpoint ({inst_a}) \
         without a token",
        b1.name, a1.name
    );
    match submit(run(
        "double",
        serde_json::json!([21]),
        serde_json::json!({}),
        &a1.name,
    ))
    .await?
    {
        Err(why) => println!("refused by {}'s router: {why}", b1.name),
        Ok(t) => bail!("the task was accepted without a token: {:?}", t.outcome),
    }

    let key_a = net
        .institutions
        .iter()
        .find(|i| i.name == inst_a)
        .context("institution key")?;
    let (_, seed, _) = crate::capabilities::institution_key(&key_a.key)?;
    let b_key = on_b
        .institutions()
        .await?
        .into_iter()
        .find(|i| i.name == inst_b)
        .context("institution b in the registry")?
        .key;
    let expires = unix_now() + 3600;
    let mut tokens = Vec::new();
    for node in [a1, *a2] {
        let endpoint = on_a.endpoint(&node.name).await?.id;
        let token = crate::capabilities::grant(
            &seed,
            &capability::Grant {
                paths: vec![],
                to: b_key,
                endpoint,
                functions: vec![],
                abilities: vec![capability::Ability::ComputeRun],
                expires,
                not_before: None,
            },
        )?;
        on_b.add_capability(&token).await?;
        tokens.push(token);
    }
    println!(
        "{inst_a}'s admin grants {inst_b} compute.run on {} and {} for an hour (`funcmesh cap \
         grant`); {} holds the tokens (`funcmesh cap add`):",
        a1.name, a2.name, b1.name
    );
    // The registry reaches b1 within moments; wait until its verifier knows every institution.
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let held = on_b.capabilities().await?;
        if held.iter().all(|c| c.status == "usable") || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for view in held.iter().take(1) {
        for line in &view.chain {
            println!("    {line}");
        }
        println!("    status: {}", view.status);
    }

    let cases = [
        (
            "double",
            serde_json::json!([21]),
            serde_json::json!({}),
            &a1.name,
            "cold: a worker starts",
        ),
        (
            "double",
            serde_json::json!([50]),
            serde_json::json!({}),
            &a1.name,
            "warm: the same worker",
        ),
        (
            "greet",
            serde_json::json!([]),
            serde_json::json!({"name": "federation"}),
            &a2.name,
            "shell",
        ),
    ];
    println!(
        "\n-- 2c. compute: {} ({inst_b}) runs `double` on {}'s endpoint and `greet` on {}'s \
         ({inst_a}), presenting the tokens",
        b1.name, a1.name, a2.name
    );
    for (function, args, kwargs, on, note) in cases {
        let started = Instant::now();
        let task = match submit(run(function, args.clone(), kwargs, on)).await? {
            Ok(t) => t,
            Err(why) => bail!("{function} was refused: {why}"),
        };
        let elapsed = started.elapsed();
        let value = match &task.outcome {
            Some(compute::Outcome::Succeeded { value, .. }) => value.clone(),
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

    // A result too large to travel with its task goes by reference.
    let size: u64 = 50 << 20;
    on_b.register_function(&crate::registry::NewFunction {
        name: "make_data".into(),
        python: Some("def make_data(n):\n    return 'x' * n\n".into()),
        entrypoint: Some("make_data".into()),
        payload: None,
        shell: None,
        container: None,
        description: "returns n characters of text".into(),
    })
    .await?;
    let started = Instant::now();
    let task = match submit(run(
        "make_data",
        serde_json::json!([size]),
        serde_json::json!({}),
        &a2.name,
    ))
    .await?
    {
        Ok(t) => t,
        Err(why) => bail!("make_data was refused: {why}"),
    };
    let Some(r) = task.outcome.as_ref().and_then(|o| o.value_ref()).cloned() else {
        bail!(
            "make_data's 50 MiB result did not come by reference: {:?}",
            task.status
        );
    };
    let out = b1.data_dir.join("make_data.json");
    let got = on_b.task_value(&task.id, Some(&out)).await?;
    let _ = std::fs::remove_file(&out);
    if got != size + 2 || r.size != size + 2 {
        bail!(
            "make_data's value is {got} bytes, its reference says {}",
            r.size
        );
    }
    println!(
        "make_data({size}) on {} = a {} MiB string, by reference: {}'s worker streamed it into \
         a blob (blake3 {}…), {} fetched it over QUIC; {} ms in all (`funcmesh task value ID`)",
        a2.name,
        size >> 20,
        a2.name,
        &r.blake3[..16],
        b1.name,
        started.elapsed().as_millis()
    );

    println!(
        "\n-- 2d. {inst_a} revokes its grant for {} (`funcmesh cap revoke`); the revocation \
         spreads through the registry",
        a1.name
    );
    let (_, signing) = mesh::keys::read_signing_key(&key_a.key, mesh::keys::KeyKind::Institution)?;
    let chain = capability::inspect(
        &capability::from_text(&tokens[0]).map_err(|e| anyhow::anyhow!("{e}"))?,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let federation = on_a.status().await?.federation_id;
    let entry = crate::capabilities::revocation_entry(
        &federation,
        &signing,
        &chain.blocks[0].revocation_id,
        "the demo's collaboration ended",
    );
    on_a.insert_entry(entry.bytes()).await?;
    let revoked = Instant::now();
    loop {
        match submit(run(
            "double",
            serde_json::json!([1]),
            serde_json::json!({}),
            &a1.name,
        ))
        .await?
        {
            Ok(t) => match &t.outcome {
                Some(compute::Outcome::Failed { error, .. }) => {
                    println!(
                        "{}'s next task is refused after {:.1} s: {}",
                        b1.name,
                        revoked.elapsed().as_secs_f64(),
                        error.message
                    );
                    break;
                }
                _ if revoked.elapsed() > Duration::from_secs(10) => {
                    bail!("the revoked token was still accepted after 10 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            },
            Err(why) => {
                println!(
                    "{}'s router no longer offers {} after {:.1} s: {why}",
                    b1.name,
                    a1.name,
                    revoked.elapsed().as_secs_f64()
                );
                break;
            }
        }
    }
    Ok(())
}

/// Someone who has seen a member's proof (every member has: it is in the registry) rebuilds the
/// invite string it came from and joins with it. The proof carries the invite's signed terms but
/// not its one-time secret, so the rebuilt invite binds nothing.
async fn rebuilt_invite_attempt(net: &Testnet, tmp: &std::path::Path) -> anyhow::Result<String> {
    let (federation, published) = DataDir::new(&net.nodes[0].data_dir).read_membership()?;
    let rebuilt = Invite::rebuilt_from(&published, federation.genesis, rand::random())
        .context("a1's proof is a member's proof")?;
    let addr = net
        .coordinator
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .context("coordinator address")?;
    let dir = DataDir::new(tmp.join("rebuilt-invite"));
    match crate::ops::join(&dir, addr, &rebuilt.encode(), &[], Duration::from_secs(10)).await {
        Err(e) => Ok(format!("{e:#}")),
        Ok(node) => {
            let _ = node.shutdown().await;
            bail!("a rebuilt invite joined: membership checks are broken")
        }
    }
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
        reserve_relay: false,
        proof_timeout: Duration::from_secs(5),
        redial_interval: Duration::from_secs(1),
        anti_entropy: Duration::from_secs(10),
        max_connections: mesh::network::DEFAULT_MAX_CONNECTIONS,
        idle_after: mesh::network::DEFAULT_IDLE_AFTER,
        store,
        checkpoint: None,
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
        Err(mesh::network::JoinError::Refused { reason, .. }) => Ok(reason),
        Err(e) => bail!("the stranger was not refused as expected: {e}"),
        Ok(_) => bail!("the stranger was admitted: membership checks are broken"),
    }
}
