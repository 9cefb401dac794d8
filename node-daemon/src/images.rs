//! OCI images on a node: a job with `image=` runs every call with that
//! image's file system as its root. The daemon pulls and unpacks images
//! itself (no container engine) and caches them by digest.
//!
//! - **Pulled with the OCI distribution API** ([`oci_client`]): an index is
//!   resolved to this node's platform, manifests and blobs are checked
//!   against their digests while they stream. HTTPS, except for registries
//!   the operator marks insecure. Credentials come from a file of the
//!   node's in Docker's `config.json` format, never from the caller.
//! - **Resolved once per job.** A tag names a digest once for each job on
//!   this node, so the job's slots never mix two versions of an image.
//! - **Unpacked once, never half-done.** Layers are applied in order with
//!   their whiteouts into `CACHE/images/.tmp-*`, then renamed to
//!   `CACHE/images/DIGEST`. No entry lands outside the root: a path with
//!   `..` or a hard link leading out is refused, symbolic links are
//!   followed as if the root were `/`, device nodes are skipped and setuid
//!   bits dropped.
//! - **Shared read-only.** Every slot of every job with the image runs on
//!   the same root, under a writable layer of its own
//!   ([`fleetmap_sandbox::image_root`]).
//! - **Bounded.** An image larger than the cache's limit is refused before
//!   its layers are fetched; images no slot uses are evicted, least recently
//!   used first, above that limit.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    ffi::OsString,
    fs,
    io::{self, Read},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Component, Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use fleetmap_protocol::{check_image_reference, JobId};
use oci_client::{
    client::{ClientConfig, ClientProtocol},
    secrets::RegistryAuth,
    Client, Reference,
};
use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt, sync::OnceCell};
use tracing::{info, warn};

use crate::{
    cache::{Lease, Leases, OncePerKey},
    environments::touch,
};

/// Where and how a node gets images.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `HOST:PORT` of registries reached over plain HTTP (tests, a
    /// registry on the node's own network). Every other one is HTTPS.
    pub insecure_registries: Vec<String>,
    /// Registry credentials in Docker's `config.json` format (default:
    /// `$FLEETMAP_REGISTRY_AUTH`, which for the embedded cluster is the
    /// caller's own setting).
    pub auth_file: Option<PathBuf>,
    /// Images no slot uses are evicted above this many bytes; a larger
    /// image is refused.
    pub max_bytes: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            insecure_registries: std::env::var("FLEETMAP_INSECURE_REGISTRIES")
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            auth_file: std::env::var_os("FLEETMAP_REGISTRY_AUTH")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            max_bytes: 100 << 30,
        }
    }
}

/// An image on this node, unpacked, and what a worker needs to run in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Image {
    /// The reference the image was first pulled by, for messages.
    pub reference: String,
    /// What the reference resolved to (an index or a manifest).
    pub digest: String,
    /// Its interpreter, as a path inside the image, and its `major.minor`.
    pub python: String,
    pub python_version: String,
    /// The image's `Env`, in order.
    pub env: Vec<(String, String)>,
    /// The image's `WorkingDir` (`/` if it has none).
    pub workdir: String,
    /// Bytes unpacked.
    pub bytes: u64,
    /// Where it lies on this node (not stored: derived from the cache).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Image {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("scratch")
    }
}

/// An image ready for a slot, held so that it is not evicted.
pub(crate) struct Held {
    pub image: Arc<Image>,
    pub lease: Lease,
}

type Resolution = Arc<OnceCell<Result<String, String>>>;
/// Tag resolutions by job and reference, and the order they were made in.
type Resolutions = (HashMap<(JobId, String), Resolution>, VecDeque<(JobId, String)>);

/// Jobs whose tag resolutions a node remembers.
const RESOLUTIONS_KEPT: usize = 256;

/// A node's images.
pub(crate) struct Images {
    config: ImageConfig,
    dir: PathBuf,
    node: String,
    client: Client,
    /// Tags resolved for each job, so that the job's slots agree.
    resolved: Mutex<Resolutions>,
    /// Pulls in flight, by digest.
    pulls: OncePerKey<Result<Arc<Image>, String>>,
    /// Images this daemon has used, by digest (checked on disk before use,
    /// as eviction may have removed one).
    known: Mutex<HashMap<String, Arc<Image>>>,
    leases: Leases,
    /// Images pulled and unpacked since the daemon started.
    pulled: std::sync::atomic::AtomicU64,
}

