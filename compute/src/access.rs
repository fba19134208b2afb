//! Who may use which endpoint, on both sides of a task: the endpoint checks every task against
//! its access policy and, where the policy asks for one, the capability token the task carries;
//! the submitting node offers the router only endpoints it may use and attaches the token that
//! lets it. Both sides share one [`Access`]: the registry's directory (admitted institutions,
//! token revocations), the tokens this node holds, and a caching [`capability::Verifier`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use capability::{Ability, Directory, Key, Refusal, Request, Verifier};
use crdt_registry::record::Policy;
use mesh::PeerId;

/// Whether tokens can open an endpoint with this policy to those the policy alone refuses.
pub fn admits_tokens(policy: Policy) -> bool {
    matches!(
        policy,
        Policy::InstitutionAndCapability | Policy::Capability
    )
}

/// What an endpoint's policy says about a member before any token is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The policy admits it.
    Admitted,
    /// Only with a capability token (the policy's reason for wanting one).
    NeedsToken(String),
    /// No token can help.
    Refused(String),
}

/// The policy's verdict on a member of `submitter` using an endpoint of `endpoint`'s
/// institution (names; `None` for coordinators).
pub fn verdict(policy: Policy, endpoint: Option<&str>, submitter: Option<&str>) -> Verdict {
    match crate::routing::may_use(policy, endpoint, submitter) {
        Ok(()) => Verdict::Admitted,
        Err(why) if admits_tokens(policy) => Verdict::NeedsToken(why),
        Err(why) => Verdict::Refused(why),
    }
}

/// A token this node holds.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its text form.
    pub text: String,
    bytes: Vec<u8>,
    /// The endpoint it was granted for (registry id).
    pub endpoint: String,
}

impl Held {
    /// Reads a token's text form; refuses what cannot be a token.
    pub fn parse(text: &str) -> Result<Held, Refusal> {
        let bytes = capability::from_text(text)?;
        let chain = capability::inspect(&bytes)?;
        let endpoint = chain.endpoint().unwrap_or_default().to_owned();
        Ok(Held {
            text: capability::to_text(&bytes),
            bytes,
            endpoint,
        })
    }

    /// The token's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A token as a task presents it: decoded and hashed once per batch.
#[derive(Debug, Clone)]
pub struct Presented {
    /// Its text form.
    pub text: String,
    bytes: Vec<u8>,
    hash: [u8; 32],
}

impl Presented {
    /// Decodes a token's text form.
    pub fn from_text(text: &str) -> Result<Presented, Refusal> {
        let bytes = capability::from_text(text)?;
        Ok(Presented {
            text: text.to_owned(),
            hash: capability::token_hash(&bytes),
            bytes,
        })
    }
}

/// How a task in a `Submit` batch refers to a token of the batch's table: `@<index>`. Token
/// texts are URL-safe base64, which never starts with `@`.
pub fn token_ref(index: usize) -> String {
    format!("@{index}")
}

/// The token a task presents: a reference into the batch's `tokens`, or (from older
/// submitters) the token itself.
pub fn presented<'a>(
    capability: &str,
    table: &'a [Result<Presented, Refusal>],
) -> Result<std::borrow::Cow<'a, Presented>, Refusal> {
    match capability.strip_prefix('@') {
        Some(i) => match i.parse::<usize>().ok().and_then(|i| table.get(i)) {
            Some(Ok(p)) => Ok(std::borrow::Cow::Borrowed(p)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(Refusal::Malformed(format!(
                "the task refers to token {capability}, which its batch does not carry"
            ))),
        },
        None => Presented::from_text(capability).map(std::borrow::Cow::Owned),
    }
}

/// Access state shared by the endpoint side and the submitting side of one node.
#[derive(Debug)]
pub struct Access {
    me: String,
    institution: Option<Key>,
    directory: RwLock<Arc<Directory>>,
    verifier: Verifier,
    held: RwLock<Arc<Vec<Held>>>,
    logged: Mutex<HashSet<(String, String)>>,
}

impl Access {
    /// Access for the node `me` of `institution` (none for coordinators).
    pub fn new(me: PeerId, institution: Option<Key>) -> Arc<Access> {
        Arc::new(Access {
            me: me.to_string(),
            institution,
            directory: RwLock::new(Arc::new(Directory::default())),
            verifier: Verifier::new(),
            held: RwLock::new(Arc::new(Vec::new())),
            logged: Mutex::new(HashSet::new()),
        })
    }

    /// This node's institution key.
    pub fn institution(&self) -> Option<Key> {
        self.institution
    }

    /// Replaces the directory (after a registry change).
    pub fn set_directory(&self, directory: Directory) {
        *self
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(directory);
    }

    /// The current directory.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the tokens this node holds.
    pub fn set_held(&self, held: Vec<Held>) {
        *self
            .held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(held);
    }

