//! The blob store: verified streams between two stores, as two nodes would exchange them.

use bao_tree::{ChunkNum, ChunkRanges};
use rand::RngCore as _;
use transfer::blob::{BlobStore, Error, Hash, byte_ranges};

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn stores() -> (tempfile::TempDir, BlobStore, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let a = BlobStore::open(dir.path().join("a")).unwrap();
    let b = BlobStore::open(dir.path().join("b")).unwrap();
    (dir, a, b)
}

fn all() -> ChunkRanges {
    ChunkRanges::from(ChunkNum(0)..)
}

#[test]
fn a_blob_streams_between_stores_and_keeps_its_blake3_hash() {
    let (_dir, a, b) = stores();
    let bytes = random(5 << 20);
    let (hash, size) = a.import(&bytes[..]).unwrap();
    assert_eq!(hash, Hash::of(&bytes), "the key is the plain BLAKE3 hash");
    assert_eq!(size, bytes.len() as u64);
    let mut stream = Vec::new();
    a.encode(&hash, &all(), &mut stream).unwrap();
    assert!(stream.len() as u64 > size, "data plus the tree's hashes");
    assert_eq!(
        b.missing(&hash, size).unwrap(),
        ChunkRanges::from(ChunkNum(0)..ChunkNum(5 << 10))
    );
    let written = b.receive(&hash, size, &all(), &stream[..]).unwrap();
    assert_eq!(written, size);
    assert_eq!(b.size(&hash), Some(size));
    assert!(b.missing(&hash, size).unwrap().is_empty());
    assert_eq!(std::fs::read(b.path(&hash).unwrap()).unwrap(), bytes);
    // Importing the same bytes again stores nothing new.
    assert_eq!(b.import(&bytes[..]).unwrap(), (hash, size));
}

/// A byte flipped in a stored blob's file on disk: a plain send passes it on (the receiver
/// refuses it), a check finds it, names where, and makes the blob partial again, keeping
/// every group that still verifies; fetching what is missing from a sound copy repairs it.
#[test]
fn a_copy_corrupt_on_disk_fails_its_check_and_is_repaired_from_another() {
    use std::os::unix::fs::FileExt as _;
    let (_dir, a, b) = stores();
    let bytes = random(3 << 20);
    let (hash, size) = a.import(&bytes[..]).unwrap();
    let (hash_b, _) = b.import(&bytes[..]).unwrap();
    assert_eq!(hash_b, hash);
    let at = (2 << 20) + 12_345;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path(&hash).unwrap())
        .unwrap();
    file.write_all_at(&[bytes[at] ^ 0x01], at as u64).unwrap();
    drop(file);

    // A send does not hash again: the receiver finds the bad group.
    let mut stream = Vec::new();
    a.send(&hash, &all(), &mut stream).unwrap();
    let c = BlobStore::open(_dir.path().join("c")).unwrap();
    let err = c.receive(&hash, size, &all(), &stream[..]).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    // The validating encoder refuses to pass it on at all.
    let err = a.encode(&hash, &all(), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");

    // A check of a range that does not hold the bad byte passes and changes nothing.
    a.check(&hash, &byte_ranges(0, 1 << 20)).unwrap();
    assert_eq!(a.size(&hash), Some(size));
    // A check of all of it finds the group and says where it starts.
    let err = a.check(&hash, &all()).unwrap_err();
    let group = (at as u64 / (16 << 10)) * (16 << 10);
    assert!(
        err.to_string().contains(&format!("from byte {group} on")),
        "{err}"
    );
    assert_eq!(a.size(&hash), None, "no longer served as complete");
    let missing = a.missing(&hash, size).unwrap();
    assert_eq!(
        missing,
        byte_ranges(group, group + (16 << 10)),
        "only the bad group is missing"
    );
    assert!(a.path(&hash).is_err());

    // Repaired from a sound copy: only the bad group travels.
    let mut rest = Vec::new();
    b.send(&hash, &missing, &mut rest).unwrap();
    assert_eq!(
        a.receive(&hash, size, &missing, &rest[..]).unwrap(),
        16 << 10
    );
    assert_eq!(a.size(&hash), Some(size));
    assert_eq!(std::fs::read(a.path(&hash).unwrap()).unwrap(), bytes);
}

