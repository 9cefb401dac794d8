//! What the emulator prints: a table per job, one JSON object per job with
//! `--json`, and a summary over several jobs.

use std::time::Duration;

use serde::Serialize;

use crate::{
    job::JobReport,
    procfs::{cores, ThreadCpu, USER_HZ},
    Args,
};

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

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The derived numbers of one job, shared by the table and the JSON.
pub struct Derived {
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

pub fn derive(args: &Args, r: &JobReport) -> Derived {
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

pub fn print_table(args: &Args, fleet_nodes: u32, r: &JobReport, d: &Derived) {
    let cores = cores();
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

/// One job as a JSON object (`--json`): one line per job, keys in this order.
#[derive(Serialize)]
pub struct JobJson {
    job: u64,
    /// Nodes in the fleet.
    nodes: u32,
    slots_per_node: u32,
    /// Slots the job was placed on, and on how many nodes.
    slots: u32,
    job_nodes: u32,
    initial_credit: u32,
    inputs: u64,
    chunk: u32,
    chunks: u64,
    payload: usize,
    call_ms: f64,
    place_s: f64,
    slots_started_s: Option<f64>,
    first_output_s: f64,
    job_s: f64,
    inputs_per_s: f64,
    chunks_per_s: f64,
    ideal_s: Option<f64>,
    efficiency: Option<f64>,
    /// The coordinator's own thread in this process, else the external
    /// coordinator's process with `--coordinator-pid`.
    coordinator_cpu_s: Option<f64>,
    coordinator_cpu_us_per_input: Option<f64>,
    coordinator_core_share: Option<f64>,
    coordinator_wait_s: Option<f64>,
    emulator_cpu_s: f64,
    process_cpu_s: f64,
    process_cpu_us_per_input: f64,
    machine_busy_s: f64,
    process_vm_hwm_kib_before: u64,
    process_vm_hwm_kib_after: u64,
    process_vm_rss_kib_after: u64,
    coordinator_vm_hwm_kib_before: Option<u64>,
    coordinator_vm_hwm_kib_after: Option<u64>,
    cores: usize,
}

/// `x` to `digits` decimals: the measurements are no finer than that (CPU
/// ticks are 10 ms), and the JSON keeps the precision it always printed.
fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

pub fn job_json(args: &Args, fleet_nodes: u32, r: &JobReport, d: &Derived) -> JobJson {
    let micros = |v: f64| round(v, 6);
    let coord_cpu = d.coord.map(|c| c.run_ns as f64 / 1e9).or(d.external_cpu_s);
    JobJson {
        job: r.job.0,
        nodes: fleet_nodes,
        slots_per_node: args.slots,
        slots: r.slots,
        job_nodes: r.nodes,
        initial_credit: r.initial_credit,
        inputs: r.outputs,
        chunk: args.chunk,
        chunks: r.chunks,
        payload: args.payload,
        call_ms: args.call_ms,
        place_s: micros(r.place.as_secs_f64()),
        slots_started_s: r.slots_started.map(|(t, _, _)| micros(t.as_secs_f64())),
        first_output_s: micros(r.first_output.as_secs_f64()),
        job_s: micros(d.secs),
        inputs_per_s: round(d.inputs_per_s, 1),
        chunks_per_s: round(d.chunks_per_s, 1),
        ideal_s: d.ideal_s.map(micros),
        efficiency: d.efficiency.map(micros),
        coordinator_cpu_s: coord_cpu.map(micros),
        coordinator_cpu_us_per_input: coord_cpu.map(|c| micros(c * 1e6 / args.inputs as f64)),
        coordinator_core_share: coord_cpu.map(|c| micros(c / d.secs)),
        coordinator_wait_s: d.coord.map(|c| micros(c.wait_ns as f64 / 1e9)),
        emulator_cpu_s: micros(d.emulator.run_ns as f64 / 1e9),
        process_cpu_s: round(d.process_cpu_s, 2),
        process_cpu_us_per_input: round(d.process_cpu_s * 1e6 / args.inputs as f64, 4),
        machine_busy_s: round(d.machine_busy_s, 2),
        process_vm_hwm_kib_before: r.before.process.vm_hwm_kib,
        process_vm_hwm_kib_after: r.after.process.vm_hwm_kib,
        process_vm_rss_kib_after: r.after.process.vm_rss_kib,
        coordinator_vm_hwm_kib_before: r.before.coordinator.map(|c| c.vm_hwm_kib),
        coordinator_vm_hwm_kib_after: r.after.coordinator.map(|c| c.vm_hwm_kib),
        cores: cores(),
    }
}

/// One line per job, then the median: jobs on a shared machine vary.
pub fn print_summary(args: &Args, reports: &[JobReport]) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;
    use fleetmap_protocol::JobId;

    use super::{derive, job_json};
    use crate::{job::JobReport, Args};

    /// The keys scripts read, in the order the emulator has always printed
    /// them; a new key goes at the end.
    #[test]
    fn the_json_keeps_its_keys_and_their_order() {
        let args = Args::try_parse_from(["fleet_emulator", "--inputs", "1000", "--chunk", "10"]).unwrap();
        let report = JobReport {
            job: JobId(3),
            slots: 8,
            nodes: 2,
            initial_credit: 27,
            chunks: 100,
            place: Duration::from_millis(1),
            slots_started: Some((Duration::from_millis(1), 2, 8)),
            first_output: Duration::from_millis(2),
            total: Duration::from_millis(40),
            outputs: 1000,
            before: Default::default(),
            after: Default::default(),
        };
        let text = serde_json::to_string(&job_json(&args, 2, &report, &derive(&args, &report))).unwrap();
        // Every value is a number or null, so commas and colons only
        // separate; `serde_json::Value` would sort the keys.
        let keys: Vec<&str> = text
            .trim_matches(['{', '}'])
            .split(',')
            .map(|pair| pair.split(':').next().unwrap().trim_matches('"'))
            .collect();
        assert_eq!(
            keys,
            [
                "job",
                "nodes",
                "slots_per_node",
                "slots",
                "job_nodes",
                "initial_credit",
                "inputs",
                "chunk",
                "chunks",
                "payload",
                "call_ms",
                "place_s",
                "slots_started_s",
                "first_output_s",
                "job_s",
                "inputs_per_s",
                "chunks_per_s",
                "ideal_s",
                "efficiency",
                "coordinator_cpu_s",
                "coordinator_cpu_us_per_input",
                "coordinator_core_share",
                "coordinator_wait_s",
                "emulator_cpu_s",
                "process_cpu_s",
                "process_cpu_us_per_input",
                "machine_busy_s",
                "process_vm_hwm_kib_before",
                "process_vm_hwm_kib_after",
                "process_vm_rss_kib_after",
                "coordinator_vm_hwm_kib_before",
                "coordinator_vm_hwm_kib_after",
                "cores",
            ]
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["job"], 3);
        assert_eq!(json["inputs_per_s"], 25000.0);
        assert_eq!(json["ideal_s"], serde_json::Value::Null);
    }
}
