//! The WebAssembly executor: runs a WASI preview 1 command module once per
//! input, stdin in, stdout out, in a fresh instance every time.
//!
//! - One [`Engine`] per process, with the pooling allocator (instances,
//!   memories and tables come from pre-reserved slots; linear memories start
//!   from copy-on-write images of the module's data), epoch interruption and
//!   a ticker thread that advances the epoch every millisecond.
//! - A module is compiled once per process (cached by the SHA-256 of its
//!   bytes) and, optionally, once per node: the compiled artefact is kept in
//!   a private directory of the current user (see [`default_cache_dir`]) and
//!   only ever loaded from there.
//! - [`WasmModule::run`] makes a new `Store` and instance for every call, so
//!   nothing (memory, globals, file descriptors) survives from one input to
//!   the next. The guest gets the input on stdin, its args and env, and no
//!   filesystem or network unless `mounts` names directories, which it may
//!   only read.

use std::{
    collections::HashMap,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
    ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap, WasmBacktrace,
};
use wasmtime_wasi::{
    p1::{self, WasiP1Ctx},
    p2::pipe::{MemoryInputPipe, MemoryOutputPipe},
    FsPerms, I32Exit, WasiCtxBuilder,
};

/// The most linear memory one instance may have: the whole 32-bit address
/// space, which is also each pool slot's virtual reservation.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// How many instances may run at once in one process (pool slots). A worker
/// runs one at a time; this leaves room for a few threads.
const POOL_SLOTS: u32 = 16;
/// Elements per table: C programs with many function pointers need tens of
/// thousands.
const TABLE_ELEMENTS: usize = 100_000;
/// What is kept of stderr: the capture, and the part put into an error.
const STDERR_CAPTURE: usize = 64 << 10;
const STDERR_IN_ERROR: usize = 4 << 10;
/// The epoch ticks every millisecond.
const TICK: Duration = Duration::from_millis(1);

/// Why a module could not be loaded or a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WasmError {
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    #[error(
        "the module exports no `_start` function of type () -> (): build it as a WASI command \
         (a `main` program, e.g. `clang --target=wasm32-wasi`), not as a library or reactor"
    )]
    NoStart,
    #[error("the module trapped: {message}{}", stderr_suffix(stderr))]
    Trap { message: String, stderr: String },
    #[error("the module exited with status {code}{}", stderr_suffix(stderr))]
    Exit { code: i32, stderr: String },
    #[error(
        "the module ran past its time limit of {limit:?} and was stopped; raise the time limit \
         or give it less work per input{}",
        stderr_suffix(stderr)
    )]
    Timeout { limit: Duration, stderr: String },
    #[error(
        "the module needed more than its memory limit of {limit} bytes (a memory growth was \
         refused); raise the memory limit or use less memory per input{}",
        stderr_suffix(stderr)
    )]
    MemoryLimit { limit: u64, stderr: String },
    #[error(
        "the module wrote more than {limit} bytes to stdout; raise the output limit or write \
         less per input{}",
        stderr_suffix(stderr)
    )]
    OutputTooLarge { limit: usize, stderr: String },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("\n--- stderr ---\n{stderr}")
    }
}

impl WasmError {
    /// A short name of the kind: "invalid", "no_start", "trap", "exit",
    /// "timeout", "memory" or "output_too_large".
    pub fn kind(&self) -> &'static str {
        match self {
            WasmError::Invalid(_) => "invalid",
            WasmError::NoStart => "no_start",
            WasmError::Trap { .. } => "trap",
            WasmError::Exit { .. } => "exit",
            WasmError::Timeout { .. } => "timeout",
            WasmError::MemoryLimit { .. } => "memory",
            WasmError::OutputTooLarge { .. } => "output_too_large",
        }
    }

    /// What the guest wrote to stderr (lossy UTF-8, its last 4 KiB).
    pub fn stderr(&self) -> &str {
        match self {
            WasmError::Invalid(_) | WasmError::NoStart => "",
            WasmError::Trap { stderr, .. }
            | WasmError::Exit { stderr, .. }
            | WasmError::Timeout { stderr, .. }
            | WasmError::MemoryLimit { stderr, .. }
            | WasmError::OutputTooLarge { stderr, .. } => stderr,
        }
    }

    /// The guest's exit status, for [`WasmError::Exit`].
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            WasmError::Exit { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How a module runs. The limits apply to every call on its own.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// The most linear memory an instance may have (at most
    /// [`MAX_MEMORY_BYTES`]).
    pub memory_limit_bytes: u64,
    /// Wall-clock limit of one call; `None` for none.
    pub time_limit: Option<Duration>,
    /// Arguments after `argv[0]` (which is "module").
    pub args: Vec<String>,
    /// The guest's environment: nothing of the host's is passed on.
    pub env: Vec<(String, String)>,
    /// Host directories preopened read-only at guest paths.
    pub mounts: Vec<(PathBuf, String)>,
    /// The most bytes one call may write to stdout.
    pub max_output: usize,
    /// Where compiled modules are kept across processes; `None` to keep
    /// them in this process only.
    pub cache_dir: Option<PathBuf>,
}

