//! Node identity over real QUIC: a node enrolls once with the join token and
//! then joins with its certificate alone (mutual TLS); only its current
//! certificate is accepted (and the one it renewed, until it uses the new
//! one); the token cannot take over a name that holds a valid certificate
//! without the operator's approval; a node that stays connected is renewed
//! on its open connection; a revoked node is disconnected and refused,
//! with its certificate or the token; certificates are renewed in the last
//! third of their life and fail the handshake once expired; what a node
//! offers beyond the per-node limit is not used.

use std::time::Duration;

use fleetmap_coordinator::{nodes::NodeCa, CoordinatorConfig, Credentials, NodeLimit};
use fleetmap_net::{ClientIdentity, CloseCode, SessionError};
use fleetmap_testkit::{
    connect_client, node_key, node_role_with_key, start_coordinator, start_coordinator_with, CoordinatorAccess,
    NodePeer,
};
use rcgen::KeyPair;

fn identity(key: &KeyPair, cert: &str) -> ClientIdentity {
    ClientIdentity {
        cert_pem: cert.as_bytes().to_vec(),
        key_pem: key.serialize_pem().into_bytes(),
    }
}

/// Enrolls node `name` with the join token: its key and certificate.
async fn enroll(access: &CoordinatorAccess, name: &str) -> (KeyPair, String) {
    let key = node_key();
    let peer = NodePeer::join(access, node_role_with_key(&access.join_token, name, 1, &key))
        .await
        .unwrap();
    let cert = peer.node_certificate.clone().expect("a certificate on enrollment");
    peer.leave("enrolled").await;
    (key, cert)
}

/// Joins as `name` with its certificate and no token.
async fn join_with_certificate(
    access: &CoordinatorAccess,
    name: &str,
    key: &KeyPair,
    cert: &str,
) -> Result<NodePeer, SessionError> {
    NodePeer::join_as(access, Some(&identity(key, cert)), node_role_with_key("", name, 1, key)).await
}

fn refused(result: Result<NodePeer, SessionError>) -> String {
    match result {
        Err(SessionError::Refused(reason)) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, the node was welcomed"),
    }
}

