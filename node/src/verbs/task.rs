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
            if ids.len() > 1 && !node.json {
                return wait_streamed(&client, &ids, timeout).await;
            }
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
            println!("{}", serde_json::to_string_pretty(&list)?);
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

/// `task wait` of several tasks: one line per task, in the order given (its value, or on stderr
/// its error), each printed as soon as it and the tasks before it have finished, as the node
/// pushes them (`/v1/tasks/events`).
async fn wait_streamed(client: &Client, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
    use crate::client::TaskEvent;
    use crate::tasks::TaskView;
    // Subscribed first, then asked where each task is: none finishes unseen in between.
    let mut events = client.task_events().await?;
    let mut done: Vec<Option<TaskView>> = vec![None; ids.len()];
    let mut missing: Vec<Option<String>> = vec![None; ids.len()];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ask = true;
    let (mut printed, mut failed) = (0, 0);
    loop {
        if ask {
            ask = false;
            let list = client.wait_tasks(ids.to_vec(), Duration::ZERO).await?;
            for (i, s) in list.tasks.into_iter().enumerate().take(ids.len()) {
                match (s.task, s.error) {
                    (Some(t), _) if t.status.is_terminal() => done[i] = Some(t),
                    (Some(_), _) => {}
                    (None, e) => missing[i] = Some(e.unwrap_or_default()),
                }
            }
        }
        while printed < ids.len() {
            if let Some(e) = &missing[printed] {
                failed += 1;
                eprintln!("{}: {e}", ids[printed]);
            } else if let Some(t) = &done[printed] {
                if !print_result(t, false) {
                    failed += 1;
                }
            } else {
                break;
            }
            printed += 1;
        }
        if printed == ids.len() {
            break;
        }
        let event = tokio::time::timeout_at(deadline, events.next()).await;
        match event {
            Ok(Ok(Some(TaskEvent::Finished(t)))) => {
                if let Some(i) = ids.iter().position(|id| *id == t.id) {
                    done[i] = Some(*t);
                }
            }
            Ok(Ok(Some(TaskEvent::Lagged(_)))) => ask = true,
            Ok(Ok(None)) => anyhow::bail!("the node closed its task events stream"),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                // Out of time: say where each of the rest is.
                let list = client
                    .wait_tasks(ids[printed..].to_vec(), Duration::ZERO)
                    .await?;
                for (id, s) in ids[printed..].iter().zip(list.tasks) {
                    failed += 1;
                    match s.task {
                        Some(t) => eprintln!(
                            "{id}: still {} after {}",
                            t.status,
                            humantime::format_duration(timeout)
                        ),
                        None => eprintln!("{id}: {}", s.error.unwrap_or_default()),
                    }
                }
                break;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} tasks did not succeed", ids.len());
    }
    Ok(())
}
