//! Transfers through the CLI on a multi-process testnet of two institutions: B copies from A's
//! data root under a path-limited grant; outside the path, or without a grant, it is refused;
//! a copy survives a `kill -9` of its source.

use std::path::Path;
use std::time::Duration;

use crate::cli::{Net, funcmesh, ok, p, wait_until};

fn out_of(args: &[&str]) -> (bool, String) {
    let out = funcmesh(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn job(b1: &Path, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&["transfer", "status", id, "--node", p(b1), "--json"])).unwrap()
}

fn fill(dir: &Path, files: usize) {
    for i in 0..files {
        let sub = dir.join(format!("s{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        let body: Vec<u8> = (0..(i * 997 % 70_000))
            .map(|j| (j * 31 + i) as u8)
            .collect();
        std::fs::write(sub.join(format!("f{i}.dat")), body).unwrap();
    }
}

#[test]
fn a_path_limited_grant_lets_another_institution_copy_that_path_and_nothing_else() {
    let net = Net::up("2", "2", &[]);
    let (a1, b1, b2) = (net.node("a1"), net.node("b1"), net.node("b2"));
    let shared = a1.join("data/shared");
    fill(&shared, 60);
    std::fs::create_dir_all(a1.join("data/private")).unwrap();
    std::fs::write(a1.join("data/private/secret"), b"inst-a only").unwrap();
    net.wait_endpoints(&b1, 4);

    // No token yet: A's endpoint (institution-and-capability) refuses B, and says how to get one.
    let (success, out) = out_of(&["transfer", "ls", "a1:shared", "--node", p(&b1)]);
    assert!(!success, "{out}");
    assert!(out.contains("cap grant --ability transfer.read"), "{out}");

    // A grants B reading below `shared` only; B's node holds it.
    let key = net.key("inst-a");
    let token = ok(&[
        "cap",
        "grant",
        "--issuer-key",
        p(&key),
        "--to",
        "institution:inst-b",
        "--endpoint",
        "a1",
        "--ability",
        "transfer.read",
        "--path",
        "shared",
        "--ttl",
        "1h",
        "--node",
        p(&a1),
    ]);
    ok(&["cap", "add", token.trim(), "--node", p(&b1)]);
    ok(&["cap", "add", token.trim(), "--node", p(&b2)]);

    // b1's verifier knows inst-a once the registry reached it.
    wait_until("b1 may list a1:shared", Duration::from_secs(20), || {
        funcmesh(&["transfer", "ls", "a1:shared", "--node", p(&b1)])
            .status
            .success()
    });
    let listed = ok(&["transfer", "ls", "a1:shared", "--node", p(&b1), "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 4, "{listed:?}");

    // The copy: b1 pulls from a1 into its own data root, verified.
    ok(&[
        "transfer",
        "copy",
        "a1:shared",
        "b1:incoming",
        "--recursive",
        "--id",
        "copy-1",
        "--node",
        p(&b1),
    ]);
    let j = job(&b1, "copy-1");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["progress"]["files_done"], 60, "{j}");
    for i in 0..60 {
        let rel = format!("s{}/f{i}.dat", i % 4);
        assert_eq!(
            std::fs::read(shared.join(&rel)).unwrap(),
            std::fs::read(b1.join("data/incoming").join(&rel)).unwrap(),
            "{rel}"
        );
    }
    // Again with --sync checksum: nothing moves.
    ok(&[
        "transfer",
        "copy",
        "a1:shared",
        "b1:incoming",
        "--recursive",
        "--sync",
        "checksum",
        "--id",
        "copy-2",
        "--node",
        p(&b1),
    ]);
    let j = job(&b1, "copy-2");
    assert_eq!(j["progress"]["files_skipped"], 60, "{j}");
    assert_eq!(j["progress"]["bytes_received"], 0, "{j}");

    // A third-party copy: b2 asks b1 to pull from a1; b1 runs it (b2 only orchestrates, and
    // follows it from b2), after checking that b2 may write at b1 and read a1:shared.
    ok(&[
        "transfer",
        "copy",
        "a1:shared/s1",
        "b1:third",
        "--recursive",
        "--id",
        "copy-b2",
        "--node",
        p(&b2),
    ]);
    let j = job(&b2, "copy-b2");
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["spec"]["requester"], net.peer("b2"), "{j}");
    assert_eq!(j["progress"]["files_done"], 15, "{j}");
    assert_eq!(
        std::fs::read(shared.join("s1/f1.dat")).unwrap(),
        std::fs::read(b1.join("data/third/f1.dat")).unwrap()
    );
    // b1 runs it: it is in b1's list, and no data went through b2.
    assert!(ok(&["transfer", "status", "--node", p(&b1)]).contains("copy-b2"));
    assert!(!b2.join("data/third").exists());
    // b2 cannot have b1 pull what b2 itself may not read.
    let (success, out) = out_of(&[
        "transfer",
        "copy",
        "a1:private",
        "b1:leak",
        "--recursive",
        "--id",
        "copy-b2-leak",
        "--node",
        p(&b2),
    ]);
    assert!(!success && out.contains("refused"), "{out}");
    assert!(!b1.join("data/leak").exists());

    // Outside the granted path: refused by a1, with the reason.
    let (success, out) = out_of(&["transfer", "ls", "a1:private", "--node", p(&b1)]);
    assert!(!success, "{out}");
    assert!(out.contains("refused") && out.contains("under"), "{out}");
    let (success, out) = out_of(&[
        "transfer",
        "copy",
        "a1:private/secret",
        "b1:stolen",
        "--id",
        "copy-3",
        "--node",
        p(&b1),
    ]);
    assert!(!success, "{out}");
    assert!(out.contains("refused") && out.contains("under"), "{out}");
    assert!(!b1.join("data/stolen").exists());
    // Reading was granted, writing was not.
    let (success, out) = out_of(&["transfer", "mkdir", "a1:shared/new", "--node", p(&b1)]);
    assert!(!success, "{out}");
    assert!(!shared.join("new").exists());
    // A blob larger than the API's body limit: put on a1 and a2, fetched verified by b1 from both.
    let blob: Vec<u8> = (0..40_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(net.dir.join("blob.in"), &blob).unwrap();
    let put = |node: &Path| {
        ok(&[
            "transfer",
            "put",
            p(&net.dir.join("blob.in")),
            "--node",
            p(node),
        ])
    };
    let hash = put(&a1);
    assert_eq!(hash, put(&net.node("a2")));
    let out = net.dir.join("blob.out");
    // From both holders at once.
    let from = format!("{},{}", net.peer("a1"), net.peer("a2"));
    ok(&[
        "transfer",
        "get",
        hash.trim(),
        "--from",
        &from,
        "--out",
        p(&out),
        "--node",
        p(&b1),
    ]);
    assert!(std::fs::read(&out).unwrap() == blob, "the blob differs");
    // Escapes are refused before anything is opened.
    let (success, out) = out_of(&["transfer", "ls", "a1:shared/../private", "--node", p(&b1)]);
    assert!(!success && out.contains("cannot leave"), "{out}");
}

#[test]
fn a_copy_resumes_after_its_source_is_killed_half_way_and_sends_little_twice() {
    let net = Net::up("1", "2", &[]);
    let a2 = net.node("a2");
    let body = copy_half_way(&net, "big-1");
    let size = body.len();
    net.kill("a1");
    // Losing its source does not end the job: it waits for it.
    assert_eq!(job(&a2, "big-1")["state"], "active");
    net.restart("a1");
    wait_until("the copy finishes", Duration::from_secs(180), || {
        job(&a2, "big-1")["state"] != "active"
    });
    let j = job(&a2, "big-1");
    assert_eq!(j["state"], "succeeded", "{j}");
    let got = std::fs::read(a2.join("data/big")).unwrap();
    assert!(got == body, "the copy differs from the source");
    let twice = j["progress"]["bytes_received"].as_u64().unwrap() - size as u64;
    assert!(
        twice < size as u64 / 10,
        "{twice} of {size} bytes sent twice: {j}"
    );
}

#[test]
fn a_copy_resumes_after_its_destination_is_killed_half_way() {
    let net = Net::up("1", "2", &[]);
    let a2 = net.node("a2");
    let body = copy_half_way(&net, "dst-1");
    // The node running the copy dies; its part file and the job's record stay on disk.
    net.kill("a2");
    let parts: Vec<_> = std::fs::read_dir(a2.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        parts.iter().any(|n| n.starts_with(".funcmesh-part.")),
        "{parts:?}"
    );
    net.restart("a2");
    wait_until(
        "the copy finishes after the restart",
        Duration::from_secs(180),
        || job(&a2, "dst-1")["state"] != "active",
    );
    let j = job(&a2, "dst-1");
    assert_eq!(j["state"], "succeeded", "{j}");
    // Started once, resumed once.
    assert_eq!(j["runs"], 2, "{j}");
    assert!(
        std::fs::read(a2.join("data/big")).unwrap() == body,
        "the copy differs"
    );
    let left: Vec<_> = std::fs::read_dir(a2.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".funcmesh-part."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Writes a 160 MiB file into a1's data root, starts copying it to a2 as job `id`, and returns
/// its bytes once half of them have arrived (the job still active).
fn copy_half_way(net: &Net, id: &str) -> Vec<u8> {
    let (a1, a2) = (net.node("a1"), net.node("a2"));
    let size: usize = 160 << 20;
    let body: Vec<u8> = (0..size)
        .map(|i| (i as u64).wrapping_mul(2_654_435_761) as u8 ^ (i >> 13) as u8)
        .collect();
    std::fs::write(a1.join("data/big"), &body).unwrap();
    net.wait_endpoints(&a2, 2);
    ok(&[
        "transfer",
        "copy",
        "a1:big",
        "a2:big",
        "--id",
        id,
        "--no-wait",
        "--node",
        p(&a2),
    ]);
    wait_until("half of the file arrived", Duration::from_secs(120), || {
        let j = job(&a2, id);
        assert_eq!(
            j["state"], "active",
            "finished before it could be interrupted: {j}"
        );
        j["progress"]["bytes_received"].as_u64().unwrap() >= size as u64 / 2
    });
    body
}

/// Functions with a large argument and a large result.
const LARGE: &str = "def length(s):\n    return len(s)\n\
def make(n):\n    return 'y' * n\n";

#[test]
fn fifty_mib_arguments_and_results_go_by_reference_between_institutions() {
    const SIZE: usize = 50 << 20;
    let net = Net::up("2", "1", &[]);
    let (a1, b1) = (net.node("a1"), net.node("b1"));
    let src = net.dir.join("large.py");
    std::fs::write(&src, LARGE).unwrap();
    for f in ["length", "make"] {
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
            p(&b1),
        ]);
    }
    // A lets institution B run anything on a1.
    let key = net.key("inst-a");
    let mut token = String::new();
    wait_until("a1 to know inst-b", Duration::from_secs(20), || {
        let out = funcmesh(&[
            "cap",
            "grant",
            "--issuer-key",
            p(&key),
            "--to",
            "institution:inst-b",
            "--endpoint",
            "a1",
            "--ttl",
            "1h",
            "--node",
            p(&a1),
        ]);
        token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        out.status.success()
    });
    ok(&["cap", "add", &token, "--node", p(&b1)]);

    // A 50 MiB argument: uploaded to b1 as a blob, fetched by a1 over the data plane.
    let input = net.dir.join("input.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&serde_json::json!({"args": ["x".repeat(SIZE)]})).unwrap(),
    )
    .unwrap();
    let mut last = String::new();
    wait_until("a1 to run b1's task", Duration::from_secs(30), || {
        let out = funcmesh(&[
            "run",
            "length",
            "--input",
            p(&input),
            "--endpoint",
            "a1",
            "--wait",
            "--node",
            p(&b1),
        ]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success()
    });
    assert_eq!(last.trim(), SIZE.to_string(), "{last}");

    // A 50 MiB result: spilled into a blob on a1, fetched by b1, printed whole.
    let id = ok(&[
        "run",
        "make",
        &SIZE.to_string(),
        "--endpoint",
        "a1",
        "--node",
        p(&b1),
    ]);
    let out = funcmesh(&["task", "wait", &id, "--node", p(&b1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), SIZE + 3, "a JSON string and a newline");
    assert!(out.stdout.starts_with(b"\"yyyy") && out.stdout.ends_with(b"y\"\n"));
    let t: serde_json::Value =
        serde_json::from_str(&ok(&["task", "status", &id, "--node", p(&b1), "--json"])).unwrap();
    let r = &t["outcome"]["value_ref"];
    assert_eq!(r["size"], SIZE as u64 + 2, "{t}");
    // b1 fetched it when the result arrived: it serves it from its own store.
    let hash = r["blake3"].as_str().unwrap();
    wait_until("b1 to hold the result", Duration::from_secs(20), || {
        b1.join("blobs").join(format!("{hash}.data")).exists()
    });
    let saved = net.dir.join("value.json");
    ok(&["task", "value", &id, "--out", p(&saved), "--node", p(&b1)]);
    assert_eq!(std::fs::metadata(&saved).unwrap().len(), SIZE as u64 + 2);
}

#[test]
fn a_share_lets_another_institution_read_one_path_without_a_token_until_it_is_removed() {
    let net = Net::up("2", "1", &[]);
    let (a1, b1) = (net.node("a1"), net.node("b1"));
    std::fs::create_dir_all(a1.join("data/results")).unwrap();
    std::fs::write(a1.join("data/results/r.txt"), b"shared result\n").unwrap();
    std::fs::create_dir_all(a1.join("data/private")).unwrap();
    std::fs::write(a1.join("data/private/secret"), b"inst-a only").unwrap();
    net.wait_endpoints(&b1, 2);
    let (success, out) = out_of(&["transfer", "ls", "a1:results", "--node", p(&b1)]);
    assert!(!success, "{out}");

    // inst-a shares `results` with inst-b, read-only.
    let id = ok(&[
        "transfer",
        "share",
        "a1:results",
        "--to",
        "institution:inst-b",
        "--node",
        p(&a1),
    ]);
    let id = id.trim().to_owned();
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ok(&[
        "transfer",
        "shares",
        "a1",
        "--json",
        "--node",
        p(&a1),
    ]))
    .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0]["id"].as_str(), &listed[0]["path"]),
        (Some(id.as_str()), &"results".into())
    );
    let out = ok(&["transfer", "ls", "a1:results", "--node", p(&b1)]);
    assert!(out.contains("r.txt"), "{out}");
    ok(&[
        "transfer",
        "copy",
        "a1:results",
        "b1:got",
        "--recursive",
        "--node",
        p(&b1),
    ]);
    assert_eq!(
        std::fs::read(b1.join("data/got/r.txt")).unwrap(),
        b"shared result\n"
    );
    // Nothing else, no writing, and no managing a1's shares from inst-b.
    let (success, out) = out_of(&["transfer", "ls", "a1:private", "--node", p(&b1)]);
    assert!(!success, "{out}");
    let (success, out) = out_of(&["transfer", "mkdir", "a1:results/new", "--node", p(&b1)]);
    assert!(!success, "{out}");
    assert!(!a1.join("data/results/new").exists());
    let (success, out) = out_of(&[
        "transfer",
        "share",
        "a1:private",
        "--to",
        "institution:inst-b",
        "--node",
        p(&b1),
    ]);
    assert!(!success && out.contains("only members of inst-a"), "{out}");
    let (success, out) = out_of(&["transfer", "unshare", "a1", &id, "--node", p(&b1)]);
    assert!(!success, "{out}");

    // The share outlives a restart of a1; removed, it no longer lets inst-b in.
    net.kill("a1");
    net.restart("a1");
    wait_until(
        "b1 to read the share again",
        Duration::from_secs(30),
        || {
            funcmesh(&["transfer", "ls", "a1:results", "--node", p(&b1)])
                .status
                .success()
        },
    );
    ok(&["transfer", "unshare", "a1", &id, "--node", p(&a1)]);
    let (success, out) = out_of(&["transfer", "ls", "a1:results", "--node", p(&b1)]);
    assert!(!success, "{out}");
}
