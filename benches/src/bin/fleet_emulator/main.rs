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
//! Each emulated node is a `fleetmap_testkit::EchoNode`, the same node the
//! integration tests run: one task that joins with `M` cores (one slot per
//! core for the job's one-core calls) and answers every `RunChunk` with a
//! `ChunkDone` that echoes the payload, at once or after `count * call_ms`,
//! each slot running its chunks one after another as a worker would.
//!
//! - `procfs.rs`: CPU time and memory from `/proc`.
//! - `job.rs`: the client's side of one job.
//! - `report.rs`: the table, the JSON (`--json`) and the summary.
//!
//! ```text
//! cargo run --release -p fleetmap-benches --bin fleet_emulator -- --nodes 40 --slots 100 --inputs 1000000
//! cargo run --release -p fleetmap-benches --bin fleet_emulator -- --call-ms 1 --inputs 400000 --chunk 10
//! ```

mod job;
mod procfs;
mod report;

use std::{
    path::PathBuf,
    str::FromStr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use fleetmap_coordinator::RunningCoordinator;
use fleetmap_testkit::{connect_client, start_coordinator, CoordinatorAccess, EchoNode, EchoStats};
use tokio::{sync::watch, time::Instant};

use crate::{
    job::{run_job, JobReport},
    report::{derive, job_json, ms, print_summary, print_table},
};

/// fleet_emulator: a real coordinator fed by emulated nodes over real QUIC
#[derive(Parser)]
#[command(
    name = "fleet_emulator",
    after_help = "Numbers may be written with _ or , between digits (1_000_000)."
)]
struct Args {
    /// Emulated nodes.
    #[arg(long, value_name = "N", default_value = "40", value_parser = at_least_one::<u32>)]
    nodes: u32,
    /// Slots per node: each node offers M cores and M * 2 GiB.
    #[arg(long, value_name = "M", default_value = "100", value_parser = at_least_one::<u32>)]
    slots: u32,
    /// Inputs per job.
    #[arg(long, value_name = "N", default_value = "1000000", value_parser = at_least_one::<u64>)]
    inputs: u64,
    /// Inputs per chunk.
    #[arg(long, value_name = "N", default_value = "100", value_parser = at_least_one::<u32>)]
    chunk: u32,
    /// Payload bytes per chunk, echoed back.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = number::<usize>)]
    payload: usize,
    /// Emulated time per input, may be fractional; 0 answers at once.
    #[arg(long, value_name = "MS", default_value = "0", value_parser = milliseconds)]
    call_ms: f64,
    /// Jobs to run one after another on the same fleet.
    #[arg(long, value_name = "N", default_value = "1", value_parser = at_least_one::<u32>)]
    jobs: u32,
    /// Worker threads for the nodes and the client [default: one per core].
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    emulator_threads: Option<usize>,
    /// Also print the results as one JSON object per job.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    external: Option<External>,
    /// Read that coordinator's CPU time and memory from /proc/PID.
    #[arg(long, value_name = "PID", value_parser = number::<u32>)]
    coordinator_pid: Option<u32>,
}

/// A coordinator elsewhere: all four flags or none. Each is `required =
/// false` and the group requires them all because clap otherwise makes the
/// fields of an optional flattened group required on their own
/// (clap-rs/clap#5092).
#[derive(clap::Args)]
#[group(requires_all = ["addr", "ca", "token", "api_key"])]
struct External {
    /// Use the coordinator at ADDR instead of one in this process; needs --ca,
    /// --token and --api-key.
    #[arg(long = "coordinator", value_name = "ADDR", required = false)]
    addr: String,
    /// The CA certificate (PEM) that signed that coordinator's certificate.
    #[arg(long, value_name = "FILE", required = false)]
    ca: PathBuf,
    /// That coordinator's join token, for the emulated nodes.
    #[arg(long, value_name = "TOKEN", required = false)]
    token: String,
    /// That coordinator's API key, for the client.
    #[arg(long, value_name = "KEY", required = false)]
    api_key: String,
}

/// A number that may be written with `_` or `,` between digits.
fn number<T: FromStr>(value: &str) -> Result<T, String> {
    let clean: String = value.chars().filter(|c| *c != '_' && *c != ',').collect();
    clean.parse().map_err(|_| format!("{value:?} is not a valid number"))
}

