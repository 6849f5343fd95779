//! `[records]` of phigate.toml: durability, files, retention and what records
//! hold, parsed with the shared [`TomlSource`].
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, TomlSource};

/// How records are kept: durability, files, retention, and what they hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordsSection {
    /// `strict`, or `batched` with its window (`batch_window_ms`).
    pub durability: Durability,
    /// A Parquet file is closed at this many rows, megabytes of records, or age.
    pub rotate_rows: usize,
    pub rotate_bytes: usize,
    pub rotate_age: Duration,
    pub row_group_rows: usize,
    /// Files older than this are deleted (each deletion recorded); 0 keeps everything.
    pub retention_days: u32,
    /// The agent verifies its records this often (an `events` row each time); None: never.
    pub verify_every: Option<Duration>,
    /// Path segments after which the next segment is a patient id, recorded only as a
    /// keyed pseudonym (FHIR: `Patient/{id}`).
    pub patient_path_segments: Vec<String>,
    /// Query parameters whose values are patient ids (`patient`, `subject`).
    pub patient_query_params: Vec<String>,
    /// Request and response headers copied into records (lower case). Credentials
    /// (`authorization`, `cookie`, ...) are recorded as their scheme only.
    pub headers: Vec<String>,
    /// `[records.shipping]`: sealed files, manifests and heads copied off the host.
    pub shipping: Option<ShippingSection>,
    /// `[records.siem]`: each durable record's metadata streamed as syslog over TLS.
    pub siem: Option<SiemSection>,
    /// `[records.otlp]`: the same metadata exported as OTLP logs over HTTPS.
    pub otlp: Option<OtlpSection>,
}

/// Where and how record metadata is exported as OTLP logs: protobuf
/// `ExportLogsServiceRequest`s POSTed over HTTPS (OTLP/HTTP), the receiver verified
/// against `ca_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSection {
    /// The URL exports are POSTed to: `https://...` (plain `http://` only to a
    /// loopback address); a URL without a path gets OTLP's `/v1/logs`.
    pub url: String,
    /// The receiver's certificate must chain to one of these (PEM); nothing else is
    /// trusted, and there is no switch to skip verification. Required for https.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: the chain phigate presents and its key (0600).
    pub client_cert: Option<crate::config::upstream_auth::ClientCert>,
    /// A file (0600) of `Name: value` lines sent with every export (an API key);
    /// its values are never logged.
    pub headers_file: Option<PathBuf>,
    /// Records held while the receiver is slow or away; past this the oldest are
    /// dropped (and counted).
    pub buffer_records: usize,
    /// At most this many log records per export.
    pub batch_records: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOtlp {
    endpoint: Spanned<String>,
    ca_file: Option<Spanned<PathBuf>>,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
    headers_file: Option<Spanned<PathBuf>>,
    buffer_records: Option<Spanned<u64>>,
    batch_records: Option<Spanned<u64>>,
}

const DEFAULT_OTLP_BATCH: u64 = 512;
const MAX_OTLP_BATCH: u64 = 10_000;

/// A headers file's `Name: value` lines (blank lines and `#` comments skipped);
/// the error names a line, never a value.
pub(crate) fn parse_headers(
    text: &str,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| format!("line {}: {what}", i + 1);
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("expected `Name: value`"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| bad("not a header name"))?;
        if matches!(
            name.as_str(),
            "host" | "content-type" | "content-length" | "transfer-encoding" | "connection"
        ) {
            return Err(bad("phigate sets this header itself"));
        }
        let mut value = http::HeaderValue::from_str(value.trim())
            .map_err(|_| bad("the value is not header text"))?;
        value.set_sensitive(true);
        out.push((name, value));
    }
    Ok(out)
}

/// A headers file: 0600, and every line a header.
fn headers_file_problem(path: &std::path::Path) -> Option<String> {
    let owner = crate::config::upstream_auth::agent_uid();
    if let Some(m) = crate::config::upstream_auth::secret_file_problem(path, owner) {
        return Some(m);
    }
    match std::fs::read_to_string(path) {
        Err(e) => Some(format!("{}: cannot read: {e}", path.display())),
        Ok(t) => parse_headers(&t)
            .err()
            .map(|e| format!("{}: {e}", path.display())),
    }
}

