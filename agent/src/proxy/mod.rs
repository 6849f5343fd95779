//! The data plane: accept redirected connections, find out where they were going and
//! who sent them, and hand them to the handler for the destination's protocol.
#![forbid(unsafe_code)]

pub mod https;
pub mod live;
pub mod namespaces;
pub mod serve;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Destination, Protocol};
use crate::identity::{IdentityResolver, Workload};
use crate::io::{Meter, Metered};
use crate::pipeline::{ClientTls, ConnContext, Pipeline};
use crate::policy::gate::Gatekeeper;
use crate::record::{new_id, ConnectionRecord, EventRecord, Outcome, Record, RecordSink};
use crate::redirect::{Attested, OrigDstLookup};
use crate::settings::Config;

/// Everything the data plane shares across connections.
pub struct Proxy {
    /// The config in force ([`Proxy::config`]); a reload replaces it.
    config: ArcSwap<Config>,
    pub lookup: Arc<dyn OrigDstLookup>,
    pub identity: IdentityResolver,
    pub records: Arc<dyn RecordSink>,
    /// The HTTP pipeline ([`Proxy::pipeline`]); rebuilt when a reload changes the
    /// destinations.
    pipeline: ArcSwap<Pipeline>,
    /// Leaf certificates for intercepted TLS, minted from the local CA.
    pub minter: Arc<crate::tls::LeafMinter>,
    /// Cancelled when the agent stops accepting (SIGTERM).
    pub stop_accepting: CancellationToken,
    /// Cancelled when the drain bound has elapsed: open connections are closed.
    pub force_close: CancellationToken,
    pub tasks: TaskTracker,
    /// Open HTTP connections, re-checked when the policy set changes.
    pub live: live::LiveConnections,
    /// The agent's own outbound sockets (exempt from the redirect).
    pub sockets: crate::sockets::SocketFactory,
    /// Direct connects to the listener (not redirected), refused and counted.
    pub direct: DirectConnects,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A connection that was accepted and attributed, before protocol handling.
pub struct Inbound {
    pub id: String,
    pub client: TcpStream,
    pub client_addr: SocketAddr,
    pub attested: Attested,
    pub workload: Arc<Workload>,
    pub started: SystemTime,
    pub t0: Instant,
}

/// The attributed facts of an accepted connection, once its stream is handed off.
pub struct Redirected {
    pub original_dst: SocketAddr,
    pub client_addr: SocketAddr,
    pub workload: Arc<Workload>,
}

impl Inbound {
    fn split(self) -> (TcpStream, Redirected) {
        (
            self.client,
            Redirected {
                original_dst: self.attested.original_dst,
                client_addr: self.client_addr,
                workload: self.workload,
            },
        )
    }
}

impl Proxy {
    /// The data plane for `config` and its `pipeline`, accepting until
    /// `stop_accepting` is cancelled, with no connection open yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        pipeline: Pipeline,
        lookup: Arc<dyn OrigDstLookup>,
        identity: IdentityResolver,
        records: Arc<dyn RecordSink>,
        minter: Arc<crate::tls::LeafMinter>,
        sockets: crate::sockets::SocketFactory,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Proxy {
        Proxy {
            config: ArcSwap::from_pointee(config),
            lookup,
            identity,
            records,
            pipeline: ArcSwap::from_pointee(pipeline),
            minter,
            stop_accepting: CancellationToken::new(),
            force_close: CancellationToken::new(),
            tasks: TaskTracker::new(),
            live: Default::default(),
            sockets,
            direct: Default::default(),
            metrics,
        }
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The HTTP pipeline in force: a connection keeps the one it started with.
    pub fn pipeline(&self) -> Arc<Pipeline> {
        self.pipeline.load_full()
    }

    /// The policy set in force, which decides new connections and the requests of
    /// open ones (every pipeline shares it).
    pub fn gate(&self) -> Arc<Gatekeeper> {
        self.pipeline.load().gate.load_full()
    }

    /// Puts a reloaded config and its pipeline in force for the connections accepted
    /// from now on.
    pub fn replace(&self, config: Config, pipeline: Pipeline) {
        self.pipeline.store(Arc::new(pipeline));
        self.config.store(Arc::new(config));
    }

    /// Accepts connections until `stop_accepting` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_until(listener, CancellationToken::new()).await
    }

