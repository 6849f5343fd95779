//! One HTTP request's path through phigate, top to bottom:
//!
//! admit -> identify -> authorize -> approve -> forward -> mask -> record
//!
//! Each stage is a step of [`Pipeline::handle`]. A stage that refuses answers the
//! client itself (JSON body, request id) and the refusal is recorded like any other
//! exchange: nothing passes unrecorded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tracing::{debug, warn};

use crate::config::MaskingSection;
use crate::config::{Limits, Protocol};
use crate::http::body::{
    boxed, find_in_chain, json_error, BodyEnd, BodyTooLarge, Limited, Observed, PhiBody,
    REQUEST_ID_HEADER,
};
use crate::http::forward::{
    strip_hop_by_hop, upstream_uri, ConnectError, Forwarder, UpstreamInfo, UpstreamKey,
};
use crate::identity::Workload;
use crate::mask::body::{MaskReport, MaskedBody, SharedReport};
use crate::mask::{BodyMasker, Counts, MaskContext, Profile, ProfileSet};
use crate::policy::gate::{Gatekeeper, Subject};
use crate::policy::{status_for, Reason};
use crate::record::pseudonym::Pseudonymizer;
use crate::record::{new_id, Durable, Record, RecordSink, RequestRecord};

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

/// The masking profiles in force and which one applies where.
pub struct Masking {
    pub set: ProfileSet,
    pub ctx: Arc<MaskContext>,
    pub settings: MaskingSection,
    /// By destination index: its `mask_profile`.
    pub by_destination: Vec<Option<Arc<Profile>>>,
}

pub struct Pipeline {
    pub forwarder: Forwarder,
    pub masking: Arc<Masking>,
    pub records: Arc<dyn RecordSink>,
    /// Held and granted approvals, and the rules a policy obligation may name.
    pub approvals: Arc<crate::approval::Approvals>,
    pub approval_rules: Arc<crate::approval::RuleSet>,
    /// Patient ids in paths are recorded only as keyed pseudonyms.
    pub pseudonyms: Arc<Pseudonymizer>,
    /// Headers copied into records (lower case); credentials never raw.
    pub record_headers: Vec<String>,
    pub limits: Limits,
    /// Until the upstream's response head: 504 after it.
    pub request_timeout: Duration,
    /// Policies and token validation (the authorize stage). One cell shared by every
    /// pipeline of this agent, so a reload reaches requests on open connections too.
    pub gate: Arc<arc_swap::ArcSwap<Gatekeeper>>,
}

