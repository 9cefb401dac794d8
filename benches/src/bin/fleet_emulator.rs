//! The fleet emulator: a real coordinator, N emulated nodes and a real client,
//! all speaking the real protocol over real QUIC, to measure what the
//! coordinator itself costs when it feeds thousands of slots.
//!
//! The coordinator runs in this process on a tokio runtime of its own with
//! one worker thread named `coordinator` (so "at most one coordinator core"
//! can be checked, and its CPU time read from `/proc/self/task/*/stat`), or
//! elsewhere (`--coordinator ADDR --ca CA.pem --token T --api-key K`, with
//! `--coordinator-pid PID` to read its CPU time and memory). The nodes and
//! the client run on a second runtime (threads named `emulator`).
//!
//! Each emulated node is one task that joins with `M` cores (one slot per
//! core for the job's one-core calls) and answers every `RunChunk` with a
//! `ChunkDone` that echoes the payload, at once or after `count * call_ms`,
//! each slot running its chunks one after another as a worker would.
//!
//! ```text
//! cargo run --release -p fleetmap-benches --bin fleet_emulator -- --nodes 40 --slots 100 --inputs 1000000
//! cargo run --release -p fleetmap-benches --bin fleet_emulator -- --call-ms 1 --inputs 400000 --chunk 10
//! ```

