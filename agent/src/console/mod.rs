//! The reviewer console: a small HTTPS site on the admin side (apart from the data
//! plane) where reviewers log in, see the requests waiting for them, approve or deny
//! with a reason, and look back at recent decisions.
//!
//! Security: the certificate is minted from phigate's local CA; accounts are local,
//! with Argon2id password hashes in a 0600 file, checked at most two at a time and
//! behind a backoff per account and per address ([`guard`]); sessions are random
//! 256-bit tokens in `__Host-` `HttpOnly; Secure; SameSite=Strict` cookies that end
//! after 15 idle minutes or 8 hours in all;
//! every form carries the session's CSRF token and the Origin is checked; URLs carry
//! only approval ids, never PHI; pages are `no-store` with a strict CSP.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod guard;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::approval::{Approval, Approvals, Reviewer, State, Verdict};
use crate::tls::{LeafMinter, LeafName};
use accounts::Accounts;

/// `__Host-`: the browser keeps it only if Secure, for this host, for path `/`, so
/// no other site or subdomain can plant or shadow it.
const COOKIE: &str = "__Host-phigate_console";
const IDLE: Duration = Duration::from_secs(15 * 60);
/// A session ends this long after sign-in, however active.
const ABSOLUTE: Duration = Duration::from_secs(8 * 3600);

struct Session {
    reviewer: Reviewer,
    csrf: String,
    started: Instant,
    last_seen: Instant,
}

pub struct Console {
    approvals: Arc<Approvals>,
    accounts: Accounts,
    sessions: Mutex<HashMap<String, Session>>,
    sign_in: guard::SignInGuard,
    /// `https://host:port`, for the Origin check.
    origin: String,
}

impl Console {
    pub fn new(approvals: Arc<Approvals>, accounts: Accounts, origin: String) -> Console {
        Console {
            approvals,
            accounts,
            sessions: Mutex::new(HashMap::new()),
            sign_in: guard::SignInGuard::default(),
            origin,
        }
    }

