//! What the live streams send of each durable record, shared by the SIEM's syslog
//! ([`super::siem`]) and OTLP logs ([`super::otlp`]): the fixed list of a table's
//! metadata columns, a severity, a summary for people; the journal's bounded
//! hand-over ([`Feed`]); the counters; the outage and drop reports (`events` rows);
//! TLS toward a receiver that trusts only its `ca_file`.
//!
//! Bodies, header values, queries, free text a person typed and error texts are not
//! in the lists and are never sent; the path is the record's, in which patient ids
//! are already pseudonyms.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::Value;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::journal::{Entry, Submission};
use super::{micros, EventRecord, Origin, Record, Table};

/// The `requests` columns each stream carries (never bodies, headers, query or errors).
pub const REQUEST_FIELDS: &[&str] = &[
    "request_id",
    "connection_id",
    "destination",
    "original_dst",
    "client_addr",
    "pid",
    "uid",
    "user",
    "comm",
    "systemd_unit",
    "container_id",
    "container_runtime",
    "pod_uid",
    "pod_namespace",
    "pod_name",
    "container_image",
    "exe_path",
    "exe_sha256",
    "oidc_issuer",
    "oidc_subject",
    "sni",
    "method",
    "authority",
    "path",
    "status",
    "decision",
    "policy_ids",
    "policy_set_hash",
    "masking_profile",
    "approval_id",
    "approvers",
    "upstream_credential",
    "request_bytes",
    "response_bytes",
    "duration_ms",
    "outcome",
];

/// The `connections` columns each stream carries.
pub const CONNECTION_FIELDS: &[&str] = &[
    "connection_id",
    "destination",
    "protocol",
    "original_dst",
    "client_addr",
    "pid",
    "uid",
    "user",
    "comm",
    "systemd_unit",
    "container_id",
    "container_runtime",
    "pod_uid",
    "pod_namespace",
    "pod_name",
    "container_image",
    "exe_path",
    "sni",
    "tls_version",
    "requests",
    "bytes_up",
    "bytes_down",
    "decision",
    "policy_ids",
    "duration_ms",
    "outcome",
];

/// The `approvals` columns each stream carries (not the reason: text a person typed).
pub const APPROVAL_FIELDS: &[&str] = &[
    "approval_id",
    "state",
    "rule",
    "request_id",
    "requester",
    "requester_person",
    "reviewer",
    "reviewer_person",
];

/// The `events` columns each stream carries (the message is the agent's own text).
pub const EVENT_FIELDS: &[&str] = &[
    "event_id",
    "kind",
    "outcome",
    "config_hash",
    "policy_set_hash",
    "table_name",
    "file",
    "first_chain_seq",
    "last_chain_seq",
    "message",
];

/// A stream's counters, shared with the store (`phigate status`, metrics).
#[derive(Default)]
pub struct StreamState {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub failures: AtomicU64,
    pub buffered: AtomicU64,
    /// OTLP: records a receiver accepted the export of but rejected (partial success).
    pub rejected: AtomicU64,
    /// SIEM: a connection is open; OTLP: the last export was accepted.
    pub connected: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// `phigate status` view of a stream.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StreamProgress {
    pub destination: String,
    pub connected: bool,
    pub sent: u64,
    pub buffered: u64,
    pub dropped: u64,
    pub failures: u64,
    #[serde(default)]
    pub rejected: u64,
    pub last_error: Option<String>,
}

