//! Job environments on a node: the Python packages a job's calls need
//! (the caller's replicated environment, or a `packages=` list), built once
//! per environment id with `uv` and shared by every job and warm worker
//! that needs the same id.
//!
//! - **Content-addressed and never half-built.** An environment lives at
//!   `CACHE/envs/ID`; it is built in `CACHE/envs/.build-ID-PID-N` and renamed
//!   into place only once complete, so a crash or a failed install leaves
//!   nothing a later job would use (leftovers of a dead daemon are removed
//!   at start).
//! - **One build per id.** Slots that need the same id at once wait for the
//!   same build.
//! - **Layered on the node's interpreter.** The environment is a virtual
//!   environment on a node interpreter of the caller's Python minor version
//!   (`--python`, several allowed). The base interpreter's own
//!   site-packages stay visible behind the environment's, and requirements
//!   the base already satisfies at the same version are not installed again
//!   (that is how a node's CUDA build of torch is kept).
//! - **The caller's interpreter, where the node has it** (the same path on
//!   a shared file system) and its installed distributions give the same
//!   environment id: used as it is, nothing built.
//! - **fleetmap's runtime** (the package and its native module, and
//!   cloudpickle) is linked into `CACHE/runtime/HASH` and put on every
//!   environment's path by a `.pth` file, never installed from the caller's
//!   manifest.
//! - **Bounded.** Installs run as the workers' user with an environment
//!   built from an allowlist (never the daemon's own: no join token), with a
//!   time limit; environments no slot or warm worker uses are evicted,
//!   least recently used first, above a size cap.

use std::{
    collections::HashMap,
    fs,
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use fleetmap_protocol::{EnvironmentSpec, SourceBundle, MAX_SOURCE_BUNDLE_BYTES};
use fleetmap_sandbox::cgroup::{CgroupTree, GpuAccess, SlotCgroup, SlotLimits};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::{process::Command, sync::OnceCell};
use tracing::{info, warn};

pub(crate) use crate::cache::Lease;
use crate::cache::{Leases, OncePerKey};

/// The scanner a node runs with each of its interpreters (the same file the
/// caller scans itself with, so that both compute the same id).
const SCAN_SOURCE: &str = include_str!("../../python/fleetmap/_scan.py");

/// How long describing one interpreter may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variables an install sees from the daemon's own
/// environment: the standard uv/pip settings (indexes, mirrors,
/// certificates, proxies) and nothing else.
const PASSED_VARIABLES: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];
const PASSED_PREFIXES: &[&str] = &["UV_", "PIP_"];

/// Where and how a node builds environments.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    /// The interpreters environments are built on; a job uses the first of
    /// its caller's Python minor version. Empty: the node's `python`.
    pub pythons: Vec<String>,
    /// The directory the daemon owns for environments and its runtime copy.
    pub cache_dir: PathBuf,
    /// The `uv` binary; `None`: found next to an interpreter or on `PATH`.
    pub uv: Option<PathBuf>,
    /// Package directories that make up fleetmap's worker runtime
    /// (`.../fleetmap`, `.../cloudpickle`), made importable in every
    /// environment. Empty: the base interpreter must have them.
    pub runtime: Vec<PathBuf>,
    /// `--index-url` for every install (else uv's settings decide).
    pub index_url: Option<String>,
    /// `--find-links` for every install.
    pub find_links: Vec<String>,
    /// The longest an environment build may take.
    pub build_timeout: Duration,
    /// Environments no slot uses are evicted above this many bytes.
    pub max_bytes: u64,
    /// The memory limit of a build (the installer and what it runs).
    pub build_memory_bytes: u64,
    /// Run jobs in the caller's own interpreter where this node has it at
    /// the same path with the same distributions (a shared file system).
    pub use_caller_python: bool,
    /// Environments built when the daemon starts, before any job asks,
    /// each with the caller Python version it is for.
    pub prepare: Vec<(EnvironmentSpec, String)>,
}

/// The environment a `packages=` list of `requirements` makes for callers
/// on Python `python` (`major.minor`), with the id the client computes for
/// the same list: a hash of the version, the resolution mode and the
/// requirements in order. Checked as a job's spec is.
pub fn packages_environment(python: &str, requirements: Vec<String>) -> Result<EnvironmentSpec, String> {
    let mut digest = Sha256::new();
    digest.update(format!("fleetmap-environment 1\npython {python}\nresolve 1\n"));
    for requirement in &requirements {
        digest.update(requirement.as_bytes());
        digest.update(b"\n");
    }
    let id: String = digest.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let spec = EnvironmentSpec {
        id,
        requirements,
        resolve: true,
    };
    spec.check()?;
    Ok(spec)
}

