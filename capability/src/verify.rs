//! Verifying tokens on an endpoint: signatures and the holder set once per token, revocations
//! and the request's Datalog on each request, with both cached.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use biscuit_auth::builder::{Rule, Term, fact, string};
use biscuit_auth::datalog::RunLimits;
use biscuit_auth::error::{FailedCheck, Format, Logic, Token as TokenError};
use biscuit_auth::{Algorithm, AuthorizerBuilder, Biscuit, PublicKey, UnverifiedBiscuit};
use sha2::{Digest, Sha256};

use crate::inspect::key_bytes;
use crate::{
    Ability, CONTEXT, Key, MAX_BLOCKS, MAX_TOKEN_BYTES, institution_of_term, institution_term,
    root_key_id,
};

/// Why a token does not allow a request. The text starts with the reason's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Over [`MAX_TOKEN_BYTES`].
    #[error("malformed token: {0} bytes, at most {MAX_TOKEN_BYTES}")]
    TooLarge(usize),
    /// Over [`MAX_BLOCKS`].
    #[error("malformed token: {0} blocks, at most {MAX_BLOCKS}")]
    TooManyBlocks(usize),
    /// Not a token.
    #[error("truncated or malformed token ({0}): copy the whole token again")]
    Malformed(String),
    /// Rooted in a key that is not an admitted institution.
    #[error(
        "root not an admitted institution: the token was not issued by an institution of this \
         federation (or its admission was revoked)"
    )]
    RootNotAdmitted,
    /// Issued by another institution than the endpoint's.
    #[error(
        "not covered: the token was issued by {issuer}, and this endpoint accepts only tokens \
         issued by {ours}"
    )]
    WrongIssuer {
        /// Who issued it.
        issuer: String,
        /// The endpoint's institution.
        ours: String,
    },
    /// A signature does not verify.
    #[error("invalid signature: the token was altered or forged")]
    InvalidSignature,
    /// Valid, but not a funcmesh capability.
    #[error("not a funcmesh capability (its context is not {CONTEXT})")]
    NotCapability,
    /// A block was revoked.
    #[error("revoked: block {block} of the token was revoked by {by}; ask for a new grant")]
    Revoked {
        /// The block.
        block: usize,
        /// Who revoked it.
        by: String,
    },
    /// The caller is not among the token's holders, or not the node it was narrowed to.
    #[error("wrong audience: this token was not granted to this node or its institution")]
    WrongAudience,
    /// Past its expiry.
    #[error("expired: the token's `{0}` no longer holds; ask its issuer for a new grant")]
    Expired(String),
    /// Before its not-before date.
    #[error("not yet valid: the token's `{0}` does not hold yet")]
    NotYetValid(String),
    /// The request is outside what the token allows.
    #[error("not covered: the request fails the token's `{0}`")]
    NotCovered(String),
    /// The token's Datalog exceeds the run limits.
    #[error("token too complex: {0}")]
    TooComplex(String),
}

impl Refusal {
    /// The reason's short name: `expired`, `wrong audience`, `revoked`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::TooLarge(_) | Refusal::TooManyBlocks(_) | Refusal::Malformed(_) => "malformed",
            Refusal::RootNotAdmitted => "root not admitted",
            Refusal::WrongIssuer { .. } | Refusal::NotCovered(_) => "not covered",
            Refusal::InvalidSignature => "invalid signature",
            Refusal::NotCapability => "not a capability",
            Refusal::Revoked { .. } => "revoked",
            Refusal::WrongAudience => "wrong audience",
            Refusal::Expired(_) => "expired",
            Refusal::NotYetValid(_) => "not yet valid",
            Refusal::TooComplex(_) => "too complex",
        }
    }
}

/// What the verifier needs from the registry: the admitted institutions and the token
/// revocations, with their authors.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    institutions: HashMap<Key, String>,
    revocations: HashMap<String, Vec<Key>>,
    revoked_institutions: HashSet<Key>,
    fingerprint: u64,
}

impl Directory {
    /// A directory of `institutions` (key, name) and token revocations (revocation id in hex,
    /// revoker).
    pub fn new(
        institutions: impl IntoIterator<Item = (Key, String)>,
        revocations: impl IntoIterator<Item = (String, Key)>,
    ) -> Directory {
        let institutions: HashMap<Key, String> = institutions.into_iter().collect();
        let mut keys: Vec<&Key> = institutions.keys().collect();
        keys.sort();
        let mut h = DefaultHasher::new();
        keys.hash(&mut h);
        let mut by_id: HashMap<String, Vec<Key>> = HashMap::new();
        for (id, by) in revocations {
            by_id.entry(id).or_default().push(by);
        }
        Directory {
            institutions,
            revocations: by_id,
            revoked_institutions: HashSet::new(),
            fingerprint: h.finish(),
        }
    }