use std::{
    collections::{BTreeMap, BinaryHeap, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use fleetmap_client::{Client, JobEvent};
use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_net::{CloseCode, Session};
use fleetmap_protocol::{
    CallRequest, ChunkId, CoordinatorToNode, Hello, InputChunk, InputIndex, JobId, JobSpec, NodeToCoordinator,
    OutputChunk, Resources, Role, RuntimeSpec, SlotId, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use tokio::{sync::watch, time::Instant};

const USAGE: &str = "\
fleet_emulator: a real coordinator fed by emulated nodes over real QUIC

USAGE: fleet_emulator [OPTIONS]

  --nodes N             emulated nodes (default 40)
  --slots M             slots per node: each node offers M cores and M * 2 GiB (default 100)
  --inputs N            inputs per job (default 1000000)
  --chunk N             inputs per chunk (default 100)
  --payload BYTES       payload bytes per chunk, echoed back (default 64)
  --call-ms MS          emulated time per input, may be fractional (default 0: answer at once)
  --jobs N              jobs to run one after another on the same fleet (default 1)
  --emulator-threads N  worker threads for the nodes and the client (default: one per core)
  --json                also print the results as one JSON object per job
  --coordinator ADDR    use the coordinator at ADDR instead of one in this process;
                        needs --ca FILE, --token TOKEN and --api-key KEY
  --coordinator-pid PID read that coordinator's CPU time and memory from /proc/PID
";

/// Clock ticks per second in `/proc/*/stat` (USER_HZ, 100 on every Linux ABI).
const USER_HZ: u64 = 100;

/// How long the job may go without any event before the emulator gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

struct External {
    addr: String,
    ca: PathBuf,
    token: String,
    api_key: String,
}

struct Args {
    nodes: u32,
    slots: u32,
    inputs: u64,
    chunk: u32,
    payload: usize,
    call_ms: f64,
    jobs: u32,
    emulator_threads: Option<usize>,
    json: bool,
    external: Option<External>,
    coordinator_pid: Option<u32>,
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> anyhow::Result<T> {
    let clean: String = value.chars().filter(|c| *c != '_' && *c != ',').collect();
    clean
        .parse()
        .map_err(|_| anyhow!("{flag}: {value:?} is not a valid number"))
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 40,
        slots: 100,
        inputs: 1_000_000,
        chunk: 100,
        payload: 64,
        call_ms: 0.0,
        jobs: 1,
        emulator_threads: None,
        json: false,
        external: None,
        coordinator_pid: None,
    };
    let (mut addr, mut ca, mut token, mut api_key) = (None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--nodes" => args.nodes = parse_number(&flag, &value()?)?,
            "--slots" => args.slots = parse_number(&flag, &value()?)?,
            "--inputs" => args.inputs = parse_number(&flag, &value()?)?,
            "--chunk" => args.chunk = parse_number(&flag, &value()?)?,
            "--payload" => args.payload = parse_number(&flag, &value()?)?,
            "--call-ms" => args.call_ms = parse_number(&flag, &value()?)?,
            "--jobs" => args.jobs = parse_number(&flag, &value()?)?,
            "--emulator-threads" => args.emulator_threads = Some(parse_number(&flag, &value()?)?),
            "--coordinator" => addr = Some(value()?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--token" => token = Some(value()?),
            "--api-key" => api_key = Some(value()?),
            "--coordinator-pid" => args.coordinator_pid = Some(parse_number(&flag, &value()?)?),
            "--json" => args.json = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if args.nodes == 0 || args.slots == 0 || args.inputs == 0 || args.chunk == 0 || args.jobs == 0 {
        bail!("--nodes, --slots, --inputs, --chunk and --jobs must be at least 1");
    }
    if !(args.call_ms >= 0.0 && args.call_ms.is_finite()) {
        bail!("--call-ms must be a finite number of milliseconds, at least 0");
    }
    match (addr, ca, token, api_key) {
        (None, None, None, None) => {}
        (Some(addr), Some(ca), Some(token), Some(api_key)) => {
            args.external = Some(External {
                addr,
                ca,
                token,
                api_key,
            })
        }
        _ => bail!("--coordinator needs --ca, --token and --api-key (and they need --coordinator)"),
    }
    Ok(args)
}

// ---------------------------------------------------------------------------
// Measurements from /proc.

/// CPU time of a group of threads of this process that share a name.
#[derive(Debug, Default, Clone, Copy)]
struct ThreadCpu {
    /// On-CPU time from `schedstat` (nanoseconds).
    run_ns: u64,
    /// Time runnable but waiting for a CPU, from `schedstat` (nanoseconds).
    wait_ns: u64,
    /// utime + stime from `stat` (clock ticks).
    ticks: u64,
    threads: u32,
}

impl ThreadCpu {
    fn minus(self, before: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            ticks: self.ticks.saturating_sub(before.ticks),
            threads: self.threads,
        }
    }
}

/// CPU time and memory of a whole process.
#[derive(Debug, Default, Clone, Copy)]
struct ProcSample {
    ticks: u64,
    vm_hwm_kib: u64,
    vm_rss_kib: u64,
}

#[derive(Debug, Clone)]
struct Snapshot {
    process: ProcSample,
    /// This process's threads by name (`coordinator`, `emulator`, ...).
    threads: BTreeMap<String, ThreadCpu>,
    /// An external coordinator's process, with `--coordinator-pid`.
    coordinator: Option<ProcSample>,
    /// The whole machine from `/proc/stat`: (busy, total) ticks of all CPUs.
    machine: (u64, u64),
}

/// Busy and total ticks of all CPUs, to see what else ran during a job.
fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// utime + stime (ticks) from a `stat` file. The command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn stat_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn proc_sample(dir: &str) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    Some(ProcSample {
        ticks: stat_ticks(&format!("{dir}/stat"))?,
        vm_hwm_kib: status_kib(&status, "VmHWM:"),
        vm_rss_kib: status_kib(&status, "VmRSS:"),
    })
}

fn thread_cpu() -> BTreeMap<String, ThreadCpu> {
    let mut out: BTreeMap<String, ThreadCpu> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path().display().to_string();
        let Ok(comm) = std::fs::read_to_string(format!("{dir}/comm")) else {
            continue; // The thread has exited.
        };
        let entry = out.entry(comm.trim().to_string()).or_default();
        entry.threads += 1;
        entry.ticks += stat_ticks(&format!("{dir}/stat")).unwrap_or(0);
        if let Ok(s) = std::fs::read_to_string(format!("{dir}/schedstat")) {
            let mut f = s.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
            entry.run_ns += f.next().unwrap_or(0);
            entry.wait_ns += f.next().unwrap_or(0);
        }
    }
    out
}

fn snapshot(coordinator_pid: Option<u32>) -> Snapshot {
    Snapshot {
        process: proc_sample("/proc/self").unwrap_or_default(),
        threads: thread_cpu(),
        coordinator: coordinator_pid.and_then(|pid| proc_sample(&format!("/proc/{pid}"))),
        machine: machine_ticks(),
    }
}

// ---------------------------------------------------------------------------
// Emulated nodes.

/// What every node needs to join.
struct NodeConfig {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    token: String,
    slots: u32,
    /// Emulated time per input; zero answers at once.
    per_input: Duration,
}

