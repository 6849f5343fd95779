//! The human or service identity a validated OIDC bearer token carries, and why a
//! token was not accepted. The token itself is never kept: only these facts.

use std::collections::BTreeMap;

/// What a valid bearer token says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TokenIdentity {
    /// The issuer (`iss`) as configured.
    pub issuer: String,
    pub subject: String,
    /// Group and role claims, mapped by configuration.
    pub groups: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: i64,
    /// Configured string claims policies may see (e.g. `client_id`, `department`).
    pub claims: BTreeMap<String, String>,
    /// The issuer's `person_claim` value: who holds the token, for approvals.
    pub person: Option<String>,
}

/// Why a request has no valid token. The code is the `reason` of a 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token was presented")]
    Missing,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("the bearer token has expired")]
    Expired,
    #[error("the bearer token is not valid yet")]
    NotYetValid,
    #[error("the bearer token's signature does not verify")]
    BadSignature,
    #[error("the bearer token was not issued by a trusted issuer")]
    WrongIssuer,
    #[error("the bearer token is not meant for this audience")]
    WrongAudience,
    #[error("the bearer token is signed with a key the issuer does not publish")]
    UnknownKey,
    #[error("the bearer token's signing algorithm is not allowed")]
    AlgNotAllowed,
    #[error("the issuer's signing keys could not be fetched")]
    KeysUnavailable,
}

impl TokenError {
    /// Stable code for JSON bodies and records.
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed => "malformed",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadSignature => "bad_signature",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::UnknownKey => "unknown_key",
            TokenError::AlgNotAllowed => "alg_not_allowed",
            TokenError::KeysUnavailable => "keys_unavailable",
        }
    }
}
