//! One HTTP request's path through phigate, top to bottom:
//!
//! admit -> identify -> authorize -> approve -> forward -> mask -> record
//!
//! Each stage is a step of [`Pipeline::handle`]. A stage that refuses answers the
//! client itself (JSON body, request id) and the refusal is recorded like any other
//! exchange: nothing passes unrecorded.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls_pki_types::ServerName;
use tracing::{debug, warn};

mod conn;
mod refusal;
pub use conn::{ClientTls, ConnContext, TunnelBounds};
pub use refusal::{Code, Refusal};

use crate::config::{Limits, Protocol};
use crate::credential::reflection::{Reflected, Reflection, Unreflected};
use crate::http::body::{
    boxed, find_in_chain, json_error, BodyEnd, BodyTooLarge, Limited, Observed, PhiBody,
    REQUEST_ID_HEADER,
};
use crate::http::forward::{
    strip_hop_by_hop, upstream_uri, ConnectError, Forwarder, UpstreamInfo, UpstreamKey,
};
use crate::mask::body::{MaskReport, MaskedBody, SharedReport};
use crate::mask::config::MaskingSection;
use crate::mask::{BodyMasker, Counts, MaskContext, Profile, ProfileSet};
use crate::policy::gate::{Gatekeeper, Subject};
use crate::policy::{status_for, Reason};
use crate::record::pseudonym::Pseudonymizer;
use crate::record::{
    new_id, Durable, Record, RecordSink, RequestDecision, RequestOutcome, RequestRecord,
};

/// The masking profiles in force and which one applies where.
pub struct Masking {
    pub set: ProfileSet,
    pub ctx: Arc<MaskContext>,
    pub settings: MaskingSection,
    /// By destination index: its `mask_profile`.
    pub by_destination: Vec<Option<Arc<Profile>>>,
    /// By destination index: the review key its unmasked response bodies are sealed to.
    pub seal_by_destination: Vec<Option<Arc<phigate_record::original::ReviewKey>>>,
}

pub struct Pipeline {
    pub forwarder: Forwarder,
    /// What phigate presents upstream, by destination (after the policies permit).
    pub credentials: Arc<crate::credential::Credentials>,
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
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Pipeline {
    /// Takes over from `current`, the pipeline in force: this pipeline's policy set
    /// goes into the gate cell `current` shares with every pipeline before it, and this
    /// one shares that cell from now on, so requests on connections opened before
    /// (which keep their pipeline) are decided by the new set too.
    pub fn take_over_gate(&mut self, current: &Pipeline) {
        current.gate.store(self.gate.load_full());
        self.gate = current.gate.clone();
    }

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

    /// One request, top to bottom: each stage either hands the next what it needs or
    /// stops the request ([`Stop`]); `Exchange::stop` is the one place a stop becomes
    /// phigate's answer and the record.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnContext>,
        req: Request<Incoming>,
    ) -> Result<Response<PhiBody>, Infallible> {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut ex = Exchange::begin(&self, &conn, &req);
        Ok(match self.to_upstream(&mut ex, &conn, req).await {
            Ok(answered) => self.respond(ex, answered).await,
            Err(stop) => ex.stop(stop).await,
        })
    }

    /// The stages before the answer: admit, identify and authorize, approve,
    /// prepare, forward.
    async fn to_upstream(
        &self,
        ex: &mut Exchange,
        conn: &ConnContext,
        req: Request<Incoming>,
    ) -> Result<Answered, Stop> {
        // 0. nothing passes unrecorded: while records cannot be written, refuse.
        if !self.records.writable() {
            return Err(Refusal::new(
                Code::RecordsUnavailable,
                "phigate cannot write its audit records; requests are refused until it can",
            )
            .into());
        }
        // 1. admit: one reading of the request (one credential, one host, one
        //    method), for the host the connection was made for.
        let host = crate::http::admit::admit(&req, expect(conn)).map_err(Refusal::from)?;
        // 2. identify: the caller is the kernel-attested workload of the connection,
        //    plus the OIDC identity of a valid bearer token (the token is never kept).
        // 3. authorize: the policy set decides; deny by default.
        let verdict = self.authorize(ex, conn, &req, host).await?;
        // 4. approve: a permit naming an approval rule holds (or refuses) the request
        //    until reviewers approve this exact request.
        let mut req = req.map(boxed);
        if let Some(rule) = verdict.decision.approval_rule.clone() {
            req = self.approve(ex, conn, &rule, &verdict, req).await?;
        }
        // 5. forward (unless a new policy set revoked this connection meanwhile, e.g.
        //    while the request was held for approval)
        let mut prepared = self.prepare(ex, conn, &verdict, req)?;
        // 6. the destination's own credential, in the app's stead
        let reflection = self
            .present_credential(ex, conn, &mut prepared.request)
            .await?;
        let mut answered = self.forward(ex, prepared).await?;
        answered.reflection = reflection;
        Ok(answered)
    }