    /// The same directory, knowing that the federation revoked these institutions.
    pub fn with_revoked_institutions(mut self, keys: impl IntoIterator<Item = Key>) -> Directory {
        self.revoked_institutions.extend(keys);
        self
    }

    /// The directory of a registry view (admitted, unrevoked institutions; token revocations).
    pub fn from_view(view: &crdt_registry::View) -> Directory {
        let revoked = view
            .revocations
            .iter()
            .filter_map(|r| match &r.record.target {
                crdt_registry::record::Target::Institution { key } => Some(*key),
                _ => None,
            });
        Directory::new(
            view.institutions.values().map(|i| (i.key, i.name.clone())),
            view.revocations
                .iter()
                .filter_map(|r| match &r.record.target {
                    crdt_registry::record::Target::Token { revocation_id } => {
                        Some((revocation_id.clone(), r.revoked_by))
                    }
                    _ => None,
                }),
        )
        .with_revoked_institutions(revoked)
    }

    /// An admitted institution's name.
    pub fn name(&self, key: &Key) -> Option<&str> {
        self.institutions.get(key).map(String::as_str)
    }

    /// A key's name, or the key itself.
    pub fn name_or_key(&self, key: &Key) -> String {
        self.name(key)
            .map_or_else(|| key.to_string(), ToString::to_string)
    }

    /// How many token revocations it holds.
    pub fn revocation_count(&self) -> usize {
        self.revocations.values().map(Vec::len).sum()
    }

    fn revoked_by(&self, id: &str, by: &Key) -> bool {
        self.revocations.get(id).is_some_and(|v| v.contains(by))
    }
}

/// A token whose signatures verified under its root, with its holders resolved.
#[derive(Debug, Clone)]
pub struct Verified {
    token: Biscuit,
    /// The root (the endpoint's institution).
    pub root: Key,
    /// The institutions holding the token.
    pub holders: BTreeSet<Key>,
    /// Per block: revocation id (hex) and third-party signer.
    pub blocks: Vec<(String, Option<Key>)>,
}

/// What is being asked, with facts the endpoint authenticated itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// The calling member's peer id.
    pub peer: String,
    /// Its institution's key (from its verified membership).
    pub institution: Key,
    /// Now, Unix seconds (the endpoint's clock).
    pub time: u64,
    /// The endpoint's registry id.
    pub endpoint: String,
    /// The function's id, when running one.
    pub function: Option<String>,
    /// The ability used.
    pub ability: Ability,
    /// The data-root path, for `transfer.*` (relative, normalised).
    pub path: Option<String>,
}

fn limits() -> RunLimits {
    RunLimits {
        max_facts: 1000,
        max_iterations: 100,
        max_time: Duration::from_millis(5),
    }
}

fn too_complex(e: TokenError) -> Refusal {
    match e {
        TokenError::Format(f) => Refusal::Malformed(format!("{f:?}")),
        other => Refusal::TooComplex(other.to_string()),
    }
}

