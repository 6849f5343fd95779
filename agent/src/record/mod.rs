//! Records: one row per connection, per HTTP exchange, per approval state change and
//! per agent event, kept durably and tamper-evidently.
//!
//! The data path hands finished records to a [`RecordSink`] and gets a [`Durable`]
//! ticket back; in strict mode the pipeline releases the end of a response only once
//! the ticket resolves. [`store::RecordStore`] is the sink: a write-ahead
//! [`journal`] with group commit, and a background [`writer`] that turns the journal
//! into hash-chained ([`chain`]), signed ([`seal`]) Parquet files. [`verify`] checks
//! them, on this host or on a copy elsewhere with only the public key. Off the host,
//! [`ship`] copies sealed files to object storage, and [`siem`] (syslog) and
//! [`otlp`] (OTLP logs) stream each durable record's metadata ([`stream`]) as it is
//! committed.
//!
//! The format itself (the tables' columns, the chain, the seals) and its reader and
//! verifier are the `phigate-record` crate (`agent/record/`), what auditors' tools
//! link; its modules are re-exported here. This module is the writing side.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use serde::Serialize;

use crate::identity::Workload;

pub(crate) mod config;
pub mod journal;
mod lock;
pub mod otlp;
pub mod pseudonym;
pub mod ship;
pub mod siem;
pub mod store;
pub mod stream;
pub mod writer;

pub use phigate_record::{anchor, chain, keyfile, read, schema, seal, verify};
pub use phigate_record::{Outcome, RequestDecision, RequestOutcome, Table};

/// Facts every row carries about the agent that wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct Origin {
    pub host: Arc<str>,
    pub agent_version: &'static str,
}

