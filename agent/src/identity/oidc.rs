//! OIDC bearer tokens, validated locally: signature against the issuer's published
//! keys (JWKS), `iss`, `aud`, `exp`, `nbf` with a bounded clock skew, and only the
//! configured asymmetric algorithms (never `none`, never HMAC: a public key must
//! not double as a shared secret).
//!
//! Keys come from discovery (`{issuer}/.well-known/openid-configuration` ->
//! `jwks_uri`) or a file, are cached, and are refreshed when a token names an
//! unknown `kid` (at most once per `jwks_refresh_min`) or when they are older than
//! [`KEYS_MAX_AGE`]. phigate's own calls to the issuer go out on the agent's own
//! sockets ([`crate::sockets`]), which the redirect lets pass, over verified TLS.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{header, HeaderMap};
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tracing::{debug, warn};

pub(crate) mod config;

pub use self::config::{OidcIssuer, OidcSection};
use super::token::{TokenError, TokenIdentity};
use crate::outbound::Outbound;
use crate::sockets::SocketFactory;
use crate::tls::UpstreamTls;

/// Cached keys older than this are re-fetched on next use (keys an issuer withdrew
/// stop being accepted).
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(600);
/// Largest discovery document or JWKS accepted.
const MAX_DOC_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an issuer's keys could not be loaded (config reload and logs).
#[derive(Debug, thiserror::Error)]
#[error("OIDC issuer {issuer}: {message}")]
pub struct OidcError {
    pub issuer: String,
    pub message: String,
}

struct Key {
    key: DecodingKey,
    /// The JWK's own `alg`, when it names one: the token must use exactly that.
    alg: Option<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys published without a `kid`.
    anonymous: Vec<Arc<Key>>,
    fetched: Option<Instant>,
}

struct Issuer {
    cfg: OidcIssuer,
    algorithms: Vec<Algorithm>,
    keys: RwLock<Arc<KeySet>>,
    /// Serializes refreshes; holds when the last one was attempted (rate limit).
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Discovery and keys: the agent's own client, verified TLS, no redirects.
    fetch: Outbound,
}

/// Validates bearer tokens against the configured issuers.
pub struct TokenValidator {
    issuers: Vec<Issuer>,
}

