//! Nodes as containers: the compose project of `testnet/docker/` (written into the testnet's
//! directory with an `.env`), on networks `funcmesh-inst-a` and `funcmesh-inst-b` joined by a
//! router container. The image is built here, with no registry: `scripts/build-image.sh node`
//! (Debian packages imported into docker, cached) plus this `funcmesh` binary and the
//! entrypoints. Containers, networks and images are all named `funcmesh…`.
//!
//! The helpers below ([`disconnect`], [`connect`], [`router`]) are what the fault scenarios use
//! to cut and heal the networks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{NodeEntry, Start, Started};
use crate::config::Config;
use crate::datadir::DataDir;

/// The compose project name (containers are named `funcmesh-<service>`).
pub const PROJECT: &str = "funcmesh";
const COMPOSE: &str = include_str!("../../../testnet/docker/docker-compose.yml");
const NODE_ENTRYPOINT: &str = include_str!("../../../testnet/docker/funcmesh-node");
const ROUTER_ENTRYPOINT: &str = include_str!("../../../testnet/docker/funcmesh-router");
const BUILD_IMAGE: &str = include_str!("../../../scripts/build-image.sh");
const BASE_IMAGE: &str = "funcmesh/node-base:bookworm";
const IMAGE_REPO: &str = "funcmesh/node";
/// The mesh port every container listens on (TCP and QUIC), the API's and the data plane's.
const MESH_PORT: u16 = 4001;
const DATA_PORT: u16 = 4002;
const API_PORT: u16 = 7000;

/// Institution A's network.
pub const INST_A: &str = "funcmesh-inst-a";
/// Institution B's network.
pub const INST_B: &str = "funcmesh-inst-b";

/// Each service's network and address, as the compose file has them. The coordinator is on
/// both networks (its first address is where its API listens).
const ADDRESSES: &[(&str, &str, &str)] = &[
    ("coordinator", INST_A, "10.231.1.10"),
    ("coordinator", INST_B, "10.231.2.10"),
    ("a1", INST_A, "10.231.1.11"),
    ("a2", INST_A, "10.231.1.12"),
    ("b1", INST_B, "10.231.2.21"),
    ("b2", INST_B, "10.231.2.22"),
    ("router", INST_A, "10.231.1.254"),
    ("router", INST_B, "10.231.2.254"),
];

/// The address of service `name` on `network`.
pub fn address(name: &str, network: &str) -> Option<&'static str> {
    ADDRESSES
        .iter()
        .find(|(n, net, _)| *n == name && *net == network)
        .map(|(_, _, ip)| *ip)
}

fn home(name: &str) -> anyhow::Result<(&'static str, &'static str)> {
    ADDRESSES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, net, ip)| (*net, *ip))
        .with_context(|| format!("the container testnet has no node `{name}`"))
}

/// The container of service `name`.
pub fn container(name: &str) -> String {
    format!("{PROJECT}-{name}")
}

/// What `testnet.json` records of the compose project.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComposeEntry {
    /// The compose project's name.
    pub project: String,
    /// Its `docker-compose.yml`.
    pub file: PathBuf,
    /// The nodes' image.
    pub image: String,
}

/// The compose project of a testnet directory.
pub(crate) struct Compose {
    file: PathBuf,
    image: String,
}

impl Compose {
    pub(super) fn from_entry(entry: &ComposeEntry) -> Compose {
        Compose {
            file: entry.file.clone(),
            image: entry.image.clone(),
        }
    }

    pub(super) fn entry(&self) -> ComposeEntry {
        ComposeEntry {
            project: PROJECT.into(),
            file: self.file.clone(),
            image: self.image.clone(),
        }
    }

    /// Checks docker, builds the image, writes the compose project into `dir` and starts the
    /// router (which creates the networks).
    pub(super) async fn prepare(dir: &Path, exe: &Path) -> anyhow::Result<Compose> {
        docker(&["version", "--format", "{{.Server.Version}}"])
            .await
            .context("the container testnet needs a running docker engine")?;
        compose_cmd(None, &["version", "--short"]).await.context(
            "the container testnet needs docker-compose (Debian: apt-get install docker-compose)",
        )?;
        if let Some(other) = running_elsewhere(dir).await? {
            bail!(
                "a container testnet from {0} is running; remove it first with \
                 `funcmesh testnet down --docker --dir {0}`",
                other.display()
            );
        }
        let image = build_image(dir, exe).await?;
        let file = dir.join("docker-compose.yml");
        std::fs::write(&file, COMPOSE).context("cannot write docker-compose.yml")?;
        std::fs::write(
            dir.join(".env"),
            format!(
                "COMPOSE_PROJECT_NAME={PROJECT}\nFUNCMESH_TESTNET_DIR={}\nFUNCMESH_IMAGE={image}\n",
                dir.display()
            ),
        )
        .context("cannot write .env")?;
        let compose = Compose { file, image };
        compose.up("router").await?;
        Ok(compose)
    }

