//! `fleetmapd node`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use fleetmap_node_daemon::{EnvironmentConfig, Isolation, NodeConfig};
use fleetmap_protocol::EnvironmentSpec;
use serde::Deserialize;
use tracing::info;

use crate::{
    settings::{self, overlay, Overlay},
    Failure, Signal, Signals,
};

const DEFAULT_CONFIG: &str = "/etc/fleetmap/node.toml";

/// The users a root daemon runs calls as when not told: the one fleetmap's
/// packaging creates, else the system's unprivileged user.
const CALL_USERS: [&str; 2] = ["fleetmap", "nobody"];

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// A TOML file of these settings, keyed by the flags' names (default:
    /// /etc/fleetmap/node.toml where it exists); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: NodeSettings,
}

/// The node daemon's settings: its flags, and the keys of its config file.
/// No setting takes the join token itself: the command line is readable by
/// every process on the node.
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub(crate) struct NodeSettings {
    /// The coordinator's HOST:PORT.
    #[arg(long)]
    coordinator: Option<String>,
    /// A file holding the join token, readable by its owner only (default:
    /// the systemd credential join-token, or FLEETMAP_JOIN_TOKEN). Only
    /// enrollment needs it: the node joins with its certificate afterwards.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The coordinator's ca.pem.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The node's name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Where the node keeps its key and certificate, in a folder per node
    /// name (default: systemd's StateDirectory, else
    /// ~/.local/state/fleetmap/node).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Cores to offer (default: all this process may run on).
    #[arg(long)]
    cores: Option<u32>,
    /// Memory to offer, in GiB (default: all).
    #[arg(long)]
    memory_gib: Option<f64>,
    /// An interpreter calls and job environments run on, one per Python
    /// version callers use (repeatable; default: python3 beside this
    /// program, else on PATH).
    #[arg(long)]
    python: Vec<String>,
    /// A package directory of fleetmap's worker runtime (fleetmap, with its
    /// native module, and cloudpickle), put on every environment's path
    /// (repeatable; default: where the first --python imports them from).
    #[arg(long)]
    runtime_package: Vec<PathBuf>,
    /// Where environments are built (default: /var/cache/fleetmap as root).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The uv binary that installs environments (default: beside the first
    /// --python, else on PATH).
    #[arg(long)]
    uv: Option<PathBuf>,
    /// The package index environments install from (default: uv's settings).
    #[arg(long)]
    index_url: Option<String>,
    /// A folder or page of wheels to install from (repeatable).
    #[arg(long)]
    find_links: Vec<String>,
    /// The longest one environment build may take, in seconds (default 900).
    #[arg(long)]
    environment_timeout: Option<f64>,
    /// Evict unused environments above this size, in GiB (default 50).
    #[arg(long)]
    environment_cache_gib: Option<f64>,
    /// Build the environment of this requirements file (one requirement per
    /// line) at start, as jobs with the same packages= list need it
    /// (repeatable).
    #[arg(long, value_name = "REQUIREMENTS")]
    prepare: Vec<PathBuf>,
    /// A registry images are pulled from over plain HTTP, not HTTPS
    /// (repeatable; also FLEETMAP_INSECURE_REGISTRIES=HOST:PORT,...).
    #[arg(long, value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    /// Registry credentials in Docker's config.json format (default:
    /// anonymous pulls); callers never send credentials.
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// Evict unused images above this size, refuse larger ones, in GiB
    /// (default 100).
    #[arg(long)]
    image_cache_gib: Option<f64>,
    /// Always build environments, even where the caller's interpreter
    /// exists here with the same packages.
    #[arg(long)]
    no_caller_python: bool,
    /// NVIDIA device minors to offer, e.g. 0,1 (default: the driver's
    /// inventory).
    #[arg(long)]
    gpus: Option<String>,
    /// Where cgroups cannot be managed or calls cannot be confined, run
    /// calls pinned to cores only (default: refuse to start).
    #[arg(long)]
    allow_unisolated: bool,
    /// Do not put slots in cgroups (only pin their cores).
    #[arg(long)]
    no_cgroups: bool,
    /// The cgroup subtree this daemon owns (default: fleetmap-NAME).
    #[arg(long)]
    cgroup_subtree: Option<String>,
    /// Where the cgroup hierarchy is mounted (default: /sys/fs/cgroup).
    #[arg(long)]
    cgroup_mount: Option<PathBuf>,
    /// The most processes one slot may have (default 4096).
    #[arg(long)]
    pids_per_slot: Option<u64>,
    /// Run calls (and environment builds) as this user, name or UID:GID
    /// (default for a daemon running as root: the user fleetmap if it
    /// exists, else nobody; otherwise the daemon's user).
    #[arg(long)]
    run_as: Option<String>,
    /// Let a daemon running as root run calls as root, with every
    /// capability (default: an unprivileged user with none).
    #[arg(long)]
    allow_root_calls: bool,
    /// Run each worker as a uid of its own from this unused range (e.g.
    /// 2000000-2065535), so that calls of different slots and tenants
    /// cannot signal or read each other.
    #[arg(long, value_name = "FIRST-LAST")]
    slot_uids: Option<String>,
    /// An environment variable of the daemon's that calls may read
    /// (repeatable; they get PATH, HOME, locale, LD_LIBRARY_PATH and
    /// CUDA_HOME, never the rest, such as the join token).
    #[arg(long, value_name = "NAME")]
    pass_env: Vec<String>,
    /// Let workers share the node's /tmp (default: a private one each).
    #[arg(long)]
    shared_tmp: bool,
    /// The most idle workers kept warm for later jobs of the same caller
    /// and environment (default 64; 0 turns reuse off).
    #[arg(long)]
    warm_workers: Option<usize>,
    /// Workers started ahead of any job (default 8, at most the cores).
    #[arg(long)]
    warm_prestart: Option<usize>,
    /// A warm worker is retired after this many jobs (default 10000).
    #[arg(long)]
    warm_max_jobs: Option<u32>,
    /// A warm worker is retired once this old, in seconds (default 3600).
    #[arg(long)]
    warm_max_age: Option<f64>,
    /// Serve the node's Prometheus metrics over HTTP on this address, at
    /// /metrics (default: not served; bind it where only your monitoring
    /// reaches).
    #[arg(long, value_name = "HOST:PORT")]
    http_listen: Option<std::net::SocketAddr>,
}

