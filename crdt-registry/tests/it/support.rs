//! A toy authority: admissions and proofs signed with plain ed25519 keys, so that the registry's
//! rules can be tested without the mesh's membership chain.

use crdt_registry::record::{
    Body, Capabilities, EndpointRecord, FunctionKind, FunctionRecord, FunctionSpec,
    InstitutionRecord, NodeRecord, Policy,
};
use crdt_registry::{Authority, InstitutionFacts, Key, NodeFacts, Registry};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _};
use serde::{Deserialize, Serialize};

pub(crate) const FED: &str = "fedtest";

pub(crate) struct Toy {
    pub(crate) fed: SigningKey,
}

#[derive(Serialize, Deserialize)]
struct Admission {
    name: String,
    key: Key,
    sig: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    admission: String,
    node: Key,
    sig: Vec<u8>,
    /// The invite used and when the node was admitted (not signed: the toy checks only the
    /// view's rule that an invite admits one node).
    #[serde(default)]
    invite: Option<(String, u64)>,
}

pub(crate) fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

impl Toy {
    pub(crate) fn new() -> Toy {
        Toy { fed: key(200) }
    }

    pub(crate) fn admit(&self, name: &str, inst: &SigningKey) -> String {
        self.admission_signed_by(name, inst, &self.fed)
    }

    pub(crate) fn admission_signed_by(
        &self,
        name: &str,
        inst: &SigningKey,
        by: &SigningKey,
    ) -> String {
        let key = Key::of(inst);
        let sig = by
            .sign(format!("{name}|{key}").as_bytes())
            .to_bytes()
            .to_vec();
        serde_json::to_string(&Admission {
            name: name.into(),
            key,
            sig,
        })
        .unwrap()
    }

    pub(crate) fn proof(&self, admission: &str, inst: &SigningKey, node: &SigningKey) -> String {
        self.proof_with_invite(admission, inst, node, None)
    }

    /// A proof that says the node joined with `invite`, admitted at `at`.
    pub(crate) fn proof_with_invite(
        &self,
        admission: &str,
        inst: &SigningKey,
        node: &SigningKey,
        invite: Option<(&str, u64)>,
    ) -> String {
        let node = Key::of(node);
        let sig = inst.sign(&node.0).to_bytes().to_vec();
        serde_json::to_string(&Proof {
            admission: admission.into(),
            node,
            sig,
            invite: invite.map(|(i, at)| (i.to_string(), at)),
        })
        .unwrap()
    }
}

impl Authority for Toy {
    fn federation_key(&self) -> Key {
        Key::of(&self.fed)
    }

    fn admission(&self, admission: &str) -> Result<InstitutionFacts, String> {
        let a: Admission = serde_json::from_str(admission).map_err(|e| e.to_string())?;
        let sig = ed25519_dalek::Signature::from_slice(&a.sig).map_err(|e| e.to_string())?;
        self.fed
            .verifying_key()
            .verify(format!("{}|{}", a.name, a.key).as_bytes(), &sig)
            .map_err(|_| "the admission is not signed by the federation key".to_string())?;
        Ok(InstitutionFacts {
            name: a.name,
            key: a.key,
            admitted_at: 1,
        })
    }

    fn membership(&self, proof: &str, node_key: &Key) -> Result<NodeFacts, String> {
        let p: Proof = serde_json::from_str(proof).map_err(|e| e.to_string())?;
        let inst = Authority::admission(self, &p.admission)?;
        if p.node != *node_key {
            return Err("the proof is for another node".into());
        }
        let sig = ed25519_dalek::Signature::from_slice(&p.sig).map_err(|e| e.to_string())?;
        ed25519_dalek::VerifyingKey::from_bytes(&inst.key.0)
            .map_err(|e| e.to_string())?
            .verify(&node_key.0, &sig)
            .map_err(|_| "the proof is not signed by the institution".to_string())?;
        Ok(NodeFacts {
            peer_id: format!("peer-{}", &node_key.to_string()[..8]),
            institution: Some((inst.name, inst.key)),
            role: "endpoint".into(),
            invite: p.invite,
        })
    }
}

/// A member: its institution and node keys, and its own replica.
pub(crate) struct Member {
    pub(crate) inst: SigningKey,
    pub(crate) node: SigningKey,

    pub(crate) reg: Registry,
}

impl Member {
    /// A member of institution `inst_seed`, with its institution and node entries written.
    pub(crate) fn new(toy: &Toy, inst_seed: u8, node_seed: u8) -> (Member, Vec<Vec<u8>>) {
        let inst = key(inst_seed);
        let node = key(node_seed);
        let admission = toy.admit(&format!("inst{inst_seed}"), &inst);
        let mut reg = Registry::new(FED);
        let mut changes = Vec::new();
        let (_, c) = reg
            .write(
                &node,
                Key::of(&inst).to_string(),
                Body::Institution(InstitutionRecord {
                    admission: admission.clone(),
                }),
                1,
            )
            .unwrap();
        changes.push(c);
        let (_, c) = reg
            .write(
                &node,
                Key::of(&node).to_string(),
                Body::Node(NodeRecord {
                    name: format!("node{node_seed}"),
                    proof: toy.proof(&admission, &inst, &node),
                    addrs: vec![],
                    data_addr: None,
                }),
                2,
            )
            .unwrap();
        changes.push(c);
        (Member { inst, node, reg }, changes)
    }

    pub(crate) fn register(&mut self, name: &str, now: u64) -> (String, Vec<u8>) {
        let rec = function(&self.node, name);
        let id = rec.content_id();
        let (_, c) = self
            .reg
            .write(&self.node, id.clone(), Body::Function(rec), now)
            .unwrap();
        (id, c)
    }

    pub(crate) fn endpoint(&mut self, name: &str, tag: &str, now: u64) -> (String, Vec<u8>) {
        let rec = endpoint(&self.node, name, tag);
        let id = EndpointRecord::id_for(&Key::of(&self.node), name);
        let (_, c) = self
            .reg
            .write(&self.node, id.clone(), Body::Endpoint(rec), now)
            .unwrap();
        (id, c)
    }
}

pub(crate) fn function(owner: &SigningKey, name: &str) -> FunctionRecord {
    FunctionRecord {
        name: name.into(),
        owner: Key::of(owner),
        kind: FunctionKind::Shell,
        spec: FunctionSpec::Shell {
            command: format!("echo {name} {{x}}"),
        },
        container: None,
        description: String::new(),
        created_ms: 3,
    }
}

pub(crate) fn endpoint(node: &SigningKey, name: &str, tag: &str) -> EndpointRecord {
    EndpointRecord {
        host_isolation: String::new(),
        name: name.into(),
        description: String::new(),
        node: Key::of(node),
        capabilities: Capabilities {
            cores: 2,
            memory_mb: 1024,
            gpus: 0,
            tags: [("tag".to_string(), tag.to_string())].into(),
        },
        runtimes: vec!["host".into()],
        policy: Policy::default(),
        public: true,
    }
}
