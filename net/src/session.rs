//! The session layer: the one way a client or node daemon opens a
//! connection to the coordinator ([`dial`] over QUIC, [`dial_local`] over a
//! link within the coordinator's process) and the one way the coordinator
//! accepts it ([`accept_hello`]), with the handshake both sides share, the
//! close codes ([`CloseCode`]) and the one mapping from how a connection
//! ended to what went wrong ([`SessionError`]).
//!
//! A connection carries one bidirectional stream, opened by the dialler.
//! The dialler writes a [`Hello`]; the coordinator answers with a
//! [`HelloReply`]. Until then frames are limited to
//! [`HANDSHAKE_MAX_MESSAGE`]: an unauthenticated peer cannot make the
//! coordinator buffer megabytes. After the handshake each side sends its
//! direction's message type (`Up`) and reads the other's (`Down`).

use std::{marker::PhantomData, net::SocketAddr, time::Duration};

use fleetmap_protocol::{encode_frame, Hello, HelloReply, WireSize, HANDSHAKE_MAX_MESSAGE};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{io::AsyncWriteExt, task::JoinHandle};

use crate::{
    link::{Link, LinkRecv, LinkSend, LocalDialer},
    outbox, write_frames, FramedReader, NetError, Outbox,
};

/// Why fleetmap closes a connection: the QUIC application close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// A normal end: the peer is done, or the server shuts down.
    Done = 0,
    /// The peer's credentials were refused; retrying cannot help.
    Refused = 1,
    /// The peer broke the protocol (a malformed frame, a message out of turn).
    Protocol = 2,
    /// Not admitted yet (a node waiting for approval): try again later.
    Pending = 3,
}

impl CloseCode {
    /// The longest close reason sent: QUIC packets are small, and a reason
    /// is for a human, not a transcript.
    const MAX_REASON: usize = 1000;

    pub fn code(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }

