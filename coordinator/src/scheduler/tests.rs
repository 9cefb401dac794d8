use super::fairness::{plan_reclaims, Reclaim};
use super::placement::Node;
use super::*;
use crate::keys::Quota;
use fleetmap_protocol::{CallRequest, InputIndex, RuntimeSpec};

const GIB: u64 = 1 << 30;

fn resources(cores: u32, memory_gib: u64) -> Resources {
    Resources {
        cores,
        memory_bytes: memory_gib * GIB,
        gpus: vec![],
    }
}

fn spec(cores: u32, memory_gib: u64, parallelism: Option<u32>, total: u64) -> JobSpec {
    JobSpec {
        principal: String::new(),
        job_key: String::new(),
        parent: None,
        call: CallRequest {
            cores,
            memory_bytes: memory_gib * GIB,
            gpus: 0,
            require_isolation: false,
        },
        parallelism,
        total_inputs: Some(total),
        name: "job".into(),
        runtime: RuntimeSpec::Python {
            executable: "python3".into(),
            version: "3.11".into(),
            function: vec![1, 2, 3],
            environment: None,
            sources: None,
            image: None,
        },
    }
}

fn chunk(id: u64) -> InputChunk {
    InputChunk {
        chunk: ChunkId(id),
        first_input: InputIndex(id * 10),
        count: 10,
        payload: vec![id as u8],
    }
}

fn output(c: &InputChunk) -> OutputChunk {
    OutputChunk {
        chunk: c.chunk,
        first_input: c.first_input,
        count: c.count,
        failed: 0,
        node: "n".into(),
        payload: c.payload.clone(),
    }
}

fn drain(s: &mut Scheduler) -> Vec<Command> {
    std::iter::from_fn(|| s.poll_command()).collect()
}

/// The `RunChunk` commands among `cmds`, as (node, slot, chunk).
fn runs(cmds: &[Command]) -> Vec<(NodeId, SlotId, InputChunk)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ToNode {
                node,
                msg: CoordinatorToNode::RunChunk { slot, chunk, .. },
            } => Some((*node, *slot, chunk.clone())),
            _ => None,
        })
        .collect()
}

fn accepted(cmds: &[Command]) -> (JobId, u32, u32) {
    cmds.iter()
        .find_map(|c| match c {
            Command::ToClient {
                msg: CoordinatorToClient::JobAccepted { job, slots, credit, .. },
                ..
            } => Some((*job, *slots, *credit)),
            _ => None,
        })
        .expect("job accepted")
}

fn pinned(description: &str) -> NodeIsolation {
    NodeIsolation {
        pinned: true,
        description: description.into(),
    }
}

fn unpinned() -> NodeIsolation {
    NodeIsolation {
        pinned: false,
        description: "NOT pinned (CPU affinity only): cgroups turned off".into(),
    }
}

#[test]
fn a_job_that_requires_isolation_runs_only_on_pinned_nodes() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "loose".into(), resources(8, 64), unpinned());
    s.handle_node_joined(NodeId(2), "tight".into(), resources(2, 64), pinned("cgroup v2"));
    let mut isolated = spec(1, 1, None, 1000);
    isolated.call.require_isolation = true;
    s.handle_submit(ClientId(9), RequestId(0), isolated.clone());
    let (job, slots, _) = accepted(&drain(&mut s));
    assert_eq!(slots, 2);
    assert_eq!(s.slots_of(job), BTreeMap::from([("tight".into(), 2)]));
    // Another job that does not care takes the rest, on the loose node too.
    s.handle_submit(ClientId(9), RequestId(1), spec(1, 1, None, 1000));
    let (other, _, _) = accepted(&drain(&mut s));
    assert_eq!(s.slots_of(other).get("loose"), Some(&8));
    // With only unpinned nodes, it is refused at once, naming them.
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "loose".into(), resources(8, 64), unpinned());
    s.handle_submit(ClientId(9), RequestId(2), isolated);
    let cmds = drain(&mut s);
    let Some(Command::ToClient {
        msg: CoordinatorToClient::JobRejected { reason, .. },
        ..
    }) = cmds.first()
    else {
        panic!("expected a rejection: {cmds:?}");
    };
    assert!(
        reason.contains("requires isolation") && reason.contains("loose: NOT pinned"),
        "{reason}"
    );
}

#[test]
fn slots_spread_over_nodes_within_their_resources() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "b".into(), resources(2, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 1000));
    let cmds = drain(&mut s);
    let (job, slots, _) = accepted(&cmds);
    assert_eq!(slots, 6);
    assert_eq!(s.slots_of(job), BTreeMap::from([("a".into(), 4), ("b".into(), 2)]));
}

#[test]
fn parallelism_and_input_count_cap_the_slots() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(64, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, Some(5), 1000));
    assert_eq!(accepted(&drain(&mut s)).1, 5);
    s.handle_submit(ClientId(9), RequestId(1), spec(1, 1, None, 3));
    assert_eq!(accepted(&drain(&mut s)).1, 3);
}

#[test]
fn memory_limits_slots_per_node() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(16, 8), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 3, None, 100));
    assert_eq!(accepted(&drain(&mut s)).1, 2);
}

#[test]
fn a_job_no_node_can_host_is_rejected_naming_the_short_resource() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "small".into(), resources(2, 4), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "big".into(), resources(8, 2), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(5), spec(16, 1, None, 10));
    let cmds = drain(&mut s);
    let Some(Command::ToClient {
        client: ClientId(9),
        msg: CoordinatorToClient::JobRejected {
            request: RequestId(5),
            reason,
        },
    }) = cmds.first()
    else {
        panic!("expected a rejection, got {cmds:?}");
    };
    assert!(
        reason.contains("func_cpu=16 but the largest node offers 8 cores (big)"),
        "{reason}"
    );
    assert_eq!(s.job_count(), 0);

    s.handle_submit(ClientId(9), RequestId(6), spec(4, 4, None, 10));
    let reason = format!("{:?}", drain(&mut s));
    assert!(reason.contains("no single node offers"), "{reason}");
}

