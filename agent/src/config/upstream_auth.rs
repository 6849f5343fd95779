//! A destination's `upstream_auth`: the credential phigate presents to the upstream
//! in the apps' stead (a static header from a file, OAuth 2.0 client credentials with
//! a secret or a signed assertion, a client certificate), parsed with the shared
//! [`TomlSource`]. Its secret files are checked here like keys: 0600 or stricter and
//! owned by root or the agent's own user, else the config is refused naming the file
//! and why. Their contents are read only by `crate::credential`, never kept in the
//! config.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Protocol, TomlSource};

/// What phigate presents upstream for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAuth {
    /// Named in records and `phigate status`; never the secret.
    pub id: String,
    pub method: AuthMethod,
    /// `false`: the client's own `Authorization` (validated for policy) is removed
    /// before forwarding.
    pub forward_client_token: bool,
    /// Mutual TLS to the upstream: certificate chain and key (PEM).
    pub client_cert: Option<ClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// No header: the client certificate alone.
    CertificateOnly,
    /// A header whose value is a file's content (`Bearer` + the file for `bearer_file`).
    Static {
        header: String,
        value_file: PathBuf,
        bearer: bool,
    },
    /// An access token by the client credentials grant, sent as `Bearer`.
    ClientCredentials(OAuthClient),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthClient {
    pub token_url: String,
    pub client_id: String,
    pub auth: ClientAuth,
    pub scopes: Vec<String>,
    /// RFC 8707 `resource`, for providers that issue tokens per resource.
    pub resource: Option<String>,
    /// Extra CA bundle trusted for the token endpoint, beside the system roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_post`.
    Secret(PathBuf),
    /// `private_key_jwt` (RFC 7523; SMART Backend Services): a signed assertion.
    PrivateKeyJwt {
        key_file: PathBuf,
        /// ES256, ES384, RS256 or RS384.
        alg: String,
        key_id: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl UpstreamAuth {
    /// Every file it is read from (a change of one reloads the config).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        match &self.method {
            AuthMethod::CertificateOnly => {}
            AuthMethod::Static { value_file, .. } => files.push(value_file.clone()),
            AuthMethod::ClientCredentials(c) => {
                files.push(match &c.auth {
                    ClientAuth::Secret(p) => p.clone(),
                    ClientAuth::PrivateKeyJwt { key_file, .. } => key_file.clone(),
                });
                files.extend(c.ca_file.clone());
            }
        }
        if let Some(c) = &self.client_cert {
            files.extend([c.cert.clone(), c.key.clone()]);
        }
        files
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamAuth {
    id: Spanned<String>,
    bearer_file: Option<Spanned<PathBuf>>,
    header: Option<Spanned<String>>,
    value_file: Option<Spanned<PathBuf>>,
    token_url: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret_file: Option<Spanned<PathBuf>>,
    private_key_file: Option<Spanned<PathBuf>>,
    assertion_alg: Option<Spanned<String>>,
    key_id: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    resource: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default = "yes")]
    forward_client_token: bool,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
}

fn yes() -> bool {
    true
}

