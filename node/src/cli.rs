//! The command line: clap definitions and dispatch. Errors are printed on one line that names the
//! problem and the next step, with a non-zero exit; nothing here panics on user input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use mesh::membership::Role;

use crate::client::Client;
use crate::config::Config;
use crate::daemon::Node;
use crate::datadir::DataDir;
use crate::local_testnet::{self, TestnetCommand};
use crate::ops::parse_member_role;
use crate::output::*;
use crate::{demo, ops};

/// funcmesh: a federated function-as-a-service mesh with no central broker.
#[derive(Debug, Parser)]
#[command(name = "funcmesh", version, propagate_version = true)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

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
        /// The invite string from `funcmesh invite create`.
        #[arg(long)]
        invite: String,
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
}

/// `funcmesh cap …`.
#[derive(Debug, Subcommand)]
pub enum CapCommand {
    /// Grant another institution the use of one of your institution's endpoints; prints the
    /// token. Offline, except that names are resolved through --node when given.
    #[command(group(clap::ArgGroup::new("validity").required(true).args(["expires", "ttl"])))]
    Grant {
        /// Your institution's key file (the token's root).
        #[arg(long)]
        issuer_key: PathBuf,
        /// Who receives it: institution:NAME_OR_KEY.
        #[arg(long)]
        to: String,
        /// The endpoint: its registry id (or, with --node, a name or id prefix).
        #[arg(long)]
        endpoint: String,
        /// Only this function (id, or with --node a name); repeatable. Default: all.
        #[arg(long = "function")]
        functions: Vec<String>,
        /// What it allows: compute.run (default), transfer.read, transfer.write, flow.run.
        #[arg(long = "ability")]
        abilities: Vec<String>,
        /// Valid until this date (2027-01-31 or RFC 3339, UTC).
        #[arg(long)]
        expires: Option<String>,
        /// Valid for this long from now (e.g. 30d).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "expires")]
        ttl: Option<Duration>,
        /// Not valid before this date.
        #[arg(long)]
        not_before: Option<String>,
        /// A node to resolve names through.
        #[arg(long, env = "FUNCMESH_NODE", value_name = "DATA_DIR")]
        node: Option<PathBuf>,
    },
    /// Narrow a token you hold to one of your nodes, or hand it to a partner institution;
    /// prints the new token. A delegation can never widen the token.
    Delegate {
        /// The token (or a file holding it).
        token: String,
        /// Your institution's key file (you must hold the token).
        #[arg(long)]
        issuer_key: PathBuf,
        /// node:PEER_ID, or institution:NAME_OR_KEY.
        #[arg(long)]
        to: String,
        /// Only these functions (ids, or names with --node); repeatable.
        #[arg(long = "function")]
        functions: Vec<String>,
        /// End sooner: valid for this long from now.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// End sooner: valid until this date.
        #[arg(long, conflicts_with = "ttl")]
        expires: Option<String>,
        /// A node to resolve names through.
        #[arg(long, env = "FUNCMESH_NODE", value_name = "DATA_DIR")]
        node: Option<PathBuf>,
    },
    /// Show who granted what to whom in a token, until when, with which restrictions.
    Inspect {
        /// The token (or a file holding it).
        token: String,
        /// A node whose registry names the keys.
        #[arg(long, env = "FUNCMESH_NODE", value_name = "DATA_DIR")]
        node: Option<PathBuf>,
    },
    /// Store a token on the node that will present it.
    Add {
        /// The token (or a file holding it).
        token: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// The tokens a node holds, and whether it can use each now.
    List(NodeArgs),
    /// Stop holding a token (by the id `cap list` shows); it is not revoked.
    Remove {
        /// The token's id.
        id: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Revoke a token (block 0 if you issued it, else the last block you signed): publishes a
    /// revocation in the registry, and every endpoint refuses the token within seconds.
    Revoke {
        /// The token (or a file holding it).
        token: String,
        /// The key file of the issuing or delegating institution.
        #[arg(long)]
        issuer_key: PathBuf,
        /// Revoke this block instead.
        #[arg(long)]
        block: Option<usize>,
        /// Why (recorded in the registry).
        #[arg(long, default_value = "revoked by its issuer")]
        reason: String,
        /// The node to publish through.
        #[command(flatten)]
        node: NodeArgs,
    },
}

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

/// `funcmesh function …`.
#[derive(Debug, Subcommand)]
pub enum FunctionCommand {
    /// Register a function; prints its id (derived from its content and owner).
    Register {
        /// Its name.
        #[arg(long)]
        name: String,
        /// A Python file; call `--entrypoint` in it.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "shell",
            requires = "entrypoint"
        )]
        python: Option<PathBuf>,
        /// The Python function to call.
        #[arg(long, value_name = "FUNC")]
        entrypoint: Option<String>,
        /// A shell command template; `{name}` placeholders take the task's arguments.
        #[arg(long, value_name = "COMMAND")]
        shell: Option<String>,
        /// Run it in a container: `RUNTIME:IMAGE` (docker, podman, apptainer).
        #[arg(long, value_name = "RUNTIME:IMAGE")]
        container: Option<String>,
        /// What it does.
        #[arg(long, default_value = "")]
        description: String,
        /// Where to find the node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List registered functions.
    List(NodeArgs),
    /// Show one function (by id, id prefix or name), with its code.
    Show {
        /// Id, id prefix (6+ characters) or name.
        function: String,
        /// Where to find the node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Delete a function this node registered (it disappears from every node's list).
    Delete {
        /// Id, id prefix (6+ characters) or name.
        function: String,
        /// Where to find the node.
        #[command(flatten)]
        node: NodeArgs,
    },
}

/// `funcmesh endpoint …`.
#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// List the federation's endpoints.
    List(NodeArgs),
    /// Show the endpoints' live load, from their latest advertisements: workers, queue, warm
    /// environments and cold-start times.
    Load(NodeArgs),
    /// Show one endpoint (by id, id prefix or name).
    Show {
        /// Id, id prefix (6+ characters) or name.
        endpoint: String,
        /// Where to find the node.
        #[command(flatten)]
        node: NodeArgs,
    },
}

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

fn init_tracing(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // A node's log is often a file (`funcmesh testnet` writes node.log): colours only on a
        // terminal, so that `grep <task id>` finds plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
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
            let node = ops::join(&dir, &address, &invite, &set, timeout).await?;
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
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
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
            }
            Ok(())
        }
        Command::Peers(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let peers = client.peers().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                print_peers(&peers);
            }
            Ok(())
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
        Command::Endpoint(cmd) => endpoint_command(cmd).await,
        Command::Metrics(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            print!("{}", client.metrics().await?);
            Ok(())
        }
        Command::Registry(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let s = client.registry_status().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("entries              {}", s.entries);
                println!("ignored              {}", s.ignored);
                println!("uncompacted changes  {}", s.uncompacted_changes);
                println!("missing deps         {}", s.missing_deps);
                println!("sync sessions        {}", s.syncing);
                for h in &s.heads {
                    println!("head                 {h}");
                }
            }
            Ok(())
        }
    }
}

