//! Tasks through the in-process testnet: what the submitting node keeps, and for how long.

use std::time::Duration;

use compute::task::TaskId;
use compute::wire::{TaskProtocol, TaskRequest, TaskResponse};
use mesh::links::Error;
use mesh::membership::{Invite, Proof, Role, unix_now};
use node::tasks::NewTask;
use testnet::{Federation, rogue, shell_function, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_drops_its_finished_tasks_once_past_their_retention() {
    let mut net = Federation::start(1, 2).await.unwrap();
    net.restart_with(0, |c| c.node.task_retention = Duration::from_secs(3))
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

    // A task whose argument and result went by reference: its blobs go with it.
    let echo = python_on_node0(&net, "echo", "def echo(s):\n    return s\n").await;
    let task = NewTask {
        function: echo,
        args: serde_json::json!(["v".repeat(2 << 20)]),
        ..Default::default()
    };
    let submitted = net.node(0).submit(vec![task]).await.unwrap();
    let id = submitted[0].as_ref().unwrap().id.clone();
    let done = dispatcher
        .wait(vec![id.clone()], Duration::from_secs(20))
        .await
        .unwrap();
    let done = done[0].as_ref().expect("the task finishes");
    let args = done
        .submission
        .args_ref
        .clone()
        .expect("the argument went by reference");
    let result = done
        .outcome
        .as_ref()
        .and_then(|o| o.value_ref())
        .cloned()
        .unwrap_or_else(|| panic!("the result went by reference: {:?}", done.outcome));
    let held = |r: &compute::ValueRef| {
        net.node(0)
            .blobs()
            .size(&r.blake3.parse().unwrap())
            .is_some()
    };
    wait_for(
        "the submitter to hold both blobs",
        Duration::from_secs(20),
        || async { held(&args) && held(&result) },
    )
    .await
    .unwrap();
    wait_for(
        "the blobs to go with the task",
        Duration::from_secs(20),
        || async { !held(&args) && !held(&result) },
    )
    .await
    .unwrap();
    assert!(dispatcher.get(vec![id]).await.unwrap()[0].is_none());
    net.shutdown().await;
}

/// A request the task service answers with a refusal: proof that it got there.
fn ask_nowhere() -> TaskRequest {
    TaskRequest::Records {
        endpoint: "nowhere".into(),
        ids: vec![TaskId::random()],
    }
}

fn answered_by_the_service(answer: &Result<TaskResponse, Error>) -> bool {
    matches!(answer, Ok(TaskResponse::Refused { reason }) if reason.contains("no endpoint named `nowhere`"))
}

/// Task requests travel on one long-lived stream per peer: every request on it is answered,
/// a node that is not a member never reaches the task service, a request to a peer that is
/// gone fails with a reason naming it, and once the peer is back a new stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_streams_serve_members_only_and_reopen_after_the_peer_restarts() {
    let mut net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let a = net.node(0).task_links().clone();
    let b = net.node(1).peer_id();

    // Many requests in flight at once, each answered under its own id.
    let answers = futures::future::join_all((0..200).map(|_| a.request(b, &ask_nowhere()))).await;
    for answer in &answers {
        assert!(answered_by_the_service(answer), "{answer:?}");
    }

    // A node holding a stolen proof is refused; its task requests never reach the service.
    let invite = Invite::decode(
        &net.invite(0, Role::Endpoint, Duration::from_secs(3600))
            .unwrap(),
    )
    .unwrap();
    let owner = mesh::Keypair::generate_ed25519();
    let (_, proof) = Proof::bind(&invite, &owner, unix_now()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let federation = net.node(1).federation().clone();
    let (stranger, guard) = rogue(
        dir.path(),
        federation,
        mesh::Keypair::generate_ed25519(),
        proof,
    )
    .await
    .unwrap();
    let b_addr = net.node(1).dial_addrs().await.unwrap()[0].clone();
    stranger.dial(b_addr).await.unwrap();
    let (stranger_links, _inbound) = stranger.links::<TaskProtocol>().unwrap();
    // Its requests are answered "busy", fail, or (once b has cut it off) go unanswered: a
    // stranger's request is never served. (The link's own timeout is 30 s; waiting it out adds
    // nothing.)
    for _ in 0..5 {
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            stranger_links.request(b, &ask_nowhere()),
        )
        .await;
        assert!(
            matches!(answer, Ok(Ok(TaskResponse::Busy { .. }) | Err(_)) | Err(_)),
            "a stranger got {answer:?}"
        );
    }
    // A frame larger than an unverified peer may send is never read, let alone parsed: the
    // stream is cut (before, it was read whole, parsed, and answered "busy").
    let large = TaskRequest::Records {
        endpoint: "nowhere".into(),
        ids: (0..2000).map(|_| TaskId::random()).collect(),
    };
    let answer =
        tokio::time::timeout(Duration::from_secs(10), stranger_links.request(b, &large)).await;
    assert!(
        matches!(answer, Ok(Err(_)) | Err(_)),
        "a stranger's large frame was answered: {answer:?}"
    );
    guard.stop().await;
    // The node still serves its members.
    assert!(answered_by_the_service(&a.request(b, &ask_nowhere()).await));

    // The peer stops: a request fails, naming it, well within the request timeout.
    net.stop(1).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), a.request(b, &ask_nowhere()))
        .await
        .expect("a request to a stopped peer fails instead of hanging");
    let err = answer.expect_err("nobody is there to answer").to_string();
    assert!(err.contains(&b.to_string()), "{err}");

    // It is back: requests reach it again, over a new stream.
    net.restart(1).await.unwrap();
    wait_for("full mesh again", Duration::from_secs(20), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    wait_for(
        "a request to reach the restarted peer",
        Duration::from_secs(20),
        || {
            let ask = a.request(b, &ask_nowhere());
            async move { answered_by_the_service(&ask.await) }
        },
    )
    .await
    .unwrap();
    net.shutdown().await;
}