/// The node's platform in OCI's words.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl Images {
    /// Images pulled and unpacked since the daemon started.
    pub fn pulled(&self) -> u64 {
        self.pulled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn new(config: ImageConfig, cache_dir: &Path, node: String) -> Self {
        // reqwest takes the process's rustls provider; the first call wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure_registries.clone()),
            platform_resolver: Some(Box::new(|entries| {
                entries
                    .iter()
                    .find(|e| {
                        e.platform
                            .as_ref()
                            .is_some_and(|p| p.os.to_string() == "linux" && p.architecture.to_string() == oci_arch())
                    })
                    .map(|e| e.digest.clone())
            })),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        let dir = cache_dir.join("images");
        remove_unfinished(&dir);
        Self {
            config,
            dir,
            node,
            client,
            resolved: Default::default(),
            pulled: Default::default(),
            pulls: Default::default(),
            known: Default::default(),
            leases: Default::default(),
        }
    }

    /// The job's image, pulled and unpacked unless this node has it. `say`
    /// tells the job's caller what is happening.
    pub async fn prepare(
        &self,
        job: JobId,
        reference: &str,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Held, String> {
        let node = &self.node;
        check_image_reference(reference).map_err(|e| format!("node {node}: {e}"))?;
        let parsed: Reference = reference
            .parse()
            .map_err(|e| format!("image {reference:?} is not a valid reference: {e}"))?;
        let auth = self.auth_for(parsed.resolve_registry())?;
        let digest = self.resolve(job, &parsed, &auth).await?;
        // The digest names a directory: only `ALGORITHM:HEX` from a
        // registry is trusted that far.
        if !is_digest(&digest) {
            return Err(format!(
                "node {node}: image {reference} resolved to {digest:?}, which is not a digest (ALGORITHM:HEX)"
            ));
        }
        let dir = self.dir.join(digest.replace(':', "-"));
        let lease = self.lease(&digest);
        let known = self
            .known
            .lock()
            .expect("known images lock poisoned")
            .get(&digest)
            .cloned();
        if let Some(image) = known.filter(|i| i.dir.join("image.json").exists()) {
            // Eviction goes by this file's age.
            touch(&dir.join(".fleetmap-last-used"));
            return Ok(Held { image, lease });
        }
        if let Some(image) = load(&dir) {
            touch(&dir.join(".fleetmap-last-used"));
            let image = Arc::new(image);
            self.remember(&image);
            return Ok(Held { image, lease });
        }
        let image = self
            .pulls
            .run(&digest, || self.pull(reference, &parsed, &digest, &auth, &dir, say))
            .await?;
        touch(&dir.join(".fleetmap-last-used"));
        self.remember(&image);
        Ok(Held { image, lease })
    }

    /// Keeps `image`'s description in memory: a later job with the same
    /// digest reads nothing from disk.
    fn remember(&self, image: &Arc<Image>) {
        let mut known = self.known.lock().expect("known images lock poisoned");
        if known.len() >= RESOLUTIONS_KEPT {
            known.clear();
        }
        known.insert(image.digest.clone(), image.clone());
    }

    /// The digest `reference` names for this job: itself if it has one,
    /// else what the registry says the tag is now, asked once per job.
    async fn resolve(&self, job: JobId, reference: &Reference, auth: &RegistryAuth) -> Result<String, String> {
        if let Some(digest) = reference.digest() {
            return Ok(digest.to_string());
        }
        let key = (job, reference.whole());
        let cell = {
            let mut guard = self.resolved.lock().expect("image resolutions lock poisoned");
            let (map, order) = &mut *guard;
            if !map.contains_key(&key) {
                order.push_back(key.clone());
                while order.len() > RESOLUTIONS_KEPT {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
            }
            map.entry(key).or_default().clone()
        };
        cell.get_or_init(|| async {
            self.client
                .fetch_manifest_digest(reference, auth)
                .await
                .map_err(|e| self.registry_error(reference, &e))
        })
        .await
        .clone()
    }

    fn registry_error(&self, reference: &Reference, e: &oci_client::errors::OciDistributionError) -> String {
        use oci_client::errors::OciDistributionError as E;
        let hint = match e {
            E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => match &self.config.auth_file {
                Some(file) => format!(
                    "; the credentials for {} in {} were refused",
                    reference.resolve_registry(),
                    file.display()
                ),
                None => "; the node has no registry credentials: give it a Docker-format credentials file \
                         (`fleetmap node --registry-auth FILE`, or FLEETMAP_REGISTRY_AUTH for the embedded cluster)"
                    .to_string(),
            },
            _ => String::new(),
        };
        format!(
            "node {} could not get image {} from registry {}: {e}{hint}",
            self.node,
            reference.whole(),
            reference.resolve_registry()
        )
    }

    /// The node's credentials for `registry`, from its auth file.
    fn auth_for(&self, registry: &str) -> Result<RegistryAuth, String> {
        let Some(path) = &self.config.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        let text = fs::read_to_string(path).map_err(|e| {
            format!(
                "node {}: cannot read registry credentials {}: {e}",
                self.node,
                path.display()
            )
        })?;
        credentials(&text, registry)
            .map_err(|e| format!("node {}: registry credentials {}: {e}", self.node, path.display()))
    }

    /// Pulls the image `digest` and unpacks it into `dir`.
    async fn pull(
        &self,
        reference: &str,
        parsed: &Reference,
        digest: &str,
        auth: &RegistryAuth,
        dir: &Path,
        say: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Arc<Image>, String> {
        let node = &self.node;
        let started = Instant::now();
        let pinned = Reference::with_digest(
            parsed.resolve_registry().to_string(),
            parsed.repository().to_string(),
            digest.to_string(),
        );
        let (manifest, _, config, _) = self
            .client
            .pull_manifest_and_config_and_list_digest(&pinned, auth)
            .await
            .map_err(|e| self.registry_error(parsed, &e))?;
        let config: ImageConfigFile = serde_json::from_str(&config)
            .map_err(|e| format!("image {reference}: its configuration is not valid JSON: {e}"))?;
        if config.os != "linux" || config.architecture != oci_arch() {
            return Err(format!(
                "image {reference} is for {}/{}, and node {node} runs linux/{}",
                config.os,
                config.architecture,
                oci_arch()
            ));
        }
        let declared: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        if declared > self.config.max_bytes {
            return Err(format!(
                "image {reference} has {} of layers, over node {node}'s image cache limit of {}: \
                 raise it with `fleetmap node --image-cache-gib`",
                human(declared),
                human(self.config.max_bytes)
            ));
        }
        say(format!(
            "node {node}: pulling image {reference} ({} layers, {})",
            manifest.layers.len(),
            human(declared)
        ));
        fs::create_dir_all(&self.dir).map_err(|e| format!("node {node}: cannot create {}: {e}", self.dir.display()))?;
        let tmp = tempdir_in(&self.dir)
            .map_err(|e| format!("node {node}: cannot unpack into {}: {e}", self.dir.display()))?;
        // Whatever fails from here on (a blob, a layer, the interpreter)
        // leaves nothing of the image behind.
        let mut unfinished = RemovedOnDrop(Some(tmp.clone()));
        let rootfs = tmp.join("rootfs");
        fs::create_dir(&rootfs).map_err(|e| format!("node {node}: {e}"))?;
        let mut unpacked = 0u64;
        for (n, layer) in manifest.layers.iter().enumerate() {
            let blob = tmp.join(format!("layer-{n}"));
            let file = tokio::fs::File::create(&blob)
                .await
                .map_err(|e| format!("node {node}: cannot write {}: {e}", blob.display()))?;
            let mut writer = Bounded {
                inner: file,
                left: layer.size.max(0) as u64,
            };
            // The blob's digest is checked while it streams.
            self.client
                .pull_blob(&pinned, layer, &mut writer)
                .await
                .map_err(|e| format!("image {reference}: layer {} ({}): {e}", n + 1, layer.digest))?;
            writer.inner.flush().await.map_err(|e| format!("node {node}: {e}"))?;
            let media = layer.media_type.clone();
            let root = rootfs.clone();
            let budget = self.config.max_bytes.saturating_sub(unpacked);
            let applied = tokio::task::spawn_blocking(move || apply_layer_file(&blob, &media, &root, budget))
                .await
                .map_err(|e| format!("node {node}: unpacking panicked: {e}"))?;
            unpacked += applied.map_err(|e| format!("image {reference}: layer {} ({}): {e}", n + 1, layer.digest))?;
        }
        let inner = config.config.unwrap_or_default();
        let env: Vec<(String, String)> = inner
            .env
            .unwrap_or_default()
            .iter()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        let (python, python_version) = find_python(&rootfs, &path).ok_or_else(|| {
            format!("image {reference} has no python3 or python on its PATH ({path}): fleetmap runs calls with the image's own Python")
        })?;
        make_mount_points(&rootfs).map_err(|e| format!("node {node}: {e}"))?;
        let mut image = Image {
            reference: reference.to_string(),
            digest: digest.to_string(),
            python,
            python_version,
            env,
            workdir: inner
                .working_dir
                .filter(|w| w.starts_with('/'))
                .unwrap_or_else(|| "/".into()),
            bytes: unpacked,
            dir: dir.to_path_buf(),
        };
        let finish = || -> io::Result<()> {
            for n in 0..manifest.layers.len() {
                let _ = fs::remove_file(tmp.join(format!("layer-{n}")));
            }
            fs::create_dir(tmp.join("scratch"))?;
            fs::write(tmp.join("image.json"), serde_json::to_vec_pretty(&image)?)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
            fs::rename(&tmp, dir)
        };
        if let Err(e) = finish() {
            let _ = fs::remove_dir_all(&tmp);
            if load(dir).is_none() {
                return Err(format!(
                    "node {node}: cannot store image {reference} in {}: {e}",
                    dir.display()
                ));
            }
        }
        unfinished.0 = None;
        self.pulled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        image.dir = dir.to_path_buf();
        let took = started.elapsed().as_secs_f64();
        info!(
            "node {node}: image {reference} ({digest}) unpacked, {} in {took:.1} s",
            human(unpacked)
        );
        say(format!(
            "node {node}: image {reference} ready ({}, {took:.1} s)",
            human(unpacked)
        ));
        self.evict(digest);
        Ok(Arc::new(image))
    }

    fn lease(&self, digest: &str) -> Lease {
        self.leases.lease(digest)
    }

    /// Removes images no slot holds, least recently used first, until the
    /// cache is under its limit (`keep` is the one just pulled).
    fn evict(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut images: Vec<(std::time::SystemTime, PathBuf, Image)> = entries
            .flatten()
            .filter_map(|e| {
                let dir = e.path();
                let image = load(&dir)?;
                let used = fs::metadata(dir.join(".fleetmap-last-used"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((used, dir, image))
            })
            .collect();
        let mut total: u64 = images.iter().map(|(_, _, i)| i.bytes).sum();
        images.sort_by_key(|(used, _, _)| *used);
        for (_, dir, image) in images {
            if total <= self.config.max_bytes {
                break;
            }
            if image.digest == keep || self.leases.in_use(&image.digest) {
                continue;
            }
            match fs::remove_dir_all(&dir) {
                Ok(()) => {
                    info!(
                        "node {}: evicted image {} ({})",
                        self.node,
                        image.reference,
                        human(image.bytes)
                    );
                    total = total.saturating_sub(image.bytes);
                }
                Err(e) => warn!("node {}: could not evict {}: {e}", self.node, dir.display()),
            }
        }
    }
}

/// The distributions installed for an image's interpreter (normalized
/// name to version), read off the `.dist-info` and `.egg-info` directory
/// names of its site directories: its prefix's `lib/pythonX.Y/site-packages`
/// and the usual system places.
pub(crate) fn distributions(image: &Image) -> HashMap<String, String> {
    let rootfs = image.rootfs();
    let v = &image.python_version;
    let mut dirs: Vec<PathBuf> = vec![
        format!("/usr/lib/python{v}/site-packages").into(),
        format!("/usr/local/lib/python{v}/site-packages").into(),
        format!("/usr/local/lib/python{v}/dist-packages").into(),
        "/usr/lib/python3/dist-packages".into(),
    ];
    if let Ok(real) = resolve_in_root(&rootfs, Path::new(&image.python), true) {
        if let Some(prefix) = real.strip_prefix(&rootfs).ok().and_then(|p| p.parent()?.parent()) {
            let lib = Path::new("/").join(prefix).join("lib").join(format!("python{v}"));
            dirs.push(lib.join("site-packages"));
            dirs.push(lib.join("dist-packages"));
        }
    }
    let mut found = HashMap::new();
    for dir in dirs {
        let Ok(entries) = resolve_in_root(&rootfs, &dir, true).and_then(fs::read_dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name
                .strip_suffix(".dist-info")
                .or_else(|| name.strip_suffix(".egg-info"))
            else {
                continue;
            };
            if let Some((project, version)) = stem.split_once('-') {
                let version = version.split('-').next().unwrap_or(version);
                found.insert(crate::environments::normalize(project), version.to_string());
            }
        }
    }
    found
}

/// The host's NVIDIA driver libraries, as `ldconfig -p` lists them (name,
/// path), bound into a GPU slot's image as the NVIDIA container toolkit
/// does, so that an image without a driver runs on this node's. Looked up
/// once.
pub(crate) fn driver_libraries() -> &'static [(String, PathBuf)] {
    static FOUND: std::sync::OnceLock<Vec<(String, PathBuf)>> = std::sync::OnceLock::new();
    FOUND.get_or_init(|| {
        let Ok(out) = std::process::Command::new("ldconfig").arg("-p").output() else {
            return vec![];
        };
        parse_ldconfig(&String::from_utf8_lossy(&out.stdout))
    })
}

/// The driver's libraries in `ldconfig -p` output, 64-bit only, one per
/// name.
fn parse_ldconfig(listing: &str) -> Vec<(String, PathBuf)> {
    const PREFIXES: &[&str] = &[
        "libcuda.so",
        "libcudadebugger.so",
        "libnvidia-ml.so",
        "libnvidia-ptxjitcompiler.so",
        "libnvidia-nvvm.so",
        "libnvidia-opencl.so",
        "libnvidia-gpucomp.so",
        "libnvidia-allocator.so",
        "libnvidia-cfg.so",
    ];
    let mut found: Vec<(String, PathBuf)> = vec![];
    for line in listing.lines() {
        let Some((left, path)) = line.split_once("=>") else {
            continue;
        };
        let name = left.split_whitespace().next().unwrap_or("");
        if !left.contains("x86-64") && !left.contains("AArch64") {
            continue;
        }
        if PREFIXES.iter().any(|p| name.starts_with(p)) && !found.iter().any(|(n, _)| n == name) {
            found.push((name.to_string(), PathBuf::from(path.trim())));
        }
    }
    found
}

/// The parts of an image configuration a node uses.
#[derive(Deserialize, Default)]
struct ImageConfigFile {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

/// A directory removed when dropped, unless taken out.
struct RemovedOnDrop(Option<PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// A blob writer that refuses more bytes than the manifest declared.
struct Bounded {
    inner: tokio::fs::File,
    left: u64,
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            return std::task::Poll::Ready(Err(io::Error::other(
                "the registry sent more bytes than the manifest declares for this layer",
            )));
        }
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &written {
            this.left -= *n as u64;
        }
        written
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The credentials for `registry` in a Docker `config.json`: `auths.HOST`
/// with `auth` (base64 `user:password`), or `username` and `password`, or
/// `identitytoken`/`registrytoken` (a bearer token). Anonymous if none.
fn credentials(text: &str, registry: &str) -> Result<RegistryAuth, String> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
        identitytoken: Option<String>,
        registrytoken: Option<String>,
    }
    let file: File = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let host = |key: &str| {
        key.trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let wanted = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let Some(entry) = file
        .auths
        .iter()
        .find(|(k, _)| host(k) == wanted || host(k) == registry)
        .map(|(_, e)| e)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = entry.registrytoken.as_ref().or(entry.identitytoken.as_ref()) {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(user.clone(), password.clone()));
    }
    if let Some(auth) = &entry.auth {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "an `auth` entry is not base64")?;
        let decoded = String::from_utf8(decoded).map_err(|_| "an `auth` entry is not UTF-8")?;
        let (user, password) = decoded.split_once(':').ok_or("an `auth` entry is not user:password")?;
        return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
    }
    Ok(RegistryAuth::Anonymous)
}

/// Whether `digest` is `ALGORITHM:HEX` (`sha256:...`), as OCI digests are.
fn is_digest(digest: &str) -> bool {
    digest.split_once(':').is_some_and(|(algorithm, hex)| {
        !algorithm.is_empty()
            && algorithm.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && (32..=128).contains(&hex.len())
            && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The image recorded in `dir`, if it is complete.
fn load(dir: &Path) -> Option<Image> {
    let text = fs::read(dir.join("image.json")).ok()?;
    let mut image: Image = serde_json::from_slice(&text).ok()?;
    image.dir = dir.to_path_buf();
    Some(image)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// A fresh directory for an image being unpacked.
fn tempdir_in(dir: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp)?;
    Ok(tmp)
}

/// Removes images a dead daemon was unpacking.
fn remove_unfinished(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(".tmp-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// The directories a worker's root needs to mount on.
fn make_mount_points(rootfs: &Path) -> io::Result<()> {
    for dir in ["proc", "sys", "dev", "tmp", "opt/fleetmap"] {
        let path = resolve_in_root(rootfs, Path::new(dir), false)?;
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                fs::remove_file(&path)?;
                fs::create_dir_all(&path)?;
            }
            Err(_) => fs::create_dir_all(&path)?,
        }
    }
    Ok(())
}

/// The image's interpreter: `python3` (else `python`) on its `PATH`, as a
/// path inside the image, with its `major.minor` read off the file it
/// resolves to (`python3.11`), or off its `lib/pythonX.Y`.
fn find_python(rootfs: &Path, path: &str) -> Option<(String, String)> {
    for name in ["python3", "python"] {
        for dir in path.split(':').filter(|d| d.starts_with('/')) {
            let inside = Path::new(dir).join(name);
            let Ok(host) = resolve_in_root(rootfs, &inside, true) else {
                continue;
            };
            if !fs::metadata(&host).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0) {
                continue;
            }
            let version = host
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("python"))
                .filter(|v| v.split('.').count() == 2 && v.split('.').all(|p| p.parse::<u32>().is_ok()))
                .map(String::from)
                .or_else(|| {
                    let lib = host.parent()?.parent()?.join("lib");
                    let mut found = fs::read_dir(lib)
                        .ok()?
                        .flatten()
                        .filter_map(|e| e.file_name().to_str()?.strip_prefix("python").map(String::from))
                        .filter(|v| v.split('.').count() == 2)
                        .collect::<Vec<_>>();
                    (found.len() == 1).then(|| found.remove(0))
                })?;
            return Some((inside.display().to_string(), version));
        }
    }
    None
}

/// `path` (as inside the image) resolved within `root`: symbolic links
/// are followed as if `root` were `/` (the last one only if
/// `follow_last`), and `..` never leads above `root`.
pub(crate) fn resolve_in_root(root: &Path, path: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let host = root.join(&candidate);
        let is_link = fs::symlink_metadata(&host).is_ok_and(|m| m.file_type().is_symlink());
        if is_link && (follow_last || !pending.is_empty()) {
            links += 1;
            if links > 40 {
                return Err(io::Error::other(format!(
                    "too many symbolic links at {}",
                    candidate.display()
                )));
            }
            let target = fs::read_link(&host)?;
            if target.is_absolute() {
                resolved = PathBuf::new();
            }
            pending.extend(target.components().rev().filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some("..".into()),
                _ => None,
            }));
        } else {
            resolved = candidate;
        }
    }
    Ok(root.join(resolved))
}

/// Applies one layer blob of `media_type` onto `root`; the bytes it holds.
fn apply_layer_file(blob: &Path, media_type: &str, root: &Path, budget: u64) -> Result<u64, String> {
    let file = fs::File::open(blob).map_err(|e| e.to_string())?;
    let reader = io::BufReader::new(file);
    let base = media_type.replace(".nondistributable", "");
    let result = match base.as_str() {
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar" => {
            apply_layer(reader, root, budget)
        }
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            apply_layer(flate2::read::GzDecoder::new(reader), root, budget)
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(reader).map_err(|e| format!("not zstd: {e}"))?;
            apply_layer(decoder, root, budget)
        }
        other => {
            return Err(format!(
                "layers of type {other:?} are not supported (tar, tar+gzip and tar+zstd are)"
            ))
        }
    };
    let _ = fs::remove_file(blob);
    result
}

