//! `funcmesh endpoint …`: look up endpoints and their load.

use clap::Subcommand;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

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

pub(crate) async fn endpoint_command(cmd: EndpointCommand) -> anyhow::Result<()> {
    match cmd {
        EndpointCommand::List(args) => {
            let client = Client::for_node(&DataDir::new(&args.node))?;
            let eps = client.endpoints().await?;
            show(args.json, &eps, |eps| {
                print_endpoints(eps);
            })
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
            show(node.json, &e, |e| {
                print_endpoint(e);
            })
        }
    }
}
