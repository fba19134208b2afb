//! Nodes as local processes: `funcmesh start` or `funcmesh join` in a process group of its own,
//! logging to `DATA_DIR/node.log`.

use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{Start, Started, alive, exe, kill, s};
use crate::datadir::DataDir;

/// Starts the node of `dir`.
pub(super) fn start(dir: &DataDir, how: Start<'_>) -> anyhow::Result<Started> {
    use std::os::unix::process::CommandExt as _;
    let args: Vec<&str> = match how {
        Start::Start => vec!["start", "--data-dir", s(dir.root())],
        Start::Join { addr, invite } => {
            vec![
                "join",
                addr,
                "--invite",
                invite,
                "--data-dir",
                s(dir.root()),
            ]
        }
    };
    let log = dir.root().join("node.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = file.try_clone().context("log file")?;
    let child = Proc::new(exe()?)
        .args(&args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start funcmesh {}", args[0]))?;
    Ok(Started {
        pid: child.id(),
        container: None,
        api_pid: Some(child.id()),
        child: Some(child),
    })
}

/// Stops process `pid`: SIGTERM, then SIGKILL after 10 s; or SIGKILL at once.
pub(super) async fn stop(pid: u32, kill_now: bool) -> anyhow::Result<()> {
    if !alive(pid) {
        return Ok(());
    }
    if kill_now {
        kill(pid, libc::SIGKILL);
        return wait_dead(pid, Duration::from_secs(10)).await;
    }
    kill(pid, libc::SIGTERM);
    if wait_dead(pid, Duration::from_secs(10)).await.is_err() {
        kill(pid, libc::SIGKILL);
        wait_dead(pid, Duration::from_secs(5)).await?;
    }
    Ok(())
}

/// Waits until process `pid` is gone.
pub(super) async fn wait_dead(pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} still runs after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
