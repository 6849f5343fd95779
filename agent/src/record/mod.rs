//! Records: one per connection (and, with the HTTP path, one per request).
//!
//! Stages hand finished records to a [`RecordSink`]. The sink is the only place that
//! knows where records go, so the durable tamper-evident writer replaces the
//! JSON-lines sink without touching the data path.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::identity::Workload;

pub mod pseudonym;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides finished normally.
    Closed,
    /// Accepted on the listener but not redirected by our programs: refused.
    NotRedirected,
    /// The original destination refused or could not be reached.
    UpstreamUnreachable,
    UpstreamTimeout,
    /// No bytes either way for longer than the idle timeout.
    IdleTimeout,
    /// The maximum connection lifetime (automatic logoff) was reached.
    LifetimeExceeded,
    /// The agent was shutting down and the drain bound elapsed.
    Drained,
    /// An I/O error on either side.
    Error,
    /// An `https` destination received bytes that are not a TLS ClientHello.
    NotTls,
    /// The TLS handshake with the client failed or timed out.
    TlsHandshakeFailed,
    /// Inside TLS (or on an `http` destination), the bytes were not HTTP.
    NotHttp,
    /// A passthrough host: relayed as TCP without inspection.
    Uninspected,
    /// Records could not be written: the connection was refused (fail closed).
    RecordsUnavailable,
}

/// One row of the `connections` table.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub connection_id: String,
    #[serde(with = "rfc3339")]
    pub start_time: SystemTime,
    #[serde(with = "rfc3339")]
    pub end_time: SystemTime,
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
    pub outcome: Outcome,
    pub error: Option<String>,
}

/// One row of the `requests` table: an HTTP exchange as phigate saw and decided it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub connection_id: String,
    #[serde(with = "rfc3339")]
    pub start_time: SystemTime,
    #[serde(with = "rfc3339")]
    pub end_time: SystemTime,
    pub destination: String,
    pub original_dst: String,
    pub client_addr: String,
    #[serde(flatten)]
    pub workload: Arc<Workload>,
    /// TLS as negotiated with the client (None for plain HTTP destinations).
    pub sni: Option<String>,
    pub tls_version: Option<String>,
    pub alpn: Option<String>,
    /// HTTP version the client spoke, and the one used upstream.
    pub http_version: String,
    pub upstream_http_version: Option<String>,
    pub upstream_tls_version: Option<String>,
    pub upstream_cert_subject: Option<String>,
    pub method: String,
    pub authority: Option<String>,
    /// The request path with patient ids replaced by their pseudonyms.
    pub path: String,
    /// Pseudonyms of the patient ids the request named (see `pseudonym`).
    pub patient_refs: Vec<String>,
    /// Response status sent to the client (phigate's own error answers included).
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Time until the response head was ready, and until the response body ended.
    pub latency_ms: f64,
    pub duration_ms: f64,
    /// `allow` until the policy stage decides otherwise.
    pub decision: &'static str,
    /// True when the connection switched protocols (WebSocket): bytes after the
    /// upgrade are counted but not inspected.
    pub upgraded: bool,
    /// How the exchange ended: `complete`, `client_aborted`, `upstream_error`, ...
    pub outcome: &'static str,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write {table} record to {path}: {source}")]
pub struct RecordError {
    pub table: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Where finished records go. Implementations must be cheap to call from the data
/// path and must report failure: a record that cannot be written is an error, not a
/// warning (fail closed is decided by the caller).
pub trait RecordSink: Send + Sync + 'static {
    fn connection(&self, rec: &ConnectionRecord) -> Result<(), RecordError>;
    fn request(&self, rec: &RequestRecord) -> Result<(), RecordError>;
    /// False while records cannot be written: new exchanges are then refused (fail
    /// closed). Implementations re-check the condition, so this recovers by itself.
    fn writable(&self) -> bool {
        true
    }
}

/// Appends each record as one JSON line to `<dir>/<table>.jsonl` (files 0600).
pub struct JsonLinesSink {
    dir: PathBuf,
    files: Mutex<HashMap<&'static str, File>>,
    /// Set by a failed write, cleared when writing works again.
    failing: AtomicBool,
    /// Free space is checked at most every SPACE_CHECK_MS, so a filling disk refuses
    /// new exchanges before a record is lost, at the cost of one statvfs per period.
    space_checked_ms: AtomicU64,
    space_ok: AtomicBool,
    t0: std::time::Instant,
}