#[test]
fn an_empty_fleet_rejects_with_what_to_do() {
    let mut s = Scheduler::new();
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 10));
    let text = format!("{:?}", drain(&mut s));
    assert!(
        text.contains("the fleet has no nodes") && text.contains("fleetmapd node"),
        "{text}"
    );
}

#[test]
fn every_chunk_runs_once_and_the_job_finishes() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (job, slots, credit) = accepted(&drain(&mut s));
    assert_eq!((slots, credit), (2, 9));
    let mut outputs = Vec::new();
    let mut next = 0;
    let mut credit = credit;
    let mut pending = Vec::new();
    while outputs.len() < 10 {
        while credit > 0 && next < 10 {
            s.handle_inputs(ClientId(9), job, chunk(next)).unwrap();
            next += 1;
            credit -= 1;
        }
        if next == 10 {
            s.handle_inputs_done(ClientId(9), job, 10).unwrap();
        }
        let cmds = drain(&mut s);
        for c in &cmds {
            match c {
                Command::ToClient {
                    msg: CoordinatorToClient::Output { output, .. },
                    ..
                } => outputs.push(output.chunk),
                Command::ToClient {
                    msg: CoordinatorToClient::Credit { chunks, .. },
                    ..
                } => credit += chunks,
                _ => {}
            }
        }
        pending.extend(runs(&cmds));
        // No slot ever holds more than SLOT_DEPTH chunks.
        for slot in [SlotId(0), SlotId(1)] {
            assert!(pending.iter().filter(|p| p.1 == slot).count() <= SLOT_DEPTH);
        }
        if let Some((node, slot, c)) = (!pending.is_empty()).then(|| pending.remove(0)) {
            s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
        }
    }
    outputs.sort();
    assert_eq!(outputs, (0..10).map(ChunkId).collect::<Vec<_>>());
    assert_eq!(s.job_count(), 0, "the job ended");
}

#[test]
fn chunks_of_a_lost_node_run_again_elsewhere_and_its_late_results_are_dropped() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "b".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 40));
    let (job, _, _) = accepted(&drain(&mut s));
    for i in 0..4 {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    s.handle_inputs_done(ClientId(9), job, 4).unwrap();
    let first = runs(&drain(&mut s));
    assert_eq!(first.len(), 4);
    let on_a: Vec<_> = first.iter().filter(|r| r.0 == NodeId(1)).cloned().collect();
    assert_eq!(on_a.len(), 2);

    s.handle_node_lost(NodeId(1));
    // A result from the lost node that arrives late must not count.
    s.handle_chunk_done(NodeId(1), job, on_a[0].1, output(&on_a[0].2))
        .unwrap();
    let cmds = drain(&mut s);
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Command::ToClient {
            msg: CoordinatorToClient::Output { .. },
            ..
        }
    )));

    let mut done = Vec::new();
    let mut pending: Vec<_> = first.iter().filter(|r| r.0 == NodeId(2)).cloned().collect();
    while let Some((node, slot, c)) = pending.pop() {
        assert_eq!(node, NodeId(2));
        s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
        for cmd in drain(&mut s) {
            match cmd {
                Command::ToClient {
                    msg: CoordinatorToClient::Output { output, .. },
                    ..
                } => done.push(output.chunk),
                Command::ToNode {
                    node,
                    msg: CoordinatorToNode::RunChunk { slot, chunk, .. },
                } => pending.push((node, slot, chunk)),
                _ => {}
            }
        }
    }
    done.sort();
    assert_eq!(done, [0, 1, 2, 3].map(ChunkId), "every chunk exactly once");
    assert_eq!(s.job_count(), 0);
}

#[test]
fn inputs_beyond_the_credit_are_a_violation() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (job, _, credit) = accepted(&drain(&mut s));
    for i in 0..credit as u64 {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    assert!(s.handle_inputs(ClientId(9), job, chunk(99)).is_err());
    // Another client cannot feed the job, nor cancel it for another principal.
    assert!(s.handle_inputs(ClientId(8), job, chunk(100)).is_ok());
    s.handle_cancel(ClientId(8), "someone-else", job);
    assert_eq!(s.job_count(), 1);
}

#[test]
fn a_second_job_gets_its_fair_share_and_the_rest_when_the_first_ends() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (first, slots, credit) = accepted(&drain(&mut s));
    assert_eq!(slots, 4);
    // The first job is busy: every slot holds chunks.
    for i in 0..credit as u64 {
        s.handle_inputs(ClientId(9), first, chunk(i)).unwrap();
    }
    let running = runs(&drain(&mut s));
    s.handle_submit(ClientId(8), RequestId(0), spec(1, 1, None, 100));
    let (second, slots, _) = accepted(&drain(&mut s));
    assert_eq!(slots, 0, "no free core yet: two of the first job's slots drain");
    // Draining slots finish what they hold, then stop and go to the second job.
    let mut stopped = 0;
    let mut pending: VecDeque<_> = running.into();
    while stopped < 2 {
        let (node, slot, c) = pending.pop_front().expect("the first job still has chunks running");
        s.handle_chunk_done(node, first, slot, output(&c)).unwrap();
        for cmd in drain(&mut s) {
            match cmd {
                Command::ToNode {
                    msg: CoordinatorToNode::StopSlot { job, .. },
                    ..
                } => {
                    assert_eq!(job, first);
                    stopped += 1;
                }
                Command::ToNode {
                    node,
                    msg: CoordinatorToNode::RunChunk { job, slot, chunk },
                } if job == first => pending.push_back((node, slot, chunk)),
                _ => {}
            }
        }
    }
    assert_eq!(s.slots_of(first).get("a"), Some(&2), "the first job keeps its share");
    assert_eq!(s.slots_of(second).get("a"), Some(&2), "the second job has its share");
    s.handle_client_lost(ClientId(9), false);
    let cmds = drain(&mut s);
    assert!(cmds.contains(&Command::ToNode {
        node: NodeId(1),
        msg: CoordinatorToNode::StopJob {
            job: first,
            finished: false
        }
    }));
    assert_eq!(
        s.slots_of(second).get("a"),
        Some(&4),
        "and the whole node once the first ends"
    );
}

