//! phigate's PHI masking engine: what flows back to the client (and, when configured, what goes
//! upstream) has the identifiers a profile names replaced before it leaves phigate,
//! and records hold only masked bodies.
//!
//! * [`profile`]: profiles (`<policies_dir>/profiles/*.toml`) and the set's hash.
//! * [`path`]: the JSON path subset rules use, and its incremental matcher.
//! * [`fhir`]: FHIR R4 datatypes (from the official definitions) for type rules and
//!   the allow-list.
//! * [`detect`]: detectors for identifiers inside text, with checksums.
//! * [`attach`]: text attachments decoded, masked by the detectors, re-encoded.
//! * [`ops`]: the operators (redact, partial, pseudonymize, generalize_date, zip3,
//!   age_cap, drop, keep).
//! * [`json`]: the single-pass streaming transform of JSON and NDJSON bytes.
//! * [`encoding`]: gzip / deflate / br / zstd decoding.
//! * [`dom`]: the same masking over a `serde_json::Value` (reference and benchmark peer).
//! * [`pseudonym`]: keyed pseudonyms for patient ids (bodies, paths, query strings).
//!
//! A crate of its own so that it is built, tested and fuzzed without the agent (no
//! eBPF, no sockets): the agent wraps it for the data path (`phigate::mask`).
//!
//! Entry points: [`BodyMasker`] (a body, chunk by chunk), [`mask_body`] (a whole
//! body), [`mask_headers`].

pub mod attach;
pub mod detect;
pub mod dom;
pub mod encoding;
pub mod fhir;
pub mod json;
pub mod lookahead;
pub mod ops;
pub mod path;
pub mod profile;
pub mod pseudonym;
pub mod xml;

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderMap;

pub use profile::{Profile, ProfileError, ProfileSet};

use detect::Hit;
use ops::{placeholder, Op, OpEnv, Scalar};
use pseudonym::Pseudonymizer;

/// Rescans of a string after its detector hits are replaced (see `text_scanned`).
const MAX_DETECTOR_ROUNDS: usize = 4;

/// How a body is parsed for masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`, `application/*+json` (FHIR: `application/fhir+json`).
    Json,
    /// `application/fhir+ndjson`, `application/x-ndjson`, `application/ndjson`,
    /// `application/jsonl`: one JSON value per line (FHIR bulk export).
    Ndjson,
    /// `application/fhir+xml` (and the older `application/xml+fhir`): FHIR's XML form.
    Xml,
}

/// The kind a content type is masked as; `None` for anything else.
pub fn body_kind(content_type: Option<&str>) -> Option<BodyKind> {
    let media = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    let (top, sub) = media.split_once('/')?;
    if top != "application" {
        return None;
    }
    if sub == "json" || sub.ends_with("+json") {
        Some(BodyKind::Json)
    } else if matches!(sub, "x-ndjson" | "ndjson" | "jsonl" | "x-jsonlines")
        || sub.ends_with("+ndjson")
    {
        Some(BodyKind::Ndjson)
    } else if matches!(sub, "fhir+xml" | "xml+fhir") {
        Some(BodyKind::Xml)
    } else {
        None
    }
}

/// What masking needs besides the profile: the pseudonym key and the current year.
pub struct MaskContext {
    pub pseudonyms: Arc<Pseudonymizer>,
    pub year: i32,
}

impl MaskContext {
    pub fn new(pseudonyms: Arc<Pseudonymizer>) -> MaskContext {
        MaskContext {
            pseudonyms,
            year: time::OffsetDateTime::now_utc().year(),
        }
    }
}

/// Why a body could not be masked. Messages never quote the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("the body is not valid JSON or XML at byte {offset}: {message}")]
    Syntax { offset: u64, message: String },
    #[error("{0}")]
    Encoding(String),
}

/// Masked values per entity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts(Vec<u64>);

impl Counts {
    pub fn new(profile: &Profile) -> Counts {
        Counts(vec![0; profile.entities.len()])
    }

    #[inline]
    pub fn add(&mut self, entity: usize) {
        self.0[entity] += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn merge(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    /// Entity name -> count, the non-zero ones (as records hold them).
    pub fn by_entity(&self, profile: &Profile) -> BTreeMap<String, i64> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (profile.entities[i].clone(), *n as i64))
            .collect()
    }
}

/// Masks one scalar value under the rule in force (or the detectors, without one).
pub struct ScalarMasker {
    hits: Vec<Hit>,
    cache: ops::PseudonymCache,
}

