//! One slot: a worker process in its own cgroup, fed chunk after chunk.
//!
//! When a call kills its worker (out of memory, a signal, `os._exit`), the
//! slot rebuilds the worker and runs the chunk again *isolated*: the worker
//! announces each input before calling the function, so the next death
//! names its input. That input is then failed with what happened (limit,
//! peak, signal, node) and the rest of the chunk runs on, so every input
//! still yields exactly one outcome and the job decides whether to stop.

use std::{collections::VecDeque, os::fd::AsRawFd, path::Path, sync::Arc, time::Duration};

use fleetmap_net::{write_frames, FramedReader};
use fleetmap_protocol::{
    worker::{CrashKind, CrashedInput, FromWorker, ToWorker, WorkerSettings},
    InputChunk, InputIndex, JobId, JobSpec, LogLine, NodeToCoordinator, OutputChunk, OutputStream, RuntimeSpec, SlotId,
};
use fleetmap_sandbox::{
    cgroup::{CgroupTree, GpuAccess, SlotCgroup, SlotLimits},
    spawn_worker, WorkerCommand,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{inventory::Placement, NodeConfig};

/// The longest line of a call's output forwarded as one line; longer lines
/// are split.
const MAX_LOG_LINE: usize = 64 << 10;

pub(crate) struct SlotContext {
    pub job: JobId,
    pub slot: SlotId,
    pub spec: Arc<JobSpec>,
    pub config: Arc<NodeConfig>,
    pub cgroups: Option<Arc<CgroupTree>>,
    pub placement: Placement,
    pub up: mpsc::UnboundedSender<NodeToCoordinator>,
}

pub(crate) async fn run_slot(ctx: SlotContext, chunks: mpsc::UnboundedReceiver<InputChunk>) {
    if let Err(reason) = drive_slot(&ctx, chunks).await {
        let _ = ctx.up.send(NodeToCoordinator::SlotFailed {
            job: ctx.job,
            slot: ctx.slot,
            reason,
        });
    }
}

/// A chunk the slot holds, with what earlier deaths taught about it.
struct Pending {
    chunk: InputChunk,
    isolated: bool,
    crashed: Vec<CrashedInput>,
    started: Option<InputIndex>,
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

/// How a worker died.
struct Death {
    kind: CrashKind,
    /// "exceeded func_ram=1 GiB (peak 1.02 GiB) on node n and was killed
    /// by the out-of-memory killer; ..." without the input.
    what: String,
}

async fn drive_slot(ctx: &SlotContext, mut chunks: mpsc::UnboundedReceiver<InputChunk>) -> Result<(), String> {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut worker = WorkerProcess::start(ctx).await?;
    loop {
        tokio::select! {
            chunk = chunks.recv() => {
                // None: the job stopped; dropping the worker kills it.
                let Some(chunk) = chunk else { return Ok(()) };
                let p = Pending { chunk, isolated: false, crashed: vec![], started: None };
                worker.send(p.request());
                pending.push_back(p);
            }
            read = worker.stdout.read_some(), if worker.stdout.open => worker.stdout.forward(read, ctx),
            read = worker.stderr.read_some(), if worker.stderr.open => worker.stderr.forward(read, ctx),
            reply = worker.reader.recv::<FromWorker>() => match reply {
                Ok(Some(FromWorker::Started { input })) => {
                    if let Some(front) = pending.front_mut() {
                        front.started = Some(input);
                    }
                }
                Ok(Some(FromWorker::Done { chunk, failed, payload })) => {
                    // Lines the calls printed reach the client before their
                    // outputs (and so before the job can end).
                    worker.stdout.drain_written(ctx).await;
                    worker.stderr.drain_written(ctx).await;
                    let Some(p) = pending.pop_front().filter(|p| p.chunk.chunk == chunk) else {
                        return Err(format!(
                            "the worker (pid {}) on node {} answered for chunk {chunk}, which it was not running",
                            worker.pid, ctx.config.name
                        ));
                    };
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
                    drop(worker);
                    if let Some(front) = pending.front_mut() {
                        learn_from_death(front, death, ctx)?;
                    }
                    worker = WorkerProcess::start(ctx).await?;
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
struct WorkerProcess {
    pid: u32,
    reader: FramedReader<OwnedReadHalf>,
    to_worker: mpsc::UnboundedSender<ToWorker>,
    writer: JoinHandle<Result<(), fleetmap_net::NetError>>,
    stdout: LineForwarder<tokio::process::ChildStdout>,
    stderr: LineForwarder<tokio::process::ChildStderr>,
    // Dropped in this order: the process group first, then its cgroup.
    process: fleetmap_sandbox::Worker,
    cgroup: Option<SlotCgroup>,
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.writer.abort();
        self.process.kill();
    }
}

impl WorkerProcess {
    /// Starts a worker in a fresh cgroup and loads the job's function.
    async fn start(ctx: &SlotContext) -> Result<Self, String> {
        let node = &ctx.config.name;
        let cgroup = match &ctx.cgroups {
            Some(tree) => Some(
                tree.create_slot(&format!("job{}-slot{}", ctx.job, ctx.slot), &slot_limits(ctx))
                    .map_err(|e| format!("could not create the cgroup of slot {} on node {node}: {e}", ctx.slot))?,
            ),
            None => None,
        };
        let mut cmd = worker_command(ctx);
        if let Some(cg) = &cgroup {
            cmd.cgroup_procs = cg
                .procs_files()
                .map_err(|e| format!("could not enter the cgroup of slot {} on node {node}: {e}", ctx.slot))?;
        }
        let mut process = spawn_worker(&cmd)
            .map_err(|e| format!("could not start a worker for slot {} on node {node}: {e}", ctx.slot))?;
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
        let (to_worker, rx) = mpsc::unbounded_channel();
        let mut worker = WorkerProcess {
            pid: process.pid,
            reader: FramedReader::new(rd, ctx.config.max_message),
            writer: tokio::spawn(write_frames(wr, rx, ctx.config.max_message)),
            to_worker,
            stdout,
            stderr,
            process,
            cgroup,
        };
        let RuntimeSpec::Python { function, version, .. } = &ctx.spec.runtime;
        worker.send(ToWorker::Load {
            function: function.clone(),
            settings: WorkerSettings {
                node: ctx.config.name.clone(),
                caller_python: version.clone(),
                memory_limit_bytes: ctx.spec.call.memory_bytes,
                // Room for the envelope around the pickled outputs.
                max_output_bytes: ctx.config.max_message.saturating_sub(64 << 10) as u64,
            },
        });
        loop {
            tokio::select! {
                read = worker.stdout.read_some(), if worker.stdout.open => worker.stdout.forward(read, ctx),
                read = worker.stderr.read_some(), if worker.stderr.open => worker.stderr.forward(read, ctx),
                reply = worker.reader.recv::<FromWorker>() => return match reply {
                    Ok(Some(FromWorker::Ready { .. })) => Ok(worker),
                    Ok(Some(FromWorker::LoadFailed { error })) => {
                        Err(format!("the function could not be loaded on node {node}: {error}"))
                    }
                    other => {
                        let death = worker.death(ctx).await;
                        let detail = match other {
                            Err(e) => format!(" ({e})"),
                            _ => String::new(),
                        };
                        Err(format!("the worker of slot {} {} while loading the function{detail}", ctx.slot, death.what))
                    }
                },
            }
        }
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
        // Device rules only where the node has GPUs: a slot then sees
        // exactly its own (and none when it asked for none).
        gpus: (!ctx.config.resources.gpus.is_empty()).then(|| GpuAccess {
            allowed_minors: ctx.placement.gpus.iter().map(|g| g.minor).collect(),
        }),
    }
}

fn worker_command(ctx: &SlotContext) -> WorkerCommand {
    let RuntimeSpec::Python { executable, .. } = &ctx.spec.runtime;
    // The caller's own interpreter when this node has it (the embedded
    // cluster, a shared file system), else the node's.
    let program = if Path::new(executable).is_file() {
        executable.clone()
    } else {
        ctx.config.python.clone()
    };
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
    let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = vec![
        ("PYTHONUNBUFFERED".into(), "1".into()),
        // For the user's code and operators' tools (as Slurm's
        // SLURMD_NODENAME); the worker itself reads no settings from its
        // environment: they come in its first message.
        ("FLEETMAP_NODE".into(), ctx.config.name.clone().into()),
        ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
        ("CUDA_VISIBLE_DEVICES".into(), visible.clone().into()),
        ("NVIDIA_VISIBLE_DEVICES".into(), visible.into()),
    ];
    if !ctx.placement.cpus.is_empty() {
        let cpus = ctx.placement.cpus.len().to_string();
        // Thread pools (OpenMP, BLAS) size themselves to the slot's cores.
        env.push(("OMP_NUM_THREADS".into(), cpus.into()));
    }
    WorkerCommand {
        program: program.clone().into(),
        // The worker's settings come in its first message; its channel is
        // fd WORKER_CHANNEL_FD by the sandbox's contract.
        args: vec!["-m".into(), "fleetmap._worker".into()],
        env,
        cgroup_procs: vec![],
        cpu_affinity: ctx.placement.cpus.clone(),
        run_as: ctx.config.run_as,
        // An interpreter that lives under /tmp (a checkout or virtualenv
        // there) would vanish behind the worker's own /tmp: share it then.
        private_tmp: ctx.config.private_tmp && ctx.cgroups.is_some() && !program.starts_with("/tmp/"),
    }
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
        let _ = ctx.up.send(NodeToCoordinator::Log(LogLine {
            job: ctx.job,
            stream: self.stream,
            node: ctx.config.name.clone(),
            text: String::from_utf8_lossy(line).into_owned(),
        }));
    }
}