#[test]
fn a_failed_slot_fails_the_job_with_its_reason() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 10));
    let (job, _, _) = accepted(&drain(&mut s));
    s.handle_node_joined(NodeId(2), "b".into(), resources(1, 64), NodeIsolation::default());
    drain(&mut s);
    let refused = s.handle_slot_failed(NodeId(2), job, SlotId(0), FailureKind::Job, "not this node".into());
    assert!(refused.unwrap_err().0.contains("another node"));
    assert_eq!(s.job_count(), 1, "a node cannot fail another node's slot");
    s.handle_slot_failed(
        NodeId(1),
        job,
        SlotId(0),
        FailureKind::Environment,
        "worker died".into(),
    )
    .unwrap();
    let cmds = drain(&mut s);
    assert!(cmds.contains(&Command::ToClient {
        client: ClientId(9),
        msg: CoordinatorToClient::JobFailed {
            job,
            kind: FailureKind::Environment,
            reason: "worker died".into()
        }
    }));
    assert_eq!(s.job_count(), 0);
}

#[test]
fn status_shows_each_node_with_its_free_resources_and_isolation() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), pinned("cgroup v1"));
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, Some(3), 100));
    drain(&mut s);
    s.handle_status(ClientId(8), RequestId(5));
    let cmds = drain(&mut s);
    let Some(Command::ToClient {
        client: ClientId(8),
        msg:
            CoordinatorToClient::Status {
                request: RequestId(5),
                nodes,
                jobs: 1,
            },
    }) = cmds.first()
    else {
        panic!("expected a status, got {cmds:?}");
    };
    assert_eq!(nodes.len(), 1);
    assert_eq!((nodes[0].free_cores, nodes[0].free_memory_bytes), (1, 61 * GIB));
    assert_eq!(nodes[0].isolation, "cgroup v1");
}

#[test]
fn the_credit_window_shrinks_with_lost_slots() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "b".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (job, slots, credit) = accepted(&drain(&mut s));
    assert_eq!((slots, credit), (2, 9));
    for i in 0..9 {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    let first = runs(&drain(&mut s));
    s.handle_node_lost(NodeId(1));
    drain(&mut s);
    // 9 chunks in the coordinator, a window of 6 now: the next three
    // completions are not credited back.
    let mut credited = 0;
    let mut pending: Vec<_> = first.into_iter().filter(|r| r.0 == NodeId(2)).collect();
    for _ in 0..5 {
        let (node, slot, c) = pending.remove(0);
        s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
        for cmd in drain(&mut s) {
            match cmd {
                Command::ToClient {
                    msg: CoordinatorToClient::Credit { chunks, .. },
                    ..
                } => credited += chunks,
                Command::ToNode {
                    node,
                    msg: CoordinatorToNode::RunChunk { slot, chunk, .. },
                } => pending.push((node, slot, chunk)),
                _ => {}
            }
        }
    }
    assert_eq!(
        credited, 2,
        "five completions, three withheld to get back inside the window"
    );
}

#[test]
fn chunks_out_of_sequence_are_a_violation() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (job, _, _) = accepted(&drain(&mut s));
    s.handle_inputs(ClientId(9), job, chunk(0)).unwrap();
    let err = s.handle_inputs(ClientId(9), job, chunk(0)).unwrap_err();
    assert!(err.0.contains("chunk 0 arrived where chunk 1 was due"), "{}", err.0);
}

/// A state built by hand, without events, for the fair-share plan: nodes as
/// (id, cores), each with 64 GiB, and jobs (ids from 0) as (cores per call,
/// slots as (node, whether the slot holds a chunk)). Every job wants more
/// slots.
/// A job of `chunks` chunks on two one-core nodes, `a` (1) and `b` (2), with
/// every chunk sent and the first ones dispatched: (scheduler, job, runs).
fn two_node_job(chunks: u64) -> (Scheduler, JobId, Vec<(NodeId, SlotId, InputChunk)>) {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_node_joined(NodeId(2), "b".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, chunks * 10));
    let (job, _, _) = accepted(&drain(&mut s));
    for i in 0..chunks {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    s.handle_inputs_done(ClientId(9), job, chunks).unwrap();
    let runs = runs(&drain(&mut s));
    (s, job, runs)
}

