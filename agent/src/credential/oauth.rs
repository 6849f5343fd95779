//! OAuth 2.0 client credentials (RFC 6749 4.4) against a token endpoint, the client
//! authenticated by its secret (`client_secret_post`) or by a signed JWT assertion
//! (`private_key_jwt`, RFC 7523, as SMART Backend Services requires). Over the
//! agent's own HTTPS client, the endpoint's certificate always verified.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use serde::Serialize;

use super::token::{Fetch, Token};
use super::{CredentialError, Secret};
use crate::config::upstream_auth::{ClientAuth, OAuthClient};
use crate::outbound::Outbound;

/// Largest token response read.
const RESPONSE_LIMIT: usize = 64 << 10;
/// An assertion lives this long (SMART: at most five minutes).
const ASSERTION_TTL: Duration = Duration::from_secs(300);
/// Used when the endpoint names no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// How the client proves who it is to the token endpoint.
enum Proof {
    Secret(Secret),
    Assertion {
        key: EncodingKey,
        alg: Algorithm,
        key_id: Option<String>,
    },
}

/// A token endpoint and this client's registration there.
pub struct TokenEndpoint {
    cfg: OAuthClient,
    proof: Proof,
    outbound: Outbound,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl TokenEndpoint {
    /// Reads the client's secret or key (the file's mode was checked with the config
    /// and is checked again here, as it may have changed since).
    pub fn new(cfg: &OAuthClient, outbound: Outbound) -> Result<TokenEndpoint, CredentialError> {
        let proof = match &cfg.auth {
            ClientAuth::Secret(path) => {
                Proof::Secret(Secret(super::read_secret(path)?.trim().to_owned()))
            }
            ClientAuth::PrivateKeyJwt {
                key_file,
                alg,
                key_id,
            } => {
                let pem = super::read_secret(key_file)?;
                let bad = |m: String| CredentialError::File {
                    path: key_file.clone(),
                    message: m,
                };
                let alg: Algorithm = alg.parse().map_err(|e| bad(format!("{alg}: {e}")))?;
                Proof::Assertion {
                    key: signing_key(pem.as_bytes(), alg).map_err(bad)?,
                    alg,
                    key_id: key_id.clone(),
                }
            }
        };
        let endpoint = TokenEndpoint {
            cfg: cfg.clone(),
            proof,
            outbound,
        };
        // A key that cannot sign is found now, not on the first request.
        endpoint.form().map_err(|m| CredentialError::File {
            path: match &cfg.auth {
                ClientAuth::PrivateKeyJwt { key_file, .. } => key_file.clone(),
                ClientAuth::Secret(p) => p.clone(),
            },
            message: m,
        })?;
        Ok(endpoint)
    }

    /// The token request's form: grant, scopes, resource, and the client's proof.
    fn form(&self) -> Result<String, String> {
        let mut f = Form::default();
        f.append_pair("grant_type", "client_credentials");
        if !self.cfg.scopes.is_empty() {
            f.append_pair("scope", &self.cfg.scopes.join(" "));
        }
        if let Some(r) = &self.cfg.resource {
            f.append_pair("resource", r);
        }
        match &self.proof {
            Proof::Secret(s) => {
                f.append_pair("client_id", &self.cfg.client_id);
                f.append_pair("client_secret", &s.0);
            }
            Proof::Assertion { key, alg, key_id } => {
                let jwt = self.assertion(key, *alg, key_id.clone())?;
                f.append_pair(
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                );
                f.append_pair("client_assertion", &jwt);
            }
        }
        Ok(f.0)
    }

    /// RFC 7523 client assertion: issuer and subject the client, audience the token
    /// endpoint, a unique `jti`, five minutes at most.
    fn assertion(
        &self,
        key: &EncodingKey,
        alg: Algorithm,
        key_id: Option<String>,
    ) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = AssertionClaims {
            iss: &self.cfg.client_id,
            sub: &self.cfg.client_id,
            aud: &self.cfg.token_url,
            jti: uuid::Uuid::now_v7().to_string(),
            iat: now,
            exp: now + ASSERTION_TTL.as_secs(),
        };
        let mut header = Header::new(alg);
        header.kid = key_id;
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, &claims, key)
            .map_err(|e| format!("cannot sign the client assertion: {e}"))
    }

    async fn request(&self) -> Result<Token, String> {
        let url = &self.cfg.token_url;
        let (status, body) = self
            .outbound
            .post_form(url, self.form()?, RESPONSE_LIMIT)
            .await
            .map_err(|e| format!("token endpoint: {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != 200 {
            // The endpoint's error code and description name the problem; they
            // carry no secret.
            let code = v["error"].as_str().unwrap_or("no error code");
            let what = v["error_description"].as_str().unwrap_or("");
            return Err(
                format!("token endpoint {url}: HTTP {status}: {code} {what}")
                    .trim_end()
                    .to_owned(),
            );
        }
        let access = v["access_token"]
            .as_str()
            .ok_or_else(|| format!("token endpoint {url}: the answer has no access_token"))?;
        if !v["token_type"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
        {
            return Err(format!("token endpoint {url}: token_type is not Bearer"));
        }
        let mut value = http::HeaderValue::from_str(&format!("Bearer {access}"))
            .map_err(|_| format!("token endpoint {url}: the access token is not header text"))?;
        value.set_sensitive(true);
        let lifetime = v["expires_in"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIFETIME);
        Ok(Token { value, lifetime })
    }
}

impl Fetch for TokenEndpoint {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, String>> + Send + '_>> {
        Box::pin(self.request())
    }
}

/// The key that signs assertions: EC keys as PKCS#8, RSA keys as PKCS#1 (PEM).
fn signing_key(pem: &[u8], alg: Algorithm) -> Result<EncodingKey, String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))?;
    match (alg, der) {
        (Algorithm::ES256 | Algorithm::ES384, PrivateKeyDer::Pkcs8(k)) => {
            Ok(EncodingKey::from_ec_der(k.secret_pkcs8_der()))
        }
        (Algorithm::RS256 | Algorithm::RS384, PrivateKeyDer::Pkcs1(k)) => {
            Ok(EncodingKey::from_rsa_der(k.secret_pkcs1_der()))
        }
        (Algorithm::ES256 | Algorithm::ES384, _) => Err(format!(
            "{alg:?} needs an EC key in PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`; `openssl pkcs8 -topk8 -nocrypt`)"
        )),
        _ => Err(format!(
            "{alg:?} needs an RSA key in PKCS#1 PEM (`-----BEGIN RSA PRIVATE KEY-----`; `openssl rsa -traditional`)"
        )),
    }
}

/// An `application/x-www-form-urlencoded` body being written.
#[derive(Default)]
struct Form(String);

impl Form {
    fn append_pair(&mut self, name: &str, value: &str) {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0.push_str(name);
        self.0.push('=');
        self.0
            .extend(utf8_percent_encode(value, NON_ALPHANUMERIC).map(str::to_owned));
    }
}