impl Default for WasmConfig {
    fn default() -> Self {
        Self {
            memory_limit_bytes: 256 << 20,
            time_limit: None,
            args: Vec::new(),
            env: Vec::new(),
            mounts: Vec::new(),
            max_output: 64 << 20,
            cache_dir: default_cache_dir(),
        }
    }
}

/// `$XDG_CACHE_HOME/fleetmap/wasm`, else `$HOME/.cache/fleetmap/wasm`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    base.is_absolute().then(|| base.join("fleetmap").join("wasm"))
}

/// The process's engine; the epoch ticker starts with it.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .table_elements(TABLE_ELEMENTS)
            .max_core_instance_size(4 << 20)
            .max_memory_size(MAX_MEMORY_BYTES as usize);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Each slot reserves (not commits) 4 GiB plus guard pages of
            // address space, so bounds checks compile away: 16 slots take
            // about 65 GiB of virtual memory and nothing of RAM until used.
            .memory_reservation(MAX_MEMORY_BYTES)
            .memory_init_cow(true)
            .epoch_interruption(true);
        // The configuration is fixed and valid on every 64-bit Linux host;
        // failing here means the host cannot run wasm at all.
        let engine = Engine::new(&config).expect("fleetmap: cannot configure the wasmtime engine");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("fleetmap-wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            })
            .expect("fleetmap: cannot start the wasm epoch thread");
        engine
    })
}

/// What a store holds: the guest's WASI context and its limits.
struct State {
    wasi: WasiP1Ctx,
    limits: Limits,
}

/// [`StoreLimits`] that remember whether a memory growth was refused, so
/// that a trap after it is reported as running out of memory.
struct Limits {
    inner: StoreLimits,
    memory_refused: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_refused = true;
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The linker with WASI preview 1 (synchronous), shared by all modules.
fn linker() -> Result<&'static Linker<State>, WasmError> {
    static LINKER: OnceLock<Linker<State>> = OnceLock::new();
    if let Some(l) = LINKER.get() {
        return Ok(l);
    }
    let mut linker = Linker::new(engine());
    p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)
        .map_err(|e| WasmError::Invalid(format!("cannot set up WASI: {e:#}")))?;
    Ok(LINKER.get_or_init(|| linker))
}

/// A module compiled and linked, ready to instantiate.
struct Compiled {
    pre: InstancePre<State>,
}

type Digest32 = [u8; 32];

/// Modules compiled in this process, by the SHA-256 of their bytes.
fn compiled_modules() -> &'static Mutex<HashMap<Digest32, Arc<Compiled>>> {
    static MODULES: OnceLock<Mutex<HashMap<Digest32, Arc<Compiled>>>> = OnceLock::new();
    MODULES.get_or_init(Default::default)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A WASI command module, compiled, with the configuration it runs under.
#[derive(Clone)]
pub struct WasmModule {
    compiled: Arc<Compiled>,
    config: WasmConfig,
}

impl std::fmt::Debug for WasmModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmModule")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The output of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmOutput {
    pub stdout: Vec<u8>,
    /// Lossy UTF-8, the last 64 KiB at most.
    pub stderr: String,
}

impl WasmModule {
    /// Compiles `bytes` (a binary module or WAT text) once per process, or
    /// loads it from the node's cache, and checks that it is a WASI command.
    pub fn new(bytes: &[u8], config: WasmConfig) -> Result<WasmModule, WasmError> {
        if config.memory_limit_bytes > MAX_MEMORY_BYTES {
            return Err(WasmError::Invalid(format!(
                "memory limit {} bytes is above the most a 32-bit module can address ({MAX_MEMORY_BYTES} bytes)",
                config.memory_limit_bytes
            )));
        }
        for (host, guest) in &config.mounts {
            if !host.is_dir() {
                return Err(WasmError::Invalid(format!(
                    "mount {} (as {guest}): not a directory on this node",
                    host.display()
                )));
            }
        }
        let compiled = compile(bytes, config.cache_dir.as_deref())?;
        Ok(WasmModule { compiled, config })
    }

