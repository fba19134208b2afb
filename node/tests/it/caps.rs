//! Capability tokens against real endpoints, through the CLI on a multi-process testnet of three
//! institutions: A's admin grants, B's admin delegates, nodes present tokens, A's endpoint
//! decides. Every refusal must reach the submitter with its reason, and the endpoint must keep
//! serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::{Net, funcmesh, ok, p, wait_until};

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
        paths: vec![],
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

/// A testnet of three institutions with `double` and `triple` registered on a1 and visible
/// everywhere, a1's endpoint routable, and `t`: inst-a's grant to inst-b of `double` on a1.
struct Case {
    net: Net,
    a1: PathBuf,
    b1: PathBuf,
    c1: PathBuf,
    t: String,
}

impl Case {
    fn up() -> Case {
        let net = Net::up("3", "1", &[]);
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
        // a1's registry knows the other institutions (names resolve there).
        wait_until(
            "a1 to know inst-b and inst-c",
            Duration::from_secs(20),
            || {
                ["inst-b", "inst-c"].iter().all(|i| {
                    let to = format!("institution:{i}");
                    let key = net.key("inst-a");
                    funcmesh(&[
                        "cap",
                        "grant",
                        "--issuer-key",
                        p(&key),
                        "--to",
                        &to,
                        "--endpoint",
                        "a1",
                        "--ttl",
                        "1m",
                        "--node",
                        p(&a1),
                    ])
                    .status
                    .success()
                })
            },
        );
        let t = grant(&net, &["--function", "double", "--ttl", "1h"]);
        Case { net, a1, b1, c1, t }
    }

    /// The endpoint still serves: a1's own task and b1's with the grant.
    fn still_serving(&self) {
        let (success, out) = run_on_a1(&self.a1, "double", "50", &[]);
        assert!(success && out.trim() == "100", "{out}");
        let (success, out) = run_on_a1(&self.b1, "double", "3", &["--capability", &self.t]);
        assert!(success && out.trim() == "6", "{out}");
    }

    fn key(&self, institution: &str) -> PathBuf {
        self.net.key(institution)
    }

    /// `cap delegate TOKEN --issuer-key <by>.key --to TO [EXTRA...]`, resolving names on b1.
    fn delegate(&self, token: &str, by: &str, to: &str, extra: &[&str]) -> std::process::Output {
        let key = self.key(by);
        let mut args = vec![
            "cap",
            "delegate",
            token,
            "--issuer-key",
            p(&key),
            "--to",
            to,
            "--node",
            p(&self.b1),
        ];
        args.extend_from_slice(extra);
        funcmesh(&args)
    }

