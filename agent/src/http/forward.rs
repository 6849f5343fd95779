//! Forwarding to the real upstream: pooled keep-alive connections (HTTP/1.1 or
//! HTTP/2 as the upstream negotiates), on the agent's own sockets (the redirect
//! lets them pass), TLS always verified.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderMap, HeaderName, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lru::LruCache;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::body::PhiBody;
use crate::sockets::SocketFactory;
use crate::tls::{UpstreamTls, UpstreamTlsError, UpstreamTlsStream};

/// Where and how to reach one upstream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub addr: SocketAddr,
    /// `Some` for TLS upstreams: the name the certificate must be valid for.
    pub server_name: Option<ServerName<'static>>,
    /// Index of the destination (its `upstream_ca` decides the trust roots).
    pub dest_index: usize,
}

/// Facts about the upstream connection a response came over; the connector attaches
/// them and hyper hands them back in the response's extensions.
#[derive(Clone, Debug, Default)]
pub struct UpstreamInfo {
    pub tls_version: Option<String>,
    pub cert_subject: Option<String>,
}

/// Why the upstream could not be reached, in words fit for a 502 body.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream {addr} unreachable: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream TLS: {0}")]
    Tls(#[from] UpstreamTlsError),
    #[error("TLS handshake with upstream {0} timed out")]
    TlsTimeout(SocketAddr),
}

#[derive(Clone)]
pub struct Connector {
    key: Arc<UpstreamKey>,
    tls: Option<Arc<UpstreamTls>>,
    sockets: SocketFactory,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        // The URI only names the pool; the address is the original destination.
        let this = self.clone();
        Box::pin(async move {
            let addr = this.key.addr;
            let tcp = this
                .sockets
                .connect(addr, this.connect_timeout)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            match (&this.tls, &this.key.server_name) {
                (Some(tls), Some(name)) => {
                    let s = tokio::time::timeout(
                        this.handshake_timeout,
                        tls.connect(tcp, name.clone()),
                    )
                    .await
                    .map_err(|_| ConnectError::TlsTimeout(addr))??;
                    Ok(UpstreamIo::Tls(TokioIo::new(Box::new(s))))
                }
                _ => Ok(UpstreamIo::Plain(TokioIo::new(tcp))),
            }
        })
    }
}