impl TokenValidator {
    /// Re-checks a token validated earlier, without the token: its issuer must still
    /// be configured and it must not have expired since (within the issuer's skew).
    /// Used when a new policy set is applied to open connections.
    pub fn still_valid(&self, t: &TokenIdentity, now_secs: i64) -> Result<(), TokenError> {
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.cfg.issuer == t.issuer)
            .ok_or(TokenError::WrongIssuer)?;
        let skew = i64::try_from(issuer.cfg.clock_skew.as_secs()).unwrap_or(i64::MAX);
        if t.expires_at.saturating_add(skew) < now_secs {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    /// Sets up the issuers. Keys from files are read now (a bad file is an error);
    /// discovered keys are fetched on first use, so an unreachable issuer does not
    /// stop the agent (its tokens fail with `keys_unavailable` meanwhile).
    pub fn new(cfg: &OidcSection, sockets: &SocketFactory) -> Result<TokenValidator, OidcError> {
        let mut issuers = Vec::new();
        for c in &cfg.issuers {
            let fail = |message: String| OidcError {
                issuer: c.issuer.clone(),
                message,
            };
            let algorithms = c
                .algorithms
                .iter()
                .map(|a| {
                    a.parse::<Algorithm>()
                        .map_err(|e| fail(format!("{a}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let tls =
                UpstreamTls::new(c.ca_file.as_deref(), None).map_err(|e| fail(e.to_string()))?;
            let issuer = Issuer {
                cfg: c.clone(),
                algorithms,
                keys: RwLock::new(Arc::new(KeySet::default())),
                refresh: tokio::sync::Mutex::new(None),
                fetch: Outbound {
                    sockets: sockets.clone(),
                    tls: Arc::new(tls),
                    timeout: FETCH_TIMEOUT,
                },
            };
            if let Some(f) = &c.jwks_file {
                let text = std::fs::read(f)
                    .map_err(|e| fail(format!("cannot read jwks_file {}: {e}", f.display())))?;
                let set = parse_jwks(&text).map_err(|m| fail(format!("{}: {m}", f.display())))?;
                *issuer.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
            }
            issuers.push(issuer);
        }
        Ok(TokenValidator { issuers })
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The bearer token of a request's `Authorization` header, validated.
    pub async fn validate_headers(&self, headers: &HeaderMap) -> Result<TokenIdentity, TokenError> {
        let Some(v) = headers.get(header::AUTHORIZATION) else {
            return Err(TokenError::Missing);
        };
        let v = v.to_str().map_err(|_| TokenError::Malformed)?;
        let Some((scheme, token)) = v.trim().split_once(' ') else {
            return Err(TokenError::Missing);
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            // Basic or another scheme: not a bearer token.
            return Err(TokenError::Missing);
        }
        self.validate(token.trim()).await
    }

    /// Validates one compact JWS token.
    pub async fn validate(&self, token: &str) -> Result<TokenIdentity, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header = b64_json(h)?;
        let payload = b64_json(p)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(TokenError::Malformed)?;
        // Refused before anything else: `none` and symmetric algorithms.
        if alg.eq_ignore_ascii_case("none") || alg.starts_with("HS") {
            return Err(TokenError::AlgNotAllowed);
        }
        let iss = payload
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(TokenError::WrongIssuer)?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.cfg.issuer == iss)
            .ok_or(TokenError::WrongIssuer)?;
        let alg: Algorithm = alg.parse().map_err(|_| TokenError::AlgNotAllowed)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(TokenError::AlgNotAllowed);
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let key = issuer.key_for(kid, alg).await?;
        if key.alg.is_some_and(|a| a != alg) {
            return Err(TokenError::AlgNotAllowed);
        }

        let mut v = Validation::new(alg);
        v.leeway = issuer.cfg.clock_skew.as_secs();
        v.validate_nbf = true;
        v.set_issuer(&[&issuer.cfg.issuer]);
        v.set_audience(&issuer.cfg.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &key.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidIssuer => TokenError::WrongIssuer,
                K::InvalidAudience => TokenError::WrongAudience,
                K::MissingRequiredClaim(c) if c == "aud" => TokenError::WrongAudience,
                K::InvalidSignature => TokenError::BadSignature,
                K::InvalidAlgorithm => TokenError::AlgNotAllowed,
                // A key of the wrong type for the algorithm, a malformed signature...
                K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) => {
                    TokenError::BadSignature
                }
                _ => TokenError::Malformed,
            }
        })?;
        Ok(issuer.identity(&data.claims))
    }
}

impl Issuer {
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, TokenError> {
        let stale = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.fetched.is_none_or(|t| t.elapsed() > KEYS_MAX_AGE)
        };
        if stale {
            self.refresh_keys().await;
        }
        for attempt in 0..2 {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
            if keys.fetched.is_none() {
                return Err(TokenError::KeysUnavailable);
            }
            let found = match kid {
                Some(k) => keys.by_kid.get(k).cloned(),
                // No kid: the single key that can verify this algorithm.
                None => {
                    let mut fitting = keys
                        .anonymous
                        .iter()
                        .chain(keys.by_kid.values())
                        .filter(|k| family_fits(&k.key, alg));
                    match (fitting.next(), fitting.next()) {
                        (Some(k), None) => Some(k.clone()),
                        _ => None,
                    }
                }
            };
            if let Some(k) = found {
                return Ok(k);
            }
            if attempt == 0 && !self.refresh_keys().await {
                break;
            }
        }
        Err(TokenError::UnknownKey)
    }

    /// Re-reads the keys unless the last attempt was within `jwks_refresh_min`.
    /// Returns whether a refresh was attempted and succeeded.
    async fn refresh_keys(&self) -> bool {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.cfg.jwks_refresh_min) {
            return false;
        }
        *last = Some(Instant::now());
        let result = match &self.cfg.jwks_file {
            Some(f) => tokio::fs::read(f)
                .await
                .map_err(|e| format!("cannot read {}: {e}", f.display()))
                .and_then(|b| parse_jwks(&b)),
            None => self.discover().await,
        };
        match result {
            Ok(set) => {
                debug!(issuer = %self.cfg.issuer, keys = set.by_kid.len() + set.anonymous.len(), "OIDC keys loaded");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                true
            }
            Err(e) => {
                warn!(issuer = %self.cfg.issuer, error = %e, "cannot load the issuer's signing keys; the cached keys stay");
                false
            }
        }
    }

