//! The node's identity: its own key pair, and the certificate the
//! coordinator issued for it (see `fleetmap_coordinator::nodes`). A node
//! enrolls once with the join token and then connects with its certificate
//! (mutual TLS) and no token; a certificate that nears its end is renewed
//! when the node connects. Kept in the daemon's state directory
//! (`node.key`, 0600; `node.pem`), or in memory for an embedded cluster.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use fleetmap_net::ClientIdentity;
use rcgen::KeyPair;

/// Why the identity could not be read or kept.
#[derive(Debug, thiserror::Error)]
#[error("node identity in {path}: {reason}")]
pub struct IdentityError {
    path: PathBuf,
    reason: String,
}

pub struct Identity {
    dir: Option<PathBuf>,
    key: KeyPair,
    key_pem: String,
    cert_pem: Mutex<Option<String>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn write(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    // A temporary file of its own per target, made new: one left behind
    // by a crash (with another file's mode) is never written into.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))?;
    fs::rename(&tmp, path)
}

impl Identity {
    /// The identity in `dir` (made there the first time), or a new one in
    /// memory.
    pub fn load_or_create(dir: Option<&Path>) -> Result<Self, IdentityError> {
        let fail = |path: &Path, reason: String| IdentityError {
            path: path.to_path_buf(),
            reason,
        };
        let Some(dir) = dir else {
            let key = KeyPair::generate().map_err(|e| fail(Path::new("(memory)"), e.to_string()))?;
            return Ok(Self {
                dir: None,
                key_pem: key.serialize_pem(),
                key,
                cert_pem: Mutex::new(None),
            });
        };
        fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        let key_path = dir.join("node.key");
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate().map_err(|e| fail(&key_path, e.to_string()))?;
                let pem = key.serialize_pem();
                write(&key_path, &pem, 0o600).map_err(|e| fail(&key_path, e.to_string()))?;
                pem
            }
            Err(e) => return Err(fail(&key_path, e.to_string())),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| fail(&key_path, e.to_string()))?;
        let cert_pem = fs::read_to_string(dir.join("node.pem")).ok();
        Ok(Self {
            dir: Some(dir.to_path_buf()),
            key,
            key_pem,
            cert_pem: Mutex::new(cert_pem),
        })
    }

    /// The raw public key the coordinator certifies.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The certificate and key to present, once the node has a certificate.
    pub fn client(&self) -> Option<ClientIdentity> {
        let cert = self.cert_pem.lock().expect("identity lock poisoned").clone()?;
        Some(ClientIdentity {
            cert_pem: cert.into_bytes(),
            key_pem: self.key_pem.clone().into_bytes(),
        })
    }

    /// Keeps the certificate the coordinator issued.
    pub fn store(&self, cert_pem: String) -> Result<(), IdentityError> {
        if let Some(dir) = &self.dir {
            let path = dir.join("node.pem");
            write(&path, &cert_pem, 0o644).map_err(|e| IdentityError {
                path,
                reason: e.to_string(),
            })?;
        }
        *self.cert_pem.lock().expect("identity lock poisoned") = Some(cert_pem);
        Ok(())
    }

    /// Sets the certificate aside (the coordinator's TLS handshake refused
    /// it: expired, say), so that the next join enrolls with the token.
    pub fn forget_certificate(&self) {
        *self.cert_pem.lock().expect("identity lock poisoned") = None;
        if let Some(dir) = &self.dir {
            let _ = fs::rename(dir.join("node.pem"), dir.join("node.pem.refused"));
        }
    }
}
