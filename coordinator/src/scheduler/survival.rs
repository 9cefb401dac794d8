//! Survival: how jobs outlive interruptions that end, given time.
//!
//! - **A client that vanishes** (its connection lost without a goodbye: a
//!   sleeping laptop, a cut link, a coordinator restart on the client's
//!   side) does not cancel a job submitted with a resume token. The job's
//!   calls are stopped and its resources freed (the chunks they ran are
//!   the client's to send again), and it waits as an *orphan*, listed as
//!   `waiting`, for its grace period. The client picks it up by submitting
//!   it again with the token and `resumes`: a new incarnation under the
//!   same id, fed the chunks the client holds no answer for. A clean close
//!   or a cancel still ends the job at once. The same submission picks up
//!   a job the coordinator no longer knows (it restarted): the id is
//!   reused where free.
//! - **A node that vanishes** with the only slots a job could have leaves
//!   the job *stranded*: rather than fail at once, it waits for the node
//!   grace period for a node that can host its calls to join (the same one
//!   restarted or thawed, or another), and fails only then.
//!
//! The scheduler reads no clock: the shell tells it the time with
//! [`Scheduler::handle_tick`], and deadlines are checked there.

use std::time::Duration;

use fleetmap_protocol::{
    ClientId, CoordinatorToClient, FailureKind, JobId, JobState, JobStatus, LogLine, OutputStream, RequestId,
    Resumable, SlotId,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Scheduler;

/// How long the scheduler waits before it gives a job up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grace {
    /// A job that no remaining node can host waits this long for one to
    /// join (zero: it fails at once).
    pub node: Duration,
    /// The longest a job waits for its vanished client, whatever the
    /// client asked for (zero: a job ends with its connection).
    pub max_client: Duration,
}

impl Grace {
    /// What a fleet's coordinator uses by default: a minute each.
    pub const FLEET: Grace = Grace {
        node: Duration::from_secs(60),
        max_client: Duration::from_secs(3600),
    };
}

/// A job whose client vanished: no slots, no queue, only what it takes to
/// list it and to let its client pick it up.
#[derive(Debug)]
pub(super) struct Orphan {
    /// Its listing as it was left, in state `Waiting`.
    pub status: JobStatus,
    /// The first slot id its next incarnation may use: a report from a slot
    /// of this one, still on the wire, can never match a new slot.
    pub next_slot: SlotId,
    pub token: [u8; 32],
    pub grace: Duration,
    pub deadline: Duration,
}

/// Where a resumed job's new incarnation starts.
pub(super) struct Resumed {
    pub id: JobId,
    pub next_slot: SlotId,
    /// When the job was first submitted, where known.
    pub started: Option<u64>,
}

