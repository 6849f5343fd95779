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
//! What a line holds is [`super::stream::metadata`], shared with the OTLP stream: a
//! fixed list of each table's columns (ids, who, where, the pseudonymized path, the
//! decision and the outcome), never bodies, header values, queries or raw patient
//! ids. The fields are SD-PARAMs of one SD-ELEMENT
//! `phigate@32473` (32473: the enterprise number RFC 5612 reserves for examples,
//! until phigate has its own), so a SIEM parses them without a custom parser; MSG
//! is a short summary for people.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;
use tracing::info;

use super::config::SiemSection;
use super::stream::{self, lock, Failure, Level, Reports, StreamDeps};
use super::{Origin, Table};
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

/// Where the stream goes, as `status` shows it.
pub fn destination(cfg: &SiemSection) -> String {
    format!("syslog+tls://{}", cfg.address)
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
fn severity(l: Level) -> u8 {
    match l {
        Level::Info => 6,
        Level::Notice => 5,
        Level::Warning => 4,
        Level::Error => 3,
    }
}

/// One record's syslog message (RFC 5424, unframed), from its journal encoding;
/// None when the JSON is not an object (the entry is skipped).
pub fn message(h: &Header, seq: u64, table: Table, json: &[u8]) -> Option<String> {
    let row = stream::row(json)?;
    let meta = stream::metadata(table, &row);
    let pri = u16::from(h.facility) * 8 + u16::from(severity(meta.level));
    let mut out = String::with_capacity(1024);
    let _ = write!(
        out,
        "<{pri}>1 {} {} {} {} {} [{SD_ID} seq=\"{seq}\"",
        timestamp(meta.time_us),
        h.hostname,
        h.app_name,
        h.procid,
        table.name(),
    );
    for (name, v) in &meta.fields {
        let Some(v) = stream::text(v).map(stream::clip) else {
            continue;
        };
        let _ = write!(out, " {name}=\"");
        escape_param(&v, &mut out);
        out.push('"');
    }
    out.push_str("] ");
    out.push_str(&meta.summary);
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

/// The sender: one thread, its own small runtime.
pub struct Siem {
    cfg: SiemSection,
    tls: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    header: Header,
    deps: StreamDeps,
    /// Framed lines not yet written, oldest first.
    pending: VecDeque<Vec<u8>>,
    reports: Reports,
}

impl Siem {
    pub fn new(cfg: &SiemSection, deps: StreamDeps) -> anyhow::Result<Siem> {
        let server_name = rustls_pki_types::ServerName::try_from(cfg.server_name.clone())
            .map_err(|e| anyhow::anyhow!("records.siem.server_name: {e}"))?;
        Ok(Siem {
            tls: tokio_rustls::TlsConnector::from(Arc::new(stream::client_tls(
                "records.siem",
                &cfg.ca_file,
                cfg.client_cert.as_ref(),
                &[],
            )?)),
            server_name,
            header: Header::new(cfg, &deps.origin),
            reports: Reports::new(
                "SIEM stream",
                ("siem", "siem_drops"),
                "line",
                cfg.address.clone(),
                cfg.buffer_records,
            ),
            cfg: cfg.clone(),
            deps,
            pending: VecDeque::new(),
        })
    }

    /// Runs until the store closes; then, if connected, what is buffered gets
    /// FLUSH_AT_STOP.
    pub fn run(mut self) {
        stream::run_on_own_runtime("SIEM", self.serve());
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
        stream::bound(&mut self.pending, self.cfg.buffer_records, &self.deps.state);
        self.reports.after_fill(&self.deps);
    }

    /// Everything buffered was sent: a run of drops is over.
    fn caught_up(&mut self) {
        self.reports.caught_up(&self.deps, self.pending.len());
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
            .map_err(|e| Failure::of_handshake(&e, addr))?;
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
        info!(receiver = %self.cfg.address, "SIEM stream: connected");
        self.reports.reached(&self.deps, self.pending.len());
    }

    fn failed(&mut self, f: Failure) {
        self.reports.failed(&self.deps, &f);
    }
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
        let long = "é".repeat(stream::MAX_VALUE);
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
        assert_eq!(v.len(), stream::MAX_VALUE);
    }
}