/// Verifies a token for an endpoint of the institution `root`: size, format, the root key,
/// every signature, the context, and the holder set.
pub fn verify(bytes: &[u8], dir: &Directory, root: &Key) -> Result<Verified, Refusal> {
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::TooLarge(bytes.len()));
    }
    let unverified =
        UnverifiedBiscuit::from(bytes).map_err(|e| Refusal::Malformed(format!("{e:?}")))?;
    if unverified.block_count() > MAX_BLOCKS {
        return Err(Refusal::TooManyBlocks(unverified.block_count()));
    }
    let hint = unverified.root_key_id();
    if hint != Some(root_key_id(root)) || dir.name(root).is_none() {
        let issuer = hint.and_then(|h| {
            dir.institutions
                .iter()
                .find(|(k, _)| root_key_id(k) == h && *k != root)
        });
        return Err(match issuer {
            Some((_, name)) => Refusal::WrongIssuer {
                issuer: name.clone(),
                ours: dir.name_or_key(root),
            },
            None => Refusal::RootNotAdmitted,
        });
    }
    let pk =
        PublicKey::from_bytes(&root.0, Algorithm::Ed25519).map_err(|_| Refusal::RootNotAdmitted)?;
    let token = unverified.verify(pk).map_err(|e| match e {
        Format::DeserializationError(m) | Format::BlockDeserializationError(m) => {
            Refusal::Malformed(m)
        }
        _ => Refusal::InvalidSignature,
    })?;
    if token.context().first().cloned().flatten().as_deref() != Some(CONTEXT) {
        return Err(Refusal::NotCapability);
    }
    let blocks: Vec<(String, Option<Key>)> = token
        .revocation_identifiers()
        .iter()
        .map(hex::encode)
        .zip(
            token
                .external_public_keys()
                .into_iter()
                .map(|k| k.and_then(|k| key_bytes(&k.to_bytes()))),
        )
        .collect();

    // Holders: the grant's audience, then (to a fixpoint) audiences in blocks signed by the
    // key of an admitted institution that already holds the token. Each query trusts exactly
    // one key, so no other block's facts can reach it.
    let mut authz = AuthorizerBuilder::new()
        .set_limits(limits())
        .build(&token)
        .map_err(too_complex)?;
    let mut holders: BTreeSet<Key> = authz
        .query::<_, (String,), _>("aud($a) <- audience($a) trusting authority")
        .map_err(too_complex)?
        .into_iter()
        .filter_map(|(a,)| institution_of_term(&a))
        .collect();
    let signers: HashSet<Key> = blocks
        .iter()
        .filter_map(|(_, s)| *s)
        .filter(|k| dir.name(k).is_some())
        .collect();
    let mut done: HashSet<Key> = HashSet::new();
    loop {
        let next: Vec<Key> = signers
            .iter()
            .filter(|k| holders.contains(k) && !done.contains(k))
            .copied()
            .collect();
        if next.is_empty() {
            break;
        }
        for k in next {
            done.insert(k);
            let mut rule: Rule = "aud($a) <- audience($a) trusting {k}"
                .try_into()
                .map_err(too_complex)?;
            let pk = PublicKey::from_bytes(&k.0, Algorithm::Ed25519)
                .map_err(|_| Refusal::InvalidSignature)?;
            rule.set_scope("k", pk).map_err(too_complex)?;
            let found = authz.query::<_, (String,), _>(rule).map_err(too_complex)?;
            holders.extend(found.into_iter().filter_map(|(a,)| institution_of_term(&a)));
        }
    }
    Ok(Verified {
        token,
        root: *root,
        holders,
        blocks,
    })
}

/// The revocation check: block `i` counts as revoked when the root, or a holder that signed
/// block `i` or an earlier one, revoked it.
pub fn check_revocations(v: &Verified, dir: &Directory) -> Result<(), Refusal> {
    if dir.revocations.is_empty() {
        return Ok(());
    }
    let mut allowed = vec![v.root];
    for (i, (id, signer)) in v.blocks.iter().enumerate() {
        if let Some(s) = signer {
            if v.holders.contains(s) && !allowed.contains(s) {
                allowed.push(*s);
            }
        }
        if let Some(by) = allowed.iter().find(|k| dir.revoked_by(id, k)) {
            return Err(Refusal::Revoked {
                block: i,
                by: dir.name_or_key(by),
            });
        }
    }
    Ok(())
}