fn otlp_section(src: &TomlSource<'_>, raw: RawOtlp) -> Result<OtlpSection, ConfigError> {
    let key = |k: &str| Some(format!("records.otlp.{k}"));
    let endpoint = raw.endpoint.get_ref().trim();
    let bad_endpoint = |what: String| src.err(Some(raw.endpoint.span()), key("endpoint"), what);
    if let Some(what) = endpoint_problem(endpoint) {
        return Err(bad_endpoint(what.into()));
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| bad_endpoint(format!("not a URL: {e}")))?;
    if uri.host().is_none() || uri.query().is_some() {
        return Err(bad_endpoint(
            "expected a URL with a host and no query, e.g. \"https://otel.example.org:4318\""
                .into(),
        ));
    }
    let url = match uri.path() {
        "" | "/" => format!("{}/v1/logs", endpoint.trim_end_matches('/')),
        _ => endpoint.to_owned(),
    };
    let https = uri.scheme_str() == Some("https");
    let ca_file = match raw.ca_file {
        None if https => {
            return Err(src.err(
                Some(raw.endpoint.span()),
                key("ca_file"),
                "required for an https endpoint: the CA certificate(s) the receiver's certificate must chain to".into(),
            ))
        }
        None => None,
        Some(c) => {
            let path = src.resolve(c.get_ref().clone());
            if let Some(m) = certs_problem(&path) {
                return Err(src.err(Some(c.span()), key("ca_file"), m));
            }
            Some(path)
        }
    };
    let client_cert = client_cert(
        src,
        "records.otlp",
        raw.client_cert_file,
        raw.client_key_file,
    )?;
    let headers_file = match raw.headers_file {
        None => None,
        Some(h) => {
            let path = src.resolve(h.get_ref().clone());
            if let Some(m) = headers_file_problem(&path) {
                return Err(src.err(Some(h.span()), key("headers_file"), m));
            }
            Some(path)
        }
    };
    Ok(OtlpSection {
        url,
        ca_file,
        client_cert,
        headers_file,
        buffer_records: bounded(
            src,
            "records.otlp.buffer_records",
            raw.buffer_records,
            DEFAULT_SIEM_BUFFER,
            MAX_SIEM_BUFFER,
        )?,
        batch_records: bounded(
            src,
            "records.otlp.batch_records",
            raw.batch_records,
            DEFAULT_OTLP_BATCH,
            MAX_OTLP_BATCH,
        )?,
    })
}

/// A count between 1 and `max`, `default` when left out.
fn bounded(
    src: &TomlSource<'_>,
    key: &str,
    v: Option<Spanned<u64>>,
    default: u64,
    max: u64,
) -> Result<usize, ConfigError> {
    Ok(match v {
        None => default,
        Some(b) if !(1..=max).contains(b.get_ref()) => {
            return Err(src.err(
                Some(b.span()),
                Some(key.to_owned()),
                format!("must be between 1 and {max}"),
            ))
        }
        Some(b) => b.into_inner(),
    } as usize)
}

/// `client_cert_file` and `client_key_file` of `section`: both or neither, the
/// certificate PEM, the key 0600.
fn client_cert(
    src: &TomlSource<'_>,
    section: &str,
    cert: Option<Spanned<PathBuf>>,
    key_file: Option<Spanned<PathBuf>>,
) -> Result<Option<crate::config::upstream_auth::ClientCert>, ConfigError> {
    let key = |k: &str| Some(format!("{section}.{k}"));
    match (cert, key_file) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => {
            let cert = src.resolve(c.get_ref().clone());
            if let Some(m) = certs_problem(&cert) {
                return Err(src.err(Some(c.span()), key("client_cert_file"), m));
            }
            let keyf = src.resolve(k.get_ref().clone());
            let owner = crate::config::upstream_auth::agent_uid();
            if let Some(m) = crate::config::upstream_auth::secret_file_problem(&keyf, owner) {
                return Err(src.err(Some(k.span()), key("client_key_file"), m));
            }
            Ok(Some(crate::config::upstream_auth::ClientCert {
                cert,
                key: keyf,
            }))
        }
        (c, k) => {
            let span = c.map(|c| c.span()).or(k.map(|k| k.span()));
            Err(src.err(
                span,
                key("client_cert_file"),
                "give both client_cert_file and client_key_file, or neither".into(),
            ))
        }
    }
}