    /// The tokens this node holds.
    pub fn held(&self) -> Arc<Vec<Held>> {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Submitting side: the text of a held token that lets this node run `function` on the
    /// endpoint `endpoint` (registry id) of the institution `root` at `now` (Unix seconds), or
    /// why there is none.
    pub fn token_for(
        &self,
        endpoint: &str,
        root: Option<&Key>,
        function: &str,
        now: u64,
    ) -> Result<String, String> {
        let (Some(root), Some(institution)) = (root, self.institution) else {
            return Err("this node holds no capability token for it".into());
        };
        let held = self.held();
        let dir = self.directory();
        let mut last = None;
        for h in held.iter().filter(|h| h.endpoint == endpoint) {
            let req = Request {
                peer: self.me.clone(),
                institution,
                time: now,
                endpoint: endpoint.to_owned(),
                function: Some(function.to_owned()),
                ability: Ability::ComputeRun,
                path: None,
            };
            match self.verifier.check(&h.bytes, &dir, root, &req) {
                Ok(_) => return Ok(h.text.clone()),
                Err(r) => last = Some(r),
            }
        }
        Err(match last {
            None => "this node holds no capability token for it (an admin of its institution \
                     grants one with `funcmesh cap grant`; add it here with `funcmesh cap add`)"
                .into(),
            Some(r) => format!("the capability token held here is refused: {r}"),
        })
    }

    /// The text of a held token for `endpoint` (of the institution `root`) that allows `req`
    /// (whose `peer` and `institution` are filled in here), or why there is none.
    pub fn token_allowing(
        &self,
        endpoint: &str,
        root: &Key,
        mut req: Request,
    ) -> Result<String, String> {
        let Some(institution) = self.institution else {
            return Err("a coordinator holds no capability tokens".into());
        };
        req.peer = self.me.clone();
        req.institution = institution;
        let held = self.held();
        let dir = self.directory();
        let mut refusals = Vec::new();
        for h in held.iter().filter(|h| h.endpoint == endpoint) {
            match self.verifier.check(&h.bytes, &dir, root, &req) {
                Ok(_) => return Ok(h.text.clone()),
                Err(r) => refusals.push(r.to_string()),
            }
        }
        refusals.dedup();
        Err(match refusals.as_slice() {
            [] => format!(
                "this node holds no capability token for endpoint {endpoint} (an admin of its \
                 institution grants one with `funcmesh cap grant --ability {}`; add it here \
                 with `funcmesh cap add`)",
                req.ability
            ),
            [one] => format!("the capability token held here is refused: {one}"),
            many => format!(
                "the {} capability tokens held here for it are refused: {}",
                many.len(),
                many.join("; ")
            ),
        })
    }

    /// Endpoint side: whether the token `text` lets the member `req.peer` do `req` on an
    /// endpoint of the institution `root`.
    pub fn check(&self, text: &str, root: &Key, req: &Request) -> Result<(), Refusal> {
        self.check_presented(&Presented::from_text(text)?, root, req)
    }

    /// [`Access::check`] for a token decoded once per batch.
    pub fn check_presented(
        &self,
        token: &Presented,
        root: &Key,
        req: &Request,
    ) -> Result<(), Refusal> {
        let dir = self.directory();
        self.verifier
            .check_hashed(&token.bytes, token.hash, &dir, root, req)
            .map(|_| ())
    }

    /// Whether this refusal (of this token) is new here: refusals are logged once.
    pub fn first_refusal(&self, token: &str, reason: &str) -> bool {
        let tail: String = token.chars().rev().take(32).collect();
        let mut logged = self
            .logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.len() > 4096 {
            logged.clear();
        }
        logged.insert((tail, reason.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_admits_refuses_or_asks_for_a_token() {
        use Policy::*;
        let cases = [
            (Federation, Some("a"), Some("b"), "admitted"),
            (Federation, Some("a"), None, "admitted"),
            (Institution, Some("a"), Some("a"), "admitted"),
            (Institution, Some("a"), Some("b"), "refused"),
            (InstitutionAndCapability, Some("a"), Some("a"), "admitted"),
            (InstitutionAndCapability, Some("a"), Some("b"), "token"),
            (InstitutionAndCapability, Some("a"), None, "token"),
            (Capability, Some("a"), Some("a"), "token"),
            (Capability, Some("a"), Some("b"), "token"),
        ];
        for (policy, endpoint, submitter, want) in cases {
            let got = match verdict(policy, endpoint, submitter) {
                Verdict::Admitted => "admitted",
                Verdict::NeedsToken(why) => {
                    assert!(why.contains("capability token"), "{why}");
                    "token"
                }
                Verdict::Refused(why) => {
                    assert!(why.contains("only members of a"), "{why}");
                    "refused"
                }
            };
            assert_eq!(got, want, "{policy:?} {endpoint:?} {submitter:?}");
        }
    }

    #[test]
    fn a_task_refers_to_its_batchs_tokens_by_index() {
        let grant = capability::grant(
            &[1; 32],
            &capability::Grant {
                paths: vec![],
                to: Key([2; 32]),
                endpoint: "ep".into(),
                functions: vec![],
                abilities: vec![],
                expires: 4_000_000_000,
                not_before: None,
            },
        )
        .unwrap();
        let text = capability::to_text(&grant);
        let table = vec![
            Presented::from_text(&text),
            Err(Refusal::Malformed("bad".into())),
        ];
        assert_eq!(presented(&token_ref(0), &table).unwrap().text, text);
        assert_eq!(presented(&text, &table).unwrap().text, text);
        assert!(matches!(
            presented("@1", &table),
            Err(Refusal::Malformed(m)) if m == "bad"
        ));
        for bad in ["@2", "@", "@x", "@-1"] {
            let e = presented(bad, &table).unwrap_err();
            assert!(e.to_string().contains("does not carry"), "{bad}: {e}");
        }
        assert!(presented("not a token!", &table).is_err());
    }

    #[test]
    fn a_node_without_tokens_is_told_how_to_get_one() {
        let access = Access::new(PeerId::random(), Some(Key([1; 32])));
        let why = access
            .token_for("ep", Some(&Key([2; 32])), "f", 0)
            .unwrap_err();
        assert!(why.contains("funcmesh cap add"), "{why}");
        assert!(Held::parse("not a token").is_err());
    }
}
