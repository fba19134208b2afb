//! `funcmesh transfer …`: blobs in and out of a node, and files between members' data roots.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use transfer::copy::{Job, State};

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

/// `funcmesh transfer …`.
#[derive(Debug, Subcommand)]
pub enum TransferCommand {
    /// Store a file in the node's blob store; prints its BLAKE3 hash.
    Put {
        /// The file.
        path: PathBuf,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Write a blob to a file, fetching it (verified) from another member first if need be.
    Get {
        /// The blob's hash.
        hash: String,
        /// Where to write it (default: the hash, in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Members that hold it (peer ids, comma-separated): fetched from all of them at once.
        #[arg(long)]
        from: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Copy ENDPOINT:PATH to ENDPOINT:PATH; the destination's node pulls from the source
    /// directly, and the copy survives restarts of either side. Shows progress until done.
    Copy {
        /// The source, ENDPOINT:PATH.
        source: String,
        /// The destination, ENDPOINT:PATH (an endpoint of the node given by --node).
        destination: String,
        /// Copy a directory and everything below it.
        #[arg(long, short)]
        recursive: bool,
        /// Skip files already there: exists, size, mtime or checksum (default: same size and
        /// hash).
        #[arg(long)]
        sync: Option<String>,
        /// Remove files at the destination that the source does not have.
        #[arg(long)]
        delete: bool,
        /// A request id of your choosing: submitting again with it is the same copy.
        #[arg(long)]
        id: Option<String>,
        /// Return once accepted instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List a directory of a member's data root (ENDPOINT:PATH).
    Ls {
        /// ENDPOINT:PATH (PATH may be empty: the root).
        path: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Make a directory in a member's data root.
    Mkdir {
        /// ENDPOINT:PATH.
        path: String,
        /// Make missing parents too.
        #[arg(long, short)]
        parents: bool,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove a file or directory of a member's data root.
    Rm {
        /// ENDPOINT:PATH.
        path: String,
        /// Remove a directory with everything in it.
        #[arg(long, short)]
        recursive: bool,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Share a path of one of your institution's data roots with another institution or node:
    /// it may then read (with --write, also write) below it without a token.
    Share {
        /// ENDPOINT:PATH.
        path: String,
        /// With whom: institution:NAME_OR_KEY or node:NAME_OR_PEER_ID.
        #[arg(long)]
        to: String,
        /// Writing too.
        #[arg(long)]
        write: bool,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// List the shares of an endpoint's data root.
    Shares {
        /// The endpoint.
        endpoint: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Remove a share.
    Unshare {
        /// The endpoint.
        endpoint: String,
        /// The share's id (`funcmesh transfer shares` lists them).
        id: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Show one copy job, or all of this node's.
    Status {
        /// The job's id.
        id: Option<String>,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Cancel a copy job.
    Cancel {
        /// The job's id.
        id: String,
        /// The node.
        #[command(flatten)]
        node: NodeArgs,
    },
}

pub(crate) async fn transfer_command(cmd: TransferCommand) -> anyhow::Result<()> {
    match cmd {
        TransferCommand::Put { path, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let b = client.put_blob(&path).await?;
            show(node.json, &b, |b| println!("{}", b.hash))
        }
        TransferCommand::Get {
            hash,
            out,
            from,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let out = out.unwrap_or_else(|| PathBuf::from(&hash));
            let n = client.get_blob(&hash, from.as_deref(), &out).await?;
            let v = serde_json::json!({"hash": hash, "path": out, "size": n});
            show(node.json, &v, |_| {
                println!("{} bytes written to {}", n, out.display())
            })
        }
        TransferCommand::Copy {
            source,
            destination,
            recursive,
            sync,
            delete,
            id,
            no_wait,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let job = client
                .new_transfer(&crate::transfers::NewTransfer {
                    request_id: id,
                    source,
                    destination,
                    recursive,
                    sync,
                    delete,
                })
                .await?;
            if no_wait {
                return show(node.json, &job, |j| println!("{}", j.id));
            }
            let done = follow(&client, job, node.json).await?;
            show(node.json, &done, print_job)?;
            if done.state != State::Succeeded {
                std::process::exit(1);
            }
            Ok(())
        }
        TransferCommand::Ls { path, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let entries = client.ls(&path).await?;
            show(node.json, &entries, |es| {
                for e in es {
                    println!(
                        "{:<8} {:>12} {:>5o}  {}",
                        format!("{:?}", e.kind).to_lowercase(),
                        e.size,
                        e.mode,
                        e.path
                    );
                }
            })
        }
        TransferCommand::Mkdir {
            path,
            parents,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            client.path_op("mkdir", &path, parents).await?;
            Ok(())
        }
        TransferCommand::Rm {
            path,
            recursive,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            client.path_op("rm", &path, recursive).await?;
            Ok(())
        }
        TransferCommand::Share {
            path,
            to,
            write,
            node,
        } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let share = client
                .share(&crate::transfers::NewShare { path, to, write })
                .await?;
            show(node.json, &share, |s| println!("{}", s.id))
        }
        TransferCommand::Shares { endpoint, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let shares = client.shares(&endpoint).await?;
            show(node.json, &shares, |ss| {
                for s in ss {
                    println!(
                        "{}  /{:<30} {:<5} {}",
                        s.id,
                        s.path,
                        if s.write { "rw" } else { "r" },
                        s.principal
                    );
                }
            })
        }
        TransferCommand::Unshare { endpoint, id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let share = client.unshare(&endpoint, &id).await?;
            show(node.json, &share, |s| println!("removed {}", s.id))
        }
        TransferCommand::Status { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            match id {
                Some(id) => {
                    let j = client.transfer(&id).await?;
                    show(node.json, &j, print_job)
                }
                None => {
                    let jobs = client.transfers().await?;
                    show(node.json, &jobs, |js| {
                        for j in js {
                            println!(
                                "{:<26} {:<10} {:>6}/{:<6} files  {}:{} -> {}:{}",
                                j.id,
                                format!("{:?}", j.state).to_lowercase(),
                                j.progress.files_done + j.progress.files_skipped,
                                j.progress.files_total,
                                j.spec.src_endpoint,
                                j.spec.src_path,
                                j.spec.dst_endpoint,
                                j.spec.dst_path
                            );
                        }
                    })
                }
            }
        }
        TransferCommand::Cancel { id, node } => {
            let client = Client::for_node(&DataDir::new(&node.node))?;
            let j = client.cancel_transfer(&id).await?;
            show(node.json, &j, print_job)
        }
    }
}

/// Polls a job until it ends, with a progress bar on a terminal (not with `--json`).
async fn follow(client: &Client, mut job: Job, json: bool) -> anyhow::Result<Job> {
    use std::io::IsTerminal as _;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(job.progress.bytes_total.max(1));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    while job.state == State::Active {
        tokio::time::sleep(Duration::from_millis(250)).await;
        job = client.transfer(&job.id).await?;
        if let Some(bar) = &bar {
            let p = &job.progress;
            bar.set_length(p.bytes_total.max(1));
            bar.set_position(
                (p.bytes_done + p.bytes_skipped).max(p.bytes_received.min(p.bytes_total)),
            );
            bar.set_message(format!(
                "{}/{} files",
                p.files_done + p.files_skipped,
                p.files_total
            ));
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(job)
}

fn print_job(j: &Job) {
    let p = &j.progress;
    println!("transfer {}: {:?}", j.id, j.state);
    println!(
        "  {}:{} -> {}:{}",
        j.spec.src_endpoint, j.spec.src_path, j.spec.dst_endpoint, j.spec.dst_path
    );
    println!(
        "  files: {} copied, {} already there, {} failed, of {}",
        p.files_done, p.files_skipped, p.files_failed, p.files_total
    );
    println!(
        "  bytes: {} copied, {} already there, {} received, of {}",
        p.bytes_done, p.bytes_skipped, p.bytes_received, p.bytes_total
    );
    if let Some(t) = &j.tree_hash {
        println!("  tree checksum: {t}");
    }
    if let Some(e) = &j.error {
        println!("  error: {e}");
    }
    for e in &j.errors {
        println!("  {}: {}", e.path, e.error);
    }
}
