//! Named API keys: who may submit jobs, as whom, within what quota.
//!
//! Each key belongs to a principal (its name, `alice`); the coordinator
//! keeps only the SHA-256 of each key, in `keys.tsv` in its state directory
//! (mode 0600), one line per key:
//!
//! ```text
//! name<TAB>sha256-hex<TAB>created-unix-seconds<TAB>revoked-unix-seconds or -<TAB>max-slots or -<TAB>max-jobs or -
//! ```
//!
//! `fleetmap keys create|list|revoke` edit that file; a running coordinator
//! reads it again whenever it has changed, before it admits a client and
//! before it takes each job, so a revoked key is refused at once, even on a
//! connection that is already open. The coordinator's original `api-key`
//! becomes the first named key, `default`, so set-ups made before named keys
//! keep working.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use sha2::{Digest, Sha256};

use crate::statefile::{self, now, optional, show, Stamp, StateFileError};

/// The name the coordinator's original API key gets.
pub const DEFAULT_KEY_NAME: &str = "default";

/// The file of keys in a coordinator's state directory.
pub const KEYS_FILE: &str = "keys.tsv";

/// What a principal may hold at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Slots over all its jobs.
    pub max_slots: Option<u32>,
    /// Jobs running or waiting.
    pub max_jobs: Option<u32>,
}

/// One key as the coordinator keeps it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub name: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    pub created: u64,
    pub revoked: Option<u64>,
    pub quota: Quota,
}

/// Who a client is once its key is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub quota: Quota,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error("{path}, line {line}: {reason}")]
    Malformed { path: PathBuf, line: usize, reason: String },
    #[error("a key name must be 1 to 64 letters, digits, '-', '_', '.' or '@', got {0:?}")]
    BadName(String),
    #[error("a key named {0:?} already exists; revoke it first or choose another name")]
    Exists(String),
    #[error("no key named {0:?}; `fleetmap keys list` shows the keys")]
    Unknown(String),
    #[error("the operating system has no randomness to make a key from: {0}")]
    NoRandomness(String),
    #[error("an embedded cluster has one key, kept in memory")]
    InMemory,
}

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadName(name.into()))
    }
}

fn parse(path: &Path, text: &str) -> Result<Vec<KeyEntry>, KeyError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let malformed = |reason: String| KeyError::Malformed {
            path: path.into(),
            line: i + 1,
            reason,
        };
        let fields: Vec<&str> = line.split('\t').collect();
        let [name, hash, created, revoked, max_slots, max_jobs] = fields[..] else {
            return Err(malformed(format!("{} fields, 6 expected", fields.len())));
        };
        check_name(name).map_err(|e| malformed(e.to_string()))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed("the hash is not 64 hex digits".into()));
        }
        entries.push(KeyEntry {
            name: name.into(),
            hash: hash.to_ascii_lowercase(),
            created: created
                .parse()
                .map_err(|_| malformed(format!("bad time {created:?}")))?,
            revoked: optional(revoked).map_err(malformed)?,
            quota: Quota {
                max_slots: optional(max_slots).map_err(malformed)?,
                max_jobs: optional(max_jobs).map_err(malformed)?,
            },
        });
    }
    Ok(entries)
}

fn render(entries: &[KeyEntry]) -> String {
    let mut out = String::from(
        "# fleetmap API keys: name, SHA-256 of the key, created, revoked, max slots, max jobs (times in Unix seconds)\n",
    );
    for e in entries {
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            e.name,
            e.hash,
            e.created,
            show(e.revoked),
            show(e.quota.max_slots),
            show(e.quota.max_jobs)
        );
    }
    out
}

/// What the store last read, and when the file last changed.
#[derive(Default)]
struct Loaded {
    stamp: Option<Stamp>,
    by_hash: HashMap<String, KeyEntry>,
}

/// The keys a coordinator admits clients with.
pub struct KeyStore {
    /// `None` for an embedded cluster: one key, kept in memory.
    path: Option<PathBuf>,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// One key, `default`, never written anywhere (the embedded cluster).
    pub fn single(key: &str) -> Self {
        let entry = KeyEntry {
            name: DEFAULT_KEY_NAME.into(),
            hash: hash(key),
            created: now(),
            revoked: None,
            quota: Quota::default(),
        };
        let by_hash = HashMap::from([(entry.hash.clone(), entry)]);
        Self {
            path: None,
            loaded: Mutex::new(Loaded { stamp: None, by_hash }),
        }
    }

    /// The keys in `dir`; the first time, `default_key` (the coordinator's
    /// original API key) becomes the key named `default`.
    pub fn open(dir: &Path, default_key: &str) -> Result<Self, KeyError> {
        let path = dir.join(KEYS_FILE);
        let store = Self {
            path: Some(path.clone()),
            loaded: Mutex::default(),
        };
        if !path.exists() {
            store.edit(|entries| {
                if entries.is_empty() {
                    entries.push(KeyEntry {
                        name: DEFAULT_KEY_NAME.into(),
                        hash: hash(default_key),
                        created: now(),
                        revoked: None,
                        quota: Quota::default(),
                    });
                }
                Ok(())
            })?;
        }
        store.refresh()?;
        Ok(store)
    }

