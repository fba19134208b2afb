//! The token fuzz target, as a property test that CI runs: arbitrary bytes and mutations of real
//! tokens go through text decoding, inspection, verification and authorisation. Nothing may
//! panic, and a mutant that still verifies may not allow anything its original refuses.

use capability::{Audience, Delegation, Verifier};
use proptest::prelude::*;

use crate::support::{Inst, T0, directory, grant_ab, req};

fn real_tokens() -> Vec<Vec<u8>> {
    let ab = grant_ab();
    let abc = capability::delegate(
        &ab,
        &Inst::B.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Institution(Inst::C.key()),
            functions: vec!["f1".into()],
            expires: None,
        },
    )
    .unwrap();
    let abcn = capability::delegate(
        &abc,
        &Inst::C.seed(),
        &Delegation {
            paths: vec![],
            to: Audience::Node("peerC1".into()),
            functions: vec![],
            expires: Some(T0 + 600),
        },
    )
    .unwrap();
    vec![ab, abc, abcn]
}

fn everything(bytes: &[u8]) -> Vec<bool> {
    let dir = directory(&[]);
    let v = Verifier::new();
    let _ = capability::inspect(bytes).map(|c| c.describe(&|k| k.to_string()));
    let _ = capability::from_text(&String::from_utf8_lossy(bytes));
    [
        req("peerB1", Inst::B, T0 + 100, "f1"),
        req("peerC1", Inst::C, T0 + 100, "f1"),
        req("peerC1", Inst::C, T0 + 100, "f2"),
        req("peerX1", Inst::X, T0 + 100, "f1"),
    ]
    .iter()
    .map(|r| v.check(bytes, &dir, &Inst::A.key(), r).is_ok())
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_verifier(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let allowed = everything(&bytes);
        prop_assert!(allowed.iter().all(|a| !a), "random bytes were accepted");
    }

    #[test]
    fn mutated_tokens_never_panic_and_never_gain_rights(
        which in 0..3usize,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<usize>()),
        splice in proptest::option::of((any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))),
    ) {
        let tokens = real_tokens();
        let original = &tokens[which];
        let mut bytes = original.clone();
        for (at, v) in flips {
            let n = bytes.len();
            bytes[at % n] ^= v;
        }
        if let Some((at, extra)) = splice {
            let at = at % bytes.len();
            bytes.splice(at..at, extra);
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        let before = everything(original);
        let after = everything(&bytes);
        for (b, a) in before.iter().zip(&after) {
            prop_assert!(!a || *b, "a mutant allows a request its original refuses");
        }
    }
}
