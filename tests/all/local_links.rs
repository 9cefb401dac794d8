//! Local links: a client or node in the coordinator's own process (the
//! embedded cluster's) reaches it without QUIC, through the same handshake,
//! admission and session as any other peer, and loses it when it shuts down.

use std::time::Duration;

use fleetmap_client::{Client, ClientError};
use fleetmap_coordinator::{nodes::NodeCa, CoordinatorConfig, Credentials};
use fleetmap_net::{ClientIdentity, Session, SessionError};
use fleetmap_protocol::{CoordinatorToNode, Hello, NodeToCoordinator, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION};
use fleetmap_testkit::{node_key, node_role_with_key, start_coordinator, start_coordinator_with};

use crate::protocol_peers::{echo_node, run_echo_job};

const TIMEOUT: Duration = Duration::from_secs(10);

type NodeSession = Session<NodeToCoordinator, CoordinatorToNode>;

async fn join_local(
    dialer: &fleetmap_net::LocalDialer,
    identity: Option<&ClientIdentity>,
    role: fleetmap_protocol::Role,
) -> Result<NodeSession, SessionError> {
    let hello = Hello {
        role,
        software_version: SOFTWARE_VERSION.into(),
    };
    fleetmap_net::dial_local(dialer, "local", identity, &hello, DEFAULT_MAX_MESSAGE, TIMEOUT).await
}

#[tokio::test]
async fn a_client_on_a_local_link_runs_a_job_in_order_and_a_wrong_key_is_refused() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let node = echo_node(&access, "quic-node", None);
    assert!(coordinator.wait_for_nodes(1, TIMEOUT).await);
    let dialer = coordinator.local_dialer();
    let client = Client::connect_local(&dialer, "local", &access.api_key).await.unwrap();
    let outputs = run_echo_job(&client, 200).await;
    assert_eq!(outputs.len(), 200);
    for (chunk, outs) in &outputs {
        assert_eq!(outs.len(), 1, "chunk {chunk} answered once");
        assert_eq!(outs[0].0, chunk.to_le_bytes().to_vec());
    }
    // The key is checked as over QUIC.
    match Client::connect_local(&dialer, "local", "fmkey_wrong").await {
        Err(ClientError::Refused(reason)) => assert!(reason.contains("API key"), "{reason}"),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a wrong API key was admitted over a local link"),
    }
    client.close();
    node.abort();
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_node_on_a_local_link_enrolls_then_is_known_by_the_certificate_it_presents() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let dialer = coordinator.local_dialer();
    let key = node_key();
    let enrolled = join_local(&dialer, None, node_role_with_key(&access.join_token, "n1", 1, &key))
        .await
        .unwrap();
    let cert = enrolled.node_certificate.clone().expect("a certificate on enrollment");
    assert!(coordinator.wait_for_nodes(1, TIMEOUT).await);
    fleetmap_net::CloseCode::Done.close(&enrolled.conn, "enrolled");
    drop(enrolled);
    let identity = ClientIdentity {
        cert_pem: cert.into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    };
    // Its certificate alone admits it under its own name...
    let again = join_local(&dialer, Some(&identity), node_role_with_key("", "n1", 1, &key))
        .await
        .unwrap();
    assert!(again.node_certificate.is_none(), "far from its end, no new certificate");
    // ...and under no other.
    match join_local(&dialer, Some(&identity), node_role_with_key("", "n2", 1, &key)).await {
        Err(SessionError::Refused(reason)) => assert!(reason.contains("not its current one"), "{reason}"),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a certificate admitted a node under another name"),
    }
    // Neither a certificate nor the token.
    match join_local(&dialer, None, node_role_with_key("", "n3", 1, &key)).await {
        Err(SessionError::Refused(reason)) => assert!(reason.contains("neither a certificate"), "{reason}"),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a node without credentials was admitted over a local link"),
    }
    drop(again);
    coordinator.shutdown().await;
}

#[tokio::test]
async fn an_expired_or_foreign_certificate_fails_on_a_local_link_as_in_a_tls_handshake() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        config.node_cert_validity = Duration::from_secs(2);
    })
    .await
    .unwrap();
    let dialer = coordinator.local_dialer();
    let key = node_key();
    let enrolled = join_local(&dialer, None, node_role_with_key(&access.join_token, "brief", 1, &key))
        .await
        .unwrap();
    let identity = ClientIdentity {
        cert_pem: enrolled.node_certificate.clone().expect("a certificate").into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    };
    drop(enrolled);
    // Another fleet's node CA signed this one: TLS would not accept it.
    let forged = NodeCa::new(&Credentials::generate().unwrap(), Duration::from_secs(3600))
        .unwrap()
        .certify("brief", key.public_key_raw())
        .unwrap();
    let foreign = ClientIdentity {
        cert_pem: forged.pem.into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    };
    match join_local(&dialer, Some(&foreign), node_role_with_key("", "brief", 1, &key)).await {
        Err(SessionError::Tls(reason)) => assert!(reason.contains("certificate"), "{reason}"),
        Err(other) => panic!("expected the certificate to fail as in TLS, got {other}"),
        Ok(_) => panic!("another fleet's certificate was accepted over a local link"),
    }
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // As a TLS error, the node forgets the certificate and enrolls again
    // with its token (`node-daemon`), as it does over QUIC.
    match join_local(&dialer, Some(&identity), node_role_with_key("", "brief", 1, &key)).await {
        Err(SessionError::Tls(reason)) => assert!(reason.contains("xpired"), "{reason}"),
        Err(other) => panic!("expected the certificate to fail as in TLS, got {other}"),
        Ok(_) => panic!("an expired certificate was accepted over a local link"),
    }
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_full_coordinator_turns_a_local_link_away_for_now_not_for_good() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        config.limits.max_connections = 1;
    })
    .await
    .unwrap();
    let dialer = coordinator.local_dialer();
    let first = Client::connect_local(&dialer, "local", &access.api_key).await.unwrap();
    match Client::connect_local(&dialer, "local", &access.api_key).await {
        Err(ClientError::Disconnected(reason)) => assert!(reason.contains("try again"), "{reason}"),
        Err(other) => panic!("expected to be turned away for now, got {other}"),
        Ok(_) => panic!("a second link passed a door of one connection"),
    }
    // The first one's place frees once it closes.
    first.close();
    let mut admitted = false;
    for _ in 0..100 {
        if Client::connect_local(&dialer, "local", &access.api_key).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "the door did not let a link in after the first left");
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_coordinator_shutting_down_closes_its_local_links_and_takes_no_more() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let dialer = coordinator.local_dialer();
    let client = Client::connect_local(&dialer, "local", &access.api_key).await.unwrap();
    assert!(!client.is_closed());
    coordinator.shutdown().await;
    assert!(client.is_closed(), "the client's local link was left open");
    match Client::connect_local(&dialer, "local", &access.api_key).await {
        Err(ClientError::Unreachable { reason, .. }) => assert!(reason.contains("stopped"), "{reason}"),
        Err(other) => panic!("expected the coordinator to be unreachable, got {other}"),
        Ok(_) => panic!("a coordinator that shut down took a new local link"),
    }
}