/// Why a secret file may not be used, if it may not: not a readable regular file,
/// readable by group or others, or owned by someone other than root or `owner`.
pub fn secret_file_problem(path: &Path, owner: u32) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: cannot read: {e}", path.display())),
    };
    if !meta.is_file() {
        return Some(format!("{}: not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Some(format!(
            "{}: readable by group or others (mode {mode:04o}); secrets must be 0600 or stricter: run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    if meta.uid() != 0 && meta.uid() != owner {
        return Some(format!(
            "{}: owned by uid {}, not by root or the agent's user (uid {owner})",
            path.display(),
            meta.uid()
        ));
    }
    None
}

/// The agent's effective uid: the owner a secret file may have besides root.
pub fn agent_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// `destinations[i].upstream_auth`, validated, its secret files checked.
pub(crate) fn upstream_auth_section(
    src: &TomlSource<'_>,
    i: usize,
    protocol: Protocol,
    raw: Spanned<RawUpstreamAuth>,
) -> Result<UpstreamAuth, ConfigError> {
    let span = raw.span();
    let r = raw.into_inner();
    let field = |name: &str| Some(format!("destinations[{i}].upstream_auth.{name}"));
    if !matches!(protocol, Protocol::Https | Protocol::HttpToHttps) {
        return Err(src.err(
            Some(span),
            Some(format!("destinations[{i}].upstream_auth")),
            "a credential is only sent over verified TLS: use protocol \"https\" or \"http-to-https\"".into(),
        ));
    }
    let id = r.id.get_ref().trim().to_owned();
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(src.err(
            Some(r.id.span()),
            field("id"),
            "must be a name of letters, digits, `-`, `_` and `.`".into(),
        ));
    }
    let secret = |p: Spanned<PathBuf>, name: &str| -> Result<PathBuf, ConfigError> {
        let path = src.resolve(p.get_ref().clone());
        match secret_file_problem(&path, agent_uid()) {
            Some(m) => Err(src.err(Some(p.span()), field(name), m)),
            None => Ok(path),
        }
    };
    let method = method_of(src, i, &r, span.clone(), &secret)?;
    let client_cert = match (r.client_cert_file, r.client_key_file) {
        (None, None) => None,
        (Some(c), Some(k)) => Some(ClientCert {
            cert: src.resolve(c.into_inner()),
            key: secret(k, "client_key_file")?,
        }),
        _ => {
            return Err(src.err(
                Some(span),
                field("client_cert_file"),
                "give both client_cert_file and client_key_file, or neither".into(),
            ))
        }
    };
    if method == AuthMethod::CertificateOnly && client_cert.is_none() {
        return Err(src.err(
            Some(span),
            Some(format!("destinations[{i}].upstream_auth")),
            "no credential: set bearer_file, header + value_file, token_url (OAuth 2.0 client credentials) or client_cert_file + client_key_file".into(),
        ));
    }
    Ok(UpstreamAuth {
        id,
        method,
        forward_client_token: r.forward_client_token,
        client_cert,
    })
}

type SecretCheck<'s> = dyn Fn(Spanned<PathBuf>, &str) -> Result<PathBuf, ConfigError> + 's;

