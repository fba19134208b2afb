//! The command line: clap definitions and dispatch. Errors are printed on one line that names the
//! problem and the next step, with a non-zero exit; nothing here panics on user input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh::membership::Role;

use crate::client::Client;
use crate::config::Config;
use crate::datadir::DataDir;
use crate::local_testnet::{self, TestnetCommand};
use crate::ops::parse_member_role;
use crate::output::*;
use crate::verbs::cap::{CapCommand, cap_command};
use crate::verbs::endpoint::{EndpointCommand, endpoint_command};
use crate::verbs::flow::{FlowCommand, flow_command};
use crate::verbs::function::{FunctionCommand, function_command};
use crate::verbs::run::{RunArgs, run_command};
use crate::verbs::start::{StartArgs, init_tracing, start, wait_for_signal};
use crate::verbs::task::{TaskCommand, task_command};
use crate::verbs::transfer::{TransferCommand, transfer_command};
use crate::{demo, ops};

/// funcmesh: a federated function-as-a-service mesh with no central broker.
#[derive(Debug, Parser)]
#[command(name = "funcmesh", version, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local federation in a temp dir and show what funcmesh does, then clean up.
    Demo,
    /// Serve the worker protocol on stdin and stdout, for shell functions in environments
    /// without python3 (endpoints start it; not for people).
    #[command(hide = true)]
    ShellWorker,
    /// Create a node identity and default config in a data dir.
    Init {
        /// The node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// A human name for the node.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the node daemon until SIGINT or SIGTERM.
    Start(StartArgs),
    /// Join a federation through its coordinator with an invite, then run the node.
    Join {
        /// The coordinator's multiaddr, as `funcmesh status` on it prints.
        address: String,
        /// The invite string from `funcmesh invite create`; `-` reads it from stdin. On the
        /// command line, other local users can read it (`/proc`): prefer `-` or --invite-file.
        #[arg(
            long,
            required_unless_present = "invite_file",
            conflicts_with = "invite_file"
        )]
        invite: Option<String>,
        /// A file holding the invite string.
        #[arg(long, value_name = "FILE")]
        invite_file: Option<PathBuf>,
        /// The node's data dir (initialised if needed).
        #[arg(long)]
        data_dir: PathBuf,
        /// Exit once joined instead of running the node.
        #[arg(long)]
        no_start: bool,
        /// How long to wait for the coordinator's answer.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Override a config setting: `section.key=value`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Show a running node's identity, federation and mesh.
    Status(NodeArgs),
    /// List the verified members a running node is connected to.
    Peers(NodeArgs),
    /// Create a federation or admit institutions to it.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Manage institution keys.
    #[command(subcommand)]
    Institution(InstitutionCommand),
    /// Create invites for new nodes.
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Run a local multi-process federation on loopback.
    #[command(subcommand)]
    Testnet(TestnetCommand),
    /// Register and look up functions in the federation's registry.
    #[command(subcommand)]
    Function(FunctionCommand),
    /// Look up endpoints in the federation's registry.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Show the local replica of the registry: entries, heads, sync.
    Registry(NodeArgs),
    /// Print the node's metrics (Prometheus' text format, as `GET /metrics` serves them).
    Metrics(NodeArgs),
    /// Run a function on an endpoint of the federation (arguments are JSON values).
    Run(RunArgs),
    /// Follow, fetch or cancel tasks this node submitted.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Capability tokens: grant access to an endpoint, delegate, inspect, hold, revoke.
    #[command(subcommand)]
    Cap(CapCommand),
    /// Move data: blobs in and out of a node, files between members' data roots.
    #[command(subcommand)]
    Transfer(TransferCommand),
    /// Flows (Globus Flows definitions): validate, run, follow, cancel, resume.
    #[command(subcommand)]
    Flow(FlowCommand),
    /// APIs of other systems the node serves (`[compat]`).
    #[command(subcommand)]
    Compat(CompatCommand),
}

/// `funcmesh compat …`.
#[derive(Debug, Subcommand)]
pub enum CompatCommand {
    /// Print the environment that points an unmodified Globus Compute SDK script at the node
    /// (`eval "$(funcmesh compat env --node DIR)"`; the node runs with `compat.globus_compute`).
    Env(NodeArgs),
}