pub enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    Tls(TokioIo<Box<UpstreamTlsStream>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Plain(_) => Connected::new().extra(UpstreamInfo::default()),
            UpstreamIo::Tls(s) => {
                let s = s.inner();
                let c = Connected::new();
                let c = if s.alpn() == Some(b"h2".as_slice()) {
                    c.negotiated_h2()
                } else {
                    c
                };
                c.extra(UpstreamInfo {
                    tls_version: s.tls_version().map(str::to_owned),
                    cert_subject: s.peer_subject().map(str::to_owned),
                })
            }
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type PooledClient = Client<Connector, PhiBody>;

/// Keep-alive pools, one per upstream key, bounded.
pub struct Forwarder {
    pools: Mutex<LruCache<UpstreamKey, PooledClient>>,
    /// Trust configuration per destination index (system roots + its `upstream_ca`).
    tls: Vec<Arc<UpstreamTls>>,
    sockets: SocketFactory,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Forwarder {
    pub fn new(
        tls: Vec<Arc<UpstreamTls>>,
        sockets: SocketFactory,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Forwarder {
            metrics,
            pools: Mutex::new(LruCache::new(NonZeroUsize::new(1024).expect("non-zero"))),
            tls,
            sockets,
            connect_timeout,
            handshake_timeout,
        }
    }

    fn client(&self, key: &UpstreamKey) -> PooledClient {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = pools.get(key) {
            return c.clone();
        }
        let connector = Connector {
            key: Arc::new(key.clone()),
            tls: key
                .server_name
                .as_ref()
                .and_then(|_| self.tls.get(key.dest_index).cloned()),
            sockets: self.sockets.clone(),
            connect_timeout: self.connect_timeout,
            handshake_timeout: self.handshake_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // h2 counts every stream it resets itself (a response dropped before its
            // end, a client that went away) over the connection's whole life and
            // kills the connection at 1,024 (GOAWAY ENHANCE_YOUR_CALM), failing
            // every request on it: under the load test that was every ~10 s. The
            // limit guards against a hostile peer; an upstream is a configured
            // destination whose certificate phigate verifies.
            .http2_max_local_error_reset_streams(None)
            .build(connector);
        pools.put(key.clone(), client.clone());
        client
    }

    /// Sends `req` (already stripped of hop-by-hop headers) to the upstream of `key`.
    pub async fn send(
        &self,
        key: &UpstreamKey,
        mut req: Request<PhiBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        // The pool decides h1 or h2 per connection; hyper rejects an HTTP/2-tagged
        // request on an HTTP/1 connection, so requests are tagged 1.1 here.
        *req.version_mut() = Version::HTTP_11;
        // The URI carries the authority: hyper writes it as Host on HTTP/1.1 and as
        // :authority on HTTP/2, where a Host header beside it is a duplicate that
        // nginx refuses with 400.
        req.headers_mut().remove(header::HOST);
        let head = |req: &Request<PhiBody>| {
            let mut again = Request::new(super::body::empty());
            *again.method_mut() = req.method().clone();
            *again.uri_mut() = req.uri().clone();
            *again.version_mut() = req.version();
            *again.headers_mut() = req.headers().clone();
            again
        };
        let client = self.client(key);
        let mut next = replayable(&req).then(|| head(&req));
        let mut result = client.request(req).await;
        // An HTTP/2 upstream ended the shared connection (GOAWAY: a graceful one
        // after its request quota, as nginx does every 1,000 requests, or an error)
        // under requests already sent on it. A bodiless GET, HEAD or OPTIONS may be
        // sent again (RFC 9110 9.2.2); the pool has dropped that connection, so the
        // retry goes out on another. A few times at most.
        for _ in 0..MAX_REPLAYS {
            match (&result, next.take()) {
                (Err(e), Some(again)) if went_away(e) => {
                    tracing::debug!(error = %super::error_chain(e), "upstream connection went away: sending again");
                    self.metrics.upstream_retries.inc();
                    next = Some(head(&again));
                    result = client.request(again).await;
                }
                _ => break,
            }
        }
        result
    }
}

/// Times a request is sent again after its upstream connection went away.
const MAX_REPLAYS: usize = 3;

/// An idempotent request without a body: safe to send again.
fn replayable(req: &Request<PhiBody>) -> bool {
    use http::Method;
    use http_body::Body as _;
    matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && req.body().is_end_stream()
}

/// The upstream's connection ended under the request (a GOAWAY or a refused
/// stream, or the connection reset or closed as a server tears it down after its
/// GOAWAY), as opposed to the upstream answering or the request failing on its own.
fn went_away(e: &hyper_util::client::legacy::Error) -> bool {
    if let Some(h2) = super::body::find_in_chain::<h2::Error>(e) {
        if h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
            return true;
        }
    }
    super::body::find_in_chain::<io::Error>(e).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        )
    })
}

/// Builds the absolute URI the pool needs from the client's request target.
pub fn upstream_uri(tls: bool, authority: &str, path_and_query: &str) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(path_and_query)
        .build()
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those the Connection
/// header names. `keep_upgrade` keeps `Connection: upgrade` + `Upgrade` for WebSocket.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        headers.remove(n);
    }
    // TE: only "trailers" may pass (and is needed for gRPC-style trailers).
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn upgrade_headers_kept_for_websocket() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn uri_for_the_pool() {
        let u = upstream_uri(
            true,
            "patients.example.test:9443",
            "/Patient/1?_format=json",
        )
        .unwrap();
        assert_eq!(
            u.to_string(),
            "https://patients.example.test:9443/Patient/1?_format=json"
        );
    }
}
