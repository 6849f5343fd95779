//! Prometheus metrics, served on `[admin] metrics_listen` apart from the data plane.
//!
//! One process-wide set ([`get`]): the stages count into it where they run, and the
//! gauges that are cheaper to read than to maintain (pending approvals, journal lag,
//! eBPF map occupancy, open connections, the policy set in force) are sampled when
//! scraped. Labels are destination names, decisions, outcomes, stages and entity
//! types only: never paths, identities or values.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub destination: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub destination: String,
    pub decision: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntityLabels {
    pub entity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicySetLabels {
    pub hash: String,
}

/// A stage of a request's path whose duration is measured.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// The client TLS handshake with a minted leaf.
    TlsHandshake,
    /// From sending the request upstream to its response head.
    Upstream,
    /// Time spent in the masker over one body.
    Masking,
    /// From submitting a record to its journal commit (strict durability: fsync).
    RecordDurable,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::TlsHandshake => "tls_handshake",
            Stage::Upstream => "upstream",
            Stage::Masking => "masking",
            Stage::RecordDurable => "record_durable",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ConnectionLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub stage_seconds: HistogramFamily<StageLabels>,
    pub masked_values: Family<EntityLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub revoked: Counter,
    pub upstream_retries: Counter,
    pub approval_transitions: Family<StateLabels, Counter>,
    // Sampled at scrape time.
    pub open_connections: Gauge,
    pub approvals: Family<StateLabels, Gauge>,
    pub journal_entries: Gauge,
    pub journal_bytes: Gauge,
    pub parquet_rows: Gauge,
    pub journal_lag: Gauge,
    pub journal_held: Gauge,
    pub shipped_files: Gauge,
    pub unshipped_files: Gauge,
    pub ship_failures: Gauge,
    pub ship_lag: Gauge,
    pub anchor_behind: Gauge,
    pub siem_sent: Gauge,
    pub siem_buffered: Gauge,
    pub siem_dropped: Gauge,
    pub siem_failures: Gauge,
    pub siem_connected: Gauge,
    pub otlp_sent: Gauge,
    pub otlp_buffered: Gauge,
    pub otlp_dropped: Gauge,
    pub otlp_failures: Gauge,
    pub otlp_rejected: Gauge,
    pub otlp_up: Gauge,
    pub records_writable: Gauge,
    pub ebpf_map_entries: Family<NameLabels, Gauge>,
    pub ebpf_counters: Family<NameLabels, Gauge>,
    pub policy_set: Family<PolicySetLabels, Gauge>,
    pub policies: Gauge,
    sampler: Mutex<Option<Sampler>>,
    /// Plain totals for `phigate status` (the families are for Prometheus).
    totals: Mutex<BTreeMap<String, u64>>,
}

/// Sets the scrape-time gauges; installed by the agent once its parts exist.
pub type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

