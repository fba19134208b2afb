//! One test per case: each names the reason the verifier must give.

use capability::{Ability, Audience, Delegation, Error, Grant, Refusal, Statement, Verifier};

use crate::support::{EP, Inst, T0, T1, check, directory, grant_ab, req};

fn to_node(token: &[u8], by: Inst, peer: &str) -> Vec<u8> {
    capability::delegate(
        token,
        &by.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Node(peer.into()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap()
}

fn to_inst(token: &[u8], by: Inst, to: Inst) -> Vec<u8> {
    capability::delegate(
        token,
        &by.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Institution(to.key()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap()
}

const NOW: u64 = T0 + 100;

#[test]
fn a_direct_grant_allows_the_grantees_nodes() {
    let dir = directory(&[]);
    let t = grant_ab();
    check(&t, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap();
    check(&t, &dir, &req("peerB2", Inst::B, NOW, "f1")).unwrap();
}

#[test]
fn a_two_hop_delegation_to_one_node_allows_that_node_only() {
    let dir = directory(&[]);
    let t = to_node(&grant_ab(), Inst::B, "peerB1");
    check(&t, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap();
    assert_eq!(
        check(&t, &dir, &req("peerB2", Inst::B, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
}

#[test]
fn a_holder_hands_the_token_on_and_the_partner_narrows_it_to_a_node() {
    let dir = directory(&[]);
    let abc = to_inst(&grant_ab(), Inst::B, Inst::C);
    check(&abc, &dir, &req("peerC1", Inst::C, NOW, "f1")).unwrap();
    let abcn = to_node(&abc, Inst::C, "peerC1");
    check(&abcn, &dir, &req("peerC1", Inst::C, NOW, "f1")).unwrap();
    assert_eq!(
        check(&abcn, &dir, &req("peerC2", Inst::C, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
    // X never held it.
    assert_eq!(
        check(&abc, &dir, &req("peerX1", Inst::X, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
}

#[test]
fn an_attempt_to_widen_a_delegation_is_refused_when_made_and_when_used() {
    let dir = directory(&[]);
    let wider = Delegation {
        paths: vec![],
        to: Audience::Institution(Inst::C.key()),
        functions: vec!["f1".into(), "f2".into()],
        expires: Some(T1 + 86_400),
    };
    // The tool refuses to make it...
    let err = capability::delegate(&grant_ab(), &Inst::B.seed(), &wider).unwrap_err();
    assert!(matches!(err, Error::Widening(_)), "{err}");
    assert!(err.to_string().contains("f2"), "{err}");
    // ...and a hand-made one grants nothing the parent did not.
    let t = capability::delegate_unchecked(&grant_ab(), &Inst::B.seed(), &wider).unwrap();
    let r = check(&t, &dir, &req("peerC1", Inst::C, NOW, "f2")).unwrap_err();
    assert_eq!(r.kind(), "not covered", "{r}");
    assert!(r.to_string().contains("function"), "{r}");
    let r = check(&t, &dir, &req("peerC1", Inst::C, T1 + 10, "f1")).unwrap_err();
    assert_eq!(r.kind(), "expired", "{r}");
    // A delegation by someone who does not hold the token is refused by the tool.
    let err = capability::delegate(
        &grant_ab(),
        &Inst::X.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Institution(Inst::X.key()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotHolder(_)), "{err}");
}

#[test]
fn unsigned_or_foreign_blocks_cannot_add_holders_or_facts() {
    let dir = directory(&[]);
    let x = capability::institution_term(&Inst::X.key());
    let plain = capability::append_plain(
        &grant_ab(),
        &format!(
            "audience(\"{x}\"); holder(\"{x}\"); peer_institution(\"{x}\"); function(\"f2\"); \
             time(2000-01-01T00:00:00Z); holder($i) <- peer_institution($i);"
        ),
    )
    .unwrap();
    assert_eq!(
        check(&plain, &dir, &req("peerX1", Inst::X, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
    assert_eq!(
        check(&plain, &dir, &req("peerB1", Inst::B, NOW, "f2"))
            .unwrap_err()
            .kind(),
        "not covered"
    );
    assert_eq!(
        check(&plain, &dir, &req("peerB1", Inst::B, T1 + 5, "f1"))
            .unwrap_err()
            .kind(),
        "expired"
    );
    // Signed by X (admitted, not a holder), by X naming itself, and by Z (not admitted).
    for signer in [Inst::X, Inst::Z, Inst::C] {
        let t =
            capability::append_signed(&grant_ab(), &signer.seed(), &format!("audience(\"{x}\");"))
                .unwrap();
        assert_eq!(
            check(&t, &dir, &req("peerX1", Inst::X, NOW, "f1")),
            Err(Refusal::WrongAudience),
            "signed by {signer:?}"
        );
    }
}

#[test]
fn an_expired_token_is_refused_as_expired() {
    let dir = directory(&[]);
    let t = grant_ab();
    check(&t, &dir, &req("peerB1", Inst::B, T1, "f1")).unwrap();
    let r = check(&t, &dir, &req("peerB1", Inst::B, T1 + 1, "f1")).unwrap_err();
    assert_eq!(r.kind(), "expired");
    assert!(r.to_string().starts_with("expired: "), "{r}");
    // A delegation's shorter TTL counts too.
    let short = capability::delegate(
        &t,
        &Inst::B.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Node("peerB1".into()),
            functions: vec![],
            expires: Some(NOW + 10),
        },
    )
    .unwrap();
    check(&short, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap();
    assert_eq!(
        check(&short, &dir, &req("peerB1", Inst::B, NOW + 11, "f1"))
            .unwrap_err()
            .kind(),
        "expired"
    );
}

#[test]
fn a_holder_whose_institution_was_revoked_holds_nothing() {
    let t = grant_ab();
    let listed_without_b = || {
        capability::Directory::new(
            [Inst::A, Inst::C, Inst::X]
                .into_iter()
                .map(|i| (i.key(), i.name().to_string())),
            Vec::new(),
        )
    };
    // Not delivered by the registry yet: B's membership was verified, so it still holds.
    check(&t, &listed_without_b(), &req("peerB1", Inst::B, NOW, "f1")).unwrap();
    // Revoked by the federation.
    let without_b = listed_without_b().with_revoked_institutions([Inst::B.key()]);
    assert_eq!(
        check(&t, &without_b, &req("peerB1", Inst::B, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
    let v = Verifier::new();
    assert_eq!(
        v.check(
            &t,
            &without_b,
            &Inst::A.key(),
            &req("peerB1", Inst::B, NOW, "f1")
        )
        .map(|_| ()),
        Err(Refusal::WrongAudience)
    );
}

#[test]
fn a_token_used_before_its_start_is_not_yet_valid() {
    let dir = directory(&[]);
    let r = check(&grant_ab(), &dir, &req("peerB1", Inst::B, T0 - 1, "f1")).unwrap_err();
    assert_eq!(r.kind(), "not yet valid", "{r}");
}

#[test]
fn a_stolen_token_is_useless_to_another_institutions_node() {
    let dir = directory(&[]);
    assert_eq!(
        check(&grant_ab(), &dir, &req("peerX1", Inst::X, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
    // Narrowed to a node of B: X's node claiming that node's peer id is still refused.
    let t = to_node(&grant_ab(), Inst::B, "peerB1");
    assert_eq!(
        check(&t, &dir, &req("peerB1", Inst::X, NOW, "f1")),
        Err(Refusal::WrongAudience)
    );
}

#[test]
fn a_function_outside_the_grant_is_not_covered() {
    let dir = directory(&[]);
    let r = check(&grant_ab(), &dir, &req("peerB1", Inst::B, NOW, "f2")).unwrap_err();
    assert_eq!(r.kind(), "not covered");
    assert!(r.to_string().contains("function($f)"), "{r}");
    // Another ability.
    let mut transfer = req("peerB1", Inst::B, NOW, "f1");
    transfer.ability = Ability::TransferWrite;
    assert_eq!(
        check(&grant_ab(), &dir, &transfer).unwrap_err().kind(),
        "not covered"
    );
}

#[test]
fn another_endpoint_is_not_covered() {
    let dir = directory(&[]);
    let mut r = req("peerB1", Inst::B, NOW, "f1");
    r.endpoint = "ep-2".into();
    let refusal = check(&grant_ab(), &dir, &r).unwrap_err();
    assert_eq!(refusal.kind(), "not covered");
    assert!(refusal.to_string().contains(EP), "{refusal}");
}

#[test]
fn a_revoked_root_grant_refuses_every_token_derived_from_it() {
    let t = grant_ab();
    let abn = to_node(&t, Inst::B, "peerB1");
    let id = capability::inspect(&t).unwrap().blocks[0]
        .revocation_id
        .clone();
    let dir = directory(&[(id, Inst::A)]);
    for token in [&t, &abn] {
        let r = check(token, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap_err();
        assert_eq!(
            r,
            Refusal::Revoked {
                block: 0,
                by: "inst-a".into()
            }
        );
    }
}

#[test]
fn a_revoked_middle_delegation_refuses_only_its_descendants() {
    let ab = grant_ab();
    let abc = to_inst(&ab, Inst::B, Inst::C);
    let abcn = to_node(&abc, Inst::C, "peerC1");
    let abn = to_node(&ab, Inst::B, "peerB1");
    let id = capability::inspect(&abc).unwrap().blocks[1]
        .revocation_id
        .clone();
    // Revoked by C (downstream) or X (a bystander): ignored.
    for by in [Inst::C, Inst::X] {
        let dir = directory(&[(id.clone(), by)]);
        check(&abcn, &dir, &req("peerC1", Inst::C, NOW, "f1")).unwrap();
    }
    // Revoked by B, who signed it.
    let dir = directory(&[(id, Inst::B)]);
    for token in [&abc, &abcn] {
        assert_eq!(
            check(token, &dir, &req("peerC1", Inst::C, NOW, "f1")),
            Err(Refusal::Revoked {
                block: 1,
                by: "inst-b".into()
            })
        );
    }
    check(&ab, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap();
    check(&abn, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap();
}

#[test]
fn a_forged_signature_is_refused() {
    let dir = directory(&[]);
    // Z signs a grant that claims to be A's (A's root key id).
    let forged = {
        let g = Grant {
            paths: vec![],
            to: Inst::B.key(),
            endpoint: EP.into(),
            functions: vec![],
            abilities: vec![],
            expires: T1,
            not_before: None,
        };
        let by_z = capability::grant(&Inst::Z.seed(), &g).unwrap();
        let bytes = capability::claim_root(&by_z, &Inst::A.key()).unwrap();
        assert_eq!(
            capability::inspect(&bytes).unwrap().root_key_id,
            Some(capability::root_key_id(&Inst::A.key()))
        );
        bytes
    };
    assert_eq!(
        check(&forged, &dir, &req("peerB1", Inst::B, NOW, "f1")),
        Err(Refusal::InvalidSignature)
    );
    // One flipped bit in the signed payload of a real grant.
    let mut t = grant_ab();
    let n = t.len();
    t[n / 3] ^= 0x10;
    let r = check(&t, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap_err();
    assert!(
        matches!(r, Refusal::InvalidSignature | Refusal::Malformed(_)),
        "{r}"
    );
}

#[test]
fn a_truncated_token_is_malformed() {
    let dir = directory(&[]);
    let t = grant_ab();
    for cut in [0, 1, t.len() / 2, t.len() - 1] {
        let r = check(&t[..cut], &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap_err();
        assert_eq!(r.kind(), "malformed", "cut at {cut}: {r}");
    }
    let text = capability::to_text(&t);
    let r = capability::from_text(&text[..text.len() / 2]).map(|b| {
        check(&b, &dir, &req("peerB1", Inst::B, NOW, "f1"))
            .unwrap_err()
            .kind()
    });
    assert!(matches!(r, Err(_) | Ok("malformed")), "{r:?}");
}

#[test]
fn a_token_rooted_in_a_non_admitted_institution_is_refused() {
    let dir = directory(&[]);
    let g = Grant {
        paths: vec![],
        to: Inst::B.key(),
        endpoint: EP.into(),
        functions: vec![],
        abilities: vec![],
        expires: T1,
        not_before: None,
    };
    let by_z = capability::grant(&Inst::Z.seed(), &g).unwrap();
    assert_eq!(
        check(&by_z, &dir, &req("peerB1", Inst::B, NOW, "f1")),
        Err(Refusal::RootNotAdmitted)
    );
    // Issued by C (admitted) for A's endpoint: C cannot grant what A runs.
    let by_c = capability::grant(&Inst::C.seed(), &g).unwrap();
    let r = check(&by_c, &dir, &req("peerB1", Inst::B, NOW, "f1")).unwrap_err();
    assert_eq!(
        r,
        Refusal::WrongIssuer {
            issuer: "inst-c".into(),
            ours: "inst-a".into()
        }
    );
}

#[test]
fn the_verifier_caches_tokens_and_decisions_but_never_revocations() {
    let t = to_node(&grant_ab(), Inst::B, "peerB1");
    let v = Verifier::new();
    let r = req("peerB1", Inst::B, NOW, "f1");
    let dir = directory(&[]);
    for _ in 0..3 {
        v.check(&t, &dir, &Inst::A.key(), &r).unwrap();
    }
    let id = capability::inspect(&t).unwrap().blocks[1]
        .revocation_id
        .clone();
    let revoked = directory(&[(id, Inst::B)]);
    assert_eq!(
        v.check(&t, &revoked, &Inst::A.key(), &r)
            .unwrap_err()
            .kind(),
        "revoked"
    );
    // A cached refusal stays a refusal; a different request is decided afresh.
    let other = req("peerB2", Inst::B, NOW, "f1");
    for _ in 0..2 {
        assert_eq!(
            v.check(&t, &dir, &Inst::A.key(), &other).map(|_| ()),
            Err(Refusal::WrongAudience)
        );
    }
    v.check(&t, &dir, &Inst::A.key(), &r).unwrap();
}

#[test]
fn inspect_describes_the_chain_in_plain_words() {
    let abc = to_inst(&grant_ab(), Inst::B, Inst::C);
    let chain = capability::inspect(&abc).unwrap();
    assert_eq!(chain.blocks.len(), 2);
    assert_eq!(chain.blocks[1].signer, Some(Inst::B.key()));
    assert!(
        chain.blocks[0]
            .statements
            .contains(&Statement::Audience(Inst::B.key()))
    );
    assert!(chain.blocks[0].statements.contains(&Statement::Binding));
    assert!(
        chain.blocks[0]
            .statements
            .contains(&Statement::Functions(vec!["f1".into()]))
    );
    assert_eq!(chain.endpoint(), Some(EP));
    assert_eq!(chain.expires(), Some(T1));
    assert_eq!(
        chain.holders(),
        [Inst::B.key(), Inst::C.key()].into_iter().collect()
    );
    let name = |k: &capability::Key| {
        Inst::ALL
            .into_iter()
            .find(|i| i.key() == *k)
            .map_or_else(|| k.to_string(), |i| i.name().to_string())
    };
    let lines = chain.describe(&name);
    assert!(
        lines[0].contains("the issuer granted to institution inst-b"),
        "{lines:?}"
    );
    assert!(lines[0].contains("on endpoint ep-1"), "{lines:?}");
    assert!(lines[0].contains("functions f1"), "{lines:?}");
    assert!(lines[0].contains("abilities compute.run"), "{lines:?}");
    assert!(lines[0].contains("from "), "{lines:?}");
    assert!(
        lines[1].contains("inst-b delegated to institution inst-c"),
        "{lines:?}"
    );
    // The text form round-trips.
    assert_eq!(
        capability::from_text(&capability::to_text(&abc)).unwrap(),
        abc
    );
}

#[test]
fn a_grant_narrowed_to_a_path_prefix_allows_only_paths_below_it() {
    let dir = directory(&[]);
    let token = capability::grant(
        &Inst::A.seed(),
        &Grant {
            paths: vec!["/shared/".into()],
            to: Inst::B.key(),
            endpoint: EP.into(),
            functions: vec![],
            abilities: vec![Ability::TransferRead],
            expires: T1,
            not_before: None,
        },
    )
    .unwrap();
    let at = |path: Option<&str>, ability: Ability| capability::Request {
        path: path.map(str::to_owned),
        ability,
        function: None,
        ..req("peerB1", Inst::B, NOW, "f1")
    };
    for ok in ["shared", "shared/run1/data.h5"] {
        check(&token, &dir, &at(Some(ok), Ability::TransferRead)).unwrap();
    }
    for refused in ["", "private", "sharedx", "other/shared"] {
        let r = check(&token, &dir, &at(Some(refused), Ability::TransferRead)).unwrap_err();
        assert!(r.to_string().contains("under"), "{refused}: {r}");
    }
    // No path at all (a compute request) is not below the prefix either.
    assert!(check(&token, &dir, &at(None, Ability::TransferRead)).is_err());
    // Writing is not granted, whatever the path.
    assert!(check(&token, &dir, &at(Some("shared/x"), Ability::TransferWrite)).is_err());
    assert_eq!(
        capability::inspect(&token).unwrap().paths(),
        Some(vec!["shared".to_owned()])
    );

    // B narrows it to a subdirectory for C; it cannot widen it.
    let narrow = capability::delegate(
        &token,
        &Inst::B.seed(),
        &Delegation {
            paths: vec!["shared/run1".into()],
            to: Audience::Institution(Inst::C.key()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap();
    let as_c = |p: &str| capability::Request {
        path: Some(p.into()),
        ability: Ability::TransferRead,
        function: None,
        ..req("peerC1", Inst::C, NOW, "f1")
    };
    check(&narrow, &dir, &as_c("shared/run1/a")).unwrap();
    assert!(check(&narrow, &dir, &as_c("shared/run2/a")).is_err());
    let wider = capability::delegate(
        &token,
        &Inst::B.seed(),
        &Delegation {
            paths: vec!["private".into()],
            to: Audience::Institution(Inst::C.key()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap_err();
    assert!(wider.to_string().contains("not covered"), "{wider}");
    // Forced past the delegate's check, the wider block still cannot widen.
    let forced = capability::delegate_unchecked(
        &token,
        &Inst::B.seed(),
        &Delegation {
            paths: vec!["private".into()],
            to: Audience::Institution(Inst::C.key()),
            functions: vec![],
            expires: None,
        },
    )
    .unwrap();
    assert!(check(&forced, &dir, &as_c("private/a")).is_err());
    assert!(capability::path_prefixes(&["a/../b".into()]).is_err());
}