/// Counters the nodes share with the report.
#[derive(Default)]
struct FleetStats {
    welcomed: AtomicU32,
    chunks: AtomicU64,
    inputs: AtomicU64,
    /// (job, when a node got its StartSlots, how many slots).
    started: Mutex<Vec<(JobId, Instant, usize)>>,
}

/// A chunk whose emulated calls end at `due`.
struct Pending {
    due: Instant,
    seq: u64,
    job: JobId,
    slot: SlotId,
    output: OutputChunk,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    /// Reversed, so that `BinaryHeap` pops the earliest first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// One emulated node: joins, then answers chunks until `stop` changes or
/// the coordinator closes the connection.
async fn run_node(
    cfg: Arc<NodeConfig>,
    name: String,
    stats: Arc<FleetStats>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let hello = Hello {
        role: Role::Node {
            token: cfg.token.clone(),
            name: name.clone(),
            resources: Resources {
                cores: cfg.slots,
                memory_bytes: cfg.slots as u64 * (2 << 30),
                gpus: vec![],
            },
            isolation: "emulated".into(),
        },
        software_version: SOFTWARE_VERSION.into(),
    };
    let session: Session<NodeToCoordinator, CoordinatorToNode> = fleetmap_net::dial(
        &cfg.addr.to_string(),
        &cfg.ca_pem,
        &hello,
        DEFAULT_MAX_MESSAGE,
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("node {name} joining"))?;
    let Session {
        conn,
        tx,
        rx: mut reader,
        writer,
        endpoint,
        ..
    } = session;
    stats.welcomed.fetch_add(1, Ordering::Relaxed);

    // When each slot's emulated worker is free again: a slot runs its
    // chunks one after another, the next starting when the last one ends.
    let mut busy_until: HashMap<(JobId, SlotId), Instant> = HashMap::new();
    let mut pending: BinaryHeap<Pending> = BinaryHeap::new();
    let mut seq = 0u64;
    let timer = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    let result = loop {
        if let Some(head) = pending.peek() {
            if armed != Some(head.due) {
                timer.as_mut().reset(head.due);
                armed = Some(head.due);
            }
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break Ok(()),
            () = &mut timer, if !pending.is_empty() => {
                armed = None;
                let now = Instant::now();
                while pending.peek().is_some_and(|p| p.due <= now) {
                    let p = pending.pop().expect("peeked above");
                    let _ = tx.send(NodeToCoordinator::ChunkDone { job: p.job, slot: p.slot, output: p.output });
                }
            }
            msg = reader.recv() => {
                let msg = match msg {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(anyhow!("node {name}: {e}")),
                };
                match msg {
                    CoordinatorToNode::StartSlots { job, slots, .. } => {
                        let now = Instant::now();
                        for &slot in &slots {
                            busy_until.insert((job, slot), now);
                        }
                        stats.started.lock().expect("stats lock").push((job, now, slots.len()));
                    }
                    CoordinatorToNode::RunChunk { job, slot, chunk } => {
                        stats.chunks.fetch_add(1, Ordering::Relaxed);
                        stats.inputs.fetch_add(chunk.count as u64, Ordering::Relaxed);
                        let output = OutputChunk {
                            chunk: chunk.chunk,
                            first_input: chunk.first_input,
                            count: chunk.count,
                            failed: 0,
                            node: name.clone(),
                            payload: chunk.payload,
                        };
                        if cfg.per_input.is_zero() {
                            let _ = tx.send(NodeToCoordinator::ChunkDone { job, slot, output });
                        } else {
                            let now = Instant::now();
                            let free = busy_until.entry((job, slot)).or_insert(now);
                            let due = (*free).max(now) + cfg.per_input * chunk.count;
                            *free = due;
                            pending.push(Pending { due, seq, job, slot, output });
                            seq += 1;
                        }
                    }
                    CoordinatorToNode::StopJob { job } => {
                        busy_until.retain(|(j, _), _| *j != job);
                        pending.retain(|p| p.job != job);
                    }
                    // Anything else (a slot given back, say) needs no
                    // action: a slot here is only a timestamp.
                    _ => {}
                }
            }
        }
    };
    CloseCode::Done.close(&conn, "emulated node done");
    drop(tx);
    writer.abort();
    // Let the close reach the coordinator before the endpoint goes.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result
}

// ---------------------------------------------------------------------------
// The client's job.

struct JobReport {
    job: JobId,
    slots: u32,
    nodes: u32,
    initial_credit: u32,
    chunks: u64,
    place: Duration,
    slots_started: Option<(Duration, usize, usize)>,
    first_output: Duration,
    total: Duration,
    outputs: u64,
    before: Snapshot,
    after: Snapshot,
}

fn spec(inputs: u64) -> JobSpec {
    JobSpec {
        call: CallRequest {
            cores: 1,
            memory_bytes: 1 << 30,
            gpus: 0,
        },
        parallelism: None,
        total_inputs: Some(inputs),
        runtime: RuntimeSpec::Python {
            executable: "python3".into(),
            version: "3.11".into(),
            function: vec![0; 64],
        },
    }
}

async fn run_job(client: &Client, args: &Args, stats: &FleetStats) -> anyhow::Result<JobReport> {
    let chunks = args.inputs.div_ceil(args.chunk as u64);
    let payload = vec![0xA5u8; args.payload];
    let mut seen = vec![false; chunks as usize];
    let before = snapshot(args.coordinator_pid);
    let submitted = Instant::now();
    let mut job = client.submit(spec(args.inputs)).await.context("submitting the job")?;
    let place = submitted.elapsed();
    let mut credit = job.initial_credit as u64;
    let mut sent = 0u64;
    let mut outputs = 0u64;
    let mut done_chunks = 0u64;
    let mut first_output = None;
    loop {
        while credit > 0 && sent < chunks {
            let first_input = sent * args.chunk as u64;
            job.send_chunk(InputChunk {
                chunk: ChunkId(sent),
                first_input: InputIndex(first_input),
                count: (args.inputs - first_input).min(args.chunk as u64) as u32,
                payload: payload.clone(),
            });
            sent += 1;
            credit -= 1;
            if sent == chunks {
                job.inputs_done(chunks);
            }
        }
        let event = match tokio::time::timeout(STALL_TIMEOUT, job.next_event()).await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("job {}: the event stream ended before JobFinished", job.id),
            Err(_) => bail!(
                "job {}: no event for {STALL_TIMEOUT:?}: sent {sent}/{chunks} chunks, got {done_chunks} back, \
                 credit {credit}; nodes ran {} chunks",
                job.id,
                stats.chunks.load(Ordering::Relaxed)
            ),
        };
        match event {
            JobEvent::Output(o) => {
                first_output.get_or_insert_with(|| submitted.elapsed());
                let Some(mark) = seen.get_mut(o.chunk.0 as usize) else {
                    bail!("job {}: output for unknown chunk {}", job.id, o.chunk);
                };
                if std::mem::replace(mark, true) {
                    bail!("job {}: chunk {} came back twice", job.id, o.chunk);
                }
                if o.payload.len() != args.payload || o.first_input != InputIndex(o.chunk.0 * args.chunk as u64) {
                    bail!("job {}: chunk {} came back altered", job.id, o.chunk);
                }
                outputs += o.count as u64;
                done_chunks += 1;
            }
            JobEvent::Credit(n) => credit += n as u64,
            JobEvent::Finished => break,
            JobEvent::Failed(reason) => bail!("job {} failed: {reason}", job.id),
            JobEvent::Log(_) => {}
        }
    }
    let total = submitted.elapsed();
    let after = snapshot(args.coordinator_pid);
    if outputs != args.inputs || done_chunks != chunks {
        bail!(
            "job {}: finished with {outputs} of {} inputs ({done_chunks} of {chunks} chunks)",
            job.id,
            args.inputs
        );
    }
    let slots_started = {
        let started = stats.started.lock().expect("stats lock");
        let mine: Vec<_> = started.iter().filter(|(j, _, _)| *j == job.id).collect();
        mine.iter().map(|(_, at, _)| *at).max().map(|last| {
            (
                last.saturating_duration_since(submitted),
                mine.len(),
                mine.iter().map(|(_, _, n)| n).sum(),
            )
        })
    };
    Ok(JobReport {
        job: job.id,
        slots: job.slots,
        nodes: job.nodes,
        initial_credit: job.initial_credit,
        chunks,
        place,
        slots_started,
        first_output: first_output.unwrap_or(total),
        total,
        outputs,
        before,
        after,
    })
}