/// A large request goes on a stream of its own: small requests sent after it are answered at
/// once, not after its bytes have crossed and been read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_task_requests_do_not_wait_behind_a_large_one() {
    let net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let a = net.node(0).task_links().clone();
    let b = net.node(1).peer_id();
    // The link is open and serving.
    assert!(answered_by_the_service(&a.request(b, &ask_nowhere()).await));
    // A 30 MiB result for a task b never sent: b reads it whole, then acknowledges it (a small
    // answer), so the large request's round trip is its bytes crossing and being read.
    let large = TaskRequest::Results {
        records: vec![compute::task::Record {
            v: compute::task::RECORD_VERSION,
            id: TaskId::random(),
            endpoint: "ep".into(),
            submitter: b.to_string(),
            function_id: "f".into(),
            status: compute::Status::Succeeded,
            times: Default::default(),
            worker: None,
            environment: "host".into(),
            cold_start: false,
            outcome: Some(compute::task::Outcome::succeeded(
                serde_json::Value::String("x".repeat(30 << 20)),
            )),
        }],
        loads: Vec::new(),
    };
    let large = a.request(b, &large);
    let t0 = std::time::Instant::now();
    let large = tokio::spawn(async move { (large.await, t0.elapsed()) });
    let sent = std::time::Instant::now();
    let answer = a.request(b, &ask_nowhere()).await;
    let small = sent.elapsed();
    assert!(answered_by_the_service(&answer), "{answer:?}");
    for _ in 0..10 {
        assert!(answered_by_the_service(&a.request(b, &ask_nowhere()).await));
    }
    let (answer, large_took) = large.await.unwrap();
    assert!(
        matches!(answer, Ok(TaskResponse::Acknowledged)),
        "{answer:?}"
    );
    eprintln!("small request: {small:?}; large request: {large_took:?}");
    // Behind the large request on one stream, the small one would take as long as it.
    assert!(
        small * 4 < large_took,
        "a small request sent after a large one took {small:?}, the large one {large_took:?}"
    );
    net.shutdown().await;
}

/// A Python function `name` with `source`, registered on node 0; its id.
async fn python_on_node0(net: &Federation, name: &str, source: &str) -> String {
    let f = node::registry::NewFunction {
        name: name.into(),
        python: Some(source.into()),
        entrypoint: Some(name.into()),
        payload: None,
        shell: None,
        container: None,
        description: String::new(),
    };
    net.node(0).register_function(&f).await.unwrap()
}

