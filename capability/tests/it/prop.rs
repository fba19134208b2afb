//! Whatever blocks are appended, a delegated token never authorises a request its parent would
//! refuse, except for handing it to a new holder, which only a holder can sign.
//!
//! Parent: A's grant to B, then 0–2 operations; child: the parent, then 1–3 more. Operations
//! are plain blocks and blocks signed by any of A, B, C, X (admitted) or Z (not admitted), with
//! statements from an adversarial vocabulary, and real delegations to nodes and institutions.

use std::collections::BTreeSet;

use capability::{Ability, Audience, Delegation, Directory, Key, Request};
use proptest::prelude::*;

use crate::support::{EP, Inst, T0, T1, directory, grant_ab};

#[derive(Debug, Clone)]
enum Op {
    Plain(Vec<usize>),
    Signed(Inst, Vec<usize>),
    ToNode(Inst, &'static str),
    ToInst(Inst, Inst, Vec<&'static str>),
}

fn vocabulary() -> Vec<String> {
    let c = capability::institution_term(&Inst::C.key());
    let x = capability::institution_term(&Inst::X.key());
    let b = capability::institution_term(&Inst::B.key());
    vec![
        format!("audience(\"{c}\");"),
        format!("audience(\"{x}\");"),
        format!("holder(\"{x}\");"),
        format!("peer_institution(\"{x}\");"),
        "time(2000-01-01T00:00:00Z);".into(),
        "function(\"f2\");".into(),
        "endpoint(\"ep-2\");".into(),
        "ability(\"transfer.read\");".into(),
        "peer(\"peerX1\");".into(),
        "holder($i) <- peer_institution($i);".into(),
        "audience($i) <- peer_institution($i);".into(),
        "function(\"f2\") <- function($f);".into(),
        "check if true;".into(),
        "check if peer(\"peerB1\");".into(),
        format!("check if time($t), $t <= {};", rfc3339(T0 + 1800)),
        format!("check if peer_institution(\"{b}\");"),
    ]
}

fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

fn inst() -> impl Strategy<Value = Inst> {
    prop_oneof![
        1 => Just(Inst::A),
        4 => Just(Inst::B),
        3 => Just(Inst::C),
        1 => Just(Inst::X),
        1 => Just(Inst::Z),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let words = proptest::collection::vec(0..16usize, 0..3);
    prop_oneof![
        words.clone().prop_map(Op::Plain),
        (inst(), words).prop_map(|(i, w)| Op::Signed(i, w)),
        (
            inst(),
            prop_oneof![Just("peerB1"), Just("peerC1"), Just("peerX1")]
        )
            .prop_map(|(i, p)| Op::ToNode(i, p)),
        (
            inst(),
            prop_oneof![Just(Inst::B), Just(Inst::C), Just(Inst::X)],
            prop_oneof![Just(vec![]), Just(vec!["f1"]), Just(vec!["f1", "f2"])]
        )
            .prop_map(|(by, to, f)| Op::ToInst(by, to, f)),
    ]
}

fn apply(token: &[u8], op: &Op, vocab: &[String]) -> Vec<u8> {
    let code = |w: &[usize]| w.iter().map(|i| vocab[*i].as_str()).collect::<String>();
    match op {
        Op::Plain(w) => capability::append_plain(token, &code(w)).unwrap(),
        Op::Signed(by, w) => capability::append_signed(token, &by.seed(), &code(w)).unwrap(),
        Op::ToNode(by, peer) => capability::delegate_unchecked(
            token,
            &by.seed(),
            &Delegation {
                paths: vec![],
                to: Audience::Node((*peer).into()),
                functions: vec![],
                expires: None,
            },
        )
        .unwrap(),
        Op::ToInst(by, to, fs) => capability::delegate_unchecked(
            token,
            &by.seed(),
            &Delegation {
                paths: vec![],
                to: Audience::Institution(to.key()),
                functions: fs.iter().map(|f| (*f).to_string()).collect(),
                expires: None,
            },
        )
        .unwrap(),
    }
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![
            4 => Just(("peerB1", Inst::B)),
            1 => Just(("peerB2", Inst::B)),
            4 => Just(("peerC1", Inst::C)),
            1 => Just(("peerX1", Inst::X)),
            1 => Just(("peerB1", Inst::X)),
        ],
        prop_oneof![1 => Just(T0 - 10), 6 => Just(T0 + 100), 2 => Just(T0 + 2000), 1 => Just(T1 + 10)],
        prop_oneof![6 => Just(EP), 1 => Just("ep-2")],
        prop_oneof![5 => Just("f1"), 1 => Just("f2")],
        prop_oneof![6 => Just(Ability::ComputeRun), 1 => Just(Ability::TransferRead)],
    )
        .prop_map(|((peer, i), time, ep, f, ability)| Request {
            peer: peer.into(),
            institution: i.key(),
            time,
            endpoint: ep.into(),
            function: Some(f.into()),
            ability,
            path: None,
        })
}

fn allows(v: &capability::Verified, dir: &Directory, r: &Request) -> bool {
    capability::authorize(v, dir, r).is_ok()
}

/// The holders an independent model predicts: B, plus every institution named by a delegation
/// or signed `audience` statement whose signer is an admitted holder, to a fixpoint.
fn model_holders(ops: &[Op]) -> BTreeSet<Key> {
    let mut holders: BTreeSet<Inst> = [Inst::B].into_iter().collect();
    loop {
        let before = holders.len();
        for op in ops {
            let (by, named): (Inst, Vec<Inst>) = match op {
                Op::ToInst(by, to, _) => (*by, vec![*to]),
                Op::Signed(by, w) => {
                    let mut named: Vec<Inst> = w
                        .iter()
                        .filter_map(|i| match i {
                            0 => Some(Inst::C),
                            1 => Some(Inst::X),
                            _ => None,
                        })
                        .collect();
                    // `audience($i) <- peer_institution($i)` with `peer_institution(X)` in the
                    // same signed block names X too.
                    if w.contains(&10) && w.contains(&3) {
                        named.push(Inst::X);
                    }
                    (*by, named)
                }
                _ => continue,
            };
            if by != Inst::Z && holders.contains(&by) {
                holders.extend(named);
            }
        }
        if holders.len() == before {
            return holders.into_iter().map(Inst::key).collect();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_delegated_token_never_authorises_what_its_parent_would_refuse(
        parent_ops in proptest::collection::vec(op(), 0..3),
        child_ops in proptest::collection::vec(op(), 1..4),
        requests in proptest::collection::vec(request(), 6),
    ) {
        let vocab = vocabulary();
        let dir = directory(&[]);
        let root = Inst::A.key();
        let mut parent = grant_ab();
        for op in &parent_ops {
            parent = apply(&parent, op, &vocab);
        }
        let mut child = parent.clone();
        for op in &child_ops {
            child = apply(&child, op, &vocab);
        }
        let p = capability::verify(&parent, &dir, &root).unwrap();
        let c = capability::verify(&child, &dir, &root).unwrap();

        // P0: the holder set matches the independent model.
        prop_assert_eq!(&p.holders, &model_holders(&parent_ops));
        let all: Vec<Op> = parent_ops.iter().chain(&child_ops).cloned().collect();
        prop_assert_eq!(&c.holders, &model_holders(&all));
        // P3: appending never drops a holder.
        prop_assert!(p.holders.is_subset(&c.holders));

        for r in &requests {
            if !allows(&c, &dir, r) {
                continue;
            }
            // P1: what the child allows, the parent allows for one of its holders (the only
            // thing a delegation may change is who holds it).
            let for_some_holder = p.holders.iter().any(|h| {
                let mut as_holder = r.clone();
                as_holder.institution = *h;
                allows(&p, &dir, &as_holder)
            });
            prop_assert!(for_some_holder, "child allows {:?}, the parent refuses it for all of its holders", r);
            // P2: for a holder of the parent, the child allows nothing the parent refuses.
            if p.holders.contains(&r.institution) {
                prop_assert!(allows(&p, &dir, r), "child allows {:?} and the parent does not", r);
            }
        }
    }
}
