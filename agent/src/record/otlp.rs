//! The OTLP logs stream: each durable record's metadata, as it is committed,
//! exported as OpenTelemetry log records over OTLP/HTTP (`POST /v1/logs`, a
//! protobuf `ExportLogsServiceRequest`, `application/x-protobuf`), over TLS
//! verified against `ca_file` only.
//!
//! The journal hands every committed batch to a [`Feed`] after the commit, as it
//! does for the SIEM stream, and goes on: the stream never holds back or fails a
//! request. One thread of its own turns entries into log records, which wait in a
//! bounded buffer while the receiver is slow or away (the oldest dropped and
//! counted when it is full), and exports them in batches of at most
//! `batch_records`, retrying with backoff (up to 5 s). A batch leaves the buffer
//! only once the receiver answered 2xx, so after a failure it is sent again: at
//! least once, never out of order. A 2xx with a partial success (records the
//! receiver rejected) is logged and counted; those records are not sent again.
//!
//! A log record holds what the SIEM line holds ([`super::stream::metadata`]):
//! attributes `phigate.<column>` for the listed columns that have a value, with
//! `phigate.table` and `phigate.seq` (the journal's sequence number); the body is
//! the summary, the time the row's, the severity INFO, WARN (denials, refusals,
//! rejected configuration) or ERROR (agent operations that failed). The resource
//! says `service.name = "phigate"` and `host.name`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{
    any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use serde_json::Value;
use tracing::{info, warn};

use super::config::OtlpSection;
use super::stream::{self, Failure, Level, Reports, StreamDeps};
use super::{Origin, Table};
use crate::sockets::SocketFactory;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One export, from connecting to the answer's last byte.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the sender looks at the stop flag while idle.
const POLL: Duration = Duration::from_millis(250);
/// At stop, what is buffered gets this long to be delivered.
const FLUSH_AT_STOP: Duration = Duration::from_secs(2);
/// The receiver's answer is read up to this size.
const RESPONSE_LIMIT: usize = 64 << 10;

/// Where the store exports: the section, and the agent's own outbound sockets
/// (exempt from the redirect, marked for the host's firewall).
#[derive(Debug, Clone)]
pub struct OtlpTarget {
    pub section: OtlpSection,
    pub sockets: SocketFactory,
}

/// Where the stream goes, as `status` shows it.
pub fn destination(cfg: &OtlpSection) -> String {
    cfg.url.clone()
}

/// OTLP severity numbers and texts (logs data model).
fn severity(l: Level) -> (i32, &'static str) {
    match l {
        Level::Info => (9, "INFO"),
        Level::Notice | Level::Warning => (13, "WARN"),
        Level::Error => (17, "ERROR"),
    }
}

fn string(s: impl Into<String>) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    }
}

fn attribute(key: impl Into<String>, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(value),
        ..Default::default()
    }
}

/// A column's value as an attribute value: numbers and booleans typed, lists as
/// arrays, long text cut like the SIEM's.
fn any_value(v: &Value) -> Option<AnyValue> {
    let value = match v {
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => any_value::Value::IntValue(i),
            None => any_value::Value::DoubleValue(n.as_f64()?),
        },
        Value::Array(a) => any_value::Value::ArrayValue(ArrayValue {
            values: a.iter().filter_map(any_value).collect(),
        }),
        other => return stream::text(other).map(|s| string(stream::clip(s))),
    };
    Some(AnyValue { value: Some(value) })
}

/// A refusal that sending the same batch again cannot change (OTLP/HTTP: only 429,
/// 502, 503 and 504 are retryable). Authentication and routing answers (401, 403,
/// 404) and timeouts (408) are kept for retry instead: they are the receiver's or
/// the configuration's to fix, and nothing should be lost meanwhile.
fn never_accepted(status: u16) -> bool {
    (400..500).contains(&status) && ![401, 403, 404, 408, 429].contains(&status)
}

