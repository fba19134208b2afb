//! The data plane over real QUIC on loopback: two endpoints, as two members' nodes.

use std::sync::Arc;

use libp2p::identity::Keypair;
use rand::RngCore as _;
use transfer::blob::{BlobStore, Hash};
use transfer::net::{DataPlane, Error, Request, check, decode_header};

struct Node {
    plane: DataPlane,
    key: Keypair,
    store: BlobStore,
    _dir: tempfile::TempDir,
}

fn node(admit: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("blobs")).unwrap();
    let key = Keypair::generate_ed25519();
    let plane = DataPlane::bind(
        &key,
        "127.0.0.1:0".parse().unwrap(),
        store.clone(),
        Arc::new(move |_| admit),
    )
    .unwrap();
    Node {
        plane,
        key,
        store,
        _dir: dir,
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_fetches_a_blob_over_quic_and_it_keeps_its_hash() {
    let (a, b) = (node(true), node(true));
    let bytes = random(8 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    let from = (a.key.public().to_peer_id(), a.plane.local_addr().unwrap());
    let (got, received) = b.plane.fetch(from.0, from.1, hash, 3).await.unwrap();
    assert_eq!((got, received), (size, size));
    assert_eq!(a.plane.established(), 1);
    assert_eq!(std::fs::read(b.store.path(&hash).unwrap()).unwrap(), bytes);
    assert_eq!(
        Hash::of(&std::fs::read(b.store.path(&hash).unwrap()).unwrap()),
        hash
    );
    // Held now: nothing travels again.
    assert_eq!(
        b.plane.fetch(from.0, from.1, hash, 3).await.unwrap(),
        (size, 0)
    );
}

/// Many fetches from one member at once share one connection (they used to open one each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_from_one_member_at_once_share_one_connection() {
    let (a, b) = (node(true), node(true));
    let (peer, addr) = (a.key.public().to_peer_id(), a.plane.local_addr().unwrap());
    let hashes: Vec<Hash> = (0..20)
        .map(|_| a.store.import(&random(64 << 10)[..]).unwrap().0)
        .collect();
    let fetches = hashes.iter().map(|h| b.plane.fetch(peer, addr, *h, 3));
    for got in futures::future::join_all(fetches).await {
        assert_eq!(got.unwrap().0, 64 << 10);
    }
    assert_eq!(a.plane.established(), 1);
}

/// A member holds at most `MAX_CONNECTIONS_PER_PEER` connections to a node's data plane: one
/// more is closed with the reason; once one of its connections ends, it may open another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_holds_a_bounded_number_of_connections() {
    let a = node(true);
    let (hash, size) = a.store.import(&random(1 << 10)[..]).unwrap();
    let (peer, addr) = (a.key.public().to_peer_id(), a.plane.local_addr().unwrap());
    // One member (one key), many client endpoints: each holds its own connection open.
    let key = Keypair::generate_ed25519();
    let client = || {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let plane = DataPlane::bind(
            &key,
            "127.0.0.1:0".parse().unwrap(),
            store,
            Arc::new(|_| true),
        )
        .unwrap();
        (plane, dir)
    };
    let mut held = Vec::new();
    for _ in 0..transfer::net::MAX_CONNECTIONS_PER_PEER {
        let (plane, dir) = client();
        assert_eq!(plane.fetch(peer, addr, hash, 1).await.unwrap().0, size);
        held.push((plane, dir));
    }
    let (extra, _dir) = client();
    let err = extra.fetch(peer, addr, hash, 1).await.unwrap_err();
    assert!(err.to_string().contains("too many connections"), "{err}");
    // One connection ends: the member may open another.
    held.pop().unwrap().0.close();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (late, _d) = client();
        match late.fetch(peer, addr, hash, 1).await {
            Ok(got) => {
                assert_eq!(got.0, size);
                break;
            }
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "no connection after one ended: {e}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Two fetches of one blob at once (a task's result fetched when it arrives and when the user
/// asks for it): the second waits for the first and finds the blob held; both succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_of_one_blob_at_once_both_succeed_and_it_travels_once() {
    let (a, b) = (node(true), node(true));
    let bytes = random(16 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    let (peer, addr) = (a.key.public().to_peer_id(), a.plane.local_addr().unwrap());
    let sources = [(peer, addr)];
    let (one, two) = tokio::join!(
        b.plane.fetch(peer, addr, hash, 3),
        b.plane.fetch_many(&sources, hash, 3)
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!((one.0, two.0), (size, size));
    assert_eq!(
        one.1 + two.1,
        size,
        "the bytes travelled once: {one:?} {two:?}"
    );
    assert_eq!(std::fs::read(b.store.path(&hash).unwrap()).unwrap(), bytes);
}

/// Bytes flipped on the sender's side of the stream: the receiver refuses the bad chunk group,
/// keeps what verified, asks again for the rest, and the blob arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_corrupted_by_the_sender_is_detected_and_fetched_again() {
    let (a, b) = (node(true), node(true));
    let bytes = random(6 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    a.plane.corrupt_next_sends(1);
    let (got, received) = b
        .plane
        .fetch(
            a.key.public().to_peer_id(),
            a.plane.local_addr().unwrap(),
            hash,
            3,
        )
        .await
        .unwrap();
    assert_eq!(got, size);
    assert_eq!(std::fs::read(b.store.path(&hash).unwrap()).unwrap(), bytes);
    // `received` counts the round that completed it: only what the corrupt round left missing.
    assert!(
        received > 0 && received < size,
        "the second round sent only the missing part: {received} of {size}"
    );
    // The corruption did reach the receiver: without asking again it would not complete.
    a.plane.corrupt_next_sends(1);
    let c = node(true);
    let err = c
        .plane
        .fetch(
            a.key.public().to_peer_id(),
            a.plane.local_addr().unwrap(),
            hash,
            1,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not verify"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_cannot_complete_the_handshake() {
    let (a, b) = (node(false), node(true));
    let (hash, _) = a.store.import(&random(100_000)[..]).unwrap();
    let err = b
        .plane
        .fetch(
            a.key.public().to_peer_id(),
            a.plane.local_addr().unwrap(),
            hash,
            1,
        )
        .await
        .unwrap_err();
    // Refused in the TLS handshake: the server never completes it. (In TLS 1.3 the client
    // sends its certificate last, so it learns of the refusal as a lost connection.)
    assert!(
        matches!(err, Error::Connect { .. } | Error::Protocol(_)),
        "{err}"
    );
    assert_eq!(
        a.plane.established(),
        0,
        "no connection was established on the server"
    );
    assert!(b.store.size(&hash).is_none());
}

/// The client checks that the server is the peer it meant: another node at that address fails
/// the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_not_the_expected_peer_fails_the_handshake() {
    let (a, b) = (node(true), node(true));
    let (hash, _) = a.store.import(&random(10_000)[..]).unwrap();
    let impostor = Keypair::generate_ed25519().public().to_peer_id();
    let err = b
        .plane
        .fetch(impostor, a.plane.local_addr().unwrap(), hash, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_the_peer_does_not_hold_is_refused_with_the_reason() {
    let (a, b) = (node(true), node(true));
    let err = b
        .plane
        .fetch(
            a.key.public().to_peer_id(),
            a.plane.local_addr().unwrap(),
            Hash::of(b"nowhere"),
            1,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not hold blob"), "{err}");
}

/// A blob corrupt on the sender's disk (not in the stream): sends do not hash it again, so the
/// receiver finds the bad group; its second request asks for a check, and the sender refuses by
/// name and stops serving its copy. Fetched from several members, the blob still arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_corrupt_on_the_senders_disk_is_refused_by_name() {
    use std::os::unix::fs::FileExt as _;
    let (a, b) = (node(true), node(true));
    let bytes = random(6 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    b.store.import(&bytes[..]).unwrap();
    let at: usize = (5 << 20) + 999;
    std::fs::OpenOptions::new()
        .write(true)
        .open(a.store.path(&hash).unwrap())
        .unwrap()
        .write_all_at(&[bytes[at] ^ 0x80], at as u64)
        .unwrap();
    let src = |n: &Node| (n.key.public().to_peer_id(), n.plane.local_addr().unwrap());

    // From several members: the part that did not verify is asked of another one.
    let c = node(true);
    let (got, _) = c
        .plane
        .fetch_many(&[src(&a), src(&b)], hash, 3)
        .await
        .unwrap();
    assert_eq!(got, size);
    assert_eq!(std::fs::read(c.store.path(&hash).unwrap()).unwrap(), bytes);

    // From the corrupt member alone: the refusal names the cause.
    let d = node(true);
    let (peer, addr) = src(&a);
    let err = d.plane.fetch(peer, addr, hash, 3).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("this node's copy does not verify") && text.contains("another member"),
        "{text}"
    );
    assert_eq!(
        a.store.size(&hash),
        None,
        "the corrupt copy is no longer served"
    );
    // What d received before the bad group verified and is kept.
    let missing = d.store.missing(&hash, size).unwrap();
    assert!(!missing.is_empty());
    let (got, _) = d.plane.fetch(src(&b).0, src(&b).1, hash, 3).await.unwrap();
    assert_eq!(got, size);
    assert_eq!(std::fs::read(d.store.path(&hash).unwrap()).unwrap(), bytes);
}

#[test]
fn requests_are_checked_before_anything_is_read() {
    let h = Hash::of(b"x").to_string();
    assert!(
        check(&Request::Get {
            v: 1,
            hash: h.clone(),
            check: false,
            ranges: vec![(0, 4)]
        })
        .is_ok()
    );
    assert!(
        check(&Request::Get {
            v: 1,
            hash: h.clone(),
            check: false,
            ranges: vec![(4, 4)]
        })
        .is_err()
    );
    assert!(
        check(&Request::Get {
            v: 2,
            hash: h.clone(),
            check: false,
            ranges: vec![]
        })
        .is_err()
    );
    assert!(
        check(&Request::Stat {
            v: 1,
            hash: "nothex".into()
        })
        .is_err()
    );
    let many = vec![(0, 1); 5000];
    assert!(
        check(&Request::Get {
            v: 1,
            hash: h,
            check: false,
            ranges: many
        })
        .is_err()
    );
}

proptest::proptest! {
    /// Whatever a peer sends as a header decodes or is refused, never panics; a decoded
    /// request is checked without panicking.
    #[test]
    fn arbitrary_headers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        if let Ok(request) = decode_header::<Request>(&bytes) {
            let _ = check(&request);
            let _ = transfer::files::check(&request);
        }
        let _ = decode_header::<transfer::net::Response>(&bytes);
    }

    /// Data-root requests with any path text: checking never panics, and every path it lets
    /// through is relative, without `..` and without NUL.
    #[test]
    fn data_root_requests_never_let_an_escaping_path_through(
        op in 0..8u8,
        path in "(/|\\.\\.|[a-z]{0,3}|\\.|\u{0}|/){0,12}",
        paths in proptest::collection::vec("(/|\\.\\.|[a-z]{0,3}){0,6}", 0..4),
        endpoint in "[a-z]{0,4}",
    ) {
        let v = transfer::net::VERSION;
        let (token, ep) = (None, endpoint.clone());
        let request = match op {
            0 => Request::List { v, endpoint: ep, path: path.clone(), token },
            1 => Request::PathStat { v, endpoint: ep, path: path.clone(), token },
            2 => Request::Walk { v, endpoint: ep, path: path.clone(), token },
            3 => Request::Hashes { v, endpoint: ep, paths: paths.clone(), token },
            4 => Request::GetFile { v, endpoint: ep, path: path.clone(), hash: "00".repeat(32), ranges: vec![(0, 1)], token },
            5 => Request::Mkdir { v, endpoint: ep, path: path.clone(), parents: true, token },
            6 => Request::GetFiles { v, endpoint: ep, files: paths.iter().map(|p| (p.clone(), "00".repeat(32))).chain([(path.clone(), String::new())]).collect(), token },
            _ => Request::Remove { v, endpoint: ep, path: path.clone(), recursive: true, token },
        };
        // Through the wire format, as a peer would send it.
        let bytes = serde_json::to_vec(&request).unwrap();
        let decoded: Request = decode_header(&bytes).unwrap();
        if let Ok((_, _, checked, _)) = transfer::files::check(&decoded) {
            for p in checked {
                let t = p.as_str();
                proptest::prop_assert!(!t.starts_with('/') && !t.contains('\0'));
                proptest::prop_assert!(t.split('/').all(|c| c != ".."));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_blob_comes_from_several_members_at_once_and_a_bad_source_is_routed_around() {
    let (a, b, c) = (node(true), node(true), node(true));
    let bytes = random(6 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    b.store.import(&bytes[..]).unwrap();
    let src = |n: &Node| (n.key.public().to_peer_id(), n.plane.local_addr().unwrap());
    let (got, received) = c
        .plane
        .fetch_many(&[src(&a), src(&b)], hash, 3)
        .await
        .unwrap();
    assert_eq!((got, received), (size, size));
    // Both sources were asked (one connection each), and the blob verifies.
    assert_eq!((a.plane.established(), b.plane.established()), (1, 1));
    assert_eq!(std::fs::read(c.store.path(&hash).unwrap()).unwrap(), bytes);

    // A source that corrupts what it sends, and one that does not hold the blob: the corrupt
    // part is asked again of the other source; the blob still arrives whole.
    let (d, empty) = (node(true), node(true));
    a.plane.corrupt_next_sends(1);
    let (got, received) = d
        .plane
        .fetch_many(&[src(&empty), src(&a), src(&b)], hash, 4)
        .await
        .unwrap();
    assert_eq!(got, size);
    assert!(received < 2 * size, "{received}");
    assert_eq!(
        Hash::of(&std::fs::read(d.store.path(&hash).unwrap()).unwrap()),
        hash
    );
    // Nobody holds it: the refusal says so.
    let err = d
        .plane
        .fetch_many(&[src(&empty)], Hash::of(b"nobody has this"), 2)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not hold"), "{err}");
}

/// A tunnel between two in-process planes: a stream one opens is handed to the other as a
/// stream from the opener, as the mesh does over a relayed connection.
struct Pipe {
    me: libp2p::PeerId,
    other: std::sync::Mutex<Option<DataPlane>>,
    opened: Arc<std::sync::atomic::AtomicUsize>,
}

impl transfer::tunnel::Tunnel for Pipe {
    fn open(
        &self,
        _peer: libp2p::PeerId,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<transfer::tunnel::BoxStream, String>> + Send>,
    > {
        let other = self.other.lock().expect("lock").clone();
        let me = self.me;
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            let other = other.ok_or("no peer")?;
            let (here, there) = tokio::io::duplex(256 << 10);
            other.tunnel_stream(me, Box::new(there));
            Ok(Box::new(here) as transfer::tunnel::BoxStream)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_data_address_cannot_be_reached_is_fetched_from_through_the_tunnel() {
    let (a, b) = (node(true), node(true));
    let (pa, pb) = (a.key.public().to_peer_id(), b.key.public().to_peer_id());
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let to_a = Arc::new(Pipe {
        me: pb,
        other: std::sync::Mutex::new(Some(a.plane.clone())),
        opened: opened.clone(),
    });
    let to_b = Arc::new(Pipe {
        me: pa,
        other: std::sync::Mutex::new(Some(b.plane.clone())),
        opened: Arc::default(),
    });
    b.plane.use_tunnel(to_a).unwrap();
    a.plane.use_tunnel(to_b).unwrap();
    let bytes = random(4 << 20);
    let (hash, size) = a.store.import(&bytes[..]).unwrap();
    // a's data address as published, but nothing answers there (a behind NAT): a closed port.
    let unreachable = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (got, received) = b.plane.fetch(pa, unreachable, hash, 3).await.unwrap();
    assert_eq!((got, received), (size, size));
    assert_eq!(std::fs::read(b.store.path(&hash).unwrap()).unwrap(), bytes);
    assert!(
        opened.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the bytes came through the tunnel"
    );
    assert_eq!(
        a.plane.established(),
        1,
        "one handshake, through the tunnel"
    );
    // The tunnelled connection is kept: a second blob goes on it (no new handshake).
    let more = random(1 << 20);
    let (hash2, size2) = a.store.import(&more[..]).unwrap();
    assert_eq!(
        b.plane.fetch(pa, unreachable, hash2, 3).await.unwrap(),
        (size2, size2)
    );
    assert_eq!(
        a.plane.established(),
        1,
        "the second fetch reused the tunnel"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(8))]

    /// Whatever a member writes on a tunnel stream (frames of any length, cut anywhere, not
    /// QUIC at all) never panics the data plane, which still serves through the tunnel after.
    #[test]
    fn arbitrary_tunnel_streams_never_panic(
        garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000),
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (a, b) = (node(true), node(true));
            let stranger = Keypair::generate_ed25519().public().to_peer_id();
            let to_a = Arc::new(Pipe {
                me: b.key.public().to_peer_id(),
                other: std::sync::Mutex::new(Some(a.plane.clone())),
                opened: Arc::default(),
            });
            a.plane.use_tunnel(Arc::new(Pipe {
                me: a.key.public().to_peer_id(),
                other: std::sync::Mutex::new(Some(b.plane.clone())),
                opened: Arc::default(),
            })).unwrap();
            b.plane.use_tunnel(to_a).unwrap();
            let (mut here, there) = tokio::io::duplex(64 << 10);
            a.plane.tunnel_stream(stranger, Box::new(there));
            use tokio::io::AsyncWriteExt as _;
            let _ = here.write_all(&garbage).await;
            drop(here);
            let bytes = random(64 << 10);
            let (hash, size) = a.store.import(&bytes[..]).unwrap();
            let unreachable = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
            let got = b.plane.fetch(a.key.public().to_peer_id(), unreachable, hash, 3).await.unwrap();
            assert_eq!(got, (size, size));
        });
    }
}