    /// Who `key` belongs to, unless it is unknown or revoked. The file is
    /// read again first if it has changed; if it cannot be read, the keys
    /// last read stand (and the error is the caller's to log).
    pub fn authenticate(&self, key: &str) -> (Option<Principal>, Option<KeyError>) {
        let error = self.refresh().err();
        let loaded = self.loaded.lock().expect("key store lock poisoned");
        let principal = loaded
            .by_hash
            .get(&hash(key))
            .filter(|e| e.revoked.is_none())
            .map(|e| Principal {
                name: e.name.clone(),
                quota: e.quota,
            });
        (principal, error)
    }

    /// Every key, revoked ones included, in the file's order.
    pub fn list(&self) -> Result<Vec<KeyEntry>, KeyError> {
        self.read()
    }

    /// Makes a key for `name`: returns the key, which is stored nowhere
    /// (only its hash is).
    pub fn create(&self, name: &str, quota: Quota) -> Result<String, KeyError> {
        check_name(name)?;
        let mut bytes = [0u8; 24];
        getrandom::fill(&mut bytes).map_err(|e| KeyError::NoRandomness(e.to_string()))?;
        let key = format!("fmkey_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
        self.edit(|entries| {
            if entries.iter().any(|e| e.name == name && e.revoked.is_none()) {
                return Err(KeyError::Exists(name.into()));
            }
            entries.push(KeyEntry {
                name: name.into(),
                hash: hash(&key),
                created: now(),
                revoked: None,
                quota,
            });
            Ok(())
        })?;
        Ok(key)
    }

    /// Revokes every key of `name` still in force.
    pub fn revoke(&self, name: &str) -> Result<(), KeyError> {
        self.edit(|entries| {
            let mut found = false;
            for e in entries.iter_mut().filter(|e| e.name == name && e.revoked.is_none()) {
                e.revoked = Some(now());
                found = true;
            }
            if found {
                Ok(())
            } else {
                Err(KeyError::Unknown(name.into()))
            }
        })
    }

    fn read(&self) -> Result<Vec<KeyEntry>, KeyError> {
        let Some(path) = &self.path else {
            let loaded = self.loaded.lock().expect("key store lock poisoned");
            return Ok(loaded.by_hash.values().cloned().collect());
        };
        parse(path, &statefile::read(path)?)
    }

    /// Reads the file again if it changed.
    fn refresh(&self) -> Result<(), KeyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let stamp = Stamp::of(path)?;
        if self.loaded.lock().expect("key store lock poisoned").stamp == Some(stamp) {
            return Ok(());
        }
        let entries = self.read()?;
        let mut loaded = self.loaded.lock().expect("key store lock poisoned");
        loaded.by_hash = entries.into_iter().map(|e| (e.hash.clone(), e)).collect();
        loaded.stamp = Some(stamp);
        Ok(())
    }

    /// Changes the file (see [`statefile::edit`]).
    fn edit(&self, change: impl FnOnce(&mut Vec<KeyEntry>) -> Result<(), KeyError>) -> Result<(), KeyError> {
        let Some(path) = &self.path else {
            return Err(KeyError::InMemory);
        };
        statefile::edit(path, |text| {
            let mut entries = parse(path, text)?;
            change(&mut entries)?;
            Ok(render(&entries))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn keys_are_created_listed_and_revoked_and_only_their_hashes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path(), "fmkey_original").unwrap();
        let (default, _) = store.authenticate("fmkey_original");
        assert_eq!(
            default.unwrap().name,
            DEFAULT_KEY_NAME,
            "the original key keeps working"
        );

        let quota = Quota {
            max_slots: Some(4),
            max_jobs: None,
        };
        let alice = store.create("alice", quota).unwrap();
        assert!(matches!(store.create("alice", quota), Err(KeyError::Exists(_))));
        assert!(matches!(store.create("no spaces", quota), Err(KeyError::BadName(_))));
        let text = fs::read_to_string(dir.path().join(KEYS_FILE)).unwrap();
        assert!(!text.contains(&alice), "the key itself is stored nowhere");
        let mode = fs::metadata(dir.path().join(KEYS_FILE)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

        // Another process's view (a running coordinator) sees the change.
        let running = KeyStore::open(dir.path(), "ignored").unwrap();
        let (who, _) = running.authenticate(&alice);
        assert_eq!(
            who,
            Some(Principal {
                name: "alice".into(),
                quota
            })
        );
        assert_eq!(running.authenticate("fmkey_guess").0, None);

        store.revoke("alice").unwrap();
        assert!(matches!(store.revoke("alice"), Err(KeyError::Unknown(_))));
        // The same size and, within the file system's clock, maybe the same
        // time: the store compares both, and the revoked line is longer.
        assert_eq!(running.authenticate(&alice).0, None, "refused at once");
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[1].revoked.is_some());

        // A new key for the same name works; the revoked one still does not.
        let again = store.create("alice", Quota::default()).unwrap();
        assert_eq!(running.authenticate(&again).0.unwrap().name, "alice");
        assert_eq!(running.authenticate(&alice).0, None);
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_the_line_and_the_last_keys_stand() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path(), "fmkey_original").unwrap();
        assert!(store.authenticate("fmkey_original").0.is_some());
        fs::write(dir.path().join(KEYS_FILE), "# header\nalice\tnothex\t1\t-\t-\t-\n").unwrap();
        let (who, error) = store.authenticate("fmkey_original");
        assert!(who.is_some(), "the keys last read stand");
        let error = error.expect("the error is reported").to_string();
        assert!(error.contains("line 2") && error.contains("hash"), "{error}");
    }
}