/// Where and how record metadata is streamed: RFC 5424 syslog over TLS (RFC 5425)
/// to a SIEM's receiver, verified against `ca_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiemSection {
    /// `host:port` as written (a name is resolved at each connect), and its parts.
    pub address: String,
    pub host: String,
    pub port: u16,
    /// The receiver's certificate must chain to one of these (PEM); nothing else is
    /// trusted, and there is no switch to skip verification.
    pub ca_file: PathBuf,
    /// The name (DNS or IP) the certificate must be for; default: `host`.
    pub server_name: String,
    /// Mutual TLS: the chain phigate presents and its key (0600).
    pub client_cert: Option<crate::config::upstream_auth::ClientCert>,
    /// RFC 5424 APP-NAME and facility code (0..=23).
    pub app_name: String,
    pub facility: u8,
    /// Lines held while the receiver is slow or away; past this the oldest are
    /// dropped (and counted).
    pub buffer_records: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSiem {
    address: Spanned<String>,
    ca_file: Spanned<PathBuf>,
    server_name: Option<Spanned<String>>,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
    app_name: Option<Spanned<String>>,
    facility: Option<Spanned<String>>,
    buffer_records: Option<Spanned<u64>>,
}

/// RFC 5424's facility names (section 6.2.1), by code; `audit` is "log audit".
pub(crate) const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

const DEFAULT_SIEM_BUFFER: u64 = 100_000;
const MAX_SIEM_BUFFER: u64 = 10_000_000;

/// `host:port`, IPv6 in brackets.
fn split_address(a: &str) -> Option<(String, u16)> {
    let (host, port) = a.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Why a PEM certificate file cannot be used, if it cannot.
fn certs_problem(path: &std::path::Path) -> Option<String> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    match CertificateDer::pem_file_iter(path) {
        Err(e) => Some(format!("{}: cannot read: {e}", path.display())),
        Ok(it) => match it.collect::<Result<Vec<_>, _>>() {
            Err(e) => Some(format!("{}: not PEM certificates: {e}", path.display())),
            Ok(v) if v.is_empty() => Some(format!("{}: holds no certificate", path.display())),
            Ok(_) => None,
        },
    }
}

fn siem_section(src: &TomlSource<'_>, raw: RawSiem) -> Result<SiemSection, ConfigError> {
    let key = |k: &str| Some(format!("records.siem.{k}"));
    let (host, port) = split_address(raw.address.get_ref()).ok_or_else(|| {
        src.err(
            Some(raw.address.span()),
            key("address"),
            "expected HOST:PORT (an IPv6 address in brackets), e.g. \"siem.example.org:6514\""
                .into(),
        )
    })?;
    let ca_file = src.resolve(raw.ca_file.get_ref().clone());
    if let Some(m) = certs_problem(&ca_file) {
        return Err(src.err(Some(raw.ca_file.span()), key("ca_file"), m));
    }
    let server_name = match raw.server_name {
        None => host.clone(),
        Some(n) => {
            if rustls_pki_types::ServerName::try_from(n.get_ref().as_str()).is_err() {
                return Err(src.err(
                    Some(n.span()),
                    key("server_name"),
                    "not a DNS name or IP address".into(),
                ));
            }
            n.into_inner()
        }
    };
    if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        return Err(src.err(
            Some(raw.address.span()),
            key("address"),
            "its host is not a DNS name or IP address: set server_name".into(),
        ));
    }
    let client_cert = client_cert(
        src,
        "records.siem",
        raw.client_cert_file,
        raw.client_key_file,
    )?;
    let app_name = match raw.app_name {
        None => "phigate".to_owned(),
        Some(a) => {
            let ok = (1..=48).contains(&a.get_ref().len())
                && a.get_ref().bytes().all(|b| (33..=126).contains(&b));
            if !ok {
                return Err(src.err(
                    Some(a.span()),
                    key("app_name"),
                    "1 to 48 printable ASCII characters, no spaces (RFC 5424 APP-NAME)".into(),
                ));
            }
            a.into_inner()
        }
    };
    let facility = match raw.facility {
        None => 13,
        Some(f) => match FACILITIES.iter().position(|n| *n == f.get_ref().as_str()) {
            Some(i) => i as u8,
            None => {
                return Err(src.err(
                    Some(f.span()),
                    key("facility"),
                    format!(
                        "`{}`: expected one of {}",
                        f.get_ref(),
                        FACILITIES.join(", ")
                    ),
                ))
            }
        },
    };
    let buffer_records = bounded(
        src,
        "records.siem.buffer_records",
        raw.buffer_records,
        DEFAULT_SIEM_BUFFER,
        MAX_SIEM_BUFFER,
    )?;
    Ok(SiemSection {
        address: raw.address.into_inner(),
        host,
        port,
        ca_file,
        server_name,
        client_cert,
        app_name,
        facility,
        buffer_records,
    })
}

