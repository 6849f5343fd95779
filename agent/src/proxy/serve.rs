//! The HTTP side of a client connection: hyper (HTTP/1.1 and HTTP/2) serving it,
//! every request going through the [`crate::pipeline::Pipeline`], bounded by the
//! connection's timeouts, the drain and revocation.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.request.min(Duration::from_secs(30)))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let ctx_idle = Arc::clone(&ctx);
    // Boxed: hyper keeps room for one service future in every connection, idle or
    // not, and the pipeline's future is large; boxed, an idle connection holds a
    // pointer and a request allocates it only while it runs.
    let service =
        service_fn(move |req| Box::pin(Arc::clone(&pipeline).handle(Arc::clone(&ctx), req)));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);

    let lifetime = tokio::time::sleep(timeouts.max_connection_lifetime);
    let ended_by = tokio::select! {
        r = conn.as_mut() => return match r {
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
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
    (ended_by, None)
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
