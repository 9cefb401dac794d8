//! Typed raw connections to the coordinator, for peers that speak the
//! protocol themselves instead of through the client library or the daemon.

use std::time::Duration;

use fleetmap_net::{CloseCode, NetError, Receiver, Session, SessionError};
use fleetmap_protocol::{
    ClientToCoordinator, CoordinatorToClient, CoordinatorToNode, Hello, NodeIsolation, NodeToCoordinator, Resources,
    Role, WireSize, DEFAULT_MAX_MESSAGE, SOFTWARE_VERSION,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::task::JoinHandle;

use crate::CoordinatorAccess;

/// How long joining may take: generous, since an emulated fleet of
/// thousands of nodes joins at once on a loaded machine.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Peer::next`] waits for a message before it fails the test.
const NEXT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the coordinator that sends `Up` and reads `Down`, opened
/// through the same session layer as the real peers. The types need not
/// match the role it joined with: a hostile test sends a node's messages as
/// a client.
pub struct Peer<Up, Down> {
    pub conn: quinn::Connection,
    /// The certificate the coordinator issued, when it issued one.
    pub node_certificate: Option<String>,
    /// Messages to the coordinator; a writer task frames and sends them.
    pub tx: fleetmap_net::Outbox<Up>,
    pub rx: Receiver<Down>,
    writer: JoinHandle<Result<(), NetError>>,
    /// The endpoint must live as long as the connection.
    endpoint: quinn::Endpoint,
}

/// A node speaking the protocol by hand.
pub type NodePeer = Peer<NodeToCoordinator, CoordinatorToNode>;
/// A client speaking the protocol by hand.
pub type ClientPeer = Peer<ClientToCoordinator, CoordinatorToClient>;

impl<Up: Serialize + WireSize + Send + 'static, Down: DeserializeOwned> Peer<Up, Down> {
    /// Dials, says `Hello` as `role` and waits to be welcomed.
    pub async fn join(access: &CoordinatorAccess, role: Role) -> Result<Self, SessionError> {
        Self::join_as(access, None, role).await
    }

    /// As [`Peer::join`], presenting `identity` (a node's certificate) in
    /// the TLS handshake.
    pub async fn join_as(
        access: &CoordinatorAccess,
        identity: Option<&fleetmap_net::ClientIdentity>,
        role: Role,
    ) -> Result<Self, SessionError> {
        let hello = Hello {
            role,
            software_version: SOFTWARE_VERSION.into(),
        };
        let session: Session<Up, Down> = fleetmap_net::dial_as(
            &access.addr.to_string(),
            &access.ca_pem,
            identity,
            &hello,
            DEFAULT_MAX_MESSAGE,
            JOIN_TIMEOUT,
        )
        .await?;
        let (fleetmap_net::Link::Quic(conn), Some(endpoint)) = (session.conn, session.endpoint) else {
            unreachable!("a session dialled over QUIC has a QUIC connection and its endpoint");
        };
        Ok(Peer {
            node_certificate: session.node_certificate,
            conn,
            tx: session.tx,
            rx: session.rx,
            writer: session.writer,
            endpoint,
        })
    }

    /// The next message, for tests: panics when none comes within 10 s, when
    /// it is malformed or when the coordinator ended the stream.
    pub async fn next(&mut self) -> Down {
        tokio::time::timeout(NEXT_TIMEOUT, self.rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("a valid message")
            .expect("the stream is open")
    }

    /// Closes the connection as done with `reason`, dropping whatever is
    /// still queued to send, and waits (up to a second) for the close to
    /// reach the coordinator so that it learns of it at once rather than
    /// when the connection times out.
    pub async fn leave(self, reason: &str) {
        CloseCode::Done.close(&self.conn.clone().into(), reason);
        drop(self.tx);
        self.writer.abort();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// The role of a node named `name` that offers `cores` cores and 2 GiB per
/// core, no GPU: one slot per core for [`ONE_CORE`](crate::ONE_CORE) calls.
pub fn node_role(join_token: &str, name: &str, cores: u32) -> Role {
    node_role_with_key(join_token, name, cores, &node_key())
}

/// A node's key pair, as a daemon makes one.
pub fn node_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate().expect("a P-256 key pair")
}

/// [`node_role`] with the public key of `key`.
pub fn node_role_with_key(join_token: &str, name: &str, cores: u32, key: &rcgen::KeyPair) -> Role {
    Role::Node {
        public_key: key.public_key_raw().to_vec(),
        token: join_token.into(),
        name: name.into(),
        resources: Resources {
            cores,
            memory_bytes: u64::from(cores) * (2 << 30),
            gpus: vec![],
        },
        isolation: NodeIsolation {
            pinned: false,
            description: "none (an echo node of fleetmap-testkit)".into(),
        },
    }
}

/// A connection with its stream open and nothing said yet, for raw bytes.
/// The endpoint must outlive the connection.
pub async fn open_raw(
    access: &CoordinatorAccess,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, quinn::Endpoint)> {
    open_raw_from(access, std::net::Ipv4Addr::UNSPECIFIED.into()).await
}

/// As [`open_raw`], from the local address `from` (any loopback address
/// `127.x.y.z` reaches a coordinator on `127.0.0.1`).
pub async fn open_raw_from(
    access: &CoordinatorAccess,
    from: std::net::IpAddr,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, quinn::Endpoint)> {
    let endpoint = fleetmap_net::client_endpoint_at(&access.ca_pem, (from, 0).into())?;
    let conn = endpoint.connect(access.addr, fleetmap_net::SERVER_NAME)?.await?;
    let (send, recv) = conn.open_bi().await?;
    Ok((conn, send, recv, endpoint))
}