fn outputs_of(cmds: &[Command]) -> Vec<OutputChunk> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ToClient {
                msg: CoordinatorToClient::Output { output, .. },
                ..
            } => Some(output.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn what_a_node_says_of_a_chunk_is_checked_against_the_record() {
    let (mut s, job, runs) = two_node_job(4);
    let (node, slot, c) = runs.iter().find(|r| r.0 == NodeId(1)).cloned().unwrap();
    let (other, other_slot, other_chunk) = runs.iter().find(|r| r.0 == NodeId(2)).cloned().unwrap();

    // Another node's slot, a slot never placed, a chunk the slot does not
    // hold, more failures than inputs: each a violation, changing nothing.
    let lie = |s: &mut Scheduler, slot, out: OutputChunk| s.handle_chunk_done(node, job, slot, out).unwrap_err().0;
    assert!(lie(&mut s, other_slot, output(&other_chunk)).contains("another node"));
    assert!(lie(&mut s, SlotId(99), output(&c)).contains("never placed"));
    assert!(lie(&mut s, slot, output(&other_chunk)).contains("does not hold"));
    let mut too_many = output(&c);
    too_many.failed = c.count + 1;
    assert!(lie(&mut s, slot, too_many).contains("failures"));
    assert!(outputs_of(&drain(&mut s)).is_empty());

    // An honest report's inputs and node come from the record.
    let mut forged = output(&c);
    forged.first_input = InputIndex(123_456);
    forged.count = 1;
    forged.node = "somebody-else".into();
    s.handle_chunk_done(node, job, slot, forged).unwrap();
    let out = outputs_of(&drain(&mut s));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].first_input, out[0].count), (c.first_input, c.count));
    assert_eq!(out[0].node, "a");

    // The same report again is a violation: each chunk has one outcome.
    assert!(lie(&mut s, slot, output(&c)).contains("does not hold"));
    s.handle_chunk_done(other, job, other_slot, output(&other_chunk))
        .unwrap();
    assert_eq!(outputs_of(&drain(&mut s)).len(), 1);
}

#[test]
fn printed_lines_reach_the_client_only_from_nodes_running_the_job() {
    let (mut s, job, _) = two_node_job(1);
    s.handle_node_joined(NodeId(3), "idle".into(), resources(1, 64), NodeIsolation::default());
    drain(&mut s);
    let line = |node: &str| LogLine {
        job,
        stream: fleetmap_protocol::OutputStream::Stdout,
        node: node.into(),
        text: "hello".into(),
    };
    s.handle_log(NodeId(3), line("a"));
    assert!(
        drain(&mut s).is_empty(),
        "a node without a slot of the job prints nothing"
    );
    s.handle_log(NodeId(1), line("forged"));
    let cmds = drain(&mut s);
    assert!(
        matches!(&cmds[..], [Command::ToClient { msg: CoordinatorToClient::Log(l), .. }] if l.node == "a"),
        "one line, under the node's own name"
    );
}

#[test]
fn a_chunk_lost_with_three_nodes_fails_its_job() {
    let mut s = Scheduler::new();
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 10));
    // Nothing can host it yet: rejected. Start with one node.
    drain(&mut s);
    s.handle_node_joined(NodeId(1), "n1".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(1), spec(1, 1, None, 10));
    let (job, _, _) = accepted(&drain(&mut s));
    s.handle_inputs(ClientId(9), job, chunk(0)).unwrap();
    s.handle_inputs_done(ClientId(9), job, 1).unwrap();
    for n in 1..=MAX_CHUNK_LOSSES as u64 {
        let cmds = drain(&mut s);
        assert_eq!(runs(&cmds).len(), 1, "chunk 0 runs on node {n}");
        // The next node joins before this one is lost, so the job is not stranded.
        s.handle_node_joined(
            NodeId(n + 1),
            format!("n{}", n + 1),
            resources(1, 64),
            NodeIsolation::default(),
        );
        s.handle_node_lost(NodeId(n));
    }
    let cmds = drain(&mut s);
    let failed = cmds.iter().find_map(|c| match c {
        Command::ToClient {
            msg: CoordinatorToClient::JobFailed { reason, .. },
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    let reason = failed.expect("the job failed");
    assert!(
        reason.contains("inputs 0..=9") && reason.contains("n1, n2, n3"),
        "{reason}"
    );
    assert_eq!(s.job_count(), 0);
}

#[test]
fn a_client_that_does_not_read_gets_no_credit_until_it_does() {
    let (mut s, job, runs) = two_node_job(4);
    s.handle_client_backlog(ClientId(9), true);
    for (node, slot, c) in &runs[..2] {
        s.handle_chunk_done(*node, job, *slot, output(c)).unwrap();
    }
    assert_eq!(credit_granted(&drain(&mut s)), 0, "no credit while backlogged");
    s.handle_client_backlog(ClientId(9), false);
    assert!(credit_granted(&drain(&mut s)) > 0, "credit once it has read");
}

fn credit_granted(cmds: &[Command]) -> u32 {
    cmds.iter()
        .filter_map(|c| match c {
            Command::ToClient {
                msg: CoordinatorToClient::Credit { chunks, .. },
                ..
            } => Some(*chunks),
            _ => None,
        })
        .sum()
}

#[test]
fn credit_counts_bytes_as_well_as_chunks() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 1000));
    let (job, _, credit) = accepted(&drain(&mut s));
    assert!(credit >= 2);
    let mut big = chunk(0);
    big.payload = vec![0; 100 << 20];
    s.handle_inputs(ClientId(9), job, big).unwrap();
    s.handle_inputs(ClientId(9), job, chunk(1)).unwrap();
    let sent = runs(&drain(&mut s));
    assert_eq!(sent.len(), 2, "both chunks are at the slot");
    // The small chunk finishes first: by chunks there is room again, by
    // bytes (100 MiB held, over the window) there is not.
    let (node, slot, small) = sent.iter().find(|r| r.2.chunk == ChunkId(1)).cloned().unwrap();
    s.handle_chunk_done(node, job, slot, output(&small)).unwrap();
    assert_eq!(
        credit_granted(&drain(&mut s)),
        0,
        "no credit while the bytes are over the window"
    );
    let (node, slot, big) = sent.iter().find(|r| r.2.chunk == ChunkId(0)).cloned().unwrap();
    s.handle_chunk_done(node, job, slot, output(&big)).unwrap();
    assert!(
        credit_granted(&drain(&mut s)) > 0,
        "credit once the large chunk is done"
    );
}

