//! A small federation: institutions A (runs the endpoint), B, C and X (admitted) and Z (not).

use capability::{Ability, Directory, Grant, Key, Request};

pub(crate) const EP: &str = "ep-1";
pub(crate) const T0: u64 = 1_900_000_000;
pub(crate) const T1: u64 = T0 + 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Inst {
    A,
    B,
    C,
    X,
    Z,
}

impl Inst {
    pub(crate) const ALL: [Inst; 5] = [Inst::A, Inst::B, Inst::C, Inst::X, Inst::Z];

    pub(crate) fn seed(self) -> [u8; 32] {
        [self as u8 + 1; 32]
    }

    pub(crate) fn key(self) -> Key {
        Key::of(&ed25519_dalek::SigningKey::from_bytes(&self.seed()))
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Inst::A => "inst-a",
            Inst::B => "inst-b",
            Inst::C => "inst-c",
            Inst::X => "inst-x",
            Inst::Z => "inst-z",
        }
    }
}

/// The directory with A, B, C and X admitted, and these token revocations.
pub(crate) fn directory(revocations: &[(String, Inst)]) -> Directory {
    Directory::new(
        [Inst::A, Inst::B, Inst::C, Inst::X]
            .into_iter()
            .map(|i| (i.key(), i.name().to_string())),
        revocations.iter().map(|(id, by)| (id.clone(), by.key())),
    )
}

/// A grants B `compute.run` on EP for f1, valid from T0 to T1.
pub(crate) fn grant_ab() -> Vec<u8> {
    capability::grant(
        &Inst::A.seed(),
        &Grant {
            paths: vec![],
            to: Inst::B.key(),
            endpoint: EP.into(),
            functions: vec!["f1".into()],
            abilities: vec![Ability::ComputeRun],
            expires: T1,
            not_before: Some(T0),
        },
    )
    .unwrap()
}

/// A request by `peer` of `inst` at `time` for `function` on EP.
pub(crate) fn req(peer: &str, inst: Inst, time: u64, function: &str) -> Request {
    Request {
        peer: peer.into(),
        institution: inst.key(),
        time,
        endpoint: EP.into(),
        function: Some(function.into()),
        ability: Ability::ComputeRun,
        path: None,
    }
}

/// Verifies and authorises on A's endpoint, without caches.
pub(crate) fn check(token: &[u8], dir: &Directory, r: &Request) -> Result<(), capability::Refusal> {
    let v = capability::verify(token, dir, &Inst::A.key())?;
    capability::authorize(&v, dir, r)
}