#[tokio::test]
async fn a_node_enrolls_with_the_token_then_joins_with_its_certificate_alone() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let (key, cert) = enroll(&access, "n1").await;
    let peer = join_with_certificate(&access, "n1", &key, &cert).await.unwrap();
    assert!(peer.node_certificate.is_none(), "far from its end, no new certificate");
    assert!(coordinator.wait_for_nodes(1, Duration::from_secs(10)).await);

    // Neither a certificate nor the token.
    let reason = refused(NodePeer::join(&access, node_role_with_key("", "n2", 1, &node_key())).await);
    assert!(reason.contains("neither a certificate"), "{reason}");
    // Its certificate under another name.
    let reason = refused(join_with_certificate(&access, "n3", &key, &cert).await);
    assert!(reason.contains("not its current one"), "{reason}");
    // A certificate signed by another fleet's node CA fails TLS.
    let other = Credentials::generate().unwrap();
    let forged = NodeCa::new(&other, Duration::from_secs(3600))
        .unwrap()
        .certify("n1", key.public_key_raw())
        .unwrap();
    assert!(matches!(
        join_with_certificate(&access, "n1", &key, &forged.pem).await,
        Err(SessionError::Tls(_))
    ));
    peer.leave("done").await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn the_token_cannot_take_over_a_name_that_holds_a_valid_certificate() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let (key, cert) = enroll(&access, "gpu-01").await;
    let impostor = node_key();
    let role = || node_role_with_key(&access.join_token, "gpu-01", 1, &impostor);
    match NodePeer::join(&access, role()).await {
        Err(SessionError::Pending(reason)) => {
            assert!(reason.contains("fleetmap nodes approve gpu-01"), "{reason}")
        }
        Err(other) => panic!("expected to wait for approval, got {other}"),
        Ok(_) => panic!("the join token took over a name with a valid certificate"),
    }
    // The node that holds the name keeps it meanwhile.
    let peer = join_with_certificate(&access, "gpu-01", &key, &cert).await.unwrap();
    peer.leave("still mine").await;
    // The operator approves the new enrollment: the old certificate is
    // retired, the new key enrolls.
    coordinator.node_registry().approve("gpu-01").unwrap();
    let peer = NodePeer::join(&access, role()).await.unwrap();
    assert!(peer.node_certificate.is_some(), "approved: enrolled anew");
    peer.leave("enrolled").await;
    let reason = refused(join_with_certificate(&access, "gpu-01", &key, &cert).await);
    assert!(reason.contains("not its current one"), "{reason}");
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_revoked_node_is_disconnected_and_refused_with_its_certificate_or_the_token() {
    let (coordinator, access) = start_coordinator().await.unwrap();
    let (key, cert) = enroll(&access, "doomed").await;
    let peer = join_with_certificate(&access, "doomed", &key, &cert).await.unwrap();
    coordinator.node_registry().revoke("doomed").unwrap();
    match tokio::time::timeout(Duration::from_secs(5), peer.conn.closed())
        .await
        .expect("the coordinator disconnects a revoked node within a second or so")
    {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(CloseCode::of(c.error_code), Some(CloseCode::Refused));
            assert!(String::from_utf8_lossy(&c.reason).contains("revoked"));
        }
        other => panic!("unexpected close: {other}"),
    }
    let reason = refused(join_with_certificate(&access, "doomed", &key, &cert).await);
    assert!(reason.contains("revoked"), "{reason}");
    let with_token = NodePeer::join(
        &access,
        node_role_with_key(&access.join_token, "doomed", 1, &node_key()),
    )
    .await;
    assert!(
        refused(with_token).contains("join token"),
        "the token cannot enroll it again"
    );
    assert_eq!(coordinator.node_count(), 0);
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_certificate_is_renewed_in_the_last_third_of_its_life_and_refused_once_expired() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        // Whole seconds on the wire: long enough that rounding never makes it
        // expire before the renewal below.
        config.node_cert_validity = Duration::from_secs(6);
    })
    .await
    .unwrap();
    let (key, cert) = enroll(&access, "short").await;
    let peer = join_with_certificate(&access, "short", &key, &cert).await.unwrap();
    assert!(peer.node_certificate.is_none(), "early in its life: kept");
    peer.leave("again later").await;
    tokio::time::sleep(Duration::from_millis(4300)).await;
    let peer = join_with_certificate(&access, "short", &key, &cert).await.unwrap();
    peer.node_certificate.clone().expect("renewed in its last third");
    peer.leave("renewed").await;
    // The renewal's answer may never have reached the node: until it uses
    // its new certificate, the one it renewed still joins, and is renewed
    // again.
    let peer = join_with_certificate(&access, "short", &key, &cert).await.unwrap();
    let renewed = peer.node_certificate.clone().expect("renewed again");
    peer.leave("renewed again").await;
    let peer = join_with_certificate(&access, "short", &key, &renewed).await.unwrap();
    assert!(peer.node_certificate.is_none(), "a fresh certificate is kept");
    peer.leave("used the new one").await;
    let reason = refused(join_with_certificate(&access, "short", &key, &cert).await);
    assert!(
        reason.contains("not its current one"),
        "once the new one is used, the old one is superseded: {reason}"
    );
    tokio::time::sleep(Duration::from_millis(7000)).await;
    assert!(
        matches!(
            join_with_certificate(&access, "short", &key, &renewed).await,
            Err(SessionError::Tls(_))
        ),
        "an expired certificate fails the TLS handshake"
    );
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_node_that_stays_connected_is_renewed_on_its_open_connection() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        config.node_cert_validity = Duration::from_secs(6);
    })
    .await
    .unwrap();
    let (key, cert) = enroll(&access, "steady").await;
    let mut peer = join_with_certificate(&access, "steady", &key, &cert).await.unwrap();
    assert!(peer.node_certificate.is_none(), "early in its life: kept");
    // Into the last third of its life (after 4 s), without reconnecting.
    let renewed = match peer.next().await {
        fleetmap_protocol::CoordinatorToNode::Certificate { pem } => pem,
        other => panic!("expected a renewed certificate, got {other:?}"),
    };
    assert_ne!(renewed, cert);
    peer.leave("renewed").await;
    // The renewed certificate joins as is; the one it replaced only until
    // the new one is used.
    let peer = join_with_certificate(&access, "steady", &key, &renewed).await.unwrap();
    assert!(peer.node_certificate.is_none(), "a fresh certificate is kept");
    peer.leave("done").await;
    let reason = refused(join_with_certificate(&access, "steady", &key, &cert).await);
    assert!(reason.contains("not its current one"), "{reason}");
    coordinator.shutdown().await;
}

#[tokio::test]
async fn what_a_node_offers_beyond_the_per_node_limit_is_not_used() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        config.node_limit = NodeLimit {
            cores: Some(4),
            memory_bytes: Some(1 << 30),
            gpus: None,
        };
    })
    .await
    .unwrap();
    let peer = NodePeer::join(
        &access,
        node_role_with_key(&access.join_token, "big", 1000, &node_key()),
    )
    .await
    .unwrap();
    let client = connect_client(&access).await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.nodes[0].resources.cores, 4);
    assert_eq!(status.nodes[0].resources.memory_bytes, 1 << 30);
    peer.leave("done").await;
    coordinator.shutdown().await;
}

#[tokio::test]
async fn a_new_node_waits_for_approval_and_keeps_trying_until_approved() {
    let (coordinator, access) = start_coordinator_with(|config: &mut CoordinatorConfig| {
        config.approve_nodes = true;
    })
    .await
    .unwrap();
    let key = node_key();
    let role = || node_role_with_key(&access.join_token, "newcomer", 1, &key);
    match NodePeer::join(&access, role()).await {
        Err(SessionError::Pending(reason)) => {
            assert!(reason.contains("fleetmap nodes approve newcomer"), "{reason}")
        }
        Err(other) => panic!("expected to wait for approval, got {other}"),
        Ok(_) => panic!("admitted before approval"),
    }
    let entry = coordinator.node_registry().entry("newcomer").unwrap().unwrap();
    assert_eq!(
        (entry.approved, entry.fingerprint),
        (None, None),
        "listed as pending, no certificate"
    );
    coordinator.node_registry().approve("newcomer").unwrap();
    let peer = NodePeer::join(&access, role()).await.unwrap();
    assert!(peer.node_certificate.is_some(), "approved: enrolled");
    peer.leave("done").await;
    coordinator.shutdown().await;
}
