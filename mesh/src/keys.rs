//! Key files: the node's libp2p identity, and federation and institution signing keys.
//!
//! Secret key files are JSON with a format version and a kind, written with mode 0600 so that
//! only the owner can read them; public key files (`*.pub`) are plain JSON and meant to be shared.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use crate::membership::{Key, SigningKey};

/// What a key file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// A node's libp2p identity.
    Node,
    /// A federation root key.
    Federation,
    /// An institution key.
    Institution,
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyKind::Node => "node",
            KeyKind::Federation => "federation",
            KeyKind::Institution => "institution",
        })
    }
}

/// Key file errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written (the cause is the error's source, so that a chain
    /// printed with `{:#}` names it once).
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a key file of the expected kind.
    #[error("{path} is not a funcmesh {expected} key file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The kind expected.
        expected: KeyKind,
        /// What is wrong.
        reason: String,
    },
    /// Refusing to overwrite a key.
    #[error("{0} already exists; refusing to overwrite a key (remove it or choose another path)")]
    Exists(PathBuf),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    version: u32,
    kind: KeyKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    secret: String,
}

/// A shareable public key file (`*.pub`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    /// Format version.
    pub version: u32,
    /// What the key is.
    pub kind: KeyKind,
    /// The owner's name.
    pub name: String,
    /// The key.
    pub public_key: Key,
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists(path.to_path_buf())
            } else {
                io(e)
            }
        })?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_secret(path: &Path, expected: KeyKind) -> Result<(SecretFile, [u8; 32]), Error> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_path_buf(),
        expected,
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file: SecretFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if file.version != 1 {
        return Err(invalid(format!(
            "format version {}, expected 1",
            file.version
        )));
    }
    if file.kind != expected {
        return Err(invalid(format!("it holds a {} key", file.kind)));
    }
    let secret: [u8; 32] = STANDARD
        .decode(&file.secret)
        .map_err(|e| invalid(e.to_string()))?
        .try_into()
        .map_err(|_| invalid("the secret is not 32 bytes".into()))?;
    Ok((file, secret))
}

/// Writes a new secret signing key (mode 0600) and, for federation and institution keys, its
/// public half next to it as `<path>.pub`.
pub fn write_signing_key(
    path: &Path,
    kind: KeyKind,
    name: &str,
    key: &SigningKey,
) -> Result<(), Error> {
    let file = SecretFile {
        version: 1,
        kind,
        name: Some(name.to_string()),
        secret: STANDARD.encode(key.secret()),
    };
    let json = serde_json::to_vec_pretty(&file).expect("key files always serialise");
    write_new(path, &json, 0o600)?;
    let public = PublicKeyFile {
        version: 1,
        kind,
        name: name.to_string(),
        public_key: key.public(),
    };
    let json = serde_json::to_vec_pretty(&public).expect("key files always serialise");
    write_new(&pub_path(path), &json, 0o644)
}

/// `<path>.pub`.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Reads a secret signing key of the given kind; returns its name and the key.
pub fn read_signing_key(path: &Path, kind: KeyKind) -> Result<(String, SigningKey), Error> {
    let (file, secret) = read_secret(path, kind)?;
    Ok((
        file.name.unwrap_or_default(),
        SigningKey::from_secret(secret),
    ))
}

/// Reads a public key file of the given kind.
pub fn read_public_key(path: &Path, kind: KeyKind) -> Result<PublicKeyFile, Error> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_path_buf(),
        expected: kind,
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file: PublicKeyFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if file.kind != kind {
        return Err(invalid(format!("it holds a {} key", file.kind)));
    }
    Ok(file)
}

/// Creates a node identity key at `path` (mode 0600).
pub fn create_node_key(path: &Path) -> Result<Keypair, Error> {
    let secret: [u8; 32] = rand::random();
    let file = SecretFile {
        version: 1,
        kind: KeyKind::Node,
        name: None,
        secret: STANDARD.encode(secret),
    };
    let json = serde_json::to_vec_pretty(&file).expect("key files always serialise");
    write_new(path, &json, 0o600)?;
    node_keypair(path, secret)
}

/// Reads the node identity key at `path`.
pub fn read_node_key(path: &Path) -> Result<Keypair, Error> {
    let (_, secret) = read_secret(path, KeyKind::Node)?;
    node_keypair(path, secret)
}

fn node_keypair(path: &Path, secret: [u8; 32]) -> Result<Keypair, Error> {
    Keypair::ed25519_from_bytes(secret).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        expected: KeyKind::Node,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn node_keys_round_trip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let k = create_node_key(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_node_key(&path).unwrap().public(), k.public());
        assert!(matches!(create_node_key(&path), Err(Error::Exists(_))));
        assert!(matches!(
            read_signing_key(&path, KeyKind::Institution),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn signing_keys_write_a_public_half() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inst.key");
        let key = SigningKey::generate();
        write_signing_key(&path, KeyKind::Institution, "uni", &key).unwrap();
        let (name, back) = read_signing_key(&path, KeyKind::Institution).unwrap();
        assert_eq!((name.as_str(), back.public()), ("uni", key.public()));
        let public = read_public_key(&pub_path(&path), KeyKind::Institution).unwrap();
        assert_eq!(public.public_key, key.public());
    }
}