/// A path inside a layer, relative to the root, with no `..`.
fn entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "the entry {} leads out of the image's root (`..`)",
                    raw.display()
                ))
            }
            Component::Prefix(_) => return Err(format!("the entry {} is not a Unix path", raw.display())),
        }
    }
    Ok(out)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies a layer (an uncompressed tar stream) onto `root`, the OCI way:
/// entries in order, `.wh.NAME` removing `NAME` of the layers below, and
/// `.wh..wh..opq` emptying its directory of what the layers below put
/// there. Returns the bytes of file content written; more than `budget`
/// is refused.
pub(crate) fn apply_layer(reader: impl Read, root: &Path, budget: u64) -> Result<u64, String> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    let as_root = nix::unistd::geteuid().is_root();
    archive.set_preserve_ownerships(as_root);
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut bytes = 0u64;
    let entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("a damaged tar entry: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("a damaged tar entry: {e}"))?
            .into_owned();
        let relative = entry_path(&raw)?;
        let Some(name) = relative.file_name().map(|n| n.to_os_string()) else {
            continue;
        };
        let name_text = name.to_string_lossy();
        let fail = |e: io::Error| format!("{}: {e}", raw.display());
        let parent_inside = relative.parent().unwrap_or(Path::new(""));
        let parent = resolve_in_root(root, parent_inside, true).map_err(fail)?;
        if name_text == ".wh..wh..opq" {
            if let Ok(children) = fs::read_dir(&parent) {
                for child in children.flatten() {
                    if !written.contains(&child.path()) {
                        remove_any(&child.path()).map_err(fail)?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name_text.strip_prefix(".wh.") {
            remove_any(&parent.join(hidden)).map_err(fail)?;
            continue;
        }
        fs::create_dir_all(&parent).map_err(fail)?;
        let target = parent.join(&name);
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap_or(0o644);
        match kind {
            tar::EntryType::Directory => {
                if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    remove_any(&target).map_err(fail)?;
                }
                entry.unpack(&target).map_err(fail)?;
                if !as_root && mode & 0o700 != 0o700 {
                    // A daemon that is not root owns what it unpacks, and
                    // must be able to write the layers above into it.
                    fs::set_permissions(&target, fs::Permissions::from_mode((mode & 0o1777) | 0o700)).map_err(fail)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                bytes += entry.size();
                if bytes > budget {
                    return Err(format!(
                        "the image unpacks to more than the node's image cache limit ({})",
                        human(budget)
                    ));
                }
                remove_any(&target).map_err(fail)?;
                entry.unpack(&target).map_err(fail)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| format!("{}: {e}", raw.display()))?
                    .ok_or_else(|| format!("{}: a symbolic link to nothing", raw.display()))?
                    .into_owned();
                remove_any(&target).map_err(fail)?;
                std::os::unix::fs::symlink(&link, &target).map_err(fail)?;
                if as_root {
                    let (uid, gid) = (entry.header().uid().unwrap_or(0), entry.header().gid().unwrap_or(0));
                    let _ = std::os::unix::fs::lchown(&target, Some(uid as u32), Some(gid as u32));
                }
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| format!("{}: {e}", raw.display()))?
                    .ok_or_else(|| format!("{}: a hard link to nothing", raw.display()))?
                    .into_owned();
                let source = resolve_in_root(root, &entry_path(&link)?, false).map_err(fail)?;
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file() || m.file_type().is_symlink()) {
                    return Err(format!(
                        "{}: a hard link to {}, which is not a file of the image",
                        raw.display(),
                        link.display()
                    ));
                }
                remove_any(&target).map_err(fail)?;
                fs::hard_link(&source, &target).map_err(fail)?;
            }
            // Device nodes and FIFOs: a slot's /dev is made by the node.
            _ => continue,
        }
        if mode & 0o6000 != 0 && kind != tar::EntryType::Symlink {
            // No setuid or setgid program in an image (the workers run with
            // no_new_privs anyway).
            fs::set_permissions(&target, fs::Permissions::from_mode(mode & 0o1777)).map_err(fail)?;
        }
        written.insert(target);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
