//! One slot: a worker process in its own cgroup, fed chunk after chunk.
//!
//! When a call kills its worker (out of memory, a signal, `os._exit`), the
//! slot rebuilds the worker and runs the chunk again *isolated*: the worker
//! announces each input before calling the function, so the next death
//! names its input. That input is then failed with what happened (limit,
//! peak, signal, node) and the rest of the chunk runs on, so every input
//! still yields exactly one outcome and the job decides whether to stop.

use std::{
    collections::VecDeque,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use fleetmap_net::{write_frames, FramedReader};
use fleetmap_protocol::{
    worker::{CrashKind, CrashedInput, FromWorker, ToWorker, WorkerSettings},
    FailureKind, InputChunk, InputIndex, JobId, JobSpec, LogLine, NodeToCoordinator, OutputChunk, OutputStream,
    RuntimeSpec, SlotId,
};
use fleetmap_sandbox::{
    cgroup::{CgroupTree, GpuAccess, SlotCgroup, SlotLimits},
    image_root::{Bind, ImageRoot, RUNTIME_MOUNT},
    spawn_worker, WorkerCommand,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    environments::{Environments, Lease},
    images::{Held, Images},
    inventory::Placement,
    pool::{Warm, WorkerKey, WorkerPool},
    NodeConfig,
};

/// The node's warm workers.
pub(crate) type Pool = WorkerPool<WorkerProcess>;

/// The longest line of a call's output forwarded as one line; longer lines
/// are split.
const MAX_LOG_LINE: usize = 64 << 10;

/// The printed output one job may send from a node by default (64 MiB).
pub const DEFAULT_PRINTED_LIMIT: u64 = 64 << 20;

/// Printed lines waiting to go to the coordinator above which more are
/// dropped (the coordinator, or the caller behind it, reads too slowly).
const PRINTED_BACKLOG: usize = 16 << 20;

/// What one job's calls on this node have printed, shared by its slots:
/// the bytes sent against [`NodeConfig::printed_limit_bytes`], and the
/// lines dropped since the caller was last told.
#[derive(Default)]
pub(crate) struct Printed {
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl Printed {
    /// Whether a line of `bytes` may go, counting it either way.
    fn admit(&self, bytes: usize, limit: u64, backlog: usize) -> bool {
        let sent = self.sent.load(Ordering::Relaxed);
        if sent + bytes as u64 > limit || backlog > PRINTED_BACKLOG {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        true
    }

    /// Tells the caller how many lines were dropped since it was last told
    /// (before the chunk's outcome, so it reads in order).
    fn report_dropped(&self, ctx: &SlotContext) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return;
        }
        let limit = ctx.config.printed_limit_bytes;
        let text = if self.sent.load(Ordering::Relaxed) >= limit.saturating_sub(MAX_LOG_LINE as u64) {
            format!(
                "[fleetmap] {dropped} lines printed by this job on node {} were dropped: over the node's \
                 limit of {} MiB of printed output per job. Write large output to files or return it",
                ctx.config.name,
                limit >> 20
            )
        } else {
            format!(
                "[fleetmap] {dropped} lines printed by this job on node {} were dropped: they were printed \
                 faster than the fleet could carry them to the caller",
                ctx.config.name
            )
        };
        let _ = ctx.up.send(NodeToCoordinator::Log(LogLine {
            job: ctx.job,
            stream: OutputStream::Stderr,
            node: ctx.config.name.clone(),
            text,
        }));
    }
}

pub(crate) struct SlotContext {
    pub job: JobId,
    pub slot: SlotId,
    pub spec: Arc<JobSpec>,
    pub config: Arc<NodeConfig>,
    pub cgroups: Option<Arc<CgroupTree>>,
    pub placement: Placement,
    pub up: fleetmap_net::Outbox<NodeToCoordinator>,
    pub pool: Arc<Pool>,
    /// Replaces the workers started ahead of jobs that jobs take.
    pub prestarter: Arc<Prestarter>,
    pub environments: Arc<Environments>,
    /// The interpreter the slot's workers run: [`default_program`], or the
    /// job's environment once prepared.
    pub program: String,
    /// The slot's hold on its environment (workers keep one too).
    pub lease: Option<Lease>,
    /// The job's source bundle on this node.
    pub sources: Option<String>,
    pub images: Arc<Images>,
    /// The job's image on this node, once prepared.
    pub image: Option<SlotImage>,
    /// What the job's calls on this node have printed.
    pub printed: Arc<Printed>,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
}

/// What a slot's workers need to run in the job's image.
pub(crate) struct SlotImage {
    held: Held,
    /// fleetmap's runtime on this node, bound into the image.
    runtime: std::path::PathBuf,
    /// The job's `packages=` installed for the image, bound into it.
    packages: Option<std::path::PathBuf>,
}

/// Runs a slot until its chunk channel closes. A channel closed with no
/// chunk in the slot means the job finished (a cancelled job's slot task is
/// aborted instead): its healthy worker goes back to the pool, warm.
pub(crate) async fn run_slot(mut ctx: SlotContext, chunks: mpsc::UnboundedReceiver<InputChunk>) {
    let outcome = match prepare_slot(&mut ctx).await {
        Ok(()) => drive_slot(&ctx, chunks)
            .await
            .map_err(|reason| (FailureKind::Job, reason)),
        Err(failure) => Err(failure),
    };
    match outcome {
        Ok(Some(mut warm)) => {
            // Off the runtime's threads: reading the worker's cgroup (and
            // killing and removing it, if it may not serve again) would
            // otherwise hold up what the job's end sets going elsewhere,
            // its caller's last output first of all, on a node that shares
            // the caller's process.
            let pool = ctx.pool.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if warm.worker.healthy() {
                    pool.give_back(warm, Instant::now());
                }
            })
            .await;
        }
        Ok(None) => {}
        Err((kind, reason)) => {
            let _ = ctx.up.send(NodeToCoordinator::SlotFailed {
                job: ctx.job,
                slot: ctx.slot,
                kind,
                reason,
            });
        }
    }
}

