//! fleetmap's network plumbing, shared by the coordinator, node daemons and
//! clients: QUIC endpoints over rustls (TLS 1.3 only), the transport settings
//! every connection uses, and framed reading and writing of protocol messages
//! on any async byte stream (QUIC streams, a worker's Unix socket).
//!
//! [`session`] is the one way to open a connection to the coordinator (dial,
//! `Hello`, `Welcome` or `Refused`) and to accept one, and [`CloseCode`] the
//! one set of reasons a connection is closed with.
//!
//! [`http`] is the small, bounded HTTP/1.1 server operators read metrics and
//! the dashboard from.
//!
//! This crate holds no protocol logic: which message goes where is decided by
//! the crates above it. It must not depend on `sandbox`, `runtime` or pyo3.

pub mod http;
pub mod link;
pub mod session;

pub use link::{local_listener, Link, LocalDialer, LocalListener};
pub use session::{accept_hello, dial, dial_as, dial_local, CloseCode, Handshake, Receiver, Session, SessionError};

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Once,
    },
    time::Duration,
};

use fleetmap_protocol::{encode_frame, DecodeError, EncodeError, FrameDecoder, WireSize};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

/// The name in the coordinator's certificate that every peer verifies,
/// whatever address it dialled (as Kubernetes does with `kubernetes.default`),
/// so that one certificate serves every interface and NAT of a coordinator.
pub const SERVER_NAME: &str = "fleetmap-coordinator";

/// The ALPN protocol id: a peer of another protocol fails the handshake.
pub const ALPN: &[u8] = b"fleetmap/1";

/// How often an idle connection is pinged, and when a silent one is dead.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

const UDP_BUFFER: usize = 4 << 20;

/// What can go wrong below the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Installs the process-wide rustls crypto provider (ring) once.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another library in the same process may have installed one first;
        // any provider with TLS 1.3 and AES-128-GCM serves QUIC, so that is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The transport settings of every fleetmap connection: keep-alives so that a
/// dead peer is noticed within [`IDLE_TIMEOUT`], and windows sized for chunks
/// of inputs in the megabytes.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // IDLE_TIMEOUT is 5 s, far inside QUIC's idle-timeout range (2^62 ms).
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("5 s is a valid QUIC idle timeout"),
    ));
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// What a peer may send on a connection to the coordinator before it has
/// authenticated; the coordinator widens the window once it has
/// (`quinn::Connection::set_receive_window`).
pub const HANDSHAKE_RECEIVE_WINDOW: u32 = 64 << 10;

/// The coordinator's transport: as [`transport_config`], except that a
/// peer may open one stream (the session's) and no other, and may send no
/// more than [`HANDSHAKE_RECEIVE_WINDOW`] until it has authenticated.
fn server_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    t.receive_window(quinn::VarInt::from_u32(HANDSHAKE_RECEIVE_WINDOW));
    t
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Larger buffers than the kernel default keep bursts of chunk data from
    // being dropped; the kernel caps them at net.core.[rw]mem_max anyway.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Parses PEM certificates.
/// The certificates of a PEM bundle as a root store.
fn roots(ca_pem: &[u8]) -> Result<rustls::RootCertStore, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| NetError::Tls(format!("bad CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn private_key(key_pem: &[u8]) -> Result<PrivateKeyDer<'static>, NetError> {
    PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| NetError::Tls(format!("bad PEM private key: {e}")))
}

/// The DER of the certificate the peer presented in the TLS handshake, if
/// it presented one (it has been verified by then).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.as_ref().to_vec())
}

pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NetError::Tls(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(NetError::Tls("no certificate found in the PEM data".into()));
    }
    Ok(certs)
}

/// A QUIC server endpoint with the given certificate chain and key (PEM).
pub fn server_endpoint(listen: SocketAddr, cert_pem: &[u8], key_pem: &[u8]) -> Result<quinn::Endpoint, NetError> {
    server_endpoint_verifying(listen, cert_pem, key_pem, None)
}

/// As [`server_endpoint`]; with `client_ca_pem`, a peer may present a
/// certificate, which must then be signed by that CA and within its
/// validity (a node's); peers without one (clients, nodes enrolling) are
/// still admitted to the handshake, where they authenticate otherwise.
pub fn server_endpoint_verifying(
    listen: SocketAddr,
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<quinn::Endpoint, NetError> {
    install_crypto_provider();
    let certs = parse_certs(cert_pem)?;
    let key = private_key(key_pem)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => builder.with_client_cert_verifier(client_verifier(pem)?),
    };
    let mut tls = builder
        .with_single_cert(certs, key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(server_transport_config()));
    let socket = udp_socket(listen)?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// What a peer's certificate must be: signed by `client_ca_pem` and within
/// its validity. A peer may present none (it authenticates otherwise).
fn client_verifier(client_ca_pem: &[u8]) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, NetError> {
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots(client_ca_pem)?.into(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))
}

/// A QUIC client endpoint that trusts only the given CA (PEM).
pub fn client_endpoint(ca_pem: &[u8], remote: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    client_endpoint_at(ca_pem, any_local_for(remote))
}