    /// Accepts connections until `stop_accepting` or `stop` is cancelled (a served
    /// network namespace went away), then closes the listener.
    pub async fn serve_until(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        // Accepted peers are looked up in the listener's network namespace.
        let netns = match crate::sockets::netns_cookie(&listener) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the listener's network namespace; not serving it");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                _ = self.stop_accepting.cancelled() => break,
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let this = Arc::clone(&self);
                    self.tasks
                        .spawn(async move { this.handle(stream, peer, netns).await });
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        debug!(addr = ?listener.local_addr().ok(), "listener closed");
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, netns: u64) {
        // Every stage below is boxed: a task holds its future's largest state for
        // the connection's whole life, and an idle keep-alive connection should
        // hold only what serving it needs (docs/benchmarks.md, memory).
        let Some(inbound) = Box::pin(self.attribute(client, peer, netns)).await else {
            return;
        };
        let config = self.config();
        let Some((dest_index, dest)) = config.destination_for(inbound.attested.original_dst) else {
            // Protected at connect time, removed by a reload before accept.
            let rec = self.base_record(&inbound, None, None);
            self.write(ConnectionRecord {
                outcome: Outcome::Error,
                error: Some("destination is no longer protected (config reloaded)".into()),
                ..rec
            });
            return;
        };
        info!(
            connection = %inbound.id,
            destination = %dest.name,
            original_dst = %inbound.attested.original_dst,
            pid = inbound.workload.pid,
            uid = inbound.workload.uid,
            comm = %inbound.workload.comm,
            "redirected connection"
        );
        let mut rec = self.base_record(&inbound, Some(&dest.name), Some(dest.protocol));
        let meter = Meter::new(inbound.t0);
        let t0 = inbound.t0;
        let (client, conn) = inbound.split();
        let client = Metered::new(client, Arc::clone(&meter));
        let (outcome, error) = match dest.protocol {
            Protocol::Tcp => {
                Box::pin(self.relay_tcp(client, &meter, &conn, dest, &config, &mut rec)).await
            }
            Protocol::Https => {
                Box::pin(https::serve(
                    &self, client, &meter, &conn, dest_index, dest, &config, &mut rec,
                ))
                .await
            }
            Protocol::Http | Protocol::HttpToHttps => {
                Box::pin(self.serve_requests(
                    Box::new(client),
                    None,
                    &meter,
                    &conn,
                    dest_index,
                    dest,
                    &config,
                    &mut rec,
                ))
                .await
            }
        };
        self.write(ConnectionRecord {
            end_time: SystemTime::now(),
            origin: self.records.origin().clone(),
            duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
            bytes_up: meter.up(),
            bytes_down: meter.down(),
            outcome,
            error,
            ..rec
        });
    }

    /// Who sent an accepted connection and where it was going: its attested
    /// original destination and caller, and the workload that is. `None`: refused
    /// (not redirected, or not attested), and already counted or recorded.
    async fn attribute(
        self: &Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        netns: u64,
    ) -> Option<Inbound> {
        let started = SystemTime::now();
        let t0 = Instant::now();
        let peer = normalize(peer);
        let id = new_id();

        let attested = match self.lookup.take(peer, netns) {
            Ok(Some(a)) => a,
            Ok(None) => {
                self.direct_connect(peer);
                return None;
            }
            Err(e) => {
                self.record_refused(&id, peer, started, t0, Outcome::Error, Some(e.to_string()));
                return None;
            }
        };
        let workload = {
            let this = Arc::clone(self);
            let a = attested.clone();
            tokio::task::spawn_blocking(move || this.identity.resolve(&a))
                .await
                .unwrap_or_else(|_| Workload {
                    pid: attested.pid,
                    tid: attested.tid,
                    uid: attested.uid,
                    gid: attested.gid,
                    comm: attested.comm.clone(),
                    cgroup_id: attested.cgroup_id,
                    ..Workload::default()
                })
        };
        let _ = client.set_nodelay(true);
        Some(Inbound {
            id,
            client,
            client_addr: peer,
            attested,
            workload: Arc::new(workload),
            started,
            t0,
        })
    }

    /// Someone connected to the listener directly (any local user can), or a
    /// redirected client closed before we accepted: no original destination, no
    /// attested caller. Refused, counted, and reported in an aggregate event: never
    /// one record each, so nobody can fill the records disk with connects.
    fn direct_connect(&self, peer: SocketAddr) {
        self.metrics.connection("", "not_redirected");
        if let Some(summary) = self.direct.note(peer) {
            let mut ev = EventRecord::new(self.records.origin(), "direct_connects", "refused");
            ev.message = Some(summary);
            let durable = self.records.submit(Record::Event(ev));
            tokio::spawn(async move {
                if let Err(e) = durable.await {
                    tracing::error!(error = %e, "direct_connects event lost");
                }
            });
        }
    }