/// What the slot needs before it takes a worker: the job's source bundle
/// stored on this node, and its environment.
async fn prepare_slot(ctx: &mut SlotContext) -> Result<(), (FailureKind, String)> {
    let RuntimeSpec::Python { sources, .. } = &ctx.spec.runtime;
    if let Some(bundle) = sources {
        let path = ctx.environments.sources(bundle).map_err(|r| (FailureKind::Job, r))?;
        ctx.sources = Some(path.display().to_string());
    }
    prepare_image(ctx).await?;
    prepare_environment(ctx)
        .await
        .map_err(|reason| (FailureKind::Environment, reason))
}

/// Tells the job's caller, on its stderr, what the node is doing for the
/// job (an install or a pull takes seconds to minutes).
fn say_to_caller(ctx: &SlotContext) -> impl Fn(String) + Send + Sync {
    let (up, job, node) = (ctx.up.clone(), ctx.job, ctx.config.name.clone());
    move |text: String| {
        let _ = up.send(NodeToCoordinator::Log(LogLine {
            job,
            stream: OutputStream::Stderr,
            node: node.clone(),
            text,
        }));
    }
}

/// Pulls (or finds) the job's image and makes its interpreter the slot's
/// program, after checking that it is the caller's Python; installs the
/// job's `packages=` for it (an install failure is an environment's).
async fn prepare_image(ctx: &mut SlotContext) -> Result<(), (FailureKind, String)> {
    let image_error = |reason: String| (FailureKind::Image, reason);
    let RuntimeSpec::Python {
        image: Some(reference),
        version,
        environment,
        ..
    } = &ctx.spec.runtime
    else {
        return Ok(());
    };
    let node = &ctx.config.name;
    let held = ctx
        .images
        .prepare(ctx.job, reference, &say_to_caller(ctx))
        .await
        .map_err(image_error)?;
    let image = &held.image;
    if &image.python_version != version {
        return Err(image_error(format!(
            "image {reference} has Python {} ({}), and the caller runs Python {version}: functions and \
             values travel with cloudpickle, which needs the same minor version on both ends; use an image \
             with Python {version}",
            image.python_version, image.python
        )));
    }
    let runtime = match ctx.environments.runtime_dir().await {
        Ok(Some(dir)) => dir,
        Ok(None) => {
            return Err(image_error(format!(
                "node {node} cannot run image {reference}: it was started without fleetmap's runtime \
                 packages to bind into images"
            )))
        }
        Err(e) => return Err(image_error(e)),
    };
    // The slot and its warm workers hold the image and its packages.
    let mut lease = held.lease.clone();
    let mut packages = None;
    if let Some(spec) = environment {
        let (site, held_packages) = ctx
            .environments
            .prepare_for_image(spec, image, &say_to_caller(ctx))
            .await
            .map_err(|reason| (FailureKind::Environment, reason))?;
        packages = Some(site);
        lease = lease.and(held_packages);
    }
    ctx.program = image.python.clone();
    ctx.lease = Some(lease);
    ctx.image = Some(SlotImage {
        held,
        runtime,
        packages,
    });
    Ok(())
}

/// Builds (or finds) the job's environment and makes its interpreter the
/// slot's program. The caller hears what is being installed. A job in an
/// image has its packages installed for the image instead
/// ([`prepare_image`]).
async fn prepare_environment(ctx: &mut SlotContext) -> Result<(), String> {
    if ctx.image.is_some() {
        return Ok(());
    }
    let RuntimeSpec::Python {
        environment: Some(spec),
        executable,
        version,
        ..
    } = &ctx.spec.runtime
    else {
        return Ok(());
    };
    let say = say_to_caller(ctx);
    let prepared = ctx.environments.prepare(spec, executable, version, &say).await?;
    ctx.program = prepared.program;
    ctx.lease = Some(prepared.lease);
    Ok(())
}

/// Starts workers ahead of any job until the pool holds as many as the
/// policy asks (at most one per core): the node's interpreter, every core,
/// no memory limit yet and no GPU, until a job takes one and its cgroup is
/// rewritten for that job.
/// Starts one process the way every worker starts (its cgroup, its user,
/// its namespaces and mounts) and waits for it to run the interpreter: a
/// node that cannot confine calls as it is configured to finds out before
/// it joins, not at its first job.
pub(crate) async fn probe_confinement(
    config: &NodeConfig,
    cgroups: Option<&CgroupTree>,
    cpus: &[u32],
) -> Result<(), String> {
    let (limits, cmd) = unassigned_start(config, cgroups, cpus, &["-c", "pass"]);
    let mut probe = WorkerProcess::spawn_with(config, cgroups, &limits, cmd)?;
    let status = tokio::time::timeout(Duration::from_secs(60), probe.process.child.wait())
        .await
        .map_err(|_| format!("{} -c pass did not end within 60 s in a slot", config.python))?
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "{} -c pass {} in a slot",
            config.python,
            fleetmap_sandbox::describe_exit(status)
        ));
    }
    probe.shut_down().await;
    Ok(())
}

/// The limits and command of a process started on the node's interpreter
/// with `args` before any job has it (a worker started ahead, the
/// confinement probe): the node's cores, no memory limit yet, device rules
/// from the start (no block device, no GPU until a job asks).
fn unassigned_start(
    config: &NodeConfig,
    cgroups: Option<&CgroupTree>,
    cpus: &[u32],
    args: &[&str],
) -> (SlotLimits, WorkerCommand) {
    let limits = SlotLimits {
        cpus: cpus.to_vec(),
        mems: None,
        memory_bytes: u64::MAX,
        pids_max: config.pids_per_slot,
        gpus: Some(GpuAccess { allowed_minors: vec![] }),
    };
    let cmd = WorkerCommand {
        program: config.python.clone().into(),
        args: args.iter().map(Into::into).collect(),
        env: base_environment(config),
        cgroup_procs: vec![],
        cpu_affinity: cpus.to_vec(),
        run_as: config.run_as,
        private_tmp: private_tmp(config, cgroups.is_some(), &config.python),
        image: None,
        own_namespaces: false,
    };
    (limits, cmd)
}