/// One record's log record, from its journal encoding; None when the JSON is not
/// an object (the entry is skipped).
pub fn log_record(seq: u64, table: Table, json: &[u8], observed: SystemTime) -> Option<LogRecord> {
    let row = stream::row(json)?;
    let meta = stream::metadata(table, &row);
    let (severity_number, severity_text) = severity(meta.level);
    let mut attributes = Vec::with_capacity(meta.fields.len() + 2);
    attributes.push(attribute("phigate.table", string(table.name())));
    attributes.push(attribute(
        "phigate.seq",
        AnyValue {
            value: Some(any_value::Value::IntValue(
                i64::try_from(seq).unwrap_or(i64::MAX),
            )),
        },
    ));
    for (name, v) in &meta.fields {
        if let Some(v) = any_value(v) {
            attributes.push(attribute(format!("phigate.{name}"), v));
        }
    }
    let nanos = |us: i64| u64::try_from(us).unwrap_or(0).saturating_mul(1000);
    Some(LogRecord {
        time_unix_nano: meta.time_us.map(nanos).unwrap_or(0),
        observed_time_unix_nano: observed
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        severity_number,
        severity_text: severity_text.into(),
        body: Some(string(meta.summary)),
        attributes,
        ..Default::default()
    })
}

/// The resource every export is about: phigate on this host.
fn resource(origin: &Origin) -> Resource {
    Resource {
        attributes: vec![
            attribute("service.name", string("phigate")),
            attribute("service.version", string(env!("CARGO_PKG_VERSION"))),
            attribute("host.name", string(origin.host.to_string())),
        ],
        ..Default::default()
    }
}

/// One export's request body.
pub fn request(resource: &Resource, records: Vec<LogRecord>) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource.clone()),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "phigate".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// The sender: one thread, its own small runtime.
pub struct Otlp {
    cfg: OtlpSection,
    /// None for plain http (loopback only).
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// Where to connect, and the request's target and `Host`.
    host: String,
    port: u16,
    path: String,
    authority: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    resource: Resource,
    deps: StreamDeps,
    /// Log records not yet accepted, oldest first.
    pending: VecDeque<LogRecord>,
    /// A kept-alive connection to the receiver.
    conn: Option<SendRequest<Full<Bytes>>>,
    reports: Reports,
}

