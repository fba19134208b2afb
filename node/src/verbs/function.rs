//! `funcmesh function …`: register functions in the registry and look them up.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

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

pub(crate) async fn function_command(cmd: FunctionCommand) -> anyhow::Result<()> {
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
            show(node.json, &w, |w| {
                println!("{}", w.id);
            })
        }
        FunctionCommand::List(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let fs = client.functions().await?;
            show(args.json, &fs, |fs| {
                print_functions(fs);
            })
        }
        FunctionCommand::Delete { function, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let w = client.delete_function(&function).await?;
            show(node.json, &w, |w| {
                println!("deleted {}", w.id);
            })
        }
        FunctionCommand::Show { function, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let f = client.function(&function).await?;
            show(node.json, &f, |f| {
                print_function(f);
            })
        }
    }
}
