//! Node identity. The join token is a bootstrap secret: a node presents it
//! once, with its public key, and gets a certificate for its name signed by
//! the cluster's node CA ([`NodeCa`]). From then on it connects with mutual
//! TLS (the coordinator's endpoint verifies the certificate against the
//! node CA, with its validity) and sends no token. Certificates expire
//! (`CoordinatorConfig::node_cert_validity`, 30 days by default) and are
//! renewed when a node connects in the last third of its certificate's
//! life.
//!
//! The [`NodeRegistry`] (`nodes.tsv` in the state directory, 0600) records
//! each node's current certificate by fingerprint (SHA-256 of its DER) and
//! whether it is revoked: only a node's latest certificate is accepted, and
//! `fleetmap nodes revoke NAME` refuses the node at once, its certificate
//! and its name (the join token cannot enroll it again).

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, PublicKeyData, SignatureAlgorithm};
use sha2::{Digest, Sha256};

use crate::{
    credentials::{node_ca_params, Credentials},
    statefile::{self, now, optional, show, Stamp, StateFileError},
};

/// How long a node certificate is valid by default.
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// The file of nodes in a coordinator's state directory.
pub const NODES_FILE: &str = "nodes.tsv";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeIdentityError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error("{path}, line {line}: {reason}")]
    Malformed { path: PathBuf, line: usize, reason: String },
    #[error("no node named {0:?}; `fleetmap nodes list` shows the nodes")]
    Unknown(String),
    #[error("cannot certify node {name}: {reason}")]
    Certify { name: String, reason: String },
}

/// A node's public key as it sends it: a raw ECDSA P-256 point.
struct NodePublicKey(Vec<u8>);

impl PublicKeyData for NodePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The SHA-256 of a certificate's DER, hex: how the registry knows it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub pem: String,
    pub fingerprint: String,
    /// Unix seconds.
    pub expires: u64,
}

/// The CA that signs node certificates.
pub struct NodeCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    validity: Duration,
}

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCa")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// The node CA of `credentials`, issuing certificates valid for
    /// `validity`.
    pub fn new(credentials: &Credentials, validity: Duration) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(&credentials.node_ca_key_pem)?;
        // Rebuilt with the same name and key, it signs as the stored CA.
        let issuer = node_ca_params()?.self_signed(&key)?;
        Ok(Self { issuer, key, validity })
    }

    pub fn validity(&self) -> Duration {
        self.validity
    }

    /// A certificate for node `name` and its raw P-256 `public_key`.
    pub fn certify(&self, name: &str, public_key: &[u8]) -> Result<Issued, NodeIdentityError> {
        let fail = |reason: String| NodeIdentityError::Certify {
            name: name.into(),
            reason,
        };
        // An uncompressed P-256 point: 0x04, then 32 bytes of x and of y.
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(fail(format!(
                "its public key is not a P-256 point ({} bytes)",
                public_key.len()
            )));
        }
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let start = time::OffsetDateTime::now_utc();
        // A minute's grace for clocks a little behind the coordinator's.
        params.not_before = start - time::Duration::minutes(1);
        params.not_after = start + self.validity;
        let expires = params.not_after.unix_timestamp().max(0) as u64;
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| fail(e.to_string()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        let cert = params
            .signed_by(&NodePublicKey(public_key.to_vec()), &self.issuer, &self.key)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Issued {
            pem: cert.pem(),
            fingerprint: fingerprint(cert.der()),
            expires,
        })
    }
}

/// One node as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    /// The fingerprint of its current certificate.
    pub fingerprint: Option<String>,
    /// When that certificate expires (Unix seconds).
    pub expires: Option<u64>,
    /// The certificate it held when its current one was issued in a
    /// renewal, accepted until the node first uses the new one: a renewal
    /// whose answer never reached the node does not lock it out.
    pub previous: Option<String>,
    /// When it was revoked, if it was.
    pub revoked: Option<u64>,
    /// When it was approved (`None`: waiting for `fleetmap nodes approve`,
    /// on a coordinator that holds new nodes for approval).
    pub approved: Option<u64>,
    /// When the join token last asked to enroll it again while it held a
    /// valid certificate: waiting for `fleetmap nodes approve`, which
    /// retires that certificate.
    pub requested: Option<u64>,
    /// When it first asked to enroll.
    pub enrolled: u64,
}