    async fn up(&self, service: &str) -> anyhow::Result<()> {
        compose_cmd(
            Some(&self.file),
            &["up", "-d", "--no-deps", "--no-recreate", service],
        )
        .await
        .map(drop)
    }

    /// Listen addresses: the service's own address (the coordinator's mesh every address, as it
    /// is on both networks), fixed ports (each container has its own).
    pub(super) fn configure(&self, name: &str, config: &mut Config) -> anyhow::Result<()> {
        let (_, ip) = home(name)?;
        let mesh_ip = if name == "coordinator" { "0.0.0.0" } else { ip };
        config.mesh.listen = vec![
            format!("/ip4/{mesh_ip}/tcp/{MESH_PORT}"),
            format!("/ip4/{mesh_ip}/udp/{MESH_PORT}/quic-v1"),
        ];
        config.api.listen = format!("{ip}:{API_PORT}").parse()?;
        config.transfer.listen = format!("{ip}:{DATA_PORT}").parse()?;
        Ok(())
    }

    /// The coordinator's address on `name`'s network.
    pub(super) fn coordinator_addr(
        &self,
        name: &str,
        coordinator: &NodeEntry,
    ) -> anyhow::Result<String> {
        let (network, _) = home(name)?;
        let ip = address("coordinator", network)
            .with_context(|| format!("the coordinator is not on {network}"))?;
        Ok(format!(
            "/ip4/{ip}/tcp/{MESH_PORT}/p2p/{}",
            coordinator.peer_id
        ))
    }

    pub(super) async fn start(
        &self,
        name: &str,
        dir: &DataDir,
        how: Start<'_>,
    ) -> anyhow::Result<Started> {
        if let Start::Join { addr, invite } = how {
            std::fs::write(dir.root().join("join.addr"), addr).context("join.addr")?;
            std::fs::write(dir.root().join("join.invite"), invite).context("join.invite")?;
        }
        self.up(name).await?;
        let container = container(name);
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &container])
            .await?
            .trim()
            .parse::<u32>()
            .with_context(|| format!("{container} has no process"))?;
        if pid == 0 {
            bail!(
                "{container} stopped at once; see {}",
                dir.root().join("node.log").display()
            );
        }
        Ok(Started {
            pid,
            container: Some(container),
            api_pid: None,
            child: None,
        })
    }

    pub(super) async fn stop(&self, container: &str, kill_now: bool) -> anyhow::Result<()> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container])
            .await?
            .trim()
            .parse::<u32>()
            .unwrap_or(0);
        if pid == 0 {
            return Ok(());
        }
        if kill_now {
            docker(&["kill", container]).await?;
        } else {
            docker(&["stop", "-t", "10", container]).await?;
        }
        super::process::wait_dead(pid, Duration::from_secs(15)).await
    }
}

/// Removes the container testnet of `dir` (its containers and networks; the images stay, as a
/// cache). Also removes what a testnet whose directory is gone left behind.
pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("docker-compose.yml");
    if file.exists() && dir.join(".env").exists() {
        compose_cmd(
            Some(&file),
            &["down", "--remove-orphans", "--timeout", "10"],
        )
        .await?;
    }
    // Leftovers (a directory removed by hand): by label and by name.
    let ids = docker(&["ps", "-aq", "--filter", "label=funcmesh.testnet"]).await?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids);
        docker(&args).await?;
    }
    for network in [INST_A, INST_B] {
        if docker(&["network", "inspect", network]).await.is_ok() {
            docker(&["network", "rm", network]).await?;
        }
    }
    Ok(())
}

