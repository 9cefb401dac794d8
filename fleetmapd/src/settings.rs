//! Settings from flags and a TOML file. One struct per daemon holds them:
//! clap derives the flags from it, serde the file's keys (the same names,
//! `max-node-cores` as `--max-node-cores`), and a flag given on the command
//! line wins over the file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::Failure;

/// Fills each setting a flag left unset with the file's.
pub(crate) trait Overlay {
    fn overlay(&mut self, file: Self);
}

/// Implements [`Overlay`] for a settings struct: `value` fields are
/// `Option`s (the flag's, else the file's), `switch` fields are flags that
/// either may turn on, `list` fields repeatable flags (the command line's
/// list, else the file's).
macro_rules! overlay {
    ($ty:ty { value: $($v:ident),* ; switch: $($s:ident),* ; list: $($l:ident),* $(;)? }) => {
        impl $crate::settings::Overlay for $ty {
            fn overlay(&mut self, file: Self) {
                $( if self.$v.is_none() { self.$v = file.$v; } )*
                $( self.$s |= file.$s; )*
                $( if self.$l.is_empty() { self.$l = file.$l; } )*
            }
        }
    };
}
pub(crate) use overlay;

/// The config file to read: the one given, else `default` where it exists.
pub(crate) fn config_file(given: Option<&Path>, default: &str) -> Option<PathBuf> {
    given
        .map(Path::to_path_buf)
        .or_else(|| Path::new(default).is_file().then(|| default.into()))
}

/// The settings in the TOML file at `path` (none without one).
pub(crate) fn read<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, Failure> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read the config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::usage(format!("the config file {}: {e}", path.display())))
}

/// Where a daemon keeps its state by default: systemd's `StateDirectory`
/// (`$STATE_DIRECTORY`), else `$XDG_STATE_HOME/fleetmap/KIND`, else
/// `~/.local/state/fleetmap/KIND`.
pub(crate) fn default_state_dir(kind: &str) -> PathBuf {
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd separates several directories with colons; the first is ours.
        let dirs = dirs.to_string_lossy().into_owned();
        return dirs.split(':').next().unwrap_or_default().into();
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local").join("state")))
        .unwrap_or_else(|| "/var/lib".into())
        .join("fleetmap")
        .join(kind)
}

/// `gib` gibibytes in bytes, for a setting named `what`.
pub(crate) fn gib_to_bytes(gib: f64, what: &str) -> Result<u64, Failure> {
    if !(gib > 0.0 && gib < (1u64 << 33) as f64) {
        return Err(Failure::usage(format!(
            "{what} must be a positive number of GiB, not {gib}"
        )));
    }
    Ok((gib * (1u64 << 30) as f64) as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every flag of `command` but `--config` must be a key of the example
    /// config file shipped for it, and that file must load: the file
    /// documents the flags, and no flag is missing from what a file can
    /// set.
    pub(crate) fn example_matches_flags<T: DeserializeOwned + Default>(command: clap::Command, example: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(example);
        let text = std::fs::read_to_string(&path).unwrap();
        // The example sets a few keys and shows the rest commented out
        // (`# key = value`): with those lines taken in, it must load too.
        let every_key: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| is_key(k)) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let table: toml::Table = toml::from_str(&every_key).unwrap();
        let _: T = toml::from_str(&every_key).unwrap_or_else(|e| panic!("{example} with every key does not load: {e}"));
        let _: T = read(Some(&path)).unwrap_or_else(|e| panic!("{example} does not load: {e:?}"));
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "config" | "help" | "version" | "log-format") {
                continue;
            }
            assert!(
                table.contains_key(long),
                "{example} has no key {long:?} (the flag --{long})"
            );
        }
        for key in table.keys() {
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(key.as_str())),
                "{example} has a key {key:?} that is no flag"
            );
        }
    }

    fn is_key(word: &str) -> bool {
        !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    }

    #[test]
    fn the_state_directory_of_systemd_comes_first() {
        // Run in one test: the environment is the process's.
        std::env::set_var("STATE_DIRECTORY", "/var/lib/fleetmap/node:/var/lib/other");
        assert_eq!(default_state_dir("node"), Path::new("/var/lib/fleetmap/node"));
        std::env::remove_var("STATE_DIRECTORY");
        std::env::set_var("XDG_STATE_HOME", "/x");
        assert_eq!(default_state_dir("coordinator"), Path::new("/x/fleetmap/coordinator"));
    }

    #[test]
    fn sizes_in_gib_are_checked() {
        assert_eq!(gib_to_bytes(1.5, "m").unwrap(), 3 << 29);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12] {
            assert!(matches!(gib_to_bytes(bad, "--memory-gib"), Err(Failure::Usage(t)) if t.contains("--memory-gib")));
        }
    }
}
