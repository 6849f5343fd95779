//! Admission: a request reaches the policies only if every party on its path reads
//! it the same way. phigate validates one token, checks one authority and decides one
//! method; an upstream (or a framework in front of it) that picks the other of two
//! `Authorization` headers, honours `X-HTTP-Method-Override`, or serves another
//! virtual host than the one the TLS handshake named would act on a request that
//! was never decided. Such requests are refused before identity and policy, and
//! recorded like any refusal.
//!
//! Path ambiguity (`..;`, encoded separators hiding dot segments) is refused by the
//! path normalization the policies see ([`crate::policy::normalize`]).

use http::{header, HeaderMap, Request, StatusCode};

/// Headers a request may carry at most once. Which of two credentials, hosts or
/// lengths a server uses differs between servers (first, last, joined).
const SINGLETONS: [&str; 5] = [
    "host",
    "content-length",
    "authorization",
    "proxy-authorization",
    "x-api-key",
];

/// Headers with which frameworks let a request claim another method than the one
/// policies decided (a `POST` that the upstream runs as `DELETE`).
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Two readings are possible: 400.
    Ambiguous(String),
    /// The request names a host this connection was not made for: 421.
    Misdirected(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Ambiguous(_) => StatusCode::BAD_REQUEST,
            Refusal::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::Ambiguous(m) | Refusal::Misdirected(m) => m,
        }
    }
}

/// What the connection fixes about the requests on it.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The SNI of the client's TLS handshake (lower case), when it sent one.
    pub sni: Option<&'a str>,
    /// The names the destination serves (lower case; `*.example.org` matches one
    /// or more labels before `example.org`). Empty: any name.
    pub hosts: &'a [String],
}

/// Admits a request (returning the host it names, for the policies) or says why not.
pub fn admit<B>(req: &Request<B>, expect: Expect<'_>) -> Result<Option<String>, Refusal> {
    let headers = req.headers();
    for name in SINGLETONS {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(Refusal::Ambiguous(format!(
                "the request carries more than one {} header",
                display_name(name)
            )));
        }
    }
    for name in METHOD_OVERRIDES {
        if headers.contains_key(name) {
            return Err(Refusal::Ambiguous(format!(
                "{} is refused: the method policies decide is the request's own",
                display_name(name)
            )));
        }
    }
    let Some(host) = authority_host(req)? else {
        return Ok(None);
    };
    if let Some(sni) = expect.sni {
        if !same_host(&host, sni) {
            return Err(Refusal::Misdirected(format!(
                "the request is for host {host} but the TLS connection was made for {sni}"
            )));
        }
    }
    if !expect.hosts.is_empty() && !expect.hosts.iter().any(|h| host_matches(h, &host)) {
        return Err(Refusal::Misdirected(format!(
            "host {host} is not served by this destination"
        )));
    }
    Ok(Some(host))
}

/// The host (lower case, no port, no brackets, no trailing dot) the request names,
/// from `:authority` / the absolute URI, or the Host header. Both present and
/// different is ambiguous.
pub fn authority_host<B>(req: &Request<B>) -> Result<Option<String>, Refusal> {
    let from_uri = req.uri().host().map(normal_host);
    let from_header = match req.headers().get(header::HOST) {
        None => None,
        Some(v) => {
            let a = v
                .to_str()
                .ok()
                .and_then(|s| s.parse::<http::uri::Authority>().ok())
                .ok_or_else(|| {
                    Refusal::Ambiguous("the Host header is not a valid authority".into())
                })?;
            Some(normal_host(a.host()))
        }
    };
    match (from_uri, from_header) {
        (Some(u), Some(h)) if u != h => Err(Refusal::Ambiguous(format!(
            "the request names two hosts: {u} in its target and {h} in Host"
        ))),
        (Some(u), _) => Ok(Some(u)),
        (None, h) => Ok(h),
    }
}

fn normal_host(h: &str) -> String {
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn same_host(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// `pattern` is a name or `*.suffix` (one or more labels before the suffix).
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => pattern == host,
    }
}

