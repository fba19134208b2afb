//! Capability tokens against real endpoints, through the CLI on a multi-process testnet of three
//! institutions: A's admin grants, B's admin delegates, nodes present tokens, A's endpoint
//! decides. Every refusal must reach the submitter with its reason, and the endpoint must keep
//! serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::{funcmesh, ok, p, wait_until};

struct Net {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    json: serde_json::Value,
}

impl Net {
    fn up() -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("net");
        ok(&[
            "testnet",
            "up",
            "--dir",
            p(&dir),
            "--institutions",
            "3",
            "--nodes-per-institution",
            "1",
        ]);
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("testnet.json")).unwrap())
                .unwrap();
        Net {
            _tmp: tmp,
            dir,
            json,
        }
    }

    fn node(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn peer(&self, name: &str) -> String {
        self.json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap()["peer_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn key(&self, institution: &str) -> PathBuf {
        PathBuf::from(
            self.json["institutions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == institution)
                .unwrap()["key"]
                .as_str()
                .unwrap(),
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = funcmesh(&["testnet", "down", "--dir", p(&self.dir)]);
    }
}

/// `funcmesh run FUNCTION X --endpoint a1 --wait` from `node`, with extra arguments: the
/// output (stdout and stderr) and whether it succeeded.
fn run_on_a1(node: &Path, function: &str, x: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "run",
        function,
        x,
        "--endpoint",
        "a1",
        "--wait",
        "--wait-timeout",
        "20s",
        "--node",
        p(node),
    ];
    args.extend_from_slice(extra);
    let out = funcmesh(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn refused_with(node: &Path, function: &str, token: &str, needle: &str, case: &str) {
    let (success, out) = run_on_a1(node, function, "1", &["--capability", token]);
    assert!(!success, "{case}: the task ran: {out}");
    assert!(
        out.contains("capability refused") && out.contains(needle),
        "{case}: expected a refusal naming `{needle}`, got: {out}"
    );
}

fn grant(net: &Net, extra: &[&str]) -> String {
    let key = net.key("inst-a");
    let a1 = net.node("a1");
    let mut args = vec![
        "cap",
        "grant",
        "--issuer-key",
        p(&key),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--node",
        p(&a1),
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

/// A token for A's endpoint signed by an unadmitted key but claiming A's root key id.
fn forged(real: &str, a_key: &Path) -> String {
    let (_, _, a_public) = node::capabilities::institution_key(a_key).unwrap();
    let z = [9u8; 32];
    let chain = capability::inspect(&capability::from_text(real).unwrap()).unwrap();
    let g = capability::Grant {
        to: a_public, // anything: the signature fails first
        endpoint: chain.endpoint().unwrap().to_owned(),
        functions: vec![],
        abilities: vec![],
        expires: 4_000_000_000,
        not_before: None,
    };
    let bytes = capability::claim_root(&capability::grant(&z, &g).unwrap(), &a_public).unwrap();
    capability::to_text(&bytes)
}

#[test]
fn capability_tokens_open_endpoints_to_other_institutions_and_every_refusal_names_its_reason() {
    let net = Net::up();
    let (a1, b1, c1) = (net.node("a1"), net.node("b1"), net.node("c1"));
    let src = net.dir.join("fns.py");
    std::fs::write(
        &src,
        "def double(x):\n    return 2 * x\ndef triple(x):\n    return 3 * x\n",
    )
    .unwrap();
    for f in ["double", "triple"] {
        ok(&[
            "function",
            "register",
            "--name",
            f,
            "--python",
            p(&src),
            "--entrypoint",
            f,
            "--node",
            p(&a1),
        ]);
    }
    wait_until(
        "b1 and c1 see A's endpoint and functions",
        Duration::from_secs(20),
        || {
            [&b1, &c1].iter().all(|n| {
                funcmesh(&["endpoint", "show", "a1", "--node", p(n)])
                    .status
                    .success()
                    && funcmesh(&["function", "show", "triple", "--node", p(n)])
                        .status
                        .success()
            })
        },
    );
    // A's own node runs on its endpoint without any token (the default policy admits its
    // institution); wait for the first adverts to make it routable.
    wait_until(
        "a1's endpoint to run a1's task",
        Duration::from_secs(20),
        || run_on_a1(&a1, "double", "1", &[]).0,
    );

    // No token: the router on b1 does not offer A's endpoint, and says why.
    let (success, out) = run_on_a1(&b1, "double", "21", &[]);
    assert!(!success);
    assert!(out.contains("capability token"), "{out}");

    // 1. A direct grant (A → B), held by b1 and attached by its router.
    let t = grant(&net, &["--function", "double", "--ttl", "1h"]);
    let inspected = ok(&["cap", "inspect", &t, "--node", p(&b1)]);
    assert!(
        inspected.contains("the issuer granted to institution inst-b")
            && inspected.contains("functions"),
        "{inspected}"
    );
    ok(&["cap", "add", &t, "--node", p(&b1)]);
    let listed = ok(&["cap", "list", "--node", p(&b1)]);
    assert!(listed.contains("status    usable"), "{listed}");
    let (success, out) = run_on_a1(&b1, "double", "21", &[]);
    assert!(success && out.trim() == "42", "{out}");

    // 2. Two hops: B narrows it to its node b1.
    let b_key = net.key("inst-b");
    let to_b1 = format!("node:{}", net.peer("b1"));
    let t2 = ok(&[
        "cap",
        "delegate",
        &t,
        "--issuer-key",
        p(&b_key),
        "--to",
        &to_b1,
    ]);
    let (success, out) = run_on_a1(&b1, "double", "4", &["--capability", &t2]);
    assert!(success && out.trim() == "8", "{out}");

    // 3. Widening: the tool refuses; a hand-made widening grants nothing.
    let out = funcmesh(&[
        "cap",
        "delegate",
        &t,
        "--issuer-key",
        p(&b_key),
        "--to",
        "institution:inst-c",
        "--function",
        "triple",
        "--node",
        p(&b1),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot widen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let triple: serde_json::Value = serde_json::from_str(&ok(&[
        "function",
        "show",
        "triple",
        "--node",
        p(&b1),
        "--json",
    ]))
    .unwrap();
    let c_public = node::capabilities::institution_key(&net.key("inst-c"))
        .unwrap()
        .2;
    let (_, b_seed, _) = node::capabilities::institution_key(&b_key).unwrap();
    let wider = capability::to_text(
        &capability::delegate_unchecked(
            &capability::from_text(&t).unwrap(),
            &b_seed,
            &capability::Delegation {
                to: capability::Audience::Institution(c_public),
                functions: vec![triple["id"].as_str().unwrap().to_owned()],
                expires: None,
            },
        )
        .unwrap(),
    );
    refused_with(&c1, "triple", &wider, "not covered", "widened delegation");

    // 4–5. Expired, and not yet valid.
    let expired = grant(&net, &["--expires", "2020-01-01"]);
    refused_with(&b1, "double", &expired, "expired", "expired");
    let later = grant(
        &net,
        &["--not-before", "2099-01-01", "--expires", "2099-12-31"],
    );
    refused_with(&b1, "double", &later, "not yet valid", "not yet valid");

    // 6. B's token stolen and presented by C's node.
    refused_with(&c1, "double", &t, "wrong audience", "stolen token");

    // 7. A function the grant does not cover.
    refused_with(&b1, "triple", &t, "not covered", "function not covered");

    // 8. A grant for another endpoint.
    // Offline (no --node): the endpoint is taken as given, the audience by key.
    let a_key = net.key("inst-a");
    let b_public = format!(
        "institution:{}",
        node::capabilities::institution_key(&b_key).unwrap().2
    );
    let elsewhere = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&a_key),
        "--to",
        &b_public,
        "--endpoint",
        "an-endpoint-that-is-not-a1",
        "--ttl",
        "1h",
    ]);
    refused_with(&b1, "double", &elsewhere, "not covered", "another endpoint");

    // 9. A forged signature, 10. a truncated token, 11. a token rooted outside the federation,
    // and one issued by another institution for A's endpoint.
    refused_with(
        &b1,
        "double",
        &forged(&t, &a_key),
        "invalid signature",
        "forged",
    );
    let truncated = {
        let bytes = capability::from_text(&t).unwrap();
        capability::to_text(&bytes[..bytes.len() / 2])
    };
    refused_with(&b1, "double", &truncated, "malformed", "truncated");
    let outsider = {
        let endpoint_id = capability::inspect(&capability::from_text(&t).unwrap())
            .unwrap()
            .endpoint()
            .unwrap()
            .to_owned();
        capability::to_text(
            &capability::grant(
                &[7u8; 32],
                &capability::Grant {
                    to: node::capabilities::institution_key(&b_key).unwrap().2,
                    endpoint: endpoint_id,
                    functions: vec![],
                    abilities: vec![],
                    expires: 4_000_000_000,
                    not_before: None,
                },
            )
            .unwrap(),
        )
    };
    refused_with(
        &b1,
        "double",
        &outsider,
        "root not an admitted institution",
        "non-admitted root",
    );
    let by_c = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&net.key("inst-c")),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    refused_with(
        &b1,
        "double",
        &by_c,
        "issued by inst-c",
        "issued by another institution",
    );

    // 12. A revoked middle delegation: B hands T to C, then revokes that block. C is refused
    // within 5 s; B's own token still works.
    let to_c = ok(&[
        "cap",
        "delegate",
        &t,
        "--issuer-key",
        p(&b_key),
        "--to",
        "institution:inst-c",
        "--node",
        p(&b1),
    ]);
    let (success, out) = run_on_a1(&c1, "double", "5", &["--capability", &to_c]);
    assert!(success && out.trim() == "10", "{out}");
    ok(&[
        "cap",
        "revoke",
        &to_c,
        "--issuer-key",
        p(&b_key),
        "--node",
        p(&b1),
    ]);
    let revoked_at = Instant::now();
    wait_until(
        "the middle revocation to reach a1",
        Duration::from_secs(5),
        || {
            let (success, out) = run_on_a1(&c1, "double", "5", &["--capability", &to_c]);
            !success && out.contains("revoked") && out.contains("by inst-b")
        },
    );
    let middle_latency = revoked_at.elapsed();
    let (success, out) = run_on_a1(&b1, "double", "6", &[]);
    assert!(success && out.trim() == "12", "{out}");

    // 13. A revoked root grant: A revokes T; b1's next task is refused, whoever presents it.
    ok(&[
        "cap",
        "revoke",
        &t,
        "--issuer-key",
        p(&a_key),
        "--reason",
        "the collaboration ended",
        "--node",
        p(&a1),
    ]);
    let revoked_at = Instant::now();
    wait_until(
        "the root revocation to reach a1",
        Duration::from_secs(5),
        || {
            let (success, out) = run_on_a1(&b1, "double", "7", &["--capability", &t]);
            !success && out.contains("revoked") && out.contains("by inst-a")
        },
    );
    let root_latency = revoked_at.elapsed();
    refused_with(
        &b1,
        "double",
        &t2,
        "revoked",
        "derived from a revoked grant",
    );
    let listed = ok(&["cap", "list", "--node", p(&b1)]);
    assert!(listed.contains("revoked"), "{listed}");
    eprintln!(
        "revocation reached the endpoint in {middle_latency:?} (middle), {root_latency:?} (root)"
    );

    // The endpoint kept serving through all of it.
    let (success, out) = run_on_a1(&a1, "double", "50", &[]);
    assert!(success && out.trim() == "100", "{out}");
    let fresh = grant(&net, &["--ttl", "1h"]);
    let (success, out) = run_on_a1(&b1, "triple", "3", &["--capability", &fresh]);
    assert!(success && out.trim() == "9", "{out}");
}