impl ScalarMasker {
    pub fn new(_profile: &Profile) -> ScalarMasker {
        ScalarMasker {
            hits: Vec::new(),
            cache: ops::PseudonymCache::default(),
        }
    }

    fn env<'a>(
        profile: &'a Profile,
        ctx: &'a MaskContext,
        cache: Option<&'a ops::PseudonymCache>,
    ) -> OpEnv<'a> {
        OpEnv {
            pseudonyms: &ctx.pseudonyms,
            year: ctx.year,
            restricted_zip3: &profile.restricted_zip3,
            cache,
        }
    }

    /// The masked text, or `None` when it stays as is.
    pub fn text(
        &mut self,
        profile: &Profile,
        ctx: &MaskContext,
        rule: Option<usize>,
        s: &str,
        counts: &mut Counts,
    ) -> Option<String> {
        let scan = profile.detectors.worth_scanning(s.as_bytes());
        self.text_scanned(profile, ctx, rule, s, scan, counts)
    }

    /// [`Self::text`] when the caller already knows whether detectors must scan it.
    pub fn text_scanned(
        &mut self,
        profile: &Profile,
        ctx: &MaskContext,
        rule: Option<usize>,
        s: &str,
        scan: bool,
        counts: &mut Counts,
    ) -> Option<String> {
        if let Some(r) = rule {
            let r = &profile.rules[r];
            if matches!(r.op, Op::Keep | Op::Drop) {
                return None;
            }
            counts.add(r.entity);
            let out = r.op.apply_text(
                s,
                &profile.entities[r.entity],
                &Self::env(profile, ctx, Some(&self.cache)),
            )?;
            return (out != s).then_some(out);
        }
        if !scan {
            return None;
        }
        profile.detectors.find_all(s, &mut self.hits);
        if self.hits.is_empty() {
            return None;
        }
        let mut out = self.replace_hits(profile, ctx, s, counts);
        // A replacement can put a word boundary beside text a detector skipped
        // because it ran into a word ("a@b.org01005": the ZIP shows once the email
        // is gone). Scan again until nothing more is found, so the client never
        // sees a detectable identifier and masking stays idempotent.
        for _ in 0..MAX_DETECTOR_ROUNDS {
            profile.detectors.find(&out, &mut self.hits);
            if self.hits.is_empty() {
                break;
            }
            out = self.replace_hits(profile, ctx, &out, counts);
        }
        (out != s).then_some(out)
    }

    /// `s` with each of `self.hits` replaced by its rule's operator.
    fn replace_hits(
        &self,
        profile: &Profile,
        ctx: &MaskContext,
        s: &str,
        counts: &mut Counts,
    ) -> String {
        let env = Self::env(profile, ctx, Some(&self.cache));
        let mut out = String::with_capacity(s.len() + 16);
        let mut last = 0;
        for h in &self.hits {
            let dr = &profile.detector_rules[h.detector];
            let entity = &profile.entities[dr.entity];
            counts.add(dr.entity);
            out.push_str(&s[last..h.start]);
            let found = &s[h.start..h.end];
            match dr.op.apply_text(found, entity, &env) {
                Some(m) => out.push_str(&m),
                None => out.push_str(&placeholder(entity)),
            }
            last = h.end;
        }
        out.push_str(&s[last..]);
        out
    }

    /// The masked number, or `None` when it stays as is. Detectors do not look at
    /// numbers; only path rules do.
    pub fn number(
        &mut self,
        profile: &Profile,
        ctx: &MaskContext,
        rule: Option<usize>,
        text: &str,
        counts: &mut Counts,
    ) -> Option<Scalar> {
        let r = &profile.rules[rule?];
        if matches!(r.op, Op::Keep | Op::Drop) {
            return None;
        }
        counts.add(r.entity);
        match r.op.apply_number(
            text,
            &profile.entities[r.entity],
            &Self::env(profile, ctx, Some(&self.cache)),
        )? {
            Scalar::Number(n) if n == text => None,
            other => Some(other),
        }
    }
}

/// The streaming transform of a body's kind.
enum Stream {
    Json(json::JsonStream),
    Xml(xml::XmlStream),
}