pub(crate) fn prestart(config: &NodeConfig, cgroups: Option<&CgroupTree>, cpus: &[u32], pool: &Pool) {
    let wanted = pool.policy().prestart.min(cpus.len());
    prestart_n(config, cgroups, cpus, pool, wanted.saturating_sub(pool.pristine()));
}

fn prestart_n(config: &NodeConfig, cgroups: Option<&CgroupTree>, cpus: &[u32], pool: &Pool, n: usize) {
    for _ in 0..n {
        let (limits, cmd) = unassigned_start(config, cgroups, cpus, &["-m", "fleetmap._worker"]);
        match WorkerProcess::spawn_with(config, cgroups, &limits, cmd) {
            Ok(worker) => pool.give_back(
                Warm {
                    key: WorkerKey {
                        principal: None,
                        program: config.python.clone(),
                        environment: None,
                        caller_python: String::new(),
                        gpus: vec![],
                    },
                    born: Instant::now(),
                    jobs_served: 0,
                    worker,
                },
                Instant::now(),
            ),
            Err(e) => {
                tracing::warn!("node {}: could not start a worker ahead of jobs: {e}", config.name);
                return;
            }
        }
    }
}

/// Starts the workers that replace those started ahead of jobs, on a
/// thread of its own: starting one forks the daemon, which takes
/// milliseconds for a large process, and on the runtime's threads that
/// would hold up the node's messages (and, in the embedded cluster, every
/// message of the caller's process) just as a job starts. The thread lives
/// as long as the node, as it must: a worker dies with the thread that
/// started it (`PR_SET_PDEATHSIG`).
pub(crate) struct Prestarter {
    wake: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Prestarter {
    /// Starts the thread; it uses the current tokio runtime.
    pub fn start(
        config: Arc<NodeConfig>,
        cgroups: Option<Arc<CgroupTree>>,
        cpus: Vec<u32>,
        pool: Arc<Pool>,
    ) -> std::io::Result<Self> {
        let (wake, asked) = std::sync::mpsc::channel::<()>();
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name("fleetmap-prestart".into())
            .spawn(move || {
                // Worker pipes and channels register with the runtime.
                let _runtime = runtime.enter();
                // Ends when the node stops its Prestarter. A panic must not
                // end it: the workers it started would die with it.
                while asked.recv().is_ok() {
                    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        prestart_one(&config, cgroups.as_deref(), &cpus, &pool);
                    }));
                    if started.is_err() {
                        tracing::error!("node {}: starting a worker ahead of jobs panicked", config.name);
                    }
                }
            })?;
        Ok(Self {
            wake: std::sync::Mutex::new(Some(wake)),
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Asks for one more worker ahead of jobs, if the pool lacks one.
    pub fn replace_one(&self) {
        if let Ok(wake) = self.wake.lock() {
            if let Some(wake) = wake.as_ref() {
                let _ = wake.send(());
            }
        }
    }

    /// Ends the thread once it has started what it was asked for (the node
    /// is stopping: no worker may start after its pool is emptied).
    pub async fn stop(&self) {
        if let Ok(mut wake) = self.wake.lock() {
            wake.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts one worker ahead of any job if the pool holds fewer than the
/// policy asks: each one taken by a job is replaced by one.
fn prestart_one(config: &NodeConfig, cgroups: Option<&CgroupTree>, cpus: &[u32], pool: &Pool) {
    if pool.pristine() < pool.policy().prestart.min(cpus.len()) {
        prestart_n(config, cgroups, cpus, pool, 1);
    }
}

/// The key of the workers that may serve this slot's job.
fn worker_key(ctx: &SlotContext) -> WorkerKey {
    let RuntimeSpec::Python {
        version, environment, ..
    } = &ctx.spec.runtime;
    WorkerKey {
        principal: Some(ctx.spec.principal.clone()),
        // Workers in an image serve only jobs with the same image.
        program: match &ctx.image {
            Some(image) => format!("{} {}", image.held.image.digest, ctx.program),
            None => ctx.program.clone(),
        },
        environment: environment.as_ref().map(|e| e.id.clone()),
        caller_python: version.clone(),
        gpus: ctx.placement.gpus.iter().map(|g| g.minor).collect(),
    }
}

/// A chunk the slot holds, with what earlier deaths taught about it.
struct Pending {
    chunk: InputChunk,
    isolated: bool,
    crashed: Vec<CrashedInput>,
    started: Option<InputIndex>,
    /// When the worker was sent it.
    sent: Instant,
}

impl Pending {
    fn request(&self) -> ToWorker {
        ToWorker::Run {
            chunk: self.chunk.clone(),
            isolated: self.isolated,
            crashed: self.crashed.clone(),
        }
    }
}

/// Where a slot's worker came from, and whether it has loaded the job's
/// function yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loading {
    /// Taken from the pool; its `Ready` has not come yet. If it dies
    /// first, it died of something older than this job (a warm worker
    /// killed while it waited): a fresh one takes its place.
    Warm,
    /// Started for this slot; its `Ready` has not come yet. If it dies
    /// first, the function (or the node) kills workers: the slot fails.
    Fresh,
    /// Taken from the pool with this job's function already loaded, so
    /// sent none. Until it first answers for a chunk, a death is one of its
    /// time in the pool (the host's OOM killer picking an idle worker, say),
    /// as for `Warm`.
    Assumed,
    /// It answered `Ready`, or for a chunk: a death now is a death of the
    /// calls it runs.
    Loaded,
}

impl Loading {
    /// Whether the worker's answer to a `Load` is still to come.
    fn awaits_ready(self) -> bool {
        matches!(self, Loading::Warm | Loading::Fresh)
    }
}

/// How a worker died.
struct Death {
    kind: CrashKind,
    /// "exceeded func_ram=1 GiB (peak 1.02 GiB) on node n and was killed
    /// by the out-of-memory killer; ..." without the input.
    what: String,
}

async fn drive_slot(
    ctx: &SlotContext,
    mut chunks: mpsc::UnboundedReceiver<InputChunk>,
) -> Result<Option<Warm<WorkerProcess>>, String> {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut last_done = Instant::now();
    // The function is sent and the chunks follow it at once, without
    // waiting for the worker's `Ready`: a job's first call waits for one
    // exchange with the worker, not two.
    let (mut warm, mut loading) = WorkerProcess::acquire(ctx)?;
    let mut worker = &mut warm.worker;
    loop {
        tokio::select! {
            chunk = chunks.recv() => {
                // None: the job ended. An idle worker may stay warm; one
                // holding chunks, or whose answer to this job's `Load` is
                // still on its way (a slot that got no chunk), is dropped,
                // which kills it: the next job would read that answer as
                // its own.
                let Some(chunk) = chunk else {
                    return Ok((pending.is_empty() && !loading.awaits_ready()).then_some(warm));
                };
                let p = Pending { chunk, isolated: false, crashed: vec![], started: None, sent: Instant::now() };
                worker.send(p.request());
                pending.push_back(p);
            }
            read = worker.stdout.read_some(), if worker.stdout.open => worker.stdout.forward(read, ctx),
            read = worker.stderr.read_some(), if worker.stderr.open => worker.stderr.forward(read, ctx),
            reply = worker.reader.recv::<FromWorker>() => match reply {
                Ok(Some(FromWorker::Ready { .. })) if loading.awaits_ready() => {
                    loading = Loading::Loaded;
                    last_done = Instant::now();
                }
                Ok(Some(FromWorker::LoadFailed { error })) if loading.awaits_ready() => {
                    return Err(format!("the function could not be loaded on node {}: {error}", ctx.config.name));
                }
                Ok(Some(FromWorker::Started { input })) if !loading.awaits_ready() => {
                    loading = Loading::Loaded;
                    if let Some(front) = pending.front_mut() {
                        front.started = Some(input);
                    }
                }
                Ok(Some(FromWorker::Done { chunk, failed, payload })) if !loading.awaits_ready() => {
                    loading = Loading::Loaded;
                    // Lines the calls printed reach the client before their
                    // outputs (and so before the job can end).
                    worker.stdout.drain_written(ctx).await;
                    worker.stderr.drain_written(ctx).await;
                    ctx.printed.report_dropped(ctx);
                    let Some(p) = pending.pop_front().filter(|p| p.chunk.chunk == chunk) else {
                        return Err(format!(
                            "the worker (pid {}) on node {} answered for chunk {chunk}, which it was not running",
                            worker.pid, ctx.config.name
                        ));
                    };
                    // The chunk ran from when the one before it was done
                    // (or from when it was sent, if later).
                    let now = Instant::now();
                    ctx.metrics.chunk_done(p.chunk.count, now.duration_since(p.sent.max(last_done)).as_secs_f64());
                    last_done = now;
                    let output = OutputChunk {
                        chunk,
                        first_input: p.chunk.first_input,
                        count: p.chunk.count,
                        failed,
                        node: ctx.config.name.clone(),
                        payload,
                    };
                    let _ = ctx.up.send(NodeToCoordinator::ChunkDone { job: ctx.job, slot: ctx.slot, output });
                }
                Ok(Some(other)) => {
                    return Err(format!(
                        "the worker (pid {}) on node {} sent an unexpected {other:?}",
                        worker.pid, ctx.config.name
                    ));
                }
                Ok(None) | Err(_) => {
                    let death = worker.death(ctx).await;
                    ctx.metrics.worker_died(death.kind);
                    match loading {
                        Loading::Loaded => {
                            if let Some(front) = pending.front_mut() {
                                learn_from_death(front, death, ctx)?;
                            }
                        }
                        // A warm worker that died before it loaded this
                        // job's function, or before it answered for any of
                        // its chunks, says nothing of the job.
                        Loading::Warm | Loading::Assumed => {}
                        Loading::Fresh => {
                            let detail = match reply {
                                Err(e) => format!(" ({e})"),
                                _ => String::new(),
                            };
                            return Err(format!(
                                "the worker of slot {} {} while loading the function{detail}",
                                ctx.slot, death.what
                            ));
                        }
                    }
                    // The dead worker is replaced (the assignment drops and
                    // kills what is left of it); never one from the pool:
                    // a warm worker that died in the pool says nothing of
                    // this job, but the next one should start clean too.
                    warm = WorkerProcess::start_fresh(ctx)?;
                    loading = Loading::Fresh;
                    worker = &mut warm.worker;
                    for p in &pending {
                        worker.send(p.request());
                    }
                }
            },
        }
    }
}

/// Updates what the slot knows about the chunk its worker died on: the
/// first death switches the chunk to an isolated run; in an isolated run
/// (or a chunk of one input) the input that had started is the culprit.
fn learn_from_death(front: &mut Pending, death: Death, ctx: &SlotContext) -> Result<(), String> {
    let culprit = match (front.chunk.count, front.isolated, front.started) {
        (1, _, _) => Some(front.chunk.first_input),
        (_, true, Some(input)) => Some(input),
        (_, true, None) => {
            // The worker died before any call of the chunk started: loading
            // the inputs or pickling the outputs killed it.
            return Err(format!(
                "the worker of slot {} {} while handling inputs {}..{}, outside any one call",
                ctx.slot,
                death.what,
                front.chunk.first_input,
                front.chunk.first_input.offset(front.chunk.count as u64 - 1)
            ));
        }
        (_, false, _) => None,
    };
    front.isolated = true;
    front.started = None;
    if let Some(input) = culprit {
        if front.crashed.iter().any(|c| c.input == input) {
            return Err(format!("input {input} {} again after it was set aside", death.what));
        }
        front.crashed.push(CrashedInput {
            input,
            kind: death.kind,
            message: format!("input {input} {}", death.what),
        });
    }
    Ok(())
}

/// A running worker: the process, its cgroup, its channel and its pipes.
pub(crate) struct WorkerProcess {
    pid: u32,
    /// The cores it was last pinned to (empty: unknown).
    pinned: Vec<u32>,
    /// The memory its cgroup held when its last job ended.
    memory_at_rest: Option<u64>,
    /// The SHA-256 of the function it was last sent, and the settings sent
    /// with it.
    loaded: Option<([u8; 32], WorkerSettings)>,
    /// How many processes it is while it runs nothing else (its PID
    /// namespace's keeper and init besides the interpreter, where it has
    /// one).
    own_processes: usize,
    reader: FramedReader<OwnedReadHalf>,
    to_worker: fleetmap_net::Outbox<ToWorker>,
    writer: JoinHandle<Result<(), fleetmap_net::NetError>>,
    stdout: LineForwarder<tokio::process::ChildStdout>,
    stderr: LineForwarder<tokio::process::ChildStderr>,
    // Dropped in this order: the process group first, then its cgroup.
    process: fleetmap_sandbox::Worker,
    cgroup: Option<SlotCgroup>,
    /// Its job's environment stays on the node while the worker lives.
    lease: Option<Lease>,
    /// Its own uid (`--slot-uids`), held until it is gone (dropped last).
    _uid: Option<crate::uids::UidLease>,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.writer.abort();
        self.process.kill();
    }
}

impl WorkerProcess {
    /// Kills the worker's process group and reaps the worker, so that its
    /// cgroup is empty at once (an unreaped worker would hold it until the
    /// runtime got round to it).
    pub(crate) async fn shut_down(mut self) {
        self.process.kill();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.process.child.wait()).await;
    }

    /// A worker for the slot, the job's function sent to it: a warm one
    /// from the pool if one has the job's key and fits its limits, else a
    /// fresh one.
    fn acquire(ctx: &SlotContext) -> Result<(Warm<Self>, Loading), String> {
        let key = worker_key(ctx);
        // A few tries at most: every worker started ahead that is taken is
        // replaced, so an endless run of failures must not become an
        // endless run of new workers.
        for _ in 0..3 {
            let Some(mut warm) = ctx.pool.take(&key, Instant::now()) else {
                break;
            };
            if warm.key.principal.is_none() {
                // One started ahead is taken: start the next one.
                ctx.prestarter.replace_one();
            }
            // A worker that cannot be given the job's limits, or that died
            // while it waited, is dropped (killed) and the next one tried.
            if warm.worker.reassign(ctx).is_err() {
                continue;
            }
            let sent = warm.worker.load(ctx);
            warm.key = key;
            warm.jobs_served += 1;
            return Ok((warm, if sent { Loading::Warm } else { Loading::Assumed }));
        }
        Ok((Self::start_fresh(ctx)?, Loading::Fresh))
    }

    /// Starts a worker in a fresh cgroup and sends it the job's function.
    fn start_fresh(ctx: &SlotContext) -> Result<Warm<Self>, String> {
        let mut worker = Self::spawn(ctx)?;
        worker.load(ctx);
        Ok(Warm {
            key: worker_key(ctx),
            born: Instant::now(),
            jobs_served: 1,
            worker,
        })
    }

    /// Gives a warm worker the slot's cores and memory limit before any of
    /// the job's code runs: its cgroup is rewritten, and every thread is
    /// pinned to the slot's cores.
    fn reassign(&mut self, ctx: &SlotContext) -> Result<(), String> {
        // One that died while it waited (and was reaped) is not taken.
        if !matches!(self.process.child.try_wait(), Ok(None)) {
            return Err("exited while it waited".into());
        }
        if let (Some(tree), Some(cg)) = (&ctx.cgroups, &mut self.cgroup) {
            // As it was when its last job ended (an idle worker runs
            // nothing), else as it is now.
            let used = self.memory_at_rest.take().or_else(|| cg.memory_current());
            if used.unwrap_or(0) > ctx.spec.call.memory_bytes {
                return Err("uses more memory than the job's limit".into());
            }
            tree.reassign_slot(cg, &slot_limits(ctx)).map_err(|e| e.to_string())?;
        }
        // The cpuset first, then the threads: the kernel keeps the affinity
        // a worker was started with (intersected with its cpuset), so a
        // worker moved to more or other cores must be pinned again.
        let cpus = &ctx.placement.cpus;
        if cpus.is_empty() {
            return Ok(());
        }
        let pids = match &self.cgroup {
            // The interpreter is not the process the daemon started.
            Some(cg) if self.own_processes > 1 => cg.members(),
            _ => vec![self.pid],
        };
        // The same cores as its last job's, and no call narrowed them
        // since: nothing to do. Only the processes' main threads are
        // looked at, which the cpuset makes enough: whatever another
        // thread did to its own affinity, it runs within the slot's cores.
        // Without a cpuset every thread is pinned again.
        if ctx.cgroups.is_some()
            && self.pinned == *cpus
            && !pids.is_empty()
            && pids.iter().all(|&pid| fleetmap_sandbox::pinned_to(pid, cpus))
        {
            return Ok(());
        }
        self.pinned.clear();
        for pid in pids {
            fleetmap_sandbox::pin_process(pid, cpus).map_err(|e| e.to_string())?;
        }
        self.pinned.clone_from(cpus);
        Ok(())
    }

    /// Whether the worker may serve another job: alive, never touched by
    /// the OOM killer, and alone: a process the job started and left
    /// running (in its cgroup, or in its process group where there are no
    /// cgroups) would otherwise live on into the next job.
    fn healthy(&mut self) -> bool {
        if !matches!(self.process.child.try_wait(), Ok(None)) {
            return false;
        }
        match &self.cgroup {
            Some(cg) => {
                let pids = cg.members();
                // Read here, when its job has ended, rather than on the
                // next job's way in.
                self.memory_at_rest = cg.memory_current();
                cg.oom_kills() == 0 && pids.len() == self.own_processes && pids.contains(&self.pid)
            }
            None => fleetmap_sandbox::process_group_members(self.pid) == [self.pid],
        }
    }

    /// Starts a worker process for the slot in a fresh cgroup.
    fn spawn(ctx: &SlotContext) -> Result<Self, String> {
        Self::spawn_with(
            &ctx.config,
            ctx.cgroups.as_deref(),
            &slot_limits(ctx),
            worker_command(ctx),
        )
        .map_err(|e| format!("could not start a worker for slot {}: {e}", ctx.slot))
    }

    /// Starts `cmd` in a fresh cgroup with `limits`.
    fn spawn_with(
        config: &NodeConfig,
        cgroups: Option<&CgroupTree>,
        limits: &SlotLimits,
        mut cmd: WorkerCommand,
    ) -> Result<Self, String> {
        // Worker cgroups are named by the daemon's process id and a counter:
        // a warm worker keeps its cgroup from job to job, and a restarted
        // daemon's cgroups are never mistaken for its predecessor's.
        static NEXT_WORKER: AtomicU64 = AtomicU64::new(0);
        let node = &config.name;
        let cgroup = match cgroups {
            Some(tree) => Some(
                tree.create_slot(
                    &format!(
                        "worker{}-{}",
                        std::process::id(),
                        NEXT_WORKER.fetch_add(1, Ordering::Relaxed)
                    ),
                    limits,
                )
                .map_err(|e| format!("could not create its cgroup on node {node}: {e}"))?,
            ),
            None => None,
        };
        if let Some(cg) = &cgroup {
            cmd.cgroup_procs = cg
                .procs_files()
                .map_err(|e| format!("could not enter its cgroup on node {node}: {e}"))?;
        }
        let uid = match &config.slot_uids {
            Some(pool) => {
                let lease = pool.take().ok_or_else(|| {
                    format!(
                        "no uid left for another worker on node {node}: every uid of its --slot-uids range ({}-{}) \
                         is taken; give it a larger range",
                        pool.range().start(),
                        pool.range().end()
                    )
                })?;
                cmd.run_as = Some((lease.uid, lease.uid));
                Some(lease)
            }
            None => None,
        };
        // Namespaces of its own where the daemon confines calls and manages
        // their cgroups (which needs root, as namespaces do).
        cmd.own_namespaces = config.own_namespaces && cgroup.is_some();
        let own_processes = if cmd.own_namespaces {
            fleetmap_sandbox::CONFINED_WORKER_PROCESSES
        } else {
            1
        };
        let mut process = spawn_worker(&cmd).map_err(|e| format!("on node {node}: {e}"))?;
        // spawn_worker fills all three; take each once.
        let stdout = LineForwarder::new(
            process.stdout.take().expect("stdout of a new worker"),
            OutputStream::Stdout,
        );
        let stderr = LineForwarder::new(
            process.stderr.take().expect("stderr of a new worker"),
            OutputStream::Stderr,
        );
        let (rd, wr): (OwnedReadHalf, OwnedWriteHalf) =
            process.channel.take().expect("channel of a new worker").into_split();
        let (to_worker, rx) = fleetmap_net::outbox();
        let worker = WorkerProcess {
            pid: process.pid,
            pinned: cmd.cpu_affinity.clone(),
            memory_at_rest: None,
            loaded: None,
            own_processes,
            reader: FramedReader::new(rd, config.max_message),
            writer: tokio::spawn(write_frames(wr, rx, config.max_message)),
            to_worker,
            stdout,
            stderr,
            process,
            cgroup,
            lease: None,
            _uid: uid,
        };
        Ok(worker)
    }

    /// Sends the job's function and settings; the worker answers `Ready`
    /// or `LoadFailed` before anything else (read by the slot's loop). The
    /// worker holds the job's environment lease from now on. Returns
    /// whether anything was sent: a warm worker whose last load was this
    /// same function with these same settings (its caller's next job of
    /// the same function) has them already, and is sent nothing.
    fn load(&mut self, ctx: &SlotContext) -> bool {
        let RuntimeSpec::Python { function, version, .. } = &ctx.spec.runtime;
        self.lease = ctx.lease.clone();
        let settings = WorkerSettings {
            node: ctx.config.name.clone(),
            caller_python: version.clone(),
            memory_limit_bytes: ctx.spec.call.memory_bytes,
            // Room for the envelope around the pickled outputs.
            max_output_bytes: ctx.config.max_message.saturating_sub(64 << 10) as u64,
            environment: job_environment(ctx).into_iter().chain(fleet_credentials(ctx)).collect(),
            sources: match (&ctx.image, &ctx.sources) {
                (Some(_), Some(path)) => Path::new(path)
                    .file_name()
                    .map(|name| format!("{RUNTIME_MOUNT}/sources/{}", name.to_string_lossy())),
                _ => ctx.sources.clone(),
            },
        };
        let digest: [u8; 32] = Sha256::digest(function).into();
        if self.loaded.as_ref() == Some(&(digest, settings.clone())) {
            return false;
        }
        // A worker that fails to load is never sent another job, so what
        // it was sent is what it has once it answers `Ready`.
        self.loaded = Some((digest, settings.clone()));
        self.send(ToWorker::Load {
            function: function.clone(),
            settings,
        });
        true
    }

    fn send(&self, request: ToWorker) {
        let _ = self.to_worker.send(request);
    }

    /// Why the worker's channel closed: out of memory (the cgroup's OOM
    /// counter moved), else its exit status or signal.
    async fn death(&mut self, ctx: &SlotContext) -> Death {
        let status = tokio::time::timeout(Duration::from_secs(2), self.process.child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        let node = &ctx.config.name;
        if let Some(cg) = self.cgroup.as_ref().filter(|cg| cg.oom_kills() > 0) {
            let peak = cg
                .peak_memory()
                .map(|p| format!(" (peak {})", gib(p)))
                .unwrap_or_default();
            return Death {
                kind: CrashKind::OutOfMemory,
                what: format!(
                    "exceeded func_ram={}{peak} on node {node} and was killed by the out-of-memory killer; \
                     raise func_ram or use less memory per call",
                    gib(ctx.spec.call.memory_bytes)
                ),
            };
        }
        let how = status.map_or_else(|| "stopped answering".to_string(), fleetmap_sandbox::describe_exit);
        Death {
            kind: CrashKind::Died,
            what: format!("killed its worker on node {node}: the worker (pid {}) {how}", self.pid),
        }
    }
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if (g - g.round()).abs() < 0.005 {
        format!("{} GiB", g.round())
    } else {
        format!("{g:.2} GiB")
    }
}

fn slot_limits(ctx: &SlotContext) -> SlotLimits {
    SlotLimits {
        cpus: ctx.placement.cpus.clone(),
        mems: None,
        memory_bytes: ctx.spec.call.memory_bytes,
        pids_max: ctx.config.pids_per_slot,
        // Device rules for every slot, GPU or not: the pseudo-devices
        // every program expects and exactly its own GPUs; no block device.
        gpus: Some(GpuAccess {
            allowed_minors: ctx.placement.gpus.iter().map(|g| g.minor).collect(),
        }),
    }
}

/// The interpreter a job without an environment runs: the caller's own
/// when this node has it (the embedded cluster), else the node's.
pub(crate) fn default_program(spec: &JobSpec, config: &NodeConfig) -> String {
    let RuntimeSpec::Python { executable, .. } = &spec.runtime;
    if Path::new(executable).is_file() {
        executable.clone()
    } else {
        config.python.clone()
    }
}

/// The environment variables that depend on the slot's job: its GPUs and
/// its cores. A fresh worker starts with them; a warm one gets them with
/// the job's function, before any of the job's code runs.
fn job_environment(ctx: &SlotContext) -> Vec<(String, String)> {
    // CUDA numbers devices in its own order; UUIDs (or PCI order) name
    // exactly the slot's GPUs.
    let visible = ctx
        .placement
        .gpus
        .iter()
        .map(|g| {
            if g.uuid.is_empty() {
                g.minor.to_string()
            } else {
                g.uuid.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let mut env = vec![
        ("CUDA_DEVICE_ORDER".to_string(), "PCI_BUS_ID".to_string()),
        ("CUDA_VISIBLE_DEVICES".to_string(), visible.clone()),
        ("NVIDIA_VISIBLE_DEVICES".to_string(), visible),
    ];
    if !ctx.placement.cpus.is_empty() {
        // Thread pools (OpenMP, BLAS) size themselves to the slot's cores.
        env.push(("OMP_NUM_THREADS".to_string(), ctx.placement.cpus.len().to_string()));
    }
    env
}

/// The job's credential for jobs of its own calls submit (the
/// coordinator's address and CA, the job's key and id). It goes to the
/// worker only in its `Load` message, never in the environment it is
/// started with: `/proc/PID/environ` shows that to every process of the
/// same user, other slots' calls included.
fn fleet_credentials(ctx: &SlotContext) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if ctx.config.fleet_access && !ctx.spec.job_key.is_empty() {
        env.extend([
            ("FLEETMAP_COORDINATOR".to_string(), ctx.config.coordinator.clone()),
            (
                "FLEETMAP_CA_PEM".to_string(),
                String::from_utf8_lossy(&ctx.config.ca_pem).into_owned(),
            ),
            ("FLEETMAP_API_KEY".to_string(), ctx.spec.job_key.clone()),
            ("FLEETMAP_JOB".to_string(), ctx.job.0.to_string()),
        ]);
    }
    env
}

/// The daemon's environment variables every worker gets (the rest, its
/// join token included, stay with the daemon; an operator adds more with
/// `--pass-env`).
const WORKER_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TERM",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
];

/// The environment every worker starts with, whatever its job: the
/// allowlisted variables of the daemon's own (all of them for the embedded
/// cluster, whose calls are the caller's), and fleetmap's.
fn base_environment(config: &NodeConfig) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    daemon_variables(config, |k| config.inherit_environment || WORKER_VARIABLES.contains(&k))
}

/// The daemon's variables that `keep` names or the operator passes
/// (`--pass-env`), then fleetmap's own.
fn daemon_variables(config: &NodeConfig, keep: impl Fn(&str) -> bool) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
        .filter(|(key, _)| {
            key.to_str()
                .is_some_and(|k| keep(k) || config.pass_env.iter().any(|p| p == k))
        })
        .collect();
    env.push(("PYTHONUNBUFFERED".into(), "1".into()));
    // For the user's code and operators' tools (as Slurm's
    // SLURMD_NODENAME); the worker itself reads no settings from its
    // environment: they come in its first message.
    env.push(("FLEETMAP_NODE".into(), config.name.clone().into()));
    env
}

fn worker_command(ctx: &SlotContext) -> WorkerCommand {
    if let Some(image) = &ctx.image {
        return image_worker_command(ctx, image);
    }
    let program = ctx.program.clone();
    let mut env = base_environment(&ctx.config);
    env.extend(job_environment(ctx).into_iter().map(|(k, v)| (k.into(), v.into())));
    WorkerCommand {
        program: program.clone().into(),
        // The worker's settings come in its first message; its channel is
        // fd WORKER_CHANNEL_FD by the sandbox's contract.
        args: vec!["-m".into(), "fleetmap._worker".into()],
        env,
        cgroup_procs: vec![],
        cpu_affinity: ctx.placement.cpus.clone(),
        run_as: ctx.config.run_as,
        private_tmp: private_tmp(&ctx.config, ctx.cgroups.is_some(), &program),
        image: None,
        own_namespaces: false,
    }
}

/// A worker in the job's image: the image's interpreter and `Env`,
/// fleetmap's runtime and the job's sources bound in read-only, and for a
/// GPU slot its devices and the host's driver libraries.
fn image_worker_command(ctx: &SlotContext, slot_image: &SlotImage) -> WorkerCommand {
    let image = &slot_image.held.image;
    let mut binds = vec![Bind {
        source: slot_image.runtime.clone(),
        target: format!("{RUNTIME_MOUNT}/runtime").into(),
    }];
    if let Some(site) = &slot_image.packages {
        binds.push(Bind {
            source: site.clone(),
            target: format!("{RUNTIME_MOUNT}/packages").into(),
        });
    }
    if let Some(dir) = ctx.sources.as_deref().and_then(|s| Path::new(s).parent()) {
        binds.push(Bind {
            source: dir.to_path_buf(),
            target: format!("{RUNTIME_MOUNT}/sources").into(),
        });
    }
    let mut devices = vec![];
    let mut driver = false;
    if !ctx.placement.gpus.is_empty() {
        devices.extend(
            ctx.placement
                .gpus
                .iter()
                .map(|g| format!("/dev/nvidia{}", g.minor).into()),
        );
        for name in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"] {
            let path = Path::new("/dev").join(name);
            if path.exists() {
                devices.push(path);
            }
        }
        for (name, source) in crate::images::driver_libraries() {
            driver = true;
            binds.push(Bind {
                source: source.clone(),
                target: format!("{RUNTIME_MOUNT}/driver/{name}").into(),
            });
        }
    }
    // The image's environment, then fleetmap's: the runtime first on the
    // path (its cloudpickle is the caller's version), the driver first for
    // the loader.
    let mut env: Vec<(String, String)> = image.env.clone();
    let mut prepend = |key: &str, value: String| match env.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) if !old.is_empty() => *old = format!("{value}:{old}"),
        Some((_, old)) => *old = value,
        None => env.push((key.to_string(), value)),
    };
    if slot_image.packages.is_some() {
        prepend("PYTHONPATH", format!("{RUNTIME_MOUNT}/packages"));
    }
    prepend("PYTHONPATH", format!("{RUNTIME_MOUNT}/runtime"));
    if driver {
        prepend("LD_LIBRARY_PATH", format!("{RUNTIME_MOUNT}/driver"));
    }
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> =
        env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
    // None of the host's own (its PATH means nothing in the image), but
    // what the operator passes.
    env.extend(daemon_variables(&ctx.config, |_| false));
    env.extend(job_environment(ctx).into_iter().map(|(k, v)| (k.into(), v.into())));
    WorkerCommand {
        program: image.python.clone().into(),
        args: vec!["-m".into(), "fleetmap._worker".into()],
        env,
        cgroup_procs: vec![],
        cpu_affinity: ctx.placement.cpus.clone(),
        run_as: ctx.config.run_as,
        private_tmp: true,
        image: Some(ImageRoot {
            rootfs: image.rootfs(),
            scratch: image.scratch(),
            binds,
            devices,
            workdir: image.workdir.clone().into(),
            rootless: !nix::unistd::geteuid().is_root(),
        }),
        own_namespaces: false,
    }
}

