//! Members find each other, survive the coordinator, and keep who they are across restarts.

use std::time::Duration;

use testnet::{Federation, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_of_two_institutions_all_list_each_other_within_5s() {
    let mut net = Federation::start(2, 2).await.unwrap();
    net.add_member(0).await.unwrap();
    assert_eq!(net.members.len(), 5);
    wait_for(
        "every node to list every other",
        Duration::from_secs(5),
        || net.fully_connected(),
    )
    .await
    .unwrap();
    // Each member sees the coordinator and the four other members, with their institutions.
    let seen = net.node(0).mesh().members().await.unwrap();
    assert_eq!(seen.len(), 5);
    let institutions: Vec<_> = seen.iter().filter_map(|m| m.institution.clone()).collect();
    assert_eq!(institutions.iter().filter(|i| *i == "inst-a").count(), 2);
    assert_eq!(institutions.iter().filter(|i| *i == "inst-b").count(), 2);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_its_coordinator_and_restarted_members_rejoin_from_persisted_peers() {
    let mut net = Federation::start(2, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let coordinator = net.coordinator().unwrap().peer_id();
    net.stop_coordinator().await.unwrap();
    wait_for(
        "members to notice the coordinator left",
        Duration::from_secs(5),
        || async { !net.anyone_lists(&coordinator).await },
    )
    .await
    .unwrap();
    // The four members still list each other.
    assert!(net.fully_connected().await);
    for i in 0..4 {
        assert_eq!(net.node(i).mesh().members().await.unwrap().len(), 3);
    }
    // A member restarted now has only its persisted peers to go on.
    net.restart(0).await.unwrap();
    wait_for(
        "the restarted member to reconnect",
        Duration::from_secs(10),
        || net.fully_connected(),
    )
    .await
    .unwrap();
    assert_eq!(net.node(0).mesh().members().await.unwrap().len(), 3);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_whose_introduction_failed_find_each_other_later() {
    let mut net = Federation::start(1, 1).await.unwrap();
    wait_for("full mesh", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let coordinator = net.coordinator().unwrap().peer_id();
    let a1 = net.node(0).peer_id();
    // a1 steps away, so the coordinator cannot introduce it to a2 when a2 joins...
    net.node(0).mesh().block(coordinator, true).await.unwrap();
    wait_for(
        "the coordinator to lose a1",
        Duration::from_secs(5),
        || async { !net.anyone_lists(&a1).await },
    )
    .await
    .unwrap();
    let a2 = net.add_member(0).await.unwrap();
    let a2_id = net.node(a2).peer_id();
    // ...and a2 turns a1 away when a1 comes back and the coordinator introduces them. A
    // one-off attempt (the introduction, Kademlia's lookups) gives up after a few tries; a1 has
    // to keep trying, with backoff, and hear of a2 again in later member-list swaps.
    net.node(a2).mesh().block(a1, true).await.unwrap();
    let mut a2_events = net.node(a2).mesh().subscribe();
    net.node(0).mesh().block(coordinator, false).await.unwrap();
    let mut turned_away = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        while turned_away < 12 {
            match a2_events.recv().await {
                Ok(mesh::Event::TurnedAway(p)) if p == a1 => turned_away += 1,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a1 gave up on a2 after {turned_away} attempts"));
    assert!(
        !net.node(0)
            .mesh()
            .members()
            .await
            .unwrap()
            .iter()
            .any(|m| m.peer_id == a2_id.to_string())
    );
    // Neither has ever been the other's member, so no redial of known peers brings them
    // together: a retried introduction or a later swap of member lists has to.
    net.node(a2).mesh().block(a1, false).await.unwrap();
    wait_for(
        "a1 and a2 to find each other",
        Duration::from_secs(15),
        || net.fully_connected(),
    )
    .await
    .unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_identity_federation_and_membership() {
    let mut net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let before = (
        net.node(1).peer_id(),
        net.node(1).federation().id.clone(),
        net.node(1).member().clone(),
    );
    net.restart(1).await.unwrap();
    let after = (
        net.node(1).peer_id(),
        net.node(1).federation().id.clone(),
        net.node(1).member().clone(),
    );
    assert_eq!(before, after);
    wait_for(
        "the restarted node to be listed again",
        Duration::from_secs(10),
        || net.fully_connected(),
    )
    .await
    .unwrap();
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_from_members_reaches_members() {
    let net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(5), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let mut events = net.node(1).mesh().subscribe();
    net.node(1).mesh().subscribe_topic("test/1").await.unwrap();
    // The mesh needs a heartbeat or two to graft the topic; publish until it is delivered.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = net.node(0).mesh().publish("test/1", b"hello".to_vec()).await;
                }
                ev = events.recv() => {
                    if let Ok(mesh::Event::Gossip { topic, data, source }) = ev {
                        return (topic, data, source);
                    }
                }
            }
        }
    })
    .await
    .expect("gossip delivered");
    assert_eq!(
        got,
        (
            "test/1".to_string(),
            b"hello".to_vec(),
            net.node(0).peer_id()
        )
    );
    net.shutdown().await;
}
