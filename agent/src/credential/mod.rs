//! The credentials phigate presents to upstreams in the apps' stead (a destination's
//! `upstream_auth`): so the protected API's credential lives in phigate, not in every
//! app's environment, logs and crash dumps.
//!
//! [`Credentials::load`] reads them for a config (secret files refused unless 0600
//! and owned by root or the agent's user); the pipeline calls
//! [`Credential::present`] only after the policies permitted a request, which puts
//! the credential in its header (replacing the client's) and says how it was
//! obtained, for the record. Values are never logged, recorded or shown.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

mod oauth;
pub mod reflection;
pub mod token;

use crate::config::upstream_auth::{agent_uid, secret_file_problem, AuthMethod, UpstreamAuth};
use crate::config::Destination;
use crate::outbound::Outbound;
use crate::sockets::SocketFactory;
use reflection::Reflection;
use token::TokenCache;

/// How long a token request may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A secret's text; its `Debug` shows nothing of it.
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// Why a credential could not be loaded (naming the file, never its content).
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {message}", path = .path.display())]
    File { path: PathBuf, message: String },
    #[error("credential `{id}`: {message}")]
    Config { id: String, message: String },
}

/// How the credential of a forwarded request was obtained, as records name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Obtained {
    /// Read from its file when the config was loaded.
    Static,
    /// Fetched from the token endpoint for this request (or by the fetch it waited on).
    TokenEndpoint,
    /// A token fetched earlier and still fresh.
    Cached,
    /// No header: the client certificate of the TLS connection alone.
    ClientCertificate,
}

impl Obtained {
    pub fn as_str(self) -> &'static str {
        match self {
            Obtained::Static => "static",
            Obtained::TokenEndpoint => "token_endpoint",
            Obtained::Cached => "cached",
            Obtained::ClientCertificate => "client_certificate",
        }
    }
}

enum Source {
    CertificateOnly,
    Static(HeaderValue, Option<Reflection>),
    Token(TokenCache),
}

/// One destination's credential.
pub struct Credential {
    pub id: String,
    pub destination: String,
    pub forward_client_token: bool,
    header: HeaderName,
    source: Source,
    loaded: SystemTime,
    /// Failed presentations (token fetches), for `phigate status`.
    failures: Mutex<u64>,
}

