//! Making tokens: grants (signed by the endpoint's institution) and delegations (third-party
//! blocks signed by a current holder's institution key).

use std::collections::{BTreeSet, HashMap};

use biscuit_auth::builder::Term;
use biscuit_auth::{Algorithm, Biscuit, BlockBuilder, KeyPair, PrivateKey, UnverifiedBiscuit};

use crate::inspect::inspect;
use crate::{Ability, CONTEXT, Error, Key, MAX_BLOCKS, institution_term, root_key_id};

/// What an institution grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The institution receiving it.
    pub to: Key,
    /// The endpoint's registry id.
    pub endpoint: String,
    /// Function ids it covers; empty: every function on the endpoint.
    pub functions: Vec<String>,
    /// What it allows; empty: `compute.run`.
    pub abilities: Vec<Ability>,
    /// Last valid second, Unix time.
    pub expires: u64,
    /// First valid second, Unix time (none: valid at once).
    pub not_before: Option<u64>,
    /// Data-root path prefixes it covers (`transfer.*`); empty: the whole root. A token with
    /// prefixes allows only requests that name a path below one of them.
    pub paths: Vec<String>,
}

/// Who a delegation hands the token to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Another institution (which may delegate further).
    Institution(Key),
    /// One node (by peer id) of the holding institutions.
    Node(String),
}

/// A narrowing of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    /// To whom.
    pub to: Audience,
    /// Restrict to these function ids (empty: no further restriction).
    pub functions: Vec<String>,
    /// End sooner, Unix seconds.
    pub expires: Option<u64>,
    /// Restrict to these data-root path prefixes (empty: no further restriction).
    pub paths: Vec<String>,
}

/// Normalises path prefixes: `/`-trimmed, `.` and empty components dropped; `..` refused.
/// `None` when one of them is the whole root (no restriction).
pub fn path_prefixes(paths: &[String]) -> Result<Option<Vec<String>>, Error> {
    let mut out = Vec::new();
    for p in paths {
        let mut parts = Vec::new();
        for c in p.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    return Err(Error::Invalid(format!(
                        "path prefix {p:?} contains `..`: name a directory inside the data root"
                    )));
                }
                c => parts.push(c),
            }
        }
        if parts.is_empty() {
            return Ok(None);
        }
        out.push(parts.join("/"));
    }
    Ok((!out.is_empty()).then_some(out))
}

pub(crate) fn keypair(seed: &[u8; 32]) -> Result<KeyPair, Error> {
    let sk = PrivateKey::from_bytes(seed, Algorithm::Ed25519)
        .map_err(|e| Error::Invalid(format!("not an ed25519 key: {e:?}")))?;
    Ok(KeyPair::from(&sk))
}

pub(crate) fn key_of(kp: &KeyPair) -> Key {
    let bytes = kp.public().to_bytes();
    let mut k = [0u8; 32];
    k.copy_from_slice(&bytes[..32]);
    Key(k)
}

fn set(items: impl IntoIterator<Item = String>) -> Term {
    Term::Set(items.into_iter().map(Term::Str).collect::<BTreeSet<_>>())
}

/// Issues a grant signed with the institution key `issuer_seed` (the root of the token).
pub fn grant(issuer_seed: &[u8; 32], g: &Grant) -> Result<Vec<u8>, Error> {
    if g.endpoint.trim().is_empty() {
        return Err(Error::Invalid("a grant names an endpoint".into()));
    }
    if let Some(nb) = g.not_before {
        if nb > g.expires {
            return Err(Error::Invalid(
                "the grant would expire before it becomes valid".into(),
            ));
        }
    }
    let kp = keypair(issuer_seed)?;
    let abilities: Vec<String> = if g.abilities.is_empty() {
        vec![Ability::ComputeRun.as_str().into()]
    } else {
        g.abilities.iter().map(|a| a.as_str().to_owned()).collect()
    };
    let mut code = String::from(
        "audience({aud});\n\
         check if peer_institution($i), holder($i);\n\
         check if time($t), $t <= {exp};\n\
         check if endpoint({ep});\n\
         check if ability($a), {abilities}.contains($a);\n",
    );
    let mut params: HashMap<String, Term> = HashMap::new();
    params.insert("aud".into(), Term::Str(institution_term(&g.to)));
    params.insert("exp".into(), Term::Date(g.expires));
    params.insert("ep".into(), Term::Str(g.endpoint.clone()));
    params.insert("abilities".into(), set(abilities));
    if let Some(nb) = g.not_before {
        code.push_str("check if time($t), $t >= {nb};\n");
        params.insert("nb".into(), Term::Date(nb));
    }
    if !g.functions.is_empty() {
        code.push_str("check if function($f), {functions}.contains($f);\n");
        params.insert("functions".into(), set(g.functions.iter().cloned()));
    }
    if let Some(paths) = path_prefixes(&g.paths)? {
        code.push_str("check if under($d), {paths}.contains($d);\n");
        params.insert("paths".into(), set(paths));
    }
    let token = Biscuit::builder()
        .code_with_params(code, params, HashMap::new())?
        .context(CONTEXT.into())
        .root_key_id(root_key_id(&key_of(&kp)))
        .build(&kp)?;
    Ok(token.to_vec()?)
}