    /// Serves HTTPS on `listener` with a leaf for `name` until the task is dropped.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        minter: Arc<LeafMinter>,
        name: LeafName,
    ) -> anyhow::Result<()> {
        let tls = crate::tls::server_config(&minter, &name, &[b"http/1.1".to_vec()])?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        info!(addr = %listener.local_addr()?, "reviewer console listening");
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, this) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req, peer).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let session = self.session_of(&req);
        match (&method, path.as_str()) {
            (&Method::GET, "/") => redirect("/approvals"),
            (&Method::GET, "/login") => page("Sign in", &login_form(None), None),
            (&Method::POST, "/login") => self.login(req, peer).await,
            (&Method::POST, "/logout") => match session {
                Some((token, csrf)) => {
                    let form = form(req).await;
                    if !self.same_origin_and_token(&form, &csrf) {
                        return forbidden();
                    }
                    self.lock().remove(&token);
                    let mut r = redirect("/login");
                    clear_cookie(&mut r);
                    r
                }
                None => redirect("/login"),
            },
            _ => {
                let Some((token, csrf)) = session else {
                    return redirect("/login");
                };
                let reviewer = match self.lock().get(&token) {
                    Some(s) => s.reviewer.clone(),
                    None => return redirect("/login"),
                };
                self.authed(req, &method, &path, &reviewer, &csrf).await
            }
        }
    }

    async fn authed(
        &self,
        req: Request<Incoming>,
        method: &Method,
        path: &str,
        reviewer: &Reviewer,
        csrf: &str,
    ) -> Response<Full<Bytes>> {
        let may_see = |a: &Approval| a.reviewers.iter().any(|g| reviewer.groups.contains(g));
        match (method, path) {
            (&Method::GET, "/approvals") => {
                let open: Vec<Approval> = self
                    .approvals
                    .list()
                    .into_iter()
                    .filter(|a| a.state == State::Pending && may_see(a))
                    .collect();
                page(
                    "Waiting for review",
                    &list_page(&open),
                    Some((reviewer, csrf)),
                )
            }
            (&Method::GET, "/history") => {
                let done: Vec<Approval> = self
                    .approvals
                    .history()
                    .into_iter()
                    .filter(may_see)
                    .collect();
                page("History", &history_page(&done), Some((reviewer, csrf)))
            }
            (&Method::GET, p) if p.starts_with("/approvals/") => {
                let id = &p["/approvals/".len()..];
                match self.approvals.get(id).filter(may_see) {
                    Some(a) => page(
                        "Request",
                        &detail_page(&a, csrf, None),
                        Some((reviewer, csrf)),
                    ),
                    None => not_found(),
                }
            }
            (&Method::POST, p) if p.starts_with("/approvals/") && p.ends_with("/decide") => {
                let id = p["/approvals/".len()..p.len() - "/decide".len()].to_owned();
                let form = form(req).await;
                if !self.same_origin_and_token(&form, csrf) {
                    return forbidden();
                }
                let verdict = match form.fields.get("verdict").map(String::as_str) {
                    Some("approve") => Verdict::Approve,
                    Some("deny") => Verdict::Deny,
                    _ => return bad_request("choose approve or deny"),
                };
                let reason = form.fields.get("reason").cloned().unwrap_or_default();
                match self.approvals.decide(&id, reviewer, verdict, &reason).await {
                    Ok(_) => redirect(&format!("/approvals/{id}")),
                    Err(e) => match self.approvals.get(&id).filter(may_see) {
                        Some(a) => with_status(
                            page(
                                "Request",
                                &detail_page(&a, csrf, Some(&e.to_string())),
                                Some((reviewer, csrf)),
                            ),
                            StatusCode::UNPROCESSABLE_ENTITY,
                        ),
                        None => not_found(),
                    },
                }
            }
            _ => not_found(),
        }
    }

    async fn login(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let form = form(req).await;
        if form.origin.as_deref().is_some_and(|o| o != self.origin) {
            warn!(origin = ?form.origin, expected = %self.origin, "console login from a foreign origin refused");
            return forbidden();
        }
        let name = form.fields.get("username").cloned().unwrap_or_default();
        let password = form.fields.get("password").cloned().unwrap_or_default();
        let permit = match self.sign_in.admit(&name, peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                warn!(user = %name, peer = %peer, ?refused, "console sign-in not checked");
                let (status, text, retry) = match refused {
                    guard::Refused::Busy => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many sign-ins at once; try again in a moment",
                        1,
                    ),
                    guard::Refused::Backoff(d) => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many failed sign-ins; wait before trying again",
                        d.as_secs().max(1),
                    ),
                };
                let mut r = with_status(page("Sign in", &login_form(Some(text)), None), status);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry));
                return r;
            }
        };
        let verified = {
            let accounts = self.accounts.clone();
            let (n, p) = (name.clone(), password);
            tokio::task::spawn_blocking(move || accounts.verify(&n, &p))
                .await
                .ok()
                .flatten()
        };
        drop(permit);
        let Some(groups) = verified else {
            self.sign_in.failed(&name, peer.ip());
            warn!(user = %name, peer = %peer, "console login failed");
            // Slows guessing; the same for unknown users and wrong passwords.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return with_status(
                page(
                    "Sign in",
                    &login_form(Some("wrong user name or password")),
                    None,
                ),
                StatusCode::UNAUTHORIZED,
            );
        };
        self.sign_in.succeeded(&name);
        info!(user = %name, peer = %peer, "console login");
        let token = random_token();
        self.lock().insert(
            token.clone(),
            Session {
                reviewer: Reviewer {
                    name,
                    groups,
                    via: crate::approval::Via::Console,
                },
                csrf: random_token(),
                started: Instant::now(),
                last_seen: Instant::now(),
            },
        );
        let mut r = redirect("/approvals");
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict"
        )) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live session's token and CSRF token (idle sessions end: automatic logoff).
    fn session_of<B>(&self, req: &Request<B>) -> Option<(String, String)> {
        let token = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_owned())?;
        let mut sessions = self.lock();
        sessions.retain(|_, s| s.last_seen.elapsed() < IDLE && s.started.elapsed() < ABSOLUTE);
        let s = sessions.get_mut(&token)?;
        s.last_seen = Instant::now();
        Some((token, s.csrf.clone()))
    }

    fn same_origin_and_token(&self, form: &Form, csrf: &str) -> bool {
        let origin_ok = form.origin.as_deref().is_none_or(|o| o == self.origin);
        let token_ok = form
            .fields
            .get("csrf")
            .is_some_and(|t| constant_time_eq(t.as_bytes(), csrf.as_bytes()));
        origin_ok && token_ok
    }
}