#[test]
fn an_oversized_payload_is_a_violation_before_it_is_passed_on() {
    let mut s = Scheduler::with_max_payload(1000);
    s.handle_node_joined(NodeId(1), "a".into(), resources(1, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 10));
    let (job, _, _) = accepted(&drain(&mut s));
    let mut c = chunk(0);
    c.payload = vec![0; 1001];
    let err = s.handle_inputs(ClientId(9), job, c).unwrap_err();
    assert!(err.0.contains("over the limit of 1000 bytes"), "{}", err.0);
}

fn hand_built(nodes: &[(u64, u32)], jobs: &[(u32, &[(u64, bool)])]) -> Scheduler {
    let mut s = Scheduler::new();
    for &(id, cores) in nodes {
        let node = Node::new(format!("n{id}"), resources(cores, 64), NodeIsolation::default());
        s.nodes.insert(NodeId(id), node);
    }
    for (i, &(cores, slots)) in jobs.iter().enumerate() {
        let id = JobId(i as u64);
        s.jobs.insert(id, Job::new(ClientId(9), spec(cores, 1, None, 1000)));
        for &(node, busy) in slots {
            let slot = s.place_slot(id, NodeId(node));
            if busy {
                let job = s.jobs.get_mut(&id).expect("inserted above");
                job.slots.get_mut(&slot).expect("placed above").chunks.push(ChunkId(0));
            }
        }
    }
    s
}

fn reclaim(for_job: u64, node: u64, drain: &[(u64, u32)]) -> Reclaim {
    Reclaim {
        for_job: JobId(for_job),
        node: NodeId(node),
        drain: drain.iter().map(|&(job, slot)| (JobId(job), SlotId(slot))).collect(),
    }
}

#[test]
fn the_fair_share_plan_makes_room_for_each_job_below_its_share() {
    // Job 0 fills both 4-core nodes (slots 0-3 on node 1, 4-7 on node 2);
    // jobs 1 and 2 have nothing. A share is 8 / 3 = 2 cores, so each of them
    // gets one core's room on node 1, where job 0's first slots are.
    let job_0 =
        |busy: &[u32]| -> Vec<(u64, bool)> { (0..8).map(|slot| (1 + slot as u64 / 4, busy.contains(&slot))).collect() };
    let s = hand_built(&[(1, 4), (2, 4)], &[(1, &job_0(&[0, 1])), (1, &[]), (1, &[])]);
    assert_eq!(
        plan_reclaims(&s.jobs, &s.nodes, &s.quotas),
        [reclaim(1, 1, &[(0, 0)]), reclaim(2, 1, &[(0, 1)])],
        "slot 0 is busy, so it frees no room yet and job 2 drains slot 1 rather than count on it again"
    );

    // The same with job 0's slot 0 idle: it stops at once, and that free
    // core is what job 2 finds, so nothing more is drained for it (the
    // growth that follows gives the core to job 1, the older of the two).
    let s = hand_built(&[(1, 4), (2, 4)], &[(1, &job_0(&[1])), (1, &[]), (1, &[])]);
    assert_eq!(plan_reclaims(&s.jobs, &s.nodes, &s.quotas), [reclaim(1, 1, &[(0, 0)])]);
}

#[test]
fn the_fair_share_plan_drains_no_job_below_its_share() {
    // Six cores, three jobs: a share is 2 cores. Jobs 0 and 1 hold 3 each;
    // job 2 wants a 2-core call. Job 0 can give one core on node 1 and stay
    // at its share, not two, so job 1 gives the other.
    let three: &[(u64, bool)] = &[(1, true), (1, true), (2, true)];
    let s = hand_built(&[(1, 4), (2, 2)], &[(1, three), (1, three), (2, &[])]);
    assert_eq!(
        plan_reclaims(&s.jobs, &s.nodes, &s.quotas),
        [reclaim(2, 1, &[(0, 0), (1, 0)])]
    );

    // With a single job there is no one to share with.
    let s = hand_built(&[(1, 2)], &[(1, &[(1, true), (1, true)])]);
    assert_eq!(plan_reclaims(&s.jobs, &s.nodes, &s.quotas), []);
}

fn spec_of(principal: &str, total: u64) -> JobSpec {
    let mut s = spec(1, 1, None, total);
    s.principal = principal.into();
    s
}

fn submitted(s: &mut Scheduler, client: u64, request: u64, spec: JobSpec) -> JobId {
    s.handle_submit(ClientId(client), RequestId(request), spec);
    accepted(&drain(s)).0
}

fn slot_count(s: &Scheduler, job: JobId) -> u32 {
    s.slots_of(job).values().sum()
}

#[test]
fn the_fleet_is_shared_between_principals_first_then_between_their_jobs() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "small".into(), resources(1, 64), NodeIsolation::default());
    let a1 = submitted(&mut s, 9, 0, spec_of("alice", 100));
    let a2 = submitted(&mut s, 9, 1, spec_of("alice", 100));
    let b1 = submitted(&mut s, 10, 0, spec_of("bob", 100));
    assert_eq!(slot_count(&s, a1), 1, "the first job took the small node");
    // Five more cores: max-min between principals gives bob three of them
    // and alice two (one to the job that held none, then one to the
    // older). Between jobs alone, each of the three would have ended with
    // two.
    s.handle_node_joined(NodeId(2), "big".into(), resources(5, 64), NodeIsolation::default());
    drain(&mut s);
    let (a1, a2, b1) = (slot_count(&s, a1), slot_count(&s, a2), slot_count(&s, b1));
    assert_eq!((a1 + a2, b1), (3, 3), "alice and bob hold half each");
    assert_eq!((a1, a2), (2, 1), "alice's half split between her jobs, the older first");
}