/// A command-line argument as a JSON value; text that is not JSON is a string.
fn json_arg(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned()))
}

async fn run_command(a: RunArgs) -> anyhow::Result<()> {
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
            let mut tasks = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let not_a_task = || {
                    format!(
                        "{} line {}: not a task object ({{\"function\": …, \"args\": […]}})",
                        path.display(),
                        n + 1
                    )
                };
                let mut v: serde_json::Value =
                    serde_json::from_str(line).with_context(not_a_task)?;
                if let Some(obj) = v.as_object_mut() {
                    for (k, d) in &defaults {
                        obj.entry(k.clone()).or_insert_with(|| d.clone());
                    }
                }
                let t: crate::tasks::NewTask =
                    serde_json::from_value(v).with_context(not_a_task)?;
                tasks.push(t);
            }
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

async fn task_command(cmd: TaskCommand) -> anyhow::Result<()> {
    match cmd {
        TaskCommand::Status { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let t = client.task(&id).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_task(&t);
            }
            Ok(())
        }
        TaskCommand::Result { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let t = client.task(&id).await?;
            finish_result(&t, node.json)
        }
        TaskCommand::Wait { ids, timeout, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let list = client.wait_tasks(ids.clone(), timeout).await?;
            if let [id] = ids.as_slice() {
                let Some(s) = list.tasks.into_iter().next() else {
                    anyhow::bail!("no answer for task {id}");
                };
                return match (s.task, s.error) {
                    (Some(t), _) => finish_result(&t, node.json),
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
            if node.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{} {}", t.id, t.status);
            }
            Ok(())
        }
    }
}

