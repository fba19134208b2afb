//! `funcmesh task …`: follow, fetch, wait for or cancel tasks this node submitted.

use std::time::Duration;

use clap::Subcommand;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

/// `funcmesh task …`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Show a task's status, endpoint and timings.
    Status {
        /// The task id.
        id: String,
        /// The node that submitted it.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print a finished task's result (exit status 1 if it failed).
    Result {
        /// The task id.
        id: String,
        /// The node that submitted it.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Print a succeeded task's value as JSON, also one that came by reference (a large one:
    /// give --out to write it to a file).
    Value {
        /// The task id.
        id: String,
        /// Write it here instead of to stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// The node that submitted it.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Wait for a task to finish, then print its result.
    Wait {
        /// The task ids (one or more).
        #[arg(required = true)]
        ids: Vec<String>,
        /// How long to wait.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The node that submitted it.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Cancel a task (its worker is stopped if it runs).
    Cancel {
        /// The task id.
        id: String,
        /// The node that submitted it.
        #[command(flatten)]
        node: NodeArgs,
    },
}

pub(crate) async fn task_command(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Status { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let t = client.task(&id).await?;
            show(node.json, &t, |t| {
                print_task(t);
            })
        }
        TaskCommand::Result { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let t = client.task(&id).await?;
            finish_result(&client, &t, node.json).await
        }
        TaskCommand::Value { id, out, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let n = client.task_value(&id, out.as_deref()).await?;
            if let Some(out) = out {
                eprintln!("wrote {n} bytes to {}", out.display());
            }
            Ok(())
        }
        TaskCommand::Wait { ids, timeout, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let list = client.wait_tasks(ids.clone(), timeout).await?;
            if let [id] = ids.as_slice() {
                let Some(s) = list.tasks.into_iter().next() else {
                    anyhow::bail!("no answer for task {id}");
                };
                return match (s.task, s.error) {
                    (Some(t), _) => finish_result(&client, &t, node.json).await,
                    (None, e) => anyhow::bail!("{}", e.unwrap_or_default()),
                };
            }
            if node.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            // One line per task, in the order given: its value, or (on stderr) its error.
            let mut failed = 0;
            for (id, s) in ids.iter().zip(&list.tasks) {
                match (&s.task, &s.error) {
                    (Some(t), _) if t.status.is_terminal() => {
                        if !print_result(t, false) {
                            failed += 1;
                        }
                    }
                    (Some(t), _) => {
                        failed += 1;
                        eprintln!(
                            "{id}: still {} after {}",
                            t.status,
                            humantime::format_duration(timeout)
                        );
                    }
                    (None, e) => {
                        failed += 1;
                        eprintln!("{id}: {}", e.clone().unwrap_or_default());
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} tasks did not succeed", ids.len());
            }
            Ok(())
        }
        TaskCommand::Cancel { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let t = client.cancel_task(&id).await?;
            show(node.json, &t, |t| {
                println!("{} {}", t.id, t.status);
            })
        }
    }
}
