//! The coordinator's credentials: a cluster CA, the server certificate it
//! signs (for [`fleetmap_net::SERVER_NAME`]), the join token that node
//! daemons present and the API key that clients present.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use subtle::ConstantTimeEq;

/// Why credentials could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("could not generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the operating system has no randomness to make secrets from: {0}")]
    NoRandomness(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a coordinator needs to admit peers over TLS.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub join_token: String,
    pub api_key: String,
    /// The CA that signs node certificates (see `nodes.rs`), apart from the
    /// one that signs the coordinator's, and its private key.
    pub node_ca_pem: String,
    pub node_ca_key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// Where [`Credentials::load_or_create`] keeps each file in a state directory.
#[derive(Debug, Clone)]
pub struct CredentialPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub join_token: PathBuf,
    pub api_key: PathBuf,
    pub node_ca: PathBuf,
    pub node_ca_key: PathBuf,
}

impl CredentialPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            join_token: dir.join("join-token"),
            api_key: dir.join("api-key"),
            node_ca: dir.join("node-ca.pem"),
            node_ca_key: dir.join("node-ca.key"),
        }
    }
}

/// The distinguished name of the CA that signs node certificates: fixed, so
/// that the issuer rebuilt from its key (`nodes::NodeCa`) names the same CA.
pub const NODE_CA_NAME: &str = "fleetmap node CA";

/// The parameters of the node CA's certificate.
pub fn node_ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, NODE_CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A new node CA: (certificate, private key), PEM.
fn node_ca() -> Result<(String, String), CredentialsError> {
    let key = KeyPair::generate()?;
    let cert = node_ca_params()?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn secret(prefix: &str) -> Result<String, CredentialsError> {
    let mut bytes = [0u8; 24];
    // The operating system's generator, and nothing weaker.
    getrandom::fill(&mut bytes).map_err(|e| CredentialsError::NoRandomness(e.to_string()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{prefix}{hex}"))
}

impl Credentials {
    /// Fresh credentials: a new CA, server certificate, token and key.
    pub fn generate() -> Result<Self, CredentialsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fleetmap cluster CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;

        let mut params = CertificateParams::new(vec![fleetmap_net::SERVER_NAME.to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, fleetmap_net::SERVER_NAME);
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let (node_ca_pem, node_ca_key_pem) = node_ca()?;
        Ok(Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            join_token: secret("fmjoin_")?,
            api_key: secret("fmkey_")?,
            node_ca_pem,
            node_ca_key_pem,
        })
    }

    /// The credentials kept in `dir`, made and written there (secrets with
    /// mode 0600) the first time, so a restarted coordinator keeps its CA,
    /// token and key and its nodes and clients need no new configuration.
    pub fn load_or_create(dir: &Path) -> Result<Self, CredentialsError> {
        let paths = CredentialPaths::in_dir(dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CredentialsError::Io { path, source }
        };
        let write = |p: &Path, text: &str, mode: u32| {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(p)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(io(p))
        };
        if paths.ca.exists() {
            let read = |p: &Path| fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(io(p));
            if !paths.node_ca.exists() {
                // A state directory from before node certificates: it gets
                // its node CA now (the key first: the certificate marks it
                // complete).
                let (cert, key) = node_ca()?;
                write(&paths.node_ca_key, &key, 0o600)?;
                write(&paths.node_ca, &cert, 0o644)?;
            }
            return Ok(Self {
                ca_pem: read(&paths.ca)?,
                cert_pem: read(&paths.cert)?,
                key_pem: read(&paths.key)?,
                join_token: read(&paths.join_token)?,
                api_key: read(&paths.api_key)?,
                node_ca_pem: read(&paths.node_ca)?,
                node_ca_key_pem: read(&paths.node_ca_key)?,
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let creds = Self::generate()?;
        write(&paths.cert, &creds.cert_pem, 0o644)?;
        write(&paths.key, &creds.key_pem, 0o600)?;
        write(&paths.join_token, &creds.join_token, 0o600)?;
        write(&paths.api_key, &creds.api_key, 0o600)?;
        write(&paths.node_ca_key, &creds.node_ca_key_pem, 0o600)?;
        write(&paths.node_ca, &creds.node_ca_pem, 0o644)?;
        // The CA goes last: its presence marks the set as complete.
        write(&paths.ca, &creds.ca_pem, 0o644)?;
        Ok(creds)
    }
}

/// Compares secrets in time independent of where they differ.
pub fn secrets_match(given: &str, expected: &str) -> bool {
    // subtle compares in constant time for equal lengths; a key's length
    // is not a secret (every key of a fleet has the same).
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_persist_across_restarts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = Credentials::load_or_create(&dir).unwrap();
        let again = Credentials::load_or_create(&dir).unwrap();
        assert_eq!(first.api_key, again.api_key);
        assert_eq!(first.ca_pem.trim(), again.ca_pem);
        assert!(first.join_token.starts_with("fmjoin_"));
        let mode = fs::metadata(dir.join("api-key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abd", "abc"));
        assert!(!secrets_match("ab", "abc"));
    }
}
