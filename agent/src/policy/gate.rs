//! The authorize stage as one call, shared by the proxy's pipeline and
//! `phigate policy explain` so both decide the same way.

use std::sync::Arc;

use anyhow::Context as _;
use http::HeaderMap;

use super::normalize::{normalize_path, parse_query};
use super::{AccessRequest, Clock, Decision, PolicySet};
use crate::config::Config;
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
    /// The validated token, or why there is none.
    pub token: Result<TokenIdentity, TokenError>,
    /// The normalized path the decision was about (and that is forwarded).
    pub path: String,
}

/// The request target cannot be normalized: answered 400.
#[derive(Debug, thiserror::Error)]
#[error("the request path is not a valid origin-form path")]
pub struct BadPath;

/// One request, as the authorize stage sees it.
pub struct Subject<'a> {
    pub workload: &'a Workload,
    pub destination: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub has_approval: bool,
}

impl Gatekeeper {
    /// Loads `policies_dir` and sets up the configured issuers. A policy error is
    /// reported with every file:line.
    pub fn from_config(config: &Config) -> anyhow::Result<Gatekeeper> {
        let policies = PolicySet::load(&config.agent.policies_dir)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("policies rejected")?;
        let tokens = TokenValidator::new(&config.oidc, config.agent.mark)?;
        Ok(Gatekeeper {
            policies: Arc::new(policies),
            tokens: Arc::new(tokens),
            headers: config.policy.headers.clone(),
            tz: config.policy.tz(),
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
        let decision = self.policies.decide(&AccessRequest {
            workload: s.workload,
            token: token.as_ref().ok(),
            token_error: token.as_ref().err().copied(),
            destination: s.destination,
            method: s.method,
            path: &path,
            query: &query,
            headers: &headers,
            clock: clock.unwrap_or_else(|| Clock::now(&self.tz)),
            has_approval: s.has_approval,
        });
        Ok(Verdict {
            decision,
            token,
            path,
        })
    }
}
