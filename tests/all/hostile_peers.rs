//! Invariant 2: no bytes from the network can crash the coordinator or a
//! node daemon. Each test feeds one kind of bad input over real QUIC and then
//! shows that the target still serves.

use std::time::Duration;

use fleetmap_client::{Client, ClientError};
use fleetmap_coordinator::{Credentials, RunningCoordinator};
use fleetmap_net::{CloseCode, FramedReader};
use fleetmap_node_daemon::{NodeConfig, NodeError};
use fleetmap_protocol::{
    ChunkId, ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, FailureKind, Hello, JobId, NodeToCoordinator,
    OutputChunk, Role, SlotId, HANDSHAKE_MAX_MESSAGE, PROTOCOL_VERSION,
};
use fleetmap_testkit::{
    connect_client, node_role, open_raw, open_raw_from, start_coordinator, CoordinatorAccess, NodePeer, Peer,
};
use rand::{RngExt, SeedableRng};

use crate::protocol_peers;

/// The coordinator still runs a whole job after whatever came before.
async fn still_serves(coordinator: &RunningCoordinator, access: &CoordinatorAccess) {
    let node = protocol_peers::echo_node(access, "after", None);
    let client = connect_client(access).await.unwrap();
    assert!(coordinator.wait_for_nodes(1, Duration::from_secs(10)).await);
    let outputs = protocol_peers::run_echo_job(&client, 20).await;
    assert_eq!(outputs.len(), 20);
    node.abort();
}

/// Opens a stream and writes `bytes` on it; returns the reason the
/// coordinator gave when it closed the connection.
async fn close_reason_after(access: &CoordinatorAccess, bytes: &[u8]) -> String {
    let (conn, mut send, _recv, _endpoint) = open_raw(access).await.unwrap();
    send.write_all(bytes).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .expect("the coordinator closes a connection that sends garbage");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                CloseCode::of(c.error_code),
                Some(CloseCode::Protocol),
                "closed as a protocol violation"
            );
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("unexpected close: {other}"),
    }
}