fn latency_histogram() -> Histogram {
    // 20 us .. ~40 s.
    Histogram::new(exponential_buckets(0.00002, 2.0, 22))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The agent's metrics: made once at start and handed to every part that counts
    /// (tests make their own).
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            connections: Family::default(),
            requests: Family::default(),
            stage_seconds: Family::new_with_constructor(latency_histogram),
            masked_values: Family::default(),
            reloads: Family::default(),
            revoked: Counter::default(),
            upstream_retries: Counter::default(),
            approval_transitions: Family::default(),
            open_connections: Gauge::default(),
            approvals: Family::default(),
            journal_entries: Gauge::default(),
            journal_bytes: Gauge::default(),
            parquet_rows: Gauge::default(),
            journal_lag: Gauge::default(),
            journal_held: Gauge::default(),
            shipped_files: Gauge::default(),
            unshipped_files: Gauge::default(),
            ship_failures: Gauge::default(),
            ship_lag: Gauge::default(),
            anchor_behind: Gauge::default(),
            siem_sent: Gauge::default(),
            siem_buffered: Gauge::default(),
            siem_dropped: Gauge::default(),
            siem_failures: Gauge::default(),
            siem_connected: Gauge::default(),
            otlp_sent: Gauge::default(),
            otlp_buffered: Gauge::default(),
            otlp_dropped: Gauge::default(),
            otlp_failures: Gauge::default(),
            otlp_rejected: Gauge::default(),
            otlp_up: Gauge::default(),
            records_writable: Gauge::default(),
            ebpf_map_entries: Family::default(),
            ebpf_counters: Family::default(),
            policy_set: Family::default(),
            policies: Gauge::default(),
            sampler: Mutex::new(None),
            totals: Mutex::new(BTreeMap::new()),
        };
        let mut reg = Registry::with_prefix("phigate");
        reg.register(
            "connections",
            "Redirected connections by destination and how they ended",
            m.connections.clone(),
        );
        reg.register(
            "requests",
            "HTTP requests by destination, policy decision and outcome",
            m.requests.clone(),
        );
        reg.register(
            "stage_duration_seconds",
            "Duration of a request's stages: tls_handshake, upstream, masking, record_durable",
            m.stage_seconds.clone(),
        );
        reg.register(
            "masked_values",
            "Values masked, by entity type",
            m.masked_values.clone(),
        );
        reg.register(
            "reloads",
            "Config and policy reloads by kind and outcome",
            m.reloads.clone(),
        );
        reg.register(
            "connections_revoked",
            "Open connections closed because a new policy set no longer allowed them",
            m.revoked.clone(),
        );
        reg.register(
            "upstream_retries",
            "Bodiless idempotent requests sent again because an HTTP/2 upstream connection went away under them",
            m.upstream_retries.clone(),
        );
        reg.register(
            "approval_transitions",
            "Approvals entering a state (held, approved, denied, expired, ...)",
            m.approval_transitions.clone(),
        );
        reg.register(
            "open_connections",
            "HTTP connections open now",
            m.open_connections.clone(),
        );
        reg.register(
            "approvals",
            "Approvals by state (pending, and decided ones still held in memory)",
            m.approvals.clone(),
        );
        register_records(&mut reg, &m);
        reg.register(
            "ebpf_map_entries",
            "Entries in each eBPF map",
            m.ebpf_map_entries.clone(),
        );
        reg.register(
            "ebpf_events",
            "The redirect programs' own counters",
            m.ebpf_counters.clone(),
        );
        reg.register(
            "policy_set_info",
            "The policy set in force (its hash), value 1",
            m.policy_set.clone(),
        );
        reg.register(
            "policies",
            "Policies in the set in force",
            m.policies.clone(),
        );
        m.registry = reg;
        m
    }

    pub fn observe(&self, stage: Stage, d: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabels {
                stage: stage.label(),
            })
            .observe(d.as_secs_f64());
    }

    /// A recorded request.
    pub fn request(&self, destination: &str, decision: &str, outcome: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                destination: destination.to_owned(),
                decision: decision.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.total(&["requests".into(), format!("requests_{decision}")]);
    }

    /// A recorded connection.
    pub fn connection(&self, destination: &str, outcome: &str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                destination: destination.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.total(&["connections".into(), format!("connections_{outcome}")]);
    }

    fn total(&self, keys: &[String]) {
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            *t.entry(k.clone()).or_default() += 1;
        }
    }

    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn reload(&self, kind: &'static str, outcome: &'static str) {
        self.reloads
            .get_or_create(&ReloadLabels { kind, outcome })
            .inc();
    }

    pub fn set_sampler(&self, s: Sampler) {
        *self.sampler.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    /// The OpenMetrics text of every metric, scrape-time gauges sampled first.
    pub fn encode(&self) -> String {
        if let Some(s) = &*self.sampler.lock().unwrap_or_else(|p| p.into_inner()) {
            s(self);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Serves `GET /metrics` on `addr`, on a thread and runtime of its own so a slow or
/// hostile scraper never competes with the data plane.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("[admin] metrics_listen {addr}: {e}"))?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    std::thread::Builder::new()
        .name("phigate-metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "metrics runtime failed");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        error!(error = %e, "metrics listener failed");
                        return;
                    }
                };
                loop {
                    let (mut stream, _) = match listener.accept().await {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(error = %e, "metrics accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            answer(&mut stream, &metrics),
                        )
                        .await;
                    });
                }
            });
        })?;
    info!(addr = %local, "metrics");
    Ok(local)
}