/// Whether a worker gets a /tmp of its own. An interpreter, environment or
/// source bundle that lives under /tmp (a checkout, a virtualenv or a cache
/// there) would vanish behind the worker's own /tmp: it shares it then.
fn private_tmp(config: &NodeConfig, pinned: bool, program: &str) -> bool {
    config.private_tmp && pinned && !program.starts_with("/tmp/") && !config.environments.cache_dir.starts_with("/tmp")
}

/// Forwards what a worker prints, line by line, to the job's client. Lines
/// longer than [`MAX_LOG_LINE`] are split; invalid UTF-8 is replaced.
struct LineForwarder<R> {
    pipe: R,
    stream: OutputStream,
    pending: Vec<u8>,
    buf: Box<[u8]>,
    open: bool,
}

impl<R: AsyncRead + AsRawFd + Unpin> LineForwarder<R> {
    fn new(pipe: R, stream: OutputStream) -> Self {
        Self {
            pipe,
            stream,
            pending: Vec::new(),
            buf: vec![0; 16 << 10].into_boxed_slice(),
            open: true,
        }
    }

    /// Reads what the worker wrote next (cancel-safe: a read either
    /// completes or takes nothing).
    async fn read_some(&mut self) -> std::io::Result<usize> {
        self.pipe.read(&mut self.buf).await
    }