/// What `phigate status` shows of a credential: never its value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CredentialState {
    pub id: String,
    pub destination: String,
    /// `static`, `client_credentials` or `client_certificate`.
    pub kind: String,
    /// RFC 3339; none for a static credential or before the first token.
    pub valid_until: Option<String>,
    pub last_refresh: Option<String>,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl Credential {
    fn load(
        d: &Destination,
        auth: &UpstreamAuth,
        sockets: &SocketFactory,
    ) -> Result<Credential, CredentialError> {
        let (header, source) = match &auth.method {
            AuthMethod::CertificateOnly => (header::AUTHORIZATION, Source::CertificateOnly),
            AuthMethod::Static {
                header,
                value_file,
                bearer,
            } => {
                let text = read_secret(value_file)?;
                let text = text.trim();
                let text = if *bearer {
                    format!("Bearer {text}")
                } else {
                    text.to_owned()
                };
                let mut value =
                    HeaderValue::from_str(&text).map_err(|_| CredentialError::File {
                        path: value_file.clone(),
                        message: "not usable as a header value (one line of visible text)".into(),
                    })?;
                value.set_sensitive(true);
                let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                    CredentialError::Config {
                        id: auth.id.clone(),
                        message: format!("`{header}` is not a header name"),
                    }
                })?;
                let reflection = Reflection::of(&value, &auth.id);
                (name, Source::Static(value, reflection))
            }
            AuthMethod::ClientCredentials(c) => {
                let tls =
                    crate::tls::UpstreamTls::new(c.ca_file.as_deref(), None).map_err(|e| {
                        CredentialError::Config {
                            id: auth.id.clone(),
                            message: format!("token endpoint trust roots: {e}"),
                        }
                    })?;
                let outbound = Outbound {
                    sockets: sockets.clone(),
                    tls: Arc::new(tls),
                    timeout: FETCH_TIMEOUT,
                };
                let endpoint = oauth::TokenEndpoint::new(c, outbound)?;
                (
                    header::AUTHORIZATION,
                    Source::Token(TokenCache::new(Arc::new(endpoint))),
                )
            }
        };
        Ok(Credential {
            id: auth.id.clone(),
            destination: d.name.clone(),
            forward_client_token: auth.forward_client_token,
            header,
            source,
            loaded: SystemTime::now(),
            failures: Mutex::new(0),
        })
    }

    /// Puts the credential into `headers`, replacing what the client sent in that
    /// header (and the client's `Authorization` when it is not to be forwarded). A
    /// token that cannot be obtained is an error: the request must not go out, and
    /// certainly not with the client's own credential. Says how it was obtained and
    /// what it would look like if the upstream's response repeated it.
    pub async fn present(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<(Obtained, Option<Reflection>), String> {
        if !self.forward_client_token {
            headers.remove(header::AUTHORIZATION);
        }
        let (value, how) = match &self.source {
            Source::CertificateOnly => return Ok((Obtained::ClientCertificate, None)),
            Source::Static(v, reflection) => {
                headers.insert(self.header.clone(), v.clone());
                return Ok((Obtained::Static, reflection.clone()));
            }
            Source::Token(cache) => match cache.token().await {
                Ok((v, token::Source::Cached)) => (v, Obtained::Cached),
                Ok((v, token::Source::TokenEndpoint)) => (v, Obtained::TokenEndpoint),
                Err(e) => {
                    headers.remove(&self.header);
                    *self.failures.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    return Err(format!(
                        "upstream credential `{}` unavailable: {e}",
                        self.id
                    ));
                }
            },
        };
        let reflection = Reflection::of(&value, &self.id);
        headers.insert(self.header.clone(), value);
        Ok((how, reflection))
    }

    pub fn state(&self) -> CredentialState {
        let rfc3339 = |t: SystemTime| {
            time::OffsetDateTime::from(t)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let mut s = CredentialState {
            id: self.id.clone(),
            destination: self.destination.clone(),
            kind: match &self.source {
                Source::CertificateOnly => "client_certificate",
                Source::Static(..) => "static",
                Source::Token(_) => "client_credentials",
            }
            .into(),
            last_refresh: Some(rfc3339(self.loaded)),
            failures: *self.failures.lock().unwrap_or_else(|p| p.into_inner()),
            ..CredentialState::default()
        };
        if let Source::Token(cache) = &self.source {
            let c = cache.state();
            s.valid_until = c.valid_until.map(rfc3339);
            s.last_refresh = c.last_refresh.map(rfc3339);
            s.failures = s.failures.max(c.failures);
            s.last_error = c.last_error;
        }
        s
    }
}

/// Every destination's credential, by destination index.
#[derive(Default)]
pub struct Credentials {
    by_destination: Vec<Option<Arc<Credential>>>,
}

impl Credentials {
    /// Reads every destination's credential (secret files checked again: they may
    /// have changed since the config was parsed).
    pub fn load(
        destinations: &[Destination],
        sockets: &SocketFactory,
    ) -> Result<Credentials, CredentialError> {
        let mut by_destination = Vec::with_capacity(destinations.len());
        for d in destinations {
            by_destination.push(match &d.upstream_auth {
                None => None,
                Some(a) => Some(Arc::new(Credential::load(d, a, sockets)?)),
            });
        }
        Ok(Credentials { by_destination })
    }

    pub fn for_destination(&self, index: usize) -> Option<&Arc<Credential>> {
        self.by_destination.get(index).and_then(Option::as_ref)
    }

    pub fn states(&self) -> Vec<CredentialState> {
        self.by_destination
            .iter()
            .flatten()
            .map(|c| c.state())
            .collect()
    }
}

/// A secret file's content, after the same checks as the config's.
pub(crate) fn read_secret(path: &Path) -> Result<String, CredentialError> {
    let fail = |message: String| CredentialError::File {
        path: path.to_owned(),
        message,
    };
    if let Some(problem) = secret_file_problem(path, agent_uid()) {
        // The problem names the path already; keep only the reason.
        let prefix = format!("{}: ", path.display());
        return Err(fail(
            problem.strip_prefix(&prefix).unwrap_or(&problem).to_owned(),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if text.trim().is_empty() {
        return Err(fail("empty".into()));
    }
    Ok(text)
}
