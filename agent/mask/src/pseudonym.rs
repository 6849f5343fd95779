//! Keyed pseudonyms for patient identifiers, so records never hold a raw patient id
//! yet an auditor can still find every access to one patient.
//!
//! pseudonym = "p:" + the first 32 hex digits of HMAC-SHA256(key, id). The key is 32
//! random bytes the agent keeps in `state_dir/pseudonym.key` (0600). Without the key
//! a pseudonym cannot be turned back into the id, nor computed from a guessed id;
//! `phigate audit pseudonym ID` computes it for an auditor on the host.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct Pseudonymizer {
    /// The keyed HMAC, prepared once (the key's pads hashed); cloned per pseudonym.
    mac: Hmac<Sha256>,
    /// Path segments after which the next segment is a patient id (FHIR: `Patient`).
    segments: Vec<String>,
    query_params: Vec<String>,
}

impl Pseudonymizer {
    /// A pseudonymizer with the host's key; `segments` are the path segments after
    /// which the next one is a patient id (FHIR: `Patient`).
    pub fn new(key: [u8; 32], segments: Vec<String>) -> Self {
        Pseudonymizer {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("any key length"),
            segments,
            query_params: vec!["patient".into(), "subject".into()],
        }
    }

    /// A pseudonymizer with a given key (masking tests and `phigate mask`); no path
    /// segments or query parameters.
    pub fn with_key(key: [u8; 32]) -> Self {
        Pseudonymizer {
            mac: Hmac::<Sha256>::new_from_slice(&key).expect("any key length"),
            segments: Vec::new(),
            query_params: Vec::new(),
        }
    }

    /// Query parameters whose values are patient ids (FHIR: `patient`, `subject`).
    pub fn with_query_params(mut self, params: Vec<String>) -> Self {
        self.query_params = params;
        self
    }

    pub fn pseudonym(&self, id: &str) -> String {
        let mut out = String::with_capacity(34);
        out.push_str("p:");
        out.push_str(self.digest_hex(id).as_str());
        out
    }

    /// The pseudonym without its `p:` prefix: 32 hex digits.
    pub fn digest_hex(&self, id: &str) -> Hex32 {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        let digest = mac.finalize().into_bytes();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in digest[..16].iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        Hex32(out)
    }

    /// The path with every patient id replaced by its pseudonym, and those pseudonyms.
    /// `/Patient/123/_history/2` -> (`/Patient/p:…/_history/2`, [`p:…`]).
    pub fn redact_path(&self, path: &str) -> (String, Vec<String>) {
        let mut refs = Vec::new();
        let mut out = String::with_capacity(path.len() + 32);
        let mut after_marker = false;
        for (i, seg) in path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            if after_marker && !seg.is_empty() && !seg.starts_with('$') && !seg.starts_with('_') {
                let id = percent_decode(seg);
                let p = self.pseudonym(&id);
                out.push_str(&p);
                if !refs.contains(&p) {
                    refs.push(p);
                }
                after_marker = false;
                continue;
            }
            out.push_str(seg);
            after_marker = self.segments.iter().any(|m| m == seg);
        }
        (out, refs)
    }

    /// The query string as records may hold it: values of patient-id parameters
    /// become pseudonyms (added to `refs`), FHIR control parameters (`_count`,
    /// `_since`, ...) stay, and every other value is redacted, because a search value
    /// (`name=Smith`, `birthdate=...`) is itself PHI.
    pub fn redact_query(&self, query: &str, refs: &mut Vec<String>) -> String {
        let mut out = String::with_capacity(query.len());
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let (k, v) = match pair.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (pair, None),
            };
            out.push_str(k);
            let Some(v) = v else { continue };
            out.push('=');
            let key = percent_decode(k);
            // `subject=Patient/123`, `patient=123`, `subject:Patient=123`.
            let base = key.split(':').next().unwrap_or("");
            if self.query_params.iter().any(|p| p == base) {
                let id = percent_decode(v);
                let id = id.rsplit('/').next().unwrap_or("");
                let p = self.pseudonym(id);
                out.push_str(&p);
                if !refs.contains(&p) {
                    refs.push(p);
                }
            } else if key.starts_with('_') {
                out.push_str(v);
            } else {
                out.push_str("[REDACTED]");
            }
        }
        out
    }
}

/// 32 lowercase hex digits (a pseudonym's digest part), held without an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex32([u8; 32]);

impl Hex32 {
    pub fn as_str(&self) -> &str {
        // SAFETY: built from ASCII hex digits only.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

/// %XX decoding, so `/Patient/12%33` and `/Patient/123` get the same pseudonym.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: u8) -> Pseudonymizer {
        Pseudonymizer::new([key; 32], vec!["Patient".into()])
    }

    #[test]
    fn stable_keyed_and_private() {
        let a = p(1);
        let b = p(1);
        assert_eq!(a.pseudonym("123"), b.pseudonym("123"));
        assert_ne!(a.pseudonym("123"), a.pseudonym("124"));
        assert!(a.pseudonym("123").starts_with("p:"));
        assert_eq!(a.pseudonym("123").len(), 34);
        assert_ne!(p(2).pseudonym("123"), a.pseudonym("123"), "keyed per host");
    }

    #[test]
    fn patient_ids_leave_the_path() {
        let ps = p(1);
        let (path, refs) = ps.redact_path("/fhir/Patient/12345/_history/2");
        assert!(!path.contains("12345"), "{path}");
        assert_eq!(refs, vec![ps.pseudonym("12345")]);
        assert_eq!(
            path,
            format!("/fhir/Patient/{}/_history/2", ps.pseudonym("12345"))
        );
        // Encoded the same id: the same pseudonym.
        assert_eq!(ps.redact_path("/Patient/1234%35").1, refs);
        // Operations and searches are not ids.
        assert_eq!(ps.redact_path("/Patient/$export").1.len(), 0);
        assert_eq!(ps.redact_path("/Patient/_search").1.len(), 0);
        assert_eq!(ps.redact_path("/Patient").0, "/Patient");
        assert_eq!(ps.redact_path("/Observation/9").1.len(), 0);
    }

    #[test]
    fn query_values_are_pseudonymized_or_redacted() {
        let ps = p(1);
        let mut refs = vec![];
        let q = ps.redact_query("subject=Patient/77&name=Smith&_count=500&flag", &mut refs);
        assert_eq!(
            q,
            format!(
                "subject={}&name=[REDACTED]&_count=500&flag",
                ps.pseudonym("77")
            )
        );
        assert_eq!(refs, vec![ps.pseudonym("77")]);
        assert!(!q.contains("Smith"));
    }
}
