//! What a session runs over: a QUIC connection between processes, or a
//! link within one process ([`local_listener`]).
//!
//! The embedded cluster's client, coordinator and node share one process.
//! Between them a QUIC connection would encrypt, send and acknowledge every
//! frame over loopback to reach code a function call away; a local link
//! carries the same frames through a bounded in-memory pipe instead. Only
//! code in the process that holds the coordinator's [`LocalDialer`] can open
//! one. A certificate a node presents on it is checked as the TLS handshake
//! checks it (signed by the node CA, within its validity); a node proves
//! no key, since its process is the coordinator's own. Everything above the
//! link (handshake, frame limits, close codes) is the same for both.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use rustls::{
    pki_types::{CertificateDer, UnixTime},
    server::danger::ClientCertVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
};

use crate::{CloseCode, NetError, SessionError};

/// The most bytes a local pipe holds unread; its writer waits beyond that,
/// as a QUIC stream's does at the end of its window.
const PIPE_CAPACITY: usize = 16 << 20;

/// A pipe's buffer above this size is freed once it is read empty, so that
/// a burst of large chunks does not keep its memory for the link's life.
const PIPE_KEPT: usize = 1 << 20;

/// A connection: QUIC, or a link within this process.
#[derive(Clone)]
pub enum Link {
    Quic(quinn::Connection),
    Local(LocalEnd),
}

impl From<quinn::Connection> for Link {
    fn from(conn: quinn::Connection) -> Self {
        Link::Quic(conn)
    }
}

impl Link {
    /// Closes the link with `code` and `reason`; the first close wins.
    pub(crate) fn close_with(&self, code: CloseCode, reason: &[u8]) {
        match self {
            Link::Quic(conn) => conn.close(code.code(), reason),
            Link::Local(end) => end.0.close(code, reason),
        }
    }

    /// How the link ended, as an error, if it has; `peer` names the other
    /// side in errors about reaching it.
    pub fn close_error(&self, peer: &str) -> Option<SessionError> {
        match self {
            Link::Quic(conn) => conn.close_reason().map(|e| SessionError::from_connection(peer, &e)),
            Link::Local(end) => end.0.close_error(),
        }
    }

    /// Whether the link was closed, by either side.
    pub fn is_closed(&self) -> bool {
        match self {
            Link::Quic(conn) => conn.close_reason().is_some(),
            Link::Local(end) => end.0.link.lock_closed().is_some(),
        }
    }

    /// The other side, for logs: its address, or "this process".
    pub fn peer(&self) -> String {
        match self {
            Link::Quic(conn) => conn.remote_address().to_string(),
            Link::Local(_) => "this process".into(),
        }
    }

    /// The DER of the certificate the other side presented, if it
    /// presented one: verified in the TLS handshake, or vouched for by this
    /// process on a local link.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Link::Quic(conn) => crate::peer_certificate(conn),
            Link::Local(end) if end.0.side == ACCEPTOR => end.0.link.certificate.clone(),
            Link::Local(_) => None,
        }
    }

    /// Lets the peer send up to `bytes` unread on a QUIC connection; a
    /// local link is bounded by its pipes.
    pub fn set_receive_window(&self, bytes: u32) {
        if let Link::Quic(conn) = self {
            conn.set_receive_window(quinn::VarInt::from_u32(bytes));
        }
    }

    /// The link's one stream: opened by the dialler (`dialler`), accepted
    /// by the coordinator; `peer` names the other side in errors.
    pub(crate) async fn stream(&self, peer: &str, dialler: bool) -> Result<(LinkSend, LinkRecv), SessionError> {
        match self {
            Link::Quic(conn) => {
                let opened = if dialler {
                    conn.open_bi().await
                } else {
                    conn.accept_bi().await
                };
                let (send, recv) = opened.map_err(|e| SessionError::from_connection(peer, &e))?;
                Ok((LinkSend::Quic(send), LinkRecv::Quic(recv)))
            }
            Link::Local(end) => end.0.take_stream(),
        }
    }
}

/// The sending half of a link's stream.
pub enum LinkSend {
    Quic(quinn::SendStream),
    Local(PipeWriter),
}

impl LinkSend {
    /// Ends the stream: the peer reads to the end of what was sent.
    pub(crate) fn finish(&mut self) {
        match self {
            LinkSend::Quic(send) => {
                let _ = send.finish();
            }
            LinkSend::Local(writer) => writer.pipe.lock().finish(),
        }
    }