    async fn discover(&self) -> Result<KeySet, String> {
        let base = self.cfg.issuer.trim_end_matches('/');
        let doc = self
            .fetch
            .get_json(
                &format!("{base}/.well-known/openid-configuration"),
                MAX_DOC_BYTES,
            )
            .await?;
        if doc.get("issuer").and_then(Value::as_str) != Some(self.cfg.issuer.as_str()) {
            return Err("the discovery document names another issuer".into());
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("the discovery document has no jwks_uri")?;
        if !jwks_uri.starts_with("https://") {
            return Err(format!("jwks_uri {jwks_uri} is not https"));
        }
        let jwks = self.fetch.get_json(jwks_uri, MAX_DOC_BYTES).await?;
        parse_jwks(jwks.to_string().as_bytes())
    }

    fn identity(&self, claims: &Value) -> TokenIdentity {
        let mut groups = Vec::new();
        for path in &self.cfg.groups_claims {
            let mut v = Some(claims);
            for part in path.split('.') {
                v = v.and_then(|x| x.get(part));
            }
            let values: Vec<&str> = match v {
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                // `scope`-style claims: space-separated.
                Some(Value::String(s)) => s.split_whitespace().collect(),
                _ => Vec::new(),
            };
            for g in values {
                let g = self.cfg.group_map.get(g).map(String::as_str).unwrap_or(g);
                if !groups.iter().any(|x| x == g) {
                    groups.push(g.to_owned());
                }
            }
        }
        let claims_out = self
            .cfg
            .claims
            .iter()
            .filter_map(|name| {
                let v = match claims.get(name)? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((name.clone(), v))
            })
            .collect();
        TokenIdentity {
            issuer: self.cfg.issuer.clone(),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            groups,
            expires_at: claims.get("exp").and_then(Value::as_i64).unwrap_or(0),
            claims: claims_out,
            person: self
                .cfg
                .person_claim
                .as_ref()
                .and_then(|c| claims.get(c))
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
        }
    }
}

fn family_fits(key: &DecodingKey, alg: Algorithm) -> bool {
    key.family().algorithms().contains(&alg)
}

fn b64_json(part: &str) -> Result<Value, TokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    if !v.is_object() {
        return Err(TokenError::Malformed);
    }
    Ok(v)
}

/// The signing keys of a JWKS document. Symmetric (`oct`) keys, encryption keys and
/// keys of unknown types are left out; an empty result is an error.
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWKS document (no `keys` array)")?;
    let mut set = KeySet {
        fetched: Some(Instant::now()),
        ..KeySet::default()
    };
    for k in keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        if matches!(
            jwk.algorithm,
            AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_)
        ) || matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption))
        {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let key = Arc::new(Key { key, alg });
        match jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid, key);
            }
            None => set.anonymous.push(key),
        }
    }
    if set.by_kid.is_empty() && set.anonymous.is_empty() {
        return Err("the JWKS holds no usable signing key".into());
    }
    Ok(set)
}

#[cfg(test)]
mod tests;