const SPACE_CHECK_MS: u64 = 100;

/// Free space below which the sink does not consider itself writable again.
const MIN_FREE_BYTES: u64 = 1 << 20;

impl JsonLinesSink {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(JsonLinesSink {
            dir,
            files: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
            space_checked_ms: AtomicU64::new(0),
            space_ok: AtomicBool::new(true),
            t0: std::time::Instant::now(),
        })
    }

    fn append<T: Serialize>(&self, table: &'static str, rec: &T) -> Result<(), RecordError> {
        let path = self.dir.join(format!("{table}.jsonl"));
        let err = |source| RecordError {
            table,
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(rec).map_err(|e| err(e.into()))?;
        line.push(b'\n');
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let file = match files.get_mut(table) {
            Some(f) => f,
            None => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(err)?;
                files.entry(table).or_insert(f)
            }
        };
        // One write per line: concurrent appenders never interleave within a line. A
        // failed write (disk full) is cut back so no torn line stays behind.
        let before = file.metadata().map(|m| m.len()).ok();
        match file.write_all(&line) {
            Ok(()) => {
                self.failing.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if let Some(len) = before {
                    let _ = file.set_len(len);
                }
                self.failing.store(true, Ordering::Relaxed);
                Err(err(e))
            }
        }
    }

    fn has_room(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()) >= MIN_FREE_BYTES)
            .unwrap_or(false)
    }

    /// The cached free-space verdict, refreshed every SPACE_CHECK_MS.
    fn room_cached(&self) -> bool {
        let now = self.t0.elapsed().as_millis() as u64 + SPACE_CHECK_MS;
        let last = self.space_checked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SPACE_CHECK_MS
            && self
                .space_checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.space_ok.store(self.has_room(), Ordering::Relaxed);
        }
        self.space_ok.load(Ordering::Relaxed)
    }

    /// After a failure: writable again once the directory accepts files and has room.
    fn probe(&self) -> bool {
        let room = self.has_room();
        let opens = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.dir.join("requests.jsonl"))
            .is_ok();
        room && opens
    }
}

impl RecordSink for JsonLinesSink {
    fn connection(&self, rec: &ConnectionRecord) -> Result<(), RecordError> {
        self.append("connections", rec)
    }

    fn request(&self, rec: &RequestRecord) -> Result<(), RecordError> {
        self.append("requests", rec)
    }

    fn writable(&self) -> bool {
        if !self.failing.load(Ordering::Relaxed) {
            return self.room_cached();
        }
        if self.probe() {
            self.failing.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// A new, time-ordered id (UUIDv7) for connections and requests.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let dt = OffsetDateTime::from(*t);
        let text = dt.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_sink_writes_flat_rows() {
        let dir = tempfile::tempdir().unwrap();
        let sink = JsonLinesSink::new(dir.path().to_owned()).unwrap();
        let now = SystemTime::now();
        let rec = ConnectionRecord {
            connection_id: new_id(),
            start_time: now,
            end_time: now,
            duration_ms: 1.5,
            destination: Some("patients-api".into()),
            protocol: Some("tcp"),
            original_dst: Some("127.0.0.2:9443".into()),
            client_addr: "127.0.0.1:40000".into(),
            workload: Some(Arc::new(Workload {
                pid: 42,
                comm: "curl".into(),
                ..Workload::default()
            })),
            bytes_up: 10,
            bytes_down: 20,
            sni: None,
            tls_version: None,
            alpn: None,
            requests: 0,
            outcome: Outcome::Closed,
            error: None,
        };
        sink.connection(&rec).unwrap();
        sink.connection(&rec).unwrap();
        let text = std::fs::read_to_string(dir.path().join("connections.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["pid"], 42);
        assert_eq!(rows[0]["comm"], "curl");
        assert_eq!(rows[0]["outcome"], "closed");
        assert_eq!(rows[0]["original_dst"], "127.0.0.2:9443");
        assert!(rows[0]["start_time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("connections.jsonl"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