/// `funcmesh federation …`.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Create a federation: its root key, signed genesis, and a coordinator node in the data dir.
    Create {
        /// The federation's name.
        #[arg(long)]
        name: String,
        /// The coordinator's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// Mesh listen address for the coordinator, repeatable (a fixed port keeps its address
        /// stable across restarts).
        #[arg(long)]
        listen: Vec<String>,
    },
    /// Sign an institution's admission into the federation.
    Admit {
        /// The federation key file (`federation.key` in the coordinator's data dir).
        #[arg(long)]
        federation_key: PathBuf,
        /// The institution's public key file (`FILE.pub`).
        #[arg(long)]
        institution: PathBuf,
        /// The genesis (default: `federation.json` next to the key).
        #[arg(long)]
        genesis: Option<PathBuf>,
        /// Write the certificate here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `funcmesh institution …`.
#[derive(Debug, Subcommand)]
pub enum InstitutionCommand {
    /// Create an institution key pair: FILE (secret) and FILE.pub.
    Create {
        /// The institution's name.
        #[arg(long)]
        name: String,
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `funcmesh invite …`.
#[derive(Debug, Subcommand)]
pub enum InviteCommand {
    /// Print an invite for a new node of the institution.
    Create {
        /// The institution's secret key file.
        #[arg(long)]
        institution_key: PathBuf,
        /// The institution's admission certificate.
        #[arg(long)]
        admission: PathBuf,
        /// The new node's role.
        #[arg(long, value_parser = parse_member_role)]
        role: Role,
        /// How long the invite may be used.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

/// Parses the command line and runs it; prints errors on one line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut first = lines.next().unwrap_or("invalid command line").to_owned();
            // "the following required arguments were not provided:" lists them on the next
            // lines: keep them on the one line.
            if first.ends_with(':') {
                let listed: Vec<&str> = lines
                    .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                    .collect();
                first = format!("{first} {}", listed.join(", "));
            }
            eprintln!("{} (see `funcmesh --help`)", first.trim_end());
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::ShellWorker) {
        return match compute::shell_worker::serve(std::io::stdin(), std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: the shell worker's pipe failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Endpoints of this process start `<this binary> shell-worker` where python3 is missing.
    if let Ok(exe) = std::env::current_exe() {
        compute::shell_worker::set_program(exe);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // `TOKIO_WORKER_THREADS` wins when set; otherwise see `runtime_threads`.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(runtime_threads());
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Async worker threads: one per four cores, at least one. A node is the control plane of a
/// machine whose cores are its workers' (an endpoint runs one Python process per worker), and its
/// hot path is a chain of single-task actors (mesh event loop, dispatcher, endpoint driver), so
/// more threads mostly add cross-thread wake-ups: on 2 vCPUs one thread instead of two cut the
/// no-op round trip's p50 by 11% and CPU per task by 10% (docs/benchmarks.md). RocksDB writes run
/// on the blocking pool either way.
fn runtime_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo => demo::run().await,
        Command::ShellWorker => {
            anyhow::bail!("`funcmesh shell-worker` runs on its own, before the runtime")
        }
        Command::Init { data_dir, name } => {
            let dir = DataDir::new(data_dir);
            let peer = ops::init(&dir, name.as_deref())?;
            println!("initialised {} (peer id {peer})", dir.root().display());
            Ok(())
        }
        Command::Start(args) => start(args).await,
        Command::Join {
            address,
            invite,
            invite_file,
            data_dir,
            no_start,
            timeout,
            set,
        } => {
            let dir = DataDir::new(data_dir);
            let config = if dir.config().exists() {
                Config::resolve(Some(&dir.config()), std::env::vars(), &set)?
            } else {
                Config::resolve(None, std::env::vars(), &set)?
            };
            if !no_start {
                init_tracing(&config.node.log);
            }
            let invite = match (invite.as_deref(), invite_file) {
                (_, Some(path)) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the invite file {}", path.display()))?,
                (Some("-"), None) => std::io::read_to_string(std::io::stdin())
                    .context("cannot read the invite from stdin")?,
                (Some(text), None) => text.to_owned(),
                (None, None) => anyhow::bail!("give the invite with --invite or --invite-file"),
            };
            let node = ops::join(&dir, &address, invite.trim(), &set, timeout).await?;
            let m = node.member().clone();
            println!(
                "joined federation {} ({}) as {} of {} with peer id {}",
                node.federation().name,
                node.federation().id,
                m.role,
                m.institution.as_deref().unwrap_or("-"),
                node.peer_id()
            );
            if no_start {
                return node.shutdown().await;
            }
            wait_for_signal().await?;
            node.shutdown().await
        }
        Command::Status(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let s = client.status().await?;
            show(args.json, &s, |s| {
                println!("name         {}", s.name);
                println!("peer id      {}", s.peer_id);
                println!("federation   {} ({})", s.federation_name, s.federation_id);
                println!("role         {}", s.role);
                println!("institution  {}", s.institution.as_deref().unwrap_or("-"));
                println!("members      {}", s.members);
                println!("uptime       {}s", s.uptime_secs);
                for a in &s.listen_addrs {
                    println!("listening    {a}");
                }
            })
        }
        Command::Compat(CompatCommand::Env(args)) => {
            let dir = DataDir::new(&args.node);
            let path = dir.root().join("globus-compute.json");
            let c: crate::globus_compute::Credentials = crate::datadir::read_json(&path)
                .with_context(|| {
                    format!(
                        "the node at {} has not served the Globus Compute API: start it with \
                         `--set compat.globus_compute=true`",
                        args.node.display()
                    )
                })?;
            show(args.json, &c, |c| {
                for line in crate::globus_compute::environment(c) {
                    println!("export {line}");
                }
            })
        }
        Command::Peers(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let peers = client.peers().await?;
            show(args.json, &peers, |peers| {
                print_peers(peers);
            })
        }
        Command::Federation(FederationCommand::Create {
            name,
            data_dir,
            listen,
        }) => {
            let dir = DataDir::new(data_dir);
            let fed = ops::federation_create(&dir, &name, &listen)?;
            println!("created federation {} ({})", fed.name, fed.id);
            println!("federation key: {}", dir.federation_key().display());
            println!(
                "coordinator data dir: {} (run `funcmesh start --data-dir {0}`)",
                dir.root().display()
            );
            Ok(())
        }
        Command::Federation(FederationCommand::Admit {
            federation_key,
            institution,
            genesis,
            out,
        }) => {
            let admission =
                ops::federation_admit(&federation_key, genesis.as_deref(), &institution)?;
            match out {
                Some(path) => {
                    ops::write_admission(&path, &admission)?;
                    println!("admission written to {}", path.display());
                }
                None => println!("{}", serde_json::to_string_pretty(&admission)?),
            }
            Ok(())
        }
        Command::Institution(InstitutionCommand::Create { name, out }) => {
            ops::institution_create(&name, &out)?;
            println!(
                "institution key: {} (public: {}.pub)",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::Invite(InviteCommand::Create {
            institution_key,
            admission,
            role,
            ttl,
        }) => {
            println!(
                "{}",
                ops::invite_create(&institution_key, &admission, role, ttl)?
            );
            Ok(())
        }
        Command::Testnet(cmd) => local_testnet::run(cmd).await,
        Command::Function(cmd) => function_command(cmd).await,
        Command::Run(args) => run_command(args).await,
        Command::Task(cmd) => task_command(cmd).await,
        Command::Cap(cmd) => cap_command(cmd).await,
        Command::Transfer(cmd) => transfer_command(cmd).await,
        Command::Flow(cmd) => flow_command(cmd).await,
        Command::Endpoint(cmd) => endpoint_command(cmd).await,
        Command::Metrics(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            print!("{}", client.metrics().await?);
            Ok(())
        }
        Command::Registry(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let s = client.registry_status().await?;
            show(args.json, &s, |s| {
                println!("entries              {}", s.entries);
                println!("ignored              {}", s.ignored);
                println!("uncompacted changes  {}", s.uncompacted_changes);
                println!("missing deps         {}", s.missing_deps);
                println!("sync sessions        {}", s.syncing);
                println!("epoch                {}", s.epoch);
                println!("outside base         {}", s.outside_base);
                if let Some(why) = &s.refused_checkpoint {
                    println!("refused checkpoint   {why}");
                }
                for h in &s.heads {
                    println!("head                 {h}");
                }
            })
        }
    }
}