/// Where and how sealed records are shipped: S3-compatible object storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShippingSection {
    /// `https://...`; plain `http://` only to a loopback address (a local gateway).
    pub endpoint: String,
    pub bucket: String,
    /// Objects go under `<prefix>/<host>/<table>/date=YYYY-MM-DD/`.
    pub prefix: String,
    pub region: String,
    /// Files (0600) holding the access key id and the secret; without them the
    /// environment's `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or the instance's).
    pub access_key_file: Option<PathBuf>,
    pub secret_key_file: Option<PathBuf>,
    /// Past this long with a sealed file not shipped, new exchanges are refused as
    /// when records cannot be written; None: never.
    pub max_unshipped: Option<Duration>,
    /// Server-side encryption asked for on every object; None: the bucket's default.
    pub sse: Option<Sse>,
    /// S3 Object Lock: every object is put with compliance-mode retention for this
    /// many days (nobody, the root account included, can delete or overwrite it
    /// before then). None: the bucket's default retention, if any.
    pub object_lock_days: Option<u32>,
    /// At start, when the records here are behind what was shipped (files deleted,
    /// an older head restored, a table gone): refuse to start, or start and report.
    pub anchor_at_start: AnchorAtStart,
}

/// What the agent does when it starts behind its off-host anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnchorAtStart {
    /// Fail closed: the agent does not start, naming what is missing (the default).
    #[default]
    Refuse,
    /// Start, and report it (log, `events` row, `status`, metric).
    Warn,
}

/// Server-side encryption of shipped objects (`sse` in `[records.shipping]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// `AES256`: keys managed by the store (SSE-S3).
    Aes256,
    /// `aws:kms`: a KMS key, the given one or the account's default for S3.
    Kms { key_id: Option<String> },
}

impl Sse {
    /// The `x-amz-server-side-encryption` value.
    pub fn header(&self) -> &'static str {
        match self {
            Sse::Aes256 => "AES256",
            Sse::Kms { .. } => "aws:kms",
        }
    }
}

/// The longest Object Lock retention accepted (100 years, as S3 allows).
pub(crate) const MAX_OBJECT_LOCK_DAYS: u64 = 36_500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShipping {
    endpoint: Spanned<String>,
    bucket: String,
    prefix: Option<String>,
    region: Option<String>,
    access_key_file: Option<PathBuf>,
    secret_key_file: Option<PathBuf>,
    max_unshipped_secs: Option<Spanned<u64>>,
    sse: Option<Spanned<String>>,
    sse_kms_key_id: Option<Spanned<String>>,
    object_lock_days: Option<Spanned<u64>>,
    anchor_at_start: Option<Spanned<String>>,
}

/// What is wrong with an object store endpoint, if anything: https, or plain http
/// to a loopback address only (a local gateway); records never cross a network in
/// the clear.
pub(crate) fn endpoint_problem(endpoint: &str) -> Option<&'static str> {
    match endpoint.split_once("://") {
        Some(("https", rest)) if !rest.is_empty() => None,
        Some(("http", rest)) => {
            let host = rest.split('/').next().unwrap_or("");
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
            (!loopback).then_some("plain http only to a loopback address; use https")
        }
        _ => Some("expected an https:// URL"),
    }
}

