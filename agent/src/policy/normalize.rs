//! The request as policies see it: a normalized path and decoded query parameters.
//!
//! Path normalization (RFC 3986 6.2.2 plus duplicate slashes), in this order:
//! 1. percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
//!    every other percent-encoding is kept with upper-case hex (`%2f` -> `%2F`: an
//!    encoded slash stays a character of a segment, never a separator);
//! 2. runs of `/` become one `/`;
//! 3. `.` and `..` segments are removed (`..` never climbs above the root);
//! 4. a path in which some server would see a `.` or `..` segment that this
//!    normalization does not is refused: encoded or raw separators (`%2F`, `%5C`,
//!    `\`, which nginx decodes and WHATWG URL parsers such as Node's treat as `/`)
//!    and path parameters (`..;x`, `.;x`, `..%3B`: Tomcat and other servlet
//!    containers drop `;` parameters before resolving dots). Such an upstream would
//!    otherwise serve another path than the one authorized
//!    (`/fhir/Coverage/..;/Group/1/$export` is `/fhir/Group/1/$export` to Tomcat).
//!
//! The normalized path is also the path phigate forwards, so the upstream receives
//! exactly what was authorized.

/// Normalizes a request path (without the query). Returns `None` for a path that is
/// not origin-form (does not start with `/`), carries a malformed percent-encoding,
/// an encoded control character (`%00`: truncation in an upstream written in C,
/// `%0D%0A`: header injection where it is logged or echoed), or a segment hiding a
/// dot segment (see the module docs).
pub fn normalize_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if v.is_ascii_control() {
                return None;
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{v:02X}"));
            }
            i += 3;
        } else {
            decoded.push(b as char);
            i += 1;
        }
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => {
                if hides_dot_segment(s) {
                    return None;
                }
                out.push(s)
            }
        }
    }
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || s.is_empty() {
        s.push('/');
    }
    Some(s)
}

/// Whether a segment (unreserved characters decoded, other encodings upper case)
/// holds a `.` or `..` segment for a server that splits it at an encoded or raw
/// separator, or strips `;` parameters (raw or `%3B`) from it.
fn hides_dot_segment(seg: &str) -> bool {
    if !seg.contains(['%', '\\', ';']) {
        return false;
    }
    seg.replace("%2F", "/")
        .replace("%5C", "/")
        .replace('\\', "/")
        .split('/')
        .any(|piece| {
            let base = piece.split(';').next().unwrap_or("");
            let base = base.split("%3B").next().unwrap_or("");
            base == "." || base == ".."
        })
}

/// Query parameters, decoded as `application/x-www-form-urlencoded` (`+` is a space).
/// A parameter given several times keeps every value, in order. A name with a FHIR
/// modifier or chain (`_include:iterate`, `_has:Observation:patient:code`) is also
/// given under its base name (`_include`, `_has`), so a policy that names the base
/// cannot be passed by adding a modifier.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        if let Some((base, _)) = k.split_once(':').filter(|(b, _)| !b.is_empty()) {
            out.push((base.to_owned(), v.clone()));
        }
        out.push((k, v));
    }
    out
}