impl Stream {
    fn push(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        match self {
            Stream::Json(s) => s.push(b, out),
            Stream::Xml(s) => s.push(b, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        match self {
            Stream::Json(s) => s.finish(out),
            Stream::Xml(s) => s.finish(out),
        }
    }

    fn counts(&self) -> &Counts {
        match self {
            Stream::Json(s) => s.counts(),
            Stream::Xml(s) => s.counts(),
        }
    }
}

/// A body being masked chunk by chunk: decode, then the streaming transform.
pub struct BodyMasker {
    decoder: encoding::Decoder,
    stream: Stream,
    profile: Arc<Profile>,
    /// Time spent masking this body (the `masking` stage's duration).
    busy: std::time::Duration,
}

impl BodyMasker {
    /// `encoding`: the body's Content-Encoding (the output is always identity).
    pub fn new(
        profile: Arc<Profile>,
        ctx: Arc<MaskContext>,
        kind: BodyKind,
        encoding: Option<&str>,
    ) -> Result<BodyMasker, MaskError> {
        let decoder = encoding::Decoder::for_encoding(encoding).map_err(MaskError::Encoding)?;
        Ok(BodyMasker {
            decoder,
            stream: match kind {
                BodyKind::Xml => Stream::Xml(xml::XmlStream::new(profile.clone(), ctx)),
                _ => Stream::Json(json::JsonStream::new(
                    profile.clone(),
                    ctx,
                    kind == BodyKind::Ndjson,
                )),
            },
            profile,
            busy: std::time::Duration::ZERO,
        })
    }

    /// Longest single value held while a chunk boundary cuts it.
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.stream = match self.stream {
            Stream::Json(s) => Stream::Json(s.max_value_bytes(n)),
            Stream::Xml(s) => Stream::Xml(s.max_value_bytes(n)),
        };
        self
    }

    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        let t0 = std::time::Instant::now();
        let r = self.push_timed(chunk, out);
        self.busy += t0.elapsed();
        r
    }

    /// Ends the body.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let t0 = std::time::Instant::now();
        let r = self.finish_timed(out);
        self.busy += t0.elapsed();
        r
    }

    /// Time spent masking this body so far (the agent's `masking` stage).
    pub fn busy(&self) -> std::time::Duration {
        self.busy
    }

    fn push_timed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), MaskError> {
        if self.decoder.is_identity() {
            return self.stream.push(chunk, out);
        }
        let mut result = Ok(());
        let stream = &mut self.stream;
        self.decoder
            .push(chunk, &mut |d| {
                if result.is_ok() {
                    result = stream.push(d, out);
                }
            })
            .map_err(MaskError::Encoding)?;
        result
    }

    fn finish_timed(&mut self, out: &mut Vec<u8>) -> Result<(), MaskError> {
        let mut result = Ok(());
        let stream = &mut self.stream;
        self.decoder
            .finish(&mut |d| {
                if result.is_ok() {
                    result = stream.push(d, out);
                }
            })
            .map_err(MaskError::Encoding)?;
        result?;
        self.stream.finish(out)
    }

    pub fn counts(&self) -> &Counts {
        self.stream.counts()
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.profile
    }
}

/// Masks a whole body; returns the masked bytes and the counts.
pub fn mask_body(
    profile: &Arc<Profile>,
    ctx: &Arc<MaskContext>,
    kind: BodyKind,
    encoding: Option<&str>,
    body: &[u8],
) -> Result<(Vec<u8>, Counts), MaskError> {
    let mut m = BodyMasker::new(profile.clone(), ctx.clone(), kind, encoding)?;
    let mut out = Vec::with_capacity(body.len());
    m.push(body, &mut out)?;
    m.finish(&mut out)?;
    Ok((out, m.counts().clone()))
}

/// Applies the profile's header rules in place, counting into `counts`.
pub fn mask_headers(
    profile: &Profile,
    ctx: &MaskContext,
    headers: &mut HeaderMap,
    counts: &mut Counts,
) {
    let env = ScalarMasker::env(profile, ctx, None);
    for h in &profile.headers {
        let Ok(name) = http::HeaderName::from_bytes(h.name.as_bytes()) else {
            continue;
        };
        let values: Vec<http::HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        if values.is_empty() {
            continue;
        }
        headers.remove(&name);
        if h.op == Op::Drop {
            counts.add(h.entity);
            continue;
        }
        for v in values {
            counts.add(h.entity);
            let text = String::from_utf8_lossy(v.as_bytes());
            let masked =
                h.op.apply_text(&text, &profile.entities[h.entity], &env)
                    .unwrap_or_else(|| placeholder(&profile.entities[h.entity]));
            if let Ok(v) = http::HeaderValue::from_str(&masked) {
                headers.append(&name, v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