/// Removes the headers that would let an upstream answer with part of a document
/// (`206`): a slice of a masked document is masked as a document of its own, so
/// the identifiers its rules name by position would pass. Returns whether any were
/// present.
pub fn strip_ranges(headers: &mut HeaderMap) -> bool {
    let had = headers.contains_key(header::RANGE) || headers.contains_key(header::IF_RANGE);
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    had
}

fn display_name(name: &str) -> String {
    name.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: http::Version, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const ANY: Expect<'static> = Expect {
        sni: None,
        hosts: &[],
    };

    #[test]
    fn repeated_singletons_and_method_overrides_are_ambiguous() {
        use http::Version as V;
        for name in SINGLETONS {
            let r = req(V::HTTP_11, "/x", &[(name, "1"), (name, "1")]);
            let e = admit(&r, ANY).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{name}");
            assert!(e.message().to_ascii_lowercase().contains(name), "{e:?}");
        }
        for name in METHOD_OVERRIDES {
            let r = req(V::HTTP_11, "/x", &[(name, "DELETE")]);
            assert!(matches!(admit(&r, ANY).unwrap_err(), Refusal::Ambiguous(_)));
        }
        // One of each is fine, as are repeated headers that are lists.
        let r = req(
            V::HTTP_11,
            "/x",
            &[
                ("authorization", "Bearer a"),
                ("host", "api.test"),
                ("accept", "a"),
                ("accept", "b"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ],
        );
        assert_eq!(admit(&r, ANY), Ok(Some("api.test".into())));
    }

    #[test]
    fn the_authority_must_be_the_sni_and_a_served_host() {
        use http::Version as V;
        let sni = Expect {
            sni: Some("api.test"),
            hosts: &[],
        };
        let ok = req(V::HTTP_11, "/x", &[("host", "API.test:443")]);
        assert_eq!(admit(&ok, sni), Ok(Some("api.test".into())));
        let ok = req(V::HTTP_11, "/x", &[("host", "api.test.")]);
        assert_eq!(admit(&ok, sni), Ok(Some("api.test".into())));
        let other = req(V::HTTP_11, "/x", &[("host", "other.test")]);
        let e = admit(&other, sni).unwrap_err();
        assert_eq!(e.status(), StatusCode::MISDIRECTED_REQUEST);
        // HTTP/2: :authority.
        let h2 = req(V::HTTP_2, "https://other.test/x", &[]);
        assert!(matches!(
            admit(&h2, sni).unwrap_err(),
            Refusal::Misdirected(_)
        ));
        // :authority and Host disagreeing is ambiguous whatever the SNI.
        let two = req(V::HTTP_2, "https://api.test/x", &[("host", "other.test")]);
        assert!(matches!(
            admit(&two, ANY).unwrap_err(),
            Refusal::Ambiguous(_)
        ));
        // A destination's hosts.
        let hosts = ["api.test".to_owned(), "*.fhir.test".to_owned()];
        let served = Expect {
            sni: None,
            hosts: &hosts,
        };
        for (h, ok) in [
            ("api.test", true),
            ("a.fhir.test", true),
            ("a.b.fhir.test", true),
            ("fhir.test", false),
            ("xfhir.test", false),
            ("other.test", false),
        ] {
            let r = req(V::HTTP_11, "/x", &[("host", h)]);
            assert_eq!(admit(&r, served).is_ok(), ok, "{h}");
        }
        // No authority at all (HTTP/1.0): nothing to compare.
        let none = req(V::HTTP_10, "/x", &[]);
        assert_eq!(admit(&none, sni), Ok(None));
        // A Host that is no authority.
        let bad = req(V::HTTP_11, "/x", &[("host", "a b")]);
        assert!(matches!(
            admit(&bad, ANY).unwrap_err(),
            Refusal::Ambiguous(_)
        ));
    }

    #[test]
    fn ranges_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, "bytes=10-20".parse().unwrap());
        h.insert(header::IF_RANGE, "\"e\"".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        assert!(strip_ranges(&mut h));
        assert_eq!(h.len(), 1);
        assert!(!strip_ranges(&mut h));
    }
}