    /// Decides the request with the policy set in force, and holds the grant (so a
    /// new set can take it back); a set that lands while deciding decides too.
    async fn authorize(
        &self,
        ex: &mut Exchange,
        conn: &ConnContext,
        req: &Request<Incoming>,
        host: Option<String>,
    ) -> Result<crate::policy::gate::Verdict, Stop> {
        let gate = self.gate.load_full();
        let subject = Subject {
            workload: &conn.workload,
            destination: &conn.destination,
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            host: host.as_deref(),
            sni: expect(conn).sni,
            has_approval: false,
        };
        let verdict = gate
            .check(&subject, None)
            .await
            .map_err(|e| Refusal::new(Code::BadRequest, e.to_string()))?;
        ex.authorized(&verdict, gate.policies.hash());
        if !verdict.decision.allowed {
            return Err(Stop::Denied(verdict.decision));
        }
        ex.grant = Some(conn.grants.grant(verdict.access.clone()));
        if !Arc::ptr_eq(&gate, &self.gate.load()) {
            // A reload landed while deciding: its sweep of open connections may have
            // run before this grant was held.
            let now = self.gate.load_full();
            let d = now.recheck(&conn.workload, &conn.destination, &verdict.access);
            if !d.allowed {
                return Err(ex.denied_by(d, &verdict.access, now.policies.hash()));
            }
        }
        Ok(verdict)
    }

    /// The approval stage: binds an approval to this exact request (its body is read,
    /// up to APPROVAL_BODY_LIMIT, to be hashed) and waits or refuses as the rule says.
    /// Returns the request to forward.
    async fn approve(
        &self,
        ex: &mut Exchange,
        conn: &ConnContext,
        rule_name: &str,
        verdict: &crate::policy::gate::Verdict,
        req: Request<PhiBody>,
    ) -> Result<Request<PhiBody>, Stop> {
        use crate::approval::{Gate, State};
        let Some(rule) = self.approval_rules.get(rule_name).cloned() else {
            // A policy names a rule approvals.toml does not define: nobody could
            // approve it, so it does not pass.
            ex.record.decision = RequestDecision::Deny;
            return Err(Refusal::new(
                Code::ApprovalUnavailable,
                format!("approval rule `{rule_name}` is not defined"),
            )
            .into());
        };
        let (parts, body) = req.into_parts();
        let bytes = read_whole(body, APPROVAL_BODY_LIMIT).await?;
        let token = verdict.access.token.as_ref().ok();
        let (binding, mut summary) = approval_binding(&ex.record, conn, token, &parts, &bytes);
        let profile = self.mask_profile_for(conn, &verdict.decision);
        summary.preview = Some(self.preview(profile.as_ref(), &parts, &bytes));
        match self.approvals.gate(&rule, &binding, summary).await {
            Gate::Proceed {
                approval_id,
                approvers,
                reason,
            } => {
                ex.record.decision = RequestDecision::Approved;
                ex.record.approval_id = Some(approval_id);
                ex.record.approvers = approvers;
                ex.record.approval_reason = Some(reason);
                Ok(Request::from_parts(
                    parts,
                    boxed(http_body_util::Full::new(bytes)),
                ))
            }
            Gate::Refuse {
                approval_id,
                outcome,
            } => {
                let (decision, refusal) = match outcome {
                    State::Pending => (
                        RequestDecision::Held,
                        Refusal::new(
                            Code::ApprovalPending,
                            "this request waits for a reviewer's approval; repeat it once approved",
                        ),
                    ),
                    State::Denied => (
                        RequestDecision::Deny,
                        Refusal::new(Code::ApprovalDenied, "a reviewer denied this request"),
                    ),
                    _ => (
                        RequestDecision::Expired,
                        Refusal::new(
                            Code::ApprovalExpired,
                            "no reviewer approved this request in time",
                        ),
                    ),
                };
                ex.record.decision = decision;
                ex.record.approval_id = Some(approval_id.clone());
                Err(Stop::Approval {
                    approval_id,
                    refusal,
                })
            }
            Gate::TooMany { max } => {
                ex.record.decision = RequestDecision::Held;
                Err(Refusal::new(
                    Code::TooManyPendingApprovals,
                    format!(
                        "you have {max} requests waiting for approval already; wait for a decision on them"
                    ),
                )
                .into())
            }
            Gate::Unavailable(e) => Err(Refusal::new(
                Code::RecordsUnavailable,
                format!("the approval could not be recorded: {e}"),
            )
            .into()),
        }
    }

