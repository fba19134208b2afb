//! Nodes without a valid membership proof are refused, never listed, and the members keep running.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt as _;
use mesh::Keypair;
use mesh::membership::{Admission, Genesis, Invite, Proof, Role, SigningKey, unix_now};
use testnet::{Federation, rogue, wait_for};

const HOUR: Duration = Duration::from_secs(3600);

/// Presents `proof` (made for `keypair`) to the coordinator and returns the refusal reason.
async fn presented(net: &Federation, keypair: Keypair, proof: Proof) -> String {
    let federation = net.node(0).federation().clone();
    let peer = keypair.public().to_peer_id();
    let dir = tempfile::tempdir().unwrap();
    let (handle, guard) = rogue(dir.path(), federation, keypair, proof).await.unwrap();
    let outcome = handle
        .join(
            net.coordinator_addr().parse().unwrap(),
            Duration::from_secs(10),
        )
        .await;
    let reason = match outcome {
        Err(mesh::network::JoinError::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_never_listed_and_members_fine(net, &peer).await;
    guard.stop().await;
    reason
}

async fn assert_never_listed_and_members_fine(net: &Federation, peer: &mesh::PeerId) {
    assert!(
        !net.anyone_lists(peer).await,
        "a refused node is never listed"
    );
    wait_for("members still connected", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    assert!(!net.anyone_lists(peer).await);
}

async fn small() -> Federation {
    let net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    net
}

fn admission_of(net: &Federation, i: usize) -> (SigningKey, Admission) {
    let inst = &net.institutions[i];
    let (_, key) =
        mesh::keys::read_signing_key(&inst.key, mesh::keys::KeyKind::Institution).unwrap();
    let admission: Admission =
        serde_json::from_slice(&std::fs::read(&inst.admission).unwrap()).unwrap();
    (key, admission)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_presents_no_proof_is_cut_and_never_listed() {
    let net = small().await;
    // A plain libp2p node that does not speak the membership protocol at all.
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            Default::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p::ping::Behaviour::default())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let peer = *swarm.local_peer_id();
    swarm
        .dial(net.coordinator_addr().parse::<libp2p::Multiaddr>().unwrap())
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut connected = false;
        loop {
            match swarm.select_next_some().await {
                libp2p::swarm::SwarmEvent::ConnectionEstablished { .. } => connected = true,
                libp2p::swarm::SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } => {
                    return connected;
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the coordinator cuts a silent peer");
    assert!(closed, "it was connected, then cut");
    assert_never_listed_and_members_fine(&net, &peer).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_signature_is_refused() {
    let net = small().await;
    let invite = Invite::decode(&net.invite(0, Role::Endpoint, HOUR).unwrap()).unwrap();
    let kp = Keypair::generate_ed25519();
    let (_, proof) = Proof::bind(&invite, &kp, unix_now()).unwrap();
    // Change the binding's body (claim another join time) and keep the old signature.
    let mut json: serde_json::Value = serde_json::from_slice(&proof.to_bytes()).unwrap();
    let body = json["binding"]["body"].as_str().unwrap();
    let mut binding: serde_json::Value =
        serde_json::from_slice(&STANDARD.decode(body).unwrap()).unwrap();
    binding["bound_at"] = (binding["bound_at"].as_u64().unwrap() - 1).into();
    json["binding"]["body"] = STANDARD
        .encode(serde_json::to_vec(&binding).unwrap())
        .into();
    let forged = Proof::from_bytes(&serde_json::to_vec(&json).unwrap()).unwrap();
    let reason = presented(&net, kp, forged).await;
    assert!(reason.contains("forged binding"), "{reason}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_invite_is_refused() {
    let net = small().await;
    let (key, admission) = admission_of(&net, 0);
    let two_hours_ago = unix_now() - 7200;
    let invite = Invite::issue(&admission, &key, Role::Endpoint, HOUR, two_hours_ago).unwrap();
    let kp = Keypair::generate_ed25519();
    // The node binds honestly, now, to an invite that expired an hour ago.
    let federation = invite.federation().unwrap();
    let proof = Proof::sign_binding(&invite, &federation, &kp, unix_now());
    let reason = presented(&net, kp, proof).await;
    assert!(reason.contains("invite expired"), "{reason}");
    // And the CLI path refuses it before dialing anyone.
    let dir = net.new_dir("late");
    let err = testnet::join_with_test_config(&dir, net.coordinator_addr(), &invite.encode())
        .await
        .err()
        .expect("expired invite refused");
    assert!(format!("{err:#}").contains("invite expired"), "{err:#}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_institution_never_admitted_is_refused() {
    let net = small().await;
    let federation = net.node(0).federation().clone();
    // The rogue signs its own "admission" for our federation with a key that is not ours.
    let fake_federation_key = SigningKey::generate();
    let rogue_inst = SigningKey::generate();
    let admission = Admission::issue(
        &federation,
        &fake_federation_key,
        "rogue-u",
        rogue_inst.public(),
        unix_now(),
    );
    let invite = Invite::sign(&admission, &rogue_inst, Role::Endpoint, HOUR, unix_now());
    let kp = Keypair::generate_ed25519();
    let proof = Proof::sign_binding(&invite, &federation, &kp, unix_now());
    let reason = presented(&net, kp, proof).await;
    assert!(
        reason.contains("institution rogue-u was never admitted"),
        "{reason}"
    );
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_federations_invite_is_refused() {
    let net = small().await;
    let now = unix_now();
    let other_key = SigningKey::generate();
    let other = Genesis::create("test", &other_key, now).verify().unwrap();
    let inst = SigningKey::generate();
    let admission = Admission::issue(&other, &other_key, "inst-a", inst.public(), now);
    let invite = Invite::issue(&admission, &inst, Role::Endpoint, HOUR, now).unwrap();
    let kp = Keypair::generate_ed25519();
    let (_, proof) = Proof::bind(&invite, &kp, now).unwrap();
    let reason = presented(&net, kp, proof).await;
    assert!(reason.contains("is for federation"), "{reason}");
    // Through the CLI path, a data dir never gets that far either.
    let dir = net.new_dir("foreign");
    let err = testnet::join_with_test_config(&dir, net.coordinator_addr(), &invite.encode())
        .await
        .err()
        .expect("foreign invite refused");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_stolen_by_another_node_is_refused() {
    let net = small().await;
    let invite = Invite::decode(&net.invite(0, Role::Endpoint, HOUR).unwrap()).unwrap();
    let owner = Keypair::generate_ed25519();
    let (_, proof) = Proof::bind(&invite, &owner, unix_now()).unwrap();
    let thief = Keypair::generate_ed25519();
    let reason = presented(&net, thief, proof).await;
    assert!(reason.contains("belongs to peer"), "{reason}");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_garbage_invite_strings_are_refused_with_a_clear_error() {
    let net = small().await;
    let invite = net.invite(0, Role::Endpoint, HOUR).unwrap();
    for (i, bad) in [
        &invite[..invite.len() / 2],
        "garbage",
        "",
        &invite[..invite.len() - 3],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = net.new_dir(&format!("bad{i}"));
        let err = testnet::join_with_test_config(&dir, net.coordinator_addr(), bad)
            .await
            .err()
            .expect("bad invite refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("malformed invite"), "{msg}");
        assert!(!dir.membership().exists(), "nothing joined");
    }
    wait_for("members still connected", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    net.shutdown().await;
}

/// Issue 17's first attack: everything a member publishes (its proof, in every hello it
/// answers and in the registry) rebuilt into an invite string, and `funcmesh join` with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_rebuilt_from_a_published_proof_is_refused() {
    let net = small().await;
    let (federation, published) = net.node(0).data_dir().read_membership().unwrap();
    let rebuilt = Invite::rebuilt_from(&published, federation.genesis.clone(), [7; 32])
        .expect("a member's proof");
    let dir = net.new_dir("rebuilt");
    let err = testnet::join_with_test_config(&dir, net.coordinator_addr(), &rebuilt.encode())
        .await
        .err()
        .expect("a rebuilt invite is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("one-time key"), "{msg}");
    assert!(!dir.membership().exists(), "nothing joined");
    let peer = mesh::keys::read_node_key(&dir.node_key())
        .unwrap()
        .public()
        .to_peer_id();
    assert_never_listed_and_members_fine(&net, &peer).await;
    net.shutdown().await;
}

/// An invite admits one node: a second `join` with the same string is refused, and the
/// coordinator still refuses it after a restart (from the registry, not only its memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_use_of_an_invite_is_refused() {
    let mut net = small().await;
    let invite = net.invite(0, Role::Endpoint, HOUR).unwrap();
    let first = net.new_dir("first");
    let node = testnet::join_with_test_config(&first, net.coordinator_addr(), &invite)
        .await
        .unwrap();
    let first_peer = node.peer_id();
    let second = net.new_dir("second");
    let err = testnet::join_with_test_config(&second, net.coordinator_addr(), &invite)
        .await
        .err()
        .expect("a second use is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("already used by node {first_peer}")),
        "{msg}"
    );
    // The coordinator forgets its receipts when it restarts; the registry remembers.
    let coordinator = net.coordinator().unwrap().mesh().clone();
    wait_for(
        "the coordinator's registry to record the first use",
        Duration::from_secs(10),
        || {
            let coordinator = coordinator.clone();
            async move {
                coordinator.registry().await.is_ok_and(|v| {
                    v.used_invites
                        .values()
                        .any(|p| *p == first_peer.to_string())
                })
            }
        },
    )
    .await
    .unwrap();
    net.restart_coordinator().await.unwrap();
    let third = net.new_dir("third");
    let err = testnet::join_with_test_config(&third, net.coordinator_addr(), &invite)
        .await
        .err()
        .expect("a use after the coordinator's restart is refused");
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
    node.shutdown().await.unwrap();
    net.shutdown().await;
}

/// A stranger that connects to a member learns neither the member's proof nor anyone in the
/// federation: the member waits for the stranger's proof and answers a refusal only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_that_connects_learns_no_proof_and_no_member_list() {
    let net = small().await;
    let invite = Invite::decode(&net.invite(0, Role::Endpoint, HOUR).unwrap()).unwrap();
    // The stranger has the federation (public) and a proof that is not its own.
    let owner = Keypair::generate_ed25519();
    let (_, stolen) = Proof::bind(&invite, &owner, unix_now()).unwrap();
    let stranger = Keypair::generate_ed25519();
    let dir = tempfile::tempdir().unwrap();
    let (handle, guard) = rogue(
        dir.path(),
        net.node(0).federation().clone(),
        stranger,
        stolen,
    )
    .await
    .unwrap();
    let mut events = handle.subscribe();
    let member_addr = net.node(1).dial_addrs().await.unwrap()[0].clone();
    let outcome = handle.join(member_addr, Duration::from_secs(10)).await;
    assert!(
        matches!(outcome, Err(mesh::network::JoinError::Refused { .. })),
        "{outcome:?}"
    );
    // Had the member sent its hello, the stranger's mesh would have verified the member's
    // proof and listed it, and dialled the members in its list.
    assert!(handle.members().await.unwrap().is_empty());
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event,
                mesh::Event::MemberConnected(_) | mesh::Event::AcceptedBy(_)
            ),
            "the stranger learned a member's proof: {event:?}"
        );
    }
    guard.stop().await;
    net.shutdown().await;
}

/// A stranger that connects and subscribes to the registry's gossip topic — as any libp2p node
/// can, before the mesh has cut it for having no proof — receives nothing while it is connected:
/// gossip goes to verified members only (they would tell it who the members are, and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_subscribed_to_the_registry_topic_receives_no_gossip() {
    use libp2p::gossipsub;
    use libp2p::swarm::SwarmEvent;
    let net = small().await;
    let me = net.node(0);
    let topic = gossipsub::IdentTopic::new(format!("funcmesh/{}/registry/1", me.federation().id));
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            Default::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            let b: gossipsub::Behaviour = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossipsub::ConfigBuilder::default()
                    .max_transmit_size(256 * 1024)
                    .build()
                    .unwrap(),
            )
            .unwrap();
            b
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    let addr = me
        .dial_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .unwrap();
    swarm.dial(addr).unwrap();
    // Until the node cuts it (no proof within the test's 2 s), node 0 registers a function every
    // 100 ms: each is gossiped on the topic the stranger subscribed to.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut connected, mut heard_topic, mut messages, mut registered) = (false, false, 0, 0);
    let cut = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { .. } => connected = true,
                    SwarmEvent::ConnectionClosed { num_established: 0, .. } => return,
                    SwarmEvent::Behaviour(gossipsub::Event::Subscribed { topic: t, .. })
                        if t == topic.hash() => heard_topic = true,
                    SwarmEvent::Behaviour(gossipsub::Event::Message { .. }) => messages += 1,
                    _ => {}
                },
                _ = tick.tick(), if connected => {
                    me.register_function(&testnet::shell_function(&format!("f{registered}")))
                        .await
                        .unwrap();
                    registered += 1;
                }
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the node cuts a peer without a proof");
    assert!(
        connected && heard_topic,
        "the stranger was connected and saw the topic"
    );
    assert!(
        registered >= 5,
        "functions were registered while it was connected"
    );
    assert_eq!(
        messages, 0,
        "a stranger received {messages} registry gossip messages"
    );
    net.shutdown().await;
}