    /// Waits until the peer has everything sent (QUIC: acknowledged or
    /// stopped; a local pipe hands its bytes over as they are written).
    pub(crate) async fn stopped(&mut self) {
        if let LinkSend::Quic(send) = self {
            let _ = send.stopped().await;
        }
    }
}

impl AsyncWrite for LinkSend {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkSend::Quic(send) => AsyncWrite::poll_write(Pin::new(send), cx, data),
            LinkSend::Local(writer) => writer.poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkSend::Quic(send) => Pin::new(send).poll_flush(cx),
            LinkSend::Local(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkSend::Quic(send) => Pin::new(send).poll_shutdown(cx),
            LinkSend::Local(writer) => {
                writer.pipe.lock().finish();
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// The receiving half of a link's stream.
pub enum LinkRecv {
    Quic(quinn::RecvStream),
    Local(PipeReader),
}

impl AsyncRead for LinkRecv {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkRecv::Quic(recv) => Pin::new(recv).poll_read(cx, buf),
            LinkRecv::Local(reader) => reader.poll_read(cx, buf),
        }
    }
}

/// The dialler's side of a local link.
const DIALLER: usize = 0;
/// The coordinator's side.
const ACCEPTOR: usize = 1;

/// One side of a local link. Cloning shares it; once every clone is
/// dropped, the link is closed (as a QUIC connection is once all its
/// handles are), so that a side dropped unaccepted does not leave the other
/// waiting.
#[derive(Clone)]
pub struct LocalEnd(Arc<End>);

struct End {
    link: Arc<LocalLink>,
    side: usize,
}

impl Drop for End {
    fn drop(&mut self) {
        self.close(CloseCode::Done, b"");
    }
}

/// How a local link ended.
#[derive(Clone, Copy)]
enum Ending {
    Closed(CloseCode),
    /// The certificate the dialler presented does not verify, as a TLS
    /// handshake would have failed.
    Tls,
}

type Closed = Option<(usize, Ending, String)>;

struct LocalLink {
    /// Who ended the link, how, and why.
    closed: Mutex<Closed>,
    /// `pipes[s]` carries what side `s` sends.
    pipes: [Arc<Pipe>; 2],
    /// Whether each side has taken its half of the stream.
    taken: Mutex<[bool; 2]>,
    /// The certificate the dialler presents.
    certificate: Option<Vec<u8>>,
}

impl LocalLink {
    fn lock_closed(&self) -> MutexGuard<'_, Closed> {
        self.closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl End {
    fn close(&self, code: CloseCode, reason: &[u8]) {
        self.end(Ending::Closed(code), reason)
    }

    fn end(&self, ending: Ending, reason: &[u8]) {
        {
            let mut closed = self.link.lock_closed();
            if closed.is_some() {
                return;
            }
            *closed = Some((self.side, ending, String::from_utf8_lossy(reason).into_owned()));
        }
        for pipe in &self.link.pipes {
            pipe.lock().close();
        }
    }

    fn close_error(&self) -> Option<SessionError> {
        let closed = self.link.lock_closed();
        let (side, ending, reason) = closed.as_ref()?;
        Some(match ending {
            _ if *side == self.side => SessionError::Lost("closed by this side".into()),
            Ending::Closed(code) => SessionError::from_close(Some(*code), reason.clone()),
            Ending::Tls => SessionError::Tls(reason.clone()),
        })
    }

    fn take_stream(&self) -> Result<(LinkSend, LinkRecv), SessionError> {
        if let Some(error) = self.close_error() {
            return Err(error);
        }
        let mut taken = self.link.taken.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if std::mem::replace(&mut taken[self.side], true) {
            return Err(SessionError::Protocol("a local link carries one stream".into()));
        }
        Ok((
            LinkSend::Local(PipeWriter {
                pipe: self.link.pipes[self.side].clone(),
            }),
            LinkRecv::Local(PipeReader {
                pipe: self.link.pipes[1 - self.side].clone(),
            }),
        ))
    }
}

/// A new local link: the dialler's end, presenting `certificate`, and the
/// coordinator's.
fn local_link(certificate: Option<Vec<u8>>) -> (Link, Link) {
    let link = Arc::new(LocalLink {
        closed: Mutex::new(None),
        pipes: [Arc::new(Pipe::default()), Arc::new(Pipe::default())],
        taken: Mutex::new([false; 2]),
        certificate,
    });
    let end = |side| {
        Link::Local(LocalEnd(Arc::new(End {
            link: link.clone(),
            side,
        })))
    };
    (end(DIALLER), end(ACCEPTOR))
}

/// Where a coordinator takes local links from; see [`local_listener`].
pub struct LocalListener {
    rx: mpsc::UnboundedReceiver<Link>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl LocalListener {
    /// The next link dialled whose certificate, if it presents one,
    /// verifies; `None` once every dialler is gone. A link whose certificate
    /// does not is ended for its dialler as a failed TLS handshake.
    pub async fn accept(&mut self) -> Option<Link> {
        loop {
            let link = self.rx.recv().await?;
            match self.refusal(&link) {
                None => return Some(link),
                Some(reason) => {
                    if let Link::Local(end) = &link {
                        end.0.end(Ending::Tls, reason.as_bytes());
                    }
                }
            }
        }
    }

    /// Why `link`'s certificate does not verify, if it does not.
    fn refusal(&self, link: &Link) -> Option<String> {
        let der = link.peer_certificate()?;
        let Some(verifier) = &self.verifier else {
            return Some("this coordinator accepts no node certificates".into());
        };
        verifier
            .verify_client_cert(&CertificateDer::from(der), &[], UnixTime::now())
            .err()
            .map(|e| format!("invalid peer certificate: {e}"))
    }
}

/// Opens local links to one coordinator. Cloning shares it.
#[derive(Clone)]
pub struct LocalDialer {
    tx: mpsc::UnboundedSender<Link>,
}

impl std::fmt::Debug for LocalDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalDialer")
    }
}

impl LocalDialer {
    /// A new link to the coordinator, on which the dialler presents
    /// `certificate` (DER); `None` if the coordinator has stopped listening.
    pub fn dial(&self, certificate: Option<Vec<u8>>) -> Option<Link> {
        let (ours, theirs) = local_link(certificate);
        self.tx.send(theirs).ok()?;
        Some(ours)
    }
}

/// A coordinator's door for peers in its own process: the [`LocalDialer`]
/// is handed to them, the [`LocalListener`] kept by the coordinator. With
/// `client_ca_pem`, a certificate presented must be signed by that CA and
/// within its validity, as [`crate::server_endpoint_verifying`] has TLS
/// check it; without, none is accepted.
pub fn local_listener(client_ca_pem: Option<&[u8]>) -> Result<(LocalDialer, LocalListener), NetError> {
    let verifier = client_ca_pem.map(crate::client_verifier).transpose()?;
    let (tx, rx) = mpsc::unbounded_channel();
    Ok((LocalDialer { tx }, LocalListener { rx, verifier }))
}

/// One direction of a local link's stream: bytes written and not yet read,
/// at most [`PIPE_CAPACITY`] of them.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct PipeState {
    buf: Vec<u8>,
    /// Where the unread bytes in `buf` begin.
    read: usize,
    /// The writer is done: the reader sees the end once it has read all.
    finished: bool,
    /// The reader is gone: writes fail.
    stopped: bool,
    /// The link was closed: writes fail, and reads once all is read.
    closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl PipeState {
    fn unread(&self) -> usize {
        self.buf.len() - self.read
    }

    fn wake_reader(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.wake_reader();
    }

    fn close(&mut self) {
        self.closed = true;
        self.wake_reader();
        self.wake_writer();
    }
}

/// The writing end of a [`Pipe`].
pub struct PipeWriter {
    pipe: Arc<Pipe>,
}

impl PipeWriter {
    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut s = self.pipe.lock();
        if s.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the link was closed",
            )));
        }
        if s.stopped {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the peer stopped reading",
            )));
        }
        let free = PIPE_CAPACITY - s.unread();
        if free == 0 {
            s.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if s.read > 0 && s.read >= s.buf.len() / 2 {
            let read = s.read;
            s.buf.drain(..read);
            s.read = 0;
        }
        let n = free.min(data.len());
        s.buf.extend_from_slice(&data[..n]);
        s.wake_reader();
        Poll::Ready(Ok(n))
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.pipe.lock().finish();
    }
}

