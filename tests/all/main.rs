//! Cross-crate integration tests: the real coordinator, node daemon and
//! client over real QUIC with TLS on loopback. Python workers are covered by
//! the pytest suite (`python/tests`); here the node side is either the real
//! daemon or a peer that speaks the real protocol.

mod dependencies;
mod hostile_peers;
mod protocol_peers;

use std::{net::SocketAddr, time::Duration};

use fleetmap_coordinator::{serve, CoordinatorConfig, Credentials, RunningCoordinator};
use fleetmap_net::{write_frames, FramedReader};
use fleetmap_protocol::{Hello, Message, Resources, Role, DEFAULT_MAX_FRAME, SOFTWARE_VERSION};
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

/// A raw protocol connection to the coordinator.
pub struct Peer {
    pub conn: quinn::Connection,
    pub tx: mpsc::UnboundedSender<Message>,
    pub rx: FramedReader<quinn::RecvStream>,
    _endpoint: quinn::Endpoint,
}

impl Peer {
    pub async fn open(
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

    pub async fn hello(addr: SocketAddr, creds: &Credentials, role: Role) -> Peer {
        let (conn, send, recv, endpoint) = Self::open(addr, creds).await;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_frames(send, rx, DEFAULT_MAX_FRAME));
        tx.send(Message::Hello(Hello {
            role,
            software_version: SOFTWARE_VERSION.into(),
        }))
        .unwrap();
        Peer {
            conn,
            tx,
            rx: FramedReader::new(recv, DEFAULT_MAX_FRAME),
            _endpoint: endpoint,
        }
    }

    pub async fn next(&mut self) -> Message {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv::<Message>())
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
