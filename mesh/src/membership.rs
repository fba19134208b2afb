//! Federation membership: the signed chain that lets any peer check, offline and with nothing but
//! the federation's public key, that another peer is a member.
//!
//! The chain is `genesis → admission → invite → binding → receipt`:
//!
//! * the **genesis** names the federation and its root key, signed by that key; the federation id
//!   is the hash of the signed genesis bytes, so two federations with the same name differ;
//! * an **admission** is the federation key's signature over an institution's key;
//! * an **invite** is the institution key's signature over a role, a validity window and the
//!   public half of a one-time **invite key**; the invite string carries the secret half;
//! * a **binding** is the joining node's own signature (with its libp2p identity key) over the
//!   invite's digest and its peer id, *endorsed* by the invite key: only the invite's holder can
//!   make one, and a proof holds signatures but no secret, so nobody mints an invite from it;
//! * a **receipt** is a coordinator's signature over the binding and the time the coordinator
//!   admitted it, by its own clock: the invite's expiry is judged there, by a party other than
//!   the joiner, and a binding older than [`JOIN_WINDOW`] gets no receipt, so nobody back-dates.
//!
//! One invite admits one node: a coordinator refuses an invite its registry shows as used by
//! another peer, and the registry's view keeps, for each invite, only the node admitted first
//! (earliest receipt, then lowest peer id), the same on every member.
//!
//! Coordinators are the federation's own nodes: the federation key signs their peer id directly.
//!
//! Everything here is sans-IO: bytes and `now` in, verdicts out. Every signed document carries the
//! exact bytes that were signed (`body`), so verification never depends on re-serialising.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::Signer as _;
use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Version of the federation's documents (genesis, admission, coordinator certificate).
pub const FORMAT_VERSION: u32 = 1;
/// Version of invites, bindings and receipts. Version 1 proofs carried a reusable invite; they
/// are refused with [`Refusal::Outdated`], and their nodes re-join with a new invite.
pub const INVITE_VERSION: u32 = 2;
/// Prefix of an invite string; the version is part of it so old strings fail with a clear error.
pub const INVITE_PREFIX: &str = "fminvite2.";
/// How recent (by the coordinator's clock) a binding must be for a coordinator to admit it.
pub const JOIN_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Largest encoded invite or proof accepted from a user or a peer, checked before decoding.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024;
/// How far in the future a peer's clock may be before its binding is refused.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Seconds since the Unix epoch; all membership times use it.
pub type UnixTime = u64;

/// Why a membership document was refused. Each variant names the failing link of the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    /// The bytes are not a membership document of a format this node understands.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which document.
        what: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// The document belongs to another federation.
    #[error("{what} is for federation {theirs}, but this node belongs to federation {ours}")]
    WrongFederation {
        /// Which document.
        what: String,
        /// The federation this node belongs to.
        ours: String,
        /// The federation the document names.
        theirs: String,
    },
    /// A signature does not verify.
    #[error("forged {what}: its signature does not verify")]
    BadSignature {
        /// Which document.
        what: String,
    },
    /// The invite's institution has no admission signed by the federation key.
    #[error("institution {institution} was never admitted to this federation")]
    NotAdmitted {
        /// The institution's name as claimed by the invite.
        institution: String,
    },
    /// The invite was used after it expired.
    #[error(
        "invite expired at {expired_at} (used at {used_at}); ask the institution for a new invite"
    )]
    Expired {
        /// RFC 3339 expiry.
        expired_at: String,
        /// RFC 3339 time of use.
        used_at: String,
    },
    /// The invite was used before it became valid, or the binding is dated in the future.
    #[error("{what} is dated in the future ({at}); check the clocks")]
    NotYetValid {
        /// Which document.
        what: String,
        /// RFC 3339 time.
        at: String,
    },
    /// The proof was made for another peer id than the one presenting it.
    #[error("membership proof belongs to peer {owner}, not to the presenting peer {presenter}")]
    WrongPeer {
        /// The peer id the proof binds.
        owner: String,
        /// The peer that presented it.
        presenter: String,
    },
    /// The peer presented no proof in time.
    #[error("no membership proof presented within {0:?}")]
    NoProof(Duration),
    /// The document is of the first invite format, whose proofs could be turned back into
    /// invites.
    #[error(
        "{what} was made by an older funcmesh (invite format 1, whose proofs could be reused as \
         invites) and is no longer accepted; ask your institution for a new invite \
         (`funcmesh invite create`) and join again with a new data dir: \
         `funcmesh join COORDINATOR --invite-file FILE --data-dir NEW_DIR`"
    )]
    Outdated {
        /// Which document.
        what: String,
    },
    /// A member's proof without a coordinator's receipt, shown to a node that is not a
    /// coordinator.
    #[error(
        "membership proof has no coordinator's receipt: the node has not finished joining; \
         join through a coordinator with `funcmesh join COORDINATOR --invite …`"
    )]
    NoReceipt,
    /// The invite was already used by another node.
    #[error(
        "this invite was already used by node {by}: an invite admits one node; ask your \
         institution for a new one"
    )]
    InviteUsed {
        /// The peer that used it first.
        by: String,
    },
    /// The registry revokes the peer's node key or its institution.
    #[error(
        "{what} is revoked in the federation's registry; a revoked node cannot rejoin with its \
         key: ask the institution for a new invite and join with a new data dir"
    )]
    Revoked {
        /// What is revoked: the node or its institution.
        what: String,
    },
    /// The binding is too old for a coordinator to admit.
    #[error(
        "the binding was made at {bound_at}, more than 15 minutes ago by the coordinator's \
         clock; run `funcmesh join` again (and check the clocks)"
    )]
    Stale {
        /// RFC 3339 time of the binding.
        bound_at: String,
    },
}

/// What a member node does in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Seeds the mesh and relays; run by the federation itself.
    Coordinator,
    /// Runs functions for the federation.
    Endpoint,
    /// Submits work but runs none.
    Client,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Coordinator => "coordinator",
            Role::Endpoint => "endpoint",
            Role::Client => "client",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "endpoint" => Ok(Role::Endpoint),
            "client" => Ok(Role::Client),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(format!("unknown role `{other}`: use endpoint or client")),
        }
    }
}

/// An ed25519 signing key of a federation or institution.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&rand::random::<
            [u8; 32],
        >()))
    }

    /// The key from its 32-byte secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&secret))
    }

    /// The 32-byte secret, for writing the key file.
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> Key {
        Key(self.0.verifying_key().to_bytes())
    }

    fn sign<T: Serialize>(&self, domain: &str, value: &T) -> Signed<T> {
        let body = serde_json::to_vec(value).expect("membership documents always serialise");
        let sig = self.0.sign(&signing_input(domain, &body));
        Signed::new(body, sig.to_bytes().to_vec())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public())
    }
}

/// An ed25519 public key, base64 on the wire: the registry's key type, shared with the
/// registry and capability tokens.
pub use crdt_registry::Key;

/// Checks `signed` against `key` under `domain`; `what` names the document for the refusal.
fn verify(key: &Key, domain: &str, signed: &SignedBytes, what: &str) -> Result<(), Refusal> {
    if key.verifies(&signing_input(domain, &signed.body), &signed.sig) {
        Ok(())
    } else {
        Err(Refusal::BadSignature {
            what: what.to_string(),
        })
    }
}