fn parse(path: &Path, text: &str) -> Result<Vec<NodeEntry>, NodeIdentityError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = |reason: String| NodeIdentityError::Malformed {
            path: path.into(),
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split('\t').collect();
        // Registries written before renewals kept the previous certificate
        // have six fields; before re-enrollment requests, seven.
        let (name, fingerprint, expires, revoked, approved, enrolled, previous, requested) = match fields[..] {
            [name, fingerprint, expires, revoked, approved, enrolled] => {
                (name, fingerprint, expires, revoked, approved, enrolled, "-", "-")
            }
            [name, fingerprint, expires, revoked, approved, enrolled, previous] => {
                (name, fingerprint, expires, revoked, approved, enrolled, previous, "-")
            }
            [name, fingerprint, expires, revoked, approved, enrolled, previous, requested] => (
                name,
                fingerprint,
                expires,
                revoked,
                approved,
                enrolled,
                previous,
                requested,
            ),
            _ => return Err(malformed(format!("{} fields, 8 expected", fields.len()))),
        };
        entries.push(NodeEntry {
            name: name.into(),
            fingerprint: optional(fingerprint).map_err(malformed)?,
            expires: optional(expires).map_err(malformed)?,
            previous: optional(previous).map_err(malformed)?,
            revoked: optional(revoked).map_err(malformed)?,
            approved: optional(approved).map_err(malformed)?,
            requested: optional(requested).map_err(malformed)?,
            enrolled: enrolled
                .parse()
                .map_err(|_| malformed(format!("bad time {enrolled:?}")))?,
        });
    }
    Ok(entries)
}

fn render(entries: &[NodeEntry]) -> String {
    let mut out = String::from(
        "# fleetmap nodes: name, SHA-256 of its certificate, expires, revoked, approved, enrolled, SHA-256 of the \
         certificate it renewed, asked to enroll again (times in Unix seconds)\n",
    );
    for e in entries {
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            e.name,
            show(e.fingerprint.as_ref()),
            show(e.expires),
            show(e.revoked),
            show(e.approved),
            e.enrolled,
            show(e.previous.as_ref()),
            show(e.requested),
        );
    }
    out
}

/// The fleet's nodes: their current certificates, and which are revoked.
pub struct NodeRegistry {
    /// `None` for an embedded cluster: kept in memory.
    path: Option<PathBuf>,
    loaded: Mutex<(Option<Stamp>, Vec<NodeEntry>)>,
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRegistry")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl NodeRegistry {
    pub fn in_memory() -> Self {
        Self {
            path: None,
            loaded: Mutex::default(),
        }
    }

    /// The registry in state directory `dir`.
    pub fn open(dir: &Path) -> Self {
        Self {
            path: Some(dir.join(NODES_FILE)),
            loaded: Mutex::default(),
        }
    }

    /// Every node, in the order they first enrolled.
    pub fn list(&self) -> Result<Vec<NodeEntry>, NodeIdentityError> {
        self.refresh()?;
        Ok(self.lock().1.clone())
    }

    /// The node named `name`.
    pub fn entry(&self, name: &str) -> Result<Option<NodeEntry>, NodeIdentityError> {
        Ok(self.list()?.into_iter().find(|e| e.name == name))
    }

