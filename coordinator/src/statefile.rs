//! Files in the coordinator's state directory that `fleetmap` commands
//! edit while the coordinator runs (`keys.tsv`, `nodes.tsv`): each edit
//! holds a lock file and replaces the file whole (written beside it, mode
//! 0600, then renamed), so a reader never sees half of it, and a reader
//! knows the file changed from its [`Stamp`].

use std::{
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

/// Why a state file could not be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: another `fleetmap` command has held the lock for 10 s; remove it if no such command runs")]
    Locked(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError {
    let path = path.to_path_buf();
    move |source| StateFileError::Io { path, source }
}

/// What identifies one version of a file: every edit renames a new file
/// into place, so the inode changes whatever the clock's resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(SystemTime, u64, u64);

impl Stamp {
    pub fn of(path: &Path) -> Result<Stamp, StateFileError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        Ok(Stamp(meta.modified().map_err(io(path))?, meta.len(), meta.ino()))
    }
}

/// The file's text; empty if it does not exist.
pub fn read(path: &Path) -> Result<String, StateFileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// Replaces the file's text with what `change` makes of it, under the
/// file's lock. An error from `change` leaves the file as it was.
pub fn edit<E: From<StateFileError>>(path: &Path, change: impl FnOnce(&str) -> Result<String, E>) -> Result<(), E> {
    let lock = path.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock)
        {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if Instant::now() > deadline {
                    return Err(StateFileError::Locked(lock).into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(&lock)(e).into()),
        }
    }
    let result = (|| {
        let text = change(&read(path)?)?;
        // The file keeps its owner (the directory's, for a new file): root
        // editing it from the command line must not lock out a coordinator
        // that runs as its own user.
        let owner = fs::metadata(path)
            .or_else(|_| {
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                fs::metadata(dir.unwrap_or(Path::new(".")))
            })
            .map(|m| (m.uid(), m.gid()))
            .map_err(io(path))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                let made = f.metadata()?;
                if (made.uid(), made.gid()) != owner {
                    // Only root may give a file away; anyone else writes
                    // it as their own, as before.
                    match std::os::unix::fs::fchown(&f, Some(owner.0), Some(owner.1)) {
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                        other => other?,
                    }
                }
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io(&tmp)(e)
            })?;
        fs::rename(&tmp, path).map_err(io(path))?;
        Ok(())
    })();
    let _ = fs::remove_file(&lock);
    result
}

/// Tab-separated fields of a line: `-` stands for nothing.
pub fn optional<T: std::str::FromStr>(field: &str) -> Result<Option<T>, String> {
    if field == "-" {
        return Ok(None);
    }
    field
        .parse()
        .map(Some)
        .map_err(|_| format!("{field:?} is not a number or '-'"))
}

/// A value as a field: `-` for nothing.
pub fn show<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root: an edit keeps the file's owner, and a new file gets the
    /// directory's, so that a coordinator running as its own user can still
    /// read what root wrote from the command line.
    #[test]
    fn an_edit_keeps_the_owner_of_the_file() {
        if !nix_is_root() {
            // CI runs as root: there, not being root is a failure.
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "this test needs root");
            eprintln!("an_edit_keeps_the_owner_of_the_file: not root, not run");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let path = dir.path().join("keys.tsv");
        edit::<StateFileError>(&path, |_| Ok("one\n".into())).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "a new file: the directory's owner"
        );
        std::os::unix::fs::chown(&path, Some(1234), Some(4321)).unwrap();
        edit::<StateFileError>(&path, |text| Ok(format!("{text}two\n"))).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 4321), "an edited file keeps its owner");
        assert_eq!(read(&path).unwrap(), "one\ntwo\n");
    }

    fn nix_is_root() -> bool {
        fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }
}
