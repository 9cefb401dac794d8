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
}

impl CredentialPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            join_token: dir.join("join-token"),
            api_key: dir.join("api-key"),
        }
    }
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
        Ok(Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            join_token: secret("fmjoin_")?,
            api_key: secret("fmkey_")?,
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
        if paths.ca.exists() {
            let read = |p: &Path| fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(io(p));
            return Ok(Self {
                ca_pem: read(&paths.ca)?,
                cert_pem: read(&paths.cert)?,
                key_pem: read(&paths.key)?,
                join_token: read(&paths.join_token)?,
                api_key: read(&paths.api_key)?,
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let creds = Self::generate()?;
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
        write(&paths.cert, &creds.cert_pem, 0o644)?;
        write(&paths.key, &creds.key_pem, 0o600)?;
        write(&paths.join_token, &creds.join_token, 0o600)?;
        write(&paths.api_key, &creds.api_key, 0o600)?;
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
