//! Transfers between in-process nodes, through the data plane itself.

use std::time::Duration;

use node::config::EndpointSection;
use testnet::{Federation, wait_for};

/// A copy asked of the destination's node runs only if the asking member could read the source
/// itself: a member without a grant cannot borrow the rights of the node that would pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_have_another_node_pull_what_it_may_not_read() {
    // a1: the source (inst-a's default policy: its own institution and token holders);
    // b1: the destination (policy federation: any member may write there); c1 asks.
    let mut net = Federation::start(3, 1).await.unwrap();
    let src_root = net.path().join("src-root");
    let dst_root = net.path().join("dst-root");
    std::fs::create_dir_all(&src_root).unwrap();
    std::fs::create_dir_all(&dst_root).unwrap();
    std::fs::write(src_root.join("secret"), b"inst-a's").unwrap();
    let (src, dst) = (src_root.clone(), dst_root.clone());
    net.restart_with(0, move |c| {
        c.endpoint = vec![EndpointSection {
            name: "src".into(),
            data_root: Some(src),
            ..Default::default()
        }]
    })
    .await
    .unwrap();
    net.restart_with(1, move |c| {
        c.endpoint = vec![EndpointSection {
            name: "dst".into(),
            policy: "federation".into(),
            data_root: Some(dst),
            ..Default::default()
        }]
    })
    .await
    .unwrap();
    let (a1, b1) = (net.node(0).peer_id(), net.node(1).peer_id());
    let a1_text = a1.to_string();
    wait_for(
        "b1 knows a1's endpoint and c1 is connected to b1",
        Duration::from_secs(20),
        || {
            let (mesh, a1_text) = (net.node(1).mesh().clone(), a1_text.clone());
            let c1 = net.node(2).peer_id();
            async move {
                mesh.is_member(&c1)
                    && mesh
                        .registry_with(move |v| {
                            v.endpoints
                                .values()
                                .any(|e| e.peer_id == a1_text && e.record.name == "src")
                        })
                        .await
                        .unwrap_or(false)
            }
        },
    )
    .await
    .unwrap();
    let spec = serde_json::json!({
        "src_node": a1.to_string(), "src_endpoint": "src", "src_path": "secret",
        "dst_endpoint": "dst", "dst_path": "stolen", "recursive": false, "delete": false,
    });
    let to_b1 = net
        .node(2)
        .data_plane()
        .remote(b1, net.node(1).data_plane().local_addr().unwrap());
    let err = to_b1
        .submit_copy("steal", spec.clone(), None, None)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("refused") && text.contains("presents no token"),
        "{text}"
    );
    // A made-up token is checked, not trusted.
    let err = to_b1
        .submit_copy("steal-2", spec, None, Some("bm90IGEgdG9rZW4".into()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capability refused"), "{err}");
    assert!(!dst_root.join("stolen").exists());
    assert!(net.node(1).data_plane().established() > 0);
    net.shutdown().await;
}