overlay!(NodeSettings {
    value: coordinator, token_file, ca, name, state_dir, cores, memory_gib, cache_dir, uv, index_url,
        environment_timeout, environment_cache_gib, registry_auth, image_cache_gib, gpus, cgroup_subtree,
        cgroup_mount, pids_per_slot, run_as, slot_uids, warm_workers, warm_prestart, warm_max_jobs, warm_max_age,
        http_listen;
    switch: no_caller_python, allow_unisolated, no_cgroups, allow_root_calls, shared_tmp;
    list: python, runtime_package, find_links, prepare, insecure_registry, pass_env;
});

fn required<T: Clone>(value: &Option<T>, flag: &str) -> Result<T, Failure> {
    value
        .clone()
        .ok_or_else(|| Failure::usage(format!("give --{flag} (or {flag} in the config file)")))
}

/// The join token: from `token_file` (readable by its owner only), else
/// from systemd's credentials (`LoadCredential=join-token:...`), else from
/// `FLEETMAP_JOIN_TOKEN`.
fn join_token(token_file: Option<&Path>) -> Result<String, String> {
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| Path::new(&dir).join("join-token"))
        .filter(|p| p.is_file());
    let token = match token_file.map(Path::to_path_buf).or(credential) {
        Some(file) => {
            let meta = std::fs::metadata(&file).map_err(|e| format!("the join token file {}: {e}", file.display()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(format!(
                    "the join token file {} is readable by others (mode {mode:o}); make it readable by its owner \
                     only: chmod 600 {}",
                    file.display(),
                    file.display()
                ));
            }
            std::fs::read_to_string(&file).map_err(|e| format!("the join token file {}: {e}", file.display()))?
        }
        None => std::env::var("FLEETMAP_JOIN_TOKEN").unwrap_or_default(),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(
            "give the join token with --token-file FILE (mode 600), a systemd credential named join-token, \
                    or FLEETMAP_JOIN_TOKEN"
                .into(),
        );
    }
    Ok(token)
}