    fn forward(&mut self, read: std::io::Result<usize>, ctx: &SlotContext) {
        match read {
            Ok(0) | Err(_) => {
                self.open = false;
                if !self.pending.is_empty() {
                    let rest = std::mem::take(&mut self.pending);
                    self.send(&rest, ctx);
                }
            }
            Ok(n) => {
                self.pending.extend_from_slice(&self.buf[..n]);
                self.send_complete_lines(ctx);
            }
        }
    }

    /// Forwards everything the worker has written so far: exactly the bytes
    /// waiting in the pipe now, so that lines printed before an event are
    /// sent before it.
    async fn drain_written(&mut self, ctx: &SlotContext) {
        let mut left = fleetmap_sandbox::readable_bytes(&self.pipe).unwrap_or(0);
        while left > 0 && self.open {
            let want = left.min(self.buf.len());
            let read = self.pipe.read(&mut self.buf[..want]).await;
            if let Ok(n) = read {
                left = left.saturating_sub(n);
            }
            self.forward(read, ctx);
        }
    }

    fn send_complete_lines(&mut self, ctx: &SlotContext) {
        let mut start = 0;
        while let Some(pos) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let line = self.pending[start..start + pos].to_vec();
            self.send(&line, ctx);
            start += pos + 1;
        }
        self.pending.drain(..start);
        while self.pending.len() >= MAX_LOG_LINE {
            let head: Vec<u8> = self.pending.drain(..MAX_LOG_LINE).collect();
            self.send(&head, ctx);
        }
    }

    fn send(&self, line: &[u8], ctx: &SlotContext) {
        if !ctx
            .printed
            .admit(line.len(), ctx.config.printed_limit_bytes, ctx.up.queued_bytes())
        {
            return;
        }
        let _ = ctx.up.send(NodeToCoordinator::Log(LogLine {
            job: ctx.job,
            stream: self.stream,
            node: ctx.config.name.clone(),
            text: String::from_utf8_lossy(line).into_owned(),
        }));
    }
}

#[cfg(test)]
mod printed_tests {
    use super::*;

    #[test]
    fn printed_lines_stop_at_the_job_limit_and_when_the_coordinator_falls_behind() {
        let printed = Printed::default();
        assert!(printed.admit(600, 1000, 0));
        assert!(!printed.admit(600, 1000, 0), "over the job's limit");
        assert!(printed.admit(400, 1000, 0), "exactly up to the limit");
        let fresh = Printed::default();
        assert!(!fresh.admit(10, 1000, PRINTED_BACKLOG + 1), "the coordinator is behind");
        assert_eq!(printed.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(fresh.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(printed.sent.load(Ordering::Relaxed), 1000);
    }
}
