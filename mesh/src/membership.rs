//! Federation membership: the signed chain that lets any peer check, offline and with nothing but
//! the federation's public key, that another peer is a member.
//!
//! The chain is `genesis → admission → invite → binding`:
//!
//! * the **genesis** names the federation and its root key, signed by that key; the federation id
//!   is the hash of the signed genesis bytes, so two federations with the same name differ;
//! * an **admission** is the federation key's signature over an institution's key;
//! * an **invite** is the institution key's signature over a role and a validity window;
//! * a **binding** is the joining node's own signature (with its libp2p identity key) over the
//!   invite, its peer id and the time it joined.
//!
//! Coordinators are the federation's own nodes: the federation key signs their peer id directly.
//!
//! Everything here is sans-IO: bytes and `now` in, verdicts out. Every signed document carries the
//! exact bytes that were signed (`body`), so verification never depends on re-serialising.

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

/// Version of every membership document this code writes and accepts.
pub const FORMAT_VERSION: u32 = 1;
/// Prefix of an invite string; the version is part of it so old strings fail with a clear error.
pub const INVITE_PREFIX: &str = "fminvite1.";
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
    pub(super) const INVITE: &str = "funcmesh/invite/1";
    pub(super) const BINDING: &str = "funcmesh/binding/1";
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
    /// Format version.
    pub version: u32,
    /// The federation joined.
    pub federation: FederationId,
    /// The inviting institution's key.
    pub institution_key: Key,
    /// The role the joining node takes.
    pub role: Role,
    /// Valid from.
    pub issued_at: UnixTime,
    /// Valid until (the moment of joining must fall before it).
    pub expires_at: UnixTime,
    /// Makes every invite distinct.
    pub nonce: String,
}

/// An invite: the copy-pasteable string `funcmesh invite create` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// The federation's genesis: all a new node needs to verify everyone else.
    pub genesis: Genesis,
    /// The institution's admission.
    pub admission: Admission,
    invite: Signed<InviteBody>,
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
        let body = InviteBody {
            version: FORMAT_VERSION,
            federation,
            institution_key: institution_key.public(),
            role,
            issued_at: now,
            expires_at: now.saturating_add(ttl.as_secs()),
            nonce: hex::encode(rand::random::<[u8; 8]>()),
        };
        Invite {
            genesis: admission.genesis.clone(),
            admission: admission.clone(),
            invite: institution_key.sign(domain::INVITE, &body),
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
        let Some(payload) = s.strip_prefix(INVITE_PREFIX) else {
            return Err(malformed(format!(
                "an invite starts with `{INVITE_PREFIX}`; copy the whole string that \
                 `funcmesh invite create` printed"
            )));
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|e| malformed(format!("not valid base64 ({e}); was it truncated?")))?;
        serde_json::from_slice(&json)
            .map_err(|e| malformed(format!("undecodable ({e}); was it truncated?")))
    }

    /// Verifies the chain genesis → admission → invite against `federation`, and that the invite
    /// is valid at `at`.
    pub fn verify(&self, federation: &Federation, at: UnixTime) -> Result<VerifiedInvite, Refusal> {
        let theirs = self.genesis.verify()?;
        if theirs.id != federation.id {
            return Err(Refusal::WrongFederation {
                what: "invite".into(),
                ours: federation.id.to_string(),
                theirs: theirs.id.to_string(),
            });
        }
        let adm = self.admission.verify(federation)?;
        let claimed = self.invite.decode("invite")?;
        if claimed.version != FORMAT_VERSION {
            return Err(unsupported("invite", claimed.version));
        }
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
        let terms = self
            .invite
            .open(&adm.institution_key, domain::INVITE, "invite")?;
        if terms.role == Role::Coordinator {
            return Err(Refusal::Malformed {
                what: "invite".into(),
                reason: "institutions cannot invite coordinators".into(),
            });
        }
        if at > terms.expires_at {
            return Err(Refusal::Expired {
                expired_at: rfc3339(terms.expires_at),
                used_at: rfc3339(at),
            });
        }
        if at.saturating_add(CLOCK_SKEW.as_secs()) < terms.issued_at {
            return Err(Refusal::NotYetValid {
                what: "invite".into(),
                at: rfc3339(terms.issued_at),
            });
        }
        Ok(VerifiedInvite {
            federation: federation.clone(),
            institution: adm.institution,
            institution_key: adm.institution_key,
            terms,
        })
    }

    /// The federation this invite claims to be for (verified).
    pub fn federation(&self) -> Result<Federation, Refusal> {
        self.genesis.verify()
    }
}

/// The joining node's signature binding its peer id to an invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingBody {
    /// Format version.
    pub version: u32,
    /// The federation.
    pub federation: FederationId,
    /// The bound peer.
    pub peer_id: String,
    /// The bound peer's public key (protobuf encoding, base64), from which `peer_id` derives.
    pub public_key: String,
    /// The digest of the invite's signed bytes.
    pub invite: String,
    /// When the node joined; must fall in the invite's validity window.
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

/// A node's proof of membership, presented to every peer right after connecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Proof {
    /// A node invited by an admitted institution.
    Member {
        /// The institution's admission.
        admission: Admission,
        /// The invite it was given.
        invite: Signed<InviteBody>,
        /// Its own binding.
        binding: Signed<BindingBody>,
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
    /// When it joined.
    pub joined_at: UnixTime,
}

