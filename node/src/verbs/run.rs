//! `funcmesh run`: one task, or many from a JSON Lines file, with `--wait` for the results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

/// `funcmesh run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The function: id, id prefix (6+ characters) or name. Not with --batch.
    #[arg(required_unless_present = "batch")]
    pub function: Option<String>,
    /// Positional arguments, each a JSON value (text that is not JSON is taken as a string).
    #[arg(conflicts_with = "batch")]
    pub args: Vec<String>,
    /// Keyword arguments, a JSON object.
    #[arg(long, conflicts_with = "batch")]
    pub kwargs: Option<String>,
    /// The arguments from a JSON file, `{"args": […], "kwargs": {…}}`, passed by reference:
    /// uploaded to the node as a blob, which the endpoint fetches over the data plane (for
    /// large inputs; arguments over the node's inline limit go by reference anyway).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["batch", "args", "kwargs"])]
    pub input: Option<PathBuf>,
    /// Run on this endpoint: id, id prefix, name or name@node.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Only on endpoints with this tag (repeatable).
    #[arg(long = "require", value_name = "KEY=VALUE")]
    pub require: Vec<String>,
    /// Only on endpoints of this institution.
    #[arg(long)]
    pub institution: Option<String>,
    /// Routing strategy: warm-aware (the default), least-loaded, random, round-robin.
    #[arg(long)]
    pub strategy: Option<String>,
    /// Retry on another endpoint up to N times if the endpoint is lost (default 0).
    #[arg(long)]
    pub retries: Option<u32>,
    /// Time limit of the task (e.g. 30s); default: the endpoint's.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Wait for the result and print it (exit status 1 if the task failed).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub wait_timeout: Duration,
    /// Present this capability token (or a file holding it) instead of one the node holds;
    /// the endpoint decides.
    #[arg(long)]
    pub capability: Option<String>,
    /// Submit many tasks from a JSON Lines file: one task object per line
    /// (`{"function": …, "args": […], "kwargs": {…}, "endpoint": …}`); `-` reads stdin. The
    /// flags --endpoint, --require, --institution, --strategy, --retries, --timeout and
    /// --capability apply to every line that does not set its own.
    #[arg(long, conflicts_with = "function")]
    pub batch: Option<PathBuf>,
    /// The node to submit through, and output format.
    #[command(flatten)]
    pub node: NodeArgs,
}

/// A command-line argument as a JSON value; text that is not JSON is a string.
pub(crate) fn json_arg(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned()))
}

