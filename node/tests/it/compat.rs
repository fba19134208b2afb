//! The Globus Compute–compatible API over HTTP, as the SDK calls it (the SDK itself drives it in
//! sdk/python/tests/test_globus_compute.py): auth, the routes' shapes, the refusals, a task whose
//! worker lacks the SDK failing with that reason, and any funcmesh task readable through it.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{Net, ok, p, wait_until};

/// One HTTP/1.1 exchange: the status and the JSON body.
fn call(
    addr: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, rest) = out.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    // Chunked or not, the JSON is the part between the first '{' or '[' and the last '}' or ']'.
    let start = rest.find(['{', '[']).unwrap_or(0);
    let end = rest.rfind(['}', ']']).map_or(rest.len(), |i| i + 1);
    let json = serde_json::from_str(&rest[start..end]).unwrap_or(Value::Null);
    (status, json)
}

fn dashed(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Restarts `name` with the API on, on a free port; returns its address and token.
fn serve_globus_compute(net: &Net, name: &str) -> (String, String) {
    let dir = net.node(name);
    net.kill(name);
    let config = dir.join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    // The node writes every setting: switch the API on, on a free port.
    let off = "globus_compute = false\nlisten = \"127.0.0.1:5000\"\n";
    assert!(text.contains(off), "{text}");
    text = text.replace(off, "globus_compute = true\nlisten = \"127.0.0.1:0\"\n");
    std::fs::write(&config, text).unwrap();
    net.restart(name);
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("globus-compute.json")).unwrap())
            .unwrap();
    let addr = creds["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    (addr, creds["token"].as_str().unwrap().to_owned())
}

fn wait_task(addr: &str, auth: &str, task: &str) -> Value {
    let mut doc = Value::Null;
    wait_until("the task to finish", Duration::from_secs(60), || {
        let (status, d) = call(addr, "GET", &format!("/v2/tasks/{task}"), Some(auth), None);
        assert_eq!(status, 200, "{d}");
        doc = d;
        doc["status"] == "success" || doc["status"] == "failed"
    });
    doc
}

fn register_double(node: &Path, dir: &Path) -> String {
    let src = dir.join("double.py");
    std::fs::write(&src, "def double(x):\n    return 2 * x\n").unwrap();
    ok(&[
        "function",
        "register",
        "--name",
        "double",
        "--python",
        p(&src),
        "--entrypoint",
        "double",
        "--node",
        p(node),
    ])
}