/// Runs the request against the token's checks (no revocation check: see [`authorize`]).
pub fn run_datalog(v: &Verified, req: &Request) -> Result<(), Refusal> {
    let mut code = String::from(
        "peer({peer});\npeer_institution({inst});\ntime({time});\nendpoint({ep});\n\
         ability({ab});\n",
    );
    let mut params: HashMap<String, Term> = HashMap::new();
    params.insert("peer".into(), Term::Str(req.peer.clone()));
    params.insert("inst".into(), Term::Str(institution_term(&req.institution)));
    params.insert("time".into(), Term::Date(req.time));
    params.insert("ep".into(), Term::Str(req.endpoint.clone()));
    params.insert("ab".into(), Term::Str(req.ability.as_str().into()));
    if let Some(f) = &req.function {
        code.push_str("function({fn});\n");
        params.insert("fn".into(), Term::Str(f.clone()));
    }
    if let Some(p) = &req.path {
        // The path and each directory above it, up to the root (""): a prefix check in
        // Datalog is then a set membership.
        let mut at = p.as_str();
        let mut i = 0;
        loop {
            code.push_str(&format!("under({{d{i}}});\n"));
            params.insert(format!("d{i}"), Term::Str(at.to_owned()));
            i += 1;
            if at.is_empty() || i > 64 {
                break;
            }
            at = at.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
    }
    code.push_str("check if peer_institution($i), holder($i);\nallow if true;\n");
    let mut b = AuthorizerBuilder::new()
        .code_with_params(code, params, HashMap::new())
        .map_err(too_complex)?;
    for h in &v.holders {
        b = b
            .fact(fact("holder", &[string(&institution_term(h))]))
            .map_err(too_complex)?;
    }
    let mut a = b
        .set_limits(limits())
        .build(&v.token)
        .map_err(too_complex)?;
    match a.authorize() {
        Ok(_) => Ok(()),
        Err(TokenError::FailedLogic(
            Logic::Unauthorized { checks, .. } | Logic::NoMatchingPolicy { checks },
        )) => Err(classify(&checks)),
        Err(e) => Err(too_complex(e)),
    }
}

/// The first failing check's reason, in priority order: audience, expired, not yet valid,
/// anything else (not covered).
fn classify(checks: &[FailedCheck]) -> Refusal {
    let rules: Vec<&str> = checks
        .iter()
        .map(|c| match c {
            FailedCheck::Block(b) => b.rule.as_str(),
            FailedCheck::Authorizer(a) => a.rule.as_str(),
        })
        .collect();
    if rules
        .iter()
        .any(|r| r.contains("holder(") || r.contains("peer(") || r.contains("peer_institution("))
    {
        return Refusal::WrongAudience;
    }
    if let Some(r) = rules
        .iter()
        .find(|r| r.starts_with("check if time($t), $t <="))
    {
        return Refusal::Expired((*r).to_owned());
    }
    if let Some(r) = rules
        .iter()
        .find(|r| r.starts_with("check if time($t), $t >="))
    {
        return Refusal::NotYetValid((*r).to_owned());
    }
    Refusal::NotCovered(rules.first().map_or_else(String::new, |r| (*r).to_owned()))
}

/// Whether a verified token allows the request now: the caller's institution is still
/// admitted, no block is revoked, and the token's checks hold.
pub fn authorize(v: &Verified, dir: &Directory, req: &Request) -> Result<(), Refusal> {
    check_caller(dir, req)?;
    check_revocations(v, dir)?;
    run_datalog(v, req)
}

/// A member of an institution whose admission the federation revoked holds nothing, whatever
/// its tokens say (its connections may outlive the revocation). The caller's membership was
/// verified, so an institution the registry has not delivered yet is not refused.
fn check_caller(dir: &Directory, req: &Request) -> Result<(), Refusal> {
    if dir.revoked_institutions.contains(&req.institution) {
        return Err(Refusal::WrongAudience);
    }
    Ok(())
}

const CACHE_ENTRIES: usize = 4096;

/// The cache key of a token's bytes (SHA-256).
pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

#[derive(Debug, Default)]
struct Caches {
    fingerprint: u64,
    tokens: HashMap<([u8; 32], Key), Result<Arc<Verified>, Refusal>>,
    decisions: HashMap<([u8; 32], Request), Result<(), Refusal>>,
}

/// Verifies tokens with two caches: verified tokens (by hash of their bytes and the expected
/// root; cleared when the set of institutions changes) and Datalog decisions (by token and
/// every request fact, time to the second). Revocations are checked on every request.
#[derive(Debug, Default)]
pub struct Verifier {
    caches: Mutex<Caches>,
}

impl Verifier {
    /// An empty verifier.
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// Whether `token` allows `req` on an endpoint of the institution `root`.
    pub fn check(
        &self,
        token: &[u8],
        dir: &Directory,
        root: &Key,
        req: &Request,
    ) -> Result<Arc<Verified>, Refusal> {
        self.check_hashed(token, token_hash(token), dir, root, req)
    }

    /// [`Verifier::check`] with the token's [`token_hash`] computed once by the caller (a batch
    /// of tasks presenting one token hashes it once).
    pub fn check_hashed(
        &self,
        token: &[u8],
        hash: [u8; 32],
        dir: &Directory,
        root: &Key,
        req: &Request,
    ) -> Result<Arc<Verified>, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLarge(token.len()));
        }
        let cached = {
            let mut c = self.lock();
            if c.fingerprint != dir.fingerprint {
                c.tokens.clear();
                c.decisions.clear();
                c.fingerprint = dir.fingerprint;
            }
            c.tokens.get(&(hash, *root)).cloned()
        };
        let verified = match cached {
            Some(v) => v?,
            None => {
                let v = verify(token, dir, root).map(Arc::new);
                let mut c = self.lock();
                if c.tokens.len() >= CACHE_ENTRIES {
                    c.tokens.clear();
                }
                c.tokens.insert((hash, *root), v.clone());
                v?
            }
        };
        check_caller(dir, req)?;
        check_revocations(&verified, dir)?;
        let key = (hash, req.clone());
        let decided = self.lock().decisions.get(&key).cloned();
        let decision = match decided {
            Some(d) => d,
            None => {
                let d = run_datalog(&verified, req);
                let mut c = self.lock();
                if c.decisions.len() >= CACHE_ENTRIES {
                    c.decisions.clear();
                }
                c.decisions.insert(key, d.clone());
                d
            }
        };
        decision.map(|()| verified)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Caches> {
        self.caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