/// The id of node 1's endpoint, once node 0's registry lists it (tasks sent there cross the
/// mesh).
async fn endpoint_of_node1(net: &Federation) -> String {
    let b = net.node(1).peer_id().to_string();
    let find = || {
        let (mesh, b) = (net.node(0).mesh().clone(), b.clone());
        async move {
            mesh.registry_with(move |view| {
                view.endpoints
                    .values()
                    .find(|e| e.peer_id == b)
                    .map(|e| e.id.clone())
            })
            .await
            .unwrap()
        }
    };
    wait_for(
        "node 1's endpoint in node 0's registry",
        Duration::from_secs(20),
        || async { find().await.is_some() },
    )
    .await
    .unwrap();
    find().await.unwrap()
}

/// Tasks whose arguments, and results, add up to more than one task-protocol message carries
/// go in several messages, and all of them come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_results_too_large_for_one_message_all_arrive() {
    let mut net = Federation::start(1, 2).await.unwrap();
    // 80 MB cross one connection: under a loaded CI machine, node 1's adverts can queue behind
    // them for more than the testnet's 3 s "endpoint lost" threshold. Loss detection is not
    // what this test is about.
    // Values up to 16 MiB travel inline (the default sends those over 1 MiB by reference):
    // this test is about task messages, so the values stay in them.
    net.restart_with(0, |c| {
        c.mesh.endpoint_lost_after = Duration::from_secs(60);
        c.transfer.inline_limit = 16 << 20;
    })
    .await
    .unwrap();
    net.restart_with(1, |c| c.transfer.inline_limit = 16 << 20)
        .await
        .unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let function = python_on_node0(&net, "echo", "def echo(s):\n    return s\n").await;
    let endpoint = endpoint_of_node1(&net).await;
    // 20 tasks of 2 MiB each way: 40 MiB, more than the 32 MiB one message carries.
    let big = "y".repeat(2 << 20);
    let tasks: Vec<NewTask> = (0..20)
        .map(|i| NewTask {
            function: function.clone(),
            args: serde_json::json!([format!("{i}{big}")]),
            endpoint: Some(endpoint.clone()),
            ..Default::default()
        })
        .collect();
    let submitted = net.node(0).submit(tasks).await.unwrap();
    let ids: Vec<TaskId> = submitted
        .iter()
        .map(|s| s.as_ref().unwrap().id.clone())
        .collect();
    let done = net
        .node(0)
        .dispatcher()
        .wait(ids, Duration::from_secs(60))
        .await
        .unwrap();
    for (i, t) in done.iter().enumerate() {
        let t = t.as_ref().unwrap();
        match &t.outcome {
            Some(compute::task::Outcome::Succeeded { value, .. }) => {
                let s = value.as_str().unwrap();
                assert!(
                    s.starts_with(&i.to_string()) && s.len() == big.len() + i.to_string().len()
                );
            }
            other => panic!("task {i} did not come back: {:?} {other:?}", t.status),
        }
    }
    net.shutdown().await;
}

/// An endpoint that holds its most unfinished tasks tells submitters to come back: they keep
/// the tasks and send them again, and every one runs, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_endpoint_pushes_back_and_its_submitters_send_again_later() {
    let mut net = Federation::start(1, 2).await.unwrap();
    net.restart_with(1, |c| {
        for e in &mut c.endpoint {
            e.max_queued = 1;
            e.max_workers = 1;
        }
    })
    .await
    .unwrap();
    wait_for("full mesh", Duration::from_secs(20), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let function = python_on_node0(
        &net,
        "nap",
        "import time\ndef nap(s):\n    time.sleep(s)\n    return s\n",
    )
    .await;
    let endpoint = endpoint_of_node1(&net).await;
    let task = || NewTask {
        function: function.clone(),
        args: serde_json::json!([1]),
        endpoint: Some(endpoint.clone()),
        ..Default::default()
    };
    let dispatcher = net.node(0).dispatcher().clone();
    let submit = |t: NewTask| {
        let node = net.node(0);
        async move {
            node.submit(vec![t]).await.unwrap()[0]
                .as_ref()
                .unwrap()
                .id
                .clone()
        }
    };
    // The first one runs; two more come while it does.
    let first = submit(task()).await;
    wait_for("the first task to run", Duration::from_secs(30), || {
        let (d, id) = (dispatcher.clone(), first.clone());
        async move {
            d.live(id)
                .await
                .unwrap()
                .is_some_and(|t| t.status == compute::Status::Running)
        }
    })
    .await
    .unwrap();
    let mut ids = vec![first];
    ids.push(submit(task()).await);
    ids.push(submit(task()).await);
    let done = dispatcher.wait(ids, Duration::from_secs(60)).await.unwrap();
    let mut records: Vec<compute::task::Record> = done
        .iter()
        .map(|t| {
            let t = t.as_ref().unwrap();
            assert_eq!(t.status, compute::Status::Succeeded, "{t:?}");
            t.record.clone().unwrap()
        })
        .collect();
    records.sort_by_key(|r| r.times.received_us);
    // The two that came while the endpoint was full were taken only once the first had
    // finished (together: an endpoint with nothing unfinished takes a whole batch).
    let first = &records[0];
    for later in &records[1..] {
        assert!(
            later.times.received_us >= first.times.finished_us,
            "received at {} while the first ran until {}: {records:?}",
            later.times.received_us,
            first.times.finished_us
        );
    }
    net.shutdown().await;
}

