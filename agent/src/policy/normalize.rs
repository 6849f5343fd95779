//! The request as policies see it: a normalized path and decoded query parameters.
//!
//! Path normalization (RFC 3986 6.2.2 plus duplicate slashes), in this order:
//! 1. percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
//!    every other percent-encoding is kept with upper-case hex (`%2f` -> `%2F`: an
//!    encoded slash stays a character of a segment, never a separator);
//! 2. runs of `/` become one `/`;
//! 3. `.` and `..` segments are removed (`..` never climbs above the root);
//! 4. a path whose encoded slashes or backslashes (`%2F`, `%5C`) would hide a `.` or
//!    `..` segment is refused: an upstream that decodes them before resolving dots
//!    would otherwise serve another path than the one authorized.
//!
//! The normalized path is also the path phigate forwards, so the upstream receives
//! exactly what was authorized.

/// Normalizes a request path (without the query). Returns `None` for a path that is
/// not origin-form (does not start with `/`), carries a malformed percent-encoding,
/// an encoded control character (`%00`: truncation in an upstream written in C,
/// `%0D%0A`: header injection where it is logged or echoed), or encoded separators
/// hiding dot segments.
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
                let hidden_dots = (s.contains("%2F") || s.contains("%5C"))
                    && s.replace("%5C", "%2F")
                        .split("%2F")
                        .any(|p| p == "." || p == "..");
                if hidden_dots {
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

/// Query parameters, decoded as `application/x-www-form-urlencoded` (`+` is a space).
/// A parameter given several times keeps every value, in order.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
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
        ] {
            assert_eq!(normalize_path(hidden), None, "{hidden}");
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
    }
}
