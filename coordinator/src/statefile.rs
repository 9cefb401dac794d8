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
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(io(&tmp))?;
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
