//! One blob between two data planes on loopback, beside a local `cp` of the same file.
//!
//! ```sh
//! cargo run --release -p transfer --example bench_blob -- [MiB]   # default 1024
//! ```
//! Prints one JSON line: sizes, seconds and MiB/s for `cp`, import (hashing and outboard), and
//! the fetch (QUIC, verified streaming, written to the receiver's store).

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use libp2p::identity::Keypair;
use transfer::BlobStore;
use transfer::net::DataPlane;

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = vec![0u8; 1 << 20];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    let size = mib << 20;
    let t = Instant::now();
    let status = std::process::Command::new("cp")
        .arg(&src)
        .arg(dir.path().join("copy.bin"))
        .status()
        .unwrap();
    assert!(status.success());
    let cp_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(dir.path().join("copy.bin")).unwrap();

    let a_store = BlobStore::open(dir.path().join("a")).unwrap();
    let b_store = BlobStore::open(dir.path().join("b")).unwrap();
    let t = Instant::now();
    let (hash, got) = a_store.import(std::fs::File::open(&src).unwrap()).unwrap();
    let import_s = t.elapsed().as_secs_f64();
    assert_eq!(got, size);
    let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let a = DataPlane::bind(
        &ka,
        "127.0.0.1:0".parse().unwrap(),
        a_store,
        Arc::new(|_| true),
    )
    .unwrap();
    let b = DataPlane::bind(
        &kb,
        "127.0.0.1:0".parse().unwrap(),
        b_store.clone(),
        Arc::new(|_| true),
    )
    .unwrap();
    let t = Instant::now();
    let (fetched, _) = b
        .fetch(ka.public().to_peer_id(), a.local_addr().unwrap(), hash, 3)
        .await
        .unwrap();
    let fetch_s = t.elapsed().as_secs_f64();
    assert_eq!(fetched, size);
    assert!(b_store.size(&hash).is_some());
    let rate = |s: f64| (size as f64 / (1 << 20) as f64 / s * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "bytes": size,
            "cp_s": cp_s, "cp_mib_s": rate(cp_s),
            "import_s": import_s, "import_mib_s": rate(import_s),
            "fetch_s": fetch_s, "fetch_mib_s": rate(fetch_s),
            "fetch_vs_cp": (cp_s / fetch_s * 100.0).round() / 100.0,
        })
    );
}