impl EnvironmentConfig {
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            pythons: vec![],
            cache_dir,
            uv: None,
            runtime: vec![],
            index_url: None,
            find_links: vec![],
            build_timeout: Duration::from_secs(15 * 60),
            max_bytes: 50 << 30,
            build_memory_bytes: 8 << 30,
            use_caller_python: true,
            prepare: vec![],
        }
    }

    /// `$FLEETMAP_CACHE_DIR`, else `/var/cache/fleetmap` for root, else
    /// `$XDG_CACHE_HOME/fleetmap` (or `~/.cache/fleetmap`).
    pub fn default_cache_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("FLEETMAP_CACHE_DIR").filter(|d| !d.is_empty()) {
            return dir.into();
        }
        // /proc/self belongs to the effective user.
        if fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
            return "/var/cache/fleetmap".into();
        }
        std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
            .unwrap_or_else(|| "/tmp".into())
            .join("fleetmap")
    }
}

/// What a node learns about one of its interpreters (from `_scan.py`).
#[derive(Debug, Deserialize)]
pub(crate) struct Interpreter {
    /// `major.minor`.
    pub python: String,
    pub executable: String,
    pub site_dirs: Vec<String>,
    /// Installed distributions: normalized name to version.
    pub distributions: HashMap<String, String>,
    /// The id of the environment the interpreter holds, as a caller running
    /// it would compute it.
    pub environment_id: String,
}

/// The interpreter a job's workers run, ready.
pub(crate) struct Prepared {
    pub program: String,
    pub lease: Lease,
}

/// A node's environments.
pub(crate) struct Environments {
    config: EnvironmentConfig,
    node: String,
    run_as: Option<(u32, u32)>,
    /// Where builds get their cgroups, with the node's cores.
    cgroups: Option<Arc<CgroupTree>>,
    cpus: Vec<u32>,
    /// Interpreters described so far, by path.
    interpreters: tokio::sync::Mutex<HashMap<String, Arc<Interpreter>>>,
    /// Builds in flight (and done, until the next lookup finds the
    /// environment on disk), by id.
    builds: OncePerKey<Result<PathBuf, String>>,
    /// One token per environment in use; a clone is held by each lease.
    leases: Leases,
    runtime: OnceCell<Result<Option<PathBuf>, String>>,
    /// How many environments this daemon has built.
    built: AtomicU64,
}

impl Environments {
    /// Environments built since the daemon started.
    pub(crate) fn built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    pub fn new(
        config: EnvironmentConfig,
        node: String,
        run_as: Option<(u32, u32)>,
        cgroups: Option<Arc<CgroupTree>>,
        cpus: Vec<u32>,
    ) -> Self {
        remove_leftovers(&config.cache_dir.join("envs"));
        remove_old_sources(&config.cache_dir.join("sources"), SOURCES_KEPT);
        Self {
            config,
            node,
            run_as,
            cgroups,
            cpus,
            interpreters: Default::default(),
            builds: Default::default(),
            leases: Default::default(),
            runtime: OnceCell::new(),
            built: AtomicU64::new(0),
        }
    }

    /// Builds the environments the operator asked for at start
    /// (`fleetmap node --prepare`), one after the other.
    pub async fn prepare_ahead(&self) {
        for (spec, python) in &self.config.prepare {
            let say = |text: String| info!("{text}");
            match self.prepare(spec, "", python, &say).await {
                Ok(ready) => info!(
                    "node {}: environment {} prepared at {}",
                    self.node, spec.id, ready.program
                ),
                Err(e) => warn!("node {}: could not prepare environment {}: {e}", self.node, spec.id),
            }
        }
    }