async fn function_command(cmd: FunctionCommand) -> anyhow::Result<()> {
    match cmd {
        FunctionCommand::Register {
            name,
            python,
            entrypoint,
            shell,
            container,
            description,
            node,
        } => {
            let python = match python {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ),
                None => None,
            };
            let req = crate::registry::NewFunction {
                name,
                python,
                entrypoint,
                payload: None,
                shell,
                container,
                description,
            };
            // Check locally first: the same errors, without a node.
            let owner = crdt_registry::Key([0; 32]);
            req.record(owner, 0)?;
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let w = client.register_function(&req).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!("{}", w.id);
            }
            Ok(())
        }
        FunctionCommand::List(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let fs = client.functions().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&fs)?);
            } else {
                print_functions(&fs);
            }
            Ok(())
        }
        FunctionCommand::Delete { function, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let w = client.delete_function(&function).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                println!("deleted {}", w.id);
            }
            Ok(())
        }
        FunctionCommand::Show { function, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let f = client.function(&function).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                print_function(&f);
            }
            Ok(())
        }
    }
}

async fn endpoint_command(cmd: EndpointCommand) -> anyhow::Result<()> {
    match cmd {
        EndpointCommand::List(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let eps = client.endpoints().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&eps)?);
            } else {
                print_endpoints(&eps);
            }
            Ok(())
        }
        EndpointCommand::Load(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let ads = client.adverts().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&ads)?);
                return Ok(());
            }
            println!(
                "{:<14} {:<16} {:>7} {:>5} {:>6}  WARM (idle/busy, cold start)",
                "NODE", "ENDPOINT", "WORKERS", "IDLE", "QUEUED"
            );
            for a in &ads {
                for e in &a.advert.endpoints {
                    let warm: Vec<String> = e
                        .environments
                        .iter()
                        .map(|v| {
                            format!(
                                "{} {}/{}{}",
                                v.env,
                                v.idle,
                                v.busy,
                                v.cold_start_ms
                                    .map_or(String::new(), |ms| format!(", {ms} ms"))
                            )
                        })
                        .collect();
                    println!(
                        "..{:<12} {:<16} {:>3}/{:<3} {:>5} {:>6}  {}",
                        short(&a.peer_id),
                        e.name,
                        e.workers,
                        e.max_workers,
                        e.idle,
                        e.queued,
                        if warm.is_empty() {
                            "-".into()
                        } else {
                            warm.join("; ")
                        }
                    );
                }
            }
            Ok(())
        }
        EndpointCommand::Show { endpoint, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let e = client.endpoint(&endpoint).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print_endpoint(&e);
            }
            Ok(())
        }
    }
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
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