struct Form {
    fields: HashMap<String, String>,
    origin: Option<String>,
}

/// A urlencoded form body (at most 16 KiB).
async fn form(req: Request<Incoming>) -> Form {
    // Browsers send `Origin: null` where they withhold the origin (privacy modes,
    // some policies): that says nothing, like no header; a real foreign origin is
    // refused, and the CSRF token stays the check that counts.
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|o| *o != "null")
        .map(str::to_owned);
    let body = Limited::new(req.into_body(), 16 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let fields = url_decode_pairs(&body);
    Form { fields, origin }
}

fn url_decode_pairs(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    hex::encode(b)
}

// ---- pages -------------------------------------------------------------------------

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn time_of(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

fn page(title: &str, body: &str, who: Option<(&Reviewer, &str)>) -> Response<Full<Bytes>> {
    let nav = match who {
        Some((r, csrf)) => format!(
            r#"<nav><a href="/approvals">Waiting</a> <a href="/history">History</a>
<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" value="{csrf}">
<button id="logout">Sign out {name}</button></form></nav>"#,
            csrf = esc(csrf),
            name = esc(&r.name)
        ),
        None => String::new(),
    };
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>phigate: {t}</title>
<style>body{{font:15px system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left}}
nav{{margin-bottom:1em}}nav a{{margin-right:1em}}.inline{{display:inline}}.error{{color:#b00}}
textarea{{width:100%}}code{{background:#f4f4f4}}</style></head>
<body><h1>phigate: {t}</h1>{nav}{body}</body></html>"#,
        t = esc(title)
    );
    let mut r = Response::new(Full::new(Bytes::from(html)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    r
}

fn login_form(error: Option<&str>) -> String {
    format!(
        r#"{err}<form method="post" action="/login">
<p><label>User <input name="username" id="username" autocomplete="username" required></label></p>
<p><label>Password <input name="password" id="password" type="password" autocomplete="current-password" required></label></p>
<p><button id="signin">Sign in</button></p></form>"#,
        err = error
            .map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e)))
            .unwrap_or_default()
    )
}

fn list_page(open: &[Approval]) -> String {
    if open.is_empty() {
        return r#"<p id="empty">Nothing is waiting for you.</p>"#.into();
    }
    let rows: String = open
        .iter()
        .map(|a| {
            format!(
                r#"<tr><td>{t}</td><td>{rule}</td><td>{who}</td><td><code>{m} {d} {p}</code></td><td>{n} of {q}</td><td><a class="open" href="/approvals/{id}">review</a></td></tr>"#,
                t = time_of(a.created_us),
                rule = esc(&a.rule),
                who = esc(&a.requester_label()),
                m = esc(&a.summary.method),
                d = esc(&a.summary.destination),
                p = esc(&a.summary.path),
                n = a.approvals.len(),
                q = a.quorum,
                id = esc(&a.id),
            )
        })
        .collect();
    format!(
        "<table id=\"pending\"><tr><th>asked</th><th>rule</th><th>requester</th><th>request</th><th>approvals</th><th></th></tr>{rows}</table>"
    )
}

fn history_page(done: &[Approval]) -> String {
    if done.is_empty() {
        return "<p>No decisions since the agent started (the approvals table holds them all).</p>"
            .into();
    }
    let rows: String = done
        .iter()
        .map(|a| {
            let who: Vec<String> = a
                .approvals
                .iter()
                .chain(a.denial.iter())
                .map(|v| format!("{} ({})", esc(&v.reviewer), esc(&v.reason)))
                .collect();
            format!(
                r#"<tr><td>{t}</td><td>{s}</td><td>{rule}</td><td>{req}</td><td><code>{m} {p}</code></td><td>{who}</td></tr>"#,
                t = time_of(a.created_us),
                s = a.state.as_str(),
                rule = esc(&a.rule),
                req = esc(&a.requester.principal),
                m = esc(&a.summary.method),
                p = esc(&a.summary.path),
                who = who.join(", "),
            )
        })
        .collect();
    format!(
        "<table id=\"history\"><tr><th>asked</th><th>outcome</th><th>rule</th><th>requester</th><th>request</th><th>reviewers</th></tr>{rows}</table>"
    )
}

fn detail_page(a: &Approval, csrf: &str, error: Option<&str>) -> String {
    let votes: String = a
        .approvals
        .iter()
        .map(|v| {
            format!(
                "<li>approved by {} at {}: {}</li>",
                esc(&v.reviewer),
                time_of(v.time_us),
                esc(&v.reason)
            )
        })
        .chain(a.denial.iter().map(|v| {
            format!(
                "<li>denied by {} at {}: {}</li>",
                esc(&v.reviewer),
                time_of(v.time_us),
                esc(&v.reason)
            )
        }))
        .collect();
    let decide = if a.state == State::Pending {
        format!(
            r#"<form method="post" action="/approvals/{id}/decide">
<input type="hidden" name="csrf" value="{csrf}">
<p><label>Reason (required, recorded)<br><textarea name="reason" id="reason" rows="3" required></textarea></label></p>
<p><button name="verdict" value="approve" id="approve">Approve</button>
<button name="verdict" value="deny" id="deny">Deny</button></p></form>"#,
            id = esc(&a.id),
            csrf = esc(csrf)
        )
    } else {
        String::new()
    };
    format!(
        r#"{err}<dl>
<dt>Approval</dt><dd><code>{id}</code></dd>
<dt>State</dt><dd id="state">{state}</dd>
<dt>Rule</dt><dd>{rule} (needs {q} approval(s) from: {groups})</dd>
<dt>Requester</dt><dd>{who}</dd>
<dt>Workload</dt><dd>{wl}</dd>
<dt>Request</dt><dd><code>{m} {d} {p}{qs}</code></dd>
<dt>Policies that asked for approval</dt><dd>{pol}</dd>
<dt>Asked</dt><dd>{t}; expires {deadline}</dd>
<dt>Masked preview</dt><dd><pre>{preview}</pre></dd>
</dl><ul id="votes">{votes}</ul>{decide}"#,
        err = error
            .map(|e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e)))
            .unwrap_or_default(),
        id = esc(&a.id),
        state = a.state.as_str(),
        rule = esc(&a.rule),
        q = a.quorum,
        groups = esc(&a.reviewers.join(", ")),
        who = esc(&a.requester_label()),
        wl = esc(&a.summary.workload),
        m = esc(&a.summary.method),
        d = esc(&a.summary.destination),
        p = esc(&a.summary.path),
        qs = a
            .summary
            .query
            .as_deref()
            .map(|q| format!("?{}", esc(q)))
            .unwrap_or_default(),
        pol = esc(&a.summary.policy_ids.join(", ")),
        t = time_of(a.created_us),
        deadline = time_of(a.deadline_us),
        preview = esc(a.summary.preview.as_deref().unwrap_or("(none)")),
    )
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn clear_cookie(r: &mut Response<Full<Bytes>>) {
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-phigate_console=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict",
        ),
    );
}

fn with_status(mut r: Response<Full<Bytes>>, s: StatusCode) -> Response<Full<Bytes>> {
    *r.status_mut() = s;
    r
}

fn plain(s: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_owned())));
    *r.status_mut() = s;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn forbidden() -> Response<Full<Bytes>> {
    plain(
        StatusCode::FORBIDDEN,
        "forbidden: stale form or foreign origin",
    )
}

fn not_found() -> Response<Full<Bytes>> {
    plain(StatusCode::NOT_FOUND, "not found")
}

fn bad_request(why: &str) -> Response<Full<Bytes>> {
    plain(StatusCode::BAD_REQUEST, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_pages_escape() {
        let f = url_decode_pairs(b"reason=ticket+42%3A+ok&csrf=ab%2");
        assert_eq!(f["reason"], "ticket 42: ok");
        assert_eq!(f["csrf"], "ab%2");
        assert_eq!(
            esc("<script>\"x\"</script>"),
            "&lt;script&gt;&quot;x&quot;&lt;/script&gt;"
        );
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