    /// The interpreter the job's workers run, with the job's environment
    /// built if this node does not have it yet. `say` tells the job's caller
    /// what is happening (an install takes seconds to minutes).
    pub async fn prepare(
        &self,
        spec: &EnvironmentSpec,
        caller_executable: &str,
        caller_python: &str,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Prepared, String> {
        spec.check().map_err(|e| format!("node {}: {e}", self.node))?;
        let dir = self.env_dir(&spec.id);
        // An environment built for this id serves at once. Only on the way
        // to a build is the caller's interpreter looked at (and, if it was
        // described before with other packages, described again): a job
        // never pays for running an interpreter when nothing is built.
        let built = python_in(&dir).exists();
        if !built
            && !spec.resolve
            && self.config.use_caller_python
            && self.is_callers_match(spec, caller_executable).await
        {
            return Ok(Prepared {
                program: caller_executable.to_string(),
                lease: Lease::default(),
            });
        }
        let lease = self.lease(&spec.id);
        if !built {
            self.builds
                .run(&spec.id, || self.build(spec, caller_executable, caller_python, say))
                .await?;
        }
        touch(&dir.join(".fleetmap-last-used"));
        Ok(Prepared {
            program: python_in(&dir).display().to_string(),
            lease,
        })
    }

    /// The job's packages for an image's interpreter, installed (once per
    /// requirements and image) into `CACHE/envs/IDiDIGEST/site`, which the
    /// slot binds into the image and puts on its path. Requirements the
    /// image already has at that version are not installed. The installer
    /// runs on the node, confined as for any build, selecting wheels for
    /// the image's Python version and platform (`manylinux_2_28`): packages
    /// that exist only as source distributions cannot be installed this way.
    pub async fn prepare_for_image(
        &self,
        spec: &EnvironmentSpec,
        image: &crate::images::Image,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<(PathBuf, Lease), String> {
        spec.check().map_err(|e| format!("node {}: {e}", self.node))?;
        let digest: String = image.digest.rsplit(':').next().unwrap_or("").chars().take(16).collect();
        let key = format!("{}i{digest}", spec.id);
        let dir = self.env_dir(&key);
        let lease = self.lease(&key);
        let record = |dir: &Path| dir.join("fleetmap-environment.json");
        if !record(&dir).exists() {
            self.builds
                .run(&key, || self.build_for_image(&key, spec, image, say))
                .await?;
        }
        touch(&dir.join(".fleetmap-last-used"));
        Ok((dir.join("site"), lease))
    }

    async fn build_for_image(
        &self,
        key: &str,
        spec: &EnvironmentSpec,
        image: &crate::images::Image,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, String> {
        let node = &self.node;
        let started = Instant::now();
        let has = crate::images::distributions(image);
        let install: Vec<&String> = spec.requirements.iter().filter(|r| !satisfied_by(r, &has)).collect();
        say(describe_install(node, &spec.id[..8], &install, spec.requirements.len()));
        let envs = self.config.cache_dir.join("envs");
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = envs.join(format!(
            ".build-{key}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let build = async {
            let cache = self.uv_cache();
            let site = tmp.join("site");
            for dir in [&site, &cache] {
                fs::create_dir_all(dir).map_err(|e| format!("node {node}: cannot create {}: {e}", dir.display()))?;
                self.give_to_workers(dir)?;
            }
            self.give_to_workers(&tmp)?;
            if !install.is_empty() {
                let cgroup = self.build_cgroup()?;
                let requirements = tmp.join("fleetmap-requirements.txt");
                write_file(
                    &requirements,
                    &install.iter().map(|r| format!("{r}\n")).collect::<String>(),
                )?;
                self.give_to_workers(&requirements)?;
                let arch = if std::env::consts::ARCH == "aarch64" {
                    "aarch64"
                } else {
                    "x86_64"
                };
                let mut pip = Command::new(self.uv()?);
                pip.args([
                    "pip",
                    "install",
                    "--quiet",
                    "--only-binary",
                    ":all:",
                    "--python-platform",
                ])
                .arg(format!("{arch}-manylinux_2_28"))
                .arg("--python-version")
                .arg(&image.python_version)
                .arg("--target")
                .arg(&site)
                .arg("-r")
                .arg(&requirements);
                if let Some(index) = &self.config.index_url {
                    pip.arg("--index-url").arg(index);
                }
                for links in &self.config.find_links {
                    pip.arg("--find-links").arg(links);
                }
                self.install_command(&mut pip, &cache, &tmp, cgroup.as_ref())?;
                self.checked(
                    pip,
                    &format!("install the job's packages for image {}", image.reference),
                    spec,
                )
                .await?;
            }
            let record = serde_json::json!({
                "id": spec.id, "image": image.digest, "python": image.python_version,
                "requirements": spec.requirements, "installed": install,
            });
            write_file(&tmp.join("fleetmap-environment.json"), &format!("{record}\n"))
        };
        if let Err(e) = build.await {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = self.env_dir(key);
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            if !dir.join("fleetmap-environment.json").exists() {
                return Err(format!("node {node}: cannot move the environment into place: {e}"));
            }
        }
        let took = started.elapsed().as_secs_f64();
        info!(
            "node {node}: built environment {key} for image {} in {took:.1} s",
            image.reference
        );
        say(format!(
            "node {node}: environment {} ready in {took:.1} s",
            &spec.id[..8]
        ));
        self.evict();
        Ok(dir)
    }

    /// The caller's source bundle on this node: written once per digest
    /// (checked against its content), readable by the workers.
    pub fn sources(&self, bundle: &SourceBundle) -> Result<PathBuf, String> {
        let node = &self.node;
        if bundle.digest.len() != 64 || !bundle.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "node {node}: the source bundle's digest {:?} is not SHA-256 hex",
                bundle.digest
            ));
        }
        if bundle.zip.len() > MAX_SOURCE_BUNDLE_BYTES {
            return Err(format!(
                "node {node}: the source bundle is {} bytes, over the limit of {MAX_SOURCE_BUNDLE_BYTES}",
                bundle.zip.len()
            ));
        }
        let dir = self.config.cache_dir.join("sources");
        let path = dir.join(format!("fleetmap-sources-{}.zip", bundle.digest.to_ascii_lowercase()));
        if let Ok(meta) = fs::metadata(&path) {
            // Its age says when a job last used it (see remove_old_sources),
            // to the minute: a loop of jobs does not write it every time.
            let now = std::time::SystemTime::now();
            let stale = meta.modified().map_or(true, |t| {
                now.duration_since(t).unwrap_or_default() > Duration::from_secs(60)
            });
            if stale {
                let _ = fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(now));
            }
            return Ok(path);
        }
        let actual: String = Sha256::digest(&bundle.zip).iter().map(|b| format!("{b:02x}")).collect();
        if !actual.eq_ignore_ascii_case(&bundle.digest) {
            return Err(format!("node {node}: the source bundle does not match its digest"));
        }
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let tmp = dir.join(format!(
                ".tmp-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::write(&tmp, &bundle.zip)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            format!(
                "node {node}: cannot store the job's source bundle in {}: {e}",
                dir.display()
            )
        })?;
        Ok(path)
    }

    fn env_dir(&self, id: &str) -> PathBuf {
        self.config.cache_dir.join("envs").join(id)
    }

    fn lease(&self, id: &str) -> Lease {
        self.leases.lease(id)
    }

    #[cfg(test)]
    fn in_use(&self, id: &str) -> bool {
        self.leases.in_use(id)
    }

    /// Whether the caller's interpreter is on this node and holds exactly
    /// the caller's environment.
    async fn is_callers_match(&self, spec: &EnvironmentSpec, executable: &str) -> bool {
        if !looks_like_python(executable) {
            return false;
        }
        for fresh in [false, true] {
            match self.describe(executable, fresh).await {
                Ok(found) if found.environment_id == spec.id => return true,
                // Described before the caller installed something: look again once.
                Ok(_) if !fresh => continue,
                _ => return false,
            }
        }
        false
    }

    /// Runs the scanner with `python` (as the workers' user), once per
    /// interpreter unless `fresh`.
    async fn describe(&self, python: &str, fresh: bool) -> Result<Arc<Interpreter>, String> {
        let mut known = self.interpreters.lock().await;
        if !fresh {
            if let Some(found) = known.get(python) {
                return Ok(found.clone());
            }
        }
        let mut cmd = Command::new(python);
        cmd.arg("-I").arg("-c").arg(SCAN_SOURCE);
        // No inherited secrets: the interpreter's path came from a caller.
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        self.sandbox(&mut cmd, Path::new("/"), None)?;
        cmd.stdin(Stdio::null());
        let out = run(cmd, DESCRIBE_TIMEOUT)
            .await
            .map_err(|e| format!("could not run {python} on node {}: {e}", self.node))?;
        if !out.status.success() {
            return Err(format!(
                "{python} on node {} failed to list its packages: {}",
                self.node,
                tail(&out.stderr)
            ));
        }
        let found: Interpreter = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{python} on node {} listed its packages unreadably: {e}", self.node))?;
        let found = Arc::new(found);
        known.insert(python.to_string(), found.clone());
        Ok(found)
    }

    /// The node interpreter of the caller's Python version.
    async fn base_interpreter(&self, caller_python: &str) -> Result<Arc<Interpreter>, String> {
        let mut seen = Vec::new();
        for python in &self.config.pythons {
            match self.describe(python, false).await {
                Ok(found) if found.python == caller_python => return Ok(found),
                Ok(found) => seen.push(format!("Python {} at {python}", found.python)),
                Err(e) => seen.push(e),
            }
        }
        Err(format!(
            "node {} has no Python {caller_python} interpreter, which the caller runs (cloudpickle needs the \
             same minor version on both ends); it has: {}. Start the node with --python PATH to a Python \
             {caller_python} (repeatable), or call from Python {}",
            self.node,
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join("; ")
            },
            self.config
                .pythons
                .first()
                .map_or("of the node's version", |_| "of one of those versions"),
        ))
    }

    /// The `uv` binary.
    fn uv(&self) -> Result<PathBuf, String> {
        if let Some(uv) = &self.config.uv {
            return Ok(uv.clone());
        }
        let beside = self
            .config
            .pythons
            .iter()
            .filter_map(|p| Path::new(p).parent().map(|d| d.join("uv")));
        let on_path = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join("uv")).collect::<Vec<_>>())
            .unwrap_or_default();
        beside.chain(on_path).find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "node {} cannot build environments: no uv next to its interpreters or on PATH; \
                 install it (pip install uv) or start the node with --uv PATH",
                self.node
            )
        })
    }

    /// fleetmap's runtime, linked once into the cache.
    pub(crate) async fn runtime_dir(&self) -> Result<Option<PathBuf>, String> {
        self.runtime
            .get_or_init(|| async {
                if self.config.runtime.is_empty() {
                    return Ok(None);
                }
                let sources = self.config.runtime.clone();
                let root = self.config.cache_dir.join("runtime");
                let node = self.node.clone();
                tokio::task::spawn_blocking(move || link_runtime(&sources, &root))
                    .await
                    .map_err(|e| e.to_string())?
                    .map(Some)
                    .map_err(|e| format!("node {node} could not copy fleetmap's runtime into its cache: {e}"))
            })
            .await
            .clone()
    }

    /// The interpreter an environment is layered on: for a replicated
    /// environment, the caller's own where this node has it (so only what it
    /// lacks or has at another version is installed); else the node's
    /// interpreter of the caller's version.
    async fn layer_on(
        &self,
        spec: &EnvironmentSpec,
        caller_executable: &str,
        caller_python: &str,
    ) -> Result<Arc<Interpreter>, String> {
        if !spec.resolve && self.config.use_caller_python && looks_like_python(caller_executable) {
            if let Ok(found) = self.describe(caller_executable, false).await {
                if found.python == caller_python {
                    return Ok(found);
                }
            }
        }
        self.base_interpreter(caller_python).await
    }

    async fn build(
        &self,
        spec: &EnvironmentSpec,
        caller_executable: &str,
        caller_python: &str,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, String> {
        let started = Instant::now();
        let short = &spec.id[..8];
        let base = self.layer_on(spec, caller_executable, caller_python).await?;
        let uv = self.uv()?;
        let runtime = self.runtime_dir().await?;
        let install: Vec<&String> = spec
            .requirements
            .iter()
            .filter(|r| !satisfied_by(r, &base.distributions))
            .collect();
        say(describe_install(&self.node, short, &install, spec.requirements.len()));
        let envs = self.config.cache_dir.join("envs");
        fs::create_dir_all(&envs).map_err(|e| format!("node {}: cannot create {}: {e}", self.node, envs.display()))?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tmp = envs.join(format!(
            ".build-{}-{}-{}",
            spec.id,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self
            .build_in(&tmp, &uv, &base, runtime.as_deref(), spec, &install)
            .await;
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = self.env_dir(&spec.id);
        if let Err(e) = fs::rename(&tmp, &dir) {
            // Another daemon sharing the cache built it first: use theirs.
            let _ = fs::remove_dir_all(&tmp);
            if !python_in(&dir).exists() {
                return Err(format!(
                    "node {}: cannot move the environment into place: {e}",
                    self.node
                ));
            }
        }
        let count = self.built.fetch_add(1, Ordering::Relaxed) + 1;
        let took = started.elapsed().as_secs_f64();
        info!(
            "node {}: built environment {} in {took:.1} s ({count} built since start)",
            self.node, spec.id
        );
        say(format!("node {}: environment {short} ready in {took:.1} s", self.node));
        self.evict();
        Ok(dir)
    }

    async fn build_in(
        &self,
        tmp: &Path,
        uv: &Path,
        base: &Interpreter,
        runtime: Option<&Path>,
        spec: &EnvironmentSpec,
        install: &[&String],
    ) -> Result<(), String> {
        let node = &self.node;
        let cache = self.uv_cache();
        for dir in [tmp, cache.as_path()] {
            fs::create_dir_all(dir).map_err(|e| format!("node {node}: cannot create {}: {e}", dir.display()))?;
            self.give_to_workers(dir)?;
        }
        // The installer and whatever it runs (a package's build script) in
        // a cgroup of their own: every core, a memory and process limit, no
        // GPU; removed (its processes killed) when the build ends.
        let cgroup = self.build_cgroup()?;
        let cgroup = cgroup.as_ref();
        let mut venv = Command::new(uv);
        venv.args(["venv", "--quiet", "--relocatable", "--python"])
            .arg(&base.executable)
            .arg(tmp);
        self.install_command(&mut venv, &cache, tmp, cgroup)?;
        self.checked(venv, "create the virtual environment", spec).await?;
        let site = tmp
            .join("lib")
            .join(format!("python{}", base.python))
            .join("site-packages");
        // Behind the environment's own packages: the runtime first (so that
        // a base interpreter's older fleetmap never shadows it), then the
        // base interpreter's site-packages.
        let mut pth = String::new();
        if let Some(runtime) = runtime {
            pth.push_str(&format!("{}\n", runtime.display()));
        }
        write_file(&site.join("_fleetmap_0_runtime.pth"), &pth)?;
        let base_dirs: String = base.site_dirs.iter().map(|d| format!("{d}\n")).collect();
        write_file(&site.join("_fleetmap_1_base.pth"), &base_dirs)?;
        if !install.is_empty() {
            let requirements = tmp.join("fleetmap-requirements.txt");
            let listed: String = install.iter().map(|r| format!("{r}\n")).collect();
            write_file(&requirements, &listed)?;
            self.give_to_workers(&requirements)?;
            let mut pip = Command::new(uv);
            pip.args(["pip", "install", "--quiet", "--python"])
                .arg(python_in(tmp))
                .arg("-r")
                .arg(&requirements);
            if !spec.resolve {
                // The caller's manifest is its whole environment already.
                pip.arg("--no-deps");
            }
            if let Some(index) = &self.config.index_url {
                pip.arg("--index-url").arg(index);
            }
            for links in &self.config.find_links {
                pip.arg("--find-links").arg(links);
            }
            self.install_command(&mut pip, &cache, tmp, cgroup)?;
            self.checked(pip, "install the job's packages", spec).await?;
        }
        let record = format!(
            "{{\"id\": {:?}, \"python\": {:?}, \"base\": {:?}, \"requirements\": {:?}, \"installed\": {:?}}}\n",
            spec.id, base.python, base.executable, spec.requirements, install
        );
        write_file(&tmp.join("fleetmap-environment.json"), &record)
    }

    /// Runs an install step; its failure carries uv's own words.
    async fn checked(&self, cmd: Command, what: &str, spec: &EnvironmentSpec) -> Result<(), String> {
        let out = run(cmd, self.config.build_timeout).await.map_err(|e| {
            format!(
                "node {} could not {what} for environment {}: {e}",
                self.node,
                &spec.id[..8]
            )
        })?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "node {} could not {what} (requirements: {}): {}",
            self.node,
            summarize(&spec.requirements, 10),
            tail(&out.stderr)
        ))
    }

    /// What an install sees: an allowlisted environment, the workers' user.
    fn install_command(
        &self,
        cmd: &mut Command,
        cache: &Path,
        home: &Path,
        cgroup: Option<&SlotCgroup>,
    ) -> Result<(), String> {
        cmd.env_clear();
        for (key, value) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if PASSED_VARIABLES.contains(&k) || PASSED_PREFIXES.iter().any(|p| k.starts_with(p)) {
                cmd.env(&key, value);
            }
        }
        cmd.env("UV_CACHE_DIR", cache)
            .env("HOME", home)
            .env("UV_NO_PROGRESS", "1")
            .env("UV_PYTHON_DOWNLOADS", "never");
        self.sandbox(cmd, home, cgroup)
    }

    /// Runs `cmd` as the workers' user (no_new_privs, killed with the
    /// daemon), in `cgroup` if given, in `dir`, killed if dropped.
    fn sandbox(&self, cmd: &mut Command, dir: &Path, cgroup: Option<&SlotCgroup>) -> Result<(), String> {
        let procs = match cgroup {
            Some(cg) => cg
                .procs_files()
                .map_err(|e| format!("node {}: cannot enter the build's cgroup: {e}", self.node))?,
            None => vec![],
        };
        fleetmap_sandbox::confine(cmd, procs, self.run_as);
        cmd.current_dir(dir).kill_on_drop(true);
        Ok(())
    }

    /// A cgroup for one build, where the node manages cgroups.
    fn build_cgroup(&self) -> Result<Option<SlotCgroup>, String> {
        let Some(tree) = &self.cgroups else { return Ok(None) };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!("build{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let limits = SlotLimits {
            cpus: self.cpus.clone(),
            mems: None,
            memory_bytes: self.config.build_memory_bytes,
            pids_max: 4096,
            // The devices every program expects; no GPU, no block device.
            gpus: Some(GpuAccess { allowed_minors: vec![] }),
        };
        tree.create_slot(&name, &limits)
            .map(Some)
            .map_err(|e| format!("node {}: cannot create a cgroup for the build: {e}", self.node))
    }

    /// uv's cache, one per user installs run as: a cache written by
    /// another user (root's, before the node ran installs unprivileged) is
    /// one this user cannot write.
    fn uv_cache(&self) -> PathBuf {
        match self.run_as {
            Some((uid, _)) => self.config.cache_dir.join(format!("uv-{uid}")),
            None => self.config.cache_dir.join("uv"),
        }
    }

    fn give_to_workers(&self, path: &Path) -> Result<(), String> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
                format!(
                    "node {}: cannot hand {} to the workers' user: {e}",
                    self.node,
                    path.display()
                )
            })?;
        }
        Ok(())
    }

    /// Removes environments no slot or warm worker uses, least recently
    /// used first, until the cache is under its cap.
    fn evict(&self) {
        let envs = self.config.cache_dir.join("envs");
        let Ok(entries) = fs::read_dir(&envs) else { return };
        let mut all: Vec<(std::time::SystemTime, u64, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                if name.starts_with('.') {
                    return None;
                }
                let used = fs::metadata(e.path().join(".fleetmap-last-used"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((used, dir_size(&e.path()), name))
            })
            .collect();
        let mut total: u64 = all.iter().map(|(_, size, _)| size).sum();
        all.sort();
        for (_, size, id) in all {
            if total <= self.config.max_bytes {
                break;
            }
            if self.leases.in_use(&id) {
                continue;
            }
            let trash = envs.join(format!(".trash-{id}-{}", std::process::id()));
            if fs::rename(envs.join(&id), &trash).is_ok() {
                let _ = fs::remove_dir_all(&trash);
                total = total.saturating_sub(size);
                info!("node {}: evicted environment {id} ({size} bytes)", self.node);
            }
        }
    }
}