    fn delegated(&self, token: &str, by: &str, to: &str) -> String {
        let out = self.delegate(token, by, to, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

#[test]
fn a_direct_grant_is_held_by_the_grantees_node_and_attached_by_its_router() {
    let c = Case::up();
    // No token: the router on b1 does not offer A's endpoint, and says why.
    let (success, out) = run_on_a1(&c.b1, "double", "21", &[]);
    assert!(!success);
    assert!(out.contains("capability token"), "{out}");
    let inspected = ok(&["cap", "inspect", &c.t, "--node", p(&c.b1)]);
    assert!(
        inspected.contains("the issuer granted to institution inst-b")
            && inspected.contains("functions"),
        "{inspected}"
    );
    ok(&["cap", "add", &c.t, "--node", p(&c.b1)]);
    let listed = ok(&["cap", "list", "--node", p(&c.b1)]);
    assert!(listed.contains("status    usable"), "{listed}");
    let (success, out) = run_on_a1(&c.b1, "double", "21", &[]);
    assert!(success && out.trim() == "42", "{out}");
    // Removed from b1 (not revoked): b1's router stops offering the endpoint.
    let held: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&["cap", "list", "--node", p(&c.b1), "--json"])).unwrap();
    let id = held[0]["id"].as_str().unwrap();
    let out = funcmesh(&["cap", "remove", "00000000", "--node", p(&c.b1)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&["cap", "remove", id, "--node", p(&c.b1)]);
    assert!(ok(&["cap", "list", "--node", p(&c.b1)]).contains("holds no capability token"));
    let (success, out) = run_on_a1(&c.b1, "double", "21", &[]);
    assert!(!success && out.contains("capability token"), "{out}");
}

#[test]
fn a_two_hop_delegation_to_one_of_the_grantees_nodes_works() {
    let c = Case::up();
    let to_b1 = format!("node:{}", c.net.peer("b1"));
    let t2 = c.delegated(&c.t, "inst-b", &to_b1);
    let (success, out) = run_on_a1(&c.b1, "double", "4", &["--capability", &t2]);
    assert!(success && out.trim() == "8", "{out}");
}

#[test]
fn an_attempt_to_widen_a_delegation_is_refused() {
    let c = Case::up();
    let b_key = c.key("inst-b");
    let out = c.delegate(
        &c.t,
        "inst-b",
        "institution:inst-c",
        &["--function", "triple"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot widen"), "{err}");
    // Made by hand, the wider block grants nothing.
    let triple: serde_json::Value = serde_json::from_str(&ok(&[
        "function",
        "show",
        "triple",
        "--node",
        p(&c.b1),
        "--json",
    ]))
    .unwrap();
    let c_public = node::capabilities::institution_key(&c.key("inst-c"))
        .unwrap()
        .2;
    let (_, b_seed, _) = node::capabilities::institution_key(&b_key).unwrap();
    let wider = capability::to_text(
        &capability::delegate_unchecked(
            &capability::from_text(&c.t).unwrap(),
            &b_seed,
            &capability::Delegation {
                paths: vec![],
                to: capability::Audience::Institution(c_public),
                functions: vec![triple["id"].as_str().unwrap().to_owned()],
                expires: None,
            },
        )
        .unwrap(),
    );
    refused_with(&c.c1, "triple", &wider, "not covered", "widened delegation");
    c.still_serving();
}

#[test]
fn an_expired_grant_is_refused_as_expired() {
    let c = Case::up();
    let expired = grant(&c.net, &["--expires", "2020-01-01"]);
    refused_with(&c.b1, "double", &expired, "expired", "expired");
    c.still_serving();
}

#[test]
fn a_grant_used_before_its_start_is_not_yet_valid() {
    let c = Case::up();
    let later = grant(
        &c.net,
        &["--not-before", "2099-01-01", "--expires", "2099-12-31"],
    );
    refused_with(&c.b1, "double", &later, "not yet valid", "not yet valid");
    c.still_serving();
}

#[test]
fn a_token_stolen_by_another_institutions_node_is_the_wrong_audience() {
    let c = Case::up();
    refused_with(&c.c1, "double", &c.t, "wrong audience", "stolen token");
    refused_with(
        &c.c1,
        "double",
        &c.t,
        "wrong audience",
        "stolen token, again",
    );
    // The endpoint logged the refusal once.
    let log = std::fs::read_to_string(c.a1.join("node.log")).unwrap();
    let logged = log
        .lines()
        .filter(|l| l.contains("refused a capability token") && l.contains("wrong audience"))
        .count();
    assert_eq!(logged, 1, "{log}");
    c.still_serving();
}

#[test]
fn a_function_outside_the_grant_is_not_covered() {
    let c = Case::up();
    refused_with(&c.b1, "triple", &c.t, "not covered", "function not covered");
    c.still_serving();
}

#[test]
fn a_grant_for_another_endpoint_is_not_covered() {
    let c = Case::up();
    // Offline (no --node): the endpoint is taken as given, the audience by key.
    let b_public = format!(
        "institution:{}",
        node::capabilities::institution_key(&c.key("inst-b"))
            .unwrap()
            .2
    );
    let elsewhere = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&c.key("inst-a")),
        "--to",
        &b_public,
        "--endpoint",
        "an-endpoint-that-is-not-a1",
        "--ttl",
        "1h",
    ]);
    refused_with(
        &c.b1,
        "double",
        &elsewhere,
        "not covered",
        "another endpoint",
    );
    c.still_serving();
}

#[test]
fn a_revoked_grant_is_refused_within_five_seconds_with_everything_derived_from_it() {
    let c = Case::up();
    ok(&["cap", "add", &c.t, "--node", p(&c.b1)]);
    let to_b1 = format!("node:{}", c.net.peer("b1"));
    let t2 = c.delegated(&c.t, "inst-b", &to_b1);
    ok(&[
        "cap",
        "revoke",
        &c.t,
        "--issuer-key",
        p(&c.key("inst-a")),
        "--reason",
        "the collaboration ended",
        "--node",
        p(&c.a1),
    ]);
    let revoked_at = Instant::now();
    wait_until("the revocation to reach a1", Duration::from_secs(5), || {
        let (success, out) = run_on_a1(&c.b1, "double", "7", &["--capability", &c.t]);
        !success && out.contains("revoked") && out.contains("by inst-a")
    });
    eprintln!(
        "the revocation reached the endpoint in {:?}",
        revoked_at.elapsed()
    );
    refused_with(
        &c.b1,
        "double",
        &t2,
        "revoked",
        "derived from a revoked grant",
    );
    // b1's own directory learns of it on its next refresh (every 250 ms), which may come after
    // a1's: then b1 lists the token as revoked, and its router stops offering the endpoint with
    // it, and says why.
    wait_until(
        "b1 to list its token as revoked",
        Duration::from_secs(5),
        || ok(&["cap", "list", "--node", p(&c.b1)]).contains("revoked"),
    );
    let (success, out) = run_on_a1(&c.b1, "double", "7", &[]);
    assert!(!success && out.contains("revoked"), "{out}");
    let (success, out) = run_on_a1(&c.a1, "double", "50", &[]);
    assert!(success && out.trim() == "100", "{out}");
}

#[test]
fn a_revoked_middle_delegation_refuses_its_holder_and_keeps_the_parent() {
    let c = Case::up();
    let b_key = c.key("inst-b");
    let to_c = c.delegated(&c.t, "inst-b", "institution:inst-c");
    let (success, out) = run_on_a1(&c.c1, "double", "5", &["--capability", &to_c]);
    assert!(success && out.trim() == "10", "{out}");
    ok(&[
        "cap",
        "revoke",
        &to_c,
        "--issuer-key",
        p(&b_key),
        "--node",
        p(&c.b1),
    ]);
    let revoked_at = Instant::now();
    wait_until("the revocation to reach a1", Duration::from_secs(5), || {
        let (success, out) = run_on_a1(&c.c1, "double", "5", &["--capability", &to_c]);
        !success && out.contains("revoked") && out.contains("by inst-b")
    });
    eprintln!(
        "the revocation reached the endpoint in {:?}",
        revoked_at.elapsed()
    );
    c.still_serving();
}

#[test]
fn a_forged_signature_is_refused() {
    let c = Case::up();
    let forged = forged(&c.t, &c.key("inst-a"));
    refused_with(&c.b1, "double", &forged, "invalid signature", "forged");
    c.still_serving();
}

#[test]
fn a_truncated_token_is_malformed() {
    let c = Case::up();
    let truncated = {
        let bytes = capability::from_text(&c.t).unwrap();
        capability::to_text(&bytes[..bytes.len() / 2])
    };
    refused_with(&c.b1, "double", &truncated, "malformed", "truncated");
    c.still_serving();
}

#[test]
fn a_token_rooted_outside_the_endpoints_institution_is_refused() {
    let c = Case::up();
    let endpoint_id = capability::inspect(&capability::from_text(&c.t).unwrap())
        .unwrap()
        .endpoint()
        .unwrap()
        .to_owned();
    let b = node::capabilities::institution_key(&c.key("inst-b"))
        .unwrap()
        .2;
    // A key the federation never admitted.
    let outsider = capability::to_text(
        &capability::grant(
            &[7u8; 32],
            &capability::Grant {
                paths: vec![],
                to: b,
                endpoint: endpoint_id,
                functions: vec![],
                abilities: vec![],
                expires: 4_000_000_000,
                not_before: None,
            },
        )
        .unwrap(),
    );
    refused_with(
        &c.b1,
        "double",
        &outsider,
        "root not an admitted institution",
        "non-admitted root",
    );
    // An admitted institution granting what it does not run.
    let by_c = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&c.key("inst-c")),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--ttl",
        "1h",
        "--node",
        p(&c.a1),
    ]);
    // a1's verifier names the issuer once its directory (refreshed from the registry every
    // 250 ms) lists inst-c; until then it can only say the root is unknown.
    wait_until("a1 to name the issuer", Duration::from_secs(5), || {
        let (success, out) = run_on_a1(&c.b1, "double", "1", &["--capability", &by_c]);
        assert!(!success && out.contains("capability refused"), "{out}");
        out.contains("issued by inst-c")
    });
    c.still_serving();
}
