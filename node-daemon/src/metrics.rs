//! The node daemon's Prometheus metrics, served on the operator's HTTP
//! address (`NodeConfig::http`, `/metrics`): what its slots did (chunks and
//! calls, how long calls took, workers killed by the OOM killer or dead
//! otherwise) as it happened, and at each scrape what its slot cgroups use
//! now (memory, CPU time of their live processes), its warm workers, and
//! the environments and images it built.

use std::sync::Arc;

use fleetmap_net::http::{Handler, HttpRequest, HttpResponse};
use fleetmap_protocol::worker::CrashKind;
use fleetmap_sandbox::cgroup::CgroupTree;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

type Labels = Vec<(String, String)>;

/// What the slots report as it happens.
pub(crate) struct NodeMetrics {
    chunks: Counter,
    inputs: Counter,
    /// Seconds per call: a chunk's run time spread over its inputs.
    call_seconds: Histogram,
    /// Workers that died, by how (`oom`, `crash`).
    worker_deaths: Family<Labels, Counter>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            chunks: Counter::default(),
            inputs: Counter::default(),
            // 0.1 ms to about 30 minutes.
            call_seconds: Histogram::new(exponential_buckets(0.0001, 2.5, 19)),
            worker_deaths: Family::default(),
        }
    }
}

impl NodeMetrics {
    /// A chunk of `inputs` inputs ran for `seconds`.
    pub(crate) fn chunk_done(&self, inputs: u32, seconds: f64) {
        self.chunks.inc();
        self.inputs.inc_by(u64::from(inputs));
        let per_call = seconds / f64::from(inputs.max(1));
        for _ in 0..inputs {
            self.call_seconds.observe(per_call);
        }
    }

    pub(crate) fn worker_died(&self, kind: CrashKind) {
        let how = match kind {
            CrashKind::OutOfMemory => "oom",
            CrashKind::Died => "crash",
        };
        self.worker_deaths
            .get_or_create(&vec![("how".to_string(), how.to_string())])
            .inc();
    }
}

/// What a scrape reads besides the counts: the node's state now.
pub(crate) struct Scrape {
    pub node: String,
    pub metrics: Arc<NodeMetrics>,
    pub cgroups: Option<Arc<CgroupTree>>,
    pub warm_workers: Arc<dyn Fn() -> usize + Send + Sync>,
    pub environments_built: Arc<dyn Fn() -> u64 + Send + Sync>,
    pub images_pulled: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Scrape {
    fn render(&self) -> String {
        let mut registry = Registry::with_prefix("fleetmap_node");
        let m = &self.metrics;
        registry.register("chunks", "Chunks of inputs run", m.chunks.clone());
        registry.register("inputs", "Inputs run", m.inputs.clone());
        registry.register(
            "call_seconds",
            "Seconds per call (a chunk's run time spread over its inputs)",
            m.call_seconds.clone(),
        );
        registry.register(
            "worker_deaths",
            "Workers that died: killed by the OOM killer (oom) or otherwise (crash)",
            m.worker_deaths.clone(),
        );
        let count = |value: u64| {
            let c: Counter = Counter::default();
            c.inc_by(value);
            c
        };
        registry.register(
            "environments_built",
            "Job environments built",
            count((self.environments_built)()),
        );
        registry.register(
            "images_pulled",
            "Images pulled and unpacked",
            count((self.images_pulled)()),
        );
        let warm: Gauge = Gauge::default();
        warm.set(i64::try_from((self.warm_workers)()).unwrap_or(i64::MAX));
        registry.register("warm_workers", "Idle workers kept warm", warm);
        let slots: Gauge = Gauge::default();
        let memory = Family::<Labels, Gauge>::default();
        let cpu = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        if let Some(tree) = &self.cgroups {
            let usage = tree.slot_usage();
            slots.set(usage.len() as i64);
            let ticks = clock_ticks();
            for slot in usage {
                let labels = vec![("slot".to_string(), slot.name.clone())];
                if let Some(bytes) = slot.memory_bytes {
                    memory
                        .get_or_create(&labels)
                        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
                }
                let seconds: f64 = slot.pids.iter().map(|&pid| cpu_ticks(pid)).sum::<u64>() as f64 / ticks;
                cpu.get_or_create(&labels).set(seconds);
            }
        }
        registry.register("slot_cgroups", "Slot cgroups, warm workers' included", slots);
        registry.register("slot_memory_bytes", "Memory a slot cgroup uses now", memory);
        registry.register("slot_cpu_seconds", "CPU time of a slot cgroup's live processes", cpu);
        let (utilization, gpu_memory) = (
            Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default(),
            Family::<Labels, Gauge>::default(),
        );
        for gpu in gpu_use() {
            let labels = vec![("gpu".to_string(), gpu.index.to_string())];
            utilization.get_or_create(&labels).set(gpu.utilization);
            gpu_memory
                .get_or_create(&labels)
                .set(i64::try_from(gpu.memory_bytes).unwrap_or(i64::MAX));
        }
        registry.register(
            "gpu_utilization_ratio",
            "How busy each GPU was over the driver's last sample (0 to 1), where nvidia-smi is present",
            utilization,
        );
        registry.register(
            "gpu_memory_used_bytes",
            "Memory in use on each GPU, where nvidia-smi is present",
            gpu_memory,
        );
        let info = Family::<Labels, Gauge>::default();
        info.get_or_create(&vec![("node".to_string(), self.node.clone())])
            .set(1);
        registry.register("info", "The node's name", info);
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// One GPU's use as the driver reports it.
#[derive(Debug, Clone, PartialEq)]
struct GpuUse {
    index: u32,
    utilization: f64,
    memory_bytes: u64,
}

/// Each GPU's use, from the NVIDIA driver's management library through
/// `nvidia-smi` (none where it is missing or does not answer in 2 s).
fn gpu_use() -> Vec<GpuUse> {
    let Some(smi) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("nvidia-smi"))
        .find(|p| p.is_file())
    else {
        return vec![];
    };
    let Ok(mut child) = std::process::Command::new(smi)
        .args([
            "--query-gpu=index,utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return vec![];
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => {
                let mut text = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut out, &mut text);
                }
                return parse_gpu_use(&text);
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    vec![]
}

/// `nvidia-smi --query-gpu=index,utilization.gpu,memory.used
/// --format=csv,noheader,nounits` lines: `0, 37, 1024` (percent, MiB).
fn parse_gpu_use(text: &str) -> Vec<GpuUse> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(str::trim);
            Some(GpuUse {
                index: fields.next()?.parse().ok()?,
                utilization: fields.next()?.parse::<f64>().ok()? / 100.0,
                memory_bytes: fields.next()?.parse::<u64>().ok()? << 20,
            })
        })
        .collect()
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s CPU times.
fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&t| t > 0)
        .unwrap_or(100) as f64
}

