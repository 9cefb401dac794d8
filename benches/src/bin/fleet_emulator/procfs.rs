//! CPU time and memory from `/proc`: of this process's threads by name, of
//! the whole process, of an external coordinator and of the machine.

use std::collections::BTreeMap;

/// Clock ticks per second in `/proc/*/stat` (USER_HZ, 100 on every Linux ABI).
pub const USER_HZ: u64 = 100;

/// The CPU cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// CPU time of a group of threads of this process that share a name.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadCpu {
    /// On-CPU time from `schedstat` (nanoseconds).
    pub run_ns: u64,
    /// Time runnable but waiting for a CPU, from `schedstat` (nanoseconds).
    pub wait_ns: u64,
    /// utime + stime from `stat` (clock ticks).
    pub ticks: u64,
    pub threads: u32,
}

impl ThreadCpu {
    pub fn minus(self, before: ThreadCpu) -> ThreadCpu {
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
pub struct ProcSample {
    pub ticks: u64,
    pub vm_hwm_kib: u64,
    pub vm_rss_kib: u64,
}

/// What `/proc` says at one moment: a job's numbers are the difference of
/// the snapshots taken before and after it.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub process: ProcSample,
    /// This process's threads by name (`coordinator`, `emulator`, ...).
    pub threads: BTreeMap<String, ThreadCpu>,
    /// An external coordinator's process, with `--coordinator-pid`.
    pub coordinator: Option<ProcSample>,
    /// The whole machine from `/proc/stat`: (busy, total) ticks of all CPUs.
    pub machine: (u64, u64),
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

/// Reads everything a [`Snapshot`] holds; what cannot be read is zero.
pub fn snapshot(coordinator_pid: Option<u32>) -> Snapshot {
    Snapshot {
        process: proc_sample("/proc/self").unwrap_or_default(),
        threads: thread_cpu(),
        coordinator: coordinator_pid.and_then(|pid| proc_sample(&format!("/proc/{pid}"))),
        machine: machine_ticks(),
    }
}
