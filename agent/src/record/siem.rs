//! The SIEM stream: each durable record's metadata, as it is committed, sent to a
//! SIEM's receiver as RFC 5424 syslog over TLS with RFC 5425 octet-counting framing
//! (`LEN SP MSG`).
//!
//! The journal thread hands every committed batch to a [`Feed`] (after the commit,
//! so only durable records are streamed, in journal order) and goes on: the stream
//! never holds back or fails a request. One thread of its own turns entries into
//! lines and sends them; lines wait in a bounded buffer while the receiver is slow
//! or away, the oldest dropped (and counted) when it is full, and the sender
//! reconnects with backoff. Lines leave the buffer only once written, so after a
//! lost connection the unwritten ones are sent again: at least once, a line may
//! arrive twice, never out of order.
//!
//! What a line holds is a fixed list of each table's columns ([`REQUEST_FIELDS`],
//! ...): ids, who, where, the pseudonymized path, the decision and the outcome.
//! Bodies, header values, queries, free text a person typed and error texts are not
//! in those lists and are never sent; the path is the record's, in which patient
//! ids are already pseudonyms. The fields are SD-PARAMs of one SD-ELEMENT
//! `phigate@32473` (32473: the enterprise number RFC 5612 reserves for examples,
//! until phigate has its own), so a SIEM parses them without a custom parser; MSG
//! is a short summary for people.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::config::SiemSection;
use super::journal::{Entry, Submission};
use super::{micros, EventRecord, Origin, Record, Table};
use crate::sockets::SocketFactory;

/// The SD-ID every line's fields are under.
pub const SD_ID: &str = "phigate@32473";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the sender looks at the stop flag while idle.
const POLL: Duration = Duration::from_millis(250);
/// At stop, what is buffered gets this long to be delivered.
const FLUSH_AT_STOP: Duration = Duration::from_secs(2);
/// One write carries at most this many lines or bytes.
const BATCH_LINES: usize = 512;
const BATCH_BYTES: usize = 256 << 10;
/// An event's message is cut here (it is agent-written text).
const MAX_MESSAGE: usize = 1024;

/// The `requests` columns a line carries (never bodies, headers, query or errors).
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

/// The `connections` columns a line carries.
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

/// The `approvals` columns a line carries (not the reason: text a person typed).
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

/// The `events` columns a line carries (the message is the agent's own text).
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