    /// A `tcp` destination: the passage decided, then the bytes relayed uninspected.
    async fn relay_tcp(
        &self,
        client: Metered<TcpStream>,
        meter: &Meter,
        conn: &Redirected,
        dest: &Destination,
        config: &Config,
        rec: &mut ConnectionRecord,
    ) -> (Outcome, Option<String>) {
        // Fail closed: a connection that cannot be recorded is not relayed. (HTTP
        // destinations answer 503 per request instead, in the pipeline.)
        if !self.records.writable() {
            return (
                Outcome::RecordsUnavailable,
                Some("records cannot be written".into()),
            );
        }
        match self.open_passage(
            rec,
            &conn.workload,
            &dest.name,
            crate::policy::Passage::Tcp,
            None,
        ) {
            Err(refused) => refused,
            Ok(open) => {
                let (outcome, error) = tcp::relay(
                    client,
                    meter,
                    &[],
                    conn.original_dst,
                    config,
                    &self.sockets,
                    open.conn.stop(),
                )
                .await;
                open.conn.outcome(outcome, error)
            }
        }
    }

    /// The HTTP requests of a connection (`tls`: what the client negotiated on an
    /// `https` destination), served through the pipeline; the connection is listed
    /// for policy re-checks while it is open.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn serve_requests<IO>(
        &self,
        client: IO,
        tls: Option<ClientTls>,
        meter: &Meter,
        conn: &Redirected,
        dest_index: u32,
        dest: &Destination,
        config: &Config,
        rec: &mut ConnectionRecord,
    ) -> (Outcome, Option<String>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let bounds = self.tunnel_bounds(meter, config);
        let ctx = Arc::new(self.conn_context(rec, dest_index, dest, conn, tls, bounds));
        let _listed = self.live.list(&ctx);
        let outcome = serve::serve(
            client,
            Arc::clone(&ctx),
            self.pipeline(),
            meter,
            &config.timeouts,
            &config.limits,
            &self.force_close,
        )
        .await;
        rec.requests = ctx.requests.load(Ordering::Relaxed);
        outcome
    }

    /// What the HTTP requests of this connection share.
    pub fn conn_context(
        &self,
        rec: &ConnectionRecord,
        dest_index: u32,
        dest: &Destination,
        conn: &Redirected,
        tls: Option<ClientTls>,
        tunnel_bounds: crate::pipeline::TunnelBounds,
    ) -> ConnContext {
        ConnContext {
            connection_id: rec.connection_id.clone(),
            destination: dest.name.clone(),
            dest_index: dest_index as usize,
            protocol: dest.protocol,
            original_dst: conn.original_dst,
            client_addr: conn.client_addr,
            workload: conn.workload.clone(),
            tls,
            hosts: dest.hosts.clone(),
            tunnel_bounds,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            grants: Arc::default(),
        }
    }

    /// The bounds of a connection that started with `meter`, for a tunnel it
    /// carries (an upgrade) to keep.
    pub fn tunnel_bounds(&self, meter: &Meter, config: &Config) -> crate::pipeline::TunnelBounds {
        crate::pipeline::TunnelBounds {
            idle: config.timeouts.idle,
            lifetime_end: tokio::time::Instant::from_std(meter.started())
                + config.timeouts.max_connection_lifetime,
            drain: self.force_close.clone(),
        }
    }

    fn base_record(
        &self,
        inbound: &Inbound,
        destination: Option<&str>,
        protocol: Option<Protocol>,
    ) -> ConnectionRecord {
        ConnectionRecord {
            connection_id: inbound.id.clone(),
            start_time: inbound.started,
            end_time: SystemTime::now(),
            origin: self.records.origin().clone(),
            duration_ms: inbound.t0.elapsed().as_secs_f64() * 1000.0,
            destination: destination.map(str::to_owned),
            protocol: protocol.map(Protocol::as_str),
            original_dst: Some(inbound.attested.original_dst.to_string()),
            client_addr: inbound.client_addr.to_string(),
            workload: Some(Arc::clone(&inbound.workload)),
            bytes_up: 0,
            bytes_down: 0,
            sni: None,
            tls_version: None,
            alpn: None,
            requests: 0,
            decision: None,
            policy_ids: Vec::new(),
            policy_set_hash: None,
            outcome: Outcome::Closed,
            error: None,
        }
    }

