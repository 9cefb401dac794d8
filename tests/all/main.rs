//! Cross-crate integration tests: the real coordinator, node daemon and
//! client over real QUIC with TLS on loopback. Python workers are covered by
//! the pytest suite (`python/tests`); here the node side is either the real
//! daemon or a peer that speaks the real protocol.

mod dependencies;
mod hostile_peers;
mod protocol_peers;

use std::{net::SocketAddr, time::Duration};

use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_net::{Receiver, Session};
use fleetmap_protocol::{
    ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, Hello, NodeToCoordinator, Resources, Role,
    DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

pub async fn start_coordinator() -> (RunningCoordinator, Credentials) {
    let creds = Credentials::generate().unwrap();
    let config = CoordinatorConfig::new("127.0.0.1:0".parse().unwrap(), creds.clone());
    (serve(config).await.unwrap(), creds)
}

/// A client of the library under test, with the coordinator's credentials.
pub async fn connect_client(coordinator: &RunningCoordinator, creds: &Credentials) -> fleetmap_client::Client {
    fleetmap_client::Client::connect(
        &coordinator.local_addr.to_string(),
        creds.ca_pem.as_bytes(),
        &creds.api_key,
    )
    .await
    .expect("the coordinator admits a client with its API key")
}

/// A protocol connection to the coordinator that sends `Up` and reads
/// `Down`, through the same session layer as the real peers.
pub struct Peer<Up, Down> {
    pub conn: quinn::Connection,
    pub tx: mpsc::UnboundedSender<Up>,
    pub rx: Receiver<Down>,
    _endpoint: quinn::Endpoint,
}

/// A node speaking the protocol by hand.
pub type NodePeer = Peer<NodeToCoordinator, CoordinatorToNode>;
/// A client speaking the protocol by hand.
pub type ClientPeer = Peer<ClientToCoordinator, CoordinatorToClient>;

/// A connection with its stream open and nothing said yet, for raw bytes.
pub async fn open_raw(
    addr: SocketAddr,
    creds: &Credentials,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream, quinn::Endpoint) {
    let endpoint = fleetmap_net::client_endpoint(creds.ca_pem.as_bytes(), addr).unwrap();
    let conn = endpoint
        .connect(addr, fleetmap_net::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (conn, send, recv, endpoint)
}

impl<Up: Serialize + Send + 'static, Down: DeserializeOwned> Peer<Up, Down> {
    /// Dials, says `Hello` as `role` and expects to be welcomed.
    pub async fn join(addr: SocketAddr, creds: &Credentials, role: Role) -> Self {
        let hello = Hello {
            role,
            software_version: SOFTWARE_VERSION.into(),
        };
        let session: Session<Up, Down> = fleetmap_net::dial(
            &addr.to_string(),
            creds.ca_pem.as_bytes(),
            &hello,
            DEFAULT_MAX_MESSAGE,
            Duration::from_secs(15),
        )
        .await
        .expect("the coordinator welcomes the peer");
        Peer {
            conn: session.conn,
            tx: session.tx,
            rx: session.rx,
            _endpoint: session.endpoint,
        }
    }

    pub async fn next(&mut self) -> Down {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("a valid message")
            .expect("the stream is open")
    }
}

pub fn node_role(token: &str, name: &str, cores: u32) -> Role {
    Role::Node {
        token: token.into(),
        name: name.into(),
        resources: Resources {
            cores,
            memory_bytes: 8 << 30,
            gpus: vec![],
        },
        isolation: "none (a test peer)".into(),
    }
}