/// Which one credential the section describes: more than one is refused.
fn method_of(
    src: &TomlSource<'_>,
    i: usize,
    r: &RawUpstreamAuth,
    span: std::ops::Range<usize>,
    secret: &SecretCheck<'_>,
) -> Result<AuthMethod, ConfigError> {
    let field = |name: &str| Some(format!("destinations[{i}].upstream_auth.{name}"));
    let chosen = [
        r.bearer_file.is_some(),
        r.header.is_some() || r.value_file.is_some(),
        r.token_url.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() > 1 {
        return Err(src.err(
            Some(span),
            Some(format!("destinations[{i}].upstream_auth")),
            "choose one credential: bearer_file, header + value_file, or token_url".into(),
        ));
    }
    if let Some(b) = &r.bearer_file {
        return Ok(AuthMethod::Static {
            header: "authorization".into(),
            value_file: secret(b.clone(), "bearer_file")?,
            bearer: true,
        });
    }
    if r.header.is_some() || r.value_file.is_some() {
        let (Some(h), Some(v)) = (&r.header, &r.value_file) else {
            return Err(src.err(
                Some(span),
                field("header"),
                "give both header and value_file".into(),
            ));
        };
        let name = h.get_ref().to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(src.err(
                Some(h.span()),
                field("header"),
                format!("`{name}` is not a header name"),
            ));
        }
        return Ok(AuthMethod::Static {
            header: name,
            value_file: secret(v.clone(), "value_file")?,
            bearer: false,
        });
    }
    let Some(url) = &r.token_url else {
        return Ok(AuthMethod::CertificateOnly);
    };
    if !url.get_ref().starts_with("https://") || url.get_ref().parse::<http::Uri>().is_err() {
        return Err(src.err(
            Some(url.span()),
            field("token_url"),
            format!(
                "`{}` is not an https URL (the token endpoint's TLS is always verified)",
                url.get_ref()
            ),
        ));
    }
    let Some(client_id) = &r.client_id else {
        return Err(src.err(
            Some(url.span()),
            field("client_id"),
            "required with token_url".into(),
        ));
    };
    let auth = match (&r.client_secret_file, &r.private_key_file) {
        (Some(s), None) => ClientAuth::Secret(secret(s.clone(), "client_secret_file")?),
        (None, Some(k)) => {
            let alg = r.assertion_alg.as_ref();
            let name = alg.map(|a| a.get_ref().clone()).unwrap_or_else(|| "ES384".into());
            if !["ES256", "ES384", "RS256", "RS384"].contains(&name.as_str()) {
                return Err(src.err(
                    alg.map(|a| a.span()),
                    field("assertion_alg"),
                    format!("`{name}` is not supported (ES256, ES384, RS256 or RS384)"),
                ));
            }
            ClientAuth::PrivateKeyJwt {
                key_file: secret(k.clone(), "private_key_file")?,
                alg: name,
                key_id: r.key_id.clone(),
            }
        }
        _ => {
            return Err(src.err(
                Some(url.span()),
                field("client_secret_file"),
                "give one of client_secret_file (client_secret_post) or private_key_file (private_key_jwt)".into(),
            ))
        }
    };
    Ok(AuthMethod::ClientCredentials(OAuthClient {
        token_url: url.get_ref().clone(),
        client_id: client_id.get_ref().clone(),
        auth,
        scopes: r.scopes.clone(),
        resource: r.resource.clone(),
        ca_file: r.ca_file.clone().map(|p| src.resolve(p)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Config;

    /// A destination with `auth` as its upstream_auth (line 6 on), in `dir`.
    fn parse(dir: &Path, protocol: &str, auth: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[[destinations]]\nname = \"fhir\"\nprotocol = \"{protocol}\"\naddresses = [\"127.0.0.2:443\"]\n[destinations.upstream_auth]\n{auth}\n"
        );
        Config::parse(&dir.join("phigate.toml"), &text)
    }

    fn secret(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "s3cret").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn auth_of(c: &Config) -> &UpstreamAuth {
        c.destinations[0].upstream_auth.as_ref().unwrap()
    }

    #[test]
    fn each_form_parses_with_relative_files_beside_the_config() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        secret(dir, "t", 0o600);
        secret(dir, "k", 0o400);
        let c = parse(dir, "https", "id = \"a\"\nbearer_file = \"t\"").unwrap();
        assert_eq!(
            auth_of(&c).method,
            AuthMethod::Static {
                header: "authorization".into(),
                value_file: dir.join("t"),
                bearer: true
            }
        );
        assert!(auth_of(&c).forward_client_token);
        let c = parse(
            dir,
            "http-to-https",
            "id = \"a\"\nheader = \"X-API-Key\"\nvalue_file = \"t\"\nforward_client_token = false",
        )
        .unwrap();
        assert!(
            matches!(&auth_of(&c).method, AuthMethod::Static { header, bearer: false, .. } if header == "x-api-key")
        );
        assert!(!auth_of(&c).forward_client_token);
        let c = parse(
            dir,
            "https",
            "id = \"a\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nprivate_key_file = \"k\"\nscopes = [\"system/*.rs\"]\nclient_cert_file = \"t\"\nclient_key_file = \"k\"",
        )
        .unwrap();
        let AuthMethod::ClientCredentials(o) = &auth_of(&c).method else {
            panic!("{c:?}")
        };
        assert_eq!(
            o.auth,
            ClientAuth::PrivateKeyJwt {
                key_file: dir.join("k"),
                alg: "ES384".into(),
                key_id: None
            }
        );
        assert_eq!(o.scopes, ["system/*.rs"]);
        assert_eq!(
            auth_of(&c).files(),
            [dir.join("k"), dir.join("t"), dir.join("k")]
        );
    }

    #[test]
    fn a_secret_readable_by_others_is_refused_naming_file_field_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = secret(d.path(), "t", 0o640);
        let e = parse(d.path(), "https", "id = \"a\"\nbearer_file = \"t\"").unwrap_err();
        assert_eq!(e.line, Some(7), "{e}");
        assert_eq!(
            e.key.as_deref(),
            Some("destinations[0].upstream_auth.bearer_file")
        );
        assert!(
            e.message.starts_with(&format!(
                "{}: readable by group or others (mode 0640)",
                p.display()
            )),
            "{e}"
        );
        let e = parse(d.path(), "https", "id = \"a\"\nbearer_file = \"missing\"").unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
    }

    #[test]
    fn a_secret_owned_by_another_user_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = secret(d.path(), "t", 0o600);
        let me = agent_uid();
        if me == 0 {
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let m = secret_file_problem(&p, 0).unwrap();
            assert!(m.contains("owned by uid 65534"), "{m}");
        } else {
            let m = secret_file_problem(&p, me + 1).unwrap();
            assert!(m.contains(&format!("owned by uid {me}")), "{m}");
        }
        assert_eq!(
            secret_file_problem(
                &p,
                std::fs::metadata(&p)
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt as _;
                        m.uid()
                    })
                    .unwrap()
            ),
            None
        );
    }

    #[test]
    fn mistakes_are_named() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        secret(dir, "t", 0o600);
        for (protocol, auth, key, needle) in [
            ("http", "id = \"a\"\nbearer_file = \"t\"", "destinations[0].upstream_auth", "verified TLS"),
            ("tcp", "id = \"a\"\nbearer_file = \"t\"", "destinations[0].upstream_auth", "verified TLS"),
            ("https", "id = \"a b\"\nbearer_file = \"t\"", "destinations[0].upstream_auth.id", "letters"),
            ("https", "id = \"a\"", "destinations[0].upstream_auth", "no credential"),
            ("https", "id = \"a\"\nbearer_file = \"t\"\nheader = \"x\"\nvalue_file = \"t\"", "destinations[0].upstream_auth", "choose one"),
            ("https", "id = \"a\"\nheader = \"x\"", "destinations[0].upstream_auth.header", "both"),
            ("https", "id = \"a\"\nheader = \"a b\"\nvalue_file = \"t\"", "destinations[0].upstream_auth.header", "not a header name"),
            ("https", "id = \"a\"\ntoken_url = \"http://idp/token\"\nclient_id = \"c\"\nclient_secret_file = \"t\"", "destinations[0].upstream_auth.token_url", "https"),
            ("https", "id = \"a\"\ntoken_url = \"https://idp/token\"\nclient_secret_file = \"t\"", "destinations[0].upstream_auth.client_id", "required"),
            ("https", "id = \"a\"\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"", "destinations[0].upstream_auth.client_secret_file", "one of"),
            ("https", "id = \"a\"\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"\nclient_secret_file = \"t\"\nprivate_key_file = \"t\"", "destinations[0].upstream_auth.client_secret_file", "one of"),
            ("https", "id = \"a\"\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"\nprivate_key_file = \"t\"\nassertion_alg = \"HS256\"", "destinations[0].upstream_auth.assertion_alg", "not supported"),
            ("https", "id = \"a\"\nclient_cert_file = \"t\"", "destinations[0].upstream_auth.client_cert_file", "both"),
        ] {
            let e = parse(dir, protocol, auth).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{auth}: {e}");
            assert!(e.message.contains(needle), "{auth}: {e}");
            assert!(e.line.is_some_and(|l| l >= 5), "{auth}: {e}");
        }
        let e = parse(dir, "https", "id = \"a\"\nbearer = \"t\"").unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
    }
}
