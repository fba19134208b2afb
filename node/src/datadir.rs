//! The node's data dir: every file a node keeps, in one place.
//!
//! | path | what |
//! |---|---|
//! | `node.key` | the node's ed25519 identity (mode 0600) |
//! | `config.toml` | the node's configuration |
//! | `federation.json` | the signed genesis of the federation it belongs to |
//! | `membership.json` | its membership proof |
//! | `federation.key`, `.pub` | the federation root key (coordinators made by `federation create`) |
//! | `api.json` | the running node's API address and access token (mode 0600) |
//! | `db/` | RocksDB |

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use mesh::membership::{Federation, Genesis, Proof};
use serde::{Deserialize, Serialize};

/// A node's data dir.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What `api.json` holds: how client commands reach a running node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiInfo {
    /// Format version.
    pub version: u32,
    /// `http://host:port` of the API.
    pub url: String,
    /// Bearer token.
    pub token: String,
    /// The daemon's process id.
    pub pid: u32,
    /// The node's peer id.
    pub peer_id: String,
}

impl DataDir {
    /// The data dir at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the data dir if needed, readable by its owner only (0700: it holds the node key,
    /// the API token and other institutions' task data).
    pub fn create(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create data dir {}", self.root.display()))?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (0700)", self.root.display()))
    }
    /// The node key file.
    pub fn node_key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// The genesis file.
    pub fn federation(&self) -> PathBuf {
        self.root.join("federation.json")
    }
    /// The membership proof file.
    pub fn membership(&self) -> PathBuf {
        self.root.join("membership.json")
    }
    /// The federation root key (coordinators).
    pub fn federation_key(&self) -> PathBuf {
        self.root.join("federation.key")
    }
    /// The API address file.
    pub fn api(&self) -> PathBuf {
        self.root.join("api.json")
    }
    /// RocksDB.
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Whether `init` has run here.
    pub fn is_initialised(&self) -> bool {
        self.node_key().exists()
    }

    /// The federation this node belongs to, verified, if any.
    pub fn read_federation(&self) -> anyhow::Result<Option<Federation>> {
        let path = self.federation();
        if !path.exists() {
            return Ok(None);
        }
        let genesis: Genesis = read_json(&path)?;
        let fed = genesis
            .verify()
            .with_context(|| format!("{} does not hold a valid genesis", path.display()))?;
        Ok(Some(fed))
    }

    /// The node's membership: federation and proof. Errors say how to get one.
    pub fn read_membership(&self) -> anyhow::Result<(Federation, Proof)> {
        let Some(fed) = self.read_federation()? else {
            bail!(
                "{} has not joined a federation: run `funcmesh join <coordinator> --invite <token> \
                 --data-dir {0}` or `funcmesh federation create --data-dir {0}`",
                self.root.display()
            );
        };
        let proof: Proof = read_json(&self.membership())?;
        Ok((fed, proof))
    }

    /// Stores the federation and the node's proof (atomically, each file).
    pub fn write_membership(&self, fed: &Federation, proof: &Proof) -> anyhow::Result<()> {
        write_json_atomic(&self.federation(), &fed.genesis, 0o644)?;
        // A proof is a credential: the owner's only.
        write_json_atomic(&self.membership(), proof, 0o600)
    }

    /// Reads `api.json`, with an error that says what to do when no node runs here.
    pub fn read_api(&self) -> anyhow::Result<ApiInfo> {
        let path = self.api();
        if !self.root.exists() {
            bail!(
                "no node data dir at {}: pass the data dir of a node with --node",
                self.root.display()
            );
        }
        if !path.exists() {
            bail!(
                "no node is running in {0}: start it with `funcmesh start --data-dir {0}`",
                self.root.display()
            );
        }
        read_json(&path)
    }
}

/// Reads a JSON file with an error naming it.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// Writes a JSON file atomically (temp file, fsync, rename) with the given mode.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T, mode: u32) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(value).context("serialising")?;
    write_atomic(path, &json, mode)
}

/// Writes a file atomically (temp file, fsync, rename) with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    // The rename is durable once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}