/// The submitting node keeps each function once, by id, not with every task it submits; its
/// finished tasks read back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_stores_each_function_once_not_with_every_task() {
    let mut net = Federation::start(1, 2).await.unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let big = node::registry::NewFunction {
        name: "big".into(),
        python: Some(format!(
            "# {}\ndef inc(x):\n    return x + 1\n",
            "x".repeat(20_000)
        )),
        entrypoint: Some("inc".into()),
        payload: None,
        shell: None,
        container: None,
        description: String::new(),
    };
    let function = net.node(0).register_function(&big).await.unwrap();
    let tasks = (0..5)
        .map(|i| NewTask {
            function: function.clone(),
            args: serde_json::json!([i]),
            ..Default::default()
        })
        .collect();
    let submitted = net.node(0).submit(tasks).await.unwrap();
    let ids: Vec<_> = submitted
        .iter()
        .map(|s| s.as_ref().unwrap().id.clone())
        .collect();
    let dispatcher = net.node(0).dispatcher().clone();
    let done = dispatcher
        .wait(ids.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    for t in &done {
        let t = t.as_ref().expect("finished");
        assert_eq!(t.status, compute::Status::Succeeded, "{:?}", t.outcome);
    }
    let db = net.members[0].dir.db();
    net.stop(0).await.unwrap();
    let store = store::Store::open(&db).unwrap();
    let functions = store.scan(store::cf::FUNCTIONS).unwrap();
    assert!(
        functions.iter().any(|(_, v)| v.len() > 20_000),
        "the function is stored"
    );
    for (k, v) in store.scan(store::cf::SUBMITTED).unwrap() {
        assert!(
            v.len() < 5_000,
            "task {} is stored with its function ({} bytes): {}",
            String::from_utf8_lossy(&k),
            v.len(),
            String::from_utf8_lossy(&v).replace(&"x".repeat(100), "")
        );
    }
    drop(store);
    // Read back after a restart: whole, function included.
    net.restart(0).await.unwrap();
    let back = net.node(0).dispatcher().get(ids).await.unwrap();
    for t in back {
        let t = t.expect("kept");
        assert_eq!(t.submission.function_id, function);
        assert!(t.submission.function.content_id() == function);
    }
    net.shutdown().await;
}