    /// The code a peer closed with, if it is one of fleetmap's.
    pub fn of(code: quinn::VarInt) -> Option<CloseCode> {
        [
            CloseCode::Done,
            CloseCode::Refused,
            CloseCode::Protocol,
            CloseCode::Pending,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// Closes `conn` with this code and `reason`, cut to a sane length.
    pub fn close(self, conn: &Link, reason: &str) {
        let mut end = reason.len().min(Self::MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        conn.close_with(self, &reason.as_bytes()[..end]);
    }
}

/// What went wrong opening or holding a session.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("cannot reach the fleetmap coordinator at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Refused(String),
    /// Not admitted yet; worth trying again later.
    #[error("{0}")]
    Pending(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no Hello within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Lost(String),
}

impl SessionError {
    /// How a connection ended, as an error: the one mapping from QUIC close
    /// reasons to fleetmap's. `addr` names the peer for errors before the
    /// connection was established.
    pub fn from_connection(addr: &str, e: &quinn::ConnectionError) -> SessionError {
        use quinn::ConnectionError as E;
        let reason_text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match e {
            E::ApplicationClosed(close) => {
                SessionError::from_close(CloseCode::of(close.error_code), reason_text(&close.reason))
            }
            // TLS alerts travel as QUIC's CRYPTO_ERROR codes 0x100-0x1ff,
            // whichever side raised them (RFC 9001, section 4.8).
            E::TransportError(t) if is_crypto_error(t.code) => SessionError::Tls(t.to_string()),
            E::ConnectionClosed(c) if is_crypto_error(c.error_code) => SessionError::Tls(c.to_string()),
            E::TimedOut => SessionError::Unreachable {
                addr: addr.into(),
                reason: "timed out".into(),
            },
            E::LocallyClosed => SessionError::Lost("closed by this side".into()),
            other => SessionError::Unreachable {
                addr: addr.into(),
                reason: other.to_string(),
            },
        }
    }

    /// The peer closed the connection with `code` (`None`: not one of
    /// fleetmap's) and `reason`.
    pub(crate) fn from_close(code: Option<CloseCode>, reason: String) -> SessionError {
        match code {
            Some(CloseCode::Refused) => SessionError::Refused(reason),
            Some(CloseCode::Pending) => SessionError::Pending(reason),
            Some(CloseCode::Protocol) => SessionError::Protocol(format!("the peer closed the connection: {reason}")),
            _ if reason.is_empty() => SessionError::Lost("the peer closed the connection".into()),
            _ => SessionError::Lost(format!("the peer closed the connection: {reason}")),
        }
    }
}

fn is_crypto_error(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// The receiving half of a session: typed frames from the peer.
pub struct Receiver<Down> {
    reader: FramedReader<LinkRecv>,
    conn: Link,
    peer: String,
    _down: PhantomData<fn() -> Down>,
}

impl<Down: DeserializeOwned> Receiver<Down> {
    /// The next message; `Ok(None)` when the peer finished its stream.
    /// A malformed frame closes the connection with [`CloseCode::Protocol`].
    pub async fn recv(&mut self) -> Result<Option<Down>, SessionError> {
        match self.reader.recv::<Down>().await {
            Ok(msg) => Ok(msg),
            Err(NetError::Decode(e)) => {
                let reason = format!("malformed frame from {}: {e}", self.peer);
                CloseCode::Protocol.close(&self.conn, &reason);
                Err(SessionError::Protocol(reason))
            }
            Err(e) => Err(self
                .conn
                .close_error(&self.peer)
                .unwrap_or_else(|| SessionError::Lost(e.to_string()))),
        }
    }
}

/// An open, authenticated connection to the coordinator.
pub struct Session<Up, Down> {
    /// A node's new certificate, when the coordinator issued one.
    pub node_certificate: Option<String>,
    pub conn: Link,
    /// Messages to the coordinator; a writer task frames and sends them.
    pub tx: Outbox<Up>,
    pub rx: Receiver<Down>,
    /// Where the coordinator is: its address, or "this process".
    pub remote: String,
    /// The fleetmap version the coordinator runs.
    pub coordinator_version: String,
    pub writer: JoinHandle<Result<(), NetError>>,
    /// The endpoint must live as long as the connection (none for a local
    /// link).
    pub endpoint: Option<quinn::Endpoint>,
}

/// Connects to the coordinator at `addr` (`host:port`), trusting only
/// `ca_pem`, says `hello` and waits for the answer, all within `timeout`.
pub async fn dial<Up, Down>(
    addr: &str,
    ca_pem: &[u8],
    hello: &Hello,
    max_message: usize,
    timeout: Duration,
) -> Result<Session<Up, Down>, SessionError>
where
    Up: Serialize + WireSize + Send + 'static,
    Down: DeserializeOwned,
{
    dial_as(addr, ca_pem, None, hello, max_message, timeout).await
}

/// As [`dial`], presenting `identity` (a node's certificate) in the TLS
/// handshake.
pub async fn dial_as<Up, Down>(
    addr: &str,
    ca_pem: &[u8],
    identity: Option<&crate::ClientIdentity>,
    hello: &Hello,
    max_message: usize,
    timeout: Duration,
) -> Result<Session<Up, Down>, SessionError>
where
    Up: Serialize + WireSize + Send + 'static,
    Down: DeserializeOwned,
{
    within(timeout, addr, dial_inner(addr, ca_pem, identity, hello, max_message)).await
}

/// `session`, unless it takes longer than `timeout`: then the coordinator at
/// `addr` is unreachable.
async fn within<T>(
    timeout: Duration,
    addr: &str,
    session: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(timeout, session)
        .await
        .unwrap_or_else(|_| Err(unreachable_at(addr, format!("no answer within {timeout:?}"))))
}

/// The coordinator at `addr` cannot be reached, for `reason`.
fn unreachable_at(addr: &str, reason: impl Into<String>) -> SessionError {
    SessionError::Unreachable {
        addr: addr.into(),
        reason: reason.into(),
    }
}

async fn dial_inner<Up, Down>(
    addr: &str,
    ca_pem: &[u8],
    identity: Option<&crate::ClientIdentity>,
    hello: &Hello,
    max_message: usize,
) -> Result<Session<Up, Down>, SessionError>
where
    Up: Serialize + WireSize + Send + 'static,
    Down: DeserializeOwned,
{
    let unreachable = |reason: String| unreachable_at(addr, reason);
    let remote: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("the name has no address".into()))?;
    let endpoint = crate::client_endpoint_as(ca_pem, crate::any_local_for(remote), identity).map_err(|e| match e {
        NetError::Tls(t) => SessionError::Tls(t),
        other => unreachable(other.to_string()),
    })?;
    let conn = endpoint
        .connect(remote, crate::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?
        .await
        .map_err(|e| SessionError::from_connection(addr, &e))?;
    let mut session = open_session(Link::Quic(conn), addr, hello, max_message).await?;
    session.remote = remote.to_string();
    session.endpoint = Some(endpoint);
    Ok(session)
}

/// Opens a session to the coordinator in this process over a local link
/// (see [`crate::link`]), presenting `identity`'s certificate, as [`dial_as`]
/// does over QUIC; `addr` names the coordinator in errors and logs.
pub async fn dial_local<Up, Down>(
    dialer: &LocalDialer,
    addr: &str,
    identity: Option<&crate::ClientIdentity>,
    hello: &Hello,
    max_message: usize,
    timeout: Duration,
) -> Result<Session<Up, Down>, SessionError>
where
    Up: Serialize + WireSize + Send + 'static,
    Down: DeserializeOwned,
{
    let certificate = match identity {
        Some(identity) => Some(
            crate::parse_certs(&identity.cert_pem)
                .map_err(|e| SessionError::Tls(e.to_string()))?
                .swap_remove(0)
                .as_ref()
                .to_vec(),
        ),
        None => None,
    };
    let link = dialer
        .dial(certificate)
        .ok_or_else(|| unreachable_at(addr, "the coordinator in this process has stopped"))?;
    let mut session = within(timeout, addr, open_session(link, addr, hello, max_message)).await?;
    session.remote = format!("{addr} (in this process)");
    Ok(session)
}

/// Says `hello` on `conn`'s stream and waits for the coordinator's answer.
async fn open_session<Up, Down>(
    conn: Link,
    addr: &str,
    hello: &Hello,
    max_message: usize,
) -> Result<Session<Up, Down>, SessionError>
where
    Up: Serialize + WireSize + Send + 'static,
    Down: DeserializeOwned,
{
    let unreachable = |reason: String| unreachable_at(addr, reason);
    let (mut send, recv) = conn.stream(addr, true).await?;
    let mut frame = Vec::new();
    encode_frame(hello, HANDSHAKE_MAX_MESSAGE, &mut frame)
        .map_err(|e| SessionError::Protocol(format!("cannot say Hello: {e}")))?;
    let lost = |conn: &Link, e: String| conn.close_error(addr).unwrap_or_else(|| unreachable(e));
    send.write_all(&frame).await.map_err(|e| lost(&conn, e.to_string()))?;
    let mut reader = FramedReader::new(recv, HANDSHAKE_MAX_MESSAGE);
    let (coordinator_version, node_certificate) = match reader.recv::<HelloReply>().await {
        Ok(Some(HelloReply::Welcome {
            coordinator_version,
            node_certificate,
        })) => (coordinator_version, node_certificate),
        Ok(Some(HelloReply::Refused { reason })) => return Err(SessionError::Refused(reason)),
        Ok(Some(HelloReply::Pending { reason })) => return Err(SessionError::Pending(reason)),
        Ok(None) => return Err(lost(&conn, "the coordinator ended the stream before answering".into())),
        Err(NetError::Decode(e)) => {
            let reason = format!("bad handshake from the coordinator: {e}");
            CloseCode::Protocol.close(&conn, &reason);
            return Err(SessionError::Protocol(reason));
        }
        // A refusal may arrive as the connection's close reason instead.
        Err(e) => return Err(lost(&conn, e.to_string())),
    };
    reader.set_max_message(max_message);
    let (tx, writer) = spawn_writer(&conn, send, max_message);
    Ok(Session {
        rx: Receiver {
            reader,
            conn: conn.clone(),
            // Errors say "cannot reach the fleetmap coordinator at ADDR".
            peer: addr.to_string(),
            _down: PhantomData,
        },
        node_certificate,
        conn,
        tx,
        remote: addr.to_string(),
        coordinator_version,
        writer,
        endpoint: None,
    })
}

/// A connection whose peer has said `Hello` and waits for the answer.
pub struct Handshake {
    pub hello: Hello,
    /// The peer, for logs: its address, or "this process".
    pub remote: String,
    conn: Link,
    send: LinkSend,
    reader: FramedReader<LinkRecv>,
}

/// Waits up to `timeout` for the peer on `conn` to open its stream and say
/// `Hello`; `Ok(None)` if it closed its stream without a word. Nothing the
/// peer sends before its `Hello` can exceed [`HANDSHAKE_MAX_MESSAGE`].
pub async fn accept_hello(conn: &Link, timeout: Duration) -> Result<Option<Handshake>, SessionError> {
    let remote = conn.peer();
    let first = async {
        let (send, recv) = conn.stream(&remote, false).await?;
        let mut reader = FramedReader::new(recv, HANDSHAKE_MAX_MESSAGE);
        let hello = reader.recv::<Hello>().await.map_err(|e| match e {
            NetError::Decode(e) => SessionError::Protocol(format!("bad Hello: {e}")),
            other => SessionError::Lost(other.to_string()),
        })?;
        Ok::<_, SessionError>(hello.map(|hello| Handshake {
            hello,
            remote: remote.clone(),
            conn: conn.clone(),
            send,
            reader,
        }))
    };
    tokio::time::timeout(timeout, first)
        .await
        .map_err(|_| SessionError::HandshakeTimeout(timeout))?
}

impl Handshake {
    /// Refuses the peer: the reason reaches it as a `Refused` answer and as
    /// the connection's close reason, whichever it reads first.
    pub async fn refuse(self, reason: &str) {
        self.turn_away(
            HelloReply::Refused { reason: reason.into() },
            CloseCode::Refused,
            reason,
        )
        .await
    }

    /// Does not admit the peer yet (a node waiting for approval): it should
    /// try again later.
    pub async fn hold(self, reason: &str) {
        self.turn_away(
            HelloReply::Pending { reason: reason.into() },
            CloseCode::Pending,
            reason,
        )
        .await
    }

    async fn turn_away(mut self, refused: HelloReply, code: CloseCode, reason: &str) {
        let mut frame = Vec::new();
        if encode_frame(&refused, HANDSHAKE_MAX_MESSAGE, &mut frame).is_ok() {
            // Let the answer reach the peer before the close overtakes it; a
            // peer that does not read gets only the close.
            let send = async {
                let _ = self.send.write_all(&frame).await;
                self.send.finish();
                self.send.stopped().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
        }
        code.close(&self.conn, reason);
    }

    /// Welcomes the peer and opens its session: messages of type `Up` to it,
    /// of type `Down` from it, frames up to `max_message`.
    pub async fn welcome<Up, Down>(
        mut self,
        coordinator_version: &str,
        node_certificate: Option<String>,
        max_message: usize,
    ) -> Result<(Outbox<Up>, Receiver<Down>, JoinHandle<Result<(), NetError>>), SessionError>
    where
        Up: Serialize + WireSize + Send + 'static,
        Down: DeserializeOwned,
    {
        let mut frame = Vec::new();
        let welcome = HelloReply::Welcome {
            coordinator_version: coordinator_version.into(),
            node_certificate,
        };
        encode_frame(&welcome, HANDSHAKE_MAX_MESSAGE, &mut frame)
            .map_err(|e| SessionError::Protocol(format!("cannot say Welcome: {e}")))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| SessionError::Lost(e.to_string()))?;
        self.reader.set_max_message(max_message);
        let (tx, writer) = spawn_writer(&self.conn, self.send, max_message);
        let receiver = Receiver {
            reader: self.reader,
            conn: self.conn,
            peer: self.remote,
            _down: PhantomData,
        };
        Ok((tx, receiver, writer))
    }
}

/// Starts the task that writes a session's messages. A message that cannot
/// be sent (it does not encode within the limit, or the stream broke) ends
/// the connection with the reason, so that both sides handle it like any
/// other lost connection rather than one side waiting on a dead writer.
fn spawn_writer<Up>(conn: &Link, send: LinkSend, max_message: usize) -> (Outbox<Up>, JoinHandle<Result<(), NetError>>)
where
    Up: Serialize + WireSize + Send + 'static,
{
    let (tx, inbox) = outbox();
    let conn = conn.clone();
    let writer = tokio::spawn(async move {
        let r = write_frames(send, inbox, max_message).await;
        if let Err(e) = &r {
            CloseCode::Protocol.close(&conn, &format!("cannot send: {e}"));
        }
        r
    });
    (tx, writer)
}