/// Narrows `token` as the holder whose institution key is `holder_seed`: refuses a delegation
/// by a key that does not hold the token, or one that would widen it.
pub fn delegate(token: &[u8], holder_seed: &[u8; 32], d: &Delegation) -> Result<Vec<u8>, Error> {
    let chain = inspect(token).map_err(|e| Error::Unreadable(e.to_string()))?;
    let holder = key_of(&keypair(holder_seed)?);
    let holders = chain.holders();
    if !holders.contains(&holder) {
        return Err(Error::NotHolder(format!(
            "the key {holder} does not hold this token (held by {}): only a holder's \
             institution key can delegate it",
            holders
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Some(allowed) = chain.functions() {
        if d.functions.is_empty() {
            // No new restriction: the parent's still holds.
        } else if let Some(extra) = d.functions.iter().find(|f| !allowed.contains(*f)) {
            return Err(Error::Widening(format!(
                "function {extra} is not covered by the token, which allows only {}",
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if let (Some(allowed), Some(want)) = (chain.paths(), path_prefixes(&d.paths)?) {
        if let Some(extra) = want
            .iter()
            .find(|w| !allowed.iter().any(|a| crate::under(w, a)))
        {
            return Err(Error::Widening(format!(
                "path {extra} is not covered by the token, which allows only {}",
                allowed.join(", ")
            )));
        }
    }
    if let (Some(want), Some(until)) = (d.expires, chain.expires()) {
        if want > until {
            return Err(Error::Widening(format!(
                "the token expires at {}; a delegation cannot outlive it (use a shorter --ttl, \
                 or leave it out to keep the token's expiry)",
                crate::inspect::rfc3339(until)
            )));
        }
    }
    if chain.blocks.len() >= MAX_BLOCKS {
        return Err(Error::Invalid(format!(
            "the token already has {} blocks, the most a verifier accepts",
            chain.blocks.len()
        )));
    }
    delegate_unchecked(token, holder_seed, d)
}

/// [`delegate`] without its checks: appends the block as asked, even one that tries to widen
/// the token (verifiers refuse what it cannot narrow). For tests that build such tokens.
pub fn delegate_unchecked(
    token: &[u8],
    holder_seed: &[u8; 32],
    d: &Delegation,
) -> Result<Vec<u8>, Error> {
    let parent = UnverifiedBiscuit::from(token).map_err(|e| Error::Unreadable(e.to_string()))?;
    let kp = keypair(holder_seed)?;
    let mut code = String::new();
    let mut params: HashMap<String, Term> = HashMap::new();
    match &d.to {
        Audience::Institution(k) => {
            code.push_str("audience({aud});\n");
            params.insert("aud".into(), Term::Str(institution_term(k)));
        }
        Audience::Node(peer) => {
            code.push_str("check if peer({peer});\n");
            params.insert("peer".into(), Term::Str(peer.clone()));
        }
    }
    if !d.functions.is_empty() {
        code.push_str("check if function($f), {functions}.contains($f);\n");
        params.insert("functions".into(), set(d.functions.iter().cloned()));
    }
    if let Some(paths) = path_prefixes(&d.paths)? {
        code.push_str("check if under($d), {paths}.contains($d);\n");
        params.insert("paths".into(), set(paths));
    }
    if let Some(exp) = d.expires {
        code.push_str("check if time($t), $t <= {exp};\n");
        params.insert("exp".into(), Term::Date(exp));
    }
    let block = BlockBuilder::new().code_with_params(code, params, HashMap::new())?;
    let signed = parent
        .third_party_request()?
        .create_block(&kp.private(), block)?;
    let child = parent.append_third_party(&signed.serialize()?)?;
    Ok(child.to_vec()?)
}

/// The same token claiming to be issued by `claimed`: its unsigned root key id hint replaced,
/// its signatures untouched. For tests: verifiers must refuse it as an invalid signature.
pub fn claim_root(token: &[u8], claimed: &Key) -> Result<Vec<u8>, Error> {
    let chain = crate::inspect(token).map_err(|e| Error::Unreadable(e.to_string()))?;
    let hint = chain
        .root_key_id
        .ok_or_else(|| Error::Invalid("the token has no root key id".into()))?;
    let (from, to) = (varint(hint), varint(root_key_id(claimed)));
    let at = token
        .windows(from.len())
        .position(|w| w == from.as_slice())
        .ok_or_else(|| Error::Invalid("root key id not found".into()))?;
    let mut out = token.to_vec();
    out.splice(at..at + from.len(), to);
    Ok(out)
}

fn varint(mut v: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Appends a plain (unsigned) block of Datalog: for tests of what such blocks cannot do.
pub fn append_plain(token: &[u8], code: &str) -> Result<Vec<u8>, Error> {
    let parent = UnverifiedBiscuit::from(token).map_err(|e| Error::Unreadable(e.to_string()))?;
    let block = BlockBuilder::new().code(code)?;
    Ok(parent.append(block)?.to_vec()?)
}

/// Appends a third-party block of arbitrary Datalog signed by `signer_seed`: for tests.
pub fn append_signed(token: &[u8], signer_seed: &[u8; 32], code: &str) -> Result<Vec<u8>, Error> {
    let parent = UnverifiedBiscuit::from(token).map_err(|e| Error::Unreadable(e.to_string()))?;
    let kp = keypair(signer_seed)?;
    let block = BlockBuilder::new().code(code)?;
    let signed = parent
        .third_party_request()?
        .create_block(&kp.private(), block)?;
    Ok(parent.append_third_party(&signed.serialize()?)?.to_vec()?)
}
