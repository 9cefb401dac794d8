//! A small HTTP/1.1 server for what operators read over HTTP: Prometheus
//! metrics and the coordinator's dashboard. It is opt-in (a daemon serves it
//! only on the address it is given) and bounded like every other door:
//! at most [`MAX_CONNECTIONS`] connections at once (more are closed at
//! once), request heads of at most [`MAX_HEAD`] bytes read within
//! [`HEAD_TIMEOUT`], bodies of at most [`MAX_BODY`] bytes, and no connection
//! kept past [`MAX_CONNECTION_TIME`]. What a request means is the
//! handler's to decide; this module only moves bytes.

use std::{convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
    HeaderMap, Method, Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
/// The largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a client may take to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open (a dashboard reconnects).
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(120);

/// A request, read whole.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpRequest {
    /// A header's value as text, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text answer, such as an error saying what to do.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", text.into())
    }
}

/// Answers requests; called once per request, on the runtime.
pub type Handler = Arc<dyn Fn(HttpRequest) -> Pin<Box<dyn Future<Output = HttpResponse> + Send>> + Send + Sync>;

/// Serves `handler` on `addr` until the returned task is aborted; the
/// address it listens on (with the port the system chose for port 0).
pub async fn serve_http(addr: SocketAddr, handler: Handler) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue; // Dropping the stream closes it.
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(respond(request, &handler).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(MAX_CONNECTION_TIME, connection).await;
                drop(permit);
            });
        }
    });
    Ok((local, task))
}

async fn respond(request: Request<Incoming>, handler: &Handler) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let answer = match Limited::new(body, MAX_BODY).collect().await {
        Ok(body) => {
            handler(HttpRequest {
                method: parts.method,
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body: body.to_bytes(),
            })
            .await
        }
        Err(_) => HttpResponse::text(413, format!("request bodies are limited to {MAX_BODY} bytes")),
    };
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        hyper::StatusCode::from_u16(answer.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(answer.content_type),
    );
    // Nothing served here is to be cached, sniffed or framed elsewhere.
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    headers.insert("x-frame-options", hyper::header::HeaderValue::from_static("DENY"));
    // Pages run only their own files' scripts and talk only to this address.
    headers.insert(
        "content-security-policy",
        hyper::header::HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn requests_reach_the_handler_and_oversized_ones_do_not() {
        let handler: Handler = Arc::new(|request: HttpRequest| {
            Box::pin(async move {
                HttpResponse::text(
                    200,
                    format!("{} {} {}", request.method, request.path, request.body.len()),
                )
            })
        });
        let (addr, task) = serve_http("127.0.0.1:0".parse().unwrap(), handler).await.unwrap();
        let answer = exchange(
            addr,
            b"POST /x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("POST /x 3"), "{answer}");
        assert!(answer.contains("cache-control: no-store"), "{answer}");
        let big = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            MAX_BODY + 1,
            "a".repeat(MAX_BODY + 1)
        );
        assert!(exchange(addr, big.as_bytes()).await.starts_with("HTTP/1.1 413"));
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD * 2));
        let answer = exchange(addr, head.as_bytes()).await;
        assert!(!answer.contains(" 200 "), "an oversized head was served: {answer}");
        task.abort();
    }
}