impl StreamState {
    pub fn progress(&self, destination: &str) -> StreamProgress {
        StreamProgress {
            destination: destination.to_owned(),
            connected: self.connected.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            buffered: self.buffered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A committed journal entry waiting to be sent.
pub(crate) struct Committed {
    pub seq: u64,
    pub table: Table,
    pub json: Vec<u8>,
}

/// The journal's hand-over: committed entries wait here, bounded, for a sender.
pub struct Feed {
    inbox: Mutex<VecDeque<Committed>>,
    pub(crate) wake: Notify,
    cap: usize,
    state: Arc<StreamState>,
}

impl Feed {
    pub fn new(cap: usize, state: Arc<StreamState>) -> Feed {
        Feed {
            inbox: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            cap,
            state,
        }
    }

    /// Called by the journal thread after a commit; never waits for the receiver.
    /// Past the bound the oldest entries are dropped and counted.
    pub fn offer(&self, entries: &[Entry]) {
        let mut q = lock(&self.inbox);
        q.extend(entries.iter().map(|e| Committed {
            seq: e.seq,
            table: e.table,
            json: e.json.clone(),
        }));
        let over = q.len().saturating_sub(self.cap);
        if over > 0 {
            q.drain(..over);
            self.state.dropped.fetch_add(over as u64, Ordering::Relaxed);
        }
        drop(q);
        self.wake.notify_one();
    }

    pub(crate) fn take(&self) -> VecDeque<Committed> {
        std::mem::take(&mut *lock(&self.inbox))
    }

    /// The journal seqs waiting, oldest first.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> Vec<u64> {
        lock(&self.inbox).iter().map(|c| c.seq).collect()
    }
}

/// Past the bound, the oldest of a sender's pending items go (counted).
pub(crate) fn bound<T>(pending: &mut VecDeque<T>, cap: usize, state: &StreamState) {
    let over = pending.len().saturating_sub(cap);
    if over > 0 {
        pending.drain(..over);
        state.dropped.fetch_add(over as u64, Ordering::Relaxed);
    }
    state
        .buffered
        .store(pending.len() as u64, Ordering::Relaxed);
}

/// How much a record matters to whoever watches the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    /// A denial, an approval refused, a connection that ended badly.
    Notice,
    /// A configuration rejected.
    Warning,
    /// An agent operation that failed.
    Error,
}

/// A record's metadata: what a stream sends of it.
pub struct Metadata<'a> {
    /// The row's time (`end_time` of requests and connections, else `time`), in
    /// microseconds since the epoch.
    pub time_us: Option<i64>,
    pub level: Level,
    /// The listed columns that have a value (not null, not empty), in list order.
    pub fields: Vec<(&'static str, &'a Value)>,
    /// A short summary for people, ASCII only.
    pub summary: String,
}

/// A journal entry's JSON as a row; None when it is not an object (skipped).
pub fn row(json: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(json)
        .ok()
        .filter(Value::is_object)
}

/// What the streams send of `row`, a record of `table`.
pub fn metadata(table: Table, row: &Value) -> Metadata<'_> {
    let time_col = match table {
        Table::Requests | Table::Connections => "end_time",
        Table::Approvals | Table::Events => "time",
    };
    let fields = fields(table)
        .iter()
        .filter_map(|name| {
            let v = row.get(*name)?;
            text(v).is_some().then_some((*name, v))
        })
        .collect();
    Metadata {
        time_us: row.get(time_col).and_then(Value::as_i64),
        level: level(table, row),
        fields,
        summary: summary(table, row),
    }
}

/// A column's value as text; None for null, empty and nested values; a list's
/// items joined with commas.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) if !a.is_empty() => {
            let parts: Vec<String> = a.iter().filter_map(text).collect();
            (!parts.is_empty()).then(|| parts.join(","))
        }
        _ => None,
    }
}

/// A value is cut at this many bytes (an event's message is agent-written text).
pub const MAX_VALUE: usize = 1024;

