//! Reading a token without verifying it: the chain of blocks in plain words, for `cap inspect`
//! and for `cap delegate`'s own checks. Nothing here decides access; [`crate::verify`] does.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use biscuit_auth::UnverifiedBiscuit;

use crate::{Key, MAX_BLOCKS, MAX_TOKEN_BYTES, Refusal, institution_of_term};

/// One statement of a block, recognised from its Datalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// The token is handed to this institution.
    Audience(Key),
    /// Binds the token to its holders (`check if peer_institution($i), holder($i)`).
    Binding,
    /// Only this node may use it.
    Node(String),
    /// Only on this endpoint.
    Endpoint(String),
    /// Only these functions.
    Functions(Vec<String>),
    /// Only these abilities.
    Abilities(Vec<String>),
    /// Only data-root paths below these prefixes.
    Paths(Vec<String>),
    /// Not after this second.
    Expires(u64),
    /// Not before this second.
    NotBefore(u64),
    /// Anything else, as written.
    Other(String),
}

/// One block of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Its position (0: the grant).
    pub index: usize,
    /// The key that signed it as a third party (none for the grant and for plain blocks).
    pub signer: Option<Key>,
    /// Its revocation id (hex).
    pub revocation_id: String,
    /// What it says.
    pub statements: Vec<Statement>,
    /// Its Datalog.
    pub source: String,
}

/// A token's blocks, unverified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The root key id hint (the first four bytes of the issuer's key), unsigned.
    pub root_key_id: Option<u32>,
    /// The blocks, grant first.
    pub blocks: Vec<Block>,
}

/// Reads a token's blocks without checking any signature.
pub fn inspect(token: &[u8]) -> Result<Chain, Refusal> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::TooLarge(token.len()));
    }
    let t = UnverifiedBiscuit::from(token).map_err(|e| Refusal::Malformed(format!("{e:?}")))?;
    if t.block_count() > MAX_BLOCKS {
        return Err(Refusal::TooManyBlocks(t.block_count()));
    }
    let ids = t.revocation_identifiers();
    let signers = t.external_public_keys();
    let mut blocks = Vec::with_capacity(t.block_count());
    for index in 0..t.block_count() {
        let source = t
            .print_block_source(index)
            .map_err(|e| Refusal::Malformed(format!("{e:?}")))?;
        blocks.push(Block {
            index,
            signer: signers
                .get(index)
                .cloned()
                .flatten()
                .and_then(|k| key_bytes(&k.to_bytes())),
            revocation_id: ids.get(index).map(hex::encode).unwrap_or_default(),
            statements: statements(&source),
            source,
        });
    }
    Ok(Chain {
        root_key_id: t.root_key_id(),
        blocks,
    })
}

pub(crate) fn key_bytes(bytes: &[u8]) -> Option<Key> {
    <[u8; 32]>::try_from(bytes).ok().map(Key)
}

impl Chain {
    /// Who holds the token, as the verifier computes it but without checking signatures: the
    /// grant's audience, then every audience named in a block signed by a holder.
    pub fn holders(&self) -> BTreeSet<Key> {
        let mut holders: BTreeSet<Key> = BTreeSet::new();
        if let Some(b) = self.blocks.first() {
            holders.extend(audiences(b));
        }
        loop {
            let before = holders.len();
            for b in &self.blocks[1.min(self.blocks.len())..] {
                if b.signer.is_some_and(|s| holders.contains(&s)) {
                    holders.extend(audiences(b));
                }
            }
            if holders.len() == before {
                return holders;
            }
        }
    }

    /// The functions the token covers: the intersection of every block's restriction, or none
    /// when no block restricts them.
    pub fn functions(&self) -> Option<BTreeSet<String>> {
        let mut out: Option<BTreeSet<String>> = None;
        for s in self.blocks.iter().flat_map(|b| &b.statements) {
            if let Statement::Functions(fs) = s {
                let set: BTreeSet<String> = fs.iter().cloned().collect();
                out = Some(match out {
                    None => set,
                    Some(prev) => prev.intersection(&set).cloned().collect(),
                });
            }
        }
        out
    }

    /// The data-root path prefixes every block allows (`None`: no block restricts them): a
    /// path must be below a prefix of every restricting block, so this is each block's list
    /// kept to what the earlier ones cover.
    pub fn paths(&self) -> Option<Vec<String>> {
        let mut out: Option<Vec<String>> = None;
        for s in self.blocks.iter().flat_map(|b| &b.statements) {
            if let Statement::Paths(ps) = s {
                out = Some(match out {
                    None => ps.clone(),
                    Some(prev) => ps
                        .iter()
                        .filter(|p| prev.iter().any(|q| crate::under(p, q)))
                        .cloned()
                        .collect(),
                });
            }
        }
        out
    }

    /// The earliest expiry of any block.
    pub fn expires(&self) -> Option<u64> {
        self.blocks
            .iter()
            .flat_map(|b| &b.statements)
            .filter_map(|s| match s {
                Statement::Expires(t) => Some(*t),
                _ => None,
            })
            .min()
    }

    /// The endpoint of the grant.
    pub fn endpoint(&self) -> Option<&str> {
        self.blocks
            .first()?
            .statements
            .iter()
            .find_map(|s| match s {
                Statement::Endpoint(e) => Some(e.as_str()),
                _ => None,
            })
    }

