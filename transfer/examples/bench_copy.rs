//! Copies between two data planes on loopback, as `scripts/bench-transfer` measures them beside
//! cp, iperf3, scp and rsync.
//!
//! ```sh
//! cargo run --release -p transfer --example bench_copy -- file /var/tmp/x/big.bin
//! cargo run --release -p transfer --example bench_copy -- tree /var/tmp/x/small
//! cargo run --release -p transfer --example bench_copy -- blob /var/tmp/x/big.bin
//! ```
//! `file`: one file from a data root to another (a copy job: hashing at the source, QUIC,
//! verified streaming, a part file renamed into place). `tree`: a directory, recursively, then
//! again with `--sync checksum`. `blob`: the file imported into one blob store, then fetched into
//! a second store in `/dev/shm` (memory). Prints one JSON line.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use transfer::BlobStore;
use transfer::copy::{BoxFuture, Context, Jobs, Spec, State, SyncLevel};
use transfer::files::{Ask, Roots};
use transfer::net::DataPlane;
use transfer::net::Remote;
use transfer::root::DataRoot;

struct OneRoot(Arc<DataRoot>);

impl Roots for OneRoot {
    fn open(&self, _peer: &PeerId, _ask: &Ask<'_>) -> Result<Arc<DataRoot>, String> {
        Ok(self.0.clone())
    }
}

struct Ctx {
    remote: Remote,
    dst: Arc<DataRoot>,
}

impl Context for Ctx {
    fn source<'a>(
        &'a self,
        _node: &'a str,
        _endpoint: &'a str,
        _path: &'a str,
    ) -> BoxFuture<'a, Result<(Remote, Option<String>), String>> {
        let r = self.remote.clone();
        Box::pin(async move { Ok((r, None)) })
    }
    fn destination(&self, _endpoint: &str) -> Result<Arc<DataRoot>, String> {
        Ok(self.dst.clone())
    }
}

fn plane(dir: &Path, root: Option<Arc<DataRoot>>) -> (DataPlane, Keypair) {
    let key = Keypair::generate_ed25519();
    let p = DataPlane::bind(
        &key,
        "127.0.0.1:0".parse().unwrap(),
        BlobStore::open(dir).unwrap(),
        Arc::new(|_| true),
    )
    .unwrap();
    if let Some(r) = root {
        p.serve_roots(Arc::new(OneRoot(r)));
    }
    (p, key)
}

async fn copy(
    src_root: &Path,
    name: &str,
    recursive: bool,
    rounds: &[Option<SyncLevel>],
) -> Vec<(f64, transfer::copy::Job)> {
    let work = tempfile::tempdir_in(src_root.parent().unwrap()).unwrap();
    let dst_dir = work.path().join("dst");
    std::fs::create_dir_all(&dst_dir).unwrap();
    let src = Arc::new(DataRoot::open(src_root).unwrap());
    let dst = Arc::new(DataRoot::open(&dst_dir).unwrap());
    let (a, ka) = plane(&work.path().join("a-blobs"), Some(src));
    let (b, _) = plane(&work.path().join("b-blobs"), None);
    let remote = b.remote(ka.public().to_peer_id(), a.local_addr().unwrap());
    let store = store::Store::open(&work.path().join("db")).unwrap();
    let jobs = Jobs::start(
        store,
        Arc::new(Ctx { remote, dst }),
        work.path().join("parts"),
        Duration::from_secs(60),
    )
    .unwrap();
    let mut out = Vec::new();
    for (i, sync) in rounds.iter().enumerate() {
        let t = Instant::now();
        let job = jobs
            .submit(
                &format!("bench-{i}"),
                Spec {
                    src_node: "a".into(),
                    src_endpoint: "ep".into(),
                    src_path: name.into(),
                    dst_endpoint: "ep".into(),
                    dst_path: "copy".into(),
                    recursive,
                    sync: *sync,
                    delete: false,
                    requester: String::new(),
                    read_token: None,
                },
            )
            .unwrap();
        let job = loop {
            let j = jobs.get(&job.id).unwrap();
            if j.state != State::Active {
                break j;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(job.state, State::Succeeded, "{job:?}");
        out.push((t.elapsed().as_secs_f64(), job));
    }
    drop(work);
    out
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, path) = (args[1].as_str(), PathBuf::from(&args[2]));
    let parent = path.parent().unwrap().to_path_buf();
    let name = path.file_name().unwrap().to_str().unwrap().to_owned();
    let mib = |bytes: u64, s: f64| ((bytes as f64 / (1 << 20) as f64 / s) * 10.0).round() / 10.0;
    match mode {
        "file" => {
            let r = copy(&parent, &name, false, &[None]).await;
            let (s, job) = &r[0];
            let bytes = job.progress.bytes_done;
            println!(
                "{}",
                serde_json::json!({"mode": "file", "bytes": bytes, "s": s, "mib_s": mib(bytes, *s),
                    "bytes_received": job.progress.bytes_received})
            );
        }
        "tree" => {
            let r = copy(&parent, &name, true, &[None, Some(SyncLevel::Checksum)]).await;
            let (first, j1) = &r[0];
            let (again, j2) = &r[1];
            println!(
                "{}",
                serde_json::json!({"mode": "tree", "files": j1.progress.files_done, "bytes": j1.progress.bytes_done,
                    "s": first, "files_s": (j1.progress.files_done as f64 / first).round(),
                    "sync_checksum_s": again, "sync_skipped": j2.progress.files_skipped,
                    "sync_bytes_received": j2.progress.bytes_received})
            );
        }
        "blob" => {
            let work = tempfile::tempdir_in(&parent).unwrap();
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            let a_store = BlobStore::open(work.path().join("a")).unwrap();
            let t = Instant::now();
            let (hash, size) = a_store.import(std::fs::File::open(&path).unwrap()).unwrap();
            let import_s = t.elapsed().as_secs_f64();
            let ka = Keypair::generate_ed25519();
            let a = DataPlane::bind(
                &ka,
                "127.0.0.1:0".parse().unwrap(),
                a_store,
                Arc::new(|_| true),
            )
            .unwrap();
            let b_store = BlobStore::open(shm.path()).unwrap();
            let kb = Keypair::generate_ed25519();
            let b = DataPlane::bind(
                &kb,
                "127.0.0.1:0".parse().unwrap(),
                b_store,
                Arc::new(|_| true),
            )
            .unwrap();
            let t = Instant::now();
            let (got, _) = b
                .fetch(ka.public().to_peer_id(), a.local_addr().unwrap(), hash, 3)
                .await
                .unwrap();
            let s = t.elapsed().as_secs_f64();
            assert_eq!(got, size);
            println!(
                "{}",
                serde_json::json!({"mode": "blob", "bytes": size, "import_s": import_s,
                    "s": s, "mib_s": mib(size, s), "into": "/dev/shm"})
            );
        }
        other => panic!("unknown mode {other}: file, tree or blob"),
    }
}