    pub fn config(&self) -> &WasmConfig {
        &self.config
    }

    /// Runs the module's `_start` once on `stdin` in a fresh instance and
    /// returns what it wrote to stdout.
    pub fn run(&self, stdin: &[u8]) -> Result<Vec<u8>, WasmError> {
        self.run_with_stderr(stdin).map(|o| o.stdout)
    }

    /// Like [`WasmModule::run`], also returning what it wrote to stderr.
    pub fn run_with_stderr(&self, stdin: &[u8]) -> Result<WasmOutput, WasmError> {
        let config = &self.config;
        let stdout = MemoryOutputPipe::new(config.max_output.saturating_add(1));
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdin(MemoryInputPipe::new(stdin.to_vec()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .arg("module")
            .args(&config.args)
            .envs(&config.env)
            .allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (host, guest) in &config.mounts {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)
                .map_err(|e| WasmError::Trap {
                    message: format!("cannot mount {} as {guest}: {e:#}", host.display()),
                    stderr: String::new(),
                })?;
        }
        let limits = StoreLimitsBuilder::new()
            .memory_size(config.memory_limit_bytes as usize)
            .instances(1)
            .tables(1)
            .memories(1)
            .trap_on_grow_failure(false)
            .build();
        let state = State {
            wasi: wasi.build_p1(),
            limits: Limits {
                inner: limits,
                memory_refused: false,
            },
        };

        let (outcome, memory_refused) = {
            let mut store = Store::try_new(engine(), state).map_err(|e| WasmError::Trap {
                message: format!("cannot create a store: {e:#}"),
                stderr: String::new(),
            })?;
            store.limiter(|s| &mut s.limits);
            // With no limit the deadline is simply out of reach (about 10^8
            // years of 1 ms ticks).
            let ticks = config
                .time_limit
                .map_or(u64::MAX / 4, |t| (t.as_millis() as u64).max(1));
            store.set_epoch_deadline(ticks);
            let outcome = self
                .compiled
                .pre
                .instantiate(&mut store)
                .and_then(|instance| instance.get_typed_func::<(), ()>(&mut store, "_start"))
                .and_then(|start| start.call(&mut store, ()));
            (outcome, store.data().limits.memory_refused)
            // The store, and with it the instance, goes back to the pool here.
        };

        let stderr = lossy(&stderr.contents(), STDERR_CAPTURE);
        let stdout = stdout.try_into_inner().map(Vec::from).unwrap_or_default();
        if stdout.len() > config.max_output {
            return Err(WasmError::OutputTooLarge {
                limit: config.max_output,
                stderr: tail(stderr, STDERR_IN_ERROR),
            });
        }
        let Err(error) = outcome else {
            return Ok(WasmOutput { stdout, stderr });
        };
        if let Some(exit) = error.downcast_ref::<I32Exit>() {
            return match exit.0 {
                0 => Ok(WasmOutput { stdout, stderr }),
                code => Err(WasmError::Exit {
                    code,
                    stderr: tail(stderr, STDERR_IN_ERROR),
                }),
            };
        }
        let stderr = tail(stderr, STDERR_IN_ERROR);
        let trap = error.downcast_ref::<Trap>().copied();
        if trap == Some(Trap::Interrupt) {
            return Err(WasmError::Timeout {
                limit: config.time_limit.unwrap_or(Duration::MAX),
                stderr,
            });
        }
        if memory_refused {
            return Err(WasmError::MemoryLimit {
                limit: config.memory_limit_bytes,
                stderr,
            });
        }
        Err(WasmError::Trap {
            message: describe_trap(&error, trap),
            stderr,
        })
    }
}

/// Checks that `bytes` compile to a WASI command module (and keeps the
/// compiled module for this process).
pub fn validate(bytes: &[u8]) -> Result<(), WasmError> {
    compile(bytes, None).map(|_| ())
}

/// The trap code and where in the guest it happened (up to 16 frames).
fn describe_trap(error: &wasmtime::Error, trap: Option<Trap>) -> String {
    let mut message = match trap {
        Some(t) => t.to_string(),
        None => format!("{:#}", error.root_cause()),
    };
    if let Some(bt) = error.downcast_ref::<WasmBacktrace>() {
        let frames = bt.frames();
        if !frames.is_empty() {
            message.push_str("\nwasm backtrace:");
            for (i, frame) in frames.iter().take(16).enumerate() {
                let name = frame
                    .func_name()
                    .map_or_else(|| format!("<wasm function {}>", frame.func_index()), |n| n.to_string());
                match frame.module_offset() {
                    Some(off) => message.push_str(&format!("\n  {i:>2}: {name} (at 0x{off:x})")),
                    None => message.push_str(&format!("\n  {i:>2}: {name}")),
                }
            }
            if frames.len() > 16 {
                message.push_str(&format!("\n  ... {} more frames", frames.len() - 16));
            }
        }
    }
    message
}

fn lossy(bytes: &[u8], max: usize) -> String {
    tail(String::from_utf8_lossy(bytes).into_owned(), max)
}

/// The last `max` bytes of `s` (on a character boundary), marked as cut.
fn tail(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

/// The process-wide compile step behind [`WasmModule::new`].
fn compile(bytes: &[u8], cache_dir: Option<&Path>) -> Result<Arc<Compiled>, WasmError> {
    let digest: Digest32 = Sha256::digest(bytes).into();
    if let Some(c) = compiled_modules().lock().expect("wasm module cache lock").get(&digest) {
        return Ok(c.clone());
    }
    // Compiled outside the lock: two threads may compile the same module at
    // once, which is harmless, and others are not held up.
    let engine = engine();
    let module = match cache_dir.and_then(|dir| disk_cache::load(engine, dir, &digest)) {
        Some(module) => module,
        None => {
            let module = Module::new(engine, bytes).map_err(|e| WasmError::Invalid(format!("{e:#}")))?;
            if let Some(dir) = cache_dir {
                disk_cache::store(engine, dir, &digest, &module);
            }
            module
        }
    };
    match module.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
        _ => return Err(WasmError::NoStart),
    }
    // WASI passes everything through the guest's memory, which it must
    // export as "memory"; without it every WASI call would trap.
    let uses_wasi = module.imports().any(|i| i.module() == "wasi_snapshot_preview1");
    if uses_wasi && !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(WasmError::Invalid(
            "the module imports WASI functions but exports no memory named \"memory\"".into(),
        ));
    }
    let pre = linker()?.instantiate_pre(&module).map_err(|e| {
        WasmError::Invalid(format!(
            "{e:#} (fleetmap provides WASI preview 1, `wasi_snapshot_preview1`, and nothing else)"
        ))
    })?;
    let compiled = Arc::new(Compiled { pre });
    let mut modules = compiled_modules().lock().expect("wasm module cache lock");
    Ok(modules.entry(digest).or_insert(compiled).clone())
}