/// The stream's counters, shared with the store (`phigate status`, metrics).
#[derive(Default)]
pub struct SiemState {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub failures: AtomicU64,
    pub buffered: AtomicU64,
    pub connected: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// `phigate status` view of the stream.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SiemProgress {
    pub destination: String,
    pub connected: bool,
    pub sent: u64,
    pub buffered: u64,
    pub dropped: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl SiemState {
    pub fn progress(&self, destination: &str) -> SiemProgress {
        SiemProgress {
            destination: destination.to_owned(),
            connected: self.connected.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            buffered: self.buffered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where the stream goes, as `status` shows it.
pub fn destination(cfg: &SiemSection) -> String {
    format!("syslog+tls://{}", cfg.address)
}

/// A committed journal entry waiting to become a line.
struct Committed {
    seq: u64,
    table: Table,
    json: Vec<u8>,
}

/// The journal's hand-over: committed entries wait here, bounded, for the sender.
pub struct Feed {
    inbox: Mutex<VecDeque<Committed>>,
    wake: Notify,
    cap: usize,
    state: Arc<SiemState>,
}

impl Feed {
    pub fn new(cap: usize, state: Arc<SiemState>) -> Feed {
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

    fn take(&self) -> VecDeque<Committed> {
        std::mem::take(&mut *lock(&self.inbox))
    }

    /// The journal seqs waiting, oldest first.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> Vec<u64> {
        lock(&self.inbox).iter().map(|c| c.seq).collect()
    }
}

/// The fixed parts of every line's header.
#[derive(Debug, Clone)]
pub struct Header {
    pub facility: u8,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
}

impl Header {
    pub fn new(cfg: &SiemSection, origin: &Origin) -> Header {
        Header {
            facility: cfg.facility,
            hostname: header_field(&origin.host, 255),
            app_name: header_field(&cfg.app_name, 48),
            procid: std::process::id().to_string(),
        }
    }
}

/// RFC 5424 header fields are PRINTUSASCII (33..=126) of a bounded length; empty is
/// the NILVALUE `-`.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

/// Escapes an SD-PARAM value (RFC 5424 6.3.3): `"`, `\` and `]` take a backslash.
pub fn escape_param(v: &str, out: &mut String) {
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A column's value as an SD-PARAM value; None for null, empty and nested values.
fn param_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) if !a.is_empty() => {
            let parts: Vec<String> = a.iter().filter_map(param_value).collect();
            (!parts.is_empty()).then(|| parts.join(","))
        }
        _ => None,
    }
}

/// RFC 3339 UTC with microseconds, as RFC 5424 TIMESTAMP; `-` when absent.
fn timestamp(us: Option<i64>) -> String {
    let Some(t) = us
        .and_then(|us| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).ok())
    else {
        return "-".into();
    };
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(fmt).unwrap_or_else(|_| "-".into())
}

/// RFC 5424 severities: 3 error, 4 warning, 5 notice, 6 informational.
fn severity(table: Table, row: &Value) -> u8 {
    let s = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or("");
    match table {
        Table::Requests => match s("decision") {
            "allow" | "approved" => 6,
            _ => 5,
        },
        Table::Connections => match (s("decision"), s("outcome")) {
            ("deny", _) => 5,
            (_, "closed" | "uninspected" | "idle_timeout" | "drained") => 6,
            _ => 5,
        },
        Table::Approvals => match s("state") {
            "denied" | "expired" => 5,
            _ => 6,
        },
        Table::Events => match s("outcome") {
            "ok" => 6,
            "rejected" => 4,
            _ => 3,
        },
    }
}

/// A short summary for people (MSG), ASCII only.
fn summary(table: Table, row: &Value) -> String {
    let s = |k: &str| {
        row.get(k)
            .and_then(param_value)
            .unwrap_or_else(|| "-".into())
    };
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

/// One record's syslog message (RFC 5424, unframed), from its journal encoding;
/// None when the JSON is not an object (the entry is skipped).
pub fn message(h: &Header, seq: u64, table: Table, json: &[u8]) -> Option<String> {
    let row: Value = serde_json::from_slice(json).ok()?;
    if !row.is_object() {
        return None;
    }
    let time_col = match table {
        Table::Requests | Table::Connections => "end_time",
        Table::Approvals | Table::Events => "time",
    };
    let pri = u16::from(h.facility) * 8 + u16::from(severity(table, &row));
    let mut out = String::with_capacity(1024);
    let _ = write!(
        out,
        "<{pri}>1 {} {} {} {} {} [{SD_ID} seq=\"{seq}\"",
        timestamp(row.get(time_col).and_then(Value::as_i64)),
        h.hostname,
        h.app_name,
        h.procid,
        table.name(),
    );
    for name in fields(table) {
        let Some(mut v) = row.get(*name).and_then(param_value) else {
            continue;
        };
        if v.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !v.is_char_boundary(cut) {
                cut -= 1;
            }
            v.truncate(cut);
        }
        let _ = write!(out, " {name}=\"");
        escape_param(&v, &mut out);
        out.push('"');
    }
    out.push_str("] ");
    out.push_str(&summary(table, &row));
    Some(out)
}

/// RFC 5425 framing: the message's length in octets, a space, the message.
pub fn frame(msg: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 8);
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg.as_bytes());
    out
}

/// Why a connection could not be made or was lost, by kind: an event is recorded
/// when an outage starts, and when a certificate fails verification during one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Unreachable(String),
    /// The receiver's certificate failed verification.
    Untrusted(String),
    Handshake(String),
    Lost(String),
}