fn signing_input(domain: &str, body: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(domain.len() + 1 + body.len());
    input.extend_from_slice(domain.as_bytes());
    input.push(0);
    input.extend_from_slice(body);
    input
}

/// Signature domains keep a signature for one kind of document from passing as another.
mod domain {
    pub(super) const GENESIS: &str = "funcmesh/genesis/1";
    pub(super) const ADMISSION: &str = "funcmesh/admission/1";
    pub(super) const INVITE: &str = "funcmesh/invite/2";
    pub(super) const BINDING: &str = "funcmesh/binding/2";
    pub(super) const ENDORSEMENT: &str = "funcmesh/endorsement/2";
    pub(super) const RECEIPT: &str = "funcmesh/receipt/2";
    pub(super) const COORDINATOR: &str = "funcmesh/coordinator/1";
}

/// Signed bytes as they travel: the exact body that was signed, and the signature.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SignedBytes {
    #[serde(with = "b64")]
    body: Vec<u8>,
    #[serde(with = "b64")]
    sig: Vec<u8>,
}

/// A document of type `T` together with its signature. Read `T` only through the verifying
/// accessors of the chain, never directly.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Signed<T> {
    bytes: SignedBytes,
    #[serde(skip)]
    _t: std::marker::PhantomData<T>,
}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signed({} bytes)", self.bytes.body.len())
    }
}

impl<T> Signed<T> {
    fn new(body: Vec<u8>, sig: Vec<u8>) -> Self {
        Signed {
            bytes: SignedBytes { body, sig },
            _t: std::marker::PhantomData,
        }
    }

    fn digest(&self) -> String {
        hex::encode(&Sha256::digest(&self.bytes.body)[..16])
    }
}

impl<T: DeserializeOwned> Signed<T> {
    /// Checks the signature against `key`, then decodes the body.
    fn open(&self, key: &Key, domain: &str, what: &str) -> Result<T, Refusal> {
        verify(key, domain, &self.bytes, what)?;
        self.decode(what)
    }

    /// Decodes the body without checking the signature: only for documents whose signer is named
    /// inside them (checked right after) or that are self-certifying.
    fn decode(&self, what: &str) -> Result<T, Refusal> {
        serde_json::from_slice(&self.bytes.body).map_err(|e| Refusal::Malformed {
            what: what.to_string(),
            reason: e.to_string(),
        })
    }

    #[cfg(test)]
    pub(crate) fn tamper(&mut self) {
        if let Some(b) = self.bytes.body.last_mut() {
            *b ^= 1;
        }
    }
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

/// The federation's founding document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisBody {
    /// Format version.
    pub version: u32,
    /// Human name of the federation.
    pub name: String,
    /// The federation's root key.
    pub federation_key: Key,
    /// When it was created.
    pub created_at: UnixTime,
}

/// A federation as a node knows it: the signed genesis and what follows from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    signed: Signed<GenesisBody>,
}

impl Genesis {
    /// Creates a federation: the genesis signed by its new root key.
    pub fn create(name: &str, key: &SigningKey, now: UnixTime) -> Genesis {
        let body = GenesisBody {
            version: FORMAT_VERSION,
            name: name.to_string(),
            federation_key: key.public(),
            created_at: now,
        };
        Genesis {
            signed: key.sign(domain::GENESIS, &body),
        }
    }

    /// Checks that the genesis is self-signed by the key it names and returns the verified view.
    pub fn verify(&self) -> Result<Federation, Refusal> {
        let body = self.signed.decode("genesis")?;
        if body.version != FORMAT_VERSION {
            return Err(unsupported("genesis", body.version));
        }
        let body = self
            .signed
            .open(&body.federation_key, domain::GENESIS, "genesis")?;
        Ok(Federation {
            id: FederationId(format!("fed{}", self.signed.digest())),
            name: body.name,
            key: body.federation_key,
            genesis: self.clone(),
        })
    }
}

fn unsupported(what: &str, version: u32) -> Refusal {
    Refusal::Malformed {
        what: what.to_string(),
        reason: format!("format version {version}, this node understands {FORMAT_VERSION}"),
    }
}

/// A federation's id: derived from its signed genesis.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FederationId(pub String);

impl fmt::Display for FederationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A verified genesis: the only way to obtain one is [`Genesis::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// The federation id.
    pub id: FederationId,
    /// Its human name.
    pub name: String,
    /// Its root key.
    pub key: Key,
    /// The genesis it was verified from.
    pub genesis: Genesis,
}

/// The federation key's signature over an institution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionBody {
    /// Format version.
    pub version: u32,
    /// The federation admitting.
    pub federation: FederationId,
    /// The institution's name.
    pub institution: String,
    /// The institution's key.
    pub institution_key: Key,
    /// When it was admitted.
    pub admitted_at: UnixTime,
}

/// An institution's admission certificate, as written by `funcmesh federation admit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The genesis of the admitting federation, so that the institution can hand it on.
    pub genesis: Genesis,
    signed: Signed<AdmissionBody>,
}

impl Admission {
    /// Signs `institution`'s admission with the federation key.
    pub fn issue(
        federation: &Federation,
        federation_key: &SigningKey,
        institution: &str,
        institution_key: Key,
        now: UnixTime,
    ) -> Admission {
        let body = AdmissionBody {
            version: FORMAT_VERSION,
            federation: federation.id.clone(),
            institution: institution.to_string(),
            institution_key,
            admitted_at: now,
        };
        Admission {
            genesis: federation.genesis.clone(),
            signed: federation_key.sign(domain::ADMISSION, &body),
        }
    }

    /// Verifies the admission against the federation it claims.
    pub fn verify(&self, federation: &Federation) -> Result<AdmissionBody, Refusal> {
        let claimed = self.signed.decode("admission")?;
        if claimed.version != FORMAT_VERSION {
            return Err(unsupported("admission", claimed.version));
        }
        // Every byte of a proof is checked: the genesis carried along must be this federation's.
        if claimed.federation != federation.id || self.genesis != federation.genesis {
            return Err(Refusal::WrongFederation {
                what: "admission".into(),
                ours: federation.id.to_string(),
                theirs: claimed.federation.to_string(),
            });
        }
        self.signed
            .open(&federation.key, domain::ADMISSION, "admission")
            .map_err(|_| Refusal::NotAdmitted {
                institution: claimed.institution.clone(),
            })
    }
}

/// The institution's signed invitation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteBody {
    /// Format version ([`INVITE_VERSION`]).
    pub version: u32,
    /// The federation joined.
    pub federation: FederationId,
    /// The inviting institution's key.
    pub institution_key: Key,
    /// The public half of the invite's one-time key. A binding counts only if this key signed
    /// it, and its secret half travels in the invite string alone, never in a proof.
    pub invite_key: Key,
    /// The role the joining node takes.
    pub role: Role,
    /// Valid from.
    pub issued_at: UnixTime,
    /// Valid until: a coordinator must admit the node before it (by the coordinator's clock).
    pub expires_at: UnixTime,
    /// Makes every invite distinct.
    pub nonce: String,
}