    /// The chain in plain words, one line per block; `name` turns a key into a name.
    pub fn describe(&self, name: &dyn Fn(&Key) -> String) -> Vec<String> {
        let mut lines = Vec::new();
        let holders = self.holders();
        for b in &self.blocks {
            let who = match (b.index, b.signer) {
                (0, _) => "the issuer granted".to_owned(),
                (_, Some(k)) if holders.contains(&k) || self.signed_before(b.index, &k) => {
                    format!("{} delegated", name(&k))
                }
                (_, Some(k)) => {
                    format!("{} (not a holder: its audience is ignored) added", name(&k))
                }
                (_, None) => "an unsigned block (can only narrow) added".to_owned(),
            };
            let mut parts = Vec::new();
            for s in &b.statements {
                parts.push(match s {
                    Statement::Audience(k) => format!("to institution {}", name(k)),
                    Statement::Binding => continue,
                    Statement::Node(p) => format!("only to node {p}"),
                    Statement::Endpoint(e) => format!("on endpoint {e}"),
                    Statement::Functions(fs) => format!("functions {}", fs.join(", ")),
                    Statement::Abilities(a) => format!("abilities {}", a.join(", ")),
                    Statement::Paths(p) => format!("paths below {}", p.join(", ")),
                    Statement::Expires(t) => format!("until {}", rfc3339(*t)),
                    Statement::NotBefore(t) => format!("from {}", rfc3339(*t)),
                    Statement::Other(o) => format!("with restriction `{o}`"),
                });
            }
            lines.push(format!("block {}: {who} {}", b.index, parts.join("; ")));
        }
        lines
    }

    fn signed_before(&self, index: usize, k: &Key) -> bool {
        self.blocks[..index].iter().any(|b| b.signer == Some(*k))
    }
}

fn audiences(b: &Block) -> impl Iterator<Item = Key> + '_ {
    b.statements.iter().filter_map(|s| match s {
        Statement::Audience(k) => Some(*k),
        _ => None,
    })
}

/// A Unix second as RFC 3339.
pub(crate) fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn parse_date(s: &str) -> Option<u64> {
    humantime::parse_rfc3339(s.trim())
        .ok()?
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

fn quoted(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut escaped = false;
    for c in s.chars() {
        match (&mut cur, c) {
            (Some(buf), _) if escaped => {
                buf.push(c);
                escaped = false;
            }
            (Some(_), '\\') => escaped = true,
            (Some(_), '"') => out.push(cur.take().unwrap_or_default()),
            (Some(buf), _) => buf.push(c),
            (None, '"') => cur = Some(String::new()),
            (None, _) => {}
        }
    }
    out
}

fn statements(source: &str) -> Vec<Statement> {
    source
        .split(";\n")
        .map(|l| l.trim().trim_end_matches(';').trim())
        .filter(|l| !l.is_empty())
        .map(statement)
        .collect()
}

fn statement(l: &str) -> Statement {
    let other = || Statement::Other(l.to_owned());
    let q = quoted(l);
    if let Some(rest) = l.strip_prefix("audience(") {
        if rest.ends_with(')') && q.len() == 1 {
            if let Some(k) = institution_of_term(&q[0]) {
                return Statement::Audience(k);
            }
        }
        return other();
    }
    match l {
        "check if peer_institution($i), holder($i)" => return Statement::Binding,
        _ if l.starts_with("check if peer(") && q.len() == 1 => {
            return Statement::Node(q[0].clone());
        }
        _ if l.starts_with("check if endpoint(") && q.len() == 1 => {
            return Statement::Endpoint(q[0].clone());
        }
        _ if l.starts_with("check if function($f), {") && l.ends_with("}.contains($f)") => {
            return Statement::Functions(q);
        }
        _ if l.starts_with("check if ability($a), {") && l.ends_with("}.contains($a)") => {
            return Statement::Abilities(q);
        }
        _ if l.starts_with("check if under($d), {") && l.ends_with("}.contains($d)") => {
            return Statement::Paths(q);
        }
        _ => {}
    }
    if let Some(d) = l.strip_prefix("check if time($t), $t <= ") {
        if let Some(t) = parse_date(d) {
            return Statement::Expires(t);
        }
    }
    if let Some(d) = l.strip_prefix("check if time($t), $t >= ") {
        if let Some(t) = parse_date(d) {
            return Statement::NotBefore(t);
        }
    }
    other()
}

impl fmt::Display for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statement::Audience(k) => write!(f, "to institution {k}"),
            Statement::Binding => f.write_str("bound to its holders"),
            Statement::Node(p) => write!(f, "only node {p}"),
            Statement::Endpoint(e) => write!(f, "endpoint {e}"),
            Statement::Functions(fs) => write!(f, "functions {}", fs.join(", ")),
            Statement::Abilities(a) => write!(f, "abilities {}", a.join(", ")),
            Statement::Paths(p) => write!(f, "paths below {}", p.join(", ")),
            Statement::Expires(t) => write!(f, "until {}", rfc3339(*t)),
            Statement::NotBefore(t) => write!(f, "from {}", rfc3339(*t)),
            Statement::Other(o) => f.write_str(o),
        }
    }
}