/// Whom calls run as: `--run-as`; else, for a daemon running as root, an
/// unprivileged user unless `--allow-root-calls`; else the daemon's own.
fn call_user(s: &NodeSettings, root: bool) -> Result<Option<(u32, u32)>, Failure> {
    let lookup = |name: &str| fleetmap_sandbox::lookup_user(name).map_err(|e| Failure::usage(e.to_string()));
    if let Some(user) = &s.run_as {
        return lookup(user).map(Some);
    }
    if s.allow_root_calls || !root {
        return Ok(None);
    }
    for name in CALL_USERS {
        if let Ok(ids) = fleetmap_sandbox::lookup_user(name) {
            return Ok(Some(ids));
        }
    }
    Err(Failure::usage(
        "this daemon runs as root and there is no unprivileged user to run calls as (neither 'fleetmap' nor \
         'nobody'): create one (useradd --system fleetmap), name one with --run-as USER, or run calls as root \
         with --allow-root-calls",
    ))
}

/// The interpreter this program ships beside (a virtualenv's `bin`, where
/// `pip install fleetmap` puts both), else `python3` on PATH.
fn default_python() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("python3")))
        .filter(|p| p.is_file())
        .map_or_else(|| "python3".into(), |p| p.display().to_string())
}

/// `program` on PATH.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// What `python -c code` prints.
async fn ask(python: &str, code: &str) -> Result<String, Failure> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python).args(["-c", code]).output(),
    )
    .await
    .map_err(|_| Failure::usage(format!("the interpreter {python} did not answer within 60 s")))?
    .map_err(|e| Failure::usage(format!("cannot run the interpreter {python}: {e}")))?;
    if !out.status.success() {
        return Err(Failure::usage(format!(
            "the interpreter {python} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The package directories of fleetmap's worker runtime (fleetmap and
/// cloudpickle), from the interpreter this program was installed with, else
/// from the node's first interpreter.
async fn runtime_packages(first: &str) -> Result<Vec<PathBuf>, Failure> {
    const CODE: &str = "import os, fleetmap, cloudpickle\n\
                        for m in (fleetmap, cloudpickle): print(os.path.dirname(os.path.abspath(m.__file__)))";
    let mut tried = Vec::new();
    for python in [default_python(), first.to_string()] {
        if tried.contains(&python) {
            continue;
        }
        match ask(&python, CODE).await {
            Ok(dirs) => return Ok(dirs.lines().map(PathBuf::from).collect()),
            Err(e) => tried.push(format!("{python}: {}", e.text())),
        }
    }
    Err(Failure::usage(format!(
        "no interpreter here imports fleetmap's worker runtime (fleetmap and cloudpickle): {}. pip install \
         fleetmap into the node's --python, or name the package directories with --runtime-package",
        tried.join("; ")
    )))
}

/// The environments of the `--prepare` requirements files, for each
/// interpreter's Python version: the ids match what a `packages=` list with
/// the same requirements gives on the caller's side.
async fn environments_to_prepare(
    files: &[PathBuf],
    pythons: &[String],
) -> Result<Vec<(EnvironmentSpec, String)>, Failure> {
    if files.is_empty() {
        return Ok(vec![]);
    }
    let mut versions = Vec::new();
    for python in pythons {
        let version = ask(python, "import sys; print('%d.%d' % sys.version_info[:2])").await?;
        if !versions.contains(&version) {
            versions.push(version);
        }
    }
    let mut prepared = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(file).map_err(|e| Failure::usage(format!("--prepare {}: {e}", file.display())))?;
        let mut requirements: Vec<String> = Vec::new();
        for line in text.lines() {
            let requirement = line.split('#').next().unwrap_or_default().trim();
            if !requirement.is_empty() && !requirements.iter().any(|r| r == requirement) {
                requirements.push(requirement.to_string());
            }
        }
        for version in &versions {
            let spec = fleetmap_node_daemon::packages_environment(version, requirements.clone())
                .map_err(|e| Failure::usage(format!("--prepare {}: {e}", file.display())))?;
            prepared.push((spec, version.clone()));
        }
    }
    Ok(prepared)
}

/// The daemon's configuration from its settings.
async fn node_config(s: &NodeSettings) -> Result<NodeConfig, Failure> {
    let coordinator = required(&s.coordinator, "coordinator")?;
    let ca_path = required(&s.ca, "ca")?;
    let name = s.name.clone().unwrap_or_else(fleetmap_node_daemon::default_name);
    let identity = s
        .state_dir
        .clone()
        .unwrap_or_else(|| settings::default_state_dir("node"))
        .join(&name);
    let token = match join_token(s.token_file.as_deref()) {
        Ok(token) => token,
        // Enrolled already: the node's certificate is its credential.
        Err(_) if identity.join("node.pem").is_file() => String::new(),
        Err(e) => return Err(Failure::usage(e)),
    };
    let ca_pem = std::fs::read(&ca_path).map_err(|e| Failure::usage(format!("--ca {}: {e}", ca_path.display())))?;
    let root = nix::unistd::geteuid().is_root();
    if s.slot_uids.is_some() && (!root || s.allow_root_calls) {
        return Err(Failure::usage(
            "--slot-uids needs a daemon running as root, and not --allow-root-calls",
        ));
    }
    if s.slot_uids.is_some() && s.no_cgroups {
        // Without a cgroup per slot, a process a call leaves behind could
        // outlive the worker and meet the next call given the same uid.
        return Err(Failure::usage(
            "--slot-uids needs every slot in a cgroup of its own (which tears down all a call left running \
             before its uid serves another): drop --no-cgroups",
        ));
    }

    let mut config = NodeConfig::new(coordinator, ca_pem, token);
    config.name = name;
    config.identity_dir = Some(identity);
    if let Some(range) = &s.slot_uids {
        config.slot_uids =
            Some(fleetmap_node_daemon::uids::SlotUids::parse(range).map_err(|e| Failure::usage(e.to_string()))?);
    }
    if let Some(cores) = s.cores {
        config.resources.cores = cores;
    }
    if let Some(gib) = s.memory_gib {
        config.resources.memory_bytes = settings::gib_to_bytes(gib, "memory-gib")?;
    }
    if let Some(gpus) = &s.gpus {
        let minors = gpus
            .split(',')
            .filter(|g| !g.trim().is_empty())
            .map(|g| g.trim().parse::<u32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Failure::usage(format!("--gpus takes device minors like 0,1, got {gpus:?}")))?;
        config.resources.gpus = fleetmap_node_daemon::gpus_from_minors(&minors);
    }
    config.isolation = if s.no_cgroups {
        Isolation::None
    } else {
        Isolation::Cgroups {
            mount: s.cgroup_mount.clone().unwrap_or_else(|| "/sys/fs/cgroup".into()),
            subtree: s.cgroup_subtree.clone(),
            allow_unisolated: s.allow_unisolated,
        }
    };
    if let Some(pids) = s.pids_per_slot {
        config.pids_per_slot = pids;
    }
    config.run_as = call_user(s, root)?;
    config.private_tmp = !s.shared_tmp;
    config.http = s.http_listen;
    config.pass_env = s.pass_env.clone();
    if let Some(idle) = s.warm_workers {
        config.warm.max_idle = idle;
    }
    if let Some(prestart) = s.warm_prestart {
        config.warm.prestart = prestart;
    }
    if let Some(jobs) = s.warm_max_jobs {
        config.warm.max_jobs = jobs.max(1);
    }
    if let Some(age) = s.warm_max_age {
        config.warm.max_age = Duration::try_from_secs_f64(age)
            .map_err(|_| Failure::usage(format!("--warm-max-age takes seconds, not {age}")))?;
    }

    let pythons = if s.python.is_empty() {
        vec![default_python()]
    } else {
        s.python.clone()
    };
    config.python = pythons[0].clone();
    let env: &mut EnvironmentConfig = &mut config.environments;
    env.pythons = pythons.clone();
    if let Some(dir) = &s.cache_dir {
        env.cache_dir = dir.clone();
    }
    // uv beside the first interpreter, beside this program (pip installs
    // both into one bin), else on PATH.
    let beside_exe = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("uv")));
    env.uv = s.uv.clone().or_else(|| {
        [Path::new(&pythons[0]).parent().map(|dir| dir.join("uv")), beside_exe]
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .or_else(|| on_path("uv"))
    });
    env.runtime = if s.runtime_package.is_empty() {
        runtime_packages(&pythons[0]).await?
    } else {
        s.runtime_package.clone()
    };
    env.index_url = s.index_url.clone();
    env.find_links = s.find_links.clone();
    if let Some(timeout) = s.environment_timeout {
        env.build_timeout = Duration::try_from_secs_f64(timeout)
            .map_err(|_| Failure::usage(format!("--environment-timeout takes seconds, not {timeout}")))?;
    }
    if let Some(gib) = s.environment_cache_gib {
        env.max_bytes = settings::gib_to_bytes(gib, "environment-cache-gib")?;
    }
    env.use_caller_python = !s.no_caller_python;
    env.prepare = environments_to_prepare(&s.prepare, &pythons).await?;

    let mut insecure = s.insecure_registry.clone();
    if let Ok(listed) = std::env::var("FLEETMAP_INSECURE_REGISTRIES") {
        insecure.extend(
            listed
                .split(',')
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(String::from),
        );
    }
    config.images.insecure_registries = insecure;
    config.images.auth_file = s.registry_auth.clone();
    if let Some(gib) = s.image_cache_gib {
        config.images.max_bytes = settings::gib_to_bytes(gib, "image-cache-gib")?;
    }
    Ok(config)
}

pub(crate) async fn run(args: Args) -> Result<(), Failure> {
    let mut signals = Signals::install()?;
    let file = settings::config_file(args.config.as_deref(), DEFAULT_CONFIG);
    let mut s = args.settings.clone();
    s.overlay(settings::read(file.as_deref())?);
    let config = node_config(&s).await?;
    let (name, coordinator) = (config.name.clone(), config.coordinator.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut daemon = tokio::spawn(fleetmap_node_daemon::run_until(config, stopped));
    println!("fleetmap node {name} joining {coordinator}");
    loop {
        tokio::select! {
            ended = &mut daemon => {
                return match ended {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(Failure::Stopped(format!("node {name} stopped: {e}"))),
                    Err(e) => Err(Failure::Stopped(format!("node {name}: the daemon task failed: {e}"))),
                };
            }
            signal = signals.next() => match signal {
                Signal::Stop => break,
                Signal::Reload => info!(
                    "reload: a node's settings take effect when it starts again (a restarted node rejoins under \
                     its name with its certificate)"
                ),
            },
        }
    }
    info!("node {name} stopping: tearing down its slots");
    let _ = stop.send(true);
    // Every slot is torn down (workers killed, cgroups removed) before the
    // daemon returns; a stuck teardown is not waited for past 10 s.
    let _ = tokio::time::timeout(Duration::from_secs(10), daemon).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{Args as _, FromArgMatches};

    use super::*;

    fn command() -> clap::Command {
        Args::augment_args(clap::Command::new("node"))
    }

    #[test]
    fn the_example_config_sets_every_flag() {
        crate::settings::tests::example_matches_flags::<NodeSettings>(command(), "node.toml");
    }

    #[test]
    fn no_flag_takes_the_token_itself() {
        let error = command()
            .try_get_matches_from(["node", "--token", "fmjoin_x"])
            .unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
        // Nor a prefix of --token-file.
        assert!(command().try_get_matches_from(["node", "--token-f", "x"]).is_err());
    }

    #[test]
    fn repeatable_flags_replace_the_files_lists_and_switches_add_up() {
        let matches = command()
            .try_get_matches_from(["node", "--python", "/a", "--python", "/b", "--shared-tmp"])
            .unwrap();
        let mut s = Args::from_arg_matches(&matches).unwrap().settings;
        let file: NodeSettings =
            toml::from_str("python = [\"/c\"]\nfind-links = [\"/w\"]\nallow-root-calls = true\ncores = 3\n").unwrap();
        s.overlay(file);
        assert_eq!(s.python, ["/a", "/b"]);
        assert_eq!(s.find_links, ["/w"]);
        assert!(s.shared_tmp && s.allow_root_calls);
        assert_eq!(s.cores, Some(3));
    }

    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("join-token");
        std::fs::write(&file, "fmjoin_x\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = join_token(Some(&file)).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(join_token(Some(&file)).unwrap(), "fmjoin_x");
    }

    #[tokio::test]
    async fn prepared_environments_have_the_ids_callers_compute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("req.txt");
        std::fs::write(&file, "# a comment\nnumpy==2.3.1  # pinned\n\nnumpy==2.3.1\nrich\n").unwrap();
        let python = default_python();
        let prepared = environments_to_prepare(std::slice::from_ref(&file), std::slice::from_ref(&python))
            .await
            .unwrap();
        let [(spec, version)] = &prepared[..] else {
            panic!("{prepared:?}")
        };
        assert_eq!(spec.requirements, ["numpy==2.3.1", "rich"]);
        // The client's _scan.environment_id for the same list, computed by
        // the interpreter itself.
        let expected = ask(
            &python,
            &format!(
                "import hashlib\nd = hashlib.sha256(b'fleetmap-environment 1\\npython {version}\\nresolve 1\\n')\n\
                 d.update(b'numpy==2.3.1\\n'); d.update(b'rich\\n'); print(d.hexdigest()[:32])"
            ),
        )
        .await
        .unwrap();
        assert_eq!(spec.id, expected);
    }
}
