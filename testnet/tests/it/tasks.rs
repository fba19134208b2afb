//! Tasks through the in-process testnet: what the submitting node keeps, and for how long.

use std::time::Duration;

use node::tasks::NewTask;
use testnet::{Federation, shell_function, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_drops_its_finished_tasks_once_past_their_retention() {
    let mut net = Federation::start(1, 2).await.unwrap();
    net.restart_with(0, |c| c.node.task_retention = Duration::from_secs(1))
        .await
        .unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let function = net
        .node(0)
        .register_function(&shell_function("kept"))
        .await
        .unwrap();
    let task = NewTask {
        function: function.clone(),
        args: serde_json::json!([1]),
        ..Default::default()
    };
    let submitted = net.node(0).submit(vec![task]).await.unwrap();
    let id = submitted[0].as_ref().unwrap().id.clone();
    let dispatcher = net.node(0).dispatcher();
    let done = dispatcher
        .wait(vec![id.clone()], Duration::from_secs(20))
        .await
        .unwrap();
    let done = done[0].as_ref().expect("the task finishes");
    assert!(done.status.is_terminal(), "{:?}", done.status);
    assert!(
        dispatcher.get(vec![id.clone()]).await.unwrap()[0].is_some(),
        "kept while within its retention"
    );
    wait_for(
        "the submitter to drop the finished task",
        Duration::from_secs(20),
        || async { dispatcher.get(vec![id.clone()]).await.unwrap()[0].is_none() },
    )
    .await
    .unwrap();
    net.shutdown().await;
}
