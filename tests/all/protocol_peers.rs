//! The real coordinator and client library with nodes that speak the real
//! protocol and echo their inputs: the whole dispatch path, node loss
//! included, without Python.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use fleetmap_client::{Client, JobEvent};
use fleetmap_net::SessionError;
use fleetmap_protocol::{ChunkId, CoordinatorToNode, InputChunk, InputIndex};
use fleetmap_testkit::{
    connect_client, job_spec, node_role, start_coordinator, CoordinatorAccess, EchoNode, NodePeer, ONE_CORE,
};
use tokio::task::JoinHandle;

/// An echo node of two slots, slow enough (2 ms for a chunk of 10 inputs)
/// that chunks are in flight when a node dies. With `die_after`, it drops
/// its connection instead of taking that many-th chunk. Yields the chunks
/// it took.
pub fn echo_node(
    access: &CoordinatorAccess,
    name: &'static str,
    die_after: Option<u64>,
) -> JoinHandle<Result<u64, SessionError>> {
    let mut node = EchoNode::new(name, 2).per_input(Duration::from_micros(200));
    if let Some(chunks) = die_after {
        node = node.die_after(chunks);
    }
    tokio::spawn(node.run(access.clone(), Arc::default(), std::future::pending()))
}

/// Runs a job of `chunks` chunks through `client`; returns, per chunk, the
/// payloads that came back and which node ran it.
pub async fn run_echo_job(client: &Client, chunks: u64) -> BTreeMap<u64, Vec<(Vec<u8>, String)>> {
    let mut job = client.submit(job_spec(chunks * 10, ONE_CORE)).await.unwrap();
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
            JobEvent::Failed(_, reason) | JobEvent::Disconnected(reason) => panic!("job failed: {reason}"),
            JobEvent::Log(_) => {}
        }
    }
}

#[tokio::test]
async fn a_job_runs_every_chunk_exactly_once_across_nodes() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let a = echo_node(&access, "a", None);
    let b = echo_node(&access, "b", None);
    assert!(coordinator.wait_for_nodes(2, Duration::from_secs(10)).await);
    let client = connect_client(&access).await.unwrap();
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
    let (coordinator, access) = start_coordinator().await.unwrap();
    let dying = echo_node(&access, "dying", Some(20));
    let healthy = echo_node(&access, "healthy", None);
    assert!(coordinator.wait_for_nodes(2, Duration::from_secs(10)).await);
    let client = connect_client(&access).await.unwrap();
    let outputs = run_echo_job(&client, 300).await;
    assert_eq!(outputs.len(), 300);
    assert!(outputs.values().all(|o| o.len() == 1), "no chunk yields two outcomes");
    assert_eq!(
        dying.await.unwrap().unwrap(),
        20,
        "the dying node took 20 chunks, then died"
    );
    // The chunks it took but had not answered when it closed are lost with
    // it; they ran again on the healthy node.
    assert!(outputs.values().filter(|o| o[0].1 == "dying").count() <= 20);
    healthy.abort();
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_job() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let mut node = NodePeer::join(&access, node_role(&access.join_token, "n", 2))
        .await
        .unwrap();
    let client = connect_client(&access).await.unwrap();
    let job = client.submit(job_spec(100, ONE_CORE)).await.unwrap();
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