/// The reading end of a [`Pipe`].
pub struct PipeReader {
    pipe: Arc<Pipe>,
}

impl PipeReader {
    fn poll_read(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = self.pipe.lock();
        let n = s.unread().min(out.remaining());
        if n > 0 {
            let read = s.read;
            out.put_slice(&s.buf[read..read + n]);
            s.read += n;
            if s.read == s.buf.len() {
                if s.buf.capacity() > PIPE_KEPT {
                    s.buf = Vec::new();
                } else {
                    s.buf.clear();
                }
                s.read = 0;
            }
            s.wake_writer();
            return Poll::Ready(Ok(()));
        }
        // A stream finished before the link closed reads to its end, as
        // QUIC's does when the peer's finish came before its close.
        if s.finished || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if s.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the link was closed",
            )));
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        let mut s = self.pipe.lock();
        s.stopped = true;
        s.buf = Vec::new();
        s.read = 0;
        s.wake_writer();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pair() -> (Link, Link) {
        let (dialer, mut listener) = local_listener(None).unwrap();
        let ours = dialer.dial(Some(b"cert".to_vec())).unwrap();
        let theirs = listener.rx.try_recv().unwrap();
        (ours, theirs)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_the_writer_waits_at_capacity() {
        let (a, b) = pair();
        let (mut a_send, mut a_recv) = a.stream("b", true).await.unwrap();
        let (mut b_send, mut b_recv) = b.stream("a", false).await.unwrap();
        // More than the pipe holds: the writer must wait for the reader.
        let big: Vec<u8> = (0..PIPE_CAPACITY + 12345).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            a_send.write_all(&big).await.unwrap();
            a_send.shutdown().await.unwrap();
        });
        tokio::task::yield_now().await;
        assert!(!writer.is_finished(), "the writer went past the pipe's capacity");
        let mut got = Vec::new();
        b_recv.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "the bytes arrived changed");
        writer.await.unwrap();
        b_send.write_all(b"back").await.unwrap();
        drop(b_send);
        let mut back = Vec::new();
        a_recv.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"back");
        // Only the coordinator's side sees the dialler's certificate.
        assert_eq!(b.peer_certificate(), Some(b"cert".to_vec()));
        assert_eq!(a.peer_certificate(), None);
    }

    #[tokio::test]
    async fn a_close_reaches_the_peer_with_its_code_after_what_was_sent() {
        let (a, b) = pair();
        let (mut a_send, _a_recv) = a.stream("b", true).await.unwrap();
        let (mut b_send, mut b_recv) = b.stream("a", false).await.unwrap();
        a_send.write_all(b"last words").await.unwrap();
        CloseCode::Refused.close(&a, "no entry");
        // A second close does not replace the first.
        CloseCode::Done.close(&b, "");
        let mut got = [0u8; 10];
        b_recv.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"last words");
        let e = b_recv.read_u8().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(b_send.write_all(b"x").await.is_err());
        assert!(matches!(b.close_error("a"), Some(SessionError::Refused(r)) if r == "no entry"));
        assert!(matches!(a.close_error("b"), Some(SessionError::Lost(r)) if r == "closed by this side"));
        assert!(a.is_closed() && b.is_closed());
    }

    #[tokio::test]
    async fn a_stream_finished_before_the_close_reads_to_its_end_and_its_buffer_is_freed() {
        let (a, b) = pair();
        let (mut a_send, _a_recv) = a.stream("b", true).await.unwrap();
        let (_b_send, mut b_recv) = b.stream("a", false).await.unwrap();
        let big = vec![7u8; 4 * PIPE_KEPT];
        a_send.write_all(&big).await.unwrap();
        a_send.shutdown().await.unwrap();
        CloseCode::Done.close(&a, "done");
        let mut got = Vec::new();
        b_recv.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        let LinkRecv::Local(reader) = &b_recv else {
            unreachable!()
        };
        assert_eq!(
            reader.pipe.lock().buf.capacity(),
            0,
            "a pipe read empty keeps its megabytes"
        );
    }

    #[tokio::test]
    async fn a_reader_gone_fails_the_writer_and_a_stream_is_taken_once() {
        let (a, b) = pair();
        let (mut a_send, _a_recv) = a.stream("b", true).await.unwrap();
        assert!(matches!(a.stream("b", true).await, Err(SessionError::Protocol(_))));
        let (_b_send, b_recv) = b.stream("a", false).await.unwrap();
        drop(b_recv);
        let e = a_send.write_all(b"anyone?").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn a_side_dropped_unaccepted_closes_the_link() {
        let (dialer, listener) = local_listener(None).unwrap();
        let ours = dialer.dial(None).unwrap();
        let (mut send, mut recv) = ours.stream("coordinator", true).await.unwrap();
        // The coordinator stops with the link still queued.
        drop(listener);
        assert!(matches!(ours.close_error("coordinator"), Some(SessionError::Lost(_))));
        assert!(send.write_all(b"Hello").await.is_err());
        assert_eq!(
            recv.read_u8().await.unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
    }

    #[tokio::test]
    async fn a_dialer_whose_coordinator_stopped_gets_nothing() {
        let (dialer, listener) = local_listener(None).unwrap();
        drop(listener);
        assert!(dialer.dial(None).is_none());
    }
}