fn shipping_section(
    src: &TomlSource<'_>,
    raw: RawShipping,
) -> Result<ShippingSection, ConfigError> {
    let endpoint = raw.endpoint.get_ref().trim_end_matches('/').to_owned();
    let bad = |what: &str| {
        src.err(
            Some(raw.endpoint.span()),
            Some("records.shipping.endpoint".into()),
            what.into(),
        )
    };
    if let Some(what) = endpoint_problem(&endpoint) {
        return Err(bad(what));
    }
    if raw.access_key_file.is_some() != raw.secret_key_file.is_some() {
        return Err(src.err(
            None,
            Some("records.shipping".into()),
            "access_key_file and secret_key_file go together".into(),
        ));
    }
    let max_unshipped = match raw.max_unshipped_secs {
        None => None,
        Some(v) if *v.get_ref() == 0 => {
            return Err(src.err(
                Some(v.span()),
                Some("records.shipping.max_unshipped_secs".into()),
                "must be greater than 0 (leave it out for never)".into(),
            ))
        }
        Some(v) => Some(Duration::from_secs(v.into_inner())),
    };
    let key = |k: &str| Some(format!("records.shipping.{k}"));
    let sse = match &raw.sse {
        None => None,
        Some(v) => match v.get_ref().as_str() {
            "AES256" => Some(Sse::Aes256),
            "aws:kms" => Some(Sse::Kms {
                key_id: raw.sse_kms_key_id.as_ref().map(|k| k.get_ref().clone()),
            }),
            other => {
                return Err(src.err(
                    Some(v.span()),
                    key("sse"),
                    format!("`{other}`: expected \"AES256\" or \"aws:kms\""),
                ))
            }
        },
    };
    if let Some(k) = &raw.sse_kms_key_id {
        if !matches!(sse, Some(Sse::Kms { .. })) {
            return Err(src.err(
                Some(k.span()),
                key("sse_kms_key_id"),
                "a KMS key goes with sse = \"aws:kms\"".into(),
            ));
        }
        if k.get_ref().trim().is_empty() {
            return Err(src.err(
                Some(k.span()),
                key("sse_kms_key_id"),
                "empty; leave it out for the account's default key".into(),
            ));
        }
    }
    let object_lock_days = match raw.object_lock_days {
        None => None,
        Some(v) if !(1..=MAX_OBJECT_LOCK_DAYS).contains(v.get_ref()) => {
            return Err(src.err(
                Some(v.span()),
                key("object_lock_days"),
                format!("must be between 1 and {MAX_OBJECT_LOCK_DAYS} (leave it out for the bucket's default)"),
            ))
        }
        Some(v) => Some(v.into_inner() as u32),
    };
    let anchor_at_start = match raw.anchor_at_start {
        None => AnchorAtStart::Refuse,
        Some(v) => match v.get_ref().as_str() {
            "refuse" => AnchorAtStart::Refuse,
            "warn" => AnchorAtStart::Warn,
            other => {
                return Err(src.err(
                    Some(v.span()),
                    key("anchor_at_start"),
                    format!("`{other}`: expected \"refuse\" or \"warn\""),
                ))
            }
        },
    };
    Ok(ShippingSection {
        endpoint,
        bucket: raw.bucket,
        prefix: raw.prefix.unwrap_or_default().trim_matches('/').to_owned(),
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        access_key_file: raw.access_key_file.map(|p| src.resolve(p)),
        secret_key_file: raw.secret_key_file.map(|p| src.resolve(p)),
        max_unshipped,
        sse,
        object_lock_days,
        anchor_at_start,
    })
}

/// When a record counts as durable (the journal's rule, set by `[records]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged after fsync: a response is released only once its record is on disk.
    Strict,
    /// Acknowledged when queued; fsync at least every `window`.
    Batched { window: Duration },
}

/// The fsync window of `batched` durability unless `batch_window_ms` says otherwise.
const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(200);