fn form_decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for (raw, want) in [
            ("/", "/"),
            ("/fhir/Patient/1", "/fhir/Patient/1"),
            ("/fhir//Patient///1", "/fhir/Patient/1"),
            ("/fhir/./Patient/../Coverage", "/fhir/Coverage"),
            ("/fhir/%50atient", "/fhir/Patient"),
            ("/fhir/%2e%2e/admin", "/admin"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/", "/a/"),
            ("/files/a%2fb", "/files/a%2Fb"),
            ("/fhir/Patient/$export", "/fhir/Patient/$export"),
            ("/x%20y", "/x%20y"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Some(want), "{raw}");
        }
        assert_eq!(normalize_path("*"), None);
        assert_eq!(normalize_path("/bad%zz"), None);
        assert_eq!(normalize_path("/short%2"), None);
        assert_eq!(normalize_path("/fhir/Coverage/%00"), None);
        assert_eq!(normalize_path("/a%0D%0ASet-Cookie:x"), None);
        assert_eq!(normalize_path("/a%7f"), None);
        // Encoded separators hiding dot segments: an upstream that decodes them
        // first would resolve to another path than the one authorized.
        for hidden in [
            "/fhir/Patient%2f..%2fadmin",
            "/fhir/Coverage/x%2F..%2F..%2FPatient%2F1",
            "/fhir/Coverage/x%5C..%5CPatient",
            "/fhir/Coverage/%2e%2e%2FPatient",
            "/fhir/Coverage/.%2F",
            "/fhir/Coverage/..;/Group/1/$export",
            "/fhir/Coverage/.;x/Patient",
            "/fhir/Coverage/..;jsessionid=1/Group",
            "/fhir/Coverage/%2e%2e%3B/Group",
            "/fhir/Coverage/..%3Bx/Group",
            "/fhir/Coverage/..\\Group",
            "/fhir/Coverage\\..\\Group",
        ] {
            assert_eq!(normalize_path(hidden), None, "{hidden}");
        }
        // Parameters and backslashes that hide nothing stay as they are.
        assert_eq!(
            normalize_path("/fhir/Patient;v=1/1").as_deref(),
            Some("/fhir/Patient;v=1/1")
        );
        assert_eq!(normalize_path("/a/x..;/b").as_deref(), Some("/a/x..;/b"));
    }

    /// How three families of servers turn a request path into the resource path,
    /// as far as dot segments go. Each splits the path into segments its own way,
    /// transforms each segment, then resolves `.` and `..`.
    #[derive(Debug, Clone, Copy)]
    enum Server {
        /// Tomcat and servlet containers: `;` parameters dropped per segment, then
        /// percent-decoding (an encoded `/` is refused by default, so stays in its
        /// segment here), then dots.
        Tomcat,
        /// nginx: the whole path percent-decoded first (`%2F` becomes a separator),
        /// slashes merged, then dots.
        Nginx,
        /// Node (WHATWG URL): `\` is a separator, `%2e` counts as `.`; no decoding.
        Node,
    }

    fn decode(s: &str) -> String {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    }

    impl Server {
        /// The segments the server resolves dots on.
        fn segments(self, path: &str) -> Vec<String> {
            match self {
                Server::Tomcat => path
                    .split('/')
                    .skip(1)
                    .map(|s| decode(s.split(';').next().unwrap_or("")).replace('/', "%2F"))
                    .collect(),
                Server::Nginx => decode(path)
                    .split(['/', '\\'])
                    .skip(1)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                Server::Node => path
                    .split(['/', '\\'])
                    .skip(1)
                    .map(|s| {
                        let l = s.to_ascii_lowercase();
                        match l.as_str() {
                            "%2e" => ".".to_owned(),
                            ".%2e" | "%2e." | "%2e%2e" => "..".to_owned(),
                            _ => s.to_owned(),
                        }
                    })
                    .collect(),
            }
        }

        /// Whether resolving dots changes anything for this server: then the
        /// resource it serves is not the path as written.
        fn resolves_dots(self, path: &str) -> bool {
            self.segments(path).iter().any(|s| s == "." || s == "..")
        }
    }

    use proptest::prelude::*;

    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/", "a", "Patient", ".", "..", "%2e", "%2E", "%2F", "%2f", "%5C", "\\", ";", ";x=1",
            "%3B", "%3b", "%25", "x",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// What phigate forwards (the normalized path) holds no dot segment for
        /// any of the servers: each serves the path the policies decided on.
        #[test]
        fn no_server_resolves_dots_in_a_normalized_path(
            pieces in prop::collection::vec(piece(), 0..12)
        ) {
            let raw = format!("/{}", pieces.concat());
            if let Some(n) = normalize_path(&raw) {
                for server in [Server::Tomcat, Server::Nginx, Server::Node] {
                    prop_assert!(
                        !server.resolves_dots(&n),
                        "{raw:?} normalized to {n:?}, in which {server:?} resolves dot segments"
                    );
                }
                // And normalizing is stable.
                let again = normalize_path(&n);
                prop_assert_eq!(again.as_deref(), Some(n.as_str()));
            }
        }
    }

    #[test]
    fn query() {
        assert_eq!(
            parse_query("_type=Patient&x=a+b&x=%41&flag"),
            vec![
                ("_type".into(), "Patient".into()),
                ("x".into(), "a b".into()),
                ("x".into(), "A".into()),
                ("flag".into(), "".into()),
            ]
        );
        assert!(parse_query("").is_empty());
        assert_eq!(
            parse_query("_include:iterate=Patient:link&_has:Observation:patient:code=1"),
            vec![
                ("_include".into(), "Patient:link".into()),
                ("_include:iterate".into(), "Patient:link".into()),
                ("_has".into(), "1".into()),
                ("_has:Observation:patient:code".into(), "1".into()),
            ]
        );
    }
}
