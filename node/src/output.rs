//! What the CLI prints, and where a client command finds its node: `--node` and `--json`
//! ([`NodeArgs`]), records printed as JSON or as a table for people (`show`).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

/// Where a client command finds its node.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Data dir of the node to talk to.
    #[arg(long, env = "FUNCMESH_NODE", value_name = "DATA_DIR")]
    pub node: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Prints `value` as pretty JSON with `--json`, else as `table` draws it.
pub(crate) fn show<T: Serialize>(
    json: bool,
    value: &T,
    table: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        table(value);
    }
    Ok(())
}

/// Prints a task's value (stdout) or error (stderr); returns whether it succeeded.
pub(crate) fn print_result(t: &crate::tasks::TaskView, bare: bool) -> bool {
    use compute::Outcome;
    match &t.outcome {
        Some(Outcome::Succeeded {
            value_ref: Some(r), ..
        }) => {
            let note = format!(
                "<{} bytes by reference (blake3 {}): `funcmesh task value {}` prints it>",
                r.size, r.blake3, t.id
            );
            if bare {
                eprintln!("{note}");
            } else {
                println!("{}  {note}", t.id);
            }
            true
        }
        Some(Outcome::Succeeded { value, .. }) => {
            // A shell function's result is its output: show it as the command would.
            let shell = value.get("returncode").is_some() && value.get("stdout").is_some();
            if bare && shell {
                print!("{}", value["stdout"].as_str().unwrap_or_default());
                eprint!("{}", value["stderr"].as_str().unwrap_or_default());
                return true;
            }
            let text = serde_json::to_string(value).unwrap_or_default();
            if bare {
                println!("{text}");
            } else {
                println!("{}  {text}", t.id);
            }
            true
        }
        Some(Outcome::Failed { error, value }) => {
            if let Some(v) = value {
                if let Some(out) = v.get("stdout").and_then(|o| o.as_str()) {
                    print!("{out}");
                }
                if let Some(err) = v.get("stderr").and_then(|o| o.as_str()) {
                    eprint!("{err}");
                }
            }
            if let Some(tb) = &error.traceback {
                eprint!("{tb}");
                if !tb.ends_with('\n') {
                    eprintln!();
                }
            }
            eprintln!(
                "task {} failed on {}: {}: {}",
                t.id,
                t.endpoint.as_deref().unwrap_or("?"),
                error.type_name,
                error.message
            );
            false
        }
        Some(Outcome::Cancelled { reason }) => {
            eprintln!("task {} was cancelled: {reason}", t.id);
            false
        }
        None => {
            eprintln!("task {} is still {}", t.id, t.status);
            false
        }
    }
}

pub(crate) fn print_task(t: &crate::tasks::TaskView) {
    let at = |us: u64| {
        if us == 0 {
            "-".to_string()
        } else {
            let base = t.times.submitted_us;
            format!("+{:.3} ms", (us.saturating_sub(base)) as f64 / 1000.0)
        }
    };
    println!("id           {}", t.id);
    println!("function     {} ({})", t.function, t.function_id);
    println!("status       {}", t.status);
    println!("endpoint     {}", t.endpoint.as_deref().unwrap_or("-"));
    println!("attempts     {}", t.attempts);
    for l in &t.lost {
        println!("  lost       {l}");
    }
    println!("environment  {}", t.environment.as_deref().unwrap_or("-"));
    println!(
        "worker       {}{}",
        t.worker.as_deref().unwrap_or("-"),
        if t.cold_start { " (cold start)" } else { "" }
    );
    println!("submitted    {}", at(t.times.submitted_us));
    println!("received     {}", at(t.times.received_us));
    println!("queued       {}", at(t.times.queued_us));
    println!("waiting      {}", at(t.times.waiting_us));
    println!("running      {}", at(t.times.running_us));
    println!("finished     {}", at(t.times.finished_us));
    if let Some(compute::Outcome::Failed { error, .. }) = &t.outcome {
        println!("error        {}: {}", error.type_name, error.message);
    }
}

pub(crate) async fn finish_result(
    client: &crate::client::Client,
    t: &crate::tasks::TaskView,
    json: bool,
) -> anyhow::Result<()> {
    if !json && t.outcome.as_ref().and_then(|o| o.value_ref()).is_some() {
        // A value by reference is printed whole, as an inline one is.
        client.task_value(&t.id, None).await?;
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(t)?);
        return Ok(());
    }
    if !t.status.is_terminal() {
        anyhow::bail!(
            "task {} is still {}: wait with `funcmesh task wait {}`",
            t.id,
            t.status,
            t.id
        );
    }
    if print_result(t, true) {
        Ok(())
    } else {
        anyhow::bail!("task {} {}", t.id, t.status)
    }
}

pub(crate) fn container_str(c: &Option<crdt_registry::record::Container>) -> String {
    c.as_ref()
        .map_or_else(|| "-".into(), |c| format!("{}:{}", c.runtime, c.image))
}

pub(crate) fn short(peer: &str) -> &str {
    peer.get(peer.len().saturating_sub(8)..).unwrap_or(peer)
}

