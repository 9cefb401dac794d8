//! Warm workers: a worker whose job finished cleanly waits here for the
//! next job with the same key, so that job pays no interpreter start-up and
//! no imports (modules a worker imported stay imported: that is the point).
//!
//! The rule (see ARCHITECTURE.md): a warm worker serves only jobs with its
//! exact [`WorkerKey`] (the same principal, interpreter, caller's Python
//! version and GPUs), and never after a crash, an OOM kill or a cancel
//! (those workers are killed, not returned). A worker that has served
//! [`WarmPolicy::max_jobs`] jobs or lived [`WarmPolicy::max_age`] is
//! retired, and so is one whose memory in use is above the next job's
//! limit (checked by the slot when it takes one).
//!
//! The pool holds any `W`, so that its policy is tested without processes;
//! dropping a `W` must kill the worker.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// What a warm worker may serve: only jobs with the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct WorkerKey {
    /// The principal whose code the worker ran (from its API key); `None`
    /// for a worker started ahead of any job, which has run no one's code
    /// and may serve any principal and Python version once.
    pub principal: Option<String>,
    /// The interpreter it runs.
    pub program: String,
    /// The environment id of its job (`None`: the interpreter as it is):
    /// a worker never serves a job of another environment.
    pub environment: Option<String>,
    /// The caller's Python `major.minor`.
    pub caller_python: String,
    /// The GPU minors its cgroup's device rules allow (they are not
    /// rewritten for a new job).
    pub gpus: Vec<u32>,
}

/// How long warm workers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmPolicy {
    /// The most idle workers kept (0 turns reuse off).
    pub max_idle: usize,
    /// Workers started ahead of any job, with the interpreter up and the
    /// worker loaded, so that even a first job finds them (capped by the
    /// node's cores).
    pub prestart: usize,
    /// A worker is retired after this many jobs. High by default: a
    /// retirement costs the next job a fresh interpreter and its imports,
    /// and growth in memory retires a worker anyway (checked against each
    /// job's limit), as its age does.
    pub max_jobs: u32,
    /// A worker is retired once this old.
    pub max_age: Duration,
}

