//! The client's side of one job: submits it, feeds chunks within credit,
//! checks every output and times it.

use std::{
    sync::{atomic::Ordering, PoisonError},
    time::Duration,
};

use anyhow::{bail, Context};
use fleetmap_client::{Client, JobEvent};
use fleetmap_protocol::{ChunkId, InputChunk, InputIndex, JobId};
use fleetmap_testkit::{job_spec, EchoStats, ONE_CORE};
use tokio::time::Instant;

use crate::{
    procfs::{snapshot, Snapshot},
    Args,
};

/// How long the job may go without any event before the emulator gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What one job measured.
pub struct JobReport {
    pub job: JobId,
    pub slots: u32,
    pub nodes: u32,
    pub initial_credit: u32,
    pub chunks: u64,
    pub place: Duration,
    /// When the last node got its `StartSlots` (after submit), how many
    /// nodes and how many slots.
    pub slots_started: Option<(Duration, usize, usize)>,
    pub first_output: Duration,
    pub total: Duration,
    pub outputs: u64,
    pub before: Snapshot,
    pub after: Snapshot,
}

pub async fn run_job(client: &Client, args: &Args, stats: &EchoStats) -> anyhow::Result<JobReport> {
    let chunks = args.inputs.div_ceil(args.chunk as u64);
    let payload = vec![0xA5u8; args.payload];
    let mut seen = vec![false; chunks as usize];
    let before = snapshot(args.coordinator_pid);
    let submitted = Instant::now();
    let mut job = client
        .submit(job_spec(args.inputs, ONE_CORE))
        .await
        .context("submitting the job")?;
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
            JobEvent::Failed(_, reason) | JobEvent::Disconnected(reason) => bail!("job {} failed: {reason}", job.id),
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
        // A poisoned lock only means a node panicked while recording; what
        // it recorded is whole.
        let started = stats.started.lock().unwrap_or_else(PoisonError::into_inner);
        let mine: Vec<_> = started.iter().filter(|s| s.job == job.id).collect();
        mine.iter().map(|s| s.at).max().map(|last| {
            (
                last.saturating_duration_since(submitted),
                mine.len(),
                mine.iter().map(|s| s.slots).sum(),
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