/// The directory of a container testnet running from somewhere else than `dir`.
async fn running_elsewhere(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let out = docker(&[
        "ps",
        "-a",
        "--filter",
        "label=funcmesh.testnet",
        "--format",
        "{{.Label \"funcmesh.testnet\"}}",
    ])
    .await?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .find(|p| p != dir))
}

/// Builds (or finds) the nodes' image: the base from Debian packages, then this binary and the
/// entrypoints. Tagged by what went in, so a new binary makes a new image.
async fn build_image(dir: &Path, exe: &Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let key = {
        use std::hash::{Hash as _, Hasher as _};
        // A cache key only: a different toolchain hashing differently costs one rebuild.
        let mut h = std::hash::DefaultHasher::new();
        (
            meta.len(),
            mtime,
            exe,
            NODE_ENTRYPOINT,
            ROUTER_ENTRYPOINT,
            BUILD_IMAGE,
        )
            .hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let image = format!("{IMAGE_REPO}:{key}");
    if docker(&["image", "inspect", &image]).await.is_ok() {
        return Ok(image);
    }
    let ctx = dir.join(".image");
    std::fs::create_dir_all(&ctx).context("image build dir")?;
    let script = ctx.join("build-image.sh");
    std::fs::write(&script, BUILD_IMAGE).context("build-image.sh")?;
    eprintln!("testnet: building {BASE_IMAGE} from Debian packages (cached after the first time)");
    run(tokio::process::Command::new("bash")
        .arg(&script)
        .arg("node"))
    .await
    .context("building the base image")?;
    for (name, text) in [
        ("funcmesh-node", NODE_ENTRYPOINT),
        ("funcmesh-router", ROUTER_ENTRYPOINT),
    ] {
        let path = ctx.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {name}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    let bin = ctx.join("funcmesh");
    if std::fs::hard_link(exe, &bin).is_err() {
        std::fs::copy(exe, &bin).context("cannot copy the funcmesh binary")?;
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BASE_IMAGE}\n\
             COPY funcmesh funcmesh-node funcmesh-router /usr/local/bin/\n\
             LABEL funcmesh.testnet.key={key}\n"
        ),
    )
    .context("Dockerfile")?;
    eprintln!("testnet: building {image}");
    // The classic builder uses the local base image as it is; it never asks a registry.
    let built = run(tokio::process::Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &image])
        .arg(&ctx))
    .await;
    let _ = std::fs::remove_dir_all(&ctx);
    built.context("building the node image")?;
    // Older node images are only a cache of older binaries.
    let old = docker(&["images", IMAGE_REPO, "--format", "{{.Repository}}:{{.Tag}}"]).await?;
    for tag in old.lines().filter(|t| *t != image && !t.is_empty()) {
        let _ = docker(&["rmi", tag]).await;
    }
    Ok(image)
}

/// Cuts `node`'s container off `network`.
pub async fn disconnect(node: &str, network: &str) -> anyhow::Result<()> {
    docker(&["network", "disconnect", network, &container(node)])
        .await
        .map(drop)
}

/// Connects `node`'s container to `network` again, at its address there.
pub async fn connect(node: &str, network: &str) -> anyhow::Result<()> {
    let ip =
        address(node, network).with_context(|| format!("{node} has no address on {network}"))?;
    docker(&["network", "connect", "--ip", ip, network, &container(node)])
        .await
        .map(drop)
}

/// Sets the router's mode: `open` (plain forwarding) or `nat` (B behind NAT).
pub async fn router(mode: &str) -> anyhow::Result<()> {
    docker(&["exec", &container("router"), "funcmesh-router", mode])
        .await
        .map(drop)
}

/// Runs `docker ARGS` and returns its stdout.
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    run(tokio::process::Command::new("docker").args(args))
        .await
        .with_context(|| {
            format!(
                "docker {}",
                args.iter().take(3).copied().collect::<Vec<_>>().join(" ")
            )
        })
}

async fn compose_cmd(file: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("docker-compose");
    if let Some(file) = file {
        cmd.arg("--project-name")
            .arg(PROJECT)
            .arg("--file")
            .arg(file);
        if let Some(dir) = file.parent() {
            cmd.arg("--project-directory").arg(dir);
        }
    }
    cmd.args(args);
    run(&mut cmd)
        .await
        .with_context(|| format!("docker-compose {}", args.join(" ")))
}

async fn run(cmd: &mut tokio::process::Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run it")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(8).collect();
        bail!(
            "{}: {}",
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