    /// The request as it goes upstream: still allowed on this connection, within
    /// the size limit, an upgrade only where allowed and never under masking, the
    /// authorized (normalized) path, hop-by-hop headers gone, the body masked when
    /// the profile masks requests.
    fn prepare(
        &self,
        ex: &mut Exchange,
        conn: &ConnContext,
        verdict: &crate::policy::gate::Verdict,
        mut req: Request<PhiBody>,
    ) -> Result<Prepared, Stop> {
        if conn.grants.is_revoked() {
            let why = conn.grants.reason().map(ToString::to_string);
            return Err(Refusal::new(
                Code::AccessRevoked,
                why.unwrap_or_else(|| "the policy set no longer allows this connection".into()),
            )
            .into());
        }
        let limit = self.limits.max_request_body_bytes;
        if let Some(len) = content_length(&req).filter(|len| *len > limit) {
            return Err(Refusal::new(
                Code::RequestTooLarge,
                format!("request body of {len} bytes exceeds the limit of {limit} bytes"),
            )
            .into());
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let key = self
            .upstream_key(conn, &req)
            .map_err(|reason| Refusal::new(Code::BadRequest, reason))?;
        let profile = self.mask_profile_for(conn, &verdict.decision);
        if upgrade {
            // What follows a switch of protocols is a tunnel: an UPGRADE passage of
            // its own, and never under masking (its bytes cannot be read).
            if profile.is_some() {
                return Err(Refusal::new(
                    Code::UpgradeRefused,
                    "a protocol upgrade carries bytes that masking cannot read; refused under a masking obligation",
                )
                .into());
            }
            let gate = self.gate.load_full();
            let d = gate.check_upgrade(&conn.workload, &conn.destination, &verdict.access);
            if !d.allowed {
                return Err(ex.denied_by(d, &verdict.access, gate.policies.hash()));
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
        parts.uri = upstream_uri(key.server_name.is_some(), &authority, &path)
            .map_err(|e| Refusal::new(Code::BadRequest, format!("invalid request target: {e}")))?;
        let body = Limited::new(Observed::counting(body, ex.request_bytes.clone()), limit);
        let body = match profile
            .as_ref()
            .filter(|_| self.masking.settings.mask_requests)
        {
            Some(p) => ex
                .mask_request(&mut parts, body, p, &self.masking)
                .map_err(|reason| {
                    Refusal::new(Code::MaskingFailed, reason).with_status(StatusCode::BAD_REQUEST)
                })?,
            None => boxed(body),
        };
        Ok(Prepared {
            key,
            request: Request::from_parts(parts, body),
            client_upgrade,
            profile,
        })
    }

    /// Puts the destination's credential (`upstream_auth`) into the permitted
    /// request, replacing the client's; the record names it and how it was obtained.
    /// No credential, no request: it never goes out with the client's instead.
    /// Returns what the credential looks like, so that the answer never repeats it.
    async fn present_credential(
        &self,
        ex: &mut Exchange,
        conn: &ConnContext,
        req: &mut Request<PhiBody>,
    ) -> Result<Option<Reflection>, Stop> {
        let Some(cred) = self.credentials.for_destination(conn.dest_index) else {
            return Ok(None);
        };
        ex.record.upstream_credential = Some(cred.id.clone());
        let (how, reflection) = cred.present(req.headers_mut()).await.map_err(|reason| {
            warn!(request = %ex.record.request_id, credential = %cred.id, reason = %reason, "upstream credential unavailable");
            Refusal::new(Code::UpstreamCredentialUnavailable, reason)
        })?;
        ex.record.upstream_credential_source = Some(how.as_str().to_owned());
        Ok(reflection)
    }

    /// Sends the request upstream within the request timeout.
    async fn forward(&self, ex: &mut Exchange, p: Prepared) -> Result<Answered, Stop> {
        let upstream_t0 = Instant::now();
        let sent =
            tokio::time::timeout(self.request_timeout, self.forwarder.send(&p.key, p.request))
                .await;
        self.metrics
            .observe(crate::metrics::Stage::Upstream, upstream_t0.elapsed());
        let response = match sent {
            Err(_) => {
                return Err(Refusal::new(
                    Code::UpstreamTimeout,
                    format!(
                        "the upstream did not answer within {:?}",
                        self.request_timeout
                    ),
                )
                .into())
            }
            Ok(Err(e)) => return Err(Stop::UpstreamFailed(e)),
            Ok(Ok(r)) => r,
        };
        let info = response
            .extensions()
            .get::<UpstreamInfo>()
            .cloned()
            .unwrap_or_default();
        ex.with_upstream(&info, response.version());
        Ok(Answered {
            response,
            client_upgrade: p.client_upgrade,
            profile: p.profile,
            reflection: None,
        })
    }

    /// The upstream's answer to the client: a switch of protocols becomes a bounded
    /// tunnel; otherwise 6. mask (the profile chosen for this request rewrites
    /// headers and body) and 7. record (written when the last byte of the response
    /// has passed; its end is released only once the record is durable).
    async fn respond(&self, mut ex: Exchange, a: Answered) -> Response<PhiBody> {
        let mut resp = a.response;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = a.client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let (parts, _) = resp.into_parts();
                ex.record.upgraded = true;
                let resp = ex.finish_head(Response::from_parts(parts, crate::http::body::empty()));
                ex.relay_upgraded(client_upgrade, upstream_upgrade);
                return resp;
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        // An upstream that echoes its request would hand the app phigate's
        // credential: a header repeating it is refused, a body cut off before it.
        if let Some(r) = &a.reflection {
            if let Some(name) = r.in_headers(&parts.headers) {
                let reason = format!(
                    "the upstream's response header `{name}` repeats the credential `{}` phigate presented",
                    r.id()
                );
                warn!(request = %ex.record.request_id, credential = %r.id(), header = %name, "upstream response repeats the presented credential; refused");
                return ex
                    .refuse(Refusal::new(Code::CredentialReflected, reason))
                    .await;
            }
        }
        let mut body = Unreflected::new(body, a.reflection);
        if let Err(e) = body.first_frame(REFLECTION_FIRST_FRAME_WAIT).await {
            return ex
                .refuse(Refusal::new(Code::CredentialReflected, e.to_string()))
                .await;
        }
        match a.profile {
            Some(profile) => {
                ex.masked_response(parts, body, profile, &self.masking)
                    .await
            }
            None => ex.stream_response(parts, body).await,
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
                crate::mask::mask_body(p, &self.masking.ctx, kind, encoding, body, &self.metrics)
                    .ok()
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

/// The client gets the decoded, masked representation: no encoding, length or
/// digest of the upstream's bytes, and only a weak validator.
fn decoded_representation(headers: &mut http::HeaderMap) {
    for h in [
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        HeaderName::from_static("content-md5"),
        HeaderName::from_static("digest"),
        HeaderName::from_static("content-digest"),
        HeaderName::from_static("repr-digest"),
    ] {
        headers.remove(h);
    }
    let strong = headers
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|e| !e.starts_with("W/"))
        .map(|e| format!("W/{e}"));
    if let Some(weak) = strong.and_then(|e| HeaderValue::from_str(&e).ok()) {
        headers.insert(header::ETAG, weak);
    }
}

/// Which body a masking report is about.
#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Request => "request",
            Side::Response => "response",
        }
    }
}

/// Why a request stops before the upstream answers it.
enum Stop {
    /// A stage refused it.
    Refused(Refusal),
    /// The policies denied it (the decision names the policies).
    Denied(crate::policy::Decision),
    /// An approval holds it, or was denied or expired: the answer names it.
    Approval {
        approval_id: String,
        refusal: Refusal,
    },
    /// The upstream could not be reached or failed.
    UpstreamFailed(hyper_util::client::legacy::Error),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refused(r)
    }
}

/// A request ready to go upstream, and what its answer needs.
struct Prepared {
    key: UpstreamKey,
    request: Request<PhiBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    profile: Option<Arc<Profile>>,
}

/// The upstream's answer, and what relaying it needs.
struct Answered {
    response: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    profile: Option<Arc<Profile>>,
    /// The credential phigate presented, which the answer must not repeat.
    reflection: Option<Reflection>,
}

/// What the connection fixes about its requests: the TLS name and the hosts served.
fn expect(conn: &ConnContext) -> crate::http::admit::Expect<'_> {
    crate::http::admit::Expect {
        sni: conn.tls.as_ref().and_then(|t| t.sni.as_deref()),
        hosts: &conn.hosts,
    }
}

