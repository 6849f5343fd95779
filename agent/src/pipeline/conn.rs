//! What the requests of one connection share: who connected, to where, over what
//! TLS, its counters and its grants (which a new policy set can revoke), and the
//! bounds an upgraded tunnel keeps. Made by the proxy per connection; read by every
//! request's pipeline.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Protocol;
use crate::identity::Workload;

/// TLS as negotiated with the client.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub sni: Option<String>,
    pub version: Option<String>,
    pub alpn: Option<String>,
}

/// What every request on one connection shares.
pub struct ConnContext {
    pub connection_id: String,
    pub destination: String,
    pub dest_index: usize,
    pub protocol: Protocol,
    pub original_dst: SocketAddr,
    pub client_addr: SocketAddr,
    pub workload: Arc<Workload>,
    pub tls: Option<ClientTls>,
    /// The names the destination serves (`hosts`); empty: any.
    pub hosts: Arc<[String]>,
    /// What bounds the connection, for a tunnel that outlives its request.
    pub tunnel_bounds: TunnelBounds,
    /// Requests seen on this connection.
    pub requests: AtomicU64,
    /// Requests not yet recorded: a connection waiting on its upstream is not idle.
    pub in_flight: AtomicU64,
    /// The accesses the policies granted on this connection; a new policy set that
    /// no longer allows one of them closes the connection.
    pub grants: Arc<crate::policy::revoke::Grants>,
}

/// The connection's bounds, kept by an upgraded tunnel as by any connection: its
/// idle timeout, its maximum lifetime, and the agent's drain.
pub struct TunnelBounds {
    pub idle: Duration,
    pub lifetime_end: tokio::time::Instant,
    pub drain: tokio_util::sync::CancellationToken,
}