impl Origin {
    pub fn this_host() -> Origin {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        Origin {
            host: host.into(),
            agent_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// One row of the `connections` table.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub connection_id: String,
    #[serde(with = "micros")]
    pub start_time: SystemTime,
    #[serde(with = "micros")]
    pub end_time: SystemTime,
    #[serde(flatten)]
    pub origin: Origin,
    pub duration_ms: f64,
    /// Name of the protected destination (None when the connection was not redirected).
    pub destination: Option<String>,
    pub protocol: Option<&'static str>,
    pub original_dst: Option<String>,
    pub client_addr: String,
    #[serde(flatten)]
    pub workload: Option<Arc<Workload>>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// TLS facts of the client side, when the connection was TLS.
    pub sni: Option<String>,
    pub tls_version: Option<String>,
    pub alpn: Option<String>,
    /// HTTP exchanges carried (0 for tcp and uninspected connections).
    pub requests: u64,
    /// For a connection decided as a whole (a `TCP` or `TUNNEL` passage): `allow` or
    /// `deny`, the deciding policies and the policy set's hash. None for HTTP
    /// connections, whose requests are decided one by one.
    pub decision: Option<&'static str>,
    pub policy_ids: Vec<String>,
    pub policy_set_hash: Option<String>,
    pub outcome: Outcome,
    pub error: Option<String>,
}

/// One row of the `requests` table: an HTTP exchange as phigate saw and decided it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub connection_id: String,
    #[serde(with = "micros")]
    pub start_time: SystemTime,
    #[serde(with = "micros")]
    pub end_time: SystemTime,
    #[serde(flatten)]
    pub origin: Origin,
    pub destination: String,
    pub original_dst: String,
    pub client_addr: String,
    #[serde(flatten)]
    pub workload: Arc<Workload>,
    /// The OIDC identity of the bearer token, when one was presented and valid (the
    /// token itself is never recorded).
    pub oidc_issuer: Option<String>,
    pub oidc_subject: Option<String>,
    pub oidc_groups: Vec<String>,
    /// The token's `exp`, microseconds since the Unix epoch.
    pub oidc_expiry: Option<i64>,
    /// TLS as negotiated with the client (None for plain HTTP destinations).
    pub sni: Option<String>,
    pub tls_version: Option<String>,
    pub alpn: Option<String>,
    /// HTTP version the client spoke, and the one used upstream.
    pub http_version: String,
    pub upstream_http_version: Option<String>,
    pub upstream_tls_version: Option<String>,
    pub upstream_cert_subject: Option<String>,
    /// The `upstream_auth` id phigate presented for this request (never its value),
    /// and how it was obtained: static, token_endpoint, cached, client_certificate.
    pub upstream_credential: Option<String>,
    pub upstream_credential_source: Option<String>,
    pub method: String,
    pub authority: Option<String>,
    /// The request path with patient ids replaced by their pseudonyms: once the
    /// policies decided, the normalized path they decided on (and that was forwarded).
    pub path: String,
    /// The path as the client sent it (pseudonymized), when normalization changed it
    /// (`..`, `%2e`, `//`): the evidence of what was attempted.
    pub path_as_sent: Option<String>,
    /// The query string with patient ids pseudonymized and other values of unknown
    /// meaning redacted (see [`pseudonym::Pseudonymizer::redact_query`]).
    pub query: Option<String>,
    /// Selected headers (configured); credentials never raw.
    pub request_headers: BTreeMap<String, String>,
    pub response_headers: BTreeMap<String, String>,
    /// Bodies as the masking stage left them, up to the configured size; None when no
    /// masking profile applied (raw bodies are never recorded).
    pub request_body: Option<String>,
    pub request_body_truncated: bool,
    pub response_body: Option<String>,
    pub response_body_truncated: bool,
    /// Pseudonyms of the patient ids the request named (see `pseudonym`).
    pub patient_refs: Vec<String>,
    /// Response status sent to the client (phigate's own error answers included).
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Time until the response head was ready, and until the response body ended.
    pub latency_ms: f64,
    pub duration_ms: f64,
    pub decision: RequestDecision,
    /// Ids of the policies that decided, and the hash of the policy set in force.
    pub policy_ids: Vec<String>,
    pub policy_set_hash: Option<String>,
    /// Masked values by entity type, the profile applied and the rule set's hash.
    pub masking_profile: Option<String>,
    pub masking_counts: BTreeMap<String, i64>,
    pub masking_set_hash: Option<String>,
    pub approval_id: Option<String>,
    pub approvers: Vec<String>,
    pub approval_reason: Option<String>,
    /// True when the connection switched protocols (WebSocket): bytes after the
    /// upgrade are counted but not inspected.
    pub upgraded: bool,
    /// How the exchange ended.
    pub outcome: RequestOutcome,
    pub error: Option<String>,
    /// The response body as the upstream sent it (up to the record body size),
    /// HPKE-sealed to the destination's review key (`seal_originals_to`), base64;
    /// only the holder of the private key opens it. None when not configured.
    pub response_original_sealed: Option<String>,
    pub response_original_key_id: Option<String>,
}

/// One row of the `approvals` table: a state change of an approval.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRecord {
    pub approval_id: String,
    #[serde(with = "micros")]
    pub time: SystemTime,
    #[serde(flatten)]
    pub origin: Origin,
    /// requested, notified, approved, denied, expired, used.
    pub state: &'static str,
    pub rule: String,
    pub request_id: Option<String>,
    /// Digest binding the approval to one exact request.
    pub request_digest: String,
    pub requester: String,
    /// The person behind the requester (approvals.toml `[[person]]`).
    pub requester_person: Option<String>,
    pub reviewer: Option<String>,
    /// The person the reviewer is: self-approval and quorum are decided on persons.
    pub reviewer_person: Option<String>,
    pub reason: Option<String>,
    pub error: Option<String>,
}

/// One row of the `events` table: what happened to the agent and its records.
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub event_id: String,
    #[serde(with = "micros")]
    pub time: SystemTime,
    #[serde(flatten)]
    pub origin: Origin,
    /// agent_start, agent_stop, config_reload, policy_reload, retention_delete,
    /// verify, journal_replay, shipping, siem (the stream's receiver lost or back),
    /// siem_drops (the stream's buffer overflowing, and caught up), otlp and
    /// otlp_drops (the same for the OTLP logs stream).
    pub kind: &'static str,
    /// ok, rejected, failed.
    pub outcome: &'static str,
    pub config_hash: Option<String>,
    pub policy_set_hash: Option<String>,
    /// For retention deletions: the file removed and the chain range it held, so
    /// `audit verify` can accept the gap it leaves.
    pub table_name: Option<String>,
    pub file: Option<String>,
    pub first_chain_seq: Option<u64>,
    pub last_chain_seq: Option<u64>,
    pub last_hash: Option<String>,
    pub message: Option<String>,
}