impl Pipeline {
    /// The masking profile for a request: the one the policy decision names (so
    /// "minimum necessary" can differ by role and route), else the destination's
    /// `mask_profile`. Names were checked against the profile set at load.
    pub fn mask_profile_for(
        &self,
        conn: &ConnContext,
        decision: &crate::policy::Decision,
    ) -> Option<Arc<Profile>> {
        if let Some(name) = &decision.mask_profile {
            return self.masking.set.get(name).cloned();
        }
        self.masking
            .by_destination
            .get(conn.dest_index)
            .cloned()
            .flatten()
    }

    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnContext>,
        req: Request<Incoming>,
    ) -> Result<Response<PhiBody>, Infallible> {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let ex = Exchange::begin(&self, &conn, &req);

        // 0. nothing passes unrecorded: while records cannot be written, refuse.
        if !self.records.writable() {
            return Ok(ex
                .answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "records_unavailable",
                    "phigate cannot write its audit records; requests are refused until it can",
                )
                .await);
        }

        // 1. admit: one reading of the request (one credential, one host, one
        //    method), for the host the connection was made for.
        let expect = crate::http::admit::Expect {
            sni: conn.tls.as_ref().and_then(|t| t.sni.as_deref()),
            hosts: &conn.hosts,
        };
        let host = match crate::http::admit::admit(&req, expect) {
            Ok(h) => h,
            Err(r) => return Ok(ex.answer(r.status(), r.reason(), r.message()).await),
        };

        // 2. identify: the caller is the kernel-attested workload of the connection,
        //    plus the OIDC identity of a valid bearer token (the token is never kept).
        // 3. authorize: the policy set decides; deny by default.
        let gate = self.gate.load_full();
        let verdict = match gate
            .check(
                &Subject {
                    workload: &conn.workload,
                    destination: &conn.destination,
                    method: req.method().as_str(),
                    path: req.uri().path(),
                    query: req.uri().query(),
                    headers: req.headers(),
                    host: host.as_deref(),
                    sni: expect.sni,
                    has_approval: false,
                },
                None,
            )
            .await
        {
            Ok(v) => v,
            Err(e) => {
                return Ok(ex
                    .answer(StatusCode::BAD_REQUEST, "bad_request", &e.to_string())
                    .await)
            }
        };
        let mut ex = ex;
        ex.authorized(&verdict, gate.policies.hash());
        let decision = &verdict.decision;
        if !decision.allowed {
            return Ok(ex.deny(decision).await);
        }
        // Held while this request lasts, so a new policy set can take it back.
        ex.grant = Some(conn.grants.grant(verdict.access.clone()));
        if !Arc::ptr_eq(&gate, &self.gate.load()) {
            // A reload landed while deciding: the new set decides too (its sweep of
            // open connections may have run before this grant was held).
            let now = self.gate.load_full();
            let d = now.recheck(&conn.workload, &conn.destination, &verdict.access);
            if !d.allowed {
                ex.authorized(
                    &crate::policy::gate::Verdict {
                        decision: d.clone(),
                        access: verdict.access.clone(),
                    },
                    now.policies.hash(),
                );
                return Ok(ex.deny(&d).await);
            }
        }
        // 4. approve: a permit naming an approval rule holds (or refuses) the request
        //    until reviewers approve this exact request.
        let mut req = req.map(boxed);
        if let Some(rule) = decision.approval_rule.clone() {
            let profile = self.mask_profile_for(&conn, decision);
            let token = verdict.access.token.as_ref().ok();
            match self.approve(ex, &conn, &rule, profile, token, req).await {
                Ok((e, r)) => (ex, req) = (e, r),
                Err(resp) => return Ok(resp),
            }
        }

        // 5. forward (unless a new policy set revoked this connection meanwhile, e.g.
        //    while the request was held for approval)
        if conn.grants.is_revoked() {
            let why = conn.grants.reason().map(ToString::to_string);
            return Ok(ex
                .answer(
                    StatusCode::FORBIDDEN,
                    "access_revoked",
                    why.as_deref()
                        .unwrap_or("the policy set no longer allows this connection"),
                )
                .await);
        }
        if let Some(len) = content_length(&req) {
            if len > self.limits.max_request_body_bytes {
                return Ok(ex
                    .answer(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request_too_large",
                        &format!(
                            "request body of {len} bytes exceeds the limit of {} bytes",
                            self.limits.max_request_body_bytes
                        ),
                    )
                    .await);
            }
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let key = match self.upstream_key(&conn, &req) {
            Ok(k) => k,
            Err(reason) => {
                return Ok(ex
                    .answer(StatusCode::BAD_REQUEST, "bad_request", &reason)
                    .await)
            }
        };
        let profile = self.mask_profile_for(&conn, &verdict.decision);
        if upgrade {
            // What follows a switch of protocols is a tunnel: an UPGRADE passage of
            // its own, and never under masking (its bytes cannot be read).
            if profile.is_some() {
                return Ok(ex
                    .answer(
                        StatusCode::FORBIDDEN,
                        "upgrade_refused",
                        "a protocol upgrade carries bytes that masking cannot read; refused under a masking obligation",
                    )
                    .await);
            }
            let gate = self.gate.load_full();
            let d = gate.check_upgrade(&conn.workload, &conn.destination, &verdict.access);
            if !d.allowed {
                ex.authorized(
                    &crate::policy::gate::Verdict {
                        decision: d.clone(),
                        access: verdict.access.clone(),
                    },
                    gate.policies.hash(),
                );
                return Ok(ex.deny(&d).await);
            }
        }
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if profile.is_some() {
            crate::http::admit::strip_ranges(&mut parts.headers);
        }
        let authority = ex
            .record
            .authority
            .clone()
            .unwrap_or_else(|| conn.original_dst.to_string());
        // The path that was authorized (normalized) is the path forwarded.
        let path = match parts.uri.query() {
            Some(q) => format!("{}?{q}", verdict.access.path),
            None => verdict.access.path.clone(),
        };
        parts.uri = match upstream_uri(key.server_name.is_some(), &authority, &path) {
            Ok(u) => u,
            Err(e) => {
                return Ok(ex
                    .answer(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("invalid request target: {e}"),
                    )
                    .await)
            }
        };
        let body = Limited::new(
            Observed::counting(body, ex.request_bytes.clone()),
            self.limits.max_request_body_bytes,
        );
        let mut ex = ex;
        let body = match profile
            .as_ref()
            .filter(|_| self.masking.settings.mask_requests)
        {
            Some(p) => match ex.mask_request(&mut parts, body, p, &self.masking) {
                Ok(b) => b,
                Err(reason) => {
                    return Ok(ex
                        .answer(StatusCode::BAD_REQUEST, "masking_failed", &reason)
                        .await)
                }
            },
            None => boxed(body),
        };
        let upstream_req = Request::from_parts(parts, body);

        let upstream_t0 = Instant::now();
        let sent = tokio::time::timeout(
            self.request_timeout,
            self.forwarder.send(&key, upstream_req),
        )
        .await;
        crate::metrics::get().observe(crate::metrics::Stage::Upstream, upstream_t0.elapsed());
        let mut resp = match sent {
            Err(_) => {
                return Ok(ex
                    .answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        &format!(
                            "the upstream did not answer within {:?}",
                            self.request_timeout
                        ),
                    )
                    .await)
            }
            Ok(Err(e)) => return Ok(ex.upstream_failed(&e).await),
            Ok(Ok(r)) => r,
        };
        let info = resp
            .extensions()
            .get::<UpstreamInfo>()
            .cloned()
            .unwrap_or_default();
        let mut ex = ex.with_upstream(&info, resp.version());

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let (parts, _) = resp.into_parts();
                ex.record.upgraded = true;
                let resp = ex.finish_head(Response::from_parts(parts, crate::http::body::empty()));
                ex.relay_upgraded(client_upgrade, upstream_upgrade);
                return Ok(resp);
            }
        }

        // 6. mask: the profile chosen for this request rewrites headers and body.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        if let Some(profile) = profile {
            return Ok(ex
                .masked_response(parts, body, profile, &self.masking)
                .await);
        }

        // 7. record: written when the last byte of the response has passed; the end of
        //    the response is released only once the record is durable.
        Ok(ex.stream_response(parts, body).await)
    }

    /// The approval stage: binds an approval to this exact request (its body is read,
    /// up to APPROVAL_BODY_LIMIT, to be hashed) and waits or refuses as the rule says.
    /// Returns the request to forward, or phigate's answer.
    async fn approve(
        &self,
        mut ex: Exchange,
        conn: &ConnContext,
        rule_name: &str,
        profile: Option<Arc<Profile>>,
        token: Option<&crate::identity::token::TokenIdentity>,
        req: Request<PhiBody>,
    ) -> Result<(Exchange, Request<PhiBody>), Response<PhiBody>> {
        use crate::approval::{Gate, State};
        let Some(rule) = self.approval_rules.get(rule_name).cloned() else {
            // A policy names a rule approvals.toml does not define: nobody could
            // approve it, so it does not pass.
            ex.record.decision = "deny";
            return Err(ex
                .answer(
                    StatusCode::FORBIDDEN,
                    "approval_unavailable",
                    &format!("approval rule `{rule_name}` is not defined"),
                )
                .await);
        };
        let (parts, body) = req.into_parts();
        let bytes = match read_whole(body, APPROVAL_BODY_LIMIT).await {
            Ok(b) => b,
            Err(Unread::TooLarge(why)) => {
                return Err(ex
                    .answer(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", &why)
                    .await)
            }
            Err(Unread::Broken(why)) => {
                return Err(ex
                    .answer(StatusCode::BAD_REQUEST, "bad_request", &why)
                    .await)
            }
        };
        let (binding, mut summary) = approval_binding(&ex.record, conn, token, &parts, &bytes);
        summary.preview = Some(self.preview(profile.as_ref(), &parts, &bytes));
        match self.approvals.gate(&rule, &binding, summary).await {
            Gate::Proceed {
                approval_id,
                approvers,
                reason,
            } => {
                ex.record.decision = "approved";
                ex.record.approval_id = Some(approval_id);
                ex.record.approvers = approvers;
                ex.record.approval_reason = Some(reason);
                Ok((
                    ex,
                    Request::from_parts(parts, boxed(http_body_util::Full::new(bytes))),
                ))
            }
            Gate::Refuse {
                approval_id,
                outcome,
            } => {
                let (decision, code, reason): (&'static str, &'static str, &'static str) =
                    match outcome {
                        State::Pending => (
                            "held",
                            "approval_pending",
                            "this request waits for a reviewer's approval; repeat it once approved",
                        ),
                        State::Denied => {
                            ("deny", "approval_denied", "a reviewer denied this request")
                        }
                        _ => (
                            "expired",
                            "approval_expired",
                            "no reviewer approved this request in time",
                        ),
                    };
                ex.record.decision = decision;
                ex.record.approval_id = Some(approval_id.clone());
                let mut resp = crate::http::body::json_approval(
                    code,
                    reason,
                    &approval_id,
                    &ex.record.request_id,
                );
                if let Ok(v) = HeaderValue::from_str(&approval_id) {
                    resp.headers_mut()
                        .insert(crate::approval::APPROVAL_ID_HEADER, v);
                }
                Err(ex.answer_with(resp, code, reason).await)
            }
            Gate::TooMany { max } => {
                ex.record.decision = "held";
                Err(ex
                    .answer(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_pending_approvals",
                        &format!(
                            "you have {max} requests waiting for approval already; wait for a decision on them"
                        ),
                    )
                    .await)
            }
            Gate::Unavailable(e) => Err(ex
                .answer(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "records_unavailable",
                    &format!("the approval could not be recorded: {e}"),
                )
                .await),
        }
    }

    /// What reviewers may see of a request body: masked with the request's profile,
    /// or only its size and type. Never the raw bytes.
    fn preview(
        &self,
        profile: Option<&Arc<Profile>>,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> String {
        const PREVIEW_CHARS: usize = 600;
        if body.is_empty() {
            return format!("(no request body: a {} request)", parts.method);
        }
        let ctype = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let encoding = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok());
        let masked = profile
            .zip(crate::mask::body_kind(ctype))
            .and_then(|(p, kind)| {
                crate::mask::mask_body(p, &self.masking.ctx, kind, encoding, body).ok()
            });
        match masked {
            Some((bytes, _)) => {
                let text = String::from_utf8_lossy(&bytes);
                let mut cut = PREVIEW_CHARS.min(text.len());
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!(
                    "{}{}",
                    &text[..cut],
                    if cut < text.len() { "…" } else { "" }
                )
            }
            None => format!(
                "(a {}-byte {} body, not shown: no masking profile applies to it)",
                body.len(),
                ctype.unwrap_or("untyped")
            ),
        }
    }

    fn upstream_key<B>(&self, conn: &ConnContext, req: &Request<B>) -> Result<UpstreamKey, String> {
        let ip_name = || ServerName::IpAddress(conn.original_dst.ip().into());
        let server_name = match conn.protocol {
            Protocol::Http | Protocol::Tcp => None,
            // The name the client asked for in its ClientHello.
            Protocol::Https => Some(
                conn.tls
                    .as_ref()
                    .and_then(|t| t.sni.as_deref())
                    .and_then(|s| ServerName::try_from(s.to_owned()).ok())
                    .unwrap_or_else(ip_name),
            ),
            // The client spoke plain HTTP: the name is the request's host.
            Protocol::HttpToHttps => Some(
                request_host(req)
                    .map(|h| {
                        ServerName::try_from(h)
                            .map_err(|_| "the Host header is not a valid server name".to_owned())
                    })
                    .transpose()?
                    .unwrap_or_else(ip_name),
            ),
        };
        Ok(UpstreamKey {
            addr: conn.original_dst,
            server_name,
            dest_index: conn.dest_index,
        })
    }
}

/// One exchange in progress: the record being filled in.
struct Exchange {
    conn: Arc<ConnContext>,
    records: Arc<dyn RecordSink>,
    pseudonyms: Arc<Pseudonymizer>,
    record_headers: Vec<String>,
    record: RequestRecord,
    t0: Instant,
    request_bytes: Arc<AtomicU64>,
    written: bool,
    /// Masking of the response and request bodies, when a profile applies.
    mask_report: Option<SharedReport>,
    request_mask_report: Option<SharedReport>,
    /// The access the policies granted, held until the record is written.
    grant: Option<crate::policy::revoke::Grant>,
}

impl Drop for Exchange {
    /// The handler future was dropped before an answer: the client went away while
    /// phigate waited on the upstream. That exchange is recorded too.
    fn drop(&mut self) {
        if !self.written {
            self.record.outcome = "client_aborted";
            // Nobody is left to wait for it; the journal reports its own failures.
            drop(self.write());
        }
    }
}

/// How much of a streamed response body is masked before its headers go out.
const STREAM_HEAD_BYTES: usize = 64 << 10;

impl Exchange {
    fn begin(p: &Pipeline, conn: &Arc<ConnContext>, req: &Request<Incoming>) -> Exchange {
        let tls = conn.tls.clone().unwrap_or_default();
        let (path, mut patient_refs) = p.pseudonyms.redact_path(req.uri().path());
        let query = req
            .uri()
            .query()
            .map(|q| p.pseudonyms.redact_query(q, &mut patient_refs));
        let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
        let request_headers = selected_headers(req.headers(), &p.record_headers, &p.pseudonyms);
        Exchange {
            conn: Arc::clone(conn),
            records: p.records.clone(),
            pseudonyms: p.pseudonyms.clone(),
            record_headers: p.record_headers.clone(),
            t0: Instant::now(),
            request_bytes: Arc::new(AtomicU64::new(0)),
            written: false,
            mask_report: None,
            request_mask_report: None,
            grant: None,
            record: RequestRecord {
                request_id: new_id(),
                connection_id: conn.connection_id.clone(),
                start_time: SystemTime::now(),
                end_time: SystemTime::now(),
                origin: p.records.origin().clone(),
                destination: conn.destination.clone(),
                original_dst: conn.original_dst.to_string(),
                client_addr: conn.client_addr.to_string(),
                workload: conn.workload.clone(),
                oidc_issuer: None,
                oidc_subject: None,
                oidc_groups: Vec::new(),
                oidc_expiry: None,
                sni: tls.sni,
                tls_version: tls.version,
                alpn: tls.alpn,
                http_version: format!("{:?}", req.version()),
                upstream_http_version: None,
                upstream_tls_version: None,
                upstream_cert_subject: None,
                method: req.method().to_string(),
                authority,
                path,
                path_as_sent: None,
                query,
                request_headers,
                response_headers: BTreeMap::new(),
                request_body: None,
                request_body_truncated: false,
                response_body: None,
                response_body_truncated: false,
                patient_refs,
                status: 0,
                request_bytes: 0,
                response_bytes: 0,
                latency_ms: 0.0,
                duration_ms: 0.0,
                decision: "allow",
                policy_ids: Vec::new(),
                policy_set_hash: None,
                masking_profile: None,
                masking_counts: BTreeMap::new(),
                masking_set_hash: None,
                approval_id: None,
                approvers: Vec::new(),
                approval_reason: None,
                upgraded: false,
                outcome: "complete",
                error: None,
            },
        }
    }

    /// The authorize stage's facts, into the record (the token only as its claims).
    fn authorized(&mut self, v: &crate::policy::gate::Verdict, set_hash: &str) {
        if let Ok(t) = &v.access.token {
            self.record.oidc_issuer = Some(t.issuer.clone());
            self.record.oidc_subject = Some(t.subject.clone());
            self.record.oidc_groups = t.groups.clone();
            self.record.oidc_expiry = Some(t.expires_at.saturating_mul(1_000_000));
        }
        // The record names the path that was decided (and is forwarded); what the
        // client sent is kept beside it when normalization changed it.
        let (decided, _) = self.pseudonyms.redact_path(&v.access.path);
        if decided != self.record.path {
            self.record.path_as_sent = Some(std::mem::replace(&mut self.record.path, decided));
        }
        self.record.decision = if v.decision.allowed { "allow" } else { "deny" };
        self.record.policy_ids = v.decision.policy_ids.clone();
        self.record.policy_set_hash = Some(set_hash.to_owned());
    }

    /// 401 (a `@require_token` forbid, no valid token) or 403: JSON naming the
    /// request id and the deciding policy ids, nothing else about the policies.
    async fn deny(mut self, d: &crate::policy::Decision) -> Response<PhiBody> {
        let status = status_for(d);
        let (code, reason) = match &d.reason {
            Reason::TokenRequired(e) => ("unauthenticated", e.code().to_owned()),
            other => ("forbidden", other.code().to_owned()),
        };
        let mut resp = crate::http::body::json_denial(
            status,
            code,
            &reason,
            &d.policy_ids,
            &self.record.request_id,
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        self.record.outcome = "refused";
        self.record.error = Some(match &d.reason {
            Reason::TokenRequired(e) => format!("token_required: {}", e.code()),
            other => other.code().to_owned(),
        });
        let resp = self.finish_head(resp);
        if let Err(e) = self.write().await {
            tracing::error!(error = %e, request = %self.record.request_id, "request record lost");
        }
        resp
    }

    fn with_upstream(mut self, info: &UpstreamInfo, version: http::Version) -> Self {
        self.record.upstream_http_version = Some(format!("{version:?}"));
        self.record.upstream_tls_version = info.tls_version.clone();
        self.record.upstream_cert_subject = info.cert_subject.clone();
        self
    }

    /// phigate answers the client itself; the record is written (and durable) first.
    async fn answer(self, status: StatusCode, code: &str, reason: &str) -> Response<PhiBody> {
        let resp = json_error(status, code, reason, &self.record.request_id);
        self.answer_with(resp, code, reason).await
    }

    /// Like `answer`, with the response already made.
    async fn answer_with(
        mut self,
        resp: Response<PhiBody>,
        code: &str,
        reason: &str,
    ) -> Response<PhiBody> {
        let status = resp.status();
        self.record.outcome = match status {
            _ if code == "masking_failed" => "masking_failed",
            StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
            StatusCode::BAD_GATEWAY => "upstream_error",
            _ => "refused",
        };
        self.record.error = Some(reason.to_owned());
        self.record.status = status.as_u16();
        self.record.latency_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
        let resp = self.finish_head(resp);
        if let Err(e) = self.write().await {
            // The answer is a refusal: it reveals nothing, so it still goes out.
            tracing::error!(error = %e, request = %self.record.request_id, "request record lost");
        }
        resp
    }

    async fn upstream_failed(self, e: &hyper_util::client::legacy::Error) -> Response<PhiBody> {
        if let Some(limit) = find_in_chain::<BodyTooLarge>(e) {
            let reason = limit.to_string();
            return self
                .answer(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", &reason)
                .await;
        }
        let reason = match find_in_chain::<ConnectError>(e) {
            Some(c) => c.to_string(),
            None => format!("upstream request failed: {}", crate::http::error_chain(e)),
        };
        warn!(request = %self.record.request_id, reason = %reason, "upstream failed");
        self.answer(StatusCode::BAD_GATEWAY, "upstream_unavailable", &reason)
            .await
    }

    fn finish_head<B>(&mut self, mut resp: Response<B>) -> Response<B> {
        if let Ok(v) = HeaderValue::from_str(&self.record.request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        self.record.status = resp.status().as_u16();
        self.record.latency_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
        self.record.response_headers =
            selected_headers(resp.headers(), &self.record_headers, &self.pseudonyms);
        resp
    }

    async fn stream_response<B>(
        mut self,
        parts: http::response::Parts,
        body: B,
    ) -> Response<PhiBody>
    where
        B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<crate::http::body::BoxError> + std::fmt::Display,
    {
        let announced = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let resp = self.finish_head(Response::from_parts(parts, ()));
        if http_body::Body::is_end_stream(&body) {
            // No body (HEAD, 204, 304, empty): the head is the whole response, so it
            // waits for the record.
            if let Err(e) = self.write().await {
                tracing::error!(error = %e, request = %self.record.request_id, "request record not durable; response withheld");
                return crate::http::body::json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "records_unavailable",
                    "phigate cannot write its audit records; requests are refused until it can",
                    &self.record.request_id,
                );
            }
            return resp.map(|()| crate::http::body::empty());
        }
        let response_bytes = Arc::new(AtomicU64::new(0));
        let counter = response_bytes.clone();
        let body = Observed::new(body, response_bytes, move |end| {
            self.record.response_bytes = counter.load(Ordering::Relaxed);
            match end {
                BodyEnd::Complete => {}
                BodyEnd::Error(e) => {
                    self.record.outcome = "upstream_error";
                    self.record.error = Some(format!("response body failed mid-stream: {e}"));
                }
                BodyEnd::Dropped => {
                    self.record.outcome = "client_aborted";
                }
            }
            Some(self.write())
        })
        .expecting(announced);
        resp.map(|()| boxed(body))
    }

    /// After 101, bytes flow both ways uninspected; the record is written when the
    /// tunnel closes.
    fn relay_upgraded(
        self,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
    ) {
        let mut ex = self;
        let grants = ex.conn.grants.clone();
        tokio::spawn(async move {
            // The tunnel's own meter: its bytes (plaintext, each way) and its clock
            // for the idle timeout.
            let meter = crate::proxy::io::Meter::new(std::time::Instant::now());
            let relay = async {
                let (c, u) = tokio::try_join!(client, upstream)?;
                let mut c = crate::proxy::io::Metered::new(
                    hyper_util::rt::TokioIo::new(c),
                    Arc::clone(&meter),
                );
                let mut u = hyper_util::rt::TokioIo::new(u);
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tokio::io::copy_bidirectional(&mut c, &mut u).await?,
                )
            };
            // A tunnel outlives its request, not its connection's bounds: idle,
            // lifetime, drain, and a new policy set that revokes the connection.
            let bounds = &ex.conn.tunnel_bounds;
            let ended = tokio::select! {
                r = relay => match r {
                    Ok(_) => None,
                    Err(e) => Some(("upgrade_failed", Some(e.to_string()))),
                },
                _ = grants.revoked().cancelled() => {
                    Some(("revoked", grants.reason().map(ToString::to_string)))
                }
                _ = meter.idle_for(bounds.idle) => Some(("idle_timeout", None)),
                _ = tokio::time::sleep_until(bounds.lifetime_end) => Some(("lifetime_exceeded", None)),
                _ = bounds.drain.cancelled() => Some(("drained", None)),
            };
            // The tunnel's bytes, whichever way it ended.
            ex.request_bytes.fetch_add(meter.up(), Ordering::Relaxed);
            ex.record.response_bytes = meter.down();
            if let Some((outcome, error)) = ended {
                ex.record.outcome = outcome;
                ex.record.error = error;
            }
            drop(ex.write());
        });
    }

    /// The masking profile's response: headers masked; a JSON or NDJSON body decoded
    /// and masked (whole when it fits `buffer_bytes`, so a failure is a clean 502,
    /// else streamed); any other body refused unless the profile lets it pass.
    async fn masked_response(
        mut self,
        mut parts: http::response::Parts,
        mut body: Incoming,
        profile: Arc<Profile>,
        masking: &Masking,
    ) -> Response<PhiBody> {
        use http_body_util::BodyExt;
        self.record.masking_profile = Some(profile.name.clone());
        self.record.masking_set_hash = Some(masking.set.hash().to_owned());
        let mut header_counts = Counts::new(&profile);
        crate::mask::mask_headers(
            &profile,
            &masking.ctx,
            &mut parts.headers,
            &mut header_counts,
        );
        self.record.masking_counts = header_counts.by_entity(&profile);
        // Range headers were removed before forwarding: a 206 is a part of a
        // document that would be masked as a whole document of its own.
        if parts.status == StatusCode::PARTIAL_CONTENT {
            return self
                .answer(
                    StatusCode::BAD_GATEWAY,
                    "masking_failed",
                    "the upstream answered with part of a document (206), which cannot be masked",
                )
                .await;
        }
        if http_body::Body::is_end_stream(&body) {
            return self.stream_response(parts, body).await;
        }
        let header = |h: &http::HeaderMap, name| {
            h.get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header(&parts.headers, header::CONTENT_TYPE);
        let Some(kind) = crate::mask::body_kind(content_type.as_deref()) else {
            if profile.passes_through(content_type.as_deref()) {
                self.record.error = Some(format!(
                    "body not masked: content type `{}` passes through under profile `{}`",
                    content_type.as_deref().unwrap_or(""),
                    profile.name
                ));
                return self.stream_response(parts, body).await;
            }
            let reason = format!(
                "the response's content type `{}` is not one masking profile `{}` can mask, and the profile does not let it pass",
                content_type.as_deref().unwrap_or("(none)"),
                profile.name
            );
            return self
                .answer(StatusCode::BAD_GATEWAY, "masking_failed", &reason)
                .await;
        };
        let encoding = header(&parts.headers, header::CONTENT_ENCODING);
        let mut masker = match BodyMasker::new(
            profile.clone(),
            masking.ctx.clone(),
            kind,
            encoding.as_deref(),
        ) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .answer(StatusCode::BAD_GATEWAY, "masking_failed", &e.to_string())
                    .await
            }
        };
        let announced: Option<u64> =
            header(&parts.headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let original_headers = profile.pass_unparsable.then(|| parts.headers.clone());
        // The client gets the decoded, masked representation.
        for h in [
            header::CONTENT_ENCODING,
            header::CONTENT_LENGTH,
            HeaderName::from_static("content-md5"),
            HeaderName::from_static("digest"),
            HeaderName::from_static("content-digest"),
            HeaderName::from_static("repr-digest"),
        ] {
            parts.headers.remove(h);
        }
        if let Some(etag) = header(&parts.headers, header::ETAG) {
            if !etag.starts_with("W/") {
                if let Ok(v) = HeaderValue::from_str(&format!("W/{etag}")) {
                    parts.headers.insert(header::ETAG, v);
                }
            }
        }
        let settings = &masking.settings;
        let report: SharedReport = Arc::new(std::sync::Mutex::new(MaskReport::default()));
        self.mask_report = Some(report.clone());
        let mut out = Vec::new();
        let mut raw = profile.pass_unparsable.then(Vec::new);
        // Bodies announced to fit buffer_bytes are masked whole. Any other (larger,
        // or of unknown length) is still held until its first STREAM_HEAD_BYTES
        // are masked, so that a body that is not what it claims (an error page, a
        // hostile nesting) is answered with a 502 rather than a response cut short;
        // a short body without a length still ends within that head, whole.
        let hold = if announced.is_some_and(|n| n <= settings.buffer_bytes as u64) {
            settings.buffer_bytes
        } else {
            settings.buffer_bytes.min(STREAM_HEAD_BYTES)
        };
        loop {
            let step = match body.frame().await {
                None => crate::mask::finish_body(&mut masker, &mut out).map(|()| true),
                Some(Err(e)) => {
                    let reason = format!("the upstream response body failed: {e}");
                    return self
                        .answer(StatusCode::BAD_GATEWAY, "upstream_unavailable", &reason)
                        .await;
                }
                // Trailers of a buffered body are dropped: the body is whole.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(r) = &mut raw {
                            r.extend_from_slice(&data);
                        }
                        masker.push(&data, &mut out).map(|()| false)
                    }
                    Err(_) => Ok(false),
                },
            };
            match step {
                Ok(true) => {
                    {
                        let mut r = report.lock().expect("report lock");
                        r.counts = masker.counts().by_entity(&profile);
                        r.keep(&out, settings.record_body_bytes);
                    }
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
                    let full = http_body_util::Full::new(bytes::Bytes::from(out));
                    return self.stream_response(parts, full).await;
                }
                Ok(false) if out.len() > hold => break,
                Ok(false) => {}
                Err(e) => {
                    if let (Some(raw), Some(h)) = (raw, original_headers) {
                        // The profile lets an unparsable body pass: as it came.
                        parts.headers = h;
                        self.mask_report = None;
                        self.record.error = Some(format!(
                                "body not masked: {e}; passed unmasked under profile `{}` (pass_unparsable)",
                                profile.name
                            ));
                        let full = http_body_util::Full::new(bytes::Bytes::from(raw));
                        return self.stream_response(parts, full).await;
                    }
                    return self
                        .answer(StatusCode::BAD_GATEWAY, "masking_failed", &e.to_string())
                        .await;
                }
            }
        }
        // Too large to hold: stream; a failure from here on aborts the response.
        report
            .lock()
            .expect("report lock")
            .keep(&out, settings.record_body_bytes);
        let masked = MaskedBody::new(
            body,
            masker,
            Some(bytes::Bytes::from(out)),
            report,
            settings.record_body_bytes,
        );
        self.stream_response(parts, masked).await
    }

    /// With `mask_requests`, a JSON request body is masked before it goes upstream.
    fn mask_request<B>(
        &mut self,
        parts: &mut http::request::Parts,
        body: B,
        profile: &Arc<Profile>,
        masking: &Masking,
    ) -> Result<PhiBody, String>
    where
        B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<crate::http::body::BoxError>,
    {
        let mut counts = Counts::new(profile);
        crate::mask::mask_headers(profile, &masking.ctx, &mut parts.headers, &mut counts);
        self.record.masking_profile = Some(profile.name.clone());
        self.record.masking_set_hash = Some(masking.set.hash().to_owned());
        let text = |n| {
            parts
                .headers
                .get(n)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let Some(kind) = crate::mask::body_kind(text(header::CONTENT_TYPE).as_deref()) else {
            // Only JSON request bodies are masked; others (and none) go as they are.
            return Ok(boxed(body));
        };
        let masker = BodyMasker::new(
            profile.clone(),
            masking.ctx.clone(),
            kind,
            text(header::CONTENT_ENCODING).as_deref(),
        )
        .map_err(|e| e.to_string())?;
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.remove(header::CONTENT_LENGTH);
        let report: SharedReport = Arc::new(std::sync::Mutex::new(MaskReport::default()));
        self.request_mask_report = Some(report.clone());
        Ok(boxed(MaskedBody::new(
            body,
            masker,
            None,
            report,
            masking.settings.record_body_bytes,
        )))
    }

    /// Moves what masking learned into the record.
    fn take_masking(&mut self) {
        if let Some(r) = &self.mask_report {
            let r = r.lock().expect("report lock");
            for (k, v) in &r.counts {
                *self.record.masking_counts.entry(k.clone()).or_default() += v;
            }
            if !r.recorded.is_empty() {
                self.record.response_body = Some(String::from_utf8_lossy(&r.recorded).into_owned());
                self.record.response_body_truncated = r.truncated;
            }
            if let Some(e) = &r.error {
                self.record.outcome = "masking_failed";
                self.record.error = Some(format!(
                    "response body masking failed; the response was cut off: {e}"
                ));
            }
        }
        if let Some(r) = &self.request_mask_report {
            let r = r.lock().expect("report lock");
            for (k, v) in &r.counts {
                *self.record.masking_counts.entry(k.clone()).or_default() += v;
            }
            if !r.recorded.is_empty() {
                self.record.request_body = Some(String::from_utf8_lossy(&r.recorded).into_owned());
                self.record.request_body_truncated = r.truncated;
            }
            if let Some(e) = &r.error {
                self.record.outcome = "masking_failed";
                self.record.error = Some(format!(
                    "request body masking failed; the request was cut off: {e}"
                ));
            }
        }
    }

    /// Submits the record; the ticket resolves when it is durable.
    fn write(&mut self) -> Durable {
        self.take_masking();
        self.written = true;
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.record.end_time = SystemTime::now();
        self.record.duration_ms = self.t0.elapsed().as_secs_f64() * 1000.0;
        self.record.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        debug!(request = %self.record.request_id, status = self.record.status, outcome = self.record.outcome, "request record");
        let metrics = crate::metrics::get();
        metrics.request(
            &self.record.destination,
            self.record.decision,
            self.record.outcome,
        );
        for (entity, n) in &self.record.masking_counts {
            metrics
                .masked_values
                .get_or_create(&crate::metrics::EntityLabels {
                    entity: entity.clone(),
                })
                .inc_by(u64::try_from(*n).unwrap_or(0));
        }
        self.records
            .submit(Record::Request(Box::new(self.record.clone())))
    }
}