// ---------------------------------------------------------------------------
// Reporting.

fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let mut groups: Vec<&str> = digits
        .rchunks(3)
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"))
        .collect();
    groups.reverse();
    groups.join(",")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The derived numbers of one job, shared by the table and the JSON.
struct Derived {
    secs: f64,
    inputs_per_s: f64,
    chunks_per_s: f64,
    ideal_s: Option<f64>,
    efficiency: Option<f64>,
    coord: Option<ThreadCpu>,
    emulator: ThreadCpu,
    other: ThreadCpu,
    process_cpu_s: f64,
    external_cpu_s: Option<f64>,
    /// CPU seconds the whole machine spent busy during the job.
    machine_busy_s: f64,
}

fn derive(args: &Args, r: &JobReport) -> Derived {
    let secs = r.total.as_secs_f64();
    let ideal_s = (args.call_ms > 0.0 && r.slots > 0).then(|| args.inputs as f64 * args.call_ms / 1e3 / r.slots as f64);
    let group = |name: &str| {
        r.after
            .threads
            .get(name)
            .map(|a| a.minus(r.before.threads.get(name).copied().unwrap_or_default()))
    };
    let mut other = ThreadCpu::default();
    for (name, a) in &r.after.threads {
        if name != "coordinator" && name != "emulator" {
            let d = a.minus(r.before.threads.get(name).copied().unwrap_or_default());
            other.run_ns += d.run_ns;
            other.wait_ns += d.wait_ns;
            other.ticks += d.ticks;
            other.threads += d.threads;
        }
    }
    Derived {
        secs,
        inputs_per_s: args.inputs as f64 / secs,
        chunks_per_s: r.chunks as f64 / secs,
        ideal_s,
        efficiency: ideal_s.map(|i| i / secs),
        coord: if args.external.is_none() {
            group("coordinator")
        } else {
            None
        },
        emulator: group("emulator").unwrap_or_default(),
        other,
        process_cpu_s: r.after.process.ticks.saturating_sub(r.before.process.ticks) as f64 / USER_HZ as f64,
        external_cpu_s: match (r.before.coordinator, r.after.coordinator) {
            (Some(b), Some(a)) => Some(a.ticks.saturating_sub(b.ticks) as f64 / USER_HZ as f64),
            _ => None,
        },
        machine_busy_s: r.after.machine.0.saturating_sub(r.before.machine.0) as f64 / USER_HZ as f64,
    }
}

