//! What checking a capability token costs an endpoint per task: first time (parse, every
//! signature, the holder set, the request's Datalog) and cached (the verifier's token and
//! decision caches, plus the revocation check every request makes). One JSON line per token.
//!
//! `cargo run --release -p capability --example bench_verify` (`N` iterations per round,
//! default 300; `ROUNDS`, default 7; the median of the rounds' medians is reported).

use std::time::Instant;

use capability::{Ability, Audience, Delegation, Directory, Grant, Key, Request, Verifier};

fn key(seed: u8) -> ([u8; 32], Key) {
    let s = [seed; 32];
    (
        s,
        Key(ed25519_dalek::SigningKey::from_bytes(&s)
            .verifying_key()
            .to_bytes()),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn per_op(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let (a_seed, a) = key(1);
    let (b_seed, b) = key(2);
    let (c_seed, c) = key(3);
    // 100 admitted institutions and 1000 revocations of other tokens, so lookups are not free.
    let mut institutions: Vec<(Key, String)> = vec![
        (a, "inst-a".into()),
        (b, "inst-b".into()),
        (c, "inst-c".into()),
    ];
    for i in 10..107u8 {
        institutions.push((key(i).1, format!("inst-{i}")));
    }
    let revocations: Vec<(String, Key)> = (0..1000u32)
        .map(|i| (format!("{:0128x}", u128::from(i)), a))
        .collect();
    let dir = Directory::new(institutions, revocations);
    let now = 1_900_000_000;
    let grant = capability::grant(
        &a_seed,
        &Grant {
            paths: vec![],
            to: b,
            endpoint: "ep".into(),
            functions: vec!["f1".into(), "f2".into()],
            abilities: vec![Ability::ComputeRun],
            expires: now + 3600,
            not_before: None,
        },
    )
    .expect("grant");
    let delegate = |t: &[u8], seed: &[u8; 32], to: Audience| {
        capability::delegate(
            t,
            seed,
            &Delegation {
                paths: vec![],
                to,
                functions: vec![],
                expires: None,
            },
        )
        .expect("delegate")
    };
    let ab_node = delegate(&grant, &b_seed, Audience::Node("peerB1".into()));
    let abc = delegate(&grant, &b_seed, Audience::Institution(c));
    let abc_node = delegate(&abc, &c_seed, Audience::Node("peerC1".into()));
    // The most blocks a verifier accepts: seven delegations, alternating between B and C.
    let mut longest = grant.clone();
    for i in 0..7 {
        let (seed, to) = if i % 2 == 0 {
            (&b_seed, c)
        } else {
            (&c_seed, b)
        };
        longest = delegate(&longest, seed, Audience::Institution(to));
    }
    let cases = [
        ("A->B", &grant, "peerB1", b),
        ("A->B->node", &ab_node, "peerB1", b),
        ("A->B->C->node", &abc_node, "peerC1", c),
        ("A->B->C->...(8 blocks)", &longest, "peerC1", c),
    ];
    for (name, token, peer, inst) in cases {
        let req = Request {
            peer: peer.into(),
            institution: inst,
            time: now,
            endpoint: "ep".into(),
            function: Some("f1".into()),
            ability: Ability::ComputeRun,
            path: None,
        };
        let v = capability::verify(token, &dir, &a).expect("verifies");
        capability::authorize(&v, &dir, &req).expect("allowed");
        let mut verify = Vec::new();
        let mut datalog = Vec::new();
        let mut uncached = Vec::new();
        let mut cached = Vec::new();
        for _ in 0..rounds {
            verify.push(per_op(n, || {
                capability::verify(token, &dir, &a).expect("verifies");
            }));
            datalog.push(per_op(n, || {
                capability::authorize(&v, &dir, &req).expect("allowed");
            }));
            uncached.push(per_op(n, || {
                // A fresh verifier each time: nothing cached.
                Verifier::new()
                    .check(token, &dir, &a, &req)
                    .expect("allowed");
            }));
            let warm = Verifier::new();
            warm.check(token, &dir, &a, &req).expect("allowed");
            cached.push(per_op(n * 20, || {
                warm.check(token, &dir, &a, &req).expect("allowed");
            }));
        }
        println!(
            "{{\"token\":\"{name}\",\"bytes\":{},\"blocks\":{},\"verify_us\":{:.1},\"authorize_us\":{:.1},\"uncached_us\":{:.1},\"cached_us\":{:.2},\"n\":{n},\"rounds\":{rounds}}}",
            token.len(),
            capability::inspect(token).expect("inspect").blocks.len(),
            median(verify),
            median(datalog),
            median(uncached),
            median(cached),
        );
    }
}
