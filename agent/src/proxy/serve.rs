//! The HTTP side of a client connection: hyper (HTTP/1.1 and HTTP/2) serving it,
//! every request going through the [`crate::pipeline::Pipeline`], bounded by the
//! connection's timeouts, the drain and revocation.

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::{Limits, Timeouts};
use crate::http::body;
use crate::io::Meter;
use crate::pipeline::{ConnContext, Pipeline};
use crate::record::Outcome;

/// Serves HTTP on an established client stream until it closes or a bound ends it.
/// Returns the connection's outcome.
pub async fn serve<IO>(
    io: IO,
    ctx: Arc<ConnContext>,
    pipeline: Arc<Pipeline>,
    meter: &Meter,
    timeouts: &Timeouts,
    limits: &Limits,
    force_close: &CancellationToken,
) -> (Outcome, Option<String>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx_idle = Arc::clone(&ctx);
    let version = HttpVersion::of(&ctx);
    // Boxed: hyper keeps room for one service future in every connection, idle or
    // not, and the pipeline's future is large; boxed, an idle connection holds a
    // pointer and a request allocates it only while it runs.
    let service =
        service_fn(move |req| Box::pin(Arc::clone(&pipeline).handle(Arc::clone(&ctx), req)));
    let mut conn = Connection::new(version, TokioIo::new(io), service, timeouts, limits);

    let lifetime = tokio::time::sleep(timeouts.max_connection_lifetime);
    let ended_by = tokio::select! {
        r = &mut conn => return match r {
            Ok(()) => (Outcome::Closed, None),
            Err(e) => classify(&*e),
        },
        _ = lifetime => Outcome::LifetimeExceeded,
        _ = idle(meter, &ctx_idle, timeouts.idle) => Outcome::IdleTimeout,
        _ = force_close.cancelled() => Outcome::Drained,
        // Revocation takes effect at once: no grace for in-flight streams, whose
        // accesses may be the ones revoked. Dropping the connection ends them.
        _ = ctx_idle.grants.revoked().cancelled() => {
            return (Outcome::Revoked, ctx_idle.grants.reason().map(ToString::to_string))
        }
    };
    // Finish in-flight requests (HTTP/2 GOAWAY; HTTP/1 closes after the current
    // response), bounded.
    conn.graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut conn).await;
    (ended_by, None)
}

/// The client's HTTP version, as far as it is known before the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HttpVersion {
    Http1,
    Http2,
    /// Plaintext: a client may speak HTTP/2 with prior knowledge; read its first
    /// bytes to tell.
    Detect,
}