fn print_table(args: &Args, fleet_nodes: u32, r: &JobReport, d: &Derived) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let row = |k: &str, v: String| println!("  {k:<38} {v}");
    let per_input_us = |secs: f64| format!("{:.3} µs/input", secs * 1e6 / args.inputs as f64);
    println!();
    println!("== job {} ==", r.job);
    row(
        "nodes / slots (fleet)",
        format!(
            "{fleet_nodes} emulated nodes x {} slots = {} slots",
            args.slots,
            thousands(fleet_nodes as u64 * args.slots as u64)
        ),
    );
    row(
        "job placed on",
        format!(
            "{} slots on {} nodes, initial credit {} chunks",
            thousands(r.slots as u64),
            r.nodes,
            thousands(r.initial_credit as u64)
        ),
    );
    row(
        "inputs / chunk / payload",
        format!(
            "{} inputs in {} chunks of {} ({} B payload each)",
            thousands(args.inputs),
            thousands(r.chunks),
            args.chunk,
            args.payload
        ),
    );
    row(
        "emulated call",
        if args.call_ms > 0.0 {
            format!(
                "{} ms per input (chunk of {} = {} ms)",
                args.call_ms,
                args.chunk,
                args.call_ms * args.chunk as f64
            )
        } else {
            "none: every chunk answered at once".into()
        },
    );
    row("time to place (submit -> accepted)", ms(r.place));
    if let Some((t, nodes, slots)) = r.slots_started {
        row(
            "StartSlots at every node",
            format!(
                "{} after submit ({nodes} nodes, {} slots)",
                ms(t),
                thousands(slots as u64)
            ),
        );
    }
    row("first output", format!("{} after submit", ms(r.first_output)));
    row("job time (submit -> finished)", format!("{:.3} s", d.secs));
    row(
        "dispatch throughput",
        format!(
            "{} inputs/s, {} chunks/s",
            thousands(d.inputs_per_s as u64),
            thousands(d.chunks_per_s as u64)
        ),
    );
    if let (Some(ideal), Some(eff)) = (d.ideal_s, d.efficiency) {
        row(
            "efficiency (ideal / measured)",
            format!("{:.1}%  (ideal {:.3} s = inputs x call / slots)", eff * 100.0, ideal),
        );
    }
    if let Some(c) = d.coord {
        let cpu = c.run_ns as f64 / 1e9;
        row(
            "coordinator CPU (its thread)",
            format!(
                "{cpu:.3} s = {}, {:.0}% of one core over the job",
                per_input_us(cpu),
                cpu / d.secs * 100.0
            ),
        );
        row(
            "  same, from task stat ticks",
            format!(
                "{:.2} s (threads named \"coordinator\": {})",
                c.ticks as f64 / USER_HZ as f64,
                c.threads
            ),
        );
        row(
            "  runnable but waiting for a CPU",
            format!(
                "{:.3} s ({:.0}% of the job)",
                c.wait_ns as f64 / 1e9,
                c.wait_ns as f64 / 1e9 / d.secs * 100.0
            ),
        );
    }
    if let Some(cpu) = d.external_cpu_s {
        row(
            "coordinator CPU (external process)",
            format!(
                "{cpu:.2} s = {}, {:.0}% of one core over the job",
                per_input_us(cpu),
                cpu / d.secs * 100.0
            ),
        );
    }
    row(
        "emulator CPU (nodes, client I/O)",
        format!(
            "{:.3} s ({:.0}% of one core), runnable-waiting {:.3} s",
            d.emulator.run_ns as f64 / 1e9,
            d.emulator.run_ns as f64 / 1e9 / d.secs * 100.0,
            d.emulator.wait_ns as f64 / 1e9
        ),
    );
    row(
        "other threads (main: client job loop)",
        format!("{:.3} s", d.other.run_ns as f64 / 1e9),
    );
    row(
        "process CPU (/proc/self/stat)",
        format!(
            "{:.2} s = {} (coordinator + nodes + client), {:.0}% of {cores} cores",
            d.process_cpu_s,
            per_input_us(d.process_cpu_s),
            d.process_cpu_s / d.secs / cores.max(1) as f64 * 100.0
        ),
    );
    row(
        "machine CPU busy (/proc/stat)",
        format!(
            "{:.2} s, {:.0}% of {cores} cores; other processes used about {:.2} s",
            d.machine_busy_s,
            d.machine_busy_s / d.secs / cores.max(1) as f64 * 100.0,
            (d.machine_busy_s - d.process_cpu_s - d.external_cpu_s.unwrap_or(0.0)).max(0.0)
        ),
    );
    row(
        "process peak RSS (VmHWM)",
        format!(
            "{} before the job, {} after (RSS now {})",
            mib(r.before.process.vm_hwm_kib),
            mib(r.after.process.vm_hwm_kib),
            mib(r.after.process.vm_rss_kib)
        ),
    );
    if let (Some(b), Some(a)) = (r.before.coordinator, r.after.coordinator) {
        row(
            "coordinator peak RSS (VmHWM)",
            format!(
                "{} before the job, {} after (RSS now {})",
                mib(b.vm_hwm_kib),
                mib(a.vm_hwm_kib),
                mib(a.vm_rss_kib)
            ),
        );
    }
}

