//! Copy jobs between two data planes on loopback: trees, sync, corruption, interruption.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use rand::RngCore as _;
use transfer::blob::{BlobStore, Hash};
use transfer::copy::{Context, Job, Jobs, Spec, State, SyncLevel};
use transfer::files::{Ask, Roots, Want};
use transfer::net::DataPlane;
use transfer::net::Remote;
use transfer::root::{DataRoot, RelPath};

/// A node's roots: endpoint name → root, reads allowed only below `readable` (if set).
struct TestRoots {
    roots: HashMap<String, Arc<DataRoot>>,
    readable: Option<RelPath>,
}

impl Roots for TestRoots {
    fn open(&self, _peer: &PeerId, ask: &Ask<'_>) -> Result<Arc<DataRoot>, String> {
        if let Some(prefix) = &self.readable {
            if ask.want == Want::Read && !ask.path.starts_with(prefix) {
                return Err(format!("{} is outside the granted path {prefix}", ask.path));
            }
        }
        self.roots
            .get(ask.endpoint)
            .cloned()
            .ok_or_else(|| format!("no endpoint {}", ask.endpoint))
    }
}

struct Side {
    plane: DataPlane,
    key: Keypair,
    dir: tempfile::TempDir,
    root: Arc<DataRoot>,
}

fn side(readable: Option<&str>) -> Side {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("root")).unwrap();
    let key = Keypair::generate_ed25519();
    let store = BlobStore::open(dir.path().join("blobs")).unwrap();
    let plane = DataPlane::bind(
        &key,
        "127.0.0.1:0".parse().unwrap(),
        store,
        Arc::new(|_| true),
    )
    .unwrap();
    let root = Arc::new(DataRoot::open(dir.path().join("root")).unwrap());
    plane.serve_roots(Arc::new(TestRoots {
        roots: HashMap::from([("ep".to_owned(), root.clone())]),
        readable: readable.map(|r| RelPath::parse(r).unwrap()),
    }));
    Side {
        plane,
        key,
        dir,
        root,
    }
}

struct Ctx {
    source: Mutex<Remote>,
    dst: Arc<DataRoot>,
}

impl Context for Ctx {
    fn source<'a>(
        &'a self,
        _node: &'a str,
        _ep: &'a str,
        _path: &'a str,
    ) -> transfer::copy::BoxFuture<'a, Result<(Remote, Option<String>), String>> {
        let remote = self.source.lock().unwrap().clone();
        Box::pin(async move { Ok((remote, None)) })
    }
    fn destination(&self, _endpoint: &str) -> Result<Arc<DataRoot>, String> {
        Ok(self.dst.clone())
    }
}

struct Pair {
    src: Side,
    dst: Side,
    jobs: Jobs,
    _db: tempfile::TempDir,
}

fn pair(readable: Option<&str>, patience: Duration) -> Pair {
    let (src, dst) = (side(readable), side(None));
    let db = tempfile::tempdir().unwrap();
    let store = store::Store::open(db.path()).unwrap();
    let remote = dst.plane.remote(
        src.key.public().to_peer_id(),
        src.plane.local_addr().unwrap(),
    );
    let jobs = Jobs::start(
        store,
        Arc::new(Ctx {
            source: Mutex::new(remote),
            dst: dst.root.clone(),
        }),
        dst.dir.path().join("parts"),
        patience,
    )
    .unwrap();
    Pair {
        src,
        dst,
        jobs,
        _db: db,
    }
}

fn spec(src: &str, dst: &str, recursive: bool, sync: Option<SyncLevel>) -> Spec {
    Spec {
        src_node: "src".into(),
        src_endpoint: "ep".into(),
        src_path: src.into(),
        dst_endpoint: "ep".into(),
        dst_path: dst.into(),
        recursive,
        sync,
        delete: false,
        requester: String::new(),
        read_token: None,
    }
}