#[test]
fn a_principal_s_quota_caps_its_slots_and_its_jobs() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(8, 64), NodeIsolation::default());
    let quota = Quota {
        max_slots: Some(3),
        max_jobs: Some(2),
    };
    s.set_quota("alice", quota);
    let a1 = submitted(&mut s, 9, 0, spec_of("alice", 100));
    assert_eq!(slot_count(&s, a1), 3, "max slots 3, though 8 cores are free");
    let a2 = submitted(&mut s, 9, 1, spec_of("alice", 100));
    assert_eq!(slot_count(&s, a1) + slot_count(&s, a2), 3, "over all of alice's jobs");
    s.handle_submit(ClientId(9), RequestId(2), spec_of("alice", 100));
    let rejected = drain(&mut s).into_iter().find_map(|c| match c {
        Command::ToClient {
            msg: CoordinatorToClient::JobRejected { reason, .. },
            ..
        } => Some(reason),
        _ => None,
    });
    assert!(rejected.expect("a third job is rejected").contains("max jobs 2"));
    let b1 = submitted(&mut s, 10, 0, spec_of("bob", 100));
    assert_eq!(slot_count(&s, b1), 5, "bob has no quota and takes the rest");
}

#[test]
fn a_principal_lists_and_cancels_its_own_jobs_only() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), NodeIsolation::default());
    let job = submitted(&mut s, 9, 0, spec_of("alice", 100));
    let listed = |s: &mut Scheduler, client: u64, principal: &str| {
        s.handle_list_jobs(ClientId(client), principal, RequestId(7));
        match &drain(s)[..] {
            [Command::ToClient {
                msg: CoordinatorToClient::Jobs { jobs, .. },
                ..
            }] => jobs.iter().map(|j| j.job).collect::<Vec<_>>(),
            other => panic!("{} commands", other.len()),
        }
    };
    assert_eq!(listed(&mut s, 10, "bob"), [], "bob sees none of alice's jobs");
    assert_eq!(
        listed(&mut s, 11, "alice"),
        [job],
        "alice sees hers from any connection"
    );
    s.handle_cancel(ClientId(10), "bob", job);
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.job_count(), 1, "bob cannot cancel it");
    s.handle_cancel(ClientId(11), "alice", job);
    let cmds = drain(&mut s);
    assert_eq!(s.job_count(), 0, "alice can, from another connection");
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::ToClient {
            client: ClientId(9),
            msg: CoordinatorToClient::JobFailed { reason, .. },
        } if reason.contains("cancelled by another client of alice")
    )));
}

#[test]
fn a_job_s_credential_names_it_and_its_principal_until_it_ends() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), NodeIsolation::default());
    let mut with_key = spec_of("alice", 100);
    with_key.job_key = "fmjob_0123".into();
    let job = submitted(&mut s, 9, 0, with_key);
    assert_eq!(s.job_of_key("fmjob_0123"), Some((job, "alice".to_string())));
    assert_eq!(s.job_of_key("fmjob_0124"), None);
    s.handle_cancel(ClientId(9), "alice", job);
    assert_eq!(s.job_of_key("fmjob_0123"), None, "the credential ends with the job");
}

#[test]
fn a_first_chunk_sent_with_the_job_runs_at_once_and_a_job_of_one_chunk_ends() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    let first = InputChunk {
        chunk: ChunkId(0),
        first_input: InputIndex(0),
        count: 1,
        payload: vec![7],
    };
    s.handle_submit_with_first(
        ClientId(9),
        RequestId(0),
        spec(1, 1, None, 1),
        first.clone(),
        true,
        &Resumable::default(),
    )
    .unwrap();
    let cmds = drain(&mut s);
    let (job, _, _) = accepted(&cmds);
    // The first chunk went to a slot in the same step as the acceptance,
    // on the protocol's credit: the job's credit is for what follows.
    let sent = runs(&cmds);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].2, first);
    let (node, slot, c) = sent[0].clone();
    s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
    let ended = drain(&mut s).iter().any(|c| {
        matches!(
            c,
            Command::ToClient {
                msg: CoordinatorToClient::JobFinished { .. },
                ..
            }
        )
    });
    assert!(ended, "one chunk, said to be the only one: the job ended");
    assert_eq!(s.job_count(), 0);

    // Without `only`, the job waits for more within its credit: one chunk
    // less than the same job submitted alone gets.
    let mut alone = Scheduler::new();
    alone.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    alone.handle_submit(ClientId(9), RequestId(1), spec(1, 1, None, 30));
    let (_, _, full) = accepted(&drain(&mut alone));
    s.handle_submit_with_first(
        ClientId(9),
        RequestId(1),
        spec(1, 1, None, 30),
        first.clone(),
        false,
        &Resumable::default(),
    )
    .unwrap();
    let (job, _, rest) = accepted(&drain(&mut s));
    assert_eq!(rest, full - 1, "credit for the chunks after the first");
    for i in 1..=u64::from(rest) {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    assert!(
        s.handle_inputs(ClientId(9), job, chunk(u64::from(rest) + 1)).is_err(),
        "no chunk beyond the credit"
    );

    // A first chunk that is not chunk 0 from input 0, or too large, is a
    // protocol violation, and no job is made of it.
    let jobs = s.job_count();
    for bad in [
        InputChunk {
            chunk: ChunkId(1),
            ..first.clone()
        },
        InputChunk {
            payload: vec![0; fleetmap_protocol::FIRST_CHUNK_BYTES + 1],
            ..first.clone()
        },
    ] {
        assert!(s
            .handle_submit_with_first(
                ClientId(9),
                RequestId(2),
                spec(1, 1, None, 30),
                bad,
                false,
                &Resumable::default()
            )
            .is_err());
    }
    assert_eq!(s.job_count(), jobs);
}