/// A byte flipped in transit: the bad chunk group is refused before it is written, what came
/// before it is kept, and asking again for what is missing completes the blob.
#[test]
fn a_corrupt_chunk_group_is_refused_and_fetched_again() {
    let (_dir, a, b) = stores();
    let bytes = random(3 << 20);
    let (hash, size) = a.import(&bytes[..]).unwrap();
    let mut stream = Vec::new();
    a.encode(&hash, &all(), &mut stream).unwrap();
    let middle = stream.len() / 2;
    stream[middle] ^= 0x40;
    let err = b.receive(&hash, size, &all(), &stream[..]).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(b.size(&hash), None, "not complete");
    let missing = b.missing(&hash, size).unwrap();
    assert!(!missing.is_empty());
    let total = ChunkRanges::from(ChunkNum(0)..ChunkNum(3 << 10));
    assert!(
        missing != total,
        "the verified part before the corruption was kept"
    );
    let mut again = Vec::new();
    a.encode(&hash, &missing, &mut again).unwrap();
    assert!(
        again.len() < stream.len(),
        "only what is missing is sent again"
    );
    b.receive(&hash, size, &missing, &again[..]).unwrap();
    assert_eq!(std::fs::read(b.path(&hash).unwrap()).unwrap(), bytes);
}

/// A stream that claims another blob's hash verifies nothing.
#[test]
fn a_stream_for_another_hash_writes_nothing() {
    let (_dir, a, b) = stores();
    let (hash, size) = a.import(&random(100_000)[..]).unwrap();
    let mut stream = Vec::new();
    a.encode(&hash, &all(), &mut stream).unwrap();
    let other = Hash::of(b"something else");
    let err = b.receive(&other, size, &all(), &stream[..]).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert_eq!(
        b.missing(&other, size).unwrap(),
        ChunkRanges::from(ChunkNum(0)..ChunkNum(98))
    );
}

/// A range request: only the groups covering it travel, and they can be read back verified.
/// Then the rest completes the blob (a resumed transfer asks for exactly that).
#[test]
fn ranges_travel_alone_and_a_partial_blob_resumes() {
    let (_dir, a, b) = stores();
    let bytes = random(2 << 20);
    let (hash, size) = a.import(&bytes[..]).unwrap();
    let (start, end) = (700_000u64, 900_000u64);
    let wanted = byte_ranges(start, end);
    let mut stream = Vec::new();
    a.encode(&hash, &wanted, &mut stream).unwrap();
    assert!(
        stream.len() < 300_000,
        "{} bytes for a 200 KB range",
        stream.len()
    );
    b.receive(&hash, size, &wanted, &stream[..]).unwrap();
    assert_eq!(
        b.read_range(&hash, size, start, end).unwrap(),
        &bytes[start as usize..end as usize]
    );
    assert!(matches!(
        b.read_range(&hash, size, 0, 1000),
        Err(Error::Missing(_))
    ));
    // Resume from what is on disk (a new store handle, as after a restart).
    let b = BlobStore::open(_dir.path().join("b")).unwrap();
    let missing = b.missing(&hash, size).unwrap();
    let mut rest = Vec::new();
    a.encode(&hash, &missing, &mut rest).unwrap();
    b.receive(&hash, size, &missing, &rest[..]).unwrap();
    assert_eq!(std::fs::read(b.path(&hash).unwrap()).unwrap(), bytes);
}

#[test]
fn hashes_parse_from_hex_only() {
    let h = Hash::of(b"x");
    assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
    for bad in ["", "zz", &h.to_string()[..62], &format!("{h}00")] {
        assert!(
            matches!(bad.parse::<Hash>(), Err(Error::BadHash(_))),
            "{bad}"
        );
    }
}

#[test]
fn an_empty_blob_is_a_blob() {
    let (_dir, a, b) = stores();
    let (hash, size) = a.import(&b""[..]).unwrap();
    assert_eq!((hash, size), (Hash::of(b""), 0));
    let mut stream = Vec::new();
    a.encode(&hash, &all(), &mut stream).unwrap();
    b.receive(&hash, 0, &all(), &stream[..]).unwrap();
    assert_eq!(b.size(&hash), Some(0));
}

proptest::proptest! {
    /// Whatever a peer sends as a stream, the receiver neither panics nor completes a blob
    /// that does not match its hash.
    #[test]
    fn arbitrary_streams_never_panic_nor_complete_a_wrong_blob(
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..70_000),
        size in 0u64..200_000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let b = BlobStore::open(dir.path()).unwrap();
        let hash = Hash::of(b"the real blob");
        let _ = b.receive(&hash, size, &all(), &garbage[..]);
        proptest::prop_assert!(b.size(&hash).is_none() || size == 13);
    }
}

#[test]
fn blobs_unused_for_the_retention_are_collected_and_used_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let (old, _) = store.import(&b"old bytes"[..]).unwrap();
    let (fresh, _) = store.import(&b"fresh bytes"[..]).unwrap();
    let (used, _) = store.import(&b"used again"[..]).unwrap();
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for h in [old, used] {
        std::fs::File::options()
            .write(true)
            .open(store.path(&h).unwrap())
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }
    // Stored again: used now.
    store.import(&b"used again"[..]).unwrap();
    let (n, bytes) = store.collect(std::time::Duration::from_secs(60)).unwrap();
    assert_eq!((n, bytes), (1, 9));
    assert!(store.size(&old).is_none());
    assert!(store.size(&fresh).is_some() && store.size(&used).is_some());
}
