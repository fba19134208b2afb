//! The container testnet's fault scenarios (issue 20), driven from outside: `funcmesh testnet up
//! --docker` builds the image and brings up a coordinator, institution A (a1, a2: endpoints) on
//! network inst-a and institution B (b1: endpoint, b2: client) on inst-b; each scenario then
//! breaks something real (a container stopped or killed, a network cut, a NAT) and checks what a
//! user would: that tasks finish, none is lost, and the registries converge. Each prints what it
//! checked and how long recovery took.
//!
//! Not part of `cargo test --workspace` (it needs docker and takes minutes): `.ci/run` runs it
//! with `cargo test -p node --test docker -- --nocapture`.

mod scenarios;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use node::DataDir;
use node::client::Client;
use node::local_testnet::{self, Testnet};

const BIN: &str = env!("CARGO_BIN_EXE_funcmesh");

/// The functions the scenarios run, registered by a1 (institution A).
const SOURCE: &str = r#"
import socket, time

def square(x):
    return x * x

def nap(x, seconds):
    time.sleep(seconds)
    return x

def where():
    return socket.gethostname()
"#;

/// The running container federation.
pub(crate) struct Fed {
    dir: PathBuf,
    net: Testnet,
}

impl Fed {
    fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn client(&self, name: &str) -> Client {
        Client::for_node(&DataDir::new(self.node_dir(name))).expect("client")
    }

    fn reload(&mut self) {
        self.net = local_testnet::load(&self.dir).expect("testnet.json");
    }

    fn peer_id(&self, name: &str) -> String {
        local_testnet::find(&self.net, name)
            .expect("node")
            .peer_id
            .clone()
    }

    fn names(&self) -> Vec<String> {
        local_testnet::all_nodes(&self.net)
            .map(|n| n.name.clone())
            .collect()
    }

    /// Restarts one node through the CLI, as a user would.
    fn restart(&mut self, name: &str) {
        ok(&["testnet", "restart", name, "--dir", p(&self.dir)]);
        self.reload();
    }

    /// Waits until every running node lists every other running node.
    async fn converged(&self, timeout: Duration) -> Duration {
        let t = Instant::now();
        local_testnet::wait_converged(&self.net, timeout)
            .await
            .expect("members converge");
        t.elapsed()
    }

    /// Waits until each of `nodes` lists every function in `functions`.
    async fn functions_everywhere(
        &self,
        nodes: &[&str],
        functions: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let t = Instant::now();
        for n in nodes {
            let c = self.client(n);
            wait(
                &format!("{n} to list {functions:?}"),
                timeout.saturating_sub(t.elapsed()),
                || async {
                    let have = c.functions().await.unwrap_or_default();
                    functions
                        .iter()
                        .all(|f| have.iter().any(|h| h.record.name == *f))
                },
            )
            .await?;
        }
        Ok(t.elapsed())
    }

    /// Submits `function(args)` from `from`, routed as `route` says, and returns the task ids.
    async fn submit(
        &self,
        from: &str,
        function: &str,
        args: Vec<serde_json::Value>,
        route: &Route,
    ) -> anyhow::Result<Vec<String>> {
        let tasks = args
            .into_iter()
            .map(|a| node::tasks::NewTask {
                function: function.into(),
                args: a,
                kwargs: serde_json::json!({}),
                endpoint: route.endpoint.map(str::to_string),
                institution: route.institution.map(str::to_string),
                retries: route.retries,
                strategy: route.strategy.map(str::to_string),
                ..Default::default()
            })
            .collect();
        let list = self
            .client(from)
            .submit_tasks(tasks, Duration::ZERO)
            .await?;
        list.tasks
            .into_iter()
            .map(|t| match t.task {
                Some(t) => Ok(t.id),
                None => Err(anyhow::anyhow!("refused: {}", t.error.unwrap_or_default())),
            })
            .collect()
    }

