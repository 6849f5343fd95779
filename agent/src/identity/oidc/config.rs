//! `[[oidc.issuers]]` of phigate.toml: the trusted issuers of bearer tokens, parsed
//! with the shared [`TomlSource`].
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, TomlSource};

/// Trusted OIDC issuers of bearer tokens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OidcSection {
    pub issuers: Vec<OidcIssuer>,
}

/// Signature algorithms a token may use; HMAC and `none` are never accepted.
pub const OIDC_ALGORITHMS: [&str; 7] = [
    "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuer {
    /// `iss` exactly; also the base of discovery (`/.well-known/openid-configuration`).
    pub issuer: String,
    /// Accepted `aud` values (at least one must be in the token).
    pub audiences: Vec<String>,
    /// A JWKS file instead of discovery (read at load and on unknown `kid`).
    pub jwks_file: Option<PathBuf>,
    pub algorithms: Vec<String>,
    /// Claims holding groups or roles (dotted paths for nested: `realm_access.roles`).
    pub groups_claims: Vec<String>,
    /// Claim value -> group name; values not listed are kept as they are.
    pub group_map: std::collections::BTreeMap<String, String>,
    /// String claims exposed to policies as tags of `context.token`.
    pub claims: Vec<String>,
    /// The claim naming the person who holds the token (`email`,
    /// `preferred_username`, an employee id), matched against approvals.toml's
    /// `[[person]]` names: approvals count persons, and `sub` is often opaque.
    pub person_claim: Option<String>,
    pub clock_skew: Duration,
    /// Extra CA (PEM) trusted for the issuer's TLS, beside the system roots.
    pub ca_file: Option<PathBuf>,
    /// At most one key refresh per this interval when an unknown `kid` shows up.
    pub jwks_refresh_min: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOidc {
    #[serde(default)]
    issuers: Vec<Spanned<RawIssuer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIssuer {
    issuer: Spanned<String>,
    audiences: Spanned<Vec<String>>,
    jwks_file: Option<PathBuf>,
    algorithms: Option<Spanned<Vec<String>>>,
    groups_claims: Option<Vec<String>>,
    #[serde(default)]
    group_map: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    claims: Vec<String>,
    person_claim: Option<String>,
    clock_skew_secs: Option<Spanned<u64>>,
    ca_file: Option<PathBuf>,
    jwks_refresh_min_secs: Option<u64>,
}

/// `[[oidc.issuers]]`, validated.
pub(crate) fn oidc_section(
    src: &TomlSource<'_>,
    raw: Option<RawOidc>,
) -> Result<OidcSection, ConfigError> {
    let mut oidc = OidcSection::default();
    for (i, raw_issuer) in raw
        .map(|o| o.issuers)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let r = raw_issuer.into_inner();
        let key = |k: &str| Some(format!("oidc.issuers[{i}].{k}"));
        let issuer = r.issuer.get_ref().clone();
        let is_https = issuer.starts_with("https://");
        if !is_https || issuer.len() <= "https://".len() {
            return Err(src.err(
                Some(r.issuer.span()),
                key("issuer"),
                format!("`{issuer}` must be an https:// URL (tokens and keys come from it)"),
            ));
        }
        if oidc.issuers.iter().any(|x: &OidcIssuer| x.issuer == issuer) {
            return Err(src.err(
                Some(r.issuer.span()),
                key("issuer"),
                format!("`{issuer}` is configured twice"),
            ));
        }
        if r.audiences.get_ref().is_empty() {
            return Err(src.err(
                Some(r.audiences.span()),
                key("audiences"),
                "at least one audience is required (a token for another service must not be accepted here)".into(),
            ));
        }
        let algorithms = match r.algorithms {
            None => ["RS256", "ES256", "EdDSA"].map(String::from).to_vec(),
            Some(a) => {
                if a.get_ref().is_empty() {
                    return Err(src.err(
                        Some(a.span()),
                        key("algorithms"),
                        "must list at least one algorithm".into(),
                    ));
                }
                for alg in a.get_ref() {
                    if !OIDC_ALGORITHMS.contains(&alg.as_str()) {
                        return Err(src.err(
                            Some(a.span()),
                            key("algorithms"),
                            format!("`{alg}` is not allowed; use one of {} (HMAC and `none` are never accepted)", OIDC_ALGORITHMS.join(", ")),
                        ));
                    }
                }
                a.into_inner()
            }
        };
        let clock_skew = match r.clock_skew_secs {
            None => Duration::from_secs(60),
            Some(v) if *v.get_ref() > 300 => {
                return Err(src.err(
                    Some(v.span()),
                    key("clock_skew_secs"),
                    "at most 300 seconds".into(),
                ))
            }
            Some(v) => Duration::from_secs(v.into_inner()),
        };
        oidc.issuers.push(OidcIssuer {
            issuer,
            audiences: r.audiences.into_inner(),
            jwks_file: r.jwks_file.map(|p| src.resolve(p)),
            algorithms,
            groups_claims: r.groups_claims.unwrap_or_else(|| vec!["groups".into()]),
            group_map: r.group_map,
            claims: r.claims,
            person_claim: r.person_claim.filter(|c| !c.trim().is_empty()),
            clock_skew,
            ca_file: r.ca_file.map(|p| src.resolve(p)),
            jwks_refresh_min: Duration::from_secs(r.jwks_refresh_min_secs.unwrap_or(30)),
        });
    }
    Ok(oidc)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::ConfigError;
    use crate::settings::Config;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/phigate/test.toml"), text)
    }

    #[test]
    fn oidc_section() {
        let c = parse("[policy]\ntimezone = \"America/New_York\"\nheaders = [\"X-Purpose\"]\n\n[[oidc.issuers]]\nissuer = \"https://idp.test/r\"\naudiences = [\"patients-api\"]\ngroup_map = { \"fhir-clinicians\" = \"clinicians\" }\n").unwrap();
        let i = &c.oidc.issuers[0];
        assert_eq!(i.algorithms, ["RS256", "ES256", "EdDSA"]);
        assert_eq!(i.groups_claims, ["groups"]);
        assert_eq!(i.clock_skew, Duration::from_secs(60));
        let e = parse("[[oidc.issuers]]\nissuer = \"https://i\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("never accepted"), "{e}");
        let e =
            parse("[[oidc.issuers]]\nissuer = \"http://i\"\naudiences = [\"a\"]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("oidc.issuers[0].issuer"));
        let e = parse("[[oidc.issuers]]\nissuer = \"https://i\"\naudiences = []\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("oidc.issuers[0].audiences"));
    }
}