impl Failure {
    fn text(&self) -> String {
        match self {
            Failure::Unreachable(m) => format!("cannot reach the receiver: {m}"),
            Failure::Untrusted(m) => {
                format!("the receiver's certificate failed verification: {m}")
            }
            Failure::Handshake(m) => format!("TLS handshake with the receiver failed: {m}"),
            Failure::Lost(m) => format!("connection to the receiver lost: {m}"),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Failure::Unreachable(_) => 0,
            Failure::Untrusted(_) => 1,
            Failure::Handshake(_) => 2,
            Failure::Lost(_) => 3,
        }
    }
}

type TlsWrite = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// An open connection: its write half, and a reader that notices the receiver
/// closing it (a receiver sends nothing else).
struct Conn {
    w: TlsWrite,
    closed: Arc<AtomicBool>,
    closed_wake: Arc<Notify>,
    /// How the reader saw it end.
    why: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Where the store streams: the section, and the agent's own outbound sockets
/// (exempt from the redirect, marked for the host's firewall).
#[derive(Debug, Clone)]
pub struct SiemTarget {
    pub section: SiemSection,
    pub sockets: SocketFactory,
}

/// Shared parts the store hands the sender.
pub struct SiemDeps {
    pub feed: Arc<Feed>,
    pub state: Arc<SiemState>,
    pub sockets: SocketFactory,
    pub shutdown: Arc<AtomicBool>,
    pub events: std::sync::mpsc::Sender<Submission>,
    pub origin: Origin,
}

/// The sender: one thread, its own small runtime.
pub struct Siem {
    cfg: SiemSection,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    header: Header,
    deps: SiemDeps,
    /// Framed lines not yet written, oldest first.
    pending: VecDeque<Vec<u8>>,
    /// The outage in progress, if any (its first failure's kind).
    outage: Option<u8>,
    /// A run of drops is in progress (reported), and the drops counted when the
    /// last run ended.
    dropping: bool,
    drops_seen: u64,
}

impl Siem {
    pub fn new(cfg: &SiemSection, deps: SiemDeps) -> anyhow::Result<Siem> {
        let server_name = rustls_pki_types::ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| anyhow::anyhow!("records.siem.server_name: {e}"))?;
        Ok(Siem {
            tls: connector(cfg)?,
            server_name,
            header: Header::new(cfg, &deps.origin),
            cfg: cfg.clone(),
            deps,
            pending: VecDeque::new(),
            outage: None,
            dropping: false,
            drops_seen: 0,
        })
    }

