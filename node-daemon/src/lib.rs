//! fleetmap's node daemon: joins the coordinator, advertises the node's
//! cores, memory and GPUs, and runs slots. A slot is one worker process
//! started through [`fleetmap_sandbox::spawn_worker`]; it loads the job's
//! function once and then runs chunk after chunk of inputs until the job
//! stops, when the worker is killed.
//!
//! The daemon survives anything its peers send: a malformed frame from the
//! coordinator closes that connection and the daemon reconnects; garbage
//! from a worker fails that slot with a message. Only a refused join token
//! stops it, because retrying cannot help.
//!
//! This crate must not depend on pyo3 or `runtime`: the daemon never runs
//! user code in its own process.

use std::{collections::HashMap, net::SocketAddr, os::fd::AsRawFd, path::Path, sync::Arc, time::Duration};

use fleetmap_net::{write_frames, FramedReader, NetError};
use fleetmap_protocol::{
    worker::{FromWorker, ToWorker},
    ChunkId, Hello, InputChunk, JobId, JobSpec, LogLine, Message, OutputChunk, OutputStream, Resources, Role,
    RuntimeSpec, SlotId, DEFAULT_MAX_FRAME, SOFTWARE_VERSION,
};
use fleetmap_sandbox::{spawn_worker, WorkerCommand};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{info, warn};

/// The longest line of a call's output forwarded as one line; longer lines
/// are split.
const MAX_LOG_LINE: usize = 64 << 10;

/// How to run a node daemon.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    pub ca_pem: Vec<u8>,
    pub token: String,
    pub name: String,
    pub resources: Resources,
    /// The Python interpreter for jobs whose caller's interpreter does not
    /// exist on this node.
    pub python: String,
    pub max_frame: usize,
}

impl NodeConfig {
    pub fn new(coordinator: String, ca_pem: Vec<u8>, token: String) -> Self {
        Self {
            coordinator,
            ca_pem,
            token,
            name: default_name(),
            resources: detect_resources(),
            python: "python3".into(),
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    #[error("cannot resolve coordinator address {addr:?}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("protocol violation by the coordinator: {0}")]
    Protocol(String),
}

impl From<quinn::ConnectionError> for NodeError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == 1u32.into() => {
                NodeError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            other => NodeError::Net(other.into()),
        }
    }
}

/// This machine's host name.
pub fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// The cores and memory of this machine (GPU discovery is separate).
pub fn detect_resources() -> Resources {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(1 << 30);
    Resources {
        cores,
        memory_bytes,
        gpus: vec![],
    }
}

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, NodeError> {
    let err = |reason: String| NodeError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))
}

/// Runs the daemon: joins the coordinator and serves it, reconnecting with
/// backoff whenever the connection is lost. Returns only when the
/// coordinator refuses the node.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&config, &mut backoff).await {
            Err(NodeError::Refused(reason)) => return Err(NodeError::Refused(reason)),
            Err(e) => warn!("node {}: connection to {} ended: {e}", config.name, config.coordinator),
            Ok(()) => info!("node {}: coordinator closed the connection", config.name),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The slots of one job on this node.