/// What a job's resume token is kept as: its SHA-256.
pub(super) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn same_token(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// What a resuming submission finds under the id it names.
pub(super) enum Found {
    /// Its orphan, or its still-listed incarnation (the coordinator had not
    /// noticed the lost connection yet): the id is the client's again.
    Mine,
    /// The job ended while its client was away: how.
    Ended(JobState),
    /// Nothing: a restarted coordinator; the id is free to take.
    Free,
    /// Another job holds the id: the resumed job gets a new one.
    Taken,
}

impl Scheduler {
    /// Sets how long jobs wait for vanished nodes and clients.
    pub fn set_grace(&mut self, grace: Grace) {
        self.grace = grace;
    }

    /// The shell's clock advanced to `now` (any fixed origin): orphans
    /// whose client did not come back in time end cancelled, and stranded
    /// jobs that no node joined for in time fail.
    pub fn handle_tick(&mut self, now: Duration) {
        self.now = now;
        let expired: Vec<JobId> = self
            .orphans
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            let orphan = self.orphans.remove(&id).expect("listed above");
            let reason = format!(
                "its caller went away and did not come back within {} s",
                orphan.grace.as_secs()
            );
            self.remember_status(orphan.status, JobState::Cancelled(reason), Some(orphan.token));
        }
        let mut gave_up = Vec::new();
        for (&id, job) in self.jobs.iter_mut() {
            let Some((since, why)) = &job.stranded else {
                continue;
            };
            let hosted = !job.slots.is_empty() || self.nodes.values().any(|n| n.can_ever_host(&job.spec.call));
            if hosted {
                job.stranded = None;
            } else if now.saturating_sub(*since) >= self.grace.node {
                gave_up.push((id, why.clone()));
            }
        }
        for (id, why) in gave_up {
            let reason = format!(
                "{why} and no node that can host a call of this job joined within {} s; its unfinished inputs \
                 were not run. Add a node and run the job again",
                self.grace.node.as_secs()
            );
            self.fail_job(id, FailureKind::Job, reason);
        }
    }

    /// Marks the jobs without slots that no remaining node can host as
    /// stranded by node `lost`: they wait for the node grace period (at
    /// the next tick) for a node to join, and fail if none does. Without a
    /// grace period they fail at once.
    pub(super) fn strand_jobs(&mut self, lost: &str) {
        let now = self.now;
        let mut told = Vec::new();
        for (&id, job) in self.jobs.iter_mut() {
            if job.stranded.is_some()
                || !job.slots.is_empty()
                || self.nodes.values().any(|n| n.can_ever_host(&job.spec.call))
            {
                continue;
            }
            job.stranded = Some((now, format!("node {lost} was lost")));
            told.push((id, job.client));
        }
        if self.grace.node.is_zero() {
            self.handle_tick(now);
            return;
        }
        for (job, client) in told {
            let text = format!(
                "fleetmap: node {lost} was lost and no other node can host this job's calls; waiting up to {} s \
                 for one to join",
                self.grace.node.as_secs()
            );
            let line = LogLine {
                job,
                stream: OutputStream::Stderr,
                node: "coordinator".into(),
                text,
            };
            self.send_to_client(client, CoordinatorToClient::Log(line));
        }
    }

    /// The client's connection ended; `abrupt`: without a goodbye (timed
    /// out or reset). Its jobs with a resume token and a grace period wait
    /// for it as orphans; the rest end cancelled.
    pub fn handle_client_lost(&mut self, client: ClientId, abrupt: bool) {
        self.backlogged.remove(&client);
        let jobs: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.client == client)
            .map(|(&k, _)| k)
            .collect();
        // End them all before any freed slot goes to a waiting job: one
        // of them could otherwise get slots (started on nodes, credit sent
        // to the gone client) just before it is stopped too.
        for job in jobs {
            let j = &self.jobs[&job];
            match j.resume {
                // A detached job with all its inputs needs no client.
                _ if j.detached && j.total_chunks.is_some() => {}
                Some((token, grace)) if abrupt && !grace.is_zero() => self.orphan(job, token, grace),
                _ => self.end_job(job, JobState::Cancelled("its caller went away".into())),
            }
        }
        self.grow_jobs();
    }

    /// Stops job `id`'s calls and keeps it waiting for its client.
    fn orphan(&mut self, id: JobId, token: [u8; 32], grace: Duration) {
        let until = format!("for its caller to come back (up to {} s)", grace.as_secs());
        let mut status = self.job_status(id, JobState::Waiting(until));
        status.ended = None;
        status.slots = 0;
        status.nodes = 0;
        status.per_node.iter_mut().for_each(|n| n.slots = 0);
        let next_slot = self.jobs[&id].next_slot;
        self.drop_job(id, false);
        let deadline = self.now + grace;
        self.orphans.insert(
            id,
            Orphan {
                status,
                next_slot,
                token,
                grace,
                deadline,
            },
        );
    }

    /// What a submission that resumes job `id` of `principal` with the
    /// token hashed to `token` finds there.
    pub(super) fn find_resumed(&self, id: JobId, principal: &str, token: &[u8; 32]) -> Found {
        if let Some(o) = self.orphans.get(&id) {
            return match o.status.principal == principal && same_token(&o.token, token) {
                true => Found::Mine,
                false => Found::Taken,
            };
        }
        if let Some(j) = self.jobs.get(&id) {
            let mine = j.spec.principal == principal && j.resume.is_some_and(|(t, _)| same_token(&t, token));
            return if mine { Found::Mine } else { Found::Taken };
        }
        let ended = self.recent.iter().rev().find(|(status, _)| status.job == id);
        match ended {
            Some((status, Some(t))) if status.principal == principal && same_token(t, token) => {
                Found::Ended(status.state.clone())
            }
            Some(_) => Found::Taken,
            None if id.0 >= self.next_job.0 => Found::Free,
            // Below the next id and unknown: a job of this coordinator
            // that ended long ago (or another's): not reused.
            None => Found::Taken,
        }
    }

    /// Resolves a resuming submission before it is accepted: where its new
    /// incarnation starts (`None`: it is a new job), or `Err` once it has
    /// been answered with why it cannot.
    pub(super) fn resume_id(
        &mut self,
        client: ClientId,
        request: RequestId,
        principal: &str,
        resumable: &Resumable,
    ) -> Result<Option<Resumed>, ()> {
        let Some((id, _)) = resumable.resumes else {
            return Ok(None);
        };
        match self.find_resumed(id, principal, &token_hash(&resumable.token)) {
            Found::Mine => {
                // The job lives on under the same id, in a new incarnation
                // whose slot ids follow the old one's.
                if let Some(orphan) = self.orphans.remove(&id) {
                    return Ok(Some(Resumed {
                        id,
                        next_slot: orphan.next_slot,
                        started: Some(orphan.status.started),
                    }));
                }
                let (next_slot, started) = (self.jobs[&id].next_slot, self.jobs[&id].started);
                self.drop_job(id, false);
                self.grow_jobs();
                Ok(Some(Resumed {
                    id,
                    next_slot,
                    started: Some(started),
                }))
            }
            Found::Free => Ok(Some(Resumed {
                id,
                next_slot: SlotId(0),
                started: None,
            })),
            Found::Taken => Ok(None),
            Found::Ended(state) => {
                let how = match state {
                    JobState::Cancelled(why) if why.starts_with("by ") => format!("was cancelled {why}"),
                    JobState::Cancelled(why) => format!("was cancelled ({why})"),
                    JobState::Failed(why) => format!("failed: {why}"),
                    other => format!("ended ({other:?})"),
                };
                let reason = format!("job {id} {how} while its caller was away; run it again");
                self.send_to_client(client, CoordinatorToClient::JobRejected { request, reason });
                Err(())
            }
        }
    }

    /// Keeps `status` among the recent listings, ended now in `state`.
    pub(super) fn remember_status(&mut self, mut status: JobStatus, state: JobState, token: Option<[u8; 32]>) {
        self.counters.ended(&state);
        status.state = state;
        status.ended = Some(super::unix_now());
        if self.recent.len() >= super::MAX_RECENT_JOBS {
            if let Some((gone, _)) = self.recent.pop_front() {
                // What a detached job left goes with its listing.
                self.out
                    .push_back(super::Command::Store(super::Store::Forget { job: gone.job }));
            }
        }
        self.recent.push_back((status, token));
    }

    /// Cancels orphan `id` of `principal` for `by` (an operator's `fleetmap
    /// jobs cancel`, the dashboard); whether there was one.
    pub(super) fn cancel_orphan(&mut self, id: JobId, principal: &str, by: &str) -> bool {
        if self.orphans.get(&id).is_none_or(|o| o.status.principal != principal) {
            return false;
        }
        let orphan = self.orphans.remove(&id).expect("checked above");
        self.remember_status(
            orphan.status,
            JobState::Cancelled(format!("by {by}")),
            Some(orphan.token),
        );
        true
    }
}
