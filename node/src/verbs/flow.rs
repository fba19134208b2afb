//! `funcmesh flow …`: check a flow definition, run it on this node, follow, cancel and resume
//! runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

/// `funcmesh flow …`.
#[derive(Debug, Subcommand)]
pub enum FlowCommand {
    /// Check a definition (Globus Flows JSON) without running it; errors name the state and
    /// the field. Without --node, action URLs are checked against the built-in providers.
    Validate {
        /// The definition file.
        file: PathBuf,
        /// A node whose providers the action URLs are checked against.
        #[arg(long, env = "FUNCMESH_NODE", value_name = "DATA_DIR")]
        node: Option<PathBuf>,
    },
    /// Deploy a definition to the federation's registry as a flow (signed by this node).
    Deploy {
        /// The definition file.
        file: PathBuf,
        /// Its title.
        #[arg(long)]
        title: String,
        /// A JSON Schema file every run's input must match.
        #[arg(long)]
        input_schema: Option<PathBuf>,
        /// What it does.
        #[arg(long)]
        description: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// The flows deployed in the federation.
    List {
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Run a flow on this node: a deployed flow (id, id prefix or title) or a definition file.
    Run {
        /// The flow, or a definition file.
        flow: String,
        /// The run's input: JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        input: String,
        /// A label for the run.
        #[arg(long)]
        label: Option<String>,
        /// The run's id (idempotent: running an id again answers that run).
        #[arg(long)]
        id: Option<String>,
        /// Wait for the run to end and print its output.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Run it on another node (name or peer id) instead: a deployed flow, of that node's
        /// institution or your own, acting with the rights you delegate (--capability).
        #[arg(long)]
        at: Option<String>,
        /// Who else may see the run: institution:NAME or node:NAME (repeatable).
        #[arg(long = "monitor")]
        monitors: Vec<String>,
        /// Who else may see, cancel and resume it (repeatable).
        #[arg(long = "manager")]
        managers: Vec<String>,
        /// A token delegated to the hosting node for the run's actions (with --at; repeatable).
        #[arg(long = "capability", requires = "at")]
        capabilities: Vec<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// The runs this node hosts.
    Runs {
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// A run's status.
    Status {
        /// The run id.
        id: String,
        /// The node hosting the run, when it is not --node (name or peer id).
        #[arg(long)]
        at: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// A run's log: every transition, in order.
    Log {
        /// The run id.
        id: String,
        /// The node hosting the run, when it is not --node (name or peer id).
        #[arg(long)]
        at: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Cancel a run.
    Cancel {
        /// The run id.
        id: String,
        /// The node hosting the run, when it is not --node (name or peer id).
        #[arg(long)]
        at: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Resume a run that is INACTIVE (after the right it waited for was granted).
    Resume {
        /// The run id.
        id: String,
        /// The node hosting the run, when it is not --node (name or peer id).
        #[arg(long)]
        at: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
}

fn read_json(what: &str, path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{what} {} is not JSON", path.display()))
}

fn input_of(arg: &str) -> anyhow::Result<serde_json::Value> {
    match arg.strip_prefix('@') {
        Some(file) => read_json("the input file", Path::new(file)),
        None => serde_json::from_str(arg)
            .context("--input is not JSON (give JSON such as '{\"x\": 1}', or @FILE)"),
    }
}

fn print_run(r: &flows::engine::Run) {
    println!("run        {}", r.run_id);
    println!(
        "status     {}",
        serde_json::to_value(r.status)
            .unwrap_or_default()
            .as_str()
            .unwrap_or("?")
    );
    if let Some(s) = &r.state {
        println!("state      {s}");
    }
    if let Some(l) = &r.label {
        println!("label      {l}");
    }
    println!("started    {}", r.start_time);
    if let Some(t) = &r.completion_time {
        println!("ended      {t}");
    }
    if !r.details.is_null() {
        println!(
            "details    {}",
            serde_json::to_string_pretty(&r.details).unwrap_or_default()
        );
    }
}

pub(crate) async fn flow_command(cmd: FlowCommand) -> anyhow::Result<()> {
    match cmd {
        FlowCommand::Validate { file, node } => {
            let def = read_json("the definition", &file)?;
            let v = match node {
                Some(n) => {
                    Client::for_node(&DataDir::new(&n))?
                        .validate_flow(&def)
                        .await?
                }
                None => serde_json::to_value(
                    crate::runs::validate(&def, &crate::runs::providers())
                        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
                )?,
            };
            println!(
                "{}: valid ({} states; action URLs: {})",
                file.display(),
                v["states"],
                v["action_urls"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "none".into())
            );
            Ok(())
        }
        FlowCommand::Deploy {
            file,
            title,
            input_schema,
            description,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let mut body = serde_json::json!({
                "definition": read_json("the definition", &file)?,
                "title": title,
            });
            if let Some(s) = input_schema {
                body["input_schema"] = read_json("the input schema", &s)?;
            }
            if let Some(d) = description {
                body["description"] = d.into();
            }
            let written = client.deploy_flow(&body).await?;
            show(node.json, &written, |w| {
                println!("{}", w["id"].as_str().unwrap_or("?"))
            })
        }
        FlowCommand::List { node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let flows = client.flows().await?;
            show(node.json, &flows, |flows| {
                for f in flows {
                    println!("{:<56} {}", f.id, f.record.title);
                }
            })
        }
        FlowCommand::Run {
            flow,
            input,
            label,
            id,
            wait,
            timeout,
            at,
            monitors,
            managers,
            capabilities,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let file = Path::new(&flow);
            let mut body = if file.is_file() {
                serde_json::json!({"definition": read_json("the definition", file)?})
            } else {
                serde_json::json!({"flow_id": flow})
            };
            body["input"] = input_of(&input)?;
            if let Some(l) = label {
                body["label"] = l.into();
            }
            if let Some(i) = id {
                body["run_id"] = i.into();
            }
            if let Some(a) = &at {
                body["at"] = a.clone().into();
            }
            body["monitors"] = monitors.into();
            body["managers"] = managers.into();
            body["capabilities"] = capabilities
                .iter()
                .map(|t| crate::capabilities::token_arg(t).map(|b| capability::to_text(&b)))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into();
            let mut run = client.start_run(&body).await?;
            if wait {
                let deadline = tokio::time::Instant::now() + timeout;
                let mut pause = Duration::from_millis(20);
                // INACTIVE waits for someone: say so rather than wait for nothing.
                while !run.status.is_final() && run.status != flows::engine::RunStatus::Inactive {
                    anyhow::ensure!(
                        tokio::time::Instant::now() < deadline,
                        "run {} is still {:?} after {}: `funcmesh flow status {}` follows it",
                        run.run_id,
                        run.status,
                        humantime::format_duration(timeout),
                        run.run_id
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                    run = client.run_at(&run.run_id, at.as_deref()).await?;
                }
            }
            show(node.json, &run, print_run)?;
            if run.status == flows::engine::RunStatus::Failed {
                anyhow::bail!("run {} failed", run.run_id);
            }
            if wait && run.status == flows::engine::RunStatus::Inactive {
                anyhow::bail!(
                    "run {} is INACTIVE: it waits for what its details name; `funcmesh flow \
                     resume {}` after that is done",
                    run.run_id,
                    run.run_id
                );
            }
            Ok(())
        }
        FlowCommand::Runs { node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let runs = client.runs().await?;
            show(node.json, &runs, |runs| {
                for r in runs {
                    println!(
                        "{:<28} {:<10} {}",
                        r.run_id,
                        serde_json::to_value(r.status)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or("?"),
                        r.label.as_deref().unwrap_or("")
                    );
                }
            })
        }
        FlowCommand::Status { id, at, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let run = client.run_at(&id, at.as_deref()).await?;
            show(node.json, &run, print_run)
        }
        FlowCommand::Log { id, at, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let log = client.run_log_at(&id, at.as_deref()).await?;
            show(node.json, &log, |log| {
                for e in log {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                }
            })
        }
        FlowCommand::Cancel { id, at, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let run = client.run_op_at(&id, "cancel", at.as_deref()).await?;
            show(node.json, &run, print_run)
        }
        FlowCommand::Resume { id, at, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let run = client.run_op_at(&id, "resume", at.as_deref()).await?;
            show(node.json, &run, print_run)
        }
    }
}
