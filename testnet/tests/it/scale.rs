//! Bounded connections: a federation whose members each keep a few connections still spreads
//! registry changes and adverts to everyone, and any member runs tasks on any endpoint,
//! dialling its node on demand.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use node::tasks::NewTask;
use testnet::{Federation, shell_function, wait_for};

const MEMBERS: usize = 10;
const MAX_CONNECTIONS: usize = 4;

async fn most_connections(net: &Federation) -> usize {
    let mut most = 0;
    for i in 0..net.members.len() {
        let n = net
            .node(i)
            .mesh()
            .members()
            .await
            .map_or(usize::MAX, |m| m.len());
        most = most.max(n);
    }
    most
}

/// Whether `check` holds of every running node's registry.
async fn every_registry(
    net: &Federation,
    check: impl Fn(&crdt_registry::View) -> bool + Clone + Send + 'static,
) -> bool {
    for n in net.running() {
        let c = check.clone();
        if !n.mesh().registry_with(move |v| c(v)).await.unwrap() {
            return false;
        }
    }
    true
}

/// `MEMBERS` members of two institutions, any of which may use any endpoint, each holding at
/// most `max_connections` member connections (idle ones close after 2 s), with `extra` settings.
async fn bounded(max_connections: usize, extra: &[&str]) -> Federation {
    let mut overrides = vec![
        format!("mesh.max_connections={max_connections}"),
        "mesh.idle_after=2s".to_string(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let mut net = Federation::start_with(0, 0, &overrides).await.unwrap();
    net.member_config = Some(Arc::new(|_, _, config| {
        for e in &mut config.endpoint {
            e.policy = "federation".into();
        }
    }));
    net.add_institution("inst-a").unwrap();
    net.add_institution("inst-b").unwrap();
    for i in 0..MEMBERS {
        net.add_member(i % 2).await.unwrap();
    }
    wait_for(
        "every member within its connection bound",
        Duration::from_secs(60),
        || async { most_connections(&net).await <= max_connections },
    )
    .await
    .unwrap();
    net
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bounded_connections_any_member_reaches_any_endpoint_and_hears_every_advert() {
    // Idle connections close until every member holds at most its bound.
    let net = bounded(MAX_CONNECTIONS, &[]).await;
    let me = net.node(0);
    let connected: HashSet<String> = me
        .mesh()
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.peer_id)
        .collect();
    assert!(connected.len() <= MAX_CONNECTIONS, "{connected:?}");

    // Everyone still hears every endpoint node's adverts, most of them written by members it
    // is not connected to.
    wait_for(
        "adverts from every endpoint node",
        Duration::from_secs(30),
        || async { me.dispatcher().adverts().await.unwrap().len() >= MEMBERS },
    )
    .await
    .unwrap();

    // A function registered on one member reaches every other, over several hops.
    let function = net
        .node(MEMBERS - 1)
        .register_function(&shell_function("far"))
        .await
        .unwrap();
    wait_for("the function everywhere", Duration::from_secs(10), || {
        net.everyone_has_function(&function)
    })
    .await
    .unwrap();

    // A task for an endpoint whose node this member is not connected to: its node is dialled
    // on demand (tasks go only over direct links: there is no relay here).
    let view = me.mesh().registry().await.unwrap();
    let far = view
        .endpoints
        .values()
        .find(|e| e.peer_id != me.peer_id().to_string() && !connected.contains(&e.peer_id))
        .expect("with 10 members and a bound of 4, some endpoint node is not connected");
    let task = NewTask {
        function,
        kwargs: serde_json::json!({"x": 7}),
        endpoint: Some(far.id.clone()),
        ..Default::default()
    };
    let id = me.submit(vec![task]).await.unwrap()[0]
        .as_ref()
        .unwrap()
        .id
        .clone();
    let done = me
        .dispatcher()
        .wait(vec![id], Duration::from_secs(30))
        .await
        .unwrap()
        .pop()
        .flatten()
        .expect("the task is known");
    assert_eq!(
        done.status,
        compute::Status::Succeeded,
        "{:?}",
        done.outcome
    );
    net.shutdown().await;
}

/// A joining member dials no more than half its bound although every welcome lists more
/// members: its dials under way and the peers it dialled that are not verified yet count against
/// the room. (Counting only verified members, it dialled again at each welcome: 60 connections
/// within a second of joining a federation of 100 with a bound of 24.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_dials_no_more_than_half_its_bound() {
    const BOUND: usize = 6;
    // No idle connection closes and no mixing dials within the test: every connection the new
    // member opens stays to be counted. (Others dial it too — a member that may use its
    // endpoint, say — and those do not count against its room.)
    let mut net = Federation::start_with(
        0,
        0,
        &[
            format!("mesh.max_connections={BOUND}"),
            "mesh.idle_after=10m".into(),
            "mesh.anti_entropy=10m".into(),
        ],
    )
    .await
    .unwrap();
    net.add_institution("inst-a").unwrap();
    for _ in 0..MEMBERS {
        net.add_member(0).await.unwrap();
    }
    let i = net.add_member(0).await.unwrap();
    let peer = net.node(i).peer_id().to_string();
    // The join is over once the new member lists everyone and everyone lists it: its dials at
    // the welcomes have happened, and nothing has closed since (connections only add up here).
    wait_for(
        "the new member listing and listed by everyone",
        Duration::from_secs(30),
        || {
            let p = peer.clone();
            every_registry(&net, move |v| {
                v.nodes.contains_key(&p) && v.nodes.len() >= MEMBERS + 2
            })
        },
    )
    .await
    .unwrap();
    let members = net.node(i).mesh().members().await.unwrap();
    let dialled = members.iter().filter(|m| m.dialled).count();
    assert!(
        (1..=BOUND / 2).contains(&dialled),
        "the new member dialled {dialled} of its {} member connections; it may dial at most \
         half its bound of {BOUND}",
        members.len()
    );
    net.shutdown().await;
}

/// A bounded federation whose anti-entropy (and mixing) is too rare to matter within a test:
/// whatever spreads here spreads by gossip or by the syncs news sets off.
async fn bounded_without_anti_entropy(max_connections: usize) -> Federation {
    let net = bounded(max_connections, &["mesh.anti_entropy=10m"]).await;
    wait_for(
        "every node listing every node",
        Duration::from_secs(30),
        || every_registry(&net, |v| v.nodes.len() > MEMBERS),
    )
    .await
    .unwrap();
    net
}

/// A new member writes its records before it has any peer to gossip them to. They go out once
/// a verified member has subscribed, and whoever learns them by sync passes them on, so every
/// member lists it at once, not after rounds of anti-entropy (most members never connect to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_is_listed_by_every_member_without_waiting_for_anti_entropy() {
    let mut net = bounded_without_anti_entropy(MAX_CONNECTIONS).await;
    let started = std::time::Instant::now();
    let i = net.add_member(0).await.unwrap();
    let peer = net.node(i).peer_id().to_string();
    wait_for(
        "the new member listed everywhere",
        Duration::from_secs(5),
        || {
            let p = peer.clone();
            every_registry(&net, move |v| v.nodes.contains_key(&p))
        },
    )
    .await
    .unwrap();
    eprintln!(
        "new member listed everywhere {:?} after it started",
        started.elapsed()
    );
    net.shutdown().await;
}