    /// Runs until the store closes; then, if connected, what is buffered gets
    /// FLUSH_AT_STOP.
    pub fn run(mut self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "SIEM stream: cannot start its runtime");
                return;
            }
        };
        rt.block_on(self.serve());
    }

    async fn serve(&mut self) {
        let mut conn: Option<Conn> = None;
        let mut backoff = MIN_BACKOFF;
        let mut retry_at = Instant::now();
        let mut stop_by: Option<Instant> = None;
        loop {
            self.fill();
            if self.deps.shutdown.load(Ordering::Relaxed) {
                // Connected: what waits gets FLUSH_AT_STOP; not: no new attempt holds
                // up the stop (the lines are in the records).
                let by = *stop_by.get_or_insert_with(|| Instant::now() + FLUSH_AT_STOP);
                if self.pending.is_empty() || conn.is_none() || Instant::now() >= by {
                    break;
                }
            }
            if let Some(c) = conn.take_if(|c| c.closed.load(Ordering::Relaxed)) {
                let why = lock(&c.why).take().unwrap_or_default();
                self.failed(Failure::Lost(why));
                retry_at = Instant::now() + backoff;
            }
            if conn.is_none() && Instant::now() >= retry_at {
                match self.connect().await {
                    Ok(c) => {
                        conn = Some(c);
                        backoff = MIN_BACKOFF;
                        self.connected();
                    }
                    Err(f) => {
                        self.failed(f);
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if let Some(c) = conn.as_mut() {
                if !self.pending.is_empty() {
                    match self.send(c).await {
                        Ok(()) => continue,
                        Err(f) => {
                            conn = None;
                            self.failed(f);
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
            self.caught_up();
            let wait = match &conn {
                Some(_) => POLL,
                None => retry_at.saturating_duration_since(Instant::now()).min(POLL),
            };
            let closed = conn.as_ref().map(|c| c.closed_wake.clone());
            tokio::select! {
                _ = self.deps.feed.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = async {
                    match closed {
                        Some(n) => n.notified().await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
        }
        if let Some(mut c) = conn {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.w.shutdown()).await;
        }
        self.deps.state.connected.store(false, Ordering::Relaxed);
    }

    /// Committed entries become framed lines; past the bound the oldest are dropped.
    fn fill(&mut self) {
        for c in self.deps.feed.take() {
            if let Some(m) = message(&self.header, c.seq, c.table, &c.json) {
                self.pending.push_back(frame(&m));
            }
        }
        let over = self.pending.len().saturating_sub(self.cfg.buffer_records);
        if over > 0 {
            self.pending.drain(..over);
            self.deps
                .state
                .dropped
                .fetch_add(over as u64, Ordering::Relaxed);
        }
        self.deps
            .state
            .buffered
            .store(self.pending.len() as u64, Ordering::Relaxed);
        let dropped = self.deps.state.dropped.load(Ordering::Relaxed);
        if dropped > self.drops_seen && !self.dropping {
            self.dropping = true;
            warn!(
                buffer = self.cfg.buffer_records,
                "SIEM stream: buffer full; the oldest lines are dropped"
            );
            self.event(
                "siem_drops",
                "failed",
                format!(
                    "buffer of {} lines full: the oldest are dropped ({dropped} so far)",
                    self.cfg.buffer_records
                ),
            );
        }
    }

    /// Everything buffered was sent: a run of drops is over.
    fn caught_up(&mut self) {
        if self.dropping && self.pending.is_empty() && self.outage.is_none() {
            self.dropping = false;
            let dropped = self.deps.state.dropped.load(Ordering::Relaxed);
            let run = dropped - self.drops_seen;
            self.drops_seen = dropped;
            info!(dropped = run, "SIEM stream: caught up; no more drops");
            self.event(
                "siem_drops",
                "ok",
                format!("caught up: {run} line(s) dropped ({dropped} since start)"),
            );
        }
    }

    async fn connect(&self) -> Result<Conn, Failure> {
        let (host, port) = (self.cfg.host.as_str(), self.cfg.port);
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Failure::Unreachable(format!("cannot resolve {host}: {e}")))?
            .collect();
        let mut last = Failure::Unreachable(format!("{host} resolves to no address"));
        for addr in addrs {
            let tcp = match self.deps.sockets.connect(addr, CONNECT_TIMEOUT).await {
                Ok(t) => t,
                Err(e) => {
                    last = Failure::Unreachable(format!("{addr}: {e}"));
                    continue;
                }
            };
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                self.tls.connect(self.server_name.clone(), tcp),
            )
            .await
            .map_err(|_| Failure::Handshake(format!("{addr}: timed out")))?
            .map_err(|e| classify(e, addr))?;
            let (mut r, w) = tokio::io::split(tls);
            let closed = Arc::new(AtomicBool::new(false));
            let closed_wake = Arc::new(Notify::new());
            let (c, n) = (closed.clone(), closed_wake.clone());
            let why = Arc::new(Mutex::new(None));
            let w2 = why.clone();
            let reader = tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let reason = loop {
                    match r.read(&mut buf).await {
                        Ok(0) => break "closed by the receiver".to_owned(),
                        Ok(_) => continue,
                        Err(e) => break format!("reading: {e}"),
                    }
                };
                *lock(&w2) = Some(reason);
                c.store(true, Ordering::Relaxed);
                n.notify_one();
            });
            return Ok(Conn {
                w,
                closed,
                closed_wake,
                why,
                reader,
            });
        }
        Err(last)
    }

    /// Writes the oldest lines, as many as one batch holds; they leave the buffer
    /// only once written.
    async fn send(&mut self, c: &mut Conn) -> Result<(), Failure> {
        let mut buf = Vec::with_capacity(BATCH_BYTES);
        let mut n = 0;
        for line in self.pending.iter().take(BATCH_LINES) {
            if n > 0 && buf.len() + line.len() > BATCH_BYTES {
                break;
            }
            buf.extend_from_slice(line);
            n += 1;
        }
        let wrote = tokio::time::timeout(WRITE_TIMEOUT, async {
            c.w.write_all(&buf).await?;
            c.w.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => {
                self.pending.drain(..n);
                let s = &self.deps.state;
                s.sent.fetch_add(n as u64, Ordering::Relaxed);
                s.buffered
                    .store(self.pending.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(e)) => Err(Failure::Lost(e.to_string())),
            Err(_) => Err(Failure::Lost(format!(
                "a write took longer than {WRITE_TIMEOUT:?}"
            ))),
        }
    }

    fn connected(&mut self) {
        let s = &self.deps.state;
        s.connected.store(true, Ordering::Relaxed);
        *lock(&s.last_error) = None;
        if self.outage.take().is_some() {
            info!(receiver = %self.cfg.address, "SIEM stream: connected again");
            self.event(
                "siem",
                "ok",
                format!(
                    "connected to {}; {} line(s) waiting are sent",
                    self.cfg.address,
                    self.pending.len()
                ),
            );
        } else {
            info!(receiver = %self.cfg.address, "SIEM stream: connected");
        }
    }

    fn failed(&mut self, f: Failure) {
        let s = &self.deps.state;
        s.connected.store(false, Ordering::Relaxed);
        s.failures.fetch_add(1, Ordering::Relaxed);
        let text = f.text();
        *lock(&s.last_error) = Some(text.clone());
        // Once per outage, and again if the receiver's certificate stops verifying.
        let before = self.outage.replace(f.kind());
        let untrusted = matches!(f, Failure::Untrusted(_));
        if before.is_none() || (untrusted && before != Some(f.kind())) {
            warn!(receiver = %self.cfg.address, error = %text, "SIEM stream: lines wait in the buffer and are sent when the receiver is back");
            self.event("siem", "failed", text);
        }
    }

    /// An `events` row (not awaited: it is streamed like the rest once committed).
    fn event(&self, kind: &'static str, outcome: &'static str, message: String) {
        let mut ev = EventRecord::new(&self.deps.origin, kind, outcome);
        ev.message = Some(message);
        if let Ok(json) = Record::Event(ev).to_json() {
            let _ = self.deps.events.send(Submission {
                table: Table::Events,
                time_us: micros::of(SystemTime::now()),
                json,
                done: None,
            });
        }
    }
}

/// A failed handshake: a certificate that does not verify is told apart.
fn classify(e: std::io::Error, addr: std::net::SocketAddr) -> Failure {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => Failure::Untrusted(format!("{addr}: {c:?}")),
        Some(other) => Failure::Handshake(format!("{addr}: {other}")),
        None => Failure::Handshake(format!("{addr}: {e}")),
    }
}

/// TLS toward the receiver: only `ca_file` is trusted (not the system roots), and
/// the optional client certificate is presented.
fn connector(cfg: &SiemSection) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.ca_file)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{}: records.siem.ca_file: {e}", cfg.ca_file.display()))?;
    for c in certs {
        roots.add(c).map_err(|e| {
            anyhow::anyhow!(
                "{}: records.siem.ca_file: certificate rejected: {e}",
                cfg.ca_file.display()
            )
        })?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "{}: records.siem.ca_file holds no certificate",
        cfg.ca_file.display()
    );
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match &cfg.client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let (chain, key) = crate::tls::client_identity(c)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            facility: 13,
            hostname: "ward-a".into(),
            app_name: "phigate".into(),
            procid: "42".into(),
        }
    }

    fn request_json() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "request_id": "r-1",
            "connection_id": "c-1",
            "end_time": 1_700_000_000_123_456i64,
            "destination": "patients-api",
            "user": "billing",
            "uid": 1001,
            "systemd_unit": "billing.service",
            "oidc_subject": "svc \"a\\b]\"",
            "method": "GET",
            "path": "/fhir/Patient/p:4f1c",
            "query": "patient=p:4f1c&name=REDACTED",
            "request_headers": {"x-request-id": "HDR-SECRET"},
            "request_body": "{\"name\":\"Jane\"}",
            "response_body": "BODY-SECRET",
            "error": "upstream said BODY-SECRET",
            "status": 200,
            "decision": "allow",
            "policy_ids": ["a", "b"],
            "approval_id": null,
            "approvers": [],
            "outcome": "ok",
        }))
        .unwrap()
    }

    #[test]
    fn a_request_line_is_rfc5424_with_escaped_params_and_only_listed_fields() {
        let m = message(&header(), 7, Table::Requests, &request_json()).unwrap();
        // facility 13 * 8 + informational 6
        assert!(
            m.starts_with(
                "<110>1 2023-11-14T22:13:20.123456Z ward-a phigate 42 requests [phigate@32473 seq=\"7\" request_id=\"r-1\" connection_id=\"c-1\" destination=\"patients-api\" uid=\"1001\" user=\"billing\" systemd_unit=\"billing.service\""
            ),
            "{m}"
        );
        assert!(m.contains(r#" oidc_subject="svc \"a\\b\]\"""#), "{m}");
        assert!(m.contains(" path=\"/fhir/Patient/p:4f1c\""), "{m}");
        assert!(
            m.contains(" status=\"200\" decision=\"allow\" policy_ids=\"a,b\""),
            "{m}"
        );
        // Null and empty values are left out, not sent as empty strings.
        assert!(
            !m.contains("approval_id") && !m.contains("approvers"),
            "{m}"
        );
        for secret in [
            "HDR-SECRET",
            "BODY-SECRET",
            "Jane",
            "REDACTED",
            "query",
            "error",
        ] {
            assert!(!m.contains(secret), "{secret} in {m}");
        }
        assert!(
            m.ends_with("] patients-api GET /fhir/Patient/p:4f1c allow -> 200 ok"),
            "{m}"
        );
    }

    #[test]
    fn escaping_covers_quote_backslash_and_bracket_only() {
        let mut out = String::new();
        escape_param(r#"a"b\c]d[e=f é"#, &mut out);
        assert_eq!(out, r#"a\"b\\c\]d[e=f é"#);
    }

    #[test]
    fn missing_time_and_header_fields_are_nilvalues() {
        let h = Header {
            facility: 16,
            hostname: header_field("", 255),
            app_name: header_field("ph igate", 48),
            procid: "1".into(),
        };
        let json = serde_json::to_vec(&serde_json::json!({
            "event_id": "e-1", "kind": "verify", "outcome": "failed",
        }))
        .unwrap();
        let m = message(&h, 1, Table::Events, &json).unwrap();
        // local0 * 8 + error 3
        assert!(
            m.starts_with("<131>1 - - ph_igate 1 events [phigate@32473 seq=\"1\" event_id=\"e-1\" kind=\"verify\" outcome=\"failed\"] verify failed"),
            "{m}"
        );
        assert!(message(&h, 1, Table::Events, b"[1]").is_none());
        assert!(message(&h, 1, Table::Events, b"not json").is_none());
    }

    #[test]
    fn framing_counts_octets_not_characters() {
        assert_eq!(frame("abc"), b"3 abc");
        let m = "<14>1 - - - - - - é";
        let f = frame(m);
        assert_eq!(f, format!("{} {m}", m.len()).into_bytes());
        assert!(f.starts_with(b"20 "), "{:?}", String::from_utf8_lossy(&f));
    }

    #[test]
    fn a_long_event_message_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let json = serde_json::to_vec(&serde_json::json!({
            "event_id": "e", "kind": "k", "outcome": "ok", "message": long,
        }))
        .unwrap();
        let m = message(&header(), 1, Table::Events, &json).unwrap();
        let v = m
            .split("message=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(v.len(), MAX_MESSAGE);
    }

    #[test]
    fn a_full_feed_drops_the_oldest_and_counts_them() {
        let state = Arc::new(SiemState::default());
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
}