/// Prints functions as a table.
pub(crate) fn print_functions(fs: &[crdt_registry::Function]) {
    println!(
        "{:<32}  {:<20} {:<6} {:<14} {:<10} CONTAINER",
        "ID", "NAME", "KIND", "INSTITUTION", "OWNER"
    );
    for f in fs {
        let kind = match f.record.kind {
            crdt_registry::record::FunctionKind::Python => "python",
            crdt_registry::record::FunctionKind::Shell => "shell",
        };
        println!(
            "{:<32}  {:<20} {:<6} {:<14} ..{:<8} {}",
            f.id,
            f.record.name,
            kind,
            f.institution.as_deref().unwrap_or("-"),
            short(&f.owner_peer),
            container_str(&f.record.container)
        );
    }
}

pub(crate) fn print_function(f: &crdt_registry::Function) {
    use crdt_registry::record::FunctionSpec;
    println!("id           {}", f.id);
    println!("name         {}", f.record.name);
    println!("owner        {}", f.owner_peer);
    println!("institution  {}", f.institution.as_deref().unwrap_or("-"));
    println!("container    {}", container_str(&f.record.container));
    println!(
        "registered   {}",
        mesh::membership::rfc3339(f.record.created_ms / 1000)
    );
    if !f.record.description.is_empty() {
        println!("description  {}", f.record.description);
    }
    match &f.record.spec {
        FunctionSpec::PythonSource { source, entrypoint } => {
            println!("kind         python, entrypoint {entrypoint}");
            println!("---");
            print!("{source}");
            if !source.ends_with('\n') {
                println!();
            }
        }
        FunctionSpec::PythonPayload { payload } => {
            println!(
                "kind         python, serialized ({} bytes base64)",
                payload.len()
            );
        }
        FunctionSpec::Shell { command } => {
            println!("kind         shell");
            println!("command      {command}");
        }
    }
}

pub(crate) fn tags_str(tags: &std::collections::BTreeMap<String, String>) -> String {
    if tags.is_empty() {
        return "-".into();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Prints endpoints as a table.
pub(crate) fn print_endpoints(eps: &[crdt_registry::Endpoint]) {
    println!(
        "{:<32}  {:<12} {:<10} {:<14} {:<16} {:<26} TAGS",
        "ID", "NAME", "NODE", "INSTITUTION", "RUNTIMES", "POLICY"
    );
    for e in eps {
        println!(
            "{:<32}  {:<12} ..{:<8} {:<14} {:<16} {:<26} {}",
            e.id,
            e.record.name,
            short(&e.peer_id),
            e.institution.as_deref().unwrap_or("-"),
            e.record.runtimes.join(","),
            e.record.policy.as_str(),
            tags_str(&e.record.capabilities.tags)
        );
    }
}

pub(crate) fn print_endpoint(e: &crdt_registry::Endpoint) {
    let c = &e.record.capabilities;
    println!("id           {}", e.id);
    println!("name         {}", e.record.name);
    println!("node         {}", e.peer_id);
    println!("institution  {}", e.institution.as_deref().unwrap_or("-"));
    println!("runtimes     {}", e.record.runtimes.join(", "));
    println!("cores        {}", c.cores);
    println!("memory       {} MiB", c.memory_mb);
    println!("gpus         {}", c.gpus);
    println!("tags         {}", tags_str(&c.tags));
    println!("policy       {}", e.record.policy.as_str());
    println!("public       {}", e.record.public);
    match e.record.host_isolation.as_str() {
        "" => {}
        "uid" => {
            println!("host tasks   each worker runs as a uid of its own, outside the data dir")
        }
        "node-user" => println!(
            "host tasks   run as the node's own user: other institutions' host tasks are refused"
        ),
        other => println!(
            "host tasks   run as the node's own user ({other}): FOREIGN CODE CAN READ THIS NODE'S \
             KEY, API TOKEN AND STORE"
        ),
    }
    if !e.record.description.is_empty() {
        println!("description  {}", e.record.description);
    }
}

/// Prints members as a table.
pub(crate) fn print_peers(peers: &[mesh::PeerInfo]) {
    println!(
        "{:<54} {:<12} {:<14} {:>6}  ADDRESS",
        "PEER", "ROLE", "INSTITUTION", "UP(s)"
    );
    for p in peers {
        println!(
            "{:<54} {:<12} {:<14} {:>6}  {}",
            p.peer_id,
            p.role.to_string(),
            p.institution.as_deref().unwrap_or("-"),
            p.connected_for_secs,
            p.addrs.first().map(String::as_str).unwrap_or("-")
        );
    }
}

pub(crate) fn print_capability(v: &crate::capabilities::CapabilityView) {
    println!("id        {}", v.id);
    println!(
        "endpoint  {}",
        v.endpoint_name
            .as_deref()
            .map_or_else(|| v.endpoint.clone(), |n| format!("{n} ({})", v.endpoint))
    );
    println!("status    {}", v.status);
    for line in &v.chain {
        println!("  {line}");
    }
}