/// One exchange in progress: the record being filled in.
struct Exchange {
    conn: Arc<ConnContext>,
    records: Arc<dyn RecordSink>,
    metrics: Arc<crate::metrics::Metrics>,
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
            self.record.outcome = RequestOutcome::ClientAborted;
            // Nobody is left to wait for it; the journal reports its own failures.
            drop(self.write());
        }
    }
}

/// How long the head of a response from a destination with `upstream_auth` waits
/// for the body's first frame, so that an echo of the request is a clean 502 rather
/// than a response cut off (a body that comes later is still searched as it flows).
const REFLECTION_FIRST_FRAME_WAIT: Duration = Duration::from_millis(500);

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
            metrics: p.metrics.clone(),
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
                upstream_credential: None,
                upstream_credential_source: None,
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
                decision: RequestDecision::Allow,
                policy_ids: Vec::new(),
                policy_set_hash: None,
                masking_profile: None,
                masking_counts: BTreeMap::new(),
                masking_set_hash: None,
                approval_id: None,
                approvers: Vec::new(),
                approval_reason: None,
                upgraded: false,
                outcome: RequestOutcome::Complete,
                error: None,
                response_original_sealed: None,
                response_original_key_id: None,
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
        self.record.decision = if v.decision.allowed {
            RequestDecision::Allow
        } else {
            RequestDecision::Deny
        };
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
        self.record.outcome = RequestOutcome::Refused;
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

    fn with_upstream(&mut self, info: &UpstreamInfo, version: http::Version) {
        self.record.upstream_http_version = Some(format!("{version:?}"));
        self.record.upstream_tls_version = info.tls_version.clone();
        self.record.upstream_cert_subject = info.cert_subject.clone();
    }

    /// A later decision (a set that landed while deciding, the upgrade) denied what
    /// the first allowed: the record names the one that denied.
    fn denied_by(
        &mut self,
        d: crate::policy::Decision,
        access: &Arc<crate::policy::gate::Access>,
        set_hash: &str,
    ) -> Stop {
        self.authorized(
            &crate::policy::gate::Verdict {
                decision: d.clone(),
                access: access.clone(),
            },
            set_hash,
        );
        Stop::Denied(d)
    }

    /// The one place a stopped request becomes phigate's answer and its record.
    async fn stop(self, stop: Stop) -> Response<PhiBody> {
        match stop {
            Stop::Refused(r) => self.refuse(r).await,
            Stop::Denied(d) => self.deny(&d).await,
            Stop::UpstreamFailed(e) => self.upstream_failed(&e).await,
            Stop::Approval {
                approval_id,
                refusal,
            } => {
                let mut resp = crate::http::body::json_approval(
                    refusal.code.as_str(),
                    &refusal.reason,
                    &approval_id,
                    &self.record.request_id,
                );
                if let Ok(v) = HeaderValue::from_str(&approval_id) {
                    resp.headers_mut()
                        .insert(crate::approval::APPROVAL_ID_HEADER, v);
                }
                self.refuse_with(resp, refusal).await
            }
        }
    }

    /// phigate answers the client itself: the one place a stage's refusal becomes
    /// the JSON answer and the record (written, and durable, first).
    async fn refuse(self, r: Refusal) -> Response<PhiBody> {
        let resp = json_error(
            r.status,
            r.code.as_str(),
            &r.reason,
            &self.record.request_id,
        );
        self.refuse_with(resp, r).await
    }

    /// Like `refuse`, with the answer already made (an approval's, which names it).
    async fn refuse_with(mut self, resp: Response<PhiBody>, r: Refusal) -> Response<PhiBody> {
        self.record.outcome = r.code.outcome();
        self.record.error = Some(r.reason);
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
                .refuse(Refusal::new(Code::RequestTooLarge, &reason))
                .await;
        }
        let reason = match find_in_chain::<ConnectError>(e) {
            Some(c) => c.to_string(),
            None => format!("upstream request failed: {}", crate::http::error_chain(e)),
        };
        warn!(request = %self.record.request_id, reason = %reason, "upstream failed");
        self.refuse(Refusal::new(Code::UpstreamUnavailable, &reason))
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
                    self.record.outcome = RequestOutcome::UpstreamError;
                    self.record.error = Some(format!("response body failed mid-stream: {e}"));
                }
                BodyEnd::Dropped => {
                    self.record.outcome = RequestOutcome::ClientAborted;
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
            let meter = crate::io::Meter::new(std::time::Instant::now());
            let relay = async {
                let (c, u) = tokio::try_join!(client, upstream)?;
                let mut c =
                    crate::io::Metered::new(hyper_util::rt::TokioIo::new(c), Arc::clone(&meter));
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
                    Err(e) => Some((RequestOutcome::UpgradeFailed, Some(e.to_string()))),
                },
                _ = grants.revoked().cancelled() => {
                    Some((RequestOutcome::Revoked, grants.reason().map(ToString::to_string)))
                }
                _ = meter.idle_for(bounds.idle) => Some((RequestOutcome::IdleTimeout, None)),
                _ = tokio::time::sleep_until(bounds.lifetime_end) => Some((RequestOutcome::LifetimeExceeded, None)),
                _ = bounds.drain.cancelled() => Some((RequestOutcome::Drained, None)),
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
        mut body: Unreflected<Incoming>,
        profile: Arc<Profile>,
        masking: &Masking,
    ) -> Response<PhiBody> {
        use http_body_util::BodyExt;
        if let Err(r) = self.mask_response_head(&mut parts, &profile, masking) {
            return self.refuse(r).await;
        }
        if http_body::Body::is_end_stream(&body) {
            return self.stream_response(parts, body).await;
        }
        let mut masker = match self.response_masker(&parts, &profile, masking) {
            Ok(Some(m)) => m,
            Ok(None) => return self.stream_response(parts, body).await,
            Err(r) => return self.refuse(r).await,
        };
        let announced: Option<u64> =
            header_text(&parts.headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let original_headers = profile.pass_unparsable.then(|| parts.headers.clone());
        decoded_representation(&mut parts.headers);
        let settings = &masking.settings;
        let report: SharedReport = Arc::new(std::sync::Mutex::new(MaskReport::default()));
        self.mask_report = Some(report.clone());
        let mut out = Vec::new();
        let mut raw = profile.pass_unparsable.then(Vec::new);
        // The original as the upstream sent it, up to the record body size, for the
        // destination's review key (only ever leaves here sealed).
        let seal_key = masking
            .seal_by_destination
            .get(self.conn.dest_index)
            .cloned()
            .flatten();
        let mut original = seal_key.as_ref().map(|_| Vec::new());
        let mut original_truncated = false;
        // Bodies announced to fit buffer_bytes are masked whole. Any other (larger,
        // or of unknown length) is still held until its first STREAM_HEAD_BYTES
        // are masked, so that a body that is not what it claims (an error page, a
        // hostile nesting) is answered with a 502 rather than a response cut short;
        // a short body without a length still ends within that head, whole.
        let hold = match announced {
            Some(n) if n <= settings.buffer_bytes as u64 => settings.buffer_bytes,
            _ => settings.buffer_bytes.min(STREAM_HEAD_BYTES),
        };
        loop {
            let step = match body.frame().await {
                None => {
                    crate::mask::finish_body(&mut masker, &mut out, &self.metrics).map(|()| true)
                }
                Some(Err(e)) => {
                    let code = match e.downcast_ref::<Reflected>() {
                        Some(_) => Code::CredentialReflected,
                        None => Code::UpstreamUnavailable,
                    };
                    let reason = format!("the upstream response body failed: {e}");
                    return self.refuse(Refusal::new(code, &reason)).await;
                }
                // Trailers of a buffered body are dropped: the body is whole.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(r) = &mut raw {
                            r.extend_from_slice(&data);
                        }
                        if let Some(o) = &mut original {
                            let room = settings.record_body_bytes.saturating_sub(o.len());
                            original_truncated |= data.len() > room;
                            o.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        masker.push(&data, &mut out).map(|()| false)
                    }
                    Err(_) => Ok(false),
                },
            };
            if let (Ok(true), Some(key), Some(o)) = (&step, &seal_key, &original) {
                if let Err(r) = self.seal_original(key, o, original_truncated) {
                    return self.refuse(r).await;
                }
            }
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
                        .refuse(Refusal::new(Code::MaskingFailed, e.to_string()))
                        .await;
                }
            }
        }
        // Too large to hold: stream; a failure from here on aborts the response.
        {
            let mut r = report.lock().expect("report lock");
            r.keep(&out, settings.record_body_bytes);
            // The original goes on being kept as it streams; sealed with the record.
            if let (Some(key), Some(body)) = (seal_key, original) {
                r.original = Some(crate::mask::body::OriginalCapture {
                    key,
                    body,
                    truncated: original_truncated,
                });
            }
        }
        let masked = MaskedBody::new(
            body,
            masker,
            Some(bytes::Bytes::from(out)),
            report,
            settings.record_body_bytes,
            self.metrics.clone(),
        );
        self.stream_response(parts, masked).await
    }

    /// Seals the original body to the destination's review key into the record.
    /// Fails closed: a body that cannot be sealed is not passed on.
    fn seal_original(
        &mut self,
        key: &phigate_record::original::ReviewKey,
        body: &[u8],
        truncated: bool,
    ) -> Result<(), Refusal> {
        match key.seal(&self.record.request_id, body, truncated) {
            Ok(blob) => {
                self.record.response_original_sealed = Some(blob);
                self.record.response_original_key_id = Some(key.key_id());
                Ok(())
            }
            Err(e) => Err(Refusal::new(
                Code::MaskingFailed,
                format!("the original response could not be sealed to the review key: {e}"),
            )),
        }
    }

    /// The masked response's head: the profile noted in the record, its header rules
    /// applied and counted. A 206 is refused.
    fn mask_response_head(
        &mut self,
        parts: &mut http::response::Parts,
        profile: &Profile,
        masking: &Masking,
    ) -> Result<(), Refusal> {
        self.record.masking_profile = Some(profile.name.clone());
        self.record.masking_set_hash = Some(masking.set.hash().to_owned());
        let mut header_counts = Counts::new(profile);
        crate::mask::mask_headers(
            profile,
            &masking.ctx,
            &mut parts.headers,
            &mut header_counts,
        );
        self.record.masking_counts = header_counts.by_entity(profile);
        // Range headers were removed before forwarding: a 206 is a part of a
        // document that would be masked as a whole document of its own.
        if parts.status == StatusCode::PARTIAL_CONTENT {
            return Err(Refusal::new(
                Code::MaskingFailed,
                "the upstream answered with part of a document (206), which cannot be masked",
            ));
        }
        Ok(())
    }

    /// What masks the response's body, by its content type and encoding. `None`: the
    /// profile lets this content type pass unmasked (noted in the record).
    fn response_masker(
        &mut self,
        parts: &http::response::Parts,
        profile: &Arc<Profile>,
        masking: &Masking,
    ) -> Result<Option<BodyMasker>, Refusal> {
        let content_type = header_text(&parts.headers, header::CONTENT_TYPE);
        let Some(kind) = crate::mask::body_kind(content_type.as_deref()) else {
            if profile.passes_through(content_type.as_deref()) {
                self.record.error = Some(format!(
                    "body not masked: content type `{}` passes through under profile `{}`",
                    content_type.as_deref().unwrap_or(""),
                    profile.name
                ));
                return Ok(None);
            }
            let reason = format!(
                "the response's content type `{}` is not one masking profile `{}` can mask, and the profile does not let it pass",
                content_type.as_deref().unwrap_or("(none)"),
                profile.name
            );
            return Err(Refusal::new(Code::MaskingFailed, &reason));
        };
        let encoding = header_text(&parts.headers, header::CONTENT_ENCODING);
        BodyMasker::new(
            profile.clone(),
            masking.ctx.clone(),
            kind,
            encoding.as_deref(),
        )
        .map(Some)
        .map_err(|e| Refusal::new(Code::MaskingFailed, e.to_string()))
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
            self.metrics.clone(),
        )))
    }

    /// Moves what masking learned into the record.
    fn take_masking(&mut self) {
        let reports = [
            (self.mask_report.take(), Side::Response),
            (self.request_mask_report.take(), Side::Request),
        ];
        for (report, side) in reports {
            let Some(r) = report else { continue };
            let mut r = r.lock().expect("report lock");
            if let Some(o) = r.original.take() {
                // Streamed: the client has its masked body; a seal that fails leaves
                // no original (never one in clear) and marks the record.
                match o.key.seal(&self.record.request_id, &o.body, o.truncated) {
                    Ok(blob) => {
                        self.record.response_original_sealed = Some(blob);
                        self.record.response_original_key_id = Some(o.key.key_id());
                    }
                    Err(e) => {
                        self.record.outcome = RequestOutcome::MaskingFailed;
                        self.record.error =
                            Some(format!("the original response could not be sealed: {e}"));
                    }
                }
            }
            for (k, v) in &r.counts {
                *self.record.masking_counts.entry(k.clone()).or_default() += v;
            }
            if !r.recorded.is_empty() {
                let body = Some(String::from_utf8_lossy(&r.recorded).into_owned());
                match side {
                    Side::Response => {
                        self.record.response_body = body;
                        self.record.response_body_truncated = r.truncated;
                    }
                    Side::Request => {
                        self.record.request_body = body;
                        self.record.request_body_truncated = r.truncated;
                    }
                }
            }
            if let Some(e) = &r.error {
                self.record.outcome = RequestOutcome::MaskingFailed;
                self.record.error = Some(format!(
                    "{} body masking failed; the {} was cut off: {e}",
                    side.as_str(),
                    side.as_str()
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
        debug!(request = %self.record.request_id, status = self.record.status, outcome = self.record.outcome.as_str(), "request record");
        let metrics = &self.metrics;
        metrics.request(
            &self.record.destination,
            self.record.decision.as_str(),
            self.record.outcome.as_str(),
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
async fn read_whole(mut body: PhiBody, limit: usize) -> Result<bytes::Bytes, Refusal> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Refusal::new(
                Code::BadRequest,
                format!("the request body could not be read: {e}"),
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(Refusal::new(
                    Code::RequestTooLarge,
                    format!(
                        "a request needing approval is read whole first, and may have at most {limit} bytes"
                    ),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
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

/// A header's value as text, when it is text.
fn header_text(h: &http::HeaderMap, name: HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_owned)
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