/// `v` cut to [`MAX_VALUE`] bytes, on a character boundary.
pub fn clip(mut v: String) -> String {
    if v.len() > MAX_VALUE {
        let mut cut = MAX_VALUE;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    v
}

fn level(table: Table, row: &Value) -> Level {
    let s = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("");
    match table {
        Table::Requests => match s("decision") {
            "allow" | "approved" => Level::Info,
            _ => Level::Notice,
        },
        Table::Connections => match (s("decision"), s("outcome")) {
            ("deny", _) => Level::Notice,
            (_, "closed" | "uninspected" | "idle_timeout" | "drained") => Level::Info,
            _ => Level::Notice,
        },
        Table::Approvals => match s("state") {
            "denied" | "expired" => Level::Notice,
            _ => Level::Info,
        },
        Table::Events => match s("outcome") {
            "ok" => Level::Info,
            "rejected" => Level::Warning,
            _ => Level::Error,
        },
    }
}

fn summary(table: Table, row: &Value) -> String {
    let s = |k: &str| row.get(k).and_then(text).unwrap_or_else(|| "-".into());
    let text = match table {
        Table::Requests => format!(
            "{} {} {} {} -> {} {}",
            s("destination"),
            s("method"),
            s("path"),
            s("decision"),
            s("status"),
            s("outcome")
        ),
        Table::Connections => format!("{} {} {}", s("destination"), s("protocol"), s("outcome")),
        Table::Approvals => format!("approval {} {} {}", s("approval_id"), s("state"), s("rule")),
        Table::Events => format!("{} {}", s("kind"), s("outcome")),
    };
    text.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn fields(table: Table) -> &'static [&'static str] {
    match table {
        Table::Requests => REQUEST_FIELDS,
        Table::Connections => CONNECTION_FIELDS,
        Table::Approvals => APPROVAL_FIELDS,
        Table::Events => EVENT_FIELDS,
    }
}

/// Shared parts the store hands a sender.
pub struct StreamDeps {
    pub feed: Arc<Feed>,
    pub state: Arc<StreamState>,
    pub sockets: crate::sockets::SocketFactory,
    pub shutdown: Arc<AtomicBool>,
    pub events: std::sync::mpsc::Sender<Submission>,
    pub origin: Origin,
}

/// A stream's reports of outages and drops: logs, and `events` rows of kinds
/// `<kind>` and `<kind>_drops`, once per outage or run of drops.
pub(crate) struct Reports {
    /// "SIEM stream", "OTLP stream".
    pub name: &'static str,
    /// `siem`, `otlp`; the drops' kind is this with `_drops`.
    pub kind: &'static str,
    pub drops_kind: &'static str,
    /// "line", "record".
    pub unit: &'static str,
    pub receiver: String,
    pub buffer: usize,
    /// The outage in progress, if any (its first failure's kind).
    outage: Option<u8>,
    /// A run of drops is in progress (reported), and the drops counted when the
    /// last run ended.
    dropping: bool,
    drops_seen: u64,
}

impl Reports {
    pub fn new(
        name: &'static str,
        kinds: (&'static str, &'static str),
        unit: &'static str,
        receiver: String,
        buffer: usize,
    ) -> Reports {
        Reports {
            name,
            kind: kinds.0,
            drops_kind: kinds.1,
            unit,
            receiver,
            buffer,
            outage: None,
            dropping: false,
            drops_seen: 0,
        }
    }

    /// After the buffer was filled: a new run of drops is reported.
    pub fn after_fill(&mut self, deps: &StreamDeps) {
        let dropped = deps.state.dropped.load(Ordering::Relaxed);
        if dropped > self.drops_seen && !self.dropping {
            self.dropping = true;
            warn!(
                buffer = self.buffer,
                "{}: buffer full; the oldest {}s are dropped", self.name, self.unit
            );
            self.event(
                deps,
                self.drops_kind,
                "failed",
                format!(
                    "buffer of {} {}s full: the oldest are dropped ({dropped} so far)",
                    self.buffer, self.unit
                ),
            );
        }
    }

    /// Everything buffered was sent: a run of drops is over.
    pub fn caught_up(&mut self, deps: &StreamDeps, pending: usize) {
        if self.dropping && pending == 0 && self.outage.is_none() {
            self.dropping = false;
            let dropped = deps.state.dropped.load(Ordering::Relaxed);
            let run = dropped - self.drops_seen;
            self.drops_seen = dropped;
            info!(dropped = run, "{}: caught up; no more drops", self.name);
            self.event(
                deps,
                self.drops_kind,
                "ok",
                format!(
                    "caught up: {run} {}(s) dropped ({dropped} since start)",
                    self.unit
                ),
            );
        }
    }

    /// The receiver answered (connected, or accepted an export).
    pub fn reached(&mut self, deps: &StreamDeps, pending: usize) {
        let s = &deps.state;
        s.connected.store(true, Ordering::Relaxed);
        *lock(&s.last_error) = None;
        if self.outage.take().is_some() {
            info!(receiver = %self.receiver, "{}: the receiver is back", self.name);
            self.event(
                deps,
                self.kind,
                "ok",
                format!(
                    "{} reached again; {pending} {}(s) waiting are sent",
                    self.receiver, self.unit
                ),
            );
        }
    }

    /// A failure: counted; reported once per outage, and again if the receiver's
    /// certificate stops verifying during one.
    pub fn failed(&mut self, deps: &StreamDeps, f: &Failure) {
        let (kind, text) = (f.kind(), f.text());
        let untrusted = matches!(f, Failure::Untrusted(_));
        let s = &deps.state;
        s.connected.store(false, Ordering::Relaxed);
        s.failures.fetch_add(1, Ordering::Relaxed);
        *lock(&s.last_error) = Some(text.clone());
        let before = self.outage.replace(kind);
        if before.is_none() || (untrusted && before != Some(kind)) {
            warn!(receiver = %self.receiver, error = %text, "{}: {}s wait in the buffer and are sent when the receiver is back", self.name, self.unit);
            self.event(deps, self.kind, "failed", text);
        }
    }

    /// An `events` row (not awaited: it is streamed like the rest once committed).
    fn event(&self, deps: &StreamDeps, kind: &'static str, outcome: &'static str, message: String) {
        let mut ev = EventRecord::new(&deps.origin, kind, outcome);
        ev.message = Some(message);
        if let Ok(json) = Record::Event(ev).to_json() {
            let _ = deps.events.send(Submission {
                table: Table::Events,
                time_us: micros::of(SystemTime::now()),
                json,
                done: None,
            });
        }
    }
}

/// TLS toward a receiver: only `ca_file` is trusted (not the system roots), and
/// the optional client certificate is presented; `section` names the config
/// section in errors.
pub(crate) fn client_tls(
    section: &str,
    ca_file: &Path,
    client_cert: Option<&crate::config::upstream_auth::ClientCert>,
    alpn: &[&[u8]],
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {section}.ca_file: {e}", ca_file.display()))?;
    for c in certs {
        roots.add(c).map_err(|e| {
            anyhow::anyhow!(
                "{}: {section}.ca_file: certificate rejected: {e}",
                ca_file.display()
            )
        })?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{}: {section}.ca_file holds no certificate",
        ca_file.display()
    );
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = crate::tls::client_identity(c)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Why a receiver could not be reached or an exchange failed, by kind: an event is
/// recorded when an outage starts, and when a certificate fails verification
/// during one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    Unreachable(String),
    /// The receiver's certificate failed verification.
    Untrusted(String),
    Handshake(String),
    /// The connection broke off, or an exchange timed out.
    Lost(String),
    /// The receiver answered with an HTTP status other than 2xx.
    Refused(u16),
}

impl Failure {
    pub fn text(&self) -> String {
        match self {
            Failure::Unreachable(m) => format!("cannot reach the receiver: {m}"),
            Failure::Untrusted(m) => {
                format!("the receiver's certificate failed verification: {m}")
            }
            Failure::Handshake(m) => format!("TLS handshake with the receiver failed: {m}"),
            Failure::Lost(m) => format!("connection to the receiver lost: {m}"),
            Failure::Refused(s) => format!("the receiver answered HTTP {s}"),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Failure::Unreachable(_) => 0,
            Failure::Untrusted(_) => 1,
            Failure::Handshake(_) => 2,
            Failure::Lost(_) => 3,
            Failure::Refused(_) => 4,
        }
    }

    /// A failed TLS handshake: a certificate that does not verify is told apart.
    pub fn of_handshake(e: &std::io::Error, addr: std::net::SocketAddr) -> Failure {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) => {
                Failure::Untrusted(format!("{addr}: {c:?}"))
            }
            _ => Failure::Handshake(format!("{addr}: {e}")),
        }
    }
}

