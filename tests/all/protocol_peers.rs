//! The real coordinator and client library with nodes that speak the real
//! protocol and echo their inputs: the whole dispatch path, node loss
//! included, without Python.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use fleetmap_client::{Client, JobEvent};
use fleetmap_coordinator::Credentials;
use fleetmap_protocol::{
    CallRequest, ChunkId, CoordinatorToNode, InputChunk, InputIndex, JobSpec, NodeToCoordinator, OutputChunk,
    RuntimeSpec,
};
use tokio::task::JoinHandle;

use crate::{node_role, start_coordinator, NodePeer};

/// A node that answers every chunk with its own payload. With `die_after`,
/// it drops its connection instead of answering that many-th chunk.
pub fn echo_node(
    addr: SocketAddr,
    creds: Credentials,
    name: &'static str,
    die_after: Option<usize>,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut peer = NodePeer::join(addr, &creds, node_role(&creds.join_token, name, 2)).await;
        let mut answered = 0;
        loop {
            let Ok(Ok(Some(msg))) = tokio::time::timeout(Duration::from_secs(30), peer.rx.recv()).await else {
                return answered;
            };
            if let CoordinatorToNode::RunChunk { job, slot, chunk } = msg {
                if Some(answered) == die_after {
                    fleetmap_net::CloseCode::Done.close(&peer.conn, "node dies");
                    return answered;
                }
                answered += 1;
                let output = OutputChunk {
                    chunk: chunk.chunk,
                    first_input: chunk.first_input,
                    count: chunk.count,
                    failed: 0,
                    node: name.into(),
                    payload: chunk.payload,
                };
                // Slow enough that chunks are in flight when a node dies.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let _ = peer.tx.send(NodeToCoordinator::ChunkDone { job, slot, output });
            }
        }
    })
}

pub fn spec(total: u64) -> JobSpec {
    JobSpec {
        call: CallRequest {
            cores: 1,
            memory_bytes: 1 << 30,
            gpus: 0,
        },
        parallelism: None,
        total_inputs: Some(total),
        runtime: RuntimeSpec::Python {
            executable: "python3".into(),
            version: "3.11".into(),
            function: vec![0; 16],
        },
    }
}

/// Runs a job of `chunks` chunks through `client`; returns, per chunk, the
/// payloads that came back and which node ran it.
pub async fn run_echo_job(client: &Client, chunks: u64) -> BTreeMap<u64, Vec<(Vec<u8>, String)>> {
    let mut job = client.submit(spec(chunks * 10)).await.unwrap();
    let mut credit = job.initial_credit;
    let mut sent = 0;
    let mut outputs: BTreeMap<u64, Vec<(Vec<u8>, String)>> = BTreeMap::new();
    loop {
        while credit > 0 && sent < chunks {
            job.send_chunk(InputChunk {
                chunk: ChunkId(sent),
                first_input: InputIndex(sent * 10),
                count: 10,
                payload: sent.to_le_bytes().to_vec(),
            });
            sent += 1;
            credit -= 1;
            if sent == chunks {
                job.inputs_done(chunks);
            }
        }
        let event = tokio::time::timeout(Duration::from_secs(30), job.next_event())
            .await
            .expect("job events keep coming")
            .expect("the job's events do not end before it does");
        match event {
            JobEvent::Output(o) => {
                assert_eq!(o.first_input, InputIndex(o.chunk.0 * 10));
                outputs.entry(o.chunk.0).or_default().push((o.payload, o.node));
            }
            JobEvent::Credit(n) => credit += n,
            JobEvent::Finished => return outputs,
            JobEvent::Failed(reason) => panic!("job failed: {reason}"),
            JobEvent::Log(_) => {}
        }
    }
}

#[tokio::test]
async fn a_job_runs_every_chunk_exactly_once_across_nodes() {
    let (coordinator, creds) = start_coordinator().await;
    let addr = coordinator.local_addr;
    let a = echo_node(addr, creds.clone(), "a", None);
    let b = echo_node(addr, creds.clone(), "b", None);
    assert!(coordinator.wait_for_nodes(2, Duration::from_secs(10)).await);
    let client = crate::connect_client(&coordinator, &creds).await;
    let outputs = run_echo_job(&client, 500).await;
    assert_eq!(outputs.len(), 500);
    for (chunk, outs) in &outputs {
        assert_eq!(outs.len(), 1, "chunk {chunk} answered once");
        assert_eq!(outs[0].0, chunk.to_le_bytes().to_vec());
    }
    let nodes: std::collections::BTreeSet<_> = outputs.values().map(|o| o[0].1.clone()).collect();
    assert_eq!(nodes.len(), 2, "both nodes ran chunks");
    assert_eq!(coordinator.job_count(), 0);
    a.abort();
    b.abort();
    coordinator.shutdown().await;
}

#[tokio::test]
async fn chunks_of_a_node_that_dies_mid_job_run_elsewhere_exactly_once() {
    let (coordinator, creds) = start_coordinator().await;
    let addr = coordinator.local_addr;
    let dying = echo_node(addr, creds.clone(), "dying", Some(20));
    let healthy = echo_node(addr, creds.clone(), "healthy", None);
    assert!(coordinator.wait_for_nodes(2, Duration::from_secs(10)).await);
    let client = crate::connect_client(&coordinator, &creds).await;
    let outputs = run_echo_job(&client, 300).await;
    assert_eq!(outputs.len(), 300);
    assert!(outputs.values().all(|o| o.len() == 1), "no chunk yields two outcomes");
    assert_eq!(dying.await.unwrap(), 20, "the dying node answered 20 chunks, then died");
    // Its answers still in flight when it closed are lost with it; those
    // chunks ran again on the healthy node.
    assert!(outputs.values().filter(|o| o[0].1 == "dying").count() <= 20);
    healthy.abort();
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_job() {
    let (coordinator, creds) = start_coordinator().await;
    let addr = coordinator.local_addr;
    let mut node = NodePeer::join(addr, &creds, node_role(&creds.join_token, "n", 2)).await;
    let client = crate::connect_client(&coordinator, &creds).await;
    let job = client.submit(spec(100)).await.unwrap();
    assert!(matches!(node.next().await, CoordinatorToNode::StartSlots { .. }));
    drop(job);
    drop(client);
    match node.next().await {
        CoordinatorToNode::StopJob { .. } => {}
        other => panic!("expected StopJob, got {other:?}"),
    }
    assert_eq!(coordinator.job_count(), 0);
    coordinator.shutdown().await;
}