/// One HTTP/1 exchange: `GET /metrics` gets the text, anything else 404/405.
async fn answer(stream: &mut tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        _ => ("404 Not Found", "text/plain", "see /metrics\n".into()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

/// The records' gauges: journal, Parquet, shipping, the SIEM stream, writability.
fn register_records(reg: &mut Registry, m: &Metrics) {
    reg.register(
        "journal_entries",
        "Records committed to the write-ahead journal since start",
        m.journal_entries.clone(),
    );
    reg.register(
        "journal_bytes",
        "Bytes committed to the write-ahead journal since start",
        m.journal_bytes.clone(),
    );
    reg.register(
        "parquet_rows",
        "Rows written to Parquet files since start",
        m.parquet_rows.clone(),
    );
    reg.register(
        "journal_lag_entries",
        "Records durable in the journal but not yet in Parquet",
        m.journal_lag.clone(),
    );
    reg.register(
        "journal_held_entries",
        "Journal entries that would not decode: not in Parquet, kept for inspection",
        m.journal_held.clone(),
    );
    reg.register(
        "records_shipped_files",
        "Sealed Parquet files shipped to object storage since start (with manifests)",
        m.shipped_files.clone(),
    );
    reg.register(
        "records_unshipped_files",
        "Sealed Parquet files waiting to be shipped",
        m.unshipped_files.clone(),
    );
    reg.register(
        "records_ship_failures",
        "Shipping passes that failed since start (the files wait and are retried)",
        m.ship_failures.clone(),
    );
    reg.register(
        "records_ship_lag_seconds",
        "How long the oldest sealed, unshipped file has waited",
        m.ship_lag.clone(),
    );
    reg.register(
        "records_anchor_behind",
        "1 when the agent started with records behind what it had shipped (deleted or rolled back)",
        m.anchor_behind.clone(),
    );
    reg.register(
        "siem_sent_lines",
        "Record lines written to the SIEM receiver since start",
        m.siem_sent.clone(),
    );
    reg.register(
        "siem_buffered_lines",
        "Record lines waiting for the SIEM receiver",
        m.siem_buffered.clone(),
    );
    reg.register(
        "siem_dropped_lines",
        "Record lines dropped since start because the SIEM buffer was full (oldest first)",
        m.siem_dropped.clone(),
    );
    reg.register(
        "siem_failures",
        "Failed connections to the SIEM receiver (unreachable, certificate not verified, lost)",
        m.siem_failures.clone(),
    );
    reg.register(
        "siem_connected",
        "1 while a verified TLS connection to the SIEM receiver is open",
        m.siem_connected.clone(),
    );
    reg.register(
        "otlp_sent_records",
        "Log records the OTLP receiver accepted (2xx) since start",
        m.otlp_sent.clone(),
    );
    reg.register(
        "otlp_buffered_records",
        "Log records waiting for the OTLP receiver",
        m.otlp_buffered.clone(),
    );
    reg.register(
        "otlp_dropped_records",
        "Log records dropped since start because the OTLP buffer was full (oldest first)",
        m.otlp_dropped.clone(),
    );
    reg.register(
        "otlp_failures",
        "Failed OTLP exports (unreachable, certificate not verified, broken off, not 2xx)",
        m.otlp_failures.clone(),
    );
    reg.register(
        "otlp_rejected_records",
        "Log records an OTLP receiver rejected in a partial success since start",
        m.otlp_rejected.clone(),
    );
    reg.register(
        "otlp_up",
        "1 while the OTLP receiver accepted the last export",
        m.otlp_up.clone(),
    );
    reg.register(
        "records_writable",
        "1 while records can be written (else requests are refused)",
        m.records_writable.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_histograms_and_sampled_gauges() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                destination: "patients-api".into(),
                decision: "deny".into(),
                outcome: "refused".into(),
            })
            .inc();
        m.observe(Stage::Upstream, Duration::from_millis(3));
        m.set_sampler(Box::new(|m| {
            m.open_connections.set(7);
        }));
        let text = m.encode();
        assert!(
            text.contains(
                "phigate_requests_total{destination=\"patients-api\",decision=\"deny\",outcome=\"refused\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("phigate_stage_duration_seconds_count{stage=\"upstream\"} 1"),
            "{text}"
        );
        assert!(text.contains("phigate_open_connections 7"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