impl HttpVersion {
    /// Over TLS, ALPN decides (RFC 9113 3.2: HTTP/2 over TLS is negotiated, never
    /// assumed), so the connection is served without reading ahead. Reading ahead
    /// costs an idle connection twice hyper's read buffer (docs/benchmarks.md).
    fn of(ctx: &ConnContext) -> HttpVersion {
        match &ctx.tls {
            Some(tls) if tls.alpn.as_deref() == Some("h2") => HttpVersion::Http2,
            Some(_) => HttpVersion::Http1,
            None => HttpVersion::Detect,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What hyper calls for each request of a client connection (the pipeline), with
/// the bounds every hyper connection type asks of it, named once.
trait ClientService:
    Service<
        Request<Incoming>,
        Response = Response<body::PhiBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Send
    + 'static
{
}

impl<S> ClientService for S where
    S: Service<
            Request<Incoming>,
            Response = Response<body::PhiBody>,
            Future: Send + 'static,
            Error: Into<BoxError>,
        > + Send
        + 'static
{
}

/// One client connection in hyper, by version, boxed (it lives as long as the
/// connection, beside the state the select below keeps).
enum Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService,
{
    Http1(Pin<Box<http1::UpgradeableConnection<TokioIo<IO>, S>>>),
    Http2(Pin<Box<http2::Connection<TokioIo<IO>, S, TokioExecutor>>>),
    Detect(Pin<Box<auto::UpgradeableConnection<'static, TokioIo<IO>, S, TokioExecutor>>>),
}

impl<IO, S> Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService,
{
    fn new(
        version: HttpVersion,
        io: TokioIo<IO>,
        service: S,
        timeouts: &Timeouts,
        limits: &Limits,
    ) -> Self {
        let header_read_timeout = timeouts.request.min(Duration::from_secs(30));
        let max_buf_size = limits.max_header_bytes.max(8192);
        let max_header_list_size = limits.max_header_bytes as u32;
        let h2_keep_alive = Some(Duration::from_secs(30));
        match version {
            HttpVersion::Http1 => {
                let mut h1 = http1::Builder::new();
                h1.timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(max_buf_size)
                    .keep_alive(true);
                Connection::Http1(Box::pin(h1.serve_connection(io, service).with_upgrades()))
            }
            HttpVersion::Http2 => {
                let mut h2 = http2::Builder::new(TokioExecutor::new());
                h2.timer(TokioTimer::new())
                    .max_header_list_size(max_header_list_size)
                    .keep_alive_interval(h2_keep_alive);
                Connection::Http2(Box::pin(h2.serve_connection(io, service)))
            }
            HttpVersion::Detect => {
                let mut auto = auto::Builder::new(TokioExecutor::new());
                auto.http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(max_buf_size)
                    .keep_alive(true);
                auto.http2()
                    .timer(TokioTimer::new())
                    .max_header_list_size(max_header_list_size)
                    .keep_alive_interval(h2_keep_alive);
                Connection::Detect(Box::pin(
                    auto.serve_connection_with_upgrades(io, service)
                        .into_owned(),
                ))
            }
        }
    }

    /// Finish in-flight requests and close: a GOAWAY on HTTP/2, `Connection:
    /// close` after the current response on HTTP/1.
    fn graceful_shutdown(&mut self) {
        match self {
            Connection::Http1(c) => c.as_mut().graceful_shutdown(),
            Connection::Http2(c) => c.as_mut().graceful_shutdown(),
            Connection::Detect(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

impl<IO, S> Future for Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ClientService,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Connection::Http1(c) => c.as_mut().poll(cx).map_err(Into::into),
            Connection::Http2(c) => c.as_mut().poll(cx).map_err(Into::into),
            Connection::Detect(c) => c.as_mut().poll(cx),
        }
    }
}

/// Idle: no bytes either way for `limit` while no request is in flight (a request
/// held for approval or waiting on a slow upstream keeps the connection).
async fn idle(meter: &Meter, ctx: &ConnContext, limit: Duration) {
    loop {
        meter.idle_for(limit).await;
        if ctx.in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
    }
}

/// Hyper's error, as a connection outcome: bytes that were not HTTP are told apart
/// from a peer that just went away.
fn classify(e: &(dyn std::error::Error + 'static)) -> (Outcome, Option<String>) {
    if let Some(h) = body::find_in_chain::<hyper::Error>(e) {
        if h.is_parse() || h.is_parse_too_large() || h.is_parse_status() {
            return (Outcome::NotHttp, Some(h.to_string()));
        }
        if h.is_incomplete_message() || h.is_canceled() {
            return (Outcome::Closed, Some(h.to_string()));
        }
        if h.is_timeout() {
            return (Outcome::IdleTimeout, Some(h.to_string()));
        }
    }
    // Clients often hang up without a TLS close_notify, or reset, once done: the
    // connection ended, it did not fail.
    if let Some(io) = body::find_in_chain::<std::io::Error>(e) {
        use std::io::ErrorKind::*;
        match io.kind() {
            UnexpectedEof => return (Outcome::Closed, None),
            ConnectionReset | ConnectionAborted | BrokenPipe => {
                return (Outcome::Closed, Some(format!("client {io}")))
            }
            _ => {}
        }
    }
    let text = e.to_string();
    if text.contains("invalid HTTP/2 preface") || text.contains("connection error: PROTOCOL_ERROR")
    {
        return (Outcome::NotHttp, Some(text));
    }
    (Outcome::Error, Some(text))
}