/// Bytes that travel as base64: signatures, and the invite's secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(#[serde(with = "b64")] Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print what may be a secret.
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

/// An invite: the copy-pasteable string `funcmesh invite create` prints. Whoever holds it can
/// bind one node; it must be handled like a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The federation's genesis: all a new node needs to verify everyone else.
    pub genesis: Genesis,
    /// The institution's admission.
    pub admission: Admission,
    invite: Signed<InviteBody>,
    /// The secret half of `invite_key`.
    secret: Bytes,
}

/// The verified content of an invite chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedInvite {
    /// The federation.
    pub federation: Federation,
    /// The institution that invited.
    pub institution: String,
    /// Its key.
    pub institution_key: Key,
    /// The invite's terms.
    pub terms: InviteBody,
}

impl VerifiedInvite {
    /// Whether the invite may be used at `at`.
    fn valid_at(&self, at: UnixTime) -> Result<(), Refusal> {
        if at > self.terms.expires_at {
            return Err(Refusal::Expired {
                expired_at: rfc3339(self.terms.expires_at),
                used_at: rfc3339(at),
            });
        }
        if at.saturating_add(CLOCK_SKEW.as_secs()) < self.terms.issued_at {
            return Err(Refusal::NotYetValid {
                what: "invite".into(),
                at: rfc3339(self.terms.issued_at),
            });
        }
        Ok(())
    }
}

/// The `version` of a signed document, read before anything else so that an old format gets
/// its own refusal rather than a decoding error.
fn version_of<T>(signed: &Signed<T>) -> Option<u32> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    serde_json::from_slice::<Versioned>(&signed.bytes.body)
        .ok()
        .map(|v| v.version)
}

/// Refuses documents of the invite format before [`INVITE_VERSION`].
fn current<T>(signed: &Signed<T>, what: &str) -> Result<(), Refusal> {
    match version_of(signed) {
        Some(v) if v < INVITE_VERSION => Err(Refusal::Outdated {
            what: what.to_string(),
        }),
        Some(v) if v > INVITE_VERSION => Err(Refusal::Malformed {
            what: what.to_string(),
            reason: format!("format version {v}, this node understands {INVITE_VERSION}"),
        }),
        _ => Ok(()),
    }
}

/// Verifies genesis → admission → invite against `federation`, at no particular time.
fn verify_chain(
    federation: &Federation,
    genesis: &Genesis,
    admission: &Admission,
    invite: &Signed<InviteBody>,
) -> Result<VerifiedInvite, Refusal> {
    let theirs = genesis.verify()?;
    if theirs.id != federation.id {
        return Err(Refusal::WrongFederation {
            what: "invite".into(),
            ours: federation.id.to_string(),
            theirs: theirs.id.to_string(),
        });
    }
    let adm = admission.verify(federation)?;
    current(invite, "invite")?;
    let claimed = invite.decode("invite")?;
    if claimed.federation != federation.id {
        return Err(Refusal::WrongFederation {
            what: "invite".into(),
            ours: federation.id.to_string(),
            theirs: claimed.federation.to_string(),
        });
    }
    if claimed.institution_key != adm.institution_key {
        // Signed by a key the federation never admitted (perhaps pasted next to another
        // institution's admission).
        return Err(Refusal::NotAdmitted {
            institution: adm.institution,
        });
    }
    let terms = invite.open(&adm.institution_key, domain::INVITE, "invite")?;
    if terms.role == Role::Coordinator {
        return Err(Refusal::Malformed {
            what: "invite".into(),
            reason: "institutions cannot invite coordinators".into(),
        });
    }
    Ok(VerifiedInvite {
        federation: federation.clone(),
        institution: adm.institution,
        institution_key: adm.institution_key,
        terms,
    })
}

impl Invite {
    /// Issues an invite with the institution's key.
    pub fn issue(
        admission: &Admission,
        institution_key: &SigningKey,
        role: Role,
        ttl: Duration,
        now: UnixTime,
    ) -> Result<Invite, Refusal> {
        let federation = admission.genesis.verify()?;
        let adm = admission.verify(&federation)?;
        if adm.institution_key != institution_key.public() {
            return Err(Refusal::NotAdmitted {
                institution: adm.institution,
            });
        }
        Ok(Invite::sign(admission, institution_key, role, ttl, now))
    }

    /// Signs an invite without checking that the admission is valid or matches the key. Verifiers
    /// check the whole chain anyway; this exists so that tests can build the forgeries they must
    /// refuse. Use [`Invite::issue`].
    pub fn sign(
        admission: &Admission,
        institution_key: &SigningKey,
        role: Role,
        ttl: Duration,
        now: UnixTime,
    ) -> Invite {
        let federation = admission
            .signed
            .decode("admission")
            .map(|a| a.federation)
            .unwrap_or_else(|_| FederationId(String::new()));
        let one_time = SigningKey::generate();
        let body = InviteBody {
            version: INVITE_VERSION,
            federation,
            institution_key: institution_key.public(),
            invite_key: one_time.public(),
            role,
            issued_at: now,
            expires_at: now.saturating_add(ttl.as_secs()),
            nonce: hex::encode(rand::random::<[u8; 8]>()),
        };
        Invite {
            genesis: admission.genesis.clone(),
            admission: admission.clone(),
            invite: institution_key.sign(domain::INVITE, &body),
            secret: Bytes(one_time.secret().to_vec()),
        }
    }

    /// What an attacker can rebuild from a member's proof: the genesis, the admission and the
    /// signed invite, but not the secret. `secret` is whatever the attacker guesses; tests use
    /// this to show that such an invite binds nothing.
    pub fn rebuilt_from(proof: &Proof, genesis: Genesis, secret: [u8; 32]) -> Option<Invite> {
        match proof {
            Proof::Member {
                admission, invite, ..
            } => Some(Invite {
                genesis,
                admission: admission.clone(),
                invite: invite.clone(),
                secret: Bytes(secret.to_vec()),
            }),
            Proof::Coordinator { .. } => None,
        }
    }