fn at_least_one<T: FromStr + PartialOrd + From<u8>>(value: &str) -> Result<T, String> {
    let n: T = number(value)?;
    if n < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

fn milliseconds(value: &str) -> Result<f64, String> {
    let ms: f64 = number(value)?;
    if !(ms >= 0.0 && ms.is_finite()) {
        return Err("must be a finite number of milliseconds, at least 0".into());
    }
    Ok(ms)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut emulator = tokio::runtime::Builder::new_multi_thread();
    emulator.thread_name("emulator").enable_all();
    if let Some(n) = args.emulator_threads {
        emulator.worker_threads(n);
    }
    let emulator = emulator.build()?;

    // The coordinator under test: its own runtime, one worker thread.
    let mut local: Option<(tokio::runtime::Runtime, RunningCoordinator)> = None;
    let access = match &args.external {
        Some(ext) => {
            let addr = emulator
                .block_on(tokio::net::lookup_host(&ext.addr))?
                .next()
                .ok_or_else(|| anyhow!("{} has no address", ext.addr))?;
            CoordinatorAccess {
                addr,
                ca_pem: std::fs::read(&ext.ca).with_context(|| format!("reading {}", ext.ca.display()))?,
                join_token: ext.token.clone(),
                api_key: ext.api_key.clone(),
            }
        }
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("coordinator")
                .enable_all()
                .build()?;
            // The coordinator spawns its tasks (the QUIC endpoint, every
            // connection) on the runtime it is started in: its own.
            let (running, access) = rt.block_on(start_coordinator())?;
            local = Some((rt, running));
            access
        }
    };

    println!("fleet emulator: real coordinator, emulated nodes and a real client over real QUIC (TLS 1.3, loopback)");
    match &args.external {
        Some(ext) => println!("  coordinator: external, at {}", ext.addr),
        None => println!(
            "  coordinator: in this process at {}, on its own tokio runtime with 1 worker thread (\"coordinator\")",
            access.addr
        ),
    }
    println!(
        "  machine: {} CPU cores. The emulated nodes and the client run in this process too (threads \
         \"emulator\") and compete with the coordinator for these cores: throughput here is a lower bound on \
         what the coordinator alone sustains.",
        procfs::cores()
    );

    let result = emulator.block_on(emulate(&args, &access));
    if let Some((rt, running)) = local.take() {
        rt.block_on(running.shutdown());
        rt.shutdown_timeout(Duration::from_secs(1));
    }
    let (fleet_nodes, reports) = result?;
    for r in &reports {
        let d = derive(&args, r);
        print_table(&args, fleet_nodes, r, &d);
        if args.json {
            println!("{}", serde_json::to_string(&job_json(&args, fleet_nodes, r, &d))?);
        }
    }
    if reports.len() > 1 {
        print_summary(&args, &reports);
    }
    emulator.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Joins the fleet, runs the jobs one after another and stops the fleet.
async fn emulate(args: &Args, access: &CoordinatorAccess) -> anyhow::Result<(u32, Vec<JobReport>)> {
    let per_input = Duration::from_secs_f64(args.call_ms / 1e3);
    let stats = Arc::new(EchoStats::default());
    let (stop, stopped) = watch::channel(false);
    let joining = Instant::now();
    let nodes: Vec<_> = (0..args.nodes)
        .map(|i| {
            let name = format!("emu-{i:03}");
            let mut stopped = stopped.clone();
            let stop = async move {
                let _ = stopped.changed().await;
            };
            let node = EchoNode::new(name.clone(), args.slots).per_input(per_input);
            let run = node.run(access.clone(), stats.clone(), stop);
            tokio::spawn(async move { run.await.with_context(|| format!("node {name}")) })
        })
        .collect();
    while stats.joined.load(Ordering::Relaxed) < args.nodes {
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
                stats.joined.load(Ordering::Relaxed),
                args.nodes
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("  {} nodes joined in {}", args.nodes, ms(joining.elapsed()));
    let client = connect_client(access).await?;
    let mut reports = Vec::new();
    for _ in 0..args.jobs {
        reports.push(run_job(&client, args, &stats).await?);
    }
    client.close();
    let _ = stop.send(true);
    for node in nodes {
        match tokio::time::timeout(Duration::from_secs(5), node).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: {e:#}"),
            Ok(Err(e)) => eprintln!("warning: a node task failed: {e}"),
            Err(_) => eprintln!("warning: a node did not stop within 5 s"),
        }
    }
    Ok((args.nodes, reports))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Args;

    #[test]
    fn the_command_line_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn an_external_coordinator_takes_all_four_flags_or_none() {
        let local = Args::try_parse_from(["fleet_emulator", "--nodes", "1_000", "--inputs=2,000,000"]).unwrap();
        assert!(local.external.is_none());
        assert_eq!((local.nodes, local.inputs), (1000, 2_000_000));
        let external = Args::try_parse_from([
            "fleet_emulator",
            "--coordinator",
            "10.0.0.1:7000",
            "--ca",
            "ca.pem",
            "--token",
            "fmjoin_x",
            "--api-key",
            "fmkey_x",
        ])
        .unwrap();
        assert_eq!(external.external.unwrap().addr, "10.0.0.1:7000");
        for partial in [
            &["fleet_emulator", "--coordinator", "10.0.0.1:7000"][..],
            &["fleet_emulator", "--ca", "ca.pem", "--token", "t", "--api-key", "k"][..],
        ] {
            let err = Args::try_parse_from(partial).err().expect("a partial set is refused");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{partial:?}"
            );
        }
    }

    #[test]
    fn counts_are_at_least_one_and_call_time_is_finite() {
        for bad in [
            ["--nodes", "0"],
            ["--jobs", "0"],
            ["--call-ms", "-1"],
            ["--call-ms", "NaN"],
        ] {
            let argv = ["fleet_emulator", bad[0], bad[1]];
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