impl EventRecord {
    pub fn new(origin: &Origin, kind: &'static str, outcome: &'static str) -> EventRecord {
        EventRecord {
            event_id: new_id(),
            time: SystemTime::now(),
            origin: origin.clone(),
            kind,
            outcome,
            config_hash: None,
            policy_set_hash: None,
            table_name: None,
            file: None,
            first_chain_seq: None,
            last_chain_seq: None,
            last_hash: None,
            message: None,
        }
    }
}

/// Any record, tagged with its table.
#[derive(Debug, Clone)]
pub enum Record {
    Connection(ConnectionRecord),
    Request(Box<RequestRecord>),
    Approval(ApprovalRecord),
    Event(EventRecord),
}

impl Record {
    pub fn table(&self) -> Table {
        match self {
            Record::Connection(_) => Table::Connections,
            Record::Request(_) => Table::Requests,
            Record::Approval(_) => Table::Approvals,
            Record::Event(_) => Table::Events,
        }
    }

    /// The journal encoding: one JSON object whose fields are the table's columns.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        // A request row is one to two KiB of JSON: one allocation of that size rather
        // than the many a vector doubling from empty makes on its way there.
        let mut out = Vec::with_capacity(2048);
        match self {
            Record::Connection(r) => serde_json::to_writer(&mut out, r)?,
            Record::Request(r) => serde_json::to_writer(&mut out, r)?,
            Record::Approval(r) => serde_json::to_writer(&mut out, r)?,
            Record::Event(r) => serde_json::to_writer(&mut out, r)?,
        }
        Ok(out)
    }

    pub fn id(&self) -> &str {
        match self {
            Record::Connection(r) => &r.connection_id,
            Record::Request(r) => &r.request_id,
            Record::Approval(r) => &r.approval_id,
            Record::Event(r) => &r.event_id,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot write {table} record: {reason}")]
pub struct RecordError {
    pub table: Table,
    pub reason: String,
}

/// Resolves once a submitted record is durable (strict mode: fsynced in the journal;
/// batched mode: queued, with the fsync window bounded), or failed.
pub struct Durable(DurableInner);

enum DurableInner {
    Ready(Option<Result<(), RecordError>>),
    Waiting(
        tokio::sync::oneshot::Receiver<Result<(), RecordError>>,
        Table,
    ),
}

impl Durable {
    pub fn ready(r: Result<(), RecordError>) -> Durable {
        Durable(DurableInner::Ready(Some(r)))
    }

    pub fn waiting(
        rx: tokio::sync::oneshot::Receiver<Result<(), RecordError>>,
        table: Table,
    ) -> Self {
        Durable(DurableInner::Waiting(rx, table))
    }
}

impl Future for Durable {
    type Output = Result<(), RecordError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            DurableInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Ok(()))),
            DurableInner::Waiting(rx, table) => match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(r)) => Poll::Ready(r),
                Poll::Ready(Err(_)) => Poll::Ready(Err(RecordError {
                    table: *table,
                    reason: "the journal writer stopped".into(),
                })),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Where finished records go. `submit` is cheap and never blocks the data path; the
/// returned ticket says when (and whether) the record is durable. A record that cannot
/// be written is an error, not a warning: fail closed is decided by the caller.
pub trait RecordSink: Send + Sync + 'static {
    fn submit(&self, rec: Record) -> Durable;

    /// False while records cannot be written: new exchanges are then refused (fail
    /// closed). Implementations re-check the condition, so this recovers by itself.
    fn writable(&self) -> bool {
        true
    }

    /// Where records are described as being: written for the agent's own events.
    fn origin(&self) -> &Origin;
}

/// A new, time-ordered id (UUIDv7) for connections, requests and events.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Timestamps travel as integer microseconds since the Unix epoch (UTC): exact, and
/// what the Parquet columns hold.
pub mod micros {
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub fn of(t: SystemTime) -> i64 {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_micros() as i64,
            Err(e) => -(e.duration().as_micros() as i64),
        }
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(of(*t))
    }
}