    /// The invite as one copy-pasteable string.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("invites always serialise");
        format!("{INVITE_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Parses an invite string. Whitespace around it (from copy-paste) is ignored.
    pub fn decode(s: &str) -> Result<Invite, Refusal> {
        let malformed = |reason: String| Refusal::Malformed {
            what: "invite".into(),
            reason,
        };
        let s = s.trim();
        if s.len() > MAX_DOCUMENT_BYTES {
            return Err(malformed(format!(
                "{} bytes, at most {MAX_DOCUMENT_BYTES}",
                s.len()
            )));
        }
        if s.starts_with("fminvite1.") {
            return Err(Refusal::Outdated {
                what: "invite".into(),
            });
        }
        let Some(payload) = s.strip_prefix(INVITE_PREFIX) else {
            return Err(malformed(format!(
                "an invite starts with `{INVITE_PREFIX}`; copy the whole string that \
                 `funcmesh invite create` printed"
            )));
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|e| malformed(format!("not valid base64 ({e}); was it truncated?")))?;
        let invite: Invite = serde_json::from_slice(&json)
            .map_err(|e| malformed(format!("undecodable ({e}); was it truncated?")))?;
        if invite.secret.0.len() != 32 {
            return Err(malformed("its one-time key is not 32 bytes".into()));
        }
        Ok(invite)
    }

    /// Verifies the chain genesis → admission → invite against `federation`, and that the invite
    /// is valid at `at`.
    pub fn verify(&self, federation: &Federation, at: UnixTime) -> Result<VerifiedInvite, Refusal> {
        let verified = verify_chain(federation, &self.genesis, &self.admission, &self.invite)?;
        verified.valid_at(at)?;
        Ok(verified)
    }

    /// The federation this invite claims to be for (verified).
    pub fn federation(&self) -> Result<Federation, Refusal> {
        self.genesis.verify()
    }

    fn one_time_key(&self) -> SigningKey {
        let mut secret = [0u8; 32];
        let n = self.secret.0.len().min(32);
        secret[..n].copy_from_slice(&self.secret.0[..n]);
        SigningKey::from_secret(secret)
    }
}

/// The joining node's signature binding its peer id to an invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingBody {
    /// Format version ([`INVITE_VERSION`]).
    pub version: u32,
    /// The federation.
    pub federation: FederationId,
    /// The bound peer.
    pub peer_id: String,
    /// The bound peer's public key (protobuf encoding, base64), from which `peer_id` derives.
    pub public_key: String,
    /// The digest of the invite's signed bytes.
    pub invite: String,
    /// When the node bound the invite (its own clock; a coordinator admits it only if this is
    /// recent by the coordinator's clock).
    pub bound_at: UnixTime,
}

/// The federation key's signature over one of its own coordinator nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorBody {
    /// Format version.
    pub version: u32,
    /// The federation.
    pub federation: FederationId,
    /// The coordinator's peer id.
    pub peer_id: String,
    /// When it was certified.
    pub issued_at: UnixTime,
}

/// A coordinator's statement that it admitted a binding at a time of its own clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    /// Format version ([`INVITE_VERSION`]).
    pub version: u32,
    /// The federation.
    pub federation: FederationId,
    /// The coordinator's public key (protobuf, base64); it must be the key of the peer id its
    /// certificate names.
    pub coordinator_key: String,
    /// The admitted peer.
    pub peer_id: String,
    /// The digest of the invite's signed bytes.
    pub invite: String,
    /// The digest of the binding's signed bytes.
    pub binding: String,
    /// When the coordinator admitted the node, by its clock.
    pub admitted_at: UnixTime,
}

/// A coordinator's receipt for one binding: its federation certificate, and its node key's
/// signature over the [`ReceiptBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    cert: Signed<CoordinatorBody>,
    receipt: Signed<ReceiptBody>,
}

/// A binding a coordinator found fit to admit: what it signs a [`Receipt`] for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joining {
    /// The joining peer.
    pub peer_id: String,
    /// The digest of the invite it used (one node per invite).
    pub invite: String,
    /// The digest of its binding.
    pub binding: String,
    /// Its institution.
    pub institution: String,
    /// Its role.
    pub role: Role,
}

fn decode_peer_key(b64: &str, what: &str) -> Result<PublicKey, Refusal> {
    let malformed = |reason: String| Refusal::Malformed {
        what: what.to_string(),
        reason,
    };
    let bytes = STANDARD.decode(b64).map_err(|e| malformed(e.to_string()))?;
    PublicKey::try_decode_protobuf(&bytes).map_err(|e| malformed(e.to_string()))
}

impl Receipt {
    /// Signs a receipt for `joining` as the coordinator whose proof is `own` and whose node key
    /// is `keypair`. `None` when `own` is not a coordinator's proof.
    pub fn issue(
        own: &Proof,
        keypair: &Keypair,
        joining: &Joining,
        now: UnixTime,
    ) -> Option<Receipt> {
        let Proof::Coordinator { cert } = own else {
            return None;
        };
        let federation = cert.decode("coordinator certificate").ok()?.federation;
        let body = ReceiptBody {
            version: INVITE_VERSION,
            federation,
            coordinator_key: STANDARD.encode(keypair.public().encode_protobuf()),
            peer_id: joining.peer_id.clone(),
            invite: joining.invite.clone(),
            binding: joining.binding.clone(),
            admitted_at: now,
        };
        let bytes = serde_json::to_vec(&body).expect("receipts always serialise");
        let sig = keypair
            .sign(&signing_input(domain::RECEIPT, &bytes))
            .expect("ed25519 signing cannot fail");
        Some(Receipt {
            cert: cert.clone(),
            receipt: Signed::new(bytes, sig),
        })
    }

    /// Encodes the receipt for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("receipts always serialise")
    }

    /// Decodes a receipt received from a peer; the size is checked before decoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Receipt, Refusal> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(Refusal::Malformed {
                what: "receipt".into(),
                reason: format!("{} bytes, at most {MAX_DOCUMENT_BYTES}", bytes.len()),
            });
        }
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed {
            what: "receipt".into(),
            reason: e.to_string(),
        })
    }

    /// Checks that a coordinator of `federation` admitted this binding of this invite for
    /// `presenter`, and returns when.
    fn check(
        &self,
        federation: &Federation,
        presenter: &PeerId,
        invite: &str,
        binding: &str,
    ) -> Result<UnixTime, Refusal> {
        let claimed = self.cert.decode("receipt's coordinator certificate")?;
        if claimed.federation != federation.id {
            return Err(Refusal::WrongFederation {
                what: "receipt".into(),
                ours: federation.id.to_string(),
                theirs: claimed.federation.to_string(),
            });
        }
        let cert = self.cert.open(
            &federation.key,
            domain::COORDINATOR,
            "receipt's coordinator certificate",
        )?;
        current(&self.receipt, "receipt")?;
        let body = self.receipt.decode("receipt")?;
        let key = decode_peer_key(&body.coordinator_key, "receipt")?;
        let forged = || Refusal::BadSignature {
            what: "receipt".into(),
        };
        if key.to_peer_id().to_string() != cert.peer_id
            || !key.verify(
                &signing_input(domain::RECEIPT, &self.receipt.bytes.body),
                &self.receipt.bytes.sig,
            )
        {
            return Err(forged());
        }
        if body.federation != federation.id || body.invite != invite || body.binding != binding {
            return Err(Refusal::Malformed {
                what: "receipt".into(),
                reason: "it was issued for another binding".into(),
            });
        }
        check_peer(&body.peer_id, presenter)?;
        Ok(body.admitted_at)
    }
}

/// A node's proof of membership, presented to every peer right after connecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Proof {
    /// A node invited by an admitted institution.
    Member {
        /// The institution's admission.
        admission: Admission,
        /// The invite's signed terms (not its secret).
        invite: Signed<InviteBody>,
        /// Its own binding.
        binding: Signed<BindingBody>,
        /// The invite's one-time key's signature over the binding: only the invite's holder
        /// could make it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endorsement: Option<Bytes>,
        /// A coordinator's receipt; a proof without one is still joining and counts only
        /// with a coordinator.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<Box<Receipt>>,
    },
    /// A coordinator certified by the federation key.
    Coordinator {
        /// The certificate.
        cert: Signed<CoordinatorBody>,
    },
}

