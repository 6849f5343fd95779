//! The authorize stage as one call, shared by the proxy's pipeline and
//! `phigate policy explain` so both decide the same way.

use std::sync::Arc;

use anyhow::Context as _;
use http::HeaderMap;

use super::config::PolicySection;
use super::normalize::{normalize_path, parse_query};
use super::{AccessRequest, Clock, Decision, Passage, PolicySet};
use crate::identity::oidc::OidcSection;
use crate::identity::oidc::TokenValidator;
use crate::identity::token::{TokenError, TokenIdentity};
use crate::identity::Workload;

/// Policies, token validation and what policies see of a request.
pub struct Gatekeeper {
    pub policies: Arc<PolicySet>,
    pub tokens: Arc<TokenValidator>,
    /// Request headers (lower case) handed to policies.
    pub headers: Vec<String>,
    pub tz: jiff::tz::TimeZone,
}

/// One request's authorization.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub decision: Decision,
    /// What was decided about, kept so a later policy set can decide it again.
    pub access: Arc<Access>,
}

/// A request as the policies saw it, owned and without the token itself (only what
/// validation made of it). An open connection keeps the accesses it was granted so a
/// new policy set can re-decide them ([`Gatekeeper::recheck`]).
#[derive(Debug, Clone)]
pub struct Access {
    pub method: String,
    /// The normalized path the decision was about (and that is forwarded).
    pub path: String,
    pub query: Vec<(String, String)>,
    /// The configured headers, as handed to policies.
    pub headers: Vec<(String, String)>,
    /// The validated token, or why there is none.
    pub token: Result<TokenIdentity, TokenError>,
    /// The host the request named and the connection's SNI.
    pub host: Option<String>,
    pub sni: Option<String>,
    pub has_approval: bool,
}

/// The request target cannot be normalized: answered 400.
#[derive(Debug, thiserror::Error)]
#[error("the request path is not a valid origin-form path, or a segment of it hides a dot segment from some server (`..;`, `%2F..`)")]
pub struct BadPath;

/// One request, as the authorize stage sees it.
pub struct Subject<'a> {
    pub workload: &'a Workload,
    pub destination: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The host the request names (lower case, no port), checked by admission.
    pub host: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub has_approval: bool,
}

impl Gatekeeper {
    /// Loads `policies_dir` and sets up the configured issuers. A policy error is
    /// reported with every file:line.
    pub fn from_config(
        policies_dir: &std::path::Path,
        policy: &PolicySection,
        oidc: &OidcSection,
        sockets: &crate::sockets::SocketFactory,
    ) -> anyhow::Result<Gatekeeper> {
        let policies = PolicySet::load(policies_dir)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("policies rejected")?;
        let tokens = TokenValidator::new(oidc, sockets)?;
        Ok(Gatekeeper {
            policies: Arc::new(policies),
            tokens: Arc::new(tokens),
            headers: policy.headers.clone(),
            tz: policy.tz(),
        })
    }

    /// Validates the token and decides, at `clock` (default: now in the zone).
    pub async fn check(&self, s: &Subject<'_>, clock: Option<Clock>) -> Result<Verdict, BadPath> {
        let path = normalize_path(s.path).ok_or(BadPath)?;
        let query = s.query.map(parse_query).unwrap_or_default();
        let headers: Vec<(String, String)> = self
            .headers
            .iter()
            .flat_map(|name| {
                s.headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(move |v| v.to_str().ok().map(|v| (name.clone(), v.to_owned())))
            })
            .collect();
        let token = self.tokens.validate_headers(s.headers).await;
        let access = Access {
            method: s.method.to_owned(),
            path,
            query,
            headers,
            token,
            host: s.host.map(str::to_owned),
            sni: s.sni.map(str::to_owned),
            has_approval: s.has_approval,
        };
        let decision = self.decide(
            s.workload,
            s.destination,
            &access,
            clock.unwrap_or_else(|| Clock::now(&self.tz)),
        );
        Ok(Verdict {
            decision,
            access: Arc::new(access),
        })
    }

    /// Decides again, with this gate's policies and issuers, an access granted
    /// earlier on an open connection: a token that has expired since, or whose issuer
    /// is gone, counts as such.
    pub fn recheck(&self, workload: &Workload, destination: &str, access: &Access) -> Decision {
        let mut access = access.clone();
        if let Ok(t) = &access.token {
            let now = jiff::Timestamp::now().as_second();
            if let Err(e) = self.tokens.still_valid(t, now) {
                access.token = Err(e);
            }
        }
        self.decide(workload, destination, &access, Clock::now(&self.tz))
    }

    /// Decides a connection phigate will not inspect (`Passage::Tcp`, with no token,
    /// method or path: only who connects where, and the SNI of a tunnel).
    pub fn check_connection(
        &self,
        workload: &Workload,
        destination: &str,
        passage: Passage,
        sni: Option<&str>,
    ) -> Decision {
        self.policies.decide_passage(
            &AccessRequest {
                workload,
                token: None,
                token_error: Some(TokenError::Missing),
                destination,
                method: "",
                path: "",
                query: &[],
                headers: &[],
                host: None,
                sni,
                clock: Clock::now(&self.tz),
                has_approval: false,
            },
            passage,
        )
    }

    /// Decides the upgrade a request allowed as its method asks for.
    pub fn check_upgrade(&self, workload: &Workload, destination: &str, a: &Access) -> Decision {
        self.policies.decide_passage(
            &self.access_request(workload, destination, a, Clock::now(&self.tz)),
            Passage::Upgrade,
        )
    }

    fn access_request<'a>(
        &self,
        workload: &'a Workload,
        destination: &'a str,
        a: &'a Access,
        clock: Clock,
    ) -> AccessRequest<'a> {
        AccessRequest {
            workload,
            token: a.token.as_ref().ok(),
            token_error: a.token.as_ref().err().copied(),
            destination,
            method: &a.method,
            path: &a.path,
            query: &a.query,
            headers: &a.headers,
            host: a.host.as_deref(),
            sni: a.sni.as_deref(),
            clock,
            has_approval: a.has_approval,
        }
    }

    fn decide(&self, workload: &Workload, destination: &str, a: &Access, clock: Clock) -> Decision {
        self.policies
            .decide(&self.access_request(workload, destination, a, clock))
    }
}
