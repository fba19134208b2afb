//! Host workers that cannot touch the node or each other.
//!
//! When the node runs as root (and `host_user = "auto"`), every host worker runs as a uid of its
//! own, which no account and no file on the machine has: it cannot read the data dir (0700, the
//! node's), signal or trace other workers, or write anything but its scratch directory. That
//! directory lives outside the data dir, is the worker's working directory, `HOME` and
//! `TMPDIR`, and is removed when the worker exits. The environment is cleared. The worker script
//! the workers run is a root-owned, read-only copy in a directory they may only traverse.
//!
//! Without root the workers run as the node's user, and the endpoint refuses host tasks of
//! other institutions unless the operator sets `foreign_host_tasks = true`.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::PathBuf;

use crate::config::EndpointConfig;
use crate::pool::WorkerId;

/// The first uid handed to isolated workers; each endpoint takes a random block of a million.
const UID_FLOOR: u32 = 1_000_000_000;
/// uids per endpoint (worker ids wrap around within the block).
const UID_BLOCK: u32 = 1_000_000;

/// Where and as whom an endpoint's isolated host workers run.
#[derive(Debug)]
pub(crate) struct HostIsolation {
    root: PathBuf,
    /// The worker script, read-only for the workers.
    pub(crate) worker_py: PathBuf,
    /// The interpreter: the endpoint's, if a worker's uid may run it, else `python3` from the
    /// workers' `PATH` (an interpreter in the node user's home is out of their reach).
    pub(crate) python: String,
    uid_base: u32,
}

/// Whether a process of any uid may execute `path`: it and every directory above it are
/// executable by others.
fn anyone_may_run(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    real.ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Whether host workers of `config` run isolated on this machine.
pub(crate) fn available(config: &EndpointConfig) -> bool {
    config.isolates_host_workers()
}

impl HostIsolation {
    /// Prepares the scratch root of endpoint `config.name`, if its workers run isolated.
    pub(crate) fn prepare(
        config: &EndpointConfig,
        worker_script: &str,
    ) -> std::io::Result<Option<HostIsolation>> {
        if !available(config) {
            return Ok(None);
        }
        let root = std::env::temp_dir().join(format!(
            "funcmesh-host-{}-{}-{}",
            config.name,
            std::process::id(),
            hex::encode(rand::random::<[u8; 4]>())
        ));
        // Workers may traverse it to reach their own directory and the script, not list it.
        std::fs::DirBuilder::new().mode(0o711).create(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))?;
        let worker_py = root.join("worker.py");
        std::fs::write(&worker_py, worker_script)?;
        std::fs::set_permissions(&worker_py, std::fs::Permissions::from_mode(0o644))?;
        let uid_base = UID_FLOOR + (rand::random::<u32>() % 2000) * UID_BLOCK;
        let python = if anyone_may_run(std::path::Path::new(&config.python)) {
            config.python.clone()
        } else {
            tracing::warn!(
                endpoint = %config.name,
                python = %config.python,
                "the isolated workers' uids cannot run this endpoint's python (it, or a \
                 directory on its way, is not open to others): they run the system's python3 \
                 instead. Put the interpreter and its packages where every user may read them \
                 (not under a private home), or run the node as an ordinary user"
            );
            "python3".to_owned()
        };
        Ok(Some(HostIsolation {
            root,
            worker_py,
            python,
            uid_base,
        }))
    }

    /// The uid (and gid) worker `worker` runs as.
    pub(crate) fn uid(&self, worker: WorkerId) -> u32 {
        self.uid_base + (worker % u64::from(UID_BLOCK)) as u32
    }

    /// Makes worker `worker`'s scratch directory, owned by its uid and private to it.
    pub(crate) fn scratch(&self, worker: WorkerId) -> std::io::Result<PathBuf> {
        let dir = self.root.join(format!("w{worker}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let uid = self.uid(worker);
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
        Ok(dir)
    }
}

impl Drop for HostIsolation {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