fn resumable(token: &str, resumes: Option<(JobId, u64)>) -> Resumable {
    Resumable {
        token: token.into(),
        grace_ms: 60_000,
        resumes,
        detached: false,
    }
}

fn listed(s: &mut Scheduler, principal: &str) -> Vec<JobStatus> {
    s.handle_list_jobs(ClientId(99), principal, RequestId(77));
    drain(s)
        .into_iter()
        .find_map(|c| match c {
            Command::ToClient {
                msg: CoordinatorToClient::Jobs { jobs, .. },
                ..
            } => Some(jobs),
            _ => None,
        })
        .expect("a listing")
}

#[test]
fn a_job_whose_client_vanishes_waits_for_it_and_is_picked_up_under_its_id() {
    let mut s = Scheduler::new();
    s.set_grace(Grace::FLEET);
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    s.handle_submit_resumable(
        ClientId(9),
        RequestId(0),
        spec(1, 1, None, 100),
        &resumable("t0k3n", None),
    );
    let (job, _, credit) = accepted(&drain(&mut s));
    for i in 0..u64::from(credit) {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    let running = runs(&drain(&mut s));
    assert!(!running.is_empty());
    // The connection times out: the calls stop, the job waits.
    s.handle_tick(Duration::from_secs(10));
    s.handle_client_lost(ClientId(9), true);
    let cmds = drain(&mut s);
    assert!(cmds.contains(&Command::ToNode {
        node: NodeId(1),
        msg: CoordinatorToNode::StopJob { job, finished: false }
    }));
    assert_eq!(s.job_count(), 0, "its slots are free for others meanwhile");
    let list = listed(&mut s, "");
    assert!(
        matches!(&list[..], [j] if j.job == job && matches!(j.state, JobState::Waiting(_))),
        "{list:?}"
    );
    // A report from a stopped slot, still on the wire, is dropped.
    let (node, slot, c) = running[0].clone();
    s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
    assert!(drain(&mut s).is_empty());

    // Someone else (a wrong token) cannot take it: they get a new id.
    s.handle_submit_resumable(
        ClientId(5),
        RequestId(0),
        spec(1, 1, None, 10),
        &resumable("guess", Some((job, 0))),
    );
    let (other, _, _) = accepted(&drain(&mut s));
    assert_ne!(other, job);
    s.handle_cancel(ClientId(5), "", other);
    drain(&mut s);

    // The client comes back with the token: same id, slot ids after the
    // old incarnation's, the answered inputs counted.
    s.handle_tick(Duration::from_secs(40));
    s.handle_submit_resumable(
        ClientId(10),
        RequestId(0),
        spec(1, 1, None, 100),
        &resumable("t0k3n", Some((job, 30))),
    );
    let cmds = drain(&mut s);
    let (again, slots, _) = accepted(&cmds);
    assert_eq!(again, job);
    assert!(slots > 0);
    s.handle_inputs(ClientId(10), job, chunk(0)).unwrap();
    let new_runs = runs(&drain(&mut s));
    assert!(new_runs
        .iter()
        .all(|(_, slot, _)| !running.iter().any(|(_, old, _)| old == slot)));
    let list = listed(&mut s, "");
    let j = list.iter().find(|j| j.job == job).unwrap();
    assert_eq!((j.state.clone(), j.inputs_done), (JobState::Running, 30));
    // Its grace ran out in no tick: the first deadline was consumed.
    s.handle_tick(Duration::from_secs(200));
    assert_eq!(s.job_count(), 1);
}

#[test]
fn an_orphan_whose_client_does_not_come_back_ends_cancelled_and_cannot_be_resumed() {
    let mut s = Scheduler::new();
    s.set_grace(Grace {
        node: Duration::ZERO,
        max_client: Duration::from_secs(30),
    });
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    // It asks for a minute; the coordinator's cap is 30 s.
    s.handle_submit_resumable(
        ClientId(9),
        RequestId(0),
        spec(1, 1, None, 100),
        &resumable("tok", None),
    );
    let (job, _, _) = accepted(&drain(&mut s));
    s.handle_client_lost(ClientId(9), true);
    drain(&mut s);
    s.handle_tick(Duration::from_secs(29));
    assert!(matches!(listed(&mut s, "")[0].state, JobState::Waiting(_)));
    s.handle_tick(Duration::from_secs(30));
    let state = listed(&mut s, "")[0].state.clone();
    assert!(
        matches!(&state, JobState::Cancelled(why) if why.contains("30 s")),
        "{state:?}"
    );
    s.handle_submit_resumable(
        ClientId(10),
        RequestId(3),
        spec(1, 1, None, 100),
        &resumable("tok", Some((job, 0))),
    );
    let rejected = drain(&mut s).into_iter().find_map(|c| match c {
        Command::ToClient {
            msg: CoordinatorToClient::JobRejected { reason, .. },
            ..
        } => Some(reason),
        _ => None,
    });
    assert!(rejected.is_some_and(|r| r.contains("while its caller was away")));

    // A clean close, or a job without a token, ends at once as before.
    s.handle_submit_resumable(
        ClientId(11),
        RequestId(0),
        spec(1, 1, None, 100),
        &resumable("tok2", None),
    );
    s.handle_submit(ClientId(12), RequestId(0), spec(1, 1, None, 100));
    drain(&mut s);
    s.handle_client_lost(ClientId(11), false);
    s.handle_client_lost(ClientId(12), true);
    let states: Vec<JobState> = listed(&mut s, "").into_iter().map(|j| j.state).collect();
    assert_eq!(
        states
            .iter()
            .filter(|st| matches!(st, JobState::Cancelled(w) if w == "its caller went away"))
            .count(),
        2,
        "{states:?}"
    );
}

#[test]
fn after_a_coordinator_restart_a_resumed_job_keeps_its_id_and_waits_for_a_node() {
    let mut s = Scheduler::new();
    s.set_grace(Grace::FLEET);
    // No node has joined the restarted coordinator yet.
    s.handle_submit_resumable(
        ClientId(1),
        RequestId(0),
        spec(1, 1, None, 100),
        &resumable("t", Some((JobId(41), 50))),
    );
    let (job, slots, _) = accepted(&drain(&mut s));
    assert_eq!((job, slots), (JobId(41), 0));
    // New jobs never reuse it.
    s.handle_node_joined(NodeId(1), "a".into(), resources(4, 64), NodeIsolation::default());
    assert!(
        s.slots_of(job).values().sum::<u32>() > 0,
        "the node that joins hosts it"
    );
    s.handle_submit(ClientId(2), RequestId(0), spec(1, 1, None, 10));
    let (fresh, _, _) = accepted(&drain(&mut s));
    assert!(fresh.0 > 41);
}

#[test]
fn a_job_whose_only_node_is_lost_waits_for_the_node_grace_period() {
    let mut s = Scheduler::new();
    s.set_grace(Grace::FLEET);
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    s.handle_submit(ClientId(9), RequestId(0), spec(1, 1, None, 100));
    let (job, _, credit) = accepted(&drain(&mut s));
    for i in 0..u64::from(credit) {
        s.handle_inputs(ClientId(9), job, chunk(i)).unwrap();
    }
    drain(&mut s);
    s.handle_tick(Duration::from_secs(5));
    s.handle_node_lost(NodeId(1));
    let cmds = drain(&mut s);
    assert!(!cmds.iter().any(|c| matches!(
        c,
        Command::ToClient {
            msg: CoordinatorToClient::JobFailed { .. },
            ..
        }
    )));
    assert!(cmds.iter().any(|c| matches!(c, Command::ToClient { msg: CoordinatorToClient::Log(l), .. } if l.text.contains("waiting up to 60 s"))));
    s.handle_tick(Duration::from_secs(30));
    assert_eq!(s.job_count(), 1);
    // The node comes back under its name: the job runs its chunks again,
    // from the first.
    s.handle_node_joined(NodeId(2), "a".into(), resources(2, 64), NodeIsolation::default());
    let again = runs(&drain(&mut s));
    assert_eq!(again.first().map(|r| r.2.chunk), Some(ChunkId(0)));
    // Lost again, and nothing comes back: it fails once the grace is over.
    s.handle_tick(Duration::from_secs(100));
    s.handle_node_lost(NodeId(2));
    drain(&mut s);
    s.handle_tick(Duration::from_secs(159));
    assert_eq!(s.job_count(), 1);
    s.handle_tick(Duration::from_secs(160));
    let failed = drain(&mut s).into_iter().find_map(|c| match c {
        Command::ToClient {
            msg: CoordinatorToClient::JobFailed { reason, .. },
            ..
        } => Some(reason),
        _ => None,
    });
    assert!(failed.is_some_and(|r| r.contains("node a was lost") && r.contains("within 60 s")));
}

#[test]
fn a_detached_job_keeps_its_outputs_and_runs_on_without_its_client() {
    let mut s = Scheduler::new();
    s.handle_node_joined(NodeId(1), "a".into(), resources(2, 64), NodeIsolation::default());
    let detached = Resumable {
        detached: true,
        ..Resumable::default()
    };
    s.handle_submit_resumable(ClientId(9), RequestId(0), spec(1, 1, None, 20), &detached);
    let cmds = drain(&mut s);
    let (job, _, _) = accepted(&cmds);
    assert!(cmds.contains(&Command::Store(Store::Begin {
        job,
        principal: String::new()
    })));
    s.handle_inputs(ClientId(9), job, chunk(0)).unwrap();
    s.handle_inputs(ClientId(9), job, chunk(1)).unwrap();
    s.handle_inputs_done(ClientId(9), job, 2).unwrap();
    let running = runs(&drain(&mut s));
    // The caller leaves once its inputs are in: the job goes on.
    s.handle_client_lost(ClientId(9), false);
    assert!(drain(&mut s).is_empty());
    for (node, slot, c) in running {
        s.handle_chunk_done(node, job, slot, output(&c)).unwrap();
        let cmds = drain(&mut s);
        assert!(cmds.iter().any(
            |cmd| matches!(cmd, Command::Store(Store::Keep { job: j, output }) if *j == job && output.chunk == c.chunk)
        ));
        assert!(!cmds.iter().any(|cmd| matches!(
            cmd,
            Command::ToClient {
                msg: CoordinatorToClient::Output { .. },
                ..
            }
        )));
    }
    assert_eq!(
        listed(&mut s, "").last().map(|j| j.state.clone()),
        Some(JobState::Finished)
    );

    // One whose caller leaves before all its inputs are in is cancelled.
    s.handle_submit_resumable(ClientId(10), RequestId(0), spec(1, 1, None, 20), &detached);
    let (second, _, _) = accepted(&drain(&mut s));
    s.handle_client_lost(ClientId(10), true);
    let ended = listed(&mut s, "").into_iter().find(|j| j.job == second).unwrap();
    assert!(matches!(ended.state, JobState::Cancelled(_)), "{ended:?}");
}