#[derive(Default)]
struct JobSlots {
    chunks: HashMap<SlotId, mpsc::UnboundedSender<InputChunk>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for JobSlots {
    fn drop(&mut self) {
        // Aborting a slot task drops its worker, which kills the worker's
        // process group.
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn session(config: &Arc<NodeConfig>, backoff: &mut Duration) -> Result<(), NodeError> {
    let addr = resolve(&config.coordinator).await?;
    let endpoint = fleetmap_net::client_endpoint(&config.ca_pem, addr)?;
    let conn = endpoint
        .connect(addr, fleetmap_net::SERVER_NAME)
        .map_err(NetError::from)?
        .await?;
    let (send, recv) = conn.open_bi().await?;
    let (up, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(send, rx, config.max_frame));
    let _ = up.send(Message::Hello(Hello {
        role: Role::Node {
            token: config.token.clone(),
            name: config.name.clone(),
            resources: config.resources.clone(),
        },
        software_version: SOFTWARE_VERSION.into(),
    }));
    let mut reader = FramedReader::new(recv, config.max_frame);
    let first = reader.recv::<Message>().await;
    match first {
        Ok(Some(Message::Welcome { .. })) => {}
        Ok(Some(Message::Refused { reason })) => return Err(NodeError::Refused(reason)),
        Ok(other) => return Err(NodeError::Protocol(format!("expected Welcome, got {other:?}"))),
        Err(e) => {
            // A refusal arrives as the connection's close reason.
            if let Some(closed) = conn.close_reason() {
                return Err(closed.into());
            }
            let reason = format!("bad handshake from the coordinator: {e}");
            conn.close(2u32.into(), reason.as_bytes());
            return Err(NodeError::Protocol(reason));
        }
    }
    info!("node {} joined the coordinator at {addr}", config.name);
    *backoff = Duration::from_millis(100);
    let mut jobs: HashMap<JobId, JobSlots> = HashMap::new();
    let result = loop {
        let msg = match reader.recv::<Message>().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break Ok(()),
            Err(NetError::Decode(e)) => {
                let reason = format!("malformed frame from the coordinator: {e}");
                conn.close(2u32.into(), reason.as_bytes());
                break Err(NodeError::Protocol(reason));
            }
            Err(e) => break Err(e.into()),
        };
        match msg {
            Message::StartSlots { job, spec, slots } => {
                let spec = Arc::new(spec);
                let entry = jobs.entry(job).or_default();
                for slot in slots {
                    let (tx, rx) = mpsc::unbounded_channel();
                    entry.chunks.insert(slot, tx);
                    let ctx = SlotContext {
                        job,
                        slot,
                        spec: spec.clone(),
                        config: config.clone(),
                        up: up.clone(),
                    };
                    entry.tasks.push(tokio::spawn(run_slot(ctx, rx)));
                }
            }
            Message::RunChunk { job, slot, chunk } => {
                if let Some(tx) = jobs.get(&job).and_then(|j| j.chunks.get(&slot)) {
                    let _ = tx.send(chunk);
                }
            }
            Message::StopJob { job } => {
                jobs.remove(&job);
            }
            other => {
                let reason = format!("a coordinator may not send {}", other.kind());
                conn.close(2u32.into(), reason.as_bytes());
                break Err(NodeError::Protocol(reason));
            }
        }
    };
    // Slots do not outlive the connection: the coordinator re-runs their
    // chunks elsewhere once it notices the node is gone.
    drop(jobs);
    drop(up);
    writer.abort();
    result
}

struct SlotContext {
    job: JobId,
    slot: SlotId,
    spec: Arc<JobSpec>,
    config: Arc<NodeConfig>,
    up: mpsc::UnboundedSender<Message>,
}

async fn run_slot(ctx: SlotContext, chunks: mpsc::UnboundedReceiver<InputChunk>) {
    if let Err(reason) = drive_worker(&ctx, chunks).await {
        let _ = ctx.up.send(Message::SlotFailed {
            job: ctx.job,
            slot: ctx.slot,
            reason,
        });
    }
}

/// The chunk a worker holds, for error messages and to label its output.
struct Running {
    chunk: ChunkId,
    first_input: u64,
    count: u32,
}

impl Running {
    fn describe(&self) -> String {
        match self.count {
            1 => format!("input {}", self.first_input),
            n => format!("inputs {}..{}", self.first_input, self.first_input + n as u64 - 1),
        }
    }
}

fn worker_command(ctx: &SlotContext) -> (WorkerCommand, Arc<Vec<u8>>) {
    let RuntimeSpec::Python {
        executable, function, ..
    } = &ctx.spec.runtime;
    // The caller's own interpreter when this node has it (the embedded
    // cluster, a shared file system), else the node's.
    let program = if Path::new(executable).is_file() {
        executable.clone()
    } else {
        ctx.config.python.clone()
    };
    let max_output = ctx.config.max_frame.saturating_sub(64 << 10);
    let cmd = WorkerCommand {
        program: program.into(),
        args: vec!["-c".into(), "import fleetmap._worker as w; w.main()".into()],
        env: vec![
            ("PYTHONUNBUFFERED".into(), "1".into()),
            ("FLEETMAP_NODE".into(), ctx.config.name.clone().into()),
            ("FLEETMAP_MAX_OUTPUT".into(), max_output.to_string().into()),
            (
                "FLEETMAP_WORKER_FD".into(),
                fleetmap_sandbox::WORKER_CHANNEL_FD.to_string().into(),
            ),
        ],
    };
    (cmd, Arc::new(function.clone()))
}

async fn drive_worker(ctx: &SlotContext, mut chunks: mpsc::UnboundedReceiver<InputChunk>) -> Result<(), String> {
    let node = &ctx.config.name;
    let (cmd, function) = worker_command(ctx);
    let mut worker = spawn_worker(&cmd)
        .map_err(|e| format!("could not start a worker for slot {} on node {node}: {e}", ctx.slot))?;
    let pid = worker.pid;
    // spawn_worker fills all three; take each once.
    let mut stdout = LineForwarder::new(
        worker.stdout.take().expect("stdout of a new worker"),
        OutputStream::Stdout,
    );
    let mut stderr = LineForwarder::new(
        worker.stderr.take().expect("stderr of a new worker"),
        OutputStream::Stderr,
    );
    let channel = worker.channel.take().expect("channel of a new worker");
    let (rd, wr) = channel.into_split();
    let mut reader = FramedReader::new(rd, ctx.config.max_frame);
    let (to_worker, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(wr, rx, ctx.config.max_frame));
    let _ = to_worker.send(ToWorker::Load {
        function: function.to_vec(),
    });
    let died = |worker: &mut fleetmap_sandbox::Worker, what: String| {
        let status = worker.child.try_wait().ok().flatten();
        let how = status.map_or("stopped answering".into(), fleetmap_sandbox::describe_exit);
        format!(
            "the worker (pid {pid}) of slot {} on node {node} {how} {what}",
            ctx.slot
        )
    };
    match reader.recv::<FromWorker>().await {
        Ok(Some(FromWorker::Ready { .. })) => {}
        Ok(Some(FromWorker::LoadFailed { error })) => {
            return Err(format!("the function could not be loaded on node {node}: {error}"));
        }
        other => {
            wait_briefly(&mut worker).await;
            let mut reason = died(&mut worker, "while loading the function".into());
            if let Err(e) = other {
                reason.push_str(&format!(" ({e})"));
            }
            return Err(reason);
        }
    }
    let mut running: std::collections::VecDeque<Running> = Default::default();
    loop {
        tokio::select! {
            chunk = chunks.recv() => {
                let Some(chunk) = chunk else {
                    // The job stopped: dropping the worker kills it.
                    writer.abort();
                    return Ok(());
                };
                running.push_back(Running { chunk: chunk.chunk, first_input: chunk.first_input, count: chunk.count });
                let _ = to_worker.send(ToWorker::Run { chunk });
            }
            read = stdout.read_some(), if stdout.open => stdout.forward(read, ctx),
            read = stderr.read_some(), if stderr.open => stderr.forward(read, ctx),
            reply = reader.recv::<FromWorker>() => {
                match reply {
                    Ok(Some(FromWorker::Done { chunk, failed, payload })) => {
                        // Lines the calls printed reach the client before
                        // their outputs (and so before the job can end).
                        stdout.drain_written(ctx).await;
                        stderr.drain_written(ctx).await;
                        let Some(r) = running.pop_front().filter(|r| r.chunk == chunk) else {
                            return Err(format!("the worker (pid {pid}) on node {node} answered for chunk {chunk}, which it was not running"));
                        };
                        let output = OutputChunk { chunk, first_input: r.first_input, count: r.count, failed, node: node.clone(), payload };
                        let _ = ctx.up.send(Message::ChunkDone { job: ctx.job, slot: ctx.slot, output });
                    }
                    other => {
                        wait_briefly(&mut worker).await;
                        let what = running.front().map_or("between calls".into(), |r| format!("while running {}", r.describe()));
                        let mut reason = died(&mut worker, what);
                        if let Err(e) = other {
                            reason.push_str(&format!(" ({e})"));
                        } else if let Ok(Some(msg)) = other {
                            reason = format!("the worker (pid {pid}) on node {node} sent an unexpected {msg:?}");
                        }
                        return Err(reason);
                    }
                }
            }
        }
    }
}

/// Gives a worker whose channel closed a moment to exit, so its exit status
/// can be reported.
async fn wait_briefly(worker: &mut fleetmap_sandbox::Worker) {
    let _ = tokio::time::timeout(Duration::from_secs(2), worker.child.wait()).await;
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
        let _ = ctx.up.send(Message::Log(LogLine {
            job: ctx.job,
            stream: self.stream,
            node: ctx.config.name.clone(),
            text: String::from_utf8_lossy(line).into_owned(),
        }));
    }
}