async fn wait_for_signal() -> anyhow::Result<()> {
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

/// A client for `--node`, when given and running.
fn optional_client(node: Option<&PathBuf>) -> anyhow::Result<Option<Client>> {
    node.map(|n| Client::for_node(&DataDir::new(n))).transpose()
}

/// Resolves institution names (or keys) through the node's registry.
async fn institution_keys(
    client: Option<&Client>,
) -> anyhow::Result<Vec<(String, crdt_registry::Key)>> {
    Ok(match client {
        Some(c) => c
            .institutions()
            .await?
            .into_iter()
            .map(|i| (i.name, i.key))
            .collect(),
        None => Vec::new(),
    })
}

fn resolve_institution(
    known: &[(String, crdt_registry::Key)],
    query: &str,
) -> anyhow::Result<crdt_registry::Key> {
    let found: Vec<_> = known.iter().filter(|(n, _)| n == query).collect();
    match found.as_slice() {
        [(_, k)] => Ok(*k),
        [] if known.is_empty() => anyhow::bail!(
            "institution {query:?}: give its key (institution:<base64 key>), or --node to look \
             the name up"
        ),
        [] => anyhow::bail!(
            "no institution {query:?} in the registry (known: {})",
            known
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => anyhow::bail!("several institutions are named {query:?}: give its key"),
    }
}

async fn function_ids(client: Option<&Client>, queries: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for q in queries {
        out.push(match client {
            Some(c) => c.function(q).await?.id,
            None => q.clone(),
        });
    }
    Ok(out)
}

async fn cap_command(cmd: CapCommand) -> anyhow::Result<()> {
    use crate::capabilities as caps;
    match cmd {
        CapCommand::Grant {
            issuer_key,
            to,
            endpoint,
            functions,
            abilities,
            expires,
            ttl,
            not_before,
            node,
        } => {
            let (_, seed, _) = caps::institution_key(&issuer_key)?;
            let client = optional_client(node.as_ref())?;
            let known = institution_keys(client.as_ref()).await?;
            let capability::Audience::Institution(to) =
                caps::audience(&to, &|q| resolve_institution(&known, q))?
            else {
                anyhow::bail!(
                    "a grant goes to an institution (--to institution:NAME_OR_KEY); narrow it to a node with `cap delegate`"
                );
            };
            let endpoint = match &client {
                Some(c) => c.endpoint(&endpoint).await?.id,
                None => endpoint,
            };
            let abilities = abilities
                .iter()
                .map(|a| a.parse::<capability::Ability>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!(e))?;
            let Some(expires) = caps::expiry(expires.as_deref(), ttl)? else {
                anyhow::bail!("a grant needs --expires DATE or --ttl DURATION");
            };
            let grant = capability::Grant {
                to,
                endpoint,
                functions: function_ids(client.as_ref(), &functions).await?,
                abilities,
                expires,
                not_before: not_before.as_deref().map(caps::parse_date).transpose()?,
            };
            println!("{}", caps::grant(&seed, &grant)?);
            Ok(())
        }
        CapCommand::Delegate {
            token,
            issuer_key,
            to,
            functions,
            ttl,
            expires,
            node,
        } => {
            let bytes = caps::token_arg(&token)?;
            let (_, seed, _) = caps::institution_key(&issuer_key)?;
            let client = optional_client(node.as_ref())?;
            let known = institution_keys(client.as_ref()).await?;
            let d = capability::Delegation {
                to: caps::audience(&to, &|q| resolve_institution(&known, q))?,
                functions: function_ids(client.as_ref(), &functions).await?,
                expires: caps::expiry(expires.as_deref(), ttl)?,
            };
            println!("{}", caps::delegate(&bytes, &seed, &d)?);
            Ok(())
        }
        CapCommand::Inspect { token, node } => {
            let bytes = caps::token_arg(&token)?;
            let chain = capability::inspect(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
            let client = optional_client(node.as_ref())?;
            let known = institution_keys(client.as_ref()).await?;
            let name = |k: &crdt_registry::Key| {
                known
                    .iter()
                    .find(|(_, key)| key == k)
                    .map_or_else(|| k.to_string(), |(n, _)| n.clone())
            };
            for line in chain.describe(&name) {
                println!("{line}");
            }
            for b in &chain.blocks {
                println!("block {} revocation id {}", b.index, b.revocation_id);
            }
            Ok(())
        }
        CapCommand::Add { token, node } => {
            let bytes = caps::token_arg(&token)?;
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let v = client.add_capability(&capability::to_text(&bytes)).await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_capability(&v);
            }
            Ok(())
        }
        CapCommand::List(node) => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let list = client.capabilities().await?;
            if node.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("this node holds no capability token (add one with `funcmesh cap add`)");
            } else {
                for v in &list {
                    print_capability(v);
                    println!();
                }
            }
            Ok(())
        }
        CapCommand::Remove { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            client.remove_capability(&id).await?;
            println!("removed {id}; the node no longer presents it (it is not revoked)");
            Ok(())
        }
        CapCommand::Revoke {
            token,
            issuer_key,
            block,
            reason,
            node,
        } => {
            let bytes = caps::token_arg(&token)?;
            let chain = capability::inspect(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (_, signing) =
                mesh::keys::read_signing_key(&issuer_key, mesh::keys::KeyKind::Institution)
                    .with_context(|| {
                        format!("cannot read the institution key {}", issuer_key.display())
                    })?;
            let by = crdt_registry::Key(signing.public().0);
            let issuer = (chain.root_key_id == Some(capability::root_key_id(&by))).then_some(&by);
            let index = caps::block_to_revoke(&chain, &by, issuer, block)?;
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let federation = client.status().await?.federation_id;
            let rid = &chain.blocks[index].revocation_id;
            let entry = caps::revocation_entry(&federation, &signing, rid, &reason);
            client.insert_entry(entry.bytes()).await?;
            let what = chain.describe(&|k| k.to_string());
            println!(
                "revoked block {index} ({}); every endpoint refuses tokens containing it once the \
                 registry reaches it (seconds)",
                what.get(index).map_or("", String::as_str)
            );
            Ok(())
        }
    }
}