pub(crate) async fn run_command(a: RunArgs) -> anyhow::Result<()> {
    let mut require = std::collections::BTreeMap::new();
    for r in &a.require {
        let Some((k, v)) = r.split_once('=') else {
            anyhow::bail!("--require {r}: expected KEY=VALUE");
        };
        require.insert(k.to_owned(), v.to_owned());
    }
    if let Some(s) = &a.strategy {
        compute::routing::Strategy::parse(s).map_err(|e| anyhow::anyhow!("--strategy: {e}"))?;
    }
    let capability = match &a.capability {
        Some(c) => Some(capability::to_text(&crate::capabilities::token_arg(c)?)),
        None => None,
    };
    let tasks = match &a.batch {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
            };
            // The flags given are defaults for every line that does not set its own.
            let mut defaults = serde_json::Map::new();
            let mut default = |key: &str, value: serde_json::Value| {
                defaults.insert(key.to_owned(), value);
            };
            if let Some(e) = &a.endpoint {
                default("endpoint", e.clone().into());
            }
            if !require.is_empty() {
                default("require", serde_json::json!(require));
            }
            if let Some(i) = &a.institution {
                default("institution", i.clone().into());
            }
            if let Some(s) = &a.strategy {
                default("strategy", s.clone().into());
            }
            if let Some(r) = a.retries {
                default("retries", r.into());
            }
            if let Some(t) = a.timeout {
                default("timeout_ms", (t.as_millis() as u64).into());
            }
            if let Some(c) = &capability {
                default("capability", c.clone().into());
            }
            let tasks =
                batch_tasks(&text, &defaults).with_context(|| format!("{}", path.display()))?;
            if tasks.is_empty() {
                anyhow::bail!("{} holds no tasks", path.display());
            }
            tasks
        }
        None => {
            let kwargs = match &a.kwargs {
                Some(k) => {
                    let v: serde_json::Value = serde_json::from_str(k)
                        .with_context(|| format!("--kwargs `{k}` is not JSON"))?;
                    if !v.is_object() {
                        anyhow::bail!("--kwargs must be a JSON object, like '{{\"x\": 1}}'");
                    }
                    v
                }
                None => serde_json::json!({}),
            };
            vec![crate::tasks::NewTask {
                function: a.function.clone().unwrap_or_default(),
                args: serde_json::Value::Array(a.args.iter().map(|s| json_arg(s)).collect()),
                kwargs,
                endpoint: a.endpoint.clone(),
                require,
                institution: a.institution.clone(),
                strategy: a.strategy.clone(),
                retries: a.retries.unwrap_or(0),
                timeout_ms: a.timeout.map_or(0, |d| d.as_millis() as u64),
                capability,
                ..Default::default()
            }]
        }
    };
    let client = Client::for_node(&DataDir::new(&a.node.node))?;
    let mut tasks = tasks;
    if let (Some(path), [task]) = (&a.input, tasks.as_mut_slice()) {
        let blob = client.put_blob(path).await?;
        task.args = serde_json::Value::Null;
        task.kwargs = serde_json::Value::Null;
        task.args_ref = Some(compute::task::ValueRef {
            blake3: blob.hash,
            size: blob.size,
        });
    }
    let wait = if a.wait {
        a.wait_timeout
    } else {
        Duration::ZERO
    };
    let list = client.submit_tasks(tasks, wait).await?;
    if a.node.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let single = list.tasks.len() == 1;
    let mut failed = 0;
    for s in &list.tasks {
        match (&s.task, &s.error) {
            (Some(t), _)
                if a.wait && single && t.outcome.as_ref().and_then(|o| o.value_ref()).is_some() =>
            {
                client.task_value(&t.id, None).await?;
            }
            (Some(t), _) if a.wait => {
                if !print_result(t, single) {
                    failed += 1;
                }
            }
            (Some(t), _) => println!("{}", t.id),
            (None, Some(e)) => {
                failed += 1;
                if single {
                    anyhow::bail!("{e}");
                }
                eprintln!("refused: {e}");
            }
            (None, None) => {}
        }
    }
    if failed > 0 {
        if single {
            anyhow::bail!("the task did not succeed");
        }
        anyhow::bail!("{failed} of {} tasks did not succeed", list.tasks.len());
    }
    Ok(())
}

/// The tasks of a JSON Lines batch, one object per line (blank lines skipped); `defaults` fill
/// the fields a line does not set itself.
pub(crate) fn batch_tasks(
    text: &str,
    defaults: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<Vec<crate::tasks::NewTask>> {
    let mut tasks = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let not_a_task = || {
            format!(
                "line {}: not a task object ({{\"function\": …, \"args\": […]}})",
                n + 1
            )
        };
        let mut v: serde_json::Value = serde_json::from_str(line).with_context(not_a_task)?;
        if let Some(obj) = v.as_object_mut() {
            for (k, d) in defaults {
                obj.entry(k.clone()).or_insert_with(|| d.clone());
            }
        }
        tasks.push(serde_json::from_value(v).with_context(not_a_task)?);
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().expect("an object").clone()
    }

    #[test]
    fn batch_flags_are_defaults_that_lines_override() {
        let text = "{\"function\": \"f\", \"args\": [1]}\n\n\
                    {\"function\": \"g\", \"retries\": 0, \"strategy\": \"random\"}\n";
        let d = defaults(serde_json::json!({"retries": 3, "strategy": "round-robin",
            "endpoint": "ep", "timeout_ms": 5000}));
        let tasks = batch_tasks(text, &d).expect("two tasks");
        assert_eq!(tasks.len(), 2, "the blank line is skipped");
        assert_eq!(tasks[0].retries, 3);
        assert_eq!(tasks[0].strategy.as_deref(), Some("round-robin"));
        assert_eq!(tasks[0].endpoint.as_deref(), Some("ep"));
        assert_eq!(tasks[0].timeout_ms, 5000);
        assert_eq!(tasks[1].retries, 0, "a line's own value wins");
        assert_eq!(tasks[1].strategy.as_deref(), Some("random"));
        assert_eq!(tasks[1].endpoint.as_deref(), Some("ep"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let d = serde_json::Map::new();
        let err = batch_tasks("{\"function\": \"f\"}\nnot json\n", &d).unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let err = batch_tasks("{\"function\": \"f\", \"nope\": 1}\n", &d).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }
}