    /// Opens a passage phigate relays uninspected: listed first (so a reload from
    /// here on decides it again), then decided, the decision noted in its record.
    /// `Err`: the outcome and error to record for a refusal.
    pub fn open_passage(
        &self,
        rec: &mut ConnectionRecord,
        workload: &Arc<Workload>,
        destination: &str,
        passage: crate::policy::Passage,
        sni: Option<&str>,
    ) -> Result<OpenPassage<'_>, (Outcome, Option<String>)> {
        let conn = Arc::new(live::PassageConn::new(
            rec.connection_id.clone(),
            Arc::clone(workload),
            destination.to_owned(),
            passage,
            sni.map(str::to_owned),
            &self.force_close,
        ));
        let listed = self.live.list_passage(&conn);
        let gate = self.gate();
        let d = gate.check_connection(workload, destination, passage, sni);
        rec.decision = Some(if d.allowed { "allow" } else { "deny" });
        rec.policy_ids = d.policy_ids.clone();
        rec.policy_set_hash = Some(gate.policies.hash().to_owned());
        if d.allowed {
            return Ok(OpenPassage {
                conn,
                _listed: listed,
            });
        }
        let mut why = format!("{} denied by policy: {}", passage.action(), d.reason.code());
        if !d.errors.is_empty() {
            why.push_str(&format!(" ({})", d.errors.join("; ")));
        }
        Err((Outcome::Denied, Some(why)))
    }

    fn record_refused(
        &self,
        id: &str,
        peer: SocketAddr,
        started: SystemTime,
        t0: Instant,
        outcome: Outcome,
        error: Option<String>,
    ) {
        warn!(client = %peer, ?outcome, "refused connection on the listener");
        self.write(ConnectionRecord {
            connection_id: id.to_owned(),
            start_time: started,
            end_time: SystemTime::now(),
            origin: self.records.origin().clone(),
            duration_ms: t0.elapsed().as_secs_f64() * 1000.0,
            destination: None,
            protocol: None,
            original_dst: None,
            client_addr: peer.to_string(),
            workload: None,
            bytes_up: 0,
            bytes_down: 0,
            sni: None,
            tls_version: None,
            alpn: None,
            requests: 0,
            decision: None,
            policy_ids: Vec::new(),
            policy_set_hash: None,
            outcome,
            error,
        });
    }

    fn write(&self, rec: ConnectionRecord) {
        debug!(connection = %rec.connection_id, outcome = ?rec.outcome, up = rec.bytes_up, down = rec.bytes_down, "connection record");
        let id = rec.connection_id.clone();
        let outcome = serde_json::to_value(rec.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.metrics
            .connection(rec.destination.as_deref().unwrap_or(""), &outcome);
        let durable = self.records.submit(Record::Connection(rec));
        // The connection is already over: nothing waits on this record, but its loss
        // must be loud.
        tokio::spawn(async move {
            if let Err(e) = durable.await {
                tracing::error!(error = %e, connection = %id, "record lost");
            }
        });
    }
}

/// Connects that reached the listener without the redirect. Each is refused at once;
/// at most one `direct_connects` event per [`DirectConnects::EVERY`] tells how many
/// there were and from where, so their cost to the agent and the records is bounded
/// whatever a local user does.
#[derive(Default)]
pub struct DirectConnects {
    state: std::sync::Mutex<DirectState>,
}

#[derive(Default)]
struct DirectState {
    last_report: Option<Instant>,
    since_report: u64,
    total: u64,
    /// A few of the peers since the last report (for the event's message).
    peers: Vec<SocketAddr>,
}

impl DirectConnects {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
    const PEERS_SHOWN: usize = 8;

    /// Counts one; returns the event message when a report is due.
    pub fn note(&self, peer: SocketAddr) -> Option<String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.total += 1;
        s.since_report += 1;
        if s.peers.len() < Self::PEERS_SHOWN {
            s.peers.push(peer);
        }
        let due = s.last_report.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if !due {
            return None;
        }
        let message = format!(
            "{} connect(s) to the listener that the redirect did not send (total {}); peers: {}",
            s.since_report,
            s.total,
            s.peers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        warn!(
            count = s.since_report,
            "refused direct connects to the listener"
        );
        s.last_report = Some(Instant::now());
        s.since_report = 0;
        s.peers.clear();
        Some(message)
    }
}

/// Accepted peers of a dual-stack socket may be v4-mapped; the maps key on plain v4.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// A passage allowed and listed among the live connections while it is relayed.
pub struct OpenPassage<'a> {
    pub conn: Arc<live::PassageConn>,
    _listed: live::Listed<'a>,
}

#[cfg(test)]
mod tests;