impl Otlp {
    pub fn new(cfg: &OtlpSection, deps: StreamDeps) -> anyhow::Result<Otlp> {
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("records.otlp.endpoint: {e}"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("records.otlp.endpoint: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match (&cfg.ca_file, https) {
            (_, false) => None,
            (None, true) => anyhow::bail!("records.otlp.ca_file: required for https"),
            (Some(ca), true) => {
                let config = stream::client_tls(
                    "records.otlp",
                    ca,
                    cfg.client_cert.as_ref(),
                    &[b"http/1.1"],
                )?;
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| anyhow::anyhow!("records.otlp.endpoint: {e}"))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        let headers = match &cfg.headers_file {
            None => Vec::new(),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    anyhow::anyhow!("{}: records.otlp.headers_file: {e}", p.display())
                })?;
                super::config::parse_headers(&text).map_err(|e| {
                    anyhow::anyhow!("{}: records.otlp.headers_file: {e}", p.display())
                })?
            }
        };
        Ok(Otlp {
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            path: uri.path().to_owned(),
            authority: uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_else(|| host.clone()),
            host,
            tls,
            headers,
            resource: resource(&deps.origin),
            reports: Reports::new(
                "OTLP stream",
                ("otlp", "otlp_drops"),
                "record",
                cfg.url.clone(),
                cfg.buffer_records,
            ),
            cfg: cfg.clone(),
            deps,
            pending: VecDeque::new(),
            conn: None,
        })
    }

    /// Runs until the store closes; then, if the receiver is answering, what is
    /// buffered gets FLUSH_AT_STOP.
    pub fn run(mut self) {
        stream::run_on_own_runtime("OTLP", self.serve());
    }

    async fn serve(&mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut retry_at = Instant::now();
        let mut stop_by: Option<Instant> = None;
        loop {
            self.fill();
            if self.deps.shutdown.load(Ordering::Relaxed) {
                // Answering: what waits gets FLUSH_AT_STOP; not: no new attempt holds
                // up the stop (the records are on disk).
                let by = *stop_by.get_or_insert_with(|| Instant::now() + FLUSH_AT_STOP);
                let up = self.deps.state.connected.load(Ordering::Relaxed);
                if self.pending.is_empty() || !up || Instant::now() >= by {
                    break;
                }
            }
            if !self.pending.is_empty() && Instant::now() >= retry_at {
                let sent = tokio::time::timeout(EXPORT_TIMEOUT, self.export())
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Lost(format!(
                            "no answer within {EXPORT_TIMEOUT:?}"
                        )))
                    });
                match sent {
                    Ok(()) => {
                        backoff = MIN_BACKOFF;
                        continue;
                    }
                    Err(f) => {
                        self.conn = None;
                        self.reports.failed(&self.deps, &f);
                        retry_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            self.reports.caught_up(&self.deps, self.pending.len());
            // Idle: until new records (or the stop flag); backing off: until the retry.
            let wait = if self.pending.is_empty() {
                POLL
            } else {
                retry_at
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(1), POLL)
            };
            tokio::select! {
                _ = self.deps.feed.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Committed entries become log records; past the bound the oldest are dropped.
    fn fill(&mut self) {
        let now = SystemTime::now();
        for c in self.deps.feed.take() {
            if let Some(r) = log_record(c.seq, c.table, &c.json, now) {
                self.pending.push_back(r);
            }
        }
        stream::bound(&mut self.pending, self.cfg.buffer_records, &self.deps.state);
        self.reports.after_fill(&self.deps);
    }

    /// Exports the oldest records, at most one batch; they leave the buffer only
    /// on a 2xx.
    async fn export(&mut self) -> Result<(), Failure> {
        let n = self.pending.len().min(self.cfg.batch_records);
        let body = request(
            &self.resource,
            self.pending.iter().take(n).cloned().collect(),
        )
        .encode_to_vec();
        let (status, answer) = self.post(body).await?;
        if !(200..300).contains(&status) {
            if never_accepted(status) {
                // OTLP/HTTP: such a batch must not be sent again as it is; it is
                // dropped and counted (the Parquet records still hold every row),
                // so one bad batch cannot stall the stream.
                self.pending.drain(..n);
                let s = &self.deps.state;
                s.rejected.fetch_add(n as u64, Ordering::Relaxed);
                s.buffered
                    .store(self.pending.len() as u64, Ordering::Relaxed);
                warn!(
                    status,
                    records = n,
                    receiver = %self.cfg.url,
                    "OTLP stream: the receiver refused a batch for good; it is dropped"
                );
            }
            return Err(Failure::Refused(status));
        }
        self.pending.drain(..n);
        let s = &self.deps.state;
        s.sent.fetch_add(n as u64, Ordering::Relaxed);
        s.buffered
            .store(self.pending.len() as u64, Ordering::Relaxed);
        // OTLP partial success: the receiver took the export but dropped some
        // records; sending them again would not change its mind.
        if let Some(p) = ExportLogsServiceResponse::decode(answer)
            .ok()
            .and_then(|r| r.partial_success)
            .filter(|p| p.rejected_log_records > 0)
        {
            let rejected = u64::try_from(p.rejected_log_records).unwrap_or(0);
            s.rejected.fetch_add(rejected, Ordering::Relaxed);
            warn!(
                rejected,
                receiver = %self.cfg.url,
                message = %p.error_message.chars().take(200).collect::<String>(),
                "OTLP stream: the receiver rejected some log records"
            );
        }
        self.reports.reached(&self.deps, self.pending.len());
        Ok(())
    }

    /// One POST on the kept-alive connection (a new one when it is gone).
    async fn post(&mut self, body: Vec<u8>) -> Result<(u16, Bytes), Failure> {
        let mut sender = match self.conn.take().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => self.connect().await?,
        };
        sender
            .ready()
            .await
            .map_err(|e| Failure::Lost(e.to_string()))?;
        let mut req = Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                header::USER_AGENT,
                concat!("phigate/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Lost(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Lost(e.to_string()))?;
        let status = resp.status().as_u16();
        let answer = http_body_util::Limited::new(resp.into_body(), RESPONSE_LIMIT)
            .collect()
            .await
            .map_err(|e| Failure::Lost(format!("reading the answer: {e}")))?
            .to_bytes();
        self.conn = Some(sender);
        Ok((status, answer))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let (host, port) = (self.host.as_str(), self.port);
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
            return match &self.tls {
                None => handshake(TokioIo::new(tcp)).await,
                Some((tls, name)) => {
                    let s = tls
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| Failure::of_handshake(&e, addr))?;
                    handshake(TokioIo::new(s)).await
                }
            };
        }
        Err(last)
    }
}