/// Runs a stream's sender on a runtime of its own (its thread's), so a slow
/// receiver never takes time from the data plane's runtime.
pub(super) fn run_on_own_runtime(what: &str, serve: impl std::future::Future<Output = ()>) {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(serve),
        Err(e) => tracing::warn!(error = %e, "{what} stream: cannot start its runtime"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_feed_drops_the_oldest_and_counts_them() {
        let state = Arc::new(StreamState::default());
        let feed = Feed::new(3, state.clone());
        let entries: Vec<Entry> = (1..=5)
            .map(|seq| Entry {
                seq,
                time_us: 0,
                table: Table::Events,
                json: b"{}".to_vec(),
            })
            .collect();
        feed.offer(&entries);
        let kept: Vec<u64> = feed.take().into_iter().map(|c| c.seq).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(state.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn metadata_holds_only_listed_fields_with_values() {
        let row = row(br#"{"request_id":"r","query":"q=SECRET","request_body":"B","approvers":[],"approval_id":null,"status":403,"decision":"deny","end_time":5}"#).unwrap();
        let m = metadata(Table::Requests, &row);
        let names: Vec<&str> = m.fields.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["request_id", "status", "decision"]);
        assert_eq!((m.time_us, m.level), (Some(5), Level::Notice));
        assert_eq!(m.summary, "- - - deny -> 403 -");
        assert!(super::row(b"[1]").is_none());
    }
}