#[tokio::test]
async fn the_coordinator_survives_garbage_udp_datagrams() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..2000 {
        let len = rng.random_range(1..1400);
        let datagram: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        socket.send_to(&datagram, coordinator.local_addr).unwrap();
    }
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn the_coordinator_closes_streams_of_random_bytes_and_carries_on() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for _ in 0..10 {
        let bytes: Vec<u8> = (0..rng.random_range(8..4096)).map(|_| rng.random()).collect();
        let reason = close_reason_after(&access, &bytes).await;
        assert!(!reason.is_empty());
    }
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn oversized_and_unknown_version_frames_are_refused_with_a_reason() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let reason = close_reason_after(&access, &u32::MAX.to_le_bytes()).await;
    assert!(reason.contains("exceeds the limit"), "{reason}");
    let mut frame = 10u32.to_le_bytes().to_vec();
    frame.extend((PROTOCOL_VERSION + 7).to_le_bytes());
    frame.extend([0; 8]);
    let reason = close_reason_after(&access, &frame).await;
    assert!(
        reason.contains(&format!("version {}", PROTOCOL_VERSION + 7)),
        "{reason}"
    );
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_handshake_larger_than_the_handshake_limit_is_refused_before_it_is_buffered() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let announced = (HANDSHAKE_MAX_MESSAGE as u32 + 1).to_le_bytes();
    let reason = close_reason_after(&access, &announced).await;
    assert!(reason.contains("exceeds the limit"), "{reason}");
    assert!(reason.contains(&HANDSHAKE_MAX_MESSAGE.to_string()), "{reason}");
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_client_that_speaks_the_node_protocol_is_disconnected() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    // Typed sessions make this impossible by mistake; a hostile client
    // can still send a node's bytes, and gets closed for it.
    let role = Role::Client {
        api_key: access.api_key.clone(),
    };
    let peer: Peer<NodeToCoordinator, CoordinatorToClient> = Peer::join(&access, role).await.unwrap();
    peer.tx
        .send(NodeToCoordinator::SlotFailed {
            job: JobId(1),
            slot: SlotId(0),
            kind: FailureKind::Job,
            reason: "forged".into(),
        })
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), peer.conn.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(CloseCode::of(c.error_code), Some(CloseCode::Protocol), "{c:?}");
        }
        other => panic!("unexpected close: {other}"),
    }
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_wrong_api_key_is_refused_with_what_to_do() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let err = Client::connect(&access.addr.to_string(), &access.ca_pem, "fmkey_wrong")
        .await
        .err()
        .expect("a wrong key is refused");
    assert!(matches!(err, ClientError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("FLEETMAP_API_KEY"), "{err}");
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_node_with_a_wrong_token_is_refused_and_stops() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let config = NodeConfig::new(access.addr.to_string(), access.ca_pem.clone(), "fmjoin_wrong".into());
    let result = tokio::time::timeout(Duration::from_secs(20), fleetmap_node_daemon::run(config))
        .await
        .expect("a refused node stops instead of retrying");
    match result {
        Err(NodeError::Refused(reason)) => assert!(reason.contains("join token"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(coordinator.node_count(), 0);
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_coordinator_fails_tls() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let other = Credentials::generate().unwrap();
    let err = Client::connect(&access.addr.to_string(), other.ca_pem.as_bytes(), &access.api_key)
        .await
        .err()
        .expect("a certificate from another CA is not trusted");
    assert!(
        matches!(err, ClientError::Tls(_)),
        "TLS fails before any key is sent, and says so: {err:?}"
    );
    coordinator.shutdown().await;
}

/// A hostile "coordinator" that answers the daemon's Hello with random bytes:
/// the daemon drops the connection and joins again, and keeps running.
#[tokio::test]
async fn a_node_daemon_survives_a_coordinator_that_sends_garbage() {
    let creds = Credentials::generate().unwrap();
    let endpoint = fleetmap_net::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        creds.cert_pem.as_bytes(),
        creds.key_pem.as_bytes(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let config = NodeConfig::new(
        addr.to_string(),
        creds.ca_pem.clone().into_bytes(),
        creds.join_token.clone(),
    );
    let daemon = tokio::spawn(fleetmap_node_daemon::run(config));
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for round in 0..3 {
        let incoming = tokio::time::timeout(Duration::from_secs(15), endpoint.accept())
            .await
            .unwrap_or_else(|_| panic!("the daemon connects again (round {round})"))
            .unwrap();
        let conn = incoming.await.unwrap();
        let (mut send, recv) = conn.accept_bi().await.unwrap();
        let mut reader = FramedReader::new(recv, 1 << 20);
        assert!(reader.recv::<Hello>().await.unwrap().is_some());
        let garbage: Vec<u8> = (0..rng.random_range(8..2048)).map(|_| rng.random()).collect();
        send.write_all(&garbage).await.unwrap();
        // Random bytes may announce a frame that never completes; ending the
        // stream turns that into a truncated frame.
        send.finish().unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        assert!(closed.is_ok(), "the daemon drops the connection (round {round})");
    }
    assert!(!daemon.is_finished(), "the daemon keeps running");
    // And a well-formed message of the wrong direction (a client's, sent
    // to a node after a proper Welcome) is handled the same way.
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let handshake = fleetmap_net::accept_hello(&conn.clone().into(), Duration::from_secs(10))
        .await
        .unwrap()
        .expect("the daemon says Hello");
    let (tx, _rx, _writer) = handshake
        .welcome::<CoordinatorToClient, ClientToCoordinator>("x", None, 1 << 20)
        .await
        .unwrap();
    tx.send(CoordinatorToClient::JobFailed {
        job: JobId(1),
        kind: FailureKind::Job,
        reason: "not for a node".into(),
    })
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert!(closed.to_string().contains("malformed"), "{closed}");
    assert!(!daemon.is_finished());
    daemon.abort();
}

/// Waits for `conn` to be closed by the coordinator as a protocol
/// violation; returns the reason it gave.
async fn closed_as_violation(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the coordinator closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(CloseCode::of(c.error_code), Some(CloseCode::Protocol), "{c:?}");
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => panic!("unexpected close: {other}"),
    }
}

#[tokio::test]
async fn a_node_that_answers_for_a_chunk_it_does_not_hold_is_disconnected_and_outputs_stay_exact() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let mut liar = NodePeer::join(&access, node_role(&access.join_token, "liar", 1))
        .await
        .unwrap();
    let honest = protocol_peers::echo_node(&access, "honest", None);
    assert!(coordinator.wait_for_nodes(2, Duration::from_secs(10)).await);
    let client = connect_client(&access).await.unwrap();
    let job = tokio::spawn(async move { protocol_peers::run_echo_job(&client, 200).await });

    let (job_id, slot) = loop {
        if let CoordinatorToNode::StartSlots { job, slots, .. } = liar.next().await {
            break (job, slots[0]);
        }
    };
    let held = loop {
        if let CoordinatorToNode::RunChunk { chunk, .. } = liar.next().await {
            break chunk;
        }
    };
    // Outputs for a chunk far ahead, which no slot of this node holds,
    // with a payload of its choosing.
    let forged = OutputChunk {
        chunk: ChunkId(held.chunk.0 + 1000),
        first_input: held.first_input,
        count: held.count,
        failed: 0,
        node: "honest".into(),
        payload: b"forged".to_vec(),
    };
    liar.tx
        .send(NodeToCoordinator::ChunkDone {
            job: job_id,
            slot,
            output: forged,
        })
        .unwrap();
    let reason = closed_as_violation(&liar.conn).await;
    assert!(reason.contains("does not hold"), "{reason}");

    // The chunks the liar held ran on the honest node: every chunk has
    // exactly one outcome, its own payload.
    let outputs = job.await.unwrap();
    assert_eq!(outputs.len(), 200);
    for (chunk, outs) in &outputs {
        assert_eq!(outs.len(), 1, "chunk {chunk} answered once");
        assert_eq!(outs[0].0, chunk.to_le_bytes().to_vec(), "chunk {chunk}'s own payload");
        assert_eq!(outs[0].1, "honest");
    }
    honest.abort();
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_hello_with_a_field_over_its_bound_is_refused_naming_it() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let mut role = node_role(&access.join_token, "n", 1);
    if let Role::Node { name, .. } = &mut role {
        *name = "x".repeat(1000);
    }
    let err = NodePeer::join(&access, role).await.err().expect("refused");
    assert!(err.to_string().contains("the node name is 1000 bytes"), "{err}");
    let mut role = node_role(&access.join_token, "n", 1);
    if let Role::Node { resources, .. } = &mut role {
        resources.gpus = (0..300)
            .map(|minor| fleetmap_protocol::Gpu {
                minor,
                uuid: String::new(),
                numa_node: None,
            })
            .collect();
    }
    let err = NodePeer::join(&access, role).await.err().expect("refused");
    assert!(err.to_string().contains("300 GPUs"), "{err}");
    assert_eq!(coordinator.node_count(), 0);
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn one_address_may_hold_only_a_few_handshakes_and_others_still_get_in() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let limit = fleetmap_coordinator::Limits::default().max_handshakes_per_address;
    let attacker: std::net::IpAddr = [127, 0, 0, 7].into();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..limit + 8 {
        // A connection that opens its stream and never says Hello.
        match tokio::time::timeout(Duration::from_secs(5), open_raw_from(&access, attacker)).await {
            Ok(Ok(open)) => held.push(open),
            _ => refused += 1,
        }
    }
    assert_eq!(held.len(), limit, "{refused} refused");
    // Another address is let in while those are held.
    still_serves(&coordinator, &access).await;
    coordinator.shutdown().await;
}