/// Whether a caller's interpreter path names an interpreter on this node.
/// Only such a path is run: it comes from the caller, and describing an
/// interpreter runs it.
fn looks_like_python(executable: &str) -> bool {
    let path = Path::new(executable);
    path.is_absolute()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python"))
        && path.is_file()
}

fn python_in(env: &Path) -> PathBuf {
    env.join("bin").join("python")
}

/// Whether the base interpreter already has what `requirement` asks:
/// `name==version` at that version, or a bare `name` at any.
fn satisfied_by(requirement: &str, installed: &HashMap<String, String>) -> bool {
    let (name, version) = match requirement.split_once("==") {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (requirement.trim(), None),
    };
    let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !plain(name) || version.is_some_and(|v| !plain(v)) || name.is_empty() {
        return false; // extras, markers, URLs, ranges: the installer decides
    }
    let key = normalize(name);
    match (installed.get(&key), version) {
        (Some(have), Some(want)) => have == want,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A project name as PEP 503 compares it.
pub(crate) fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut dash = false;
    for c in name.chars() {
        if "-_.".contains(c) {
            dash = true;
        } else {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn describe_install(node: &str, short: &str, install: &[&String], total: usize) -> String {
    if install.is_empty() {
        return format!("node {node}: preparing environment {short} ({total} packages, all already on the node)");
    }
    let names: Vec<String> = install.iter().map(|r| r.to_string()).collect();
    format!(
        "node {node}: preparing environment {short}: installing {} package{} ({})",
        install.len(),
        if install.len() == 1 { "" } else { "s" },
        summarize(&names, 6)
    )
}

fn summarize(items: &[String], most: usize) -> String {
    let mut text = items.iter().take(most).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > most {
        text.push_str(&format!(", ... {} more", items.len() - most));
    }
    text
}

/// The end of an installer's message: the part that names what failed.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text.len().saturating_sub(4000);
    let start = (start..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    text[start..].to_string()
}

async fn run(mut cmd: Command, limit: Duration) -> Result<std::process::Output, String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.map_err(|e| e.to_string()),
        Err(_) => Err(format!("it took longer than {} s and was stopped", limit.as_secs())),
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Marks a cache entry used now (eviction goes by this file's age).
pub(crate) fn touch(path: &Path) {
    let _ = fs::File::create(path);
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// How long a source bundle no job has used stays on the node.
const SOURCES_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Removes the source bundles no job has used for `kept` (each is a few
/// KiB to MiB, one per version of a caller's code).
fn remove_old_sources(dir: &Path, kept: Duration) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > kept);
        if old {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes builds and evictions a dead daemon left behind.
fn remove_leftovers(envs: &Path) {
    let Ok(entries) = fs::read_dir(envs) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".build-").or_else(|| name.strip_prefix(".trash-")) else {
            continue;
        };
        // .build-ID-PID-N / .trash-ID-PID
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && p != std::process::id() as i32);
        if !alive {
            if let Err(err) = fs::remove_dir_all(e.path()) {
                warn!(
                    "could not remove the unfinished environment {}: {err}",
                    e.path().display()
                );
            }
        }
    }
}

/// Links (or copies, across file systems) the runtime's package directories
/// into `root/HASH`, named by a hash of their files, once.
fn link_runtime(sources: &[PathBuf], root: &Path) -> std::io::Result<PathBuf> {
    let mut files = Vec::new();
    for source in sources {
        let name = source
            .file_name()
            .ok_or_else(|| std::io::Error::other(format!("{} names no package", source.display())))?;
        collect_files(source, Path::new(name), &mut files)?;
    }
    files.sort();
    let mut digest = Sha256::new();
    for (relative, source) in &files {
        let m = fs::metadata(source)?;
        digest.update(format!(
            "{}\0{}\0{}\n",
            relative.display(),
            m.len(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ));
    }
    let hash: String = digest.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = root.join(&hash);
    if dir.exists() {
        return Ok(dir);
    }
    let tmp = root.join(format!(".tmp-{hash}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    for (relative, source) in &files {
        let target = tmp.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::hard_link(source, &target).is_err() {
            fs::copy(source, &target)?;
        }
    }
    // Readable by the workers' user, whoever it is.
    set_readable(&tmp)?;
    match fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.exists() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

fn collect_files(dir: &Path, relative: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        if name == "__pycache__" {
            continue;
        }
        let kind = e.file_type()?;
        if kind.is_dir() {
            collect_files(&e.path(), &relative.join(&name), out)?;
        } else if kind.is_file() {
            out.push((relative.join(&name), e.path()));
        }
    }
    Ok(())
}

fn set_readable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            set_readable(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_interpreter_satisfies_only_exact_versions_and_bare_names() {
        let installed: HashMap<String, String> = [
            ("torch".to_string(), "2.5.1+cu124".to_string()),
            ("fmtest-pkg".into(), "1.0".into()),
        ]
        .into_iter()
        .collect();
        assert!(
            !satisfied_by("torch==2.5.1", &installed),
            "a local version label differs"
        );
        assert!(satisfied_by("fmtest_pkg==1.0", &installed), "names compare normalized");
        assert!(satisfied_by("FMTest.Pkg", &installed), "a bare name at any version");
        assert!(!satisfied_by("fmtest-pkg==2.0", &installed), "another version");
        assert!(
            !satisfied_by("fmtest-pkg>=1.0", &installed),
            "ranges go to the installer"
        );
        assert!(!satisfied_by("numpy==2.3.1", &installed), "not installed");
        assert!(
            !satisfied_by("fmtest-pkg @ git+https://x/y@abc", &installed),
            "URLs go to the installer"
        );
    }

    /// The project's own interpreter and uv (`scripts/setup` installs both).
    fn tools() -> Option<(String, PathBuf)> {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin");
        let (python, uv) = (venv.join("python"), venv.join("uv"));
        if python.exists() && uv.exists() {
            return Some((python.display().to_string(), uv));
        }
        let why = format!("no {} or {}: run ./scripts/setup", python.display(), uv.display());
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipped: {why}");
        None
    }

    fn environments(cache: &Path, python: String, uv: PathBuf) -> Environments {
        let mut config = EnvironmentConfig::new(cache.to_path_buf());
        config.pythons = vec![python];
        config.uv = Some(uv);
        config.use_caller_python = false;
        Environments::new(config, "test-node".into(), None, None, vec![0])
    }

    fn spec(requirements: &[&str]) -> EnvironmentSpec {
        let mut digest = Sha256::new();
        digest.update(requirements.join("\n"));
        EnvironmentSpec {
            id: digest.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect(),
            requirements: requirements.iter().map(|r| r.to_string()).collect(),
            resolve: true,
        }
    }

    #[tokio::test]
    async fn slots_that_need_one_new_environment_at_once_share_one_build() {
        let Some((python, uv)) = tools() else { return };
        let cache = tempfile::tempdir().unwrap();
        let envs = environments(cache.path(), python.clone(), uv);
        let version = envs.describe(&python, false).await.unwrap().python.clone();
        let spec = spec(&[]);
        let said = std::sync::Mutex::new(Vec::new());
        let say = |text: String| said.lock().unwrap().push(text);
        let (a, b) = tokio::join!(
            envs.prepare(&spec, "/nonexistent/python3", &version, &say),
            envs.prepare(&spec, "/nonexistent/python3", &version, &say),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.program, b.program);
        assert!(Path::new(&a.program).exists(), "{}", a.program);
        assert_eq!(envs.built.load(Ordering::Relaxed), 1, "one build for both");
        let again = envs
            .prepare(&spec, "/nonexistent/python3", &version, &say)
            .await
            .unwrap();
        assert_eq!(again.program, a.program);
        assert_eq!(envs.built.load(Ordering::Relaxed), 1, "found on disk");
        assert_eq!(
            said.lock().unwrap().len(),
            2,
            "one progress line and one 'ready': {said:?}"
        );
        // Held by the leases: never evicted while a slot uses it.
        assert!(envs.in_use(&spec.id));
        drop((a, b, again));
        assert!(!envs.in_use(&spec.id));
    }

    #[tokio::test]
    async fn a_failed_build_leaves_nothing_and_is_retried_by_the_next_job() {
        let Some((python, uv)) = tools() else { return };
        let cache = tempfile::tempdir().unwrap();
        let mut envs = environments(cache.path(), python.clone(), uv);
        // An index that does not exist: nothing can be installed.
        envs.config.index_url = Some(format!("file://{}/no-index", cache.path().display()));
        let version = envs.describe(&python, false).await.unwrap().python.clone();
        let spec = spec(&["no-such-package-xyz"]);
        let say = |_: String| {};
        for _ in 0..2 {
            let err = envs.prepare(&spec, "", &version, &say).await.err().unwrap();
            assert!(
                err.contains("no-such-package-xyz") && err.contains("test-node"),
                "{err}"
            );
        }
        let left: Vec<_> = fs::read_dir(cache.path().join("envs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_node_without_the_callers_python_says_which_it_has() {
        let Some((python, uv)) = tools() else { return };
        let cache = tempfile::tempdir().unwrap();
        let envs = environments(cache.path(), python.clone(), uv);
        let err = envs.prepare(&spec(&[]), "", "2.7", &|_| {}).await.err().unwrap();
        assert!(err.contains("no Python 2.7") && err.contains(&python), "{err}");
    }

    #[test]
    fn source_bundles_are_stored_once_checked_and_old_ones_removed() {
        let cache = tempfile::tempdir().unwrap();
        let mut config = EnvironmentConfig::new(cache.path().to_path_buf());
        config.use_caller_python = false;
        let envs = Environments::new(config, "test-node".into(), None, None, vec![0]);
        let zip = b"PK\x05\x06not really a zip".to_vec();
        let digest: String = Sha256::digest(&zip).iter().map(|b| format!("{b:02x}")).collect();
        let path = envs
            .sources(&SourceBundle {
                digest: digest.clone(),
                zip: zip.clone(),
            })
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), zip);
        let forged = SourceBundle {
            digest: "0".repeat(64),
            zip: zip.clone(),
        };
        assert!(envs.sources(&forged).unwrap_err().contains("does not match"));
        let not_hex = SourceBundle {
            digest: "../../etc/passwd".into(),
            zip,
        };
        assert!(envs.sources(&not_hex).is_err());
        remove_old_sources(&cache.path().join("sources"), Duration::from_secs(3600));
        assert!(path.exists(), "used just now");
        remove_old_sources(&cache.path().join("sources"), Duration::ZERO);
        assert!(!path.exists(), "unused for longer than kept");
    }

    #[test]
    fn names_normalize_as_pep_503_says() {
        assert_eq!(normalize("Foo__Bar.baz-Qux"), "foo-bar-baz-qux");
        assert_eq!(normalize("PyYAML"), "pyyaml");
    }

    #[test]
    fn a_dead_daemons_unfinished_build_is_removed_and_a_living_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(".build-abc-999999999-0");
        let alive = dir
            .path()
            .join(format!(".build-abc-{}-0", std::os::unix::process::parent_id()));
        let env = dir.path().join("abc");
        for d in [&dead, &alive, &env] {
            fs::create_dir_all(d.join("bin")).unwrap();
        }
        remove_leftovers(dir.path());
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(env.exists(), "a finished environment stays");
    }
}