/// A partition heals through one link (the coordinator and one member of the other side): the
/// two sides' news meets on it, and the syncs that news sets off carry it through each side,
/// with no anti-entropy round and no other connection across.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_partition_heals_both_sides_news_reaches_every_member_without_anti_entropy() {
    // Room enough that each side stays connected within itself once cut (the cut, not the
    // bound, is what keeps the sides apart).
    let net = bounded_without_anti_entropy(8).await;
    let nodes = net.running();
    // The coordinator and inst-a's members; inst-b's.
    let (mut left, mut right): (Vec<&node::Node>, Vec<&node::Node>) = (Vec::new(), Vec::new());
    for (k, n) in nodes.into_iter().enumerate() {
        if k == 0 || (k - 1) % 2 == 0 {
            left.push(n);
        } else {
            right.push(n);
        }
    }
    for l in &left {
        for r in &right {
            l.mesh().block(r.peer_id(), true).await.unwrap();
            r.mesh().block(l.peer_id(), true).await.unwrap();
        }
    }
    let right_peers: HashSet<String> = right.iter().map(|r| r.peer_id().to_string()).collect();
    wait_for(
        "the sides to lose each other",
        Duration::from_secs(10),
        || async {
            for l in &left {
                let members = l.mesh().members().await.unwrap();
                if members.iter().any(|m| right_peers.contains(&m.peer_id)) {
                    return false;
                }
            }
            true
        },
    )
    .await
    .unwrap();
    let on_left = left[1]
        .register_function(&shell_function("left"))
        .await
        .unwrap();
    let on_right = right[0]
        .register_function(&shell_function("right"))
        .await
        .unwrap();
    for (side, id) in [(&left, &on_left), (&right, &on_right)] {
        wait_for("each side to converge", Duration::from_secs(15), || async {
            for n in side.iter() {
                if !n
                    .mesh()
                    .registry()
                    .await
                    .unwrap()
                    .functions
                    .contains_key(id)
                {
                    return false;
                }
            }
            true
        })
        .await
        .unwrap();
    }
    let view = left[0].mesh().registry().await.unwrap();
    assert!(!view.functions.contains_key(&on_right), "the cut held");

    let healed = std::time::Instant::now();
    let (coordinator, across) = (left[0], right[0]);
    coordinator
        .mesh()
        .block(across.peer_id(), false)
        .await
        .unwrap();
    across
        .mesh()
        .block(coordinator.peer_id(), false)
        .await
        .unwrap();
    // Issue 22 asks for convergence within 10 s of healing (at 100 members); this small
    // federation usually takes 1–3 s, but under CI's load (the container testnet and the other
    // suites on the same two cores) 5 s was missed now and then.
    wait_for(
        "both functions everywhere",
        Duration::from_secs(10),
        || async {
            net.everyone_has_function(&on_left).await && net.everyone_has_function(&on_right).await
        },
    )
    .await
    .unwrap();
    eprintln!("converged {:?} after the heal", healed.elapsed());
    net.shutdown().await;
}