async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>, Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| Failure::Lost(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            info!(error = %e, "OTLP stream: connection to the receiver ended");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_cannot_change_drop_a_batch() {
        for s in [400, 413, 415, 422] {
            assert!(never_accepted(s), "{s}");
        }
        for s in [401, 403, 404, 408, 429, 500, 502, 503, 504, 200] {
            assert!(!never_accepted(s), "{s}");
        }
    }

    fn request_json() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "request_id": "r-1",
            "end_time": 1_700_000_000_123_456i64,
            "destination": "patients-api",
            "uid": 1001,
            "method": "GET",
            "path": "/fhir/Patient/p:4f1c",
            "query": "patient=p:4f1c&name=REDACTED",
            "request_headers": {"x-request-id": "HDR-SECRET"},
            "response_body": "BODY-SECRET",
            "error": "upstream said BODY-SECRET",
            "status": 403,
            "decision": "deny",
            "policy_ids": ["a", "b"],
            "approval_id": null,
            "approvers": [],
            "outcome": "denied",
        }))
        .unwrap()
    }

    fn attr<'a>(r: &'a LogRecord, k: &str) -> Option<&'a any_value::Value> {
        r.attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[test]
    fn a_request_becomes_one_log_record_with_typed_listed_attributes_only() {
        let observed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let r = log_record(7, Table::Requests, &request_json(), observed).unwrap();
        assert_eq!(r.time_unix_nano, 1_700_000_000_123_456_000);
        assert_eq!(r.observed_time_unix_nano, 1_800_000_000_000_000_000);
        assert_eq!((r.severity_number, r.severity_text.as_str()), (13, "WARN"));
        assert_eq!(
            r.body.as_ref().and_then(|b| b.value.clone()),
            Some(any_value::Value::StringValue(
                "patients-api GET /fhir/Patient/p:4f1c deny -> 403 denied".into()
            ))
        );
        assert_eq!(
            attr(&r, "phigate.table"),
            Some(&any_value::Value::StringValue("requests".into()))
        );
        assert_eq!(
            attr(&r, "phigate.seq"),
            Some(&any_value::Value::IntValue(7))
        );
        assert_eq!(
            attr(&r, "phigate.status"),
            Some(&any_value::Value::IntValue(403))
        );
        assert!(matches!(
            attr(&r, "phigate.policy_ids"),
            Some(any_value::Value::ArrayValue(a)) if a.values.len() == 2
        ));
        for absent in [
            "approval_id",
            "approvers",
            "query",
            "error",
            "response_body",
        ] {
            assert!(attr(&r, &format!("phigate.{absent}")).is_none(), "{absent}");
        }
        let bytes = request(&resource(&Origin::this_host()), vec![r]).encode_to_vec();
        let text = String::from_utf8_lossy(&bytes);
        for secret in ["HDR-SECRET", "BODY-SECRET", "REDACTED"] {
            assert!(!text.contains(secret), "{secret}");
        }
        let back = ExportLogsServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.resource_logs[0].scope_logs[0].log_records.len(), 1);
    }

    #[test]
    fn severities_follow_the_record() {
        let ok = br#"{"kind":"verify","outcome":"ok"}"#;
        let failed = br#"{"kind":"verify","outcome":"failed"}"#;
        let now = SystemTime::now();
        assert_eq!(
            log_record(1, Table::Events, ok, now)
                .unwrap()
                .severity_number,
            9
        );
        assert_eq!(
            log_record(1, Table::Events, failed, now)
                .unwrap()
                .severity_number,
            17
        );
        assert!(log_record(1, Table::Events, b"[1]", now).is_none());
    }
}