    /// The node whose current certificate has `fingerprint`.
    pub fn by_fingerprint(&self, fingerprint: &str) -> Result<Option<NodeEntry>, NodeIdentityError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|e| e.fingerprint.as_deref() == Some(fingerprint)))
    }

    /// Records node `name`'s new certificate. `held`: the fingerprint of
    /// the certificate it renews, still accepted until the new one is used
    /// ([`Self::confirm`]); any other is no longer accepted. A renewal is
    /// recorded only if the registry still accepts `held` (another renewal,
    /// a revocation or an approval may have come first): `Ok(false)` then,
    /// and the new certificate must not be handed out.
    pub fn record(&self, name: &str, issued: &Issued, held: Option<&str>) -> Result<bool, NodeIdentityError> {
        let mut recorded = true;
        self.edit(|entries| {
            match entries.iter_mut().find(|e| e.name == name) {
                Some(e) => {
                    if let Some(held) = held {
                        if e.fingerprint.as_deref() != Some(held) && e.previous.as_deref() != Some(held) {
                            recorded = false;
                            return Ok(());
                        }
                    }
                    e.fingerprint = Some(issued.fingerprint.clone());
                    e.expires = Some(issued.expires);
                    e.previous = held.map(String::from);
                }
                None => entries.push(NodeEntry {
                    name: name.into(),
                    fingerprint: Some(issued.fingerprint.clone()),
                    expires: Some(issued.expires),
                    previous: None,
                    revoked: None,
                    approved: Some(now()),
                    requested: None,
                    enrolled: now(),
                }),
            }
            Ok(())
        })?;
        Ok(recorded)
    }

    /// Node `name` used its new certificate: the one it renewed is no
    /// longer accepted.
    pub fn confirm(&self, name: &str) -> Result<(), NodeIdentityError> {
        self.edit(|entries| {
            if let Some(e) = entries.iter_mut().find(|e| e.name == name) {
                e.previous = None;
            }
            Ok(())
        })
    }

    /// Records that node `name` asked to enroll with the join token and
    /// waits for approval: a new node, or one that holds a valid
    /// certificate (which keeps working until the approval retires it).
    pub fn request(&self, name: &str) -> Result<(), NodeIdentityError> {
        self.edit(|entries| {
            match entries.iter_mut().find(|e| e.name == name) {
                Some(e) => {
                    if e.fingerprint.is_some() && e.requested.is_none() {
                        e.requested = Some(now());
                    }
                }
                None => entries.push(NodeEntry {
                    name: name.into(),
                    fingerprint: None,
                    expires: None,
                    previous: None,
                    revoked: None,
                    approved: None,
                    requested: None,
                    enrolled: now(),
                }),
            }
            Ok(())
        })
    }

    /// Approves node `name`: it may enroll with the join token. A revoked
    /// node approved again may enroll anew (with a new certificate), and so
    /// may one that asked to enroll again while it held a valid
    /// certificate, which is retired.
    pub fn approve(&self, name: &str) -> Result<(), NodeIdentityError> {
        self.edit(|entries| {
            let e = entries
                .iter_mut()
                .find(|e| e.name == name)
                .ok_or_else(|| NodeIdentityError::Unknown(name.into()))?;
            if e.requested.take().is_some() {
                e.fingerprint = None;
                e.expires = None;
            }
            // Whatever it renewed is never accepted again.
            e.previous = None;
            e.approved = Some(now());
            e.revoked = None;
            Ok(())
        })
    }

    /// Revokes node `name`: its certificate and its name are refused, so
    /// the join token cannot enroll it again.
    pub fn revoke(&self, name: &str) -> Result<(), NodeIdentityError> {
        self.edit(|entries| {
            let e = entries
                .iter_mut()
                .find(|e| e.name == name && e.revoked.is_none())
                .ok_or_else(|| NodeIdentityError::Unknown(name.into()))?;
            e.revoked = Some(now());
            e.fingerprint = None;
            e.previous = None;
            Ok(())
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Stamp>, Vec<NodeEntry>)> {
        self.loaded.lock().expect("node registry lock poisoned")
    }

    fn refresh(&self) -> Result<(), NodeIdentityError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !path.exists() {
            return Ok(());
        }
        let stamp = Stamp::of(path)?;
        if self.lock().0 == Some(stamp) {
            return Ok(());
        }
        let entries = parse(path, &statefile::read(path)?)?;
        *self.lock() = (Some(stamp), entries);
        Ok(())
    }

    fn edit(
        &self,
        change: impl FnOnce(&mut Vec<NodeEntry>) -> Result<(), NodeIdentityError>,
    ) -> Result<(), NodeIdentityError> {
        match &self.path {
            None => change(&mut self.lock().1),
            Some(path) => {
                statefile::edit(path, |text| {
                    let mut entries = parse(path, text)?;
                    change(&mut entries)?;
                    Ok::<_, NodeIdentityError>(render(&entries))
                })?;
                self.refresh()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_node_and_the_registry_knows_only_the_latest() {
        let creds = Credentials::generate().unwrap();
        let ca = NodeCa::new(&creds, Duration::from_secs(3600)).unwrap();
        let key = KeyPair::generate().unwrap();
        let first = ca.certify("gpu-03", key.public_key_raw()).unwrap();
        assert!(first.pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(first.expires > now() + 3500 && first.expires <= now() + 3600);
        assert!(ca.certify("gpu-03", b"not a key").is_err());

        let dir = tempfile::tempdir().unwrap();
        let registry = NodeRegistry::open(dir.path());
        assert!(registry.record("gpu-03", &first, None).unwrap());
        assert_eq!(
            registry.by_fingerprint(&first.fingerprint).unwrap().unwrap().name,
            "gpu-03"
        );
        let renewed = ca.certify("gpu-03", key.public_key_raw()).unwrap();
        assert_ne!(renewed.fingerprint, first.fingerprint);
        assert!(registry.record("gpu-03", &renewed, Some(&first.fingerprint)).unwrap());
        let other = ca.certify("gpu-03", key.public_key_raw()).unwrap();
        assert!(!registry
            .record("gpu-03", &other, Some("not-a-held-fingerprint"))
            .unwrap());
        assert_eq!(
            registry.entry("gpu-03").unwrap().unwrap().fingerprint.as_deref(),
            Some(renewed.fingerprint.as_str()),
            "a renewal of a certificate the registry no longer accepts is not recorded"
        );
        let entry = registry.entry("gpu-03").unwrap().unwrap();
        assert_eq!(
            entry.previous.as_deref(),
            Some(first.fingerprint.as_str()),
            "kept until used"
        );
        registry.confirm("gpu-03").unwrap();
        assert_eq!(registry.entry("gpu-03").unwrap().unwrap().previous, None);
        assert_eq!(registry.by_fingerprint(&first.fingerprint).unwrap(), None, "superseded");

        // The join token asking to enroll it again holds it for approval;
        // its certificate keeps working until the approval retires it.
        registry.request("gpu-03").unwrap();
        let entry = registry.entry("gpu-03").unwrap().unwrap();
        assert!(entry.requested.is_some() && entry.approved.is_some(), "{entry:?}");
        assert_eq!(entry.fingerprint.as_deref(), Some(renewed.fingerprint.as_str()));
        registry.approve("gpu-03").unwrap();
        let entry = registry.entry("gpu-03").unwrap().unwrap();
        assert!(entry.requested.is_none() && entry.fingerprint.is_none(), "{entry:?}");
        assert!(registry.record("gpu-03", &renewed, None).unwrap());
        // Approving a node that waits for nothing retires nothing.
        registry.approve("gpu-03").unwrap();
        assert!(registry.entry("gpu-03").unwrap().unwrap().fingerprint.is_some());

        // Another process (the command line) revokes it; this one sees it.
        NodeRegistry::open(dir.path()).revoke("gpu-03").unwrap();
        let entry = registry.entry("gpu-03").unwrap().unwrap();
        assert!(entry.revoked.is_some());
        assert_eq!(registry.by_fingerprint(&renewed.fingerprint).unwrap(), None);
        assert!(matches!(registry.revoke("gpu-03"), Err(NodeIdentityError::Unknown(_))));
    }
}
