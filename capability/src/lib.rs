//! Capability tokens between institutions: an institution grants another the right to use one of
//! its endpoints (some functions, some abilities, until a date); the holder narrows the grant
//! to one of its nodes or hands it on to a partner; the endpoint verifies the whole chain
//! offline and refuses anything outside it. Sans-IO: no network, no clock, no storage.
//!
//! Tokens are [Biscuit](https://www.biscuitsec.org) tokens rooted in the issuing institution's
//! ed25519 key. The scheme (see `docs/design/capabilities.md`):
//!
//! * **Root.** Block 0 is signed by the institution that runs the endpoint; an endpoint accepts
//!   only tokens rooted in its own institution.
//! * **Audience.** Block 0 names the first holder, `audience("institution:<key>")`. A later
//!   holder is named only by a third-party block signed by the key of an institution that
//!   already holds the token ([`Verified::holders`] is that fixpoint, computed once per token).
//!   On each request the verifier adds `holder(..)` facts and the check
//!   `peer_institution($i), holder($i)` binds the token to the calling member's institution.
//! * **Narrowing** is plain `check if` statements: every check of every block must hold, so a
//!   delegation can only narrow. Facts in later blocks are invisible to block 0's checks.
//! * **Revocation** is per block, by its revocation id; it counts when the root or a holder
//!   that signed that block or an earlier one revoked it.
//!
//! Identities in Datalog: an institution is `"institution:<std base64 key>"`, a node is its peer
//! id, an endpoint its registry id, a function its content id.

mod inspect;
mod token;
mod verify;

pub use inspect::{Block, Chain, Statement, inspect};
pub use token::{
    Audience, Delegation, Grant, append_plain, append_signed, claim_root, delegate,
    delegate_unchecked, grant, path_prefixes,
};

/// Whether `path` is `prefix` or below it.
pub fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}
pub use verify::{
    Directory, Refusal, Request, Verified, Verifier, authorize, check_revocations, run_datalog,
    token_hash, verify,
};

pub use crdt_registry::Key;

/// The context string every funcmesh capability carries in block 0.
pub const CONTEXT: &str = "funcmesh/cap/1";
/// Largest token accepted, in bytes (before any parsing).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most blocks in a token (a grant and seven delegations): bounds verification at ~1.4 ms.
pub const MAX_BLOCKS: usize = 8;

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ability {
    /// Run functions on an endpoint.
    ComputeRun,
    /// Read files through an endpoint.
    TransferRead,
    /// Write files through an endpoint.
    TransferWrite,
    /// Run flow actions on an endpoint.
    FlowRun,
}

impl Ability {
    /// Every ability.
    pub const ALL: [Ability; 4] = [
        Ability::ComputeRun,
        Ability::TransferRead,
        Ability::TransferWrite,
        Ability::FlowRun,
    ];

    /// Its name in tokens and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Ability::ComputeRun => "compute.run",
            Ability::TransferRead => "transfer.read",
            Ability::TransferWrite => "transfer.write",
            Ability::FlowRun => "flow.run",
        }
    }
}

impl std::fmt::Display for Ability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Ability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ability::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown ability {s:?}: use compute.run, transfer.read, transfer.write or \
                     flow.run"
                )
            })
    }
}

/// An institution as Datalog names it.
pub fn institution_term(key: &Key) -> String {
    format!("institution:{key}")
}

/// The key named by an `institution:<key>` term.
pub fn institution_of_term(term: &str) -> Option<Key> {
    term.strip_prefix("institution:")?.parse().ok()
}

/// The root key id hint of tokens issued by `key`: its first four bytes.
pub fn root_key_id(key: &Key) -> u32 {
    u32::from_be_bytes([key.0[0], key.0[1], key.0[2], key.0[3]])
}

/// The text engine: URL-safe base64 as biscuit writes it, padding optional on input.
const TEXT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Decodes a token from its text form (URL-safe base64, as [`to_text`] writes it; padding and
/// surrounding whitespace are optional). Only the encoding is checked here.
pub fn from_text(text: &str) -> Result<Vec<u8>, Refusal> {
    use base64::Engine as _;
    let text = text.trim();
    if text.len() > MAX_TOKEN_BYTES.div_ceil(3) * 4 {
        return Err(Refusal::TooLarge(text.len() / 4 * 3));
    }
    TEXT.decode(text).map_err(|e| {
        Refusal::Malformed(format!(
            "not a token: {e} (tokens are URL-safe base64, as `funcmesh cap grant` prints them)"
        ))
    })
}

/// A token's text form: URL-safe base64 with padding, as biscuit's own `to_base64`.
pub fn to_text(bytes: &[u8]) -> String {
    use base64::Engine as _;
    TEXT.encode(bytes)
}

fn describe_format_error(e: &biscuit_auth::error::Token) -> String {
    use biscuit_auth::error::Token;
    match e {
        Token::Base64(_) => "not URL-safe base64".into(),
        Token::Format(f) => format!("{f:?}"),
        other => other.to_string(),
    }
}

/// Why a token could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The parent token cannot be read.
    #[error("the token cannot be read: {0}")]
    Unreadable(String),
    /// The delegation would widen the parent.
    #[error("a delegation cannot widen its parent: {0}")]
    Widening(String),
    /// The holder's key does not hold the token.
    #[error("{0}")]
    NotHolder(String),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// The token library failed.
    #[error("building the token failed: {0}")]
    Biscuit(String),
}

impl From<biscuit_auth::error::Token> for Error {
    fn from(e: biscuit_auth::error::Token) -> Self {
        Error::Biscuit(describe_format_error(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abilities_parse_and_print() {
        for a in Ability::ALL {
            assert_eq!(a.as_str().parse::<Ability>().unwrap(), a);
        }
        assert!(
            "compute.fly"
                .parse::<Ability>()
                .unwrap_err()
                .contains("unknown ability")
        );
    }
}