async fn finished(jobs: &Jobs, id: &str, within: Duration) -> Job {
    let deadline = Instant::now() + within;
    loop {
        let job = jobs.get(id).unwrap();
        if job.state != State::Active {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "transfer {id} still active: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn tree(root: &std::path::Path, files: usize) -> u64 {
    let sizes = [0usize, 1, 4096, 16 * 1024, 16 * 1024 + 1, 100_000, 3 << 20];
    let mut total = 0;
    for i in 0..files {
        let dir = root.join(format!("d{}/e{}", i % 7, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let size = sizes[i % sizes.len()];
        let path = dir.join(format!("f{i}"));
        std::fs::write(&path, random(size)).unwrap();
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(0o600 + (i as u32 % 2) * 0o40),
        )
        .unwrap();
        total += size as u64;
    }
    total
}

fn same_tree(a: &std::path::Path, b: &std::path::Path) {
    let mut n = 0;
    for entry in walk(a) {
        let rel = entry.strip_prefix(a).unwrap();
        let other = b.join(rel);
        let (ma, mb) = (
            std::fs::metadata(&entry).unwrap(),
            std::fs::metadata(&other).unwrap(),
        );
        assert_eq!(ma.is_dir(), mb.is_dir(), "{}", rel.display());
        if ma.is_file() {
            assert_eq!(
                std::fs::read(&entry).unwrap(),
                std::fs::read(&other).unwrap(),
                "{}",
                rel.display()
            );
            assert_eq!(
                ma.permissions().mode() & 0o7777,
                mb.permissions().mode() & 0o7777,
                "{}",
                rel.display()
            );
            assert_eq!(
                ma.modified().unwrap(),
                mb.modified().unwrap(),
                "{}",
                rel.display()
            );
            n += 1;
        }
    }
    assert!(n > 0);
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_copies_with_modes_and_times_and_a_checksum_sync_moves_nothing() {
    let p = pair(None, Duration::from_secs(10));
    let total = tree(&p.src.dir.path().join("root/in"), 120);
    let job = p.jobs.submit("t1", spec("in", "out", true, None)).unwrap();
    let job = finished(&p.jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(job.state, State::Succeeded, "{job:?}");
    assert_eq!(job.progress.files_total, 120);
    assert_eq!(job.progress.files_done, 120);
    assert_eq!(job.progress.bytes_done, total);
    assert!(job.tree_hash.is_some());
    same_tree(
        &p.src.dir.path().join("root/in"),
        &p.dst.dir.path().join("root/out"),
    );
    // No part file or outboard is left behind.
    assert!(
        walk(&p.dst.dir.path().join("root"))
            .iter()
            .all(|f| !f.to_string_lossy().contains(".funcmesh-part."))
    );
    assert_eq!(
        std::fs::read_dir(p.dst.dir.path().join("parts"))
            .unwrap()
            .count(),
        0
    );

    // Again with --sync checksum: every file is found there already.
    let again = p
        .jobs
        .submit("t2", spec("in", "out", true, Some(SyncLevel::Checksum)))
        .unwrap();
    let again = finished(&p.jobs, &again.id, Duration::from_secs(60)).await;
    assert_eq!(again.state, State::Succeeded, "{again:?}");
    assert_eq!(again.progress.files_skipped, 120);
    assert_eq!(again.progress.bytes_received, 0);
    assert_eq!(again.tree_hash, job.tree_hash);

    // One file changed at the source: only it moves.
    std::fs::write(p.src.dir.path().join("root/in/d1/e1/f1"), b"changed").unwrap();
    let third = p
        .jobs
        .submit("t3", spec("in", "out", true, Some(SyncLevel::Checksum)))
        .unwrap();
    let third = finished(&p.jobs, &third.id, Duration::from_secs(60)).await;
    assert_eq!(
        (third.progress.files_done, third.progress.files_skipped),
        (1, 119)
    );
    assert_eq!(
        std::fs::read(p.dst.dir.path().join("root/out/d1/e1/f1")).unwrap(),
        b"changed"
    );

    // The same request id again is the same job, not a new transfer.
    assert_eq!(
        p.jobs
            .submit("t1", spec("in", "out", true, None))
            .unwrap()
            .id,
        "t1"
    );
    let err = p
        .jobs
        .submit("t1", spec("in", "elsewhere", true, None))
        .unwrap_err();
    assert!(err.contains("already used"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_groups_on_the_way_are_refetched_and_the_file_arrives_intact() {
    let p = pair(None, Duration::from_secs(10));
    // Large enough to come on two streams at once: both are corrupted on their first round.
    let bytes = random(24 << 20);
    std::fs::write(p.src.dir.path().join("root/big"), &bytes).unwrap();
    p.src.plane.corrupt_next_sends(2);
    let job = p
        .jobs
        .submit("c1", spec("big", "copy", false, None))
        .unwrap();
    let job = finished(&p.jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(job.state, State::Succeeded, "{job:?}");
    let got = std::fs::read(p.dst.dir.path().join("root/copy")).unwrap();
    assert_eq!(Hash::of(&got), Hash::of(&bytes));
    // The corrupt groups and what followed them travelled twice.
    assert!(
        job.progress.bytes_received > bytes.len() as u64,
        "{:?}",
        job.progress
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_travel_many_to_a_request_and_a_corrupt_one_goes_again_alone() {
    let p = pair(None, Duration::from_secs(10));
    let root = p.src.dir.path().join("root/small");
    let mut total = 0u64;
    // 600 files of 1 byte to 64 KiB: three batches of at most 256.
    for i in 0..600usize {
        let dir = root.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&dir).unwrap();
        let size = 1 + (i * 7919) % (64 << 10);
        std::fs::write(dir.join(format!("f{i}")), random(size)).unwrap();
        total += size as u64;
    }
    p.src.plane.corrupt_next_sends(1);
    let job = p
        .jobs
        .submit("s1", spec("small", "small-copy", true, None))
        .unwrap();
    let job = finished(&p.jobs, &job.id, Duration::from_secs(60)).await;
    assert_eq!(job.state, State::Succeeded, "{job:?}");
    assert_eq!(job.progress.files_done, 600);
    assert_eq!(job.progress.bytes_done, total);
    same_tree(&root, &p.dst.dir.path().join("root/small-copy"));
    // The corrupt file was refused on arrival and fetched again on its own.
    assert!(job.progress.bytes_received > total, "{:?}", job.progress);
    assert_eq!(
        std::fs::read_dir(p.dst.dir.path().join("parts"))
            .unwrap()
            .count(),
        0,
        "no part left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_outside_the_granted_path_is_refused_with_the_reason() {
    let p = pair(Some("shared"), Duration::from_secs(10));
    std::fs::create_dir_all(p.src.dir.path().join("root/shared")).unwrap();
    std::fs::write(p.src.dir.path().join("root/private"), b"no").unwrap();
    std::fs::write(p.src.dir.path().join("root/shared/yes"), b"yes").unwrap();
    let job = p
        .jobs
        .submit("r1", spec("private", "x", false, None))
        .unwrap();
    let job = finished(&p.jobs, &job.id, Duration::from_secs(30)).await;
    assert_eq!(job.state, State::Failed);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("outside the granted path"),
        "{job:?}"
    );
    let ok = p
        .jobs
        .submit("r2", spec("shared", "x", true, None))
        .unwrap();
    assert_eq!(
        finished(&p.jobs, &ok.id, Duration::from_secs(30))
            .await
            .state,
        State::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_what_the_source_does_not_have() {
    let p = pair(None, Duration::from_secs(10));
    tree(&p.src.dir.path().join("root/in"), 10);
    std::fs::create_dir_all(p.dst.dir.path().join("root/out/stale/dir")).unwrap();
    std::fs::write(p.dst.dir.path().join("root/out/stale/dir/old"), b"old").unwrap();
    let mut s = spec("in", "out", true, None);
    s.delete = true;
    let job = p.jobs.submit("d1", s).unwrap();
    let job = finished(&p.jobs, &job.id, Duration::from_secs(30)).await;
    assert_eq!(job.state, State::Succeeded, "{job:?}");
    assert!(job.progress.deleted >= 1);
    assert!(!p.dst.dir.path().join("root/out/stale").exists());
    same_tree(
        &p.src.dir.path().join("root/in"),
        &p.dst.dir.path().join("root/out"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_goes_away_half_way_is_resumed_from_what_arrived() {
    let mut p = pair(None, Duration::from_secs(60));
    let size = 96usize << 20;
    let bytes = random(size);
    std::fs::write(p.src.dir.path().join("root/big"), &bytes).unwrap();
    let addr = p.src.plane.local_addr().unwrap();
    let job = p
        .jobs
        .submit("k1", spec("big", "big", false, None))
        .unwrap();
    // Half way, the source's data plane goes away (as its process would).
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.jobs.get(&job.id).unwrap().progress.bytes_received < size as u64 / 2 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.src.plane.close();
    let store = BlobStore::open(p.src.dir.path().join("blobs")).unwrap();
    let stand_in = DataPlane::bind(
        &p.src.key,
        "127.0.0.1:0".parse().unwrap(),
        store.clone(),
        Arc::new(|_| false),
    )
    .unwrap();
    drop(std::mem::replace(&mut p.src.plane, stand_in));
    // Losing its source does not end the job: it waits for it.
    assert_eq!(p.jobs.get(&job.id).unwrap().state, State::Active);
    // It comes back on the same address with the same identity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let plane = loop {
        match DataPlane::bind(&p.src.key, addr, store.clone(), Arc::new(|_| true)) {
            Ok(plane) => break plane,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    plane.serve_roots(Arc::new(TestRoots {
        roots: HashMap::from([("ep".to_owned(), p.src.root.clone())]),
        readable: None,
    }));
    p.src.plane = plane;
    let job = finished(&p.jobs, &job.id, Duration::from_secs(120)).await;
    assert_eq!(job.state, State::Succeeded, "{job:?}");
    let got = std::fs::read(p.dst.dir.path().join("root/big")).unwrap();
    assert_eq!(Hash::of(&got), Hash::of(&bytes));
    let twice = job.progress.bytes_received.saturating_sub(size as u64);
    assert!(
        twice < size as u64 / 10,
        "{twice} bytes sent twice of {size}: {:?}",
        job.progress
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_and_leaves_no_part_file() {
    let p = pair(None, Duration::from_secs(10));
    std::fs::write(p.src.dir.path().join("root/big"), random(128 << 20)).unwrap();
    let job = p
        .jobs
        .submit("x1", spec("big", "big", false, None))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.jobs.get(&job.id).unwrap().progress.bytes_received == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cancelled = p.jobs.cancel(&job.id).unwrap();
    assert_eq!(cancelled.state, State::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(30);
    while walk(&p.dst.dir.path().join("root"))
        .iter()
        .any(|f| f.to_string_lossy().contains(".funcmesh-part."))
    {
        assert!(Instant::now() < deadline, "a part file stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!p.dst.dir.path().join("root/big").exists());
    assert_eq!(p.jobs.get(&job.id).unwrap().state, State::Cancelled);
}
