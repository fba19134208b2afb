//! The one ed25519 public key type of funcmesh: an entry's author, an institution's or the
//! federation's key, a node's registry identity. Base64 in text. (mesh and capability use it
//! too.)

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// An ed25519 public key. Base64 in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The public half of `signer`.
    pub fn of(signer: &ed25519_dalek::SigningKey) -> Key {
        Key(signer.verifying_key().to_bytes())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

impl std::str::FromStr for Key {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| format!("not base64: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
        Ok(Key(arr))
    }
}

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Key {
    /// Checks `sig` over `message` with this key.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        ed25519_dalek::Verifier::verify(&key, message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// Derives an id bound to its owner: `hex(sha256(kind ‖ owner ‖ discriminator))[..32]`.
pub fn owned_id(kind: &str, owner: &Key, discriminator: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"funcmesh/id/v1\0");
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(owner.0);
    h.update(discriminator);
    hex::encode(&h.finalize()[..16])
}