fn json(args: &Args, fleet_nodes: u32, r: &JobReport, d: &Derived) -> String {
    let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.6}"));
    let mut s = String::from("{");
    let _ = write!(
        s,
        "\"job\":{},\"nodes\":{fleet_nodes},\"slots_per_node\":{},\"slots\":{},\"job_nodes\":{},\
         \"initial_credit\":{},\"inputs\":{},\"chunk\":{},\"chunks\":{},\"payload\":{},\"call_ms\":{},\
         \"place_s\":{:.6},\"slots_started_s\":{},\"first_output_s\":{:.6},\"job_s\":{:.6},\
         \"inputs_per_s\":{:.1},\"chunks_per_s\":{:.1},\"ideal_s\":{},\"efficiency\":{},",
        r.job,
        args.slots,
        r.slots,
        r.nodes,
        r.initial_credit,
        r.outputs,
        args.chunk,
        r.chunks,
        args.payload,
        args.call_ms,
        r.place.as_secs_f64(),
        opt(r.slots_started.map(|(t, _, _)| t.as_secs_f64())),
        r.first_output.as_secs_f64(),
        d.secs,
        d.inputs_per_s,
        d.chunks_per_s,
        opt(d.ideal_s),
        opt(d.efficiency),
    );
    let coord_cpu = d.coord.map(|c| c.run_ns as f64 / 1e9).or(d.external_cpu_s);
    let _ = write!(
        s,
        "\"coordinator_cpu_s\":{},\"coordinator_cpu_us_per_input\":{},\"coordinator_core_share\":{},\
         \"coordinator_wait_s\":{},\"emulator_cpu_s\":{:.6},\"process_cpu_s\":{:.2},\
         \"process_cpu_us_per_input\":{:.4},\"machine_busy_s\":{:.2},\"process_vm_hwm_kib_before\":{},\"process_vm_hwm_kib_after\":{},\
         \"process_vm_rss_kib_after\":{},\"coordinator_vm_hwm_kib_before\":{},\"coordinator_vm_hwm_kib_after\":{},\
         \"cores\":{}}}",
        opt(coord_cpu),
        opt(coord_cpu.map(|c| c * 1e6 / args.inputs as f64)),
        opt(coord_cpu.map(|c| c / d.secs)),
        opt(d.coord.map(|c| c.wait_ns as f64 / 1e9)),
        d.emulator.run_ns as f64 / 1e9,
        d.process_cpu_s,
        d.process_cpu_s * 1e6 / args.inputs as f64,
        d.machine_busy_s,
        r.before.process.vm_hwm_kib,
        r.after.process.vm_hwm_kib,
        r.after.process.vm_rss_kib,
        r.before.coordinator.map_or("null".into(), |c| c.vm_hwm_kib.to_string()),
        r.after.coordinator.map_or("null".into(), |c| c.vm_hwm_kib.to_string()),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    s
}

