//! `funcmesh cap …`: grant, delegate, inspect, hold and revoke capability tokens.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use crate::client::Client;
use crate::datadir::DataDir;
use crate::output::*;

/// `funcmesh cap …`.
#[derive(Debug, Subcommand)]
pub enum CapCommand {
    /// Grant another institution the use of one of your institution's endpoints (or, with
    /// --flow, the running of one of its deployed flows); prints the token. Offline, except
    /// that names are resolved through --node when given.
    #[command(group(clap::ArgGroup::new("validity").required(true).args(["expires", "ttl"])))]
    #[command(group(clap::ArgGroup::new("resource").required(true).args(["endpoint", "flow"])))]
    Grant {
        /// Your institution's key file (the token's root).
        #[arg(long)]
        issuer_key: PathBuf,
        /// Who receives it: institution:NAME_OR_KEY.
        #[arg(long)]
        to: String,
        /// The endpoint: its registry id (or, with --node, a name or id prefix).
        #[arg(long)]
        endpoint: Option<String>,
        /// A deployed flow of your institution instead: its id (or, with --node, its title or
        /// an id prefix). The token allows flow.run.
        #[arg(long)]
        flow: Option<String>,
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
        /// Only data-root paths below this directory (transfer.*); repeatable. Default: the
        /// whole data root.
        #[arg(long = "path")]
        paths: Vec<String>,
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
        /// Only data-root paths below this directory (within what the token allows);
        /// repeatable.
        #[arg(long = "path")]
        paths: Vec<String>,
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

/// A client for `--node`, when given and running.
pub(crate) fn optional_client(node: Option<&PathBuf>) -> anyhow::Result<Option<Client>> {
    node.map(|n| Client::for_node(&DataDir::new(n))).transpose()
}

/// Resolves institution names (or keys) through the node's registry.
pub(crate) async fn institution_keys(
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

pub(crate) fn resolve_institution(
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

pub(crate) async fn function_ids(
    client: Option<&Client>,
    queries: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for q in queries {
        out.push(match client {
            Some(c) => c.function(q).await?.id,
            None => q.clone(),
        });
    }
    Ok(out)
}

pub(crate) async fn cap_command(cmd: CapCommand) -> anyhow::Result<()> {
    use crate::capabilities as caps;
    match cmd {
        CapCommand::Grant {
            issuer_key,
            to,
            endpoint,
            flow,
            functions,
            abilities,
            expires,
            ttl,
            not_before,
            paths,
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
            let mut abilities = abilities
                .iter()
                .map(|a| a.parse::<capability::Ability>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!(e))?;
            // A grant's resource is an endpoint, or a flow (whose only ability is flow.run).
            let endpoint = match (endpoint, flow) {
                (Some(endpoint), None) => match &client {
                    Some(c) => c.endpoint(&endpoint).await?.id,
                    None => endpoint,
                },
                (None, Some(flow)) => {
                    if abilities.iter().any(|a| *a != capability::Ability::FlowRun) {
                        anyhow::bail!("a grant for a flow (--flow) allows flow.run only");
                    }
                    if !functions.is_empty() || !paths.is_empty() {
                        anyhow::bail!(
                            "--function and --path narrow endpoint grants, not a flow's (--flow)"
                        );
                    }
                    abilities = vec![capability::Ability::FlowRun];
                    match &client {
                        Some(c) => c.flow(&flow).await?.id,
                        None => flow,
                    }
                }
                _ => anyhow::bail!("give --endpoint or --flow"),
            };
            let Some(expires) = caps::expiry(expires.as_deref(), ttl)? else {
                anyhow::bail!("a grant needs --expires DATE or --ttl DURATION");
            };
            let grant = capability::Grant {
                paths,
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
            paths,
            node,
        } => {
            let bytes = caps::token_arg(&token)?;
            let (_, seed, _) = caps::institution_key(&issuer_key)?;
            let client = optional_client(node.as_ref())?;
            let known = institution_keys(client.as_ref()).await?;
            let d = capability::Delegation {
                paths,
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
            show(node.json, &v, |v| {
                print_capability(v);
            })
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