/// Issue 17's second attack: a task of another institution on the default `host` runtime reads
/// the node's key, its API token and its store. Host workers now run as a uid of their own, in a
/// scratch dir outside the data dir, with a cleared environment; an endpoint that cannot isolate
/// them refuses other institutions' host tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_task_cannot_read_the_node_key_the_api_token_or_the_store() {
    if running_as_root() {
        let mut net = Federation::start(2, 1).await.unwrap();
        // b1's endpoint takes anyone's tasks: no capability needed for this test.
        net.restart_with(1, |c| {
            for e in &mut c.endpoint {
                e.policy = "federation".into();
            }
        })
        .await
        .unwrap();
        wait_for("full mesh", Duration::from_secs(10), || {
            net.fully_connected()
        })
        .await
        .unwrap();
        let dir = net.node(1).data_dir().clone();
        let secrets = [
            dir.node_key(),
            dir.api(),
            dir.db().join("CURRENT"),
            dir.membership(),
        ];
        let function = python_on_node0(
            &net,
            "probe",
            "def probe(paths):\n    import os\n    out = {}\n    for p in paths + ['../../node.key', '../../api.json']:\n        try:\n            with open(p, 'rb') as f:\n                f.read(1)\n            out[p] = 'read'\n        except Exception as e:\n            out[p] = type(e).__name__\n    out['uid'] = os.getuid()\n    out['cwd'] = os.getcwd()\n    out['env'] = sorted(os.environ)\n    return out\n",
        )
        .await;
        let endpoint = endpoint_of_node1(&net).await;
        let paths: Vec<String> = secrets.iter().map(|p| p.display().to_string()).collect();
        let outcome = run_on_node0(&net, function, endpoint, serde_json::json!([paths])).await;
        let Some(compute::task::Outcome::Succeeded { value, .. }) = &outcome else {
            panic!("the probe did not run: {outcome:?}");
        };
        for p in &paths {
            assert_eq!(value[p], "PermissionError", "{p}: {value}");
        }
        assert_ne!(value["../../node.key"], "read", "{value}");
        assert_ne!(value["../../api.json"], "read", "{value}");
        assert_ne!(value["uid"], 0, "{value}");
        let cwd = value["cwd"].as_str().unwrap();
        assert!(!cwd.starts_with(&dir.root().display().to_string()), "{cwd}");
        let env = value["env"].to_string();
        assert!(!env.contains("FUNCMESH") && !env.contains("RUST"), "{env}");

        // Without isolation (workers as the node's user), the same task is refused.
        net.restart_with(1, |c| {
            for e in &mut c.endpoint {
                e.policy = "federation".into();
                e.host_user = compute::config::HostUser::Node;
                e.foreign_host_tasks = false;
            }
        })
        .await
        .unwrap();
        wait_for("full mesh", Duration::from_secs(10), || {
            net.fully_connected()
        })
        .await
        .unwrap();
        let function = python_on_node0(&net, "noop", "def noop():\n    return 1\n").await;
        let endpoint = endpoint_of_node1(&net).await;
        let outcome = run_on_node0(&net, function, endpoint, serde_json::json!([])).await;
        let text = format!("{outcome:?}");
        assert!(text.contains("own institution only"), "{text}");
        net.shutdown().await;
    } else {
        eprintln!(
            "not root: workers cannot get a uid of their own; the refusal is tested by compute's endpoint tests"
        );
    }
}

/// Runs `function` from node 0 on `endpoint` and waits for its outcome.
async fn run_on_node0(
    net: &Federation,
    function: String,
    endpoint: String,
    args: serde_json::Value,
) -> Option<compute::task::Outcome> {
    let submitted = net
        .node(0)
        .submit(vec![NewTask {
            function,
            args,
            endpoint: Some(endpoint),
            ..Default::default()
        }])
        .await
        .unwrap();
    let id = submitted[0].as_ref().unwrap().id.clone();
    let done = net
        .node(0)
        .dispatcher()
        .wait(vec![id], Duration::from_secs(60))
        .await
        .unwrap();
    done[0].as_ref().unwrap().outcome.clone()
}

/// Whether this test process runs as root (read from /proc, without `unsafe`).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The data plane inside the federation: every node publishes its QUIC endpoint as its
/// `data_addr`; a member fetches a blob another member holds, verified, directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_fetches_a_blob_from_another_over_the_data_plane() {
    let net = Federation::start(2, 1).await.unwrap();
    wait_for("full mesh", Duration::from_secs(10), || {
        net.fully_connected()
    })
    .await
    .unwrap();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (hash, size) = net.node(0).blobs().import(&bytes[..]).unwrap();
    let a = net.node(0).peer_id();
    let a_str = a.to_string();
    let data_addr = || {
        let (mesh, a_str) = (net.node(1).mesh().clone(), a_str.clone());
        async move {
            mesh.registry_with(move |view| view.nodes.get(&a_str).and_then(|n| n.data_addr.clone()))
                .await
                .unwrap()
        }
    };
    wait_for(
        "node 0's data_addr in node 1's registry",
        Duration::from_secs(10),
        || async { data_addr().await.is_some() },
    )
    .await
    .unwrap();
    let addr = data_addr().await.unwrap().parse().unwrap();
    let (got, received) = net
        .node(1)
        .data_plane()
        .fetch(a, addr, hash, 3)
        .await
        .unwrap();
    assert_eq!((got, received), (size, size));
    let path = net.node(1).blobs().path(&hash).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    net.shutdown().await;
}