/// The node's cache of compiled modules: files `<sha256>-<engine>.cwasm`
/// in a directory that only the current user can use.
mod disk_cache {
    use super::*;

    fn current_uid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    /// A hash of everything that makes an artefact loadable by this
    /// engine: the wasmtime version, the target and the settings.
    fn engine_tag(engine: &Engine) -> String {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    fn path(engine: &Engine, dir: &Path, digest: &Digest32) -> PathBuf {
        dir.join(format!("{}-{}.cwasm", hex(digest), engine_tag(engine)))
    }

    /// Whether `meta` is owned by us and neither group nor others may
    /// touch it.
    fn private(meta: &fs::Metadata) -> bool {
        meta.uid() == current_uid() && meta.mode() & 0o077 == 0
    }

    /// The cache directory, made (0700) if missing, if it is a real
    /// directory that is ours and private.
    fn checked_dir(dir: &Path) -> Option<()> {
        if !dir.exists() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).ok()?;
        }
        // symlink_metadata: the directory itself, not what a link points at.
        let meta = fs::symlink_metadata(dir).ok()?;
        (meta.file_type().is_dir() && private(&meta)).then_some(())
    }

    /// The module compiled earlier on this node, if there is one we trust.
    // unsafe outside `sandbox`, allowed here: loading a precompiled module
    // is wasmtime's own API and cannot move; the SAFETY comment says why
    // this use is sound.
    #[allow(unsafe_code)]
    pub(super) fn load(engine: &Engine, dir: &Path, digest: &Digest32) -> Option<Module> {
        checked_dir(dir)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path(engine, dir, digest))
            .ok()?;
        // Checked on the open file, so it cannot be swapped after the check.
        let meta = file.metadata().ok()?;
        if !meta.file_type().is_file() || !private(&meta) {
            return None;
        }
        // SAFETY: deserializing runs no checks on the machine code inside,
        // so the file must have been written by `Module::serialize` of a
        // compatible engine and not altered since. It is: the file lies in
        // a directory that only this user may write (0700, ours, checked
        // just above, not a link), it is ours and private (0600, checked on
        // the descriptor we read, opened without following links), and the
        // only thing that writes there is `store` below, from a module this
        // process compiled itself. Bytes from the network are never loaded
        // this way: they go through `Module::new`, which validates and
        // compiles them. wasmtime also checks the artefact's header against
        // this engine's version and settings and refuses a mismatch.
        unsafe { Module::deserialize_open_file(engine, file) }.ok()
    }

    /// Keeps `module` for the next process on this node (best effort).
    pub(super) fn store(engine: &Engine, dir: &Path, digest: &Digest32, module: &Module) {
        let _ = try_store(engine, dir, digest, module);
    }

    fn try_store(engine: &Engine, dir: &Path, digest: &Digest32, module: &Module) -> Option<()> {
        checked_dir(dir)?;
        let bytes = module.serialize().ok()?;
        let target = path(engine, dir, digest);
        let tmp = dir.join(format!(".{}-{}.tmp", hex(digest), std::process::id()));
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            // The umask cannot widen 0600, but make sure of the mode anyway.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &target)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.ok()
    }

    #[cfg(test)]
    pub(super) fn artefact(dir: &Path, bytes: &[u8]) -> PathBuf {
        let digest: Digest32 = Sha256::digest(bytes).into();
        path(engine(), dir, &digest)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn config() -> WasmConfig {
        WasmConfig {
            memory_limit_bytes: 64 << 20,
            time_limit: Some(Duration::from_secs(10)),
            max_output: 1 << 20,
            cache_dir: None,
            ..WasmConfig::default()
        }
    }

    fn module(wat: &str) -> WasmModule {
        WasmModule::new(wat.as_bytes(), config()).unwrap()
    }

    /// Reads all of stdin into memory at 1024 (fd_read until it returns 0
    /// bytes), reverses it, writes it to stdout.
    pub(super) const REVERSER: &str = r#"
    (module
      (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (func (export "_start")
        (local $len i32) (local $n i32) (local $i i32) (local $j i32) (local $t i32)
        (block $done
          (loop $read
            ;; iovec at 0: buf = 1024 + len, buf_len = 65536 - len
            (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
            (i32.store (i32.const 4) (i32.sub (i32.const 65536) (local.get $len)))
            (br_if $done (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
            (local.set $n (i32.load (i32.const 8)))
            (br_if $done (i32.eqz (local.get $n)))
            (local.set $len (i32.add (local.get $len) (local.get $n)))
            (br $read)))
        ;; reverse [1024, 1024 + len)
        (local.set $i (i32.const 1024))
        (local.set $j (i32.add (i32.const 1023) (local.get $len)))
        (block $rev_done
          (loop $rev
            (br_if $rev_done (i32.ge_s (local.get $i) (local.get $j)))
            (local.set $t (i32.load8_u (local.get $i)))
            (i32.store8 (local.get $i) (i32.load8_u (local.get $j)))
            (i32.store8 (local.get $j) (local.get $t))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (local.set $j (i32.sub (local.get $j) (i32.const 1)))
            (br $rev)))
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (local.get $len))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
    "#;

    #[test]
    fn reverses_its_input() {
        let m = module(REVERSER);
        assert_eq!(m.run(b"abc").unwrap(), b"cba");
        assert_eq!(m.run(b"").unwrap(), b"");
        let long: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut want = long.clone();
        want.reverse();
        assert_eq!(m.run(&long).unwrap(), want);
    }

    #[test]
    fn modules_are_compiled_once_per_process() {
        let a = module(REVERSER);
        let b = WasmModule::new(
            REVERSER.as_bytes(),
            WasmConfig {
                max_output: 10,
                ..config()
            },
        )
        .unwrap();
        assert!(Arc::ptr_eq(&a.compiled, &b.compiled));
        // The configuration stays each module's own.
        assert_eq!(a.run(b"hello world, hello").unwrap(), b"olleh ,dlrow olleh");
        assert!(matches!(
            b.run(b"hello world, hello"),
            Err(WasmError::OutputTooLarge { limit: 10, .. })
        ));
        assert_eq!(b.run(b"0123456789").unwrap(), b"9876543210");
    }

    #[test]
    fn a_trap_is_reported_with_its_code_and_place() {
        let m = module(
            r#"(module
                 (func $inner unreachable)
                 (func (export "_start") call $inner))"#,
        );
        let e = m.run(b"").unwrap_err();
        let WasmError::Trap { message, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(message.contains("unreachable"), "{message}");
        assert!(message.contains("inner"), "{message}");
        assert_eq!(e.kind(), "trap");
    }

    #[test]
    fn an_endless_loop_is_stopped_at_the_time_limit() {
        let m = WasmModule::new(
            br#"(module (func (export "_start") (loop $l (br $l))))"#,
            WasmConfig {
                time_limit: Some(Duration::from_millis(50)),
                ..config()
            },
        )
        .unwrap();
        let start = Instant::now();
        let e = m.run(b"").unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, WasmError::Timeout { .. }), "{e:?}");
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn memory_growth_past_the_limit_is_a_memory_error() {
        // Grows 1 MiB at a time until memory.grow returns -1, then traps.
        let m = module(
            r#"(module
                 (memory 1)
                 (func (export "_start")
                   (loop $grow
                     (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
                   unreachable))"#,
        );
        let e = m.run(b"").unwrap_err();
        assert!(
            matches!(e, WasmError::MemoryLimit { limit, .. } if limit == 64 << 20),
            "{e:?}"
        );
        assert_eq!(e.kind(), "memory");
        // A memory that starts above the limit fails too.
        let big = module(r#"(module (memory 2000) (func (export "_start")))"#);
        assert!(matches!(big.run(b""), Err(WasmError::MemoryLimit { .. })));
    }

    #[test]
    fn an_exit_status_comes_back_with_stderr() {
        let m = module(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
                 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (memory (export "memory") 1)
                 (data (i32.const 100) "something went wrong\n")
                 (func (export "_start")
                   (i32.store (i32.const 0) (i32.const 100))
                   (i32.store (i32.const 4) (i32.const 21))
                   (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
                   (call $exit (i32.const 3))))"#,
        );
        let e = m.run(b"").unwrap_err();
        let WasmError::Exit { code, stderr } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*code, 3);
        assert!(stderr.contains("something went wrong"), "{stderr:?}");
        assert_eq!(e.exit_code(), Some(3));
        assert!(e.to_string().contains("something went wrong"));
    }

    #[test]
    fn exit_zero_is_success() {
        let m = module(
            r#"(module
                 (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                 (memory (export "memory") 1)
                 (func (export "_start") (call $exit (i32.const 0)) unreachable))"#,
        );
        assert_eq!(m.run(b"x").unwrap(), b"");
    }

    #[test]
    fn invalid_bytes_are_invalid() {
        let e = WasmModule::new(b"\0asm\x01\0\0\0garbage", config()).unwrap_err();
        assert!(matches!(e, WasmError::Invalid(_)), "{e:?}");
        let e = WasmModule::new(b"(module (func (export \"_start\") i32.add))", config()).unwrap_err();
        assert!(matches!(e, WasmError::Invalid(_)), "{e:?}");
        assert!(matches!(validate(b"not wasm"), Err(WasmError::Invalid(_))));
        // Imports other than WASI preview 1 cannot be satisfied.
        let e = WasmModule::new(
            br#"(module (import "env" "f" (func)) (func (export "_start")))"#,
            config(),
        )
        .unwrap_err();
        assert!(matches!(&e, WasmError::Invalid(m) if m.contains("env")), "{e:?}");
        // WASI needs the guest's memory exported.
        let e = WasmModule::new(
            br#"(module
                  (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                  (memory 1)
                  (func (export "_start")))"#,
            config(),
        )
        .unwrap_err();
        assert!(matches!(&e, WasmError::Invalid(m) if m.contains("memory")), "{e:?}");
    }

    #[test]
    fn a_module_without_start_is_refused() {
        let e = WasmModule::new(br#"(module (func (export "main")))"#, config()).unwrap_err();
        assert!(matches!(e, WasmError::NoStart), "{e:?}");
        let e = WasmModule::new(br#"(module (func (export "_start") (param i32)))"#, config()).unwrap_err();
        assert!(matches!(e, WasmError::NoStart), "{e:?}");
        assert!(matches!(validate(br#"(module)"#), Err(WasmError::NoStart)));
    }

    #[test]
    fn calls_share_no_state() {
        // Increments a global and a memory cell, prints both as digits.
        let m = module(
            r#"(module
                 (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
                 (memory (export "memory") 1)
                 (global $g (mut i32) (i32.const 0))
                 (data (i32.const 200) "\00")
                 (func (export "_start")
                   (global.set $g (i32.add (global.get $g) (i32.const 1)))
                   (i32.store8 (i32.const 200) (i32.add (i32.load8_u (i32.const 200)) (i32.const 1)))
                   (i32.store8 (i32.const 100) (i32.add (i32.const 48) (global.get $g)))
                   (i32.store8 (i32.const 101) (i32.add (i32.const 48) (i32.load8_u (i32.const 200))))
                   (i32.store (i32.const 0) (i32.const 100))
                   (i32.store (i32.const 4) (i32.const 2))
                   (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
        );
        for _ in 0..3 {
            assert_eq!(m.run(b"").unwrap(), b"11");
        }
    }

    #[test]
    fn args_and_env_reach_the_guest_and_nothing_else() {
        // Writes the args_sizes_get and environ_sizes_get counts as digits.
        let wat = r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "args_sizes_get" (func $args (param i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env (param i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start")
               (drop (call $args (i32.const 16) (i32.const 20)))
               (drop (call $env (i32.const 24) (i32.const 28)))
               (i32.store8 (i32.const 100) (i32.add (i32.const 48) (i32.load (i32.const 16))))
               (i32.store8 (i32.const 101) (i32.add (i32.const 48) (i32.load (i32.const 24))))
               (i32.store (i32.const 0) (i32.const 100))
               (i32.store (i32.const 4) (i32.const 2))
               (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;
        assert_eq!(module(wat).run(b"").unwrap(), b"10");
        let m = WasmModule::new(
            wat.as_bytes(),
            WasmConfig {
                args: vec!["a".into(), "b".into()],
                env: vec![("K".into(), "V".into())],
                ..config()
            },
        )
        .unwrap();
        assert_eq!(m.run(b"").unwrap(), b"31");
    }

    #[test]
    fn bad_limits_and_mounts_are_refused_up_front() {
        let e = WasmModule::new(
            REVERSER.as_bytes(),
            WasmConfig {
                memory_limit_bytes: 5 << 30,
                ..config()
            },
        )
        .unwrap_err();
        assert!(matches!(e, WasmError::Invalid(_)));
        let e = WasmModule::new(
            REVERSER.as_bytes(),
            WasmConfig {
                mounts: vec![("/no/such/dir/anywhere".into(), "/data".into())],
                ..config()
            },
        )
        .unwrap_err();
        assert!(matches!(e, WasmError::Invalid(_)));
    }

    #[test]
    fn stderr_in_errors_is_cut_to_its_tail() {
        let s = "é".repeat(3000);
        let t = tail(s, STDERR_IN_ERROR);
        assert!(t.len() <= STDERR_IN_ERROR + 3 + 1 && t.starts_with("..."));
        assert_eq!(tail("short".into(), 10), "short");
    }

    #[test]
    fn the_disk_cache_is_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let cache = dir.join("wasm");
        // A module not yet in this process's cache (a unique no-op).
        let wat = format!(
            r#"(module (func (export "_start")) (func (export "pid_{}")))"#,
            std::process::id()
        );
        WasmModule::new(
            wat.as_bytes(),
            WasmConfig {
                cache_dir: Some(cache.clone()),
                ..config()
            },
        )
        .unwrap();
        let file = disk_cache::artefact(&cache, wat.as_bytes());
        let dir_mode = fs::metadata(&cache).unwrap().mode() & 0o777;
        let file_mode = fs::metadata(&file).unwrap().mode() & 0o777;
        assert_eq!((dir_mode, file_mode), (0o700, 0o600));
        let digest: Digest32 = Sha256::digest(wat.as_bytes()).into();
        assert!(disk_cache::load(engine(), &cache, &digest).is_some());
        // Once others can write the file, it is not trusted.
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(disk_cache::load(engine(), &cache, &digest).is_none());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(disk_cache::load(engine(), &cache, &digest).is_none());
    }
}
