//! `funcmesh start`: run a node until a signal stops it.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::config::Config;
use crate::daemon::Node;
use crate::datadir::DataDir;

/// `funcmesh start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The node's data dir.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the local API (overrides api.listen).
    #[arg(long)]
    pub api_listen: Option<String>,
    /// Mesh listen address, repeatable (overrides mesh.listen).
    #[arg(long)]
    pub listen: Vec<String>,
    /// Override a config setting: `section.key=value`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub dump_config: bool,
}

pub(crate) async fn start(args: StartArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.data_dir);
    if !dir.is_initialised() {
        anyhow::bail!(
            "{0} is not a node data dir: run `funcmesh init --data-dir {0}` or `funcmesh join`",
            dir.root().display()
        );
    }
    let mut overrides = args.set.clone();
    if let Some(api) = &args.api_listen {
        overrides.push(format!("api.listen={api}"));
    }
    if !args.listen.is_empty() {
        overrides.push(format!("mesh.listen={}", args.listen.join(",")));
    }
    let config = Config::resolve(Some(&dir.config()), std::env::vars(), &overrides)?;
    if args.dump_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_tracing(&config.node.log);
    let node = Node::start(&dir, &config).await?;
    wait_for_signal().await?;
    node.shutdown().await
}

pub(crate) async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

pub(crate) fn init_tracing(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // A node's log is often a file (`funcmesh testnet` writes node.log): colours only on a
        // terminal, so that `grep <task id>` finds plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