/// What an approval is bound to (requester, destination, method, authority, path and
/// query, meaning-changing headers, body hash) and what reviewers are shown of the
/// request (its recorded, pseudonymized form).
fn approval_binding(
    record: &RequestRecord,
    conn: &ConnContext,
    token: Option<&crate::identity::token::TokenIdentity>,
    parts: &http::request::Parts,
    body: &[u8],
) -> (crate::approval::Binding, crate::approval::RequestSummary) {
    use crate::approval::{Binding, RequestSummary, Requester, TokenName, MEANING_HEADERS};
    use sha2::Digest;
    let w = &conn.workload;
    let token = token.map(|t| TokenName {
        issuer: t.issuer.clone(),
        subject: t.subject.clone(),
        person: t.person.clone(),
    });
    let principal = match &token {
        Some(t) => format!("oidc:{}#{}", t.issuer, t.subject),
        None => format!(
            "uid:{}@{}",
            w.uid,
            w.systemd_unit
                .as_deref()
                .or(w.cgroup_path.as_deref())
                .unwrap_or("-")
        ),
    };
    let headers = MEANING_HEADERS
        .iter()
        .flat_map(|name| {
            parts.headers.get_all(*name).iter().map(move |v| {
                (
                    (*name).to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
        })
        .collect();
    let binding = Binding {
        requester: Requester {
            principal,
            unix: w.user.clone(),
            token,
            names: Vec::new(),
        },
        destination: conn.destination.clone(),
        method: parts.method.to_string(),
        authority: record
            .authority
            .clone()
            .unwrap_or_else(|| record.original_dst.clone()),
        target: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned(),
        headers,
        body_sha256: hex::encode(sha2::Sha256::digest(body)),
    };
    let summary = RequestSummary {
        request_id: record.request_id.clone(),
        destination: conn.destination.clone(),
        method: parts.method.to_string(),
        path: record.path.clone(),
        query: record.query.clone(),
        workload: format!(
            "{} (uid {}), unit {}, {}",
            w.user.as_deref().unwrap_or("?"),
            w.uid,
            w.systemd_unit.as_deref().unwrap_or("-"),
            w.exe_path.as_deref().unwrap_or(&w.comm)
        ),
        policy_ids: record.policy_ids.clone(),
        preview: None,
    };
    (binding, summary)
}

/// Reads a body whole, up to `limit` bytes; the refusal to answer otherwise.
async fn read_whole(mut body: PhiBody, limit: usize) -> Result<bytes::Bytes, Unread> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Unread::Broken(format!("the request body could not be read: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Unread::TooLarge(format!(
                    "a request needing approval is read whole first, and may have at most {limit} bytes"
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

enum Unread {
    TooLarge(String),
    Broken(String),
}

/// A request that needs approval is read whole (to bind the approval to its body's
/// hash) up to this size; larger ones are refused with 413.
const APPROVAL_BODY_LIMIT: usize = 1 << 20;

/// Credentials are recorded as their scheme at most; the rest are copied as text.
const CREDENTIAL_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
];

/// Longest header value kept in a record.
const MAX_HEADER_VALUE: usize = 512;

/// The configured headers as records hold them.
fn selected_headers(
    headers: &http::HeaderMap,
    names: &[String],
    pseudonyms: &Pseudonymizer,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in names {
        let values: Vec<&HeaderValue> = headers.get_all(name.as_str()).iter().collect();
        if values.is_empty() {
            continue;
        }
        let text = if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            values
                .iter()
                .map(|v| match v.to_str().ok().and_then(|v| v.split_once(' ')) {
                    Some((scheme, _)) if name.ends_with("authorization") => {
                        format!("{scheme} [REDACTED]")
                    }
                    _ => "[REDACTED]".to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            let joined = values
                .iter()
                .map(|v| v.to_str().unwrap_or("[binary]"))
                .collect::<Vec<_>>()
                .join(", ");
            if name == "location" || name == "content-location" {
                // A created resource's URL names the patient.
                pseudonyms.redact_path(&joined).0
            } else {
                joined
            }
        };
        let mut text = text;
        if text.len() > MAX_HEADER_VALUE {
            let mut cut = MAX_HEADER_VALUE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        out.insert(name.clone(), text);
    }
    out
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The host (no port) the request names, from the URI or the Host header.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(h) = req.uri().host() {
        return Some(h.trim_start_matches('[').trim_end_matches(']').to_owned());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    let a: http::uri::Authority = host.parse().ok()?;
    Some(
        a.host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

/// hyper needs the handler's future to be Send; when a change breaks that, this says
/// so here rather than deep in hyper's bounds.
#[allow(dead_code)]
fn handle_is_send(p: Arc<Pipeline>, c: Arc<ConnContext>, r: Request<Incoming>) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&p.handle(c, r));
}