impl Proof {
    /// Makes the proof for a node joining with `invite` at `now` (checks the invite first).
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
            version: FORMAT_VERSION,
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
        Proof::Member {
            admission: invite.admission.clone(),
            invite: invite.invite.clone(),
            binding: Signed::new(bytes, sig),
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

    /// Verifies that `presenter` is a member of `federation`, using nothing but the federation's
    /// public key and the clock.
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
                })
            }
            Proof::Member {
                admission,
                invite,
                binding,
            } => {
                let claimed = binding.decode("binding")?;
                if claimed.version != FORMAT_VERSION {
                    return Err(unsupported("binding", claimed.version));
                }
                if claimed.federation != federation.id {
                    return Err(Refusal::WrongFederation {
                        what: "membership proof".into(),
                        ours: federation.id.to_string(),
                        theirs: claimed.federation.to_string(),
                    });
                }
                check_peer(&claimed.peer_id, presenter)?;
                let key_bytes =
                    STANDARD
                        .decode(&claimed.public_key)
                        .map_err(|e| Refusal::Malformed {
                            what: "binding".into(),
                            reason: e.to_string(),
                        })?;
                let key =
                    PublicKey::try_decode_protobuf(&key_bytes).map_err(|e| Refusal::Malformed {
                        what: "binding".into(),
                        reason: e.to_string(),
                    })?;
                if key.to_peer_id() != *presenter {
                    return Err(Refusal::BadSignature {
                        what: "binding".into(),
                    });
                }
                if !key.verify(
                    &signing_input(domain::BINDING, &binding.bytes.body),
                    &binding.bytes.sig,
                ) {
                    return Err(Refusal::BadSignature {
                        what: "binding".into(),
                    });
                }
                if claimed.invite != invite.digest() {
                    return Err(Refusal::BadSignature {
                        what: "binding".into(),
                    });
                }
                let chain = Invite {
                    genesis: federation.genesis.clone(),
                    admission: admission.clone(),
                    invite: invite.clone(),
                };
                let verified = chain.verify(federation, claimed.bound_at)?;
                if claimed.bound_at > now.saturating_add(CLOCK_SKEW.as_secs()) {
                    return Err(Refusal::NotYetValid {
                        what: "binding".into(),
                        at: rfc3339(claimed.bound_at),
                    });
                }
                Ok(Member {
                    peer_id: claimed.peer_id,
                    institution: Some(verified.institution),
                    institution_key: Some(verified.institution_key),
                    role: verified.terms.role,
                    joined_at: claimed.bound_at,
                })
            }
        }
    }

    /// The federation the proof claims, without verifying it (for error messages).
    pub fn claimed_federation(&self) -> Option<FederationId> {
        match self {
            Proof::Coordinator { cert } => cert.decode("coordinator").ok().map(|b| b.federation),
            Proof::Member { binding, .. } => binding.decode("binding").ok().map(|b| b.federation),
        }
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
    }

    fn world() -> World {
        let fed_key = SigningKey::generate();
        let fed = Genesis::create("test", &fed_key, NOW).verify().unwrap();
        let inst_key = SigningKey::generate();
        let admission = Admission::issue(&fed, &fed_key, "uni-a", inst_key.public(), NOW);
        World {
            fed,
            fed_key,
            inst_key,
            admission,
        }
    }

    #[test]
    fn any_signed_time_formats_without_panicking() {
        assert_eq!(rfc3339(NOW), "2027-01-15T08:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(rfc3339(u64::MAX).contains("after the year 9999"));
    }

    #[test]
    fn a_bound_invite_verifies_for_its_peer_only() {
        let w = world();
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        let invite = Invite::decode(&invite.encode()).unwrap();
        let node = Keypair::generate_ed25519();
        let (fed, proof) = Proof::bind(&invite, &node, NOW + 10).unwrap();
        assert_eq!(fed, w.fed);
        let proof = Proof::from_bytes(&proof.to_bytes()).unwrap();
        let member = proof
            .verify(&w.fed, &node.public().to_peer_id(), NOW + 20)
            .unwrap();
        assert_eq!(member.institution.as_deref(), Some("uni-a"));
        assert_eq!(member.role, Role::Endpoint);
        // Membership outlives the invite: it is checked at the moment of joining.
        assert!(
            proof
                .verify(&w.fed, &node.public().to_peer_id(), NOW + 10 * 3600)
                .is_ok()
        );

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
        let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
        let node = Keypair::generate_ed25519();
        let (_, proof) = Proof::bind(&invite, &node, NOW).unwrap();
        let Proof::Member {
            admission,
            invite,
            mut binding,
        } = proof.clone()
        else {
            panic!()
        };
        binding.tamper();
        let forged = Proof::Member {
            admission,
            invite,
            binding,
        };
        assert!(
            forged
                .verify(&w.fed, &node.public().to_peer_id(), NOW)
                .is_err()
        );

        let Proof::Member {
            admission,
            mut invite,
            binding,
        } = proof
        else {
            panic!()
        };
        invite.tamper();
        let forged = Proof::Member {
            admission,
            invite,
            binding,
        };
        assert!(
            forged
                .verify(&w.fed, &node.public().to_peer_id(), NOW)
                .is_err()
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
            }
            let s = String::from_utf8_lossy(&bytes);
            let _ = Invite::decode(&s);
            let _ = Invite::decode(&format!("{INVITE_PREFIX}{s}"));
        }

        #[test]
        fn mutated_proofs_never_verify_for_another_chain(idx in 0usize..4096, bit in 0u8..8) {
            let w = world();
            let invite = Invite::issue(&w.admission, &w.inst_key, Role::Endpoint, HOUR, NOW).unwrap();
            let node = Keypair::generate_ed25519();
            let peer = node.public().to_peer_id();
            let (_, proof) = Proof::bind(&invite, &node, NOW).unwrap();
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