#[test]
fn the_globus_compute_api_answers_as_the_sdk_expects_and_refuses_what_it_cannot_take() {
    let net = Net::up("1", "1", &[]);
    let a1 = net.node("a1");
    let (addr, token) = serve_globus_compute(&net, "a1");
    let bearer = format!("Bearer {token}");
    let auth = Some(bearer.as_str());

    // Globus Auth's client-credentials grant: the secret is the API's token.
    use base64::Engine as _;
    let basic = |secret: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("funcmesh:{secret}"))
        )
    };
    let form = "grant_type=client_credentials&scope=https%3A%2F%2Fauth.globus.org%2Fscopes%2F\
                facd7ccc-c5f4-42aa-916b-a0e270e2c2a9%2Fall";
    let (status, _) = call(
        &addr,
        "POST",
        "/v2/oauth2/token",
        Some(&basic("wrong")),
        Some(form),
    );
    assert_eq!(status, 401);
    let (status, t) = call(
        &addr,
        "POST",
        "/v2/oauth2/token",
        Some(&basic(&token)),
        Some(form),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["resource_server"], "funcx_service");
    assert_eq!(t["other_tokens"], json!([]));
    assert!(t["expires_in"].as_u64().unwrap() > 3600);
    assert!(t.get("id_token").is_none());
    let issued = format!("Bearer {}", t["access_token"].as_str().unwrap());
    // SDK 2.x asks for Globus Auth's own scope too: a second token; an unknown scope is refused.
    let (status, t) = call(
        &addr,
        "POST",
        "/v2/oauth2/token",
        Some(&basic(&token)),
        Some(&format!("{form}+openid")),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["resource_server"], "funcx_service");
    assert_eq!(
        t["other_tokens"][0]["resource_server"], "auth.globus.org",
        "{t}"
    );
    let (status, _) = call(
        &addr,
        "POST",
        "/v2/oauth2/token",
        Some(&basic(&token)),
        Some("grant_type=client_credentials&scope=urn:other:thing"),
    );
    assert_eq!(status, 400);

    // Every other route wants the bearer token.
    let (status, e) = call(&addr, "GET", "/v2/version", None, None);
    assert_eq!(status, 401, "{e}");
    assert!(e["message"].as_str().unwrap().contains("compat env"), "{e}");
    let (status, v) = call(&addr, "GET", "/v2/version?service=all", Some(&issued), None);
    assert_eq!(status, 200);
    assert!(v["min_sdk_version"].is_string() && v["min_ep_version"].is_string());

    // A function as source text (`serialized: false`), and a function_code that is not one.
    let (status, f) = call(
        &addr,
        "POST",
        "/v3/functions",
        auth,
        Some(
            &json!({"function_name": "add", "function_code": "def add(a, b):\n    return a + b\n",
                    "serialized": false, "meta": {}})
            .to_string(),
        ),
    );
    assert_eq!(status, 200, "{f}");
    let fid = f["function_uuid"].as_str().unwrap().to_owned();
    assert_eq!(fid.len(), 36, "{fid}");
    let (status, got) = call(&addr, "GET", &format!("/v2/functions/{fid}"), auth, None);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["function_name"], "add");
    assert!(
        got["function_code"]
            .as_str()
            .unwrap()
            .starts_with("39\nst\nadd:def add"),
        "{got}"
    );
    let (status, e) = call(
        &addr,
        "POST",
        "/v3/functions",
        auth,
        Some(&json!({"function_name": "x", "function_code": "not packed"}).to_string()),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["code"], "BAD_REQUEST");
    assert!(
        e["message"].as_str().unwrap().contains("function_code"),
        "{e}"
    );

    // The endpoint, by its funcmesh id as a UUID, online once its node advertises it.
    let (status, eps) = call(&addr, "GET", "/v2/endpoints", auth, None);
    assert_eq!(status, 200);
    let ep = eps[0]["uuid"].as_str().unwrap().to_owned();
    wait_until("the endpoint to be online", Duration::from_secs(30), || {
        let (_, s) = call(
            &addr,
            "GET",
            &format!("/v2/endpoints/{ep}/status"),
            auth,
            None,
        );
        s["status"] == "online"
    });

    // Refusals: no broker for an Executor, a payload that is not two buffers, unknown ids.
    let payload = "6\n00\nabc6\n00\ndef";
    let submit = |ep: &str, body: Value| {
        call(
            &addr,
            "POST",
            &format!("/v3/endpoints/{ep}/submit"),
            auth,
            Some(&body.to_string()),
        )
    };
    let (status, e) = submit(
        &ep,
        json!({"tasks": {&fid: [payload]}, "create_queue": true}),
    );
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("AMQP_NOT_CONFIGURED"))
    );
    let (status, e) = call(
        &addr,
        "GET",
        "/v2/get_amqp_result_connection_url",
        auth,
        None,
    );
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("AMQP_NOT_CONFIGURED"))
    );
    let (status, e) = submit(&ep, json!({"tasks": {&fid: ["6\n00\nabc"]}}));
    assert_eq!(status, 400, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("packed buffers"),
        "{e}"
    );
    let nobody = "00000000-0000-0000-0000-000000000000";
    let (status, _) = submit(&ep, json!({"tasks": {nobody: [payload]}}));
    assert_eq!(status, 404);
    let (status, _) = submit(nobody, json!({"tasks": {&fid: [payload]}}));
    assert_eq!(status, 404);
    let (status, _) = call(&addr, "GET", &format!("/v2/tasks/{nobody}"), auth, None);
    assert_eq!(status, 404);
    let (status, _) = call(&addr, "GET", "/v2/tasks/not-a-uuid", auth, None);
    assert_eq!(status, 400);

    // A task: accepted with ids keyed as sent. This worker's Python has no globus-compute-sdk,
    // and the failure says so.
    let (status, r) = submit(
        &ep,
        json!({"tasks": {&fid: [payload]}, "create_queue": false}),
    );
    assert_eq!(status, 200, "{r}");
    let tid = r["tasks"][&fid][0].as_str().unwrap().to_owned();
    let group = r["task_group_id"].as_str().unwrap().to_owned();
    assert_eq!(r["endpoint_id"], ep);
    let doc = wait_task(&addr, &bearer, &tid);
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["task_id"], tid);
    let exception = doc["exception"].as_str().unwrap();
    assert!(
        exception.contains("pip install globus-compute-sdk"),
        "{exception}"
    );
    assert!(doc["completion_t"].is_string());
    let (status, g) = call(&addr, "GET", &format!("/v2/taskgroup/{group}"), auth, None);
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["taskgroup_id"], group);
    assert_eq!(g["tasks"][0]["id"], tid);

    // Any funcmesh task reads through the API: a JSON value in the SDK's JSON strategy.
    let dir = tempfile::tempdir().unwrap();
    register_double(&a1, dir.path());
    let native = ok(&["run", "double", "21", "--node", p(&a1)]);
    ok(&["task", "wait", &native, "--node", p(&a1)]);
    let native = dashed(&native);
    let doc = wait_task(&addr, &bearer, &native);
    assert_eq!(doc["result"], "11\n42", "{doc}");
    let (status, b) = call(
        &addr,
        "POST",
        "/v2/batch_status",
        auth,
        Some(&json!({"task_ids": [&native, &tid, nobody]}).to_string()),
    );
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["response"], "batch");
    assert_eq!(b["results"][&native]["status"], "success");
    assert_eq!(b["results"][&tid]["status"], "failed");
    assert!(b["results"].get(nobody).is_none(), "{b}");

    // Deleting a function.
    let (status, _) = call(&addr, "DELETE", &format!("/v2/functions/{fid}"), auth, None);
    assert_eq!(status, 200);
    wait_until("the function to be gone", Duration::from_secs(10), || {
        call(&addr, "GET", &format!("/v2/functions/{fid}"), auth, None).0 == 404
    });

    // The token outlives a restart (the SDK keeps the one it was given).
    net.kill("a1");
    net.restart("a1");
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(a1.join("globus-compute.json")).unwrap())
            .unwrap();
    assert_eq!(creds["token"], token.as_str());
}