/// User and system CPU ticks of process `pid` (0 once it is gone).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'. utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

pub(crate) fn handler(scrape: Arc<Scrape>) -> Handler {
    Arc::new(move |request: HttpRequest| {
        let scrape = scrape.clone();
        Box::pin(async move {
            match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/metrics") => {
                    // Cgroup and /proc files: read off the runtime's threads.
                    let text = tokio::task::spawn_blocking(move || scrape.render())
                        .await
                        .unwrap_or_default();
                    HttpResponse::new(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
                }
                _ => HttpResponse::text(404, "not found: this address serves /metrics"),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_cpu_time_is_read_from_its_stat() {
        // This process has run some code by now.
        let busy: u64 = (0..2_000_000u64).map(|i| i ^ (i >> 3)).sum();
        assert!(busy > 0);
        let ticks = cpu_ticks(std::process::id());
        assert!(ticks < 1_000_000_000);
        assert_eq!(cpu_ticks(u32::MAX), 0);
    }

    #[test]
    fn gpu_use_is_read_from_nvidia_smi_lines() {
        let text = "0, 37, 1024\n1, 100, 81559\n[Not Supported]\n";
        assert_eq!(
            parse_gpu_use(text),
            vec![
                GpuUse {
                    index: 0,
                    utilization: 0.37,
                    memory_bytes: 1 << 30
                },
                GpuUse {
                    index: 1,
                    utilization: 1.0,
                    memory_bytes: 81559 << 20
                },
            ]
        );
    }

    #[test]
    fn calls_are_counted_and_timed() {
        let m = Arc::new(NodeMetrics::default());
        m.chunk_done(4, 2.0);
        m.worker_died(CrashKind::OutOfMemory);
        let scrape = Scrape {
            node: "n".into(),
            metrics: m,
            cgroups: None,
            warm_workers: Arc::new(|| 3),
            environments_built: Arc::new(|| 1),
            images_pulled: Arc::new(|| 0),
        };
        let text = scrape.render();
        assert!(text.contains("fleetmap_node_inputs_total 4"), "{text}");
        assert!(text.contains("fleetmap_node_call_seconds_count 4"), "{text}");
        assert!(
            text.contains("fleetmap_node_worker_deaths_total{how=\"oom\"} 1"),
            "{text}"
        );
        assert!(text.contains("fleetmap_node_warm_workers 3"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