/// A verified member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its peer id.
    pub peer_id: String,
    /// Its institution (`None` for coordinators, which belong to the federation itself).
    pub institution: Option<String>,
    /// Its institution's key, from the verified admission.
    #[serde(default)]
    pub institution_key: Option<Key>,
    /// Its role.
    pub role: Role,
    /// When it joined: when a coordinator admitted it (or was certified).
    pub joined_at: UnixTime,
    /// The digest of the invite it joined with (`None` for coordinators): one node per invite.
    #[serde(default)]
    pub invite: Option<String>,
}

/// A member's binding with everything but its receipt and its time checked.
struct Bound {
    body: BindingBody,
    invite: VerifiedInvite,
    invite_id: String,
    binding_id: String,
}

impl Proof {
    /// Makes the proof for a node joining with `invite` at `now` (checks the invite first). The
    /// proof still needs a coordinator's receipt: see [`Proof::with_receipt`].
    pub fn bind(
        invite: &Invite,
        node: &Keypair,
        now: UnixTime,
    ) -> Result<(Federation, Proof), Refusal> {
        let federation = invite.federation()?;
        invite.verify(&federation, now)?;
        Ok((
            federation.clone(),
            Proof::sign_binding(invite, &federation, node, now),
        ))
    }

    /// Binds an invite to `node` without checking the invite. Verifiers check everything; this
    /// exists so that tests can build the forgeries they must refuse. Use [`Proof::bind`].
    pub fn sign_binding(
        invite: &Invite,
        federation: &Federation,
        node: &Keypair,
        now: UnixTime,
    ) -> Proof {
        let body = BindingBody {
            version: INVITE_VERSION,
            federation: federation.id.clone(),
            peer_id: node.public().to_peer_id().to_string(),
            public_key: STANDARD.encode(node.public().encode_protobuf()),
            invite: invite.invite.digest(),
            bound_at: now,
        };
        let bytes = serde_json::to_vec(&body).expect("bindings always serialise");
        let sig = node
            .sign(&signing_input(domain::BINDING, &bytes))
            .expect("ed25519 signing cannot fail");
        let endorsement = invite
            .one_time_key()
            .0
            .sign(&signing_input(domain::ENDORSEMENT, &bytes))
            .to_bytes()
            .to_vec();
        Proof::Member {
            admission: invite.admission.clone(),
            invite: invite.invite.clone(),
            binding: Signed::new(bytes, sig),
            endorsement: Some(Bytes(endorsement)),
            receipt: None,
        }
    }

    /// The federation key certifies one of its coordinators.
    pub fn coordinator(
        federation: &Federation,
        federation_key: &SigningKey,
        peer: PeerId,
        now: UnixTime,
    ) -> Proof {
        let body = CoordinatorBody {
            version: FORMAT_VERSION,
            federation: federation.id.clone(),
            peer_id: peer.to_string(),
            issued_at: now,
        };
        Proof::Coordinator {
            cert: federation_key.sign(domain::COORDINATOR, &body),
        }
    }

    /// The proof with a coordinator's receipt attached.
    pub fn with_receipt(self, receipt: Receipt) -> Proof {
        match self {
            Proof::Member {
                admission,
                invite,
                binding,
                endorsement,
                ..
            } => Proof::Member {
                admission,
                invite,
                binding,
                endorsement,
                receipt: Some(Box::new(receipt)),
            },
            coordinator => coordinator,
        }
    }

    /// Whether this is a member's proof that no coordinator has admitted yet.
    pub fn is_joining(&self) -> bool {
        matches!(self, Proof::Member { receipt: None, .. })
    }

    /// Whether this is a coordinator's certificate.
    pub fn is_coordinator(&self) -> bool {
        matches!(self, Proof::Coordinator { .. })
    }