/// Any local address of `remote`'s family, any port: where a client binds.
pub(crate) fn any_local_for(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// As [`client_endpoint`], bound to `local` (tests dial from several
/// loopback addresses).
pub fn client_endpoint_at(ca_pem: &[u8], local: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    client_endpoint_as(ca_pem, local, None)
}

/// A certificate and its private key, PEM, that a peer presents in the TLS
/// handshake (a node's, signed by the cluster's node CA).
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// As [`client_endpoint_at`], presenting `identity` if given.
pub fn client_endpoint_as(
    ca_pem: &[u8],
    local: SocketAddr,
    identity: Option<&ClientIdentity>,
) -> Result<quinn::Endpoint, NetError> {
    install_crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(parse_certs(&id.cert_pem)?, private_key(&id.key_pem)?)
            .map_err(|e| NetError::Tls(format!("bad node certificate: {e}")))?,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(local)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Reads framed messages from a byte stream.
pub struct FramedReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(inner: R, max_message: usize) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(max_message),
            buf: vec![0; 256 << 10].into_boxed_slice(),
        }
    }

    /// Changes the frame limit (see [`FrameDecoder::set_max_message`]).
    pub fn set_max_message(&mut self, max: usize) {
        self.decoder.set_max_message(max);
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, NetError> {
        loop {
            if let Some(msg) = self.decoder.decode()? {
                return Ok(Some(msg));
            }
            let n = self.inner.read(&mut self.buf).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }
}

/// A connection's sending half: messages wait here for the writer task, and
/// the bytes waiting (by [`WireSize`]) are counted, so that whoever sends
/// can hold a peer that reads slowly to a budget rather than grow without
/// bound. Cloning shares the queue.
pub struct Outbox<T> {
    tx: mpsc::UnboundedSender<T>,
    queued: Arc<AtomicUsize>,
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
        }
    }
}

/// What the writer task takes messages from; see [`outbox`].
pub struct Inbox<T> {
    rx: mpsc::UnboundedReceiver<T>,
    queued: Arc<AtomicUsize>,
}

/// A new queue of messages for one writer.
pub fn outbox<T>() -> (Outbox<T>, Inbox<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Outbox {
            tx,
            queued: queued.clone(),
        },
        Inbox { rx, queued },
    )
}

impl<T: WireSize> Outbox<T> {
    /// Queues `msg`; gives it back if the writer has stopped.
    pub fn send(&self, msg: T) -> Result<(), T> {
        let size = msg.wire_size();
        self.queued.fetch_add(size, Ordering::Relaxed);
        self.tx.send(msg).map_err(|e| {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            e.0
        })
    }

    /// Bytes queued and not yet handed to the connection.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the writer has stopped (the connection is gone).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T: WireSize> Inbox<T> {
    async fn recv(&mut self) -> Option<T> {
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(msg.wire_size(), Ordering::Relaxed);
        Some(msg)
    }

    fn try_recv(&mut self) -> Option<T> {
        let msg = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(msg.wire_size(), Ordering::Relaxed);
        Some(msg)
    }
}

/// Writes every message from `inbox` to `out` as frames until every
/// [`Outbox`] is dropped, then shuts `out` down. Messages waiting together
/// are coalesced into one write.
pub async fn write_frames<W, T>(mut out: W, mut inbox: Inbox<T>, max_message: usize) -> Result<(), NetError>
where
    W: AsyncWrite + Unpin,
    T: Serialize + WireSize,
{
    const COALESCE: usize = 1 << 20;
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(msg) = inbox.recv().await {
        buf.clear();
        encode_frame(&msg, max_message, &mut buf)?;
        while buf.len() < COALESCE {
            match inbox.try_recv() {
                Some(msg) => encode_frame(&msg, max_message, &mut buf)?,
                None => break,
            }
        }
        out.write_all(&buf).await?;
    }
    out.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use fleetmap_protocol::{ClientToCoordinator as Message, JobId, DEFAULT_MAX_MESSAGE};

    use super::*;

    #[tokio::test]
    async fn frames_cross_a_byte_stream() {
        let (a, b) = tokio::io::duplex(64);
        let (tx, rx) = outbox();
        let writer = tokio::spawn(write_frames(a, rx, DEFAULT_MAX_MESSAGE));
        for job in 0..100 {
            tx.send(Message::CancelJob { job: JobId(job) }).unwrap();
        }
        drop(tx);
        let mut reader = FramedReader::new(b, DEFAULT_MAX_MESSAGE);
        for job in 0..100 {
            assert_eq!(
                reader.recv::<Message>().await.unwrap(),
                Some(Message::CancelJob { job: JobId(job) })
            );
        }
        assert!(reader.recv::<Message>().await.unwrap().is_none());
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stream_cut_mid_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[10, 0, 0, 0, 1]).await.unwrap();
        drop(a);
        let mut reader = FramedReader::new(b, DEFAULT_MAX_MESSAGE);
        assert!(matches!(
            reader.recv::<Message>().await,
            Err(NetError::Decode(DecodeError::Truncated { left: 5 }))
        ));
    }
}