impl Default for RecordsSection {
    fn default() -> Self {
        RecordsSection {
            durability: Durability::Strict,
            rotate_rows: 100_000,
            rotate_bytes: 64 << 20,
            rotate_age: Duration::from_secs(60),
            row_group_rows: 10_000,
            retention_days: 2190,
            verify_every: Some(Duration::from_secs(86_400)),
            patient_path_segments: vec!["Patient".into()],
            patient_query_params: vec!["patient".into(), "subject".into()],
            headers: [
                "content-type",
                "content-length",
                "accept",
                "user-agent",
                "x-request-id",
                "authorization",
                "location",
            ]
            .map(String::from)
            .to_vec(),
            shipping: None,
            siem: None,
            otlp: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecords {
    durability: Option<Spanned<String>>,
    batch_window_ms: Option<Spanned<u64>>,
    rotate_rows: Option<Spanned<u64>>,
    rotate_mb: Option<Spanned<u64>>,
    rotate_secs: Option<Spanned<f64>>,
    row_group_rows: Option<Spanned<u64>>,
    retention_days: Option<u32>,
    verify_secs: Option<Spanned<f64>>,
    patient_path_segments: Option<Vec<String>>,
    patient_query_params: Option<Vec<String>>,
    headers: Option<Vec<String>>,
    shipping: Option<RawShipping>,
    siem: Option<RawSiem>,
    otlp: Option<RawOtlp>,
}

/// `[records]`, validated.
pub(crate) fn records_section(
    src: &TomlSource<'_>,
    raw: Option<RawRecords>,
) -> Result<RecordsSection, ConfigError> {
    Ok(match raw {
        None => RecordsSection::default(),
        Some(r) => {
            let d = RecordsSection::default();
            let positive = |v: Option<Spanned<u64>>, key: &str, default: u64| match v {
                None => Ok(default),
                Some(v) if *v.get_ref() == 0 => Err(src.err(
                    Some(v.span()),
                    Some(format!("records.{key}")),
                    "must be greater than 0".into(),
                )),
                Some(v) => Ok(v.into_inner()),
            };
            // Checked whatever the durability, so a bad value never waits for a switch.
            let window = Duration::from_millis(positive(
                r.batch_window_ms,
                "batch_window_ms",
                DEFAULT_BATCH_WINDOW.as_millis() as u64,
            )?);
            let durability = match r.durability {
                None => d.durability,
                Some(v) => match v.get_ref().as_str() {
                    "strict" => Durability::Strict,
                    "batched" => Durability::Batched { window },
                    other => {
                        return Err(src.err(
                            Some(v.span()),
                            Some("records.durability".into()),
                            format!("`{other}`: expected \"strict\" or \"batched\""),
                        ))
                    }
                },
            };
            let rotate_age = match r.rotate_secs {
                None => d.rotate_age,
                Some(v) if !(*v.get_ref() > 0.0 && *v.get_ref() <= 86400.0) => {
                    return Err(src.err(
                        Some(v.span()),
                        Some("records.rotate_secs".into()),
                        "must be greater than 0 and at most 86400".into(),
                    ))
                }
                Some(v) => Duration::from_secs_f64(v.into_inner()),
            };
            let verify_every = match r.verify_secs {
                None => d.verify_every,
                Some(v) if *v.get_ref() == 0.0 => None,
                Some(v) if !(*v.get_ref() > 0.0 && v.get_ref().is_finite()) => {
                    return Err(src.err(
                        Some(v.span()),
                        Some("records.verify_secs".into()),
                        "must be 0 (never) or a positive number of seconds".into(),
                    ))
                }
                Some(v) => Some(Duration::from_secs_f64(v.into_inner())),
            };
            let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
            RecordsSection {
                durability,
                rotate_rows: positive(r.rotate_rows, "rotate_rows", d.rotate_rows as u64)? as usize,
                rotate_bytes: (positive(r.rotate_mb, "rotate_mb", (d.rotate_bytes >> 20) as u64)?
                    << 20) as usize,
                rotate_age,
                row_group_rows: positive(
                    r.row_group_rows,
                    "row_group_rows",
                    d.row_group_rows as u64,
                )? as usize,
                retention_days: r.retention_days.unwrap_or(d.retention_days),
                verify_every,
                patient_path_segments: r.patient_path_segments.unwrap_or(d.patient_path_segments),
                patient_query_params: r.patient_query_params.unwrap_or(d.patient_query_params),
                headers: r.headers.map(lower).unwrap_or(d.headers),
                shipping: r.shipping.map(|s| shipping_section(src, s)).transpose()?,
                siem: r.siem.map(|s| siem_section(src, s)).transpose()?,
                otlp: r.otlp.map(|s| otlp_section(src, s)).transpose()?,
            }
        }
    })
}