impl Default for WarmPolicy {
    fn default() -> Self {
        Self {
            max_idle: 64,
            prestart: 8,
            max_jobs: 10_000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// A worker with what the pool knows of it.
#[derive(Debug)]
pub(crate) struct Warm<W> {
    pub key: WorkerKey,
    pub born: Instant,
    /// Jobs it has served, the one it just finished included.
    pub jobs_served: u32,
    pub worker: W,
}

/// The node's idle warm workers.
#[derive(Debug)]
pub(crate) struct WorkerPool<W> {
    idle: Mutex<Vec<Warm<W>>>,
    policy: WarmPolicy,
    /// Set when the node stops: a worker given back after that is dropped.
    closed: std::sync::atomic::AtomicBool,
}

impl<W> WorkerPool<W> {
    pub fn new(policy: WarmPolicy) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            policy,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Warm<W>>> {
        // The lock is held only to move entries in and out; a panic while
        // holding it would be a bug in this file.
        self.idle.lock().expect("worker pool lock poisoned")
    }

    /// The most recently returned idle worker with `key` (its caches are
    /// the warmest), else one started ahead of any job with the same
    /// interpreter and devices, if one is not due for retirement at `now`.
    pub fn take(&self, key: &WorkerKey, now: Instant) -> Option<Warm<W>> {
        let mut idle = self.idle();
        // Retire the old ones first: dropping them kills them.
        idle.retain(|w| now.duration_since(w.born) < self.policy.max_age);
        let at = idle.iter().rposition(|w| &w.key == key).or_else(|| {
            idle.iter()
                .rposition(|w| w.key.principal.is_none() && w.key.program == key.program && w.key.gpus == key.gpus)
        })?;
        Some(idle.remove(at))
    }

    /// How many idle workers were started ahead of any job.
    pub fn pristine(&self) -> usize {
        self.idle().iter().filter(|w| w.key.principal.is_none()).count()
    }

    /// The policy the pool keeps.
    pub fn policy(&self) -> WarmPolicy {
        self.policy
    }

    /// Takes back a worker whose job finished cleanly. It is dropped
    /// (killed) instead if it has served enough jobs or lived long enough;
    /// if the pool is full, the idle worker returned longest ago goes.
    pub fn give_back(&self, warm: Warm<W>, now: Instant) {
        if self.policy.max_idle == 0
            || warm.jobs_served >= self.policy.max_jobs
            || now.duration_since(warm.born) >= self.policy.max_age
        {
            return;
        }
        let mut idle = self.idle();
        // Read under the lock `close` sets it under.
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if idle.len() >= self.policy.max_idle {
            idle.remove(0);
        }
        idle.push(warm);
    }

    /// How many workers are idle.
    pub fn len(&self) -> usize {
        self.idle().len()
    }

    /// Takes every idle worker out and keeps none given back from now on
    /// (a slot that ends while the node stops).
    pub fn close(&self) -> Vec<Warm<W>> {
        let mut idle = self.idle();
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        std::mem::take(&mut *idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(principal: &str) -> WorkerKey {
        WorkerKey {
            principal: Some(principal.into()),
            program: "/usr/bin/python3".into(),
            environment: None,
            caller_python: "3.11".into(),
            gpus: vec![],
        }
    }

    fn warm(principal: &str, born: Instant, jobs_served: u32, worker: u32) -> Warm<u32> {
        Warm {
            key: key(principal),
            born,
            jobs_served,
            worker,
        }
    }

    #[test]
    fn a_worker_serves_only_its_own_key() {
        let pool = WorkerPool::new(WarmPolicy::default());
        let now = Instant::now();
        pool.give_back(warm("alice", now, 1, 7), now);
        assert!(pool.take(&key("bob"), now).is_none(), "another principal");
        let mut other_python = key("alice");
        other_python.caller_python = "3.12".into();
        assert!(pool.take(&other_python, now).is_none(), "another environment");
        let mut with_gpu = key("alice");
        with_gpu.gpus = vec![0];
        assert!(pool.take(&with_gpu, now).is_none(), "other devices");
        assert_eq!(pool.take(&key("alice"), now).map(|w| w.worker), Some(7));
        assert!(pool.take(&key("alice"), now).is_none(), "taken once");
    }

    #[test]
    fn a_worker_started_ahead_serves_any_principal_with_its_interpreter_and_devices() {
        let pool = WorkerPool::new(WarmPolicy::default());
        let now = Instant::now();
        let ahead = Warm {
            key: WorkerKey {
                principal: None,
                caller_python: String::new(),
                ..key("")
            },
            born: now,
            jobs_served: 0,
            worker: 9,
        };
        pool.give_back(ahead, now);
        assert_eq!(pool.pristine(), 1);
        let mut with_gpu = key("bob");
        with_gpu.gpus = vec![0];
        assert!(pool.take(&with_gpu, now).is_none(), "other devices");
        let mut other_python = key("bob");
        other_python.program = "/opt/python3.12/bin/python3".into();
        assert!(pool.take(&other_python, now).is_none(), "another interpreter");
        // An exact match is preferred to a worker started ahead.
        pool.give_back(warm("bob", now, 1, 4), now);
        assert_eq!(pool.take(&key("bob"), now).map(|w| w.worker), Some(4));
        assert_eq!(pool.take(&key("bob"), now).map(|w| w.worker), Some(9));
        assert_eq!(pool.pristine(), 0);
    }

    #[test]
    fn the_warmest_worker_goes_first_and_a_full_pool_drops_the_coldest() {
        let pool = WorkerPool::new(WarmPolicy {
            max_idle: 2,
            ..WarmPolicy::default()
        });
        let now = Instant::now();
        for worker in [1, 2, 3] {
            pool.give_back(warm("alice", now, 1, worker), now);
        }
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.take(&key("alice"), now).map(|w| w.worker), Some(3));
        assert_eq!(pool.take(&key("alice"), now).map(|w| w.worker), Some(2));
    }

    #[test]
    fn workers_retire_by_jobs_served_and_by_age() {
        let policy = WarmPolicy {
            max_idle: 8,
            prestart: 0,
            max_jobs: 3,
            max_age: Duration::from_secs(60),
        };
        let pool = WorkerPool::new(policy);
        let now = Instant::now();
        pool.give_back(warm("alice", now, 3, 1), now);
        assert_eq!(pool.len(), 0, "served its last job");
        pool.give_back(warm("alice", now, 2, 2), now);
        assert_eq!(pool.len(), 1);
        let later = now + Duration::from_secs(61);
        assert!(pool.take(&key("alice"), later).is_none(), "too old to serve");
        assert_eq!(pool.len(), 0, "and retired");
        let off = WorkerPool::new(WarmPolicy { max_idle: 0, ..policy });
        off.give_back(warm("alice", now, 1, 3), now);
        assert_eq!(off.len(), 0, "max_idle 0 turns reuse off");
        let stopping = WorkerPool::new(policy);
        stopping.give_back(warm("alice", now, 1, 4), now);
        assert_eq!(stopping.close().len(), 1);
        stopping.give_back(warm("alice", now, 1, 5), now);
        assert_eq!(stopping.len(), 0, "a closed pool keeps nothing given back");
    }
}