// ---------------------------------------------------------------------------

/// Where the coordinator is and how to join it.
struct Target {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    token: String,
    api_key: String,
}

async fn emulate(args: &Args, target: &Target) -> anyhow::Result<(u32, Vec<JobReport>)> {
    let cfg = Arc::new(NodeConfig {
        addr: target.addr,
        ca_pem: target.ca_pem.clone(),
        token: target.token.clone(),
        slots: args.slots,
        per_input: Duration::from_secs_f64(args.call_ms / 1e3),
    });
    let stats = Arc::new(FleetStats::default());
    let (stop, stopped) = watch::channel(false);
    let joining = Instant::now();
    let nodes: Vec<_> = (0..args.nodes)
        .map(|i| {
            tokio::spawn(run_node(
                cfg.clone(),
                format!("emu-{i:03}"),
                stats.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    while stats.welcomed.load(Ordering::Relaxed) < args.nodes {
        if nodes.iter().any(|n| n.is_finished()) {
            let finished: Vec<_> = nodes.into_iter().filter(|n| n.is_finished()).collect();
            for n in finished {
                n.await??;
            }
            bail!("a node stopped before the job started");
        }
        if joining.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {} of {} nodes joined within 60 s",
                stats.welcomed.load(Ordering::Relaxed),
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("  {} nodes joined in {}", args.nodes, ms(joining.elapsed()));
    let client = Client::connect(&target.addr.to_string(), &target.ca_pem, &target.api_key).await?;
    let mut reports = Vec::new();
    for _ in 0..args.jobs {
        reports.push(run_job(&client, args, &stats).await?);
    }
    client.close();
    let _ = stop.send(true);
    for node in nodes {
        match tokio::time::timeout(Duration::from_secs(5), node).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: {e}"),
            Ok(Err(e)) => eprintln!("warning: a node task failed: {e}"),
            Err(_) => eprintln!("warning: a node did not stop within 5 s"),
        }
    }
    Ok((args.nodes, reports))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut emulator = tokio::runtime::Builder::new_multi_thread();
    emulator.thread_name("emulator").enable_all();
    if let Some(n) = args.emulator_threads {
        emulator.worker_threads(n);
    }
    let emulator = emulator.build()?;

    // The coordinator under test: its own runtime, one worker thread.
    let mut local: Option<(tokio::runtime::Runtime, RunningCoordinator)> = None;
    let target = match &args.external {
        Some(ext) => {
            let addr = emulator
                .block_on(tokio::net::lookup_host(&ext.addr))?
                .next()
                .ok_or_else(|| anyhow!("{} has no address", ext.addr))?;
            Target {
                addr,
                ca_pem: std::fs::read(&ext.ca).with_context(|| format!("reading {}", ext.ca.display()))?,
                token: ext.token.clone(),
                api_key: ext.api_key.clone(),
            }
        }
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("coordinator")
                .enable_all()
                .build()?;
            let creds = Credentials::generate()?;
            let config = CoordinatorConfig::new("127.0.0.1:0".parse()?, creds.clone());
            // `serve` spawns its tasks (the QUIC endpoint, every connection)
            // on the runtime it is called in: the coordinator's.
            let running = rt.block_on(serve(config))?;
            let target = Target {
                addr: running.local_addr,
                ca_pem: creds.ca_pem.into_bytes(),
                token: creds.join_token,
                api_key: creds.api_key,
            };
            local = Some((rt, running));
            target
        }
    };

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("fleet emulator: real coordinator, emulated nodes and a real client over real QUIC (TLS 1.3, loopback)");
    match &args.external {
        Some(ext) => println!("  coordinator: external, at {}", ext.addr),
        None => println!(
            "  coordinator: in this process at {}, on its own tokio runtime with 1 worker thread (\"coordinator\")",
            target.addr
        ),
    }
    println!(
        "  machine: {cores} CPU cores. The emulated nodes and the client run in this process too (threads \
         \"emulator\") and compete with the coordinator for these cores: throughput here is a lower bound on \
         what the coordinator alone sustains."
    );

    let result = emulator.block_on(emulate(&args, &target));
    if let Some((rt, running)) = local.take() {
        rt.block_on(running.shutdown());
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    let (fleet_nodes, reports) = result?;
    for r in &reports {
        let d = derive(&args, r);
        print_table(&args, fleet_nodes, r, &d);
        if args.json {
            println!("{}", json(&args, fleet_nodes, r, &d));
        }
    }
    if reports.len() > 1 {
        print_summary(&args, &reports);
    }
    emulator.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// One line per job, then the median: jobs on a shared machine vary.
fn print_summary(args: &Args, reports: &[JobReport]) {
    println!();
    println!(
        "== summary: {} jobs on the same fleet (the first one also warms it) ==",
        reports.len()
    );
    println!(
        "  {:>4} {:>9} {:>9} {:>12} {:>10} {:>7} {:>13} {:>10} {:>10} {:>12}",
        "job",
        "place ms",
        "job s",
        "inputs/s",
        "chunks/s",
        "eff",
        "coord µs/in",
        "coord core",
        "coord wait",
        "others CPU s"
    );
    let mut rows: Vec<Derived> = Vec::new();
    for r in reports {
        let d = derive(args, r);
        let coord = d.coord.map(|c| c.run_ns as f64 / 1e9).or(d.external_cpu_s);
        println!(
            "  {:>4} {:>9.2} {:>9.3} {:>12} {:>10} {:>7} {:>13} {:>10} {:>10} {:>12.2}",
            r.job,
            r.place.as_secs_f64() * 1e3,
            d.secs,
            thousands(d.inputs_per_s as u64),
            thousands(d.chunks_per_s as u64),
            d.efficiency.map_or("-".into(), |e| format!("{:.1}%", e * 100.0)),
            coord.map_or("-".into(), |c| format!("{:.4}", c * 1e6 / args.inputs as f64)),
            coord.map_or("-".into(), |c| format!("{:.0}%", c / d.secs * 100.0)),
            d.coord.map_or("-".into(), |c| format!(
                "{:.0}%",
                c.wait_ns as f64 / 1e9 / d.secs * 100.0
            )),
            (d.machine_busy_s - d.process_cpu_s - d.external_cpu_s.unwrap_or(0.0)).max(0.0),
        );
        rows.push(d);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let secs = median(rows.iter().map(|d| d.secs).collect());
    println!(
        "  median job time {secs:.3} s: {} inputs/s{}",
        thousands((args.inputs as f64 / secs) as u64),
        rows[0].ideal_s.map_or(String::new(), |ideal| format!(
            ", efficiency {:.1}%",
            ideal / secs * 100.0
        ))
    );
}
