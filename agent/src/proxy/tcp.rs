//! Byte relay for `protocol = "tcp"` destinations and for TLS passthrough hosts:
//! bounded by the idle timeout, the maximum connection lifetime and the drain.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::io::Meter;
use crate::record::Outcome;
use crate::settings::Config;
use crate::sockets::SocketFactory;

/// Relays `client` to `upstream_addr`. `prefix`: bytes already read from the client
/// (a sniffed ClientHello) that go upstream first. Byte counts are in the client's
/// [`Meter`].
pub async fn relay<C>(
    mut client: C,
    meter: &Meter,
    prefix: &[u8],
    upstream_addr: SocketAddr,
    config: &Config,
    sockets: &SocketFactory,
    force_close: &CancellationToken,
) -> (Outcome, Option<String>)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let t = &config.timeouts;
    let mut upstream = match sockets.connect(upstream_addr, t.connect).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            return (Outcome::UpstreamTimeout, Some(e.to_string()))
        }
        Err(e) => {
            return (
                Outcome::UpstreamUnreachable,
                Some(format!("connect to {upstream_addr}: {e}")),
            )
        }
    };
    if !prefix.is_empty() {
        if let Err(e) = upstream.write_all(prefix).await {
            return (
                Outcome::Error,
                Some(format!("writing to {upstream_addr}: {e}")),
            );
        }
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
            Ok(_) => (Outcome::Closed, None),
            Err(e) => (Outcome::Error, Some(e.to_string())),
        },
        _ = tokio::time::sleep(t.max_connection_lifetime) => (Outcome::LifetimeExceeded, None),
        _ = meter.idle_for(t.idle) => (Outcome::IdleTimeout, None),
        _ = force_close.cancelled() => (Outcome::Drained, None),
    }
}
