//! The coordinator's memory stays bounded whatever its peers do. One test
//! in a binary of its own, so that the process's resident memory is the
//! coordinator's plus these peers' (a bound on the coordinator's alone),
//! with no other test's allocations mixed in.

use std::{net::IpAddr, time::Duration};

use fleetmap_coordinator::RunningCoordinator;
use fleetmap_protocol::{
    ChunkId, ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, InputChunk, InputIndex, LogLine,
    NodeToCoordinator, OutputChunk, OutputStream, RequestId, Role, HANDSHAKE_MAX_MESSAGE, PROTOCOL_VERSION,
};
use fleetmap_testkit::{
    connect_client, job_spec, node_role, open_raw_from, start_coordinator, ClientPeer, CoordinatorAccess, EchoNode,
    NodePeer, ONE_CORE,
};

const MIB: u64 = 1 << 20;

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// One job of 20 chunks through a new echo node `name` and the client
/// library.
async fn a_job_runs(coordinator: &RunningCoordinator, access: &CoordinatorAccess, name: &str) {
    let node = tokio::spawn(EchoNode::new(name, 2).run(access.clone(), Default::default(), std::future::pending()));
    assert!(coordinator.wait_for_nodes(1, Duration::from_secs(20)).await);
    let client = connect_client(access).await.unwrap();
    let mut job = client.submit(job_spec(20, ONE_CORE)).await.unwrap();
    let mut credit = job.initial_credit;
    let (mut sent, mut outputs) = (0u64, 0);
    loop {
        while credit > 0 && sent < 20 {
            job.send_chunk(InputChunk {
                chunk: ChunkId(sent),
                first_input: InputIndex(sent),
                count: 1,
                payload: vec![1],
            });
            sent += 1;
            credit -= 1;
            if sent == 20 {
                job.inputs_done(20);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), job.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            fleetmap_client::JobEvent::Output(_) => outputs += 1,
            fleetmap_client::JobEvent::Credit(n) => credit += n,
            fleetmap_client::JobEvent::Finished => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(outputs, 20);
    node.abort();
}

/// 50 connections that never authenticate, each sending a handshake frame
/// of the largest size allowed but one byte short, then holding on. They
/// come from four addresses, so the per-address limit admits all of them.
async fn unauthenticated_connections_cost_little(coordinator: &RunningCoordinator, access: &CoordinatorAccess) {
    let before = rss();
    let mut held = Vec::new();
    for i in 0..50u8 {
        let from: IpAddr = [127, 0, 1, 1 + i % 4].into();
        let (conn, mut send, recv, endpoint) = open_raw_from(access, from).await.unwrap();
        let mut frame = (HANDSHAKE_MAX_MESSAGE as u32 - 4).to_le_bytes().to_vec();
        frame.extend(PROTOCOL_VERSION.to_le_bytes());
        frame.resize(HANDSHAKE_MAX_MESSAGE - 1, 0x5a);
        send.write_all(&frame).await.unwrap();
        // And more, far beyond what the coordinator lets a stranger send:
        // flow control holds it here, on the sender's side.
        let more = tokio::spawn(async move {
            static MORE: [u8; 64 << 10] = [0x5a; 64 << 10];
            for _ in 0..64 {
                if send.write_all(&MORE).await.is_err() {
                    break;
                }
            }
            send
        });
        held.push((conn, more, recv, endpoint));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss().saturating_sub(before);
    println!(
        "50 unauthenticated connections: resident memory grew by {} KiB",
        grown >> 10
    );
    assert!(grown < 20 * MIB, "grew by {} MiB", grown / MIB);
    // And a job still runs beside them.
    a_job_runs(coordinator, access, "beside-strangers").await;
    drop(held);
}

/// A client submits a job and reads nothing while the job's calls print
/// 1 GiB. The node is an echo peer that prints as fast as the connection
/// takes it (it waits for its own queue to drain, so the memory is the
/// coordinator's, not the printer's).
async fn a_client_that_never_reads_costs_a_bounded_amount(access: &CoordinatorAccess) {
    let mut node = NodePeer::join(access, node_role(&access.join_token, "printer", 1))
        .await
        .unwrap();
    let mut client = ClientPeer::join(
        access,
        Role::Client {
            api_key: access.api_key.clone(),
        },
    )
    .await
    .unwrap();
    client
        .tx
        .send(ClientToCoordinator::SubmitJob {
            request: RequestId(0),
            spec: Box::new(job_spec(1, ONE_CORE)),
            first: None,
            only: false,
            resumable: Default::default(),
        })
        .unwrap();
    let job = match client.next().await {
        CoordinatorToClient::JobAccepted { job, .. } => job,
        other => panic!("{other:?}"),
    };
    let chunk = InputChunk {
        chunk: ChunkId(0),
        first_input: InputIndex(0),
        count: 1,
        payload: vec![1],
    };
    client.tx.send(ClientToCoordinator::Inputs { job, chunk }).unwrap();
    client
        .tx
        .send(ClientToCoordinator::InputsDone { job, chunks: 1 })
        .unwrap();
    let slot = loop {
        match node.next().await {
            CoordinatorToNode::StartSlots { slots, .. } => break slots[0],
            _ => continue,
        }
    };
    let before = rss();
    let mut peak = before;
    let line = "y".repeat(64 << 10);
    let total = 1u64 << 30;
    let mut printed = 0;
    let started = std::time::Instant::now();
    while printed < total {
        while node.tx.queued_bytes() > 4 << 20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        node.tx
            .send(NodeToCoordinator::Log(LogLine {
                job,
                stream: OutputStream::Stdout,
                node: "printer".into(),
                text: line.clone(),
            }))
            .unwrap();
        printed += line.len() as u64;
        if printed % (64 * MIB) == 0 {
            peak = peak.max(rss());
        }
    }
    let output = OutputChunk {
        chunk: ChunkId(0),
        first_input: InputIndex(0),
        count: 1,
        failed: 0,
        node: "printer".into(),
        payload: vec![2],
    };
    node.tx
        .send(NodeToCoordinator::ChunkDone { job, slot, output })
        .unwrap();
    while node.tx.queued_bytes() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss());
    let grown = peak.saturating_sub(before);
    println!(
        "1 GiB printed in {:.1} s toward a client that reads nothing: resident memory grew by at most {} MiB",
        started.elapsed().as_secs_f64(),
        grown / MIB
    );
    // The coordinator's own queue for the client is capped at 8 MiB of
    // lines (`Limits::client_log_backlog`); QUIC's windows (64 MiB to send
    // to the client, 64 MiB to receive from the node, and the client's own
    // 64 MiB receive window in this process) hold the rest.
    assert!(grown < 256 * MIB, "grew by {} MiB for 1 GiB printed", grown / MIB);

    // The client reads at last: what it was sent, then the count of what
    // was dropped, then its output and the end of the job.
    let (mut lines, mut dropped_note, mut finished) = (0u64, None, false);
    while !finished {
        match client.next().await {
            CoordinatorToClient::Log(l) if l.node == "coordinator" => dropped_note = Some(l.text),
            CoordinatorToClient::Log(_) => lines += 1,
            CoordinatorToClient::JobFinished { job: j } => finished = j == job,
            _ => {}
        }
    }
    let note = dropped_note.expect("the client is told how many lines were dropped");
    let dropped: u64 = note.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(note.contains("lines of this job were dropped"), "{note}");
    assert_eq!(
        lines + dropped,
        total / line.len() as u64,
        "every line was either sent or counted"
    );
    assert!(dropped > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_stays_within_its_memory_whatever_its_peers_do() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    // Warm up allocators and the first connections' buffers.
    a_job_runs(&coordinator, &access, "after-a-backlog").await;
    unauthenticated_connections_cost_little(&coordinator, &access).await;
    a_client_that_never_reads_costs_a_bounded_amount(&access).await;
    coordinator.shutdown().await;
}