    /// Encodes the proof for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("proofs always serialise")
    }

    /// Decodes a proof received from a peer; the size is checked before decoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<Proof, Refusal> {
        let malformed = |reason: String| Refusal::Malformed {
            what: "proof".into(),
            reason,
        };
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(malformed(format!(
                "{} bytes, at most {MAX_DOCUMENT_BYTES}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))
    }

    /// Checks a member's binding: its signatures (the node's and the invite key's), and the
    /// invite chain, at no particular time.
    fn check_binding(
        federation: &Federation,
        presenter: &PeerId,
        admission: &Admission,
        invite: &Signed<InviteBody>,
        binding: &Signed<BindingBody>,
        endorsement: Option<&Bytes>,
    ) -> Result<Bound, Refusal> {
        current(binding, "membership proof")?;
        let claimed = binding.decode("binding")?;
        if claimed.federation != federation.id {
            return Err(Refusal::WrongFederation {
                what: "membership proof".into(),
                ours: federation.id.to_string(),
                theirs: claimed.federation.to_string(),
            });
        }
        check_peer(&claimed.peer_id, presenter)?;
        let key = decode_peer_key(&claimed.public_key, "binding")?;
        let forged = |what: &str| Refusal::BadSignature { what: what.into() };
        if key.to_peer_id() != *presenter
            || !key.verify(
                &signing_input(domain::BINDING, &binding.bytes.body),
                &binding.bytes.sig,
            )
            || claimed.invite != invite.digest()
        {
            return Err(forged("binding"));
        }
        let verified = verify_chain(federation, &federation.genesis, admission, invite)?;
        let endorsed = endorsement.is_some_and(|sig| {
            verified.terms.invite_key.verifies(
                &signing_input(domain::ENDORSEMENT, &binding.bytes.body),
                &sig.0,
            )
        });
        if !endorsed {
            return Err(forged(
                "binding (it is not signed with the invite's one-time key: an invite cannot be \
                 rebuilt from a member's proof)",
            ));
        }
        Ok(Bound {
            body: claimed,
            invite: verified,
            invite_id: invite.digest(),
            binding_id: binding.digest(),
        })
    }

    /// Verifies that `presenter` is a member of `federation`, using nothing but the federation's
    /// public key and the clock. A member's proof counts only with a coordinator's receipt.
    pub fn verify(
        &self,
        federation: &Federation,
        presenter: &PeerId,
        now: UnixTime,
    ) -> Result<Member, Refusal> {
        match self {
            Proof::Coordinator { cert } => {
                let claimed = cert.decode("coordinator certificate")?;
                if claimed.federation != federation.id {
                    return Err(Refusal::WrongFederation {
                        what: "coordinator certificate".into(),
                        ours: federation.id.to_string(),
                        theirs: claimed.federation.to_string(),
                    });
                }
                let body = cert.open(
                    &federation.key,
                    domain::COORDINATOR,
                    "coordinator certificate",
                )?;
                check_peer(&body.peer_id, presenter)?;
                Ok(Member {
                    peer_id: body.peer_id,
                    institution: None,
                    institution_key: None,
                    role: Role::Coordinator,
                    joined_at: body.issued_at,
                    invite: None,
                })
            }
            Proof::Member {
                admission,
                invite,
                binding,
                endorsement,
                receipt,
            } => {
                let bound = Proof::check_binding(
                    federation,
                    presenter,
                    admission,
                    invite,
                    binding,
                    endorsement.as_ref(),
                )?;
                let receipt = receipt.as_deref().ok_or(Refusal::NoReceipt)?;
                let admitted_at =
                    receipt.check(federation, presenter, &bound.invite_id, &bound.binding_id)?;
                // The invite's window is judged by the coordinator's clock, not the joiner's.
                bound.invite.valid_at(admitted_at)?;
                if admitted_at > now.saturating_add(CLOCK_SKEW.as_secs()) {
                    return Err(Refusal::NotYetValid {
                        what: "receipt".into(),
                        at: rfc3339(admitted_at),
                    });
                }
                Ok(Member {
                    peer_id: bound.body.peer_id,
                    institution: Some(bound.invite.institution),
                    institution_key: Some(bound.invite.institution_key),
                    role: bound.invite.terms.role,
                    joined_at: admitted_at,
                    invite: Some(bound.invite_id),
                })
            }
        }
    }

    /// What a coordinator checks before it signs a receipt: the whole chain, that the invite is
    /// valid now by the coordinator's clock, and that the binding is fresh (made within
    /// [`JOIN_WINDOW`]), so that nobody joins with an old binding. Whether the invite was used
    /// already is for the caller to check against the registry.
    pub fn verify_joining(
        &self,
        federation: &Federation,
        presenter: &PeerId,
        now: UnixTime,
    ) -> Result<Joining, Refusal> {
        let Proof::Member {
            admission,
            invite,
            binding,
            endorsement,
            ..
        } = self
        else {
            return Err(Refusal::Malformed {
                what: "proof".into(),
                reason: "a coordinator does not join; it is certified by the federation key".into(),
            });
        };
        let bound = Proof::check_binding(
            federation,
            presenter,
            admission,
            invite,
            binding,
            endorsement.as_ref(),
        )?;
        bound.invite.valid_at(now)?;
        if bound.body.bound_at.saturating_add(JOIN_WINDOW.as_secs()) < now {
            return Err(Refusal::Stale {
                bound_at: rfc3339(bound.body.bound_at),
            });
        }
        if bound.body.bound_at > now.saturating_add(CLOCK_SKEW.as_secs()) {
            return Err(Refusal::NotYetValid {
                what: "binding".into(),
                at: rfc3339(bound.body.bound_at),
            });
        }
        Ok(Joining {
            peer_id: bound.body.peer_id,
            invite: bound.invite_id,
            binding: bound.binding_id,
            institution: bound.invite.institution,
            role: bound.invite.terms.role,
        })
    }

    /// The federation the proof claims, without verifying it (for error messages).
    pub fn claimed_federation(&self) -> Option<FederationId> {
        match self {
            Proof::Coordinator { cert } => cert.decode("coordinator").ok().map(|b| b.federation),
            Proof::Member { binding, .. } => binding.decode("binding").ok().map(|b| b.federation),
        }
    }
}

/// Proofs that verified, by presenter and the digest of their exact bytes.
///
/// A member presents the same proof at every connection and member-list swap, and a member's
/// proof is six signatures to check; under bounded connections the same pairs meet again all
/// the time. A proof that verified once verifies forever (its only use of the clock is that the
/// receipt is not from the future, which stays true), so its verdict is kept. What can change —
/// revocation, an invite used by another node — is checked by the caller every time. Another
/// presenter, or one changed byte, is another key: it is verified from scratch.
#[derive(Debug, Default)]
pub(crate) struct VerifiedProofs {
    members: HashMap<(PeerId, [u8; 32]), Member>,
}

/// Key of [`VerifiedProofs`].
pub(crate) type ProofKey = (PeerId, [u8; 32]);

impl VerifiedProofs {
    /// Most verdicts kept: past it they are all dropped (verifying again is only slower).
    const MOST: usize = 4096;

    /// The key of `bytes` presented by `presenter`.
    pub(crate) fn key(presenter: &PeerId, bytes: &[u8]) -> ProofKey {
        (*presenter, Sha256::digest(bytes).into())
    }

    /// The member these bytes verified as, from this presenter.
    pub(crate) fn get(&self, key: &ProofKey) -> Option<&Member> {
        self.members.get(key)
    }

    /// Keeps a verdict of [`Proof::verify`] (never of a joining proof: that is judged once).
    pub(crate) fn insert(&mut self, key: ProofKey, member: Member) {
        if self.members.len() >= Self::MOST {
            self.members.clear();
        }
        self.members.insert(key, member);
    }

    /// Verdicts kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }
}

fn check_peer(owner: &str, presenter: &PeerId) -> Result<(), Refusal> {
    if owner != presenter.to_string() {
        return Err(Refusal::WrongPeer {
            owner: owner.to_string(),
            presenter: presenter.to_string(),
        });
    }
    Ok(())
}

/// Formats Unix seconds as RFC 3339.
pub fn rfc3339(t: UnixTime) -> String {
    // RFC 3339 ends with the year 9999; later times (a signer may write any) stay numbers.
    const LAST: UnixTime = 253_402_300_799;
    if t > LAST {
        return format!("{t} (Unix seconds, after the year 9999)");
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// Current Unix time in seconds.
pub fn unix_now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixTime = 1_800_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    struct World {
        fed: Federation,
        fed_key: SigningKey,
        inst_key: SigningKey,
        admission: Admission,
        coordinator: Keypair,
        coordinator_proof: Proof,
    }

    fn world() -> World {
        let fed_key = SigningKey::generate();
        let fed = Genesis::create("test", &fed_key, NOW).verify().unwrap();
        let inst_key = SigningKey::generate();
        let admission = Admission::issue(&fed, &fed_key, "uni-a", inst_key.public(), NOW);
        let coordinator = Keypair::generate_ed25519();
        let coordinator_proof =
            Proof::coordinator(&fed, &fed_key, coordinator.public().to_peer_id(), NOW);
        World {
            fed,
            fed_key,
            inst_key,
            admission,
            coordinator,
            coordinator_proof,
        }
    }

    impl World {
        /// What the coordinator does with a joining proof at `now`.
        fn admit(&self, proof: Proof, node: &Keypair, now: UnixTime) -> Result<Proof, Refusal> {
            let joining = proof.verify_joining(&self.fed, &node.public().to_peer_id(), now)?;
            let receipt =
                Receipt::issue(&self.coordinator_proof, &self.coordinator, &joining, now).unwrap();
            Ok(proof.with_receipt(receipt))
        }

        fn member(&self, role: Role) -> (Keypair, Proof) {
            let invite = Invite::issue(&self.admission, &self.inst_key, role, HOUR, NOW).unwrap();
            let node = Keypair::generate_ed25519();
            let (_, proof) = Proof::bind(&invite, &node, NOW).unwrap();
            let proof = self.admit(proof, &node, NOW + 1).unwrap();
            (node, proof)
        }
    }

    #[test]
    fn a_kept_verdict_is_found_only_for_its_presenter_and_its_exact_bytes() {
        let w = world();
        let (node, proof) = w.member(Role::Endpoint);
        let peer = node.public().to_peer_id();
        let bytes = proof.to_bytes();
        let member = proof.verify(&w.fed, &peer, NOW + 2).unwrap();
        let mut kept = VerifiedProofs::default();
        kept.insert(VerifiedProofs::key(&peer, &bytes), member.clone());
        assert_eq!(kept.get(&VerifiedProofs::key(&peer, &bytes)), Some(&member));
        // Someone else presenting the same bytes is verified from scratch (and refused).
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(kept.get(&VerifiedProofs::key(&other, &bytes)).is_none());
        assert!(matches!(
            proof.verify(&w.fed, &other, NOW + 2),
            Err(Refusal::WrongPeer { .. })
        ));
        // So is any change to the bytes.
        let mut changed = bytes.clone();
        let last = changed.len() - 2;
        changed[last] ^= 1;
        assert!(kept.get(&VerifiedProofs::key(&peer, &changed)).is_none());
        // Bounded: past the most kept, the verdicts start over.
        for i in 0..VerifiedProofs::MOST + 10 {
            kept.insert(VerifiedProofs::key(&peer, &i.to_le_bytes()), member.clone());
        }
        assert!(kept.len() <= VerifiedProofs::MOST);
        assert!(kept.get(&VerifiedProofs::key(&peer, &bytes)).is_none());
    }

    #[test]
    fn any_signed_time_formats_without_panicking() {
        assert_eq!(rfc3339(NOW), "2027-01-15T08:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(rfc3339(u64::MAX).contains("after the year 9999"));
    }

    #[test]
    fn a_bound_invite_verifies_for_its_peer_only_once_a_coordinator_admitted_it() {
        let w = world();
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        let invite = Invite::decode(&invite.encode()).unwrap();
        let node = Keypair::generate_ed25519();
        let peer = node.public().to_peer_id();
        let (fed, proof) = Proof::bind(&invite, &node, NOW + 10).unwrap();
        assert_eq!(fed, w.fed);
        assert!(proof.is_joining());
        assert_eq!(
            proof.verify(&w.fed, &peer, NOW + 20),
            Err(Refusal::NoReceipt)
        );
        let proof = w.admit(proof, &node, NOW + 15).unwrap();
        let proof = Proof::from_bytes(&proof.to_bytes()).unwrap();
        let member = proof.verify(&w.fed, &peer, NOW + 20).unwrap();
        assert_eq!(member.institution.as_deref(), Some("uni-a"));
        assert_eq!(member.role, Role::Endpoint);
        assert_eq!(member.joined_at, NOW + 15, "the coordinator's time");
        assert!(member.invite.is_some());
        // Membership outlives the invite: the invite was judged when the coordinator admitted.
        assert!(proof.verify(&w.fed, &peer, NOW + 10 * 3600).is_ok());

        let thief = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            proof.verify(&w.fed, &thief, NOW),
            Err(Refusal::WrongPeer { .. })
        ));
    }

    #[test]
    fn expired_and_future_invites_are_refused() {
        let w = world();
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Client, HOUR, NOW).unwrap();
        let node = Keypair::generate_ed25519();
        assert!(matches!(
            Proof::bind(&invite, &node, NOW + 7200),
            Err(Refusal::Expired { .. })
        ));
        assert!(matches!(
            Proof::bind(&invite, &node, NOW - 3600),
            Err(Refusal::NotYetValid { .. })
        ));
    }

    /// The attack of issue 17: a binding dated inside the invite's window, made (or presented)
    /// after it. The coordinator judges the invite by its own clock and the binding's age.
    #[test]
    fn a_back_dated_binding_is_refused_by_the_coordinator() {
        let w = world();
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        let node = Keypair::generate_ed25519();
        // Made "at NOW + 60", inside the window, but presented two hours later.
        let late = Proof::sign_binding(&invite, &w.fed, &node, NOW + 60);
        assert!(matches!(
            w.admit(late.clone(), &node, NOW + 2 * 3600),
            Err(Refusal::Expired { .. })
        ));
        // A long invite, but a binding older than the join window.
        let long = Invite::issue(
            &w.admission,
            &w.inst_key,
            Role::Endpoint,
            Duration::from_secs(30 * 86400),
            NOW,
        )
        .unwrap();
        let old = Proof::sign_binding(&long, &w.fed, &node, NOW);
        assert!(matches!(
            w.admit(old.clone(), &node, NOW + JOIN_WINDOW.as_secs() + 60),
            Err(Refusal::Stale { .. })
        ));
        assert!(
            w.admit(old, &node, NOW + 60).is_ok(),
            "fresh, it is admitted"
        );
    }

    /// The attack of issue 17: everything a member publishes (its proof) rebuilt into an invite.
    #[test]
    fn an_invite_rebuilt_from_a_published_proof_binds_nothing() {
        let w = world();
        let (_, proof) = w.member(Role::Endpoint);
        let rebuilt = Invite::rebuilt_from(&proof, w.fed.genesis.clone(), rand::random()).unwrap();
        // It decodes and its chain verifies: only the one-time key is missing.
        let rebuilt = Invite::decode(&rebuilt.encode()).unwrap();
        assert!(rebuilt.verify(&w.fed, NOW + 60).is_ok());
        let thief = Keypair::generate_ed25519();
        let (_, forged) = Proof::bind(&rebuilt, &thief, NOW + 60).unwrap();
        let err = w.admit(forged, &thief, NOW + 60).unwrap_err();
        assert!(
            matches!(&err, Refusal::BadSignature { what } if what.contains("one-time key")),
            "{err}"
        );
        // Nor does the member's receipt help another binding.
        let Proof::Member { receipt, .. } = proof else {
            panic!()
        };
        let (_, forged) = Proof::bind(&rebuilt, &thief, NOW + 60).unwrap();
        let forged = forged.with_receipt(*receipt.unwrap());
        assert!(
            forged
                .verify(&w.fed, &thief.public().to_peer_id(), NOW + 60)
                .is_err()
        );
    }

    #[test]
    fn receipts_come_from_certified_coordinators_for_this_binding_only() {
        let w = world();
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        let node = Keypair::generate_ed25519();
        let peer = node.public().to_peer_id();
        let (_, proof) = Proof::bind(&invite, &node, NOW).unwrap();
        let joining = proof.verify_joining(&w.fed, &peer, NOW).unwrap();
        // A node whose certificate was not signed by the federation key.
        let impostor = Keypair::generate_ed25519();
        let fake_cert = Proof::coordinator(
            &w.fed,
            &SigningKey::generate(),
            impostor.public().to_peer_id(),
            NOW,
        );
        let receipt = Receipt::issue(&fake_cert, &impostor, &joining, NOW).unwrap();
        assert!(matches!(
            proof
                .clone()
                .with_receipt(receipt)
                .verify(&w.fed, &peer, NOW),
            Err(Refusal::BadSignature { .. })
        ));
        // A real certificate, signed by another key than the coordinator's.
        let receipt = Receipt::issue(&w.coordinator_proof, &impostor, &joining, NOW).unwrap();
        assert!(matches!(
            proof
                .clone()
                .with_receipt(receipt)
                .verify(&w.fed, &peer, NOW),
            Err(Refusal::BadSignature { .. })
        ));
        // A real receipt for another binding of the same node.
        let (_, other) = Proof::bind(&invite, &node, NOW + 1).unwrap();
        let other_joining = other.verify_joining(&w.fed, &peer, NOW + 1).unwrap();
        let receipt =
            Receipt::issue(&w.coordinator_proof, &w.coordinator, &other_joining, NOW).unwrap();
        assert!(
            proof
                .clone()
                .with_receipt(receipt)
                .verify(&w.fed, &peer, NOW)
                .is_err()
        );
        // Members do not issue receipts.
        let (member, member_proof) = w.member(Role::Endpoint);
        assert!(Receipt::issue(&member_proof, &member, &joining, NOW).is_none());
    }

    #[test]
    fn first_format_invites_and_proofs_are_refused_with_the_way_to_rejoin() {
        let err = Invite::decode("fminvite1.eyJnZW5lc2lzIjp7fX0").unwrap_err();
        assert!(matches!(err, Refusal::Outdated { .. }), "{err}");
        assert!(err.to_string().contains("funcmesh join"), "{err}");
        // A version-1 binding (re-signed, so only the version differs).
        let w = world();
        let (node, proof) = w.member(Role::Endpoint);
        let Proof::Member {
            admission,
            invite,
            binding,
            endorsement,
            receipt,
        } = proof
        else {
            panic!()
        };
        let mut body = binding.decode("binding").unwrap();
        body.version = 1;
        let bytes = serde_json::to_vec(&body).unwrap();
        let sig = node.sign(&signing_input(domain::BINDING, &bytes)).unwrap();
        let old = Proof::Member {
            admission,
            invite,
            binding: Signed::new(bytes, sig),
            endorsement,
            receipt,
        };
        let err = old
            .verify(&w.fed, &node.public().to_peer_id(), NOW)
            .unwrap_err();
        assert!(matches!(err, Refusal::Outdated { .. }), "{err}");
    }

    #[test]
    fn unadmitted_institution_is_refused() {
        let w = world();
        let rogue_fed_key = SigningKey::generate();
        let rogue_inst = SigningKey::generate();
        // An admission signed by a key that is not the federation's.
        let forged = Admission::issue(&w.fed, &rogue_fed_key, "rogue", rogue_inst.public(), NOW);
        let err = Invite::issue(&forged, &rogue_inst, Role::Endpoint, HOUR, NOW).unwrap_err();
        assert!(matches!(err, Refusal::NotAdmitted { .. }), "{err}");
        // A real admission of A, but an invite signed by an unadmitted key.
        let mut invite =
            Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        invite.invite = rogue_inst.sign(
            domain::INVITE,
            &InviteBody {
                institution_key: rogue_inst.public(),
                ..invite.invite.decode("invite").unwrap()
            },
        );
        assert!(matches!(
            invite.verify(&w.fed, NOW),
            Err(Refusal::NotAdmitted { .. })
        ));
    }

    #[test]
    fn tampered_documents_are_forgeries() {
        let w = world();
        let (node, proof) = w.member(Role::Endpoint);
        let peer = node.public().to_peer_id();
        let Proof::Member {
            admission,
            invite,
            binding,
            endorsement,
            receipt,
        } = proof
        else {
            panic!()
        };
        let rebuild = |invite: &Signed<InviteBody>, binding: &Signed<BindingBody>| Proof::Member {
            admission: admission.clone(),
            invite: invite.clone(),
            binding: binding.clone(),
            endorsement: endorsement.clone(),
            receipt: receipt.clone(),
        };
        let mut b = binding.clone();
        b.tamper();
        assert!(rebuild(&invite, &b).verify(&w.fed, &peer, NOW).is_err());
        let mut i = invite.clone();
        i.tamper();
        assert!(rebuild(&i, &binding).verify(&w.fed, &peer, NOW).is_err());
        assert!(
            rebuild(&invite, &binding)
                .verify(&w.fed, &peer, NOW)
                .is_ok()
        );
    }

    #[test]
    fn another_federations_invite_is_refused() {
        let w = world();
        let other = world();
        let invite =
            Invite::issue(&other.admission, &other.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        assert!(matches!(
            invite.verify(&w.fed, NOW),
            Err(Refusal::WrongFederation { .. })
        ));
        let node = Keypair::generate_ed25519();
        let (_, proof) = Proof::bind(&invite, &node, NOW).unwrap();
        assert!(matches!(
            proof.verify_joining(&w.fed, &node.public().to_peer_id(), NOW),
            Err(Refusal::WrongFederation { .. })
        ));
        let (node, proof) = other.member(Role::Endpoint);
        assert!(matches!(
            proof.verify(&w.fed, &node.public().to_peer_id(), NOW),
            Err(Refusal::WrongFederation { .. })
        ));
    }

    #[test]
    fn coordinators_are_certified_by_the_federation_key() {
        let w = world();
        let node = Keypair::generate_ed25519();
        let peer = node.public().to_peer_id();
        let proof = Proof::coordinator(&w.fed, &w.fed_key, peer, NOW);
        assert_eq!(
            proof.verify(&w.fed, &peer, NOW).unwrap().role,
            Role::Coordinator
        );
        let forged = Proof::coordinator(&w.fed, &SigningKey::generate(), peer, NOW);
        assert!(matches!(
            forged.verify(&w.fed, &peer, NOW),
            Err(Refusal::BadSignature { .. })
        ));
    }

    #[test]
    fn truncated_and_garbage_invites_are_malformed() {
        let w = world();
        let s = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW)
            .unwrap()
            .encode();
        for cut in [0, 5, INVITE_PREFIX.len(), s.len() / 2, s.len() - 1] {
            assert!(
                matches!(Invite::decode(&s[..cut]), Err(Refusal::Malformed { .. })),
                "{cut}"
            );
        }
        assert!(Invite::decode("hello").is_err());
        assert!(Invite::decode(&format!("  {s}\n")).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let w = world();
            let peer = Keypair::generate_ed25519().public().to_peer_id();
            if let Ok(p) = Proof::from_bytes(&bytes) {
                let _ = p.verify(&w.fed, &peer, NOW);
                let _ = p.verify_joining(&w.fed, &peer, NOW);
            }
            let _ = Receipt::from_bytes(&bytes);
            let s = String::from_utf8_lossy(&bytes);
            let _ = Invite::decode(&s);
            let _ = Invite::decode(&format!("{INVITE_PREFIX}{s}"));
        }

        #[test]
        fn mutated_proofs_never_verify_for_another_chain(idx in 0usize..8192, bit in 0u8..8) {
            let w = world();
            let (node, proof) = w.member(Role::Endpoint);
            let peer = node.public().to_peer_id();
            let mut bytes = proof.to_bytes();
            let i = idx % bytes.len();
            bytes[i] ^= 1 << bit;
            if let Ok(p) = Proof::from_bytes(&bytes) {
                if let Ok(m) = p.verify(&w.fed, &peer, NOW) {
                    // A flip that survives decoding may only touch bytes that do not matter
                    // (e.g. JSON whitespace never appears, so it must decode to the same proof).
                    proptest::prop_assert_eq!(m.peer_id, peer.to_string());
                    proptest::prop_assert_eq!(p, proof);
                }
            }
        }
    }
}
