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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bounded_connections_any_member_reaches_any_endpoint_and_hears_every_advert() {
    let overrides = [
        format!("mesh.max_connections={MAX_CONNECTIONS}"),
        "mesh.idle_after=2s".to_string(),
    ];
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

    // Idle connections close until every member holds at most its bound.
    wait_for(
        "every member within its connection bound",
        Duration::from_secs(60),
        || async { most_connections(&net).await <= MAX_CONNECTIONS },
    )
    .await
    .unwrap();
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