    /// Waits for tasks submitted from `from` and returns their views.
    async fn finish(
        &self,
        from: &str,
        ids: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<node::tasks::TaskView>> {
        let c = self.client(from);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = c
                .wait_tasks(ids.to_vec(), left.min(Duration::from_secs(10)))
                .await;
            if let Ok(list) = got {
                let views: Vec<node::tasks::TaskView> =
                    list.tasks.into_iter().filter_map(|t| t.task).collect();
                if views.len() == ids.len() && views.iter().all(|v| v.status.is_terminal()) {
                    return Ok(views);
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} task(s) from {from} not finished after {timeout:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs one task and returns its value, retrying a refusal until `timeout` (a route being
    /// learnt again after a fault is refused, not lost).
    async fn run_one(
        &self,
        from: &str,
        function: &str,
        args: serde_json::Value,
        route: &Route,
        timeout: Duration,
    ) -> anyhow::Result<(serde_json::Value, node::tasks::TaskView)> {
        let start = Instant::now();
        let mut last = String::new();
        let mut refusals = 0;
        while start.elapsed() < timeout {
            match self.submit(from, function, vec![args.clone()], route).await {
                Ok(ids) => {
                    let accepted = start.elapsed();
                    let left = timeout.saturating_sub(start.elapsed());
                    let views = self.finish(from, &ids, left).await?;
                    let v = views.into_iter().next().expect("one task");
                    if start.elapsed() > Duration::from_secs(5) {
                        // Slow: say why, so that a report shows what recovery waited for.
                        println!(
                            "   ({function} {from}→{:?}: {refusals} refusal(s) before it was \
                             accepted at {}, last: {last:?}; {} attempt(s), lost: {:?})",
                            route.endpoint.or(route.institution),
                            secs(accepted),
                            v.attempts,
                            v.lost
                        );
                    }
                    return match &v.outcome {
                        Some(compute::task::Outcome::Succeeded { value, .. }) => {
                            Ok((value.clone(), v))
                        }
                        other => Err(anyhow::anyhow!("{function} from {from}: {other:?}")),
                    };
                }
                Err(e) => {
                    refusals += 1;
                    last = e.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("{function} from {from} not accepted within {timeout:?}: {last}")
    }
}

/// Where a task may go.
#[derive(Default, Clone, Copy)]
pub(crate) struct Route {
    endpoint: Option<&'static str>,
    institution: Option<&'static str>,
    retries: u32,
    strategy: Option<&'static str>,
}

impl Route {
    fn to(endpoint: &'static str) -> Route {
        Route {
            endpoint: Some(endpoint),
            ..Default::default()
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run funcmesh");
    assert!(
        out.status.success(),
        "funcmesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Percentile of a sorted list of durations.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Removes the container testnet when the test ends, however it ends.
struct Teardown(PathBuf);

impl Drop for Teardown {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the nodes said last: the test's data dir goes with it.
            for n in ["coordinator", "a1", "a2", "b1", "b2"] {
                let log =
                    std::fs::read_to_string(self.0.join(n).join("node.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                eprintln!("---- {n}/node.log (last lines)");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = Command::new(BIN)
            .args(["testnet", "down", "--docker", "--dir", p(&self.0)])
            .stdin(Stdio::null())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_federation_survives_its_fault_scenarios() {
    let root = tempfile::Builder::new()
        .prefix("funcmesh-docker-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let dir = root.path().join("testnet");
    let _teardown = Teardown(dir.clone());
    let t = Instant::now();
    ok(&["testnet", "up", "--docker", "--dir", p(&dir)]);
    println!(
        "up: image built (or cached) and 5 nodes joined through the CLI in {}",
        secs(t.elapsed())
    );
    let dir = dir.canonicalize().expect("dir");
    let net = local_testnet::load(&dir).expect("testnet.json");
    assert!(
        net.docker.is_some(),
        "testnet.json records the compose project"
    );
    assert_eq!(net.nodes.len(), 4);
    assert_eq!(
        net.grants.len(),
        3,
        "inst-a grants a1 and a2 to B, inst-b grants b1 to A"
    );
    for n in local_testnet::all_nodes(&net) {
        assert_eq!(
            n.container.as_deref(),
            Some(format!("funcmesh-{}", n.name).as_str())
        );
    }
    let mut fed = Fed { dir, net };
    let mut report: BTreeMap<&str, String> = BTreeMap::new();

    // While working on one: FUNCMESH_SCENARIOS=7 (scenario 1 always runs: it sets up).
    let only = std::env::var("FUNCMESH_SCENARIOS").ok();
    let on = |n: char| only.as_deref().is_none_or(|o| o.contains(n));
    scenarios::s1_join_and_converge(&fed, &mut report).await;
    if on('2') {
        scenarios::s2_cross_institution_grant(&fed, &mut report).await;
    }
    if on('3') {
        scenarios::s3_coordinator_loss(&mut fed, &mut report).await;
    }
    if on('4') {
        scenarios::s4_partition(&mut fed, &mut report).await;
    }
    if on('5') {
        scenarios::s5_endpoint_killed(&mut fed, &mut report).await;
    }
    if on('6') {
        scenarios::s6_flow_across_institutions(&mut fed, &mut report).await;
    }
    if on('8') {
        scenarios::s8_rolling_restart(&mut fed, &mut report).await;
    }
    if on('7') {
        scenarios::s7_nat(&mut fed, &mut report).await;
    }

    println!("\n== container testnet: what was measured");
    for (k, v) in &report {
        println!("{k}: {v}");
    }
    let t = Instant::now();
    ok(&["testnet", "down", "--docker", "--dir", p(&fed.dir)]);
    let left = Command::new("docker")
        .args(["ps", "-aq", "--filter", "label=funcmesh.testnet"])
        .output()
        .expect("docker ps");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "down leaves no container"
    );
    let nets = Command::new("docker")
        .args(["network", "ls", "--filter", "name=funcmesh-inst", "-q"])
        .output()
        .expect("docker network ls");
    assert!(
        String::from_utf8_lossy(&nets.stdout).trim().is_empty(),
        "down leaves no network"
    );
    println!(
        "down: containers and networks removed in {}",
        secs(t.elapsed())
    );
}
