//! Masking profiles: one TOML file per profile in `<policies_dir>/profiles/`, the
//! profile named by the file stem. Loaded and validated as a set, so a bad file
//! rejects the whole (re)load with its file, line and field.
//!
//! ```toml
//! description = "..."
//! pass_through = ["text/plain"]   # content types sent unmasked (recorded); others fail closed
//! pass_unparsable = false         # true: a buffered body that is not valid JSON goes out raw
//!
//! [[rule]]                        # path rules: the first rule matching the nearest node wins
//! path = "$..birthDate"
//! op = "generalize_date"
//! max_age = 89
//!
//! [[rule]]                        # FHIR type rules (with a [fhir] table)
//! fhir = "base64Binary"
//! op = "drop"
//! text_attachments = "mask"       # text attachments decoded, masked by the detectors
//!
//! [[rule]]                        # detector rules: text values no path rule covers
//! detector = "ssn"
//! op = "redact"
//!
//! [[pattern]]                     # configured detectors (MRN, health plan, account numbers)
//! name = "mrn"
//! regex = 'MRN[-: ]*[0-9]{6,10}'
//!
//! [[header]]
//! name = "content-location"
//! op = "pseudonymize"
//! split_last = "/"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::attach::{self, TextAttachments};
use super::detect::{Detector, Detectors, BUILTIN};
use super::fhir::{self, FhirRules, Target};
use super::ops::{Op, OP_NAMES, RESTRICTED_ZIP3};
use super::path::{JsonPath, PathDfa, Selector};

/// A profile error: file, line, field and why (printed as the agent prints a config
/// error: `file:line: field: message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    pub file: PathBuf,
    /// 1-based line, when the error has a location.
    pub line: Option<usize>,
    /// Dotted field path, e.g. `rule[2].op`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ProfileError {}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// A path rule, or a FHIR type rule (`path` is `None`; after every path rule, so a
/// path rule's index is its path's index in the automaton).
#[derive(Debug, Clone)]
pub struct Rule {
    pub path: Option<JsonPath>,
    pub op: Op,
    pub entity: usize,
    /// `text_attachments = "mask"`: text attachments are masked, not dropped.
    pub text: Option<TextAttachments>,
}

/// What a detector's finds become.
#[derive(Debug, Clone)]
pub struct DetectorRule {
    pub op: Op,
    pub entity: usize,
}

#[derive(Debug, Clone)]
pub struct HeaderRule {
    /// Lower case.
    pub name: String,
    pub op: Op,
    pub entity: usize,
}

/// One validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Content types (`type/subtype`, or `type/*`) sent unmasked; the record says so.
    pub pass_through: Vec<String>,
    /// A buffered body that is not valid JSON is sent raw instead of refused.
    pub pass_unparsable: bool,
    pub rules: Vec<Rule>,
    /// The automaton of the rules' paths (a fresh copy per body warms its own cache).
    pub(crate) dfa: PathDfa,
    /// FHIR type rules and the allow-list (`[fhir]`), when the profile has them.
    pub(crate) fhir: Option<FhirRules>,
    pub detectors: Detectors,
    /// Parallel to `detectors`.
    pub detector_rules: Vec<DetectorRule>,
    pub headers: Vec<HeaderRule>,
    /// Entity names counted in records; rules refer to them by index.
    pub entities: Vec<String>,
    /// `"[REDACTED:ENTITY]"` as JSON text, per entity.
    pub(crate) placeholders: Vec<Vec<u8>>,
    pub restricted_zip3: Vec<String>,
    /// SHA-256 of the file.
    pub file_hash: String,
}

/// Every profile of a policies directory, and the hash of the set.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    profiles: BTreeMap<String, Arc<Profile>>,
    hash: String,
}

impl ProfileSet {
    /// Loads `<policies_dir>/profiles/*.toml`. No such directory: an empty set.
    pub fn load(policies_dir: &Path) -> Result<ProfileSet, ProfileError> {
        let dir = policies_dir.join("profiles");
        let mut files = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries {
                    let e = e.map_err(|e| ProfileError {
                        file: dir.clone(),
                        line: None,
                        key: None,
                        message: format!("cannot list profiles: {e}"),
                    })?;
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "toml") {
                        files.push(p);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ProfileError {
                    file: dir,
                    line: None,
                    key: None,
                    message: format!("cannot list profiles: {e}"),
                })
            }
        }
        files.sort();
        let mut profiles = BTreeMap::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| ProfileError {
                file: f.clone(),
                line: None,
                key: None,
                message: format!("cannot read: {e}"),
            })?;
            let p = Profile::parse(&f, &text)?;
            profiles.insert(p.name.clone(), Arc::new(p));
        }
        Ok(ProfileSet::from_profiles(profiles.into_values().collect()))
    }

    pub fn from_profiles(list: Vec<Arc<Profile>>) -> ProfileSet {
        let profiles: BTreeMap<String, Arc<Profile>> =
            list.into_iter().map(|p| (p.name.clone(), p)).collect();
        let mut h = Sha256::new();
        for (name, p) in &profiles {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(p.file_hash.as_bytes());
            h.update([b'\n']);
        }
        ProfileSet {
            profiles,
            hash: hex::encode(h.finalize()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.profiles.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// SHA-256 over the set: each profile's name and file hash, in name order.
    pub fn hash(&self) -> &str {
        &self.hash
    }
}

// ---- raw, as written ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: Option<Spanned<String>>,
    description: Option<String>,
    pass_through: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pass_unparsable: bool,
    restricted_zip3: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pattern: Vec<Spanned<RawPattern>>,
    #[serde(default)]
    header: Vec<Spanned<RawHeader>>,
    fhir: Option<Spanned<RawFhir>>,
}

/// `[fhir]`: an allow-list over FHIR R4 datatypes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFhir {
    /// What values no rule covers become (`redact` or `drop`).
    default: Spanned<String>,
    default_entity: Option<Spanned<String>>,
    extension_entity: Option<Spanned<String>>,
    /// Extension urls whose values are read by type like any element.
    #[serde(default)]
    safe_extensions: Vec<Spanned<String>>,
}

/// The operator fields rules and header rules share.
struct RawOp<'a> {
    op: &'a Spanned<String>,
    keep_last: &'a Option<Spanned<u32>>,
    split_last: &'a Option<Spanned<String>>,
    max_age: &'a Option<Spanned<u32>>,
}

macro_rules! raw_op {
    ($r:expr) => {
        RawOp {
            op: &$r.op,
            keep_last: &$r.keep_last,
            split_last: &$r.split_last,
            max_age: &$r.max_age,
        }
    };
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    path: Option<Spanned<String>>,
    fhir: Option<Spanned<String>>,
    detector: Option<Spanned<String>>,
    op: Spanned<String>,
    entity: Option<Spanned<String>>,
    keep_last: Option<Spanned<u32>>,
    split_last: Option<Spanned<String>>,
    max_age: Option<Spanned<u32>>,
    /// `"drop"` (default) or `"mask"`: on an attachment rule, decode text attachments
    /// and mask them with the detectors.
    text_attachments: Option<Spanned<String>>,
    /// Longest decoded text attachment masked (bytes).
    text_max_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPattern {
    name: Spanned<String>,
    regex: Spanned<String>,
    entity: Option<Spanned<String>>,
    #[serde(default)]
    luhn: bool,
    #[serde(default = "yes")]
    requires_digit: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: Spanned<String>,
    op: Spanned<String>,
    entity: Option<Spanned<String>>,
    keep_last: Option<Spanned<u32>>,
    split_last: Option<Spanned<String>>,
    max_age: Option<Spanned<u32>>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The profile file being parsed: every error names it, and the line of its span.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

/// Entity names in the order rules first name them; rules refer to them by index.
#[derive(Default)]
struct Entities(Vec<String>);

impl Entities {
    fn index(&mut self, name: &str) -> usize {
        match self.0.iter().position(|e| e == name) {
            Some(i) => i,
            None => {
                self.0.push(name.to_owned());
                self.0.len() - 1
            }
        }
    }
}

/// A profile's `[[rule]]`s, by kind.
#[derive(Default)]
struct Rules {
    paths: Vec<Rule>,
    /// FHIR type rules: their target and rule (appended after `paths`).
    types: Vec<(Target, Rule)>,
    /// Parallel to `detector_rules`.
    detectors: Vec<Detector>,
    detector_rules: Vec<DetectorRule>,
    /// Where the first `text_attachments = "mask"` is (it needs detector rules).
    text_mask: Option<(Range<usize>, String)>,
}

/// Configured detectors by name, with their default entity.
type Patterns = BTreeMap<String, (Detector, String)>;

impl Source<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: String,
    ) -> ProfileError {
        ProfileError {
            file: self.file.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            key: field,
            message,
        }
    }

    /// An entity name as records and placeholders show it (upper case).
    fn entity(&self, e: &Spanned<String>, field: String) -> Result<String, ProfileError> {
        let v = e.get_ref();
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(self.err(
                Some(e.span()),
                Some(field),
                "an entity is letters, digits and `_` (it appears in placeholders and records)"
                    .into(),
            ));
        }
        Ok(v.to_ascii_uppercase())
    }

    /// An operator and its parameters (each only with the operator it belongs to).
    fn op(&self, r: RawOp<'_>, field: &str) -> Result<Op, ProfileError> {
        let name = r.op.get_ref().as_str();
        let misplaced = |span: Range<usize>, param: &str, owner: &str| {
            self.err(
                Some(span),
                Some(format!("{field}.{param}")),
                format!("only meaningful with op = \"{owner}\""),
            )
        };
        if let Some(k) = r.keep_last {
            if name != "partial" {
                return Err(misplaced(k.span(), "keep_last", "partial"));
            }
        }
        if let Some(k) = r.split_last {
            if name != "pseudonymize" {
                return Err(misplaced(k.span(), "split_last", "pseudonymize"));
            }
        }
        if let Some(k) = r.max_age {
            if name != "generalize_date" {
                return Err(misplaced(k.span(), "max_age", "generalize_date"));
            }
        }
        Ok(match name {
            "keep" => Op::Keep,
            "redact" => Op::Redact,
            "partial" => Op::Partial {
                keep_last: r.keep_last.as_ref().map_or(4, |k| *k.get_ref() as usize),
            },
            "pseudonymize" => Op::Pseudonymize {
                split_last: match r.split_last {
                    None => None,
                    Some(s) => Some(self.split_last(s, field)?),
                },
            },
            "generalize_date" => Op::GeneralizeDate {
                max_age: r.max_age.as_ref().map(|m| *m.get_ref()),
            },
            "zip3" => Op::Zip3,
            "age_cap" => Op::AgeCap,
            "drop" => Op::Drop,
            other => {
                return Err(self.err(
                    Some(r.op.span()),
                    Some(format!("{field}.op")),
                    format!(
                        "`{other}` is not an operator; one of {}",
                        OP_NAMES.join(", ")
                    ),
                ))
            }
        })
    }

    fn split_last(&self, s: &Spanned<String>, field: &str) -> Result<char, ProfileError> {
        let mut c = s.get_ref().chars();
        match (c.next(), c.next()) {
            (Some(ch), None) => Ok(ch),
            _ => Err(self.err(
                Some(s.span()),
                Some(format!("{field}.split_last")),
                "one character, e.g. \"/\"".into(),
            )),
        }
    }

    /// `[[pattern]]`: configured detectors, by name.
    fn patterns(&self, raw: &[Spanned<RawPattern>]) -> Result<Patterns, ProfileError> {
        let mut patterns = Patterns::new();
        for (i, p) in raw.iter().enumerate() {
            let p = p.get_ref();
            let field = format!("pattern[{i}]");
            let name = p.name.get_ref();
            if !valid_name(name) {
                return Err(self.err(
                    Some(p.name.span()),
                    Some(format!("{field}.name")),
                    "letters, digits, `_` and `-`".into(),
                ));
            }
            if BUILTIN.contains(&name.as_str()) || patterns.contains_key(name) {
                return Err(self.err(
                    Some(p.name.span()),
                    Some(format!("{field}.name")),
                    format!("`{name}` is already a detector"),
                ));
            }
            let d = Detector::pattern(name, p.regex.get_ref(), p.luhn, p.requires_digit)
                .map_err(|m| self.err(Some(p.regex.span()), Some(format!("{field}.regex")), m))?;
            let ent = match &p.entity {
                Some(e) => self.entity(e, format!("{field}.entity"))?,
                None => name.to_ascii_uppercase().replace('-', "_"),
            };
            patterns.insert(name.clone(), (d, ent));
        }
        Ok(patterns)
    }

    /// `[[rule]]`: path rules and detector rules, in file order.
    fn rules(
        &self,
        raw: &[Spanned<RawRule>],
        patterns: &Patterns,
        entities: &mut Entities,
    ) -> Result<Rules, ProfileError> {
        let mut rules = Rules::default();
        for (i, r) in raw.iter().enumerate() {
            let rspan = r.span();
            let r = r.get_ref();
            let field = format!("rule[{i}]");
            let op = self.op(raw_op!(r), &field)?;
            let explicit = match &r.entity {
                Some(e) => Some(self.entity(e, format!("{field}.entity"))?),
                None => None,
            };
            match (&r.path, &r.detector, &r.fhir) {
                (Some(p), None, None) => {
                    self.no_text_option(r, &field)?;
                    let path = self.rule_path(p, &field)?;
                    let ent = explicit.unwrap_or_else(|| path_entity(&path));
                    rules.paths.push(Rule {
                        path: Some(path),
                        op,
                        entity: entities.index(&ent),
                        text: None,
                    });
                }
                (None, None, Some(t)) => {
                    let target = Target::parse(fhir::r4(), t.get_ref())
                        .map_err(|m| self.err(Some(t.span()), Some(format!("{field}.fhir")), m))?;
                    let ent = explicit.unwrap_or_else(|| fhir_entity(t.get_ref()));
                    let entity = entities.index(&ent);
                    let text = self.text_option(r, &field, &op, entities)?;
                    if let (Some(_), Some(m)) = (text, &r.text_attachments) {
                        rules.text_mask.get_or_insert((m.span(), field.clone()));
                        // The original's size and hash would describe (and the hash
                        // identify) the text before masking: removed from every
                        // attachment, whether its data was masked or dropped. First, so
                        // they beat any rule of the file on them.
                        for (k, el) in ["Attachment.size", "Attachment.hash"].iter().enumerate() {
                            let target =
                                Target::parse(fhir::r4(), el).expect("R4 has Attachment.size/hash");
                            let drop = Rule {
                                path: None,
                                op: Op::Drop,
                                entity,
                                text: None,
                            };
                            rules.types.insert(k, (target, drop));
                        }
                    }
                    rules.types.push((
                        target,
                        Rule {
                            path: None,
                            op,
                            entity,
                            text,
                        },
                    ));
                }
                (None, Some(d), None) => {
                    self.no_text_option(r, &field)?;
                    if matches!(op, Op::Keep | Op::Drop | Op::AgeCap) {
                        return Err(self.err(
                            Some(r.op.span()),
                            Some(format!("{field}.op")),
                            "a detector's find is replaced inside its text: use redact, partial, pseudonymize, generalize_date or zip3".into(),
                        ));
                    }
                    let (det, default_entity) =
                        self.rule_detector(d, &field, patterns, &rules.detectors)?;
                    rules.detectors.push(det);
                    rules.detector_rules.push(DetectorRule {
                        op,
                        entity: entities.index(&explicit.unwrap_or(default_entity)),
                    });
                }
                _ => {
                    return Err(self.err(
                        Some(rspan),
                        Some(field),
                        "a rule has either `path`, `fhir` or `detector`".into(),
                    ))
                }
            }
        }
        Ok(rules)
    }

    /// `text_attachments` / `text_max_bytes` on a rule that is not a `fhir` rule.
    fn no_text_option(&self, r: &RawRule, field: &str) -> Result<(), ProfileError> {
        match (&r.text_attachments, &r.text_max_bytes) {
            (Some(s), _) => Err(self.err(
                Some(s.span()),
                Some(format!("{field}.text_attachments")),
                "only on a `fhir` rule for base64Binary, Attachment.data or Binary.data".into(),
            )),
            (None, Some(s)) => Err(self.err(
                Some(s.span()),
                Some(format!("{field}.text_max_bytes")),
                "only with text_attachments = \"mask\"".into(),
            )),
            (None, None) => Ok(()),
        }
    }

    /// A `fhir` rule's `text_attachments` and `text_max_bytes`: `Some` when text
    /// attachments are masked.
    fn text_option(
        &self,
        r: &RawRule,
        field: &str,
        op: &Op,
        entities: &mut Entities,
    ) -> Result<Option<TextAttachments>, ProfileError> {
        let mask = match &r.text_attachments {
            None => false,
            Some(m) => match m.get_ref().as_str() {
                "drop" => false,
                "mask" => true,
                other => {
                    return Err(self.err(
                        Some(m.span()),
                        Some(format!("{field}.text_attachments")),
                        format!("`{other}`: \"drop\" (the default) or \"mask\""),
                    ))
                }
            },
        };
        if !mask {
            if let Some(n) = &r.text_max_bytes {
                return Err(self.err(
                    Some(n.span()),
                    Some(format!("{field}.text_max_bytes")),
                    "only with text_attachments = \"mask\"".into(),
                ));
            }
            return Ok(None);
        }
        let m = r.text_attachments.as_ref().expect("mask");
        let target = r.fhir.as_ref().map(|t| t.get_ref().as_str());
        if !matches!(
            target,
            Some("base64Binary" | "Attachment.data" | "Binary.data")
        ) {
            return Err(self.err(
                Some(m.span()),
                Some(format!("{field}.text_attachments")),
                "only on a `fhir` rule for base64Binary, Attachment.data or Binary.data".into(),
            ));
        }
        if !matches!(op, Op::Drop | Op::Redact) {
            return Err(self.err(
                Some(r.op.span()),
                Some(format!("{field}.op")),
                "with text_attachments = \"mask\", what other attachments become: `drop` or `redact`".into(),
            ));
        }
        let max_bytes = match &r.text_max_bytes {
            None => attach::DEFAULT_MAX_BYTES,
            Some(n) => {
                let v = *n.get_ref();
                if v == 0 || v > attach::LIMIT_MAX_BYTES as u64 {
                    return Err(self.err(
                        Some(n.span()),
                        Some(format!("{field}.text_max_bytes")),
                        format!("bytes, from 1 to {}", attach::LIMIT_MAX_BYTES),
                    ));
                }
                v as usize
            }
        };
        Ok(Some(TextAttachments {
            max_bytes,
            entity: entities.index("TEXT_ATTACHMENT"),
        }))
    }

    /// A path rule's `path`: a JSONPath naming fields (not the whole document).
    fn rule_path(&self, p: &Spanned<String>, field: &str) -> Result<JsonPath, ProfileError> {
        let path = JsonPath::parse(p.get_ref()).map_err(|e| {
            self.err(
                Some(p.span()),
                Some(format!("{field}.path")),
                format!("`{}`: {e}", p.get_ref()),
            )
        })?;
        if path.segments.is_empty() {
            return Err(self.err(
                Some(p.span()),
                Some(format!("{field}.path")),
                "`$` is the whole document; name the fields to mask".into(),
            ));
        }
        Ok(path)
    }

    /// A detector rule's `detector` (built in or a `[[pattern]]`, one rule each),
    /// with its default entity.
    fn rule_detector(
        &self,
        d: &Spanned<String>,
        field: &str,
        patterns: &Patterns,
        detectors: &[Detector],
    ) -> Result<(Detector, String), ProfileError> {
        let name = d.get_ref();
        if detectors.iter().any(|x: &Detector| &x.name == name) {
            return Err(self.err(
                Some(d.span()),
                Some(format!("{field}.detector")),
                format!("`{name}` already has a rule"),
            ));
        }
        match Detector::builtin(name) {
            Some(b) => Ok((b, name.to_ascii_uppercase())),
            None => match patterns.get(name) {
                Some((p, e)) => Ok((p.clone(), e.clone())),
                None => Err(self.err(
                    Some(d.span()),
                    Some(format!("{field}.detector")),
                    format!(
                        "no detector `{name}`; built in: {}; or declare it as a [[pattern]]",
                        BUILTIN.join(", ")
                    ),
                )),
            },
        }
    }

    /// A declared pattern no rule uses is a mistake, not a no-op.
    fn every_pattern_used(
        &self,
        raw: &[Spanned<RawPattern>],
        patterns: &Patterns,
        detectors: &[Detector],
    ) -> Result<(), ProfileError> {
        for (name, (_, _)) in patterns {
            if !detectors.iter().any(|d| &d.name == name) {
                let span = raw
                    .iter()
                    .find(|p| p.get_ref().name.get_ref() == name)
                    .map(|p| p.span());
                return Err(self.err(
                    span,
                    Some("pattern".into()),
                    format!("pattern `{name}` is declared but no rule uses it"),
                ));
            }
        }
        Ok(())
    }

    /// `[[header]]`: header rules (headers are kept unless one masks them).
    fn headers(
        &self,
        raw: &[Spanned<RawHeader>],
        entities: &mut Entities,
    ) -> Result<Vec<HeaderRule>, ProfileError> {
        let mut headers = Vec::new();
        for (i, h) in raw.iter().enumerate() {
            let h = h.get_ref();
            let field = format!("header[{i}]");
            let name = h.name.get_ref().to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(self.err(
                    Some(h.name.span()),
                    Some(format!("{field}.name")),
                    "not a valid header name".into(),
                ));
            }
            let op = self.op(raw_op!(h), &field)?;
            if op == Op::Keep {
                return Err(self.err(
                    Some(h.op.span()),
                    Some(format!("{field}.op")),
                    "headers are kept unless a rule masks them".into(),
                ));
            }
            let ent = match &h.entity {
                Some(e) => self.entity(e, format!("{field}.entity"))?,
                None => "HEADER".into(),
            };
            headers.push(HeaderRule {
                name,
                op,
                entity: entities.index(&ent),
            });
        }
        Ok(headers)
    }

    /// `[fhir]`: resolves the type rules (appended to the rules after the path
    /// rules), the default rule and the extension rule.
    fn fhir(
        &self,
        raw: &Spanned<RawFhir>,
        rules: &mut Rules,
        entities: &mut Entities,
    ) -> Result<FhirRules, ProfileError> {
        let f = raw.get_ref();
        let op = self.op(
            RawOp {
                op: &f.default,
                keep_last: &None,
                split_last: &None,
                max_age: &None,
            },
            "fhir.default",
        )?;
        if !matches!(op, Op::Redact | Op::Drop) {
            return Err(self.err(
                Some(f.default.span()),
                Some("fhir.default".into()),
                "an allow-list removes what it does not know: `redact` or `drop`".into(),
            ));
        }
        let entity = |e: &Option<Spanned<String>>, field: &str, dflt: &str| match e {
            Some(e) => self.entity(e, format!("fhir.{field}")),
            None => Ok(dflt.to_owned()),
        };
        let default_entity = entity(&f.default_entity, "default_entity", "UNLISTED")?;
        let extension_entity = entity(&f.extension_entity, "extension_entity", "EXTENSION")?;
        let mut urls = Vec::new();
        for (i, u) in f.safe_extensions.iter().enumerate() {
            if !u.get_ref().contains("://") {
                return Err(self.err(
                    Some(u.span()),
                    Some(format!("fhir.safe_extensions[{i}]")),
                    "an extension's absolute url (http://...)".into(),
                ));
            }
            urls.push(u.get_ref().clone());
        }
        let base = rules.paths.len() as u32;
        let mut targets = Vec::new();
        for (i, (t, r)) in rules.types.drain(..).enumerate() {
            targets.push((t, base + i as u32));
            rules.paths.push(r);
        }
        let default_rule = rules.paths.len() as u32;
        rules.paths.push(Rule {
            path: None,
            op,
            entity: entities.index(&default_entity),
            text: None,
        });
        rules.paths.push(Rule {
            path: None,
            op: Op::Redact,
            entity: entities.index(&extension_entity),
            text: None,
        });
        Ok(FhirRules::new(
            fhir::r4(),
            &targets,
            default_rule,
            default_rule + 1,
            urls,
            rules.paths.iter().any(|r| r.text.is_some()),
        ))
    }

    /// `pass_through`: media types sent unmasked (never JSON or NDJSON).
    fn pass_through(
        &self,
        raw: &Option<Vec<Spanned<String>>>,
    ) -> Result<Vec<String>, ProfileError> {
        let mut pass_through = Vec::new();
        for (i, t) in raw.iter().flatten().enumerate() {
            let v = t.get_ref().trim().to_ascii_lowercase();
            let ok = v
                .split_once('/')
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && !v.contains(';'));
            if !ok || super::body_kind(Some(&v)).is_some() {
                return Err(self.err(
                    Some(t.span()),
                    Some(format!("pass_through[{i}]")),
                    if ok {
                        "JSON and NDJSON are always masked; they cannot pass through".into()
                    } else {
                        "a media type like \"text/plain\" or \"image/*\"".into()
                    },
                ));
            }
            pass_through.push(v);
        }
        Ok(pass_through)
    }

    /// `restricted_zip3`: three-digit prefixes; absent, the built-in list.
    fn restricted_zip3(
        &self,
        raw: &Option<Vec<Spanned<String>>>,
    ) -> Result<Vec<String>, ProfileError> {
        let Some(list) = raw else {
            return Ok(RESTRICTED_ZIP3.iter().map(|s| s.to_string()).collect());
        };
        let mut v = Vec::new();
        for (i, z) in list.iter().enumerate() {
            let s = z.get_ref();
            if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(self.err(
                    Some(z.span()),
                    Some(format!("restricted_zip3[{i}]")),
                    "three digits".into(),
                ));
            }
            v.push(s.clone());
        }
        Ok(v)
    }
}

/// A type rule's default entity: the last name, upper case (`Address.state` -> `STATE`).
fn fhir_entity(target: &str) -> String {
    target
        .rsplit('.')
        .next()
        .unwrap_or(target)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// A path rule's default entity: its last field name, upper case (`FIELD` when it
/// names none).
fn path_entity(path: &JsonPath) -> String {
    path.segments
        .iter()
        .rev()
        .find_map(|s| match &s.selector {
            Selector::Name(n) => Some(
                n.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
                    .to_ascii_uppercase(),
            ),
            _ => None,
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "FIELD".into())
}

impl Profile {
    /// Parses and validates one profile file; its name is the file stem.
    pub fn parse(file: &Path, text: &str) -> Result<Profile, ProfileError> {
        let src = Source { file, text };
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if !valid_name(&stem) {
            return Err(src.err(
                None,
                None,
                "a profile file name is its name: letters, digits, `_` and `-`, then `.toml`"
                    .into(),
            ));
        }
        let raw: RawProfile = toml::from_str(text).map_err(|e| {
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_owned();
            src.err(e.span(), None, message)
        })?;
        if let Some(n) = &raw.name {
            if n.get_ref() != &stem {
                return Err(src.err(
                    Some(n.span()),
                    Some("name".into()),
                    format!(
                        "`{}` differs from the file name `{stem}`; a profile is named by its file",
                        n.get_ref()
                    ),
                ));
            }
        }

        let mut entities = Entities::default();
        // Configured patterns first: rules refer to them by name.
        let patterns = src.patterns(&raw.pattern)?;
        let mut rules = src.rules(&raw.rule, &patterns, &mut entities)?;
        src.every_pattern_used(&raw.pattern, &patterns, &rules.detectors)?;
        if let (Some((span, field)), true) = (&rules.text_mask, rules.detectors.is_empty()) {
            return Err(src.err(
                Some(span.clone()),
                Some(format!("{field}.text_attachments")),
                "masking text attachments needs detector rules (`[[rule]] detector = ...`): without them the text would pass as is".into(),
            ));
        }
        let headers = src.headers(&raw.header, &mut entities)?;
        let pass_through = src.pass_through(&raw.pass_through)?;
        let restricted_zip3 = src.restricted_zip3(&raw.restricted_zip3)?;
        let dfa = PathDfa::new(rules.paths.iter().filter_map(|r| r.path.clone()).collect());
        let fhir = match &raw.fhir {
            Some(f) => Some(src.fhir(f, &mut rules, &mut entities)?),
            None if !rules.types.is_empty() => {
                return Err(src.err(
                    None,
                    Some("fhir".into()),
                    "rules with `fhir` need a [fhir] table (its `default` op)".into(),
                ))
            }
            None => None,
        };
        let entities = entities.0;
        Ok(Profile {
            name: stem,
            description: raw.description.unwrap_or_default(),
            pass_through,
            pass_unparsable: raw.pass_unparsable,
            rules: rules.paths,
            dfa,
            fhir,
            detectors: Detectors::new(rules.detectors),
            detector_rules: rules.detector_rules,
            headers,
            placeholders: entities
                .iter()
                .map(|e| {
                    let mut v = Vec::new();
                    super::json::write_str(&mut v, &super::ops::placeholder(e));
                    v
                })
                .collect(),
            entities,
            restricted_zip3,
            file_hash: hex::encode(Sha256::digest(text.as_bytes())),
        })
    }

    /// Whether a content type (`type/subtype`, parameters ignored) passes unmasked.
    pub fn passes_through(&self, content_type: Option<&str>) -> bool {
        let Some(ct) = content_type else { return false };
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.pass_through
            .iter()
            .any(|p| match p.strip_suffix("/*") {
                Some(top) => media.split('/').next() == Some(top),
                None => *p == media || p == "*/*",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Profile, ProfileError> {
        Profile::parse(Path::new("/p/profiles/test.toml"), text)
    }

    #[test]
    fn a_profile_parses() {
        let p = parse(
            r#"
description = "t"
pass_through = ["text/plain", "image/*"]
[[rule]]
path = "$..name"
op = "redact"
[[rule]]
path = "$..birthDate"
op = "generalize_date"
max_age = 89
[[rule]]
detector = "ssn"
op = "partial"
keep_last = 4
[[rule]]
detector = "mrn"
op = "pseudonymize"
[[pattern]]
name = "mrn"
regex = 'MRN[0-9]{6}'
[[header]]
name = "X-Patient"
op = "drop"
"#,
        )
        .unwrap();
        assert_eq!(p.name, "test");
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.detectors.len(), 2);
        assert_eq!(
            p.entities,
            vec!["NAME", "BIRTHDATE", "SSN", "MRN", "HEADER"]
        );
        assert_eq!(p.headers[0].name, "x-patient");
        assert!(p.passes_through(Some("text/plain; charset=utf-8")));
        assert!(p.passes_through(Some("image/png")));
        assert!(!p.passes_through(Some("text/html")));
        assert!(!p.passes_through(None));
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("[[rule]]\npath = \"$..a\"\nop = \"scramble\"\n", 3, "rule[0].op", "not an operator"),
            ("[[rule]]\npath = \"$..a[-1]\"\nop = \"redact\"\n", 2, "rule[0].path", "negative"),
            ("[[rule]]\ndetector = \"dna\"\nop = \"redact\"\n", 2, "rule[0].detector", "no detector"),
            ("[[rule]]\npath = \"$.a\"\nop = \"redact\"\nkeep_last = 2\n", 4, "rule[0].keep_last", "partial"),
            ("[[rule]]\nop = \"redact\"\n", 1, "rule[0]", "either"),
            ("[[rule]]\ndetector = \"ssn\"\nop = \"drop\"\n", 3, "rule[0].op", "inside its text"),
            ("[[pattern]]\nname = \"m\"\nregex = \"(\"\n[[rule]]\ndetector = \"m\"\nop = \"redact\"\n", 3, "pattern[0].regex", ""),
            ("pass_through = [\"application/json\"]\n", 1, "pass_through[0]", "always masked"),
            ("name = \"other\"\n", 1, "name", "file name"),
            ("[[rule]]\npath = \"$\"\nop = \"redact\"\n", 2, "rule[0].path", "whole document"),
            ("[[rule]]\npath = \"$.a\"\nop = \"redact\"\nentity = \"a b\"\n", 4, "rule[0].entity", "letters"),
        ];
        for (text, line, field, needle) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text}: {e}");
            assert_eq!(e.key.as_deref(), Some(field), "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("/p/profiles/test.toml:{line}: {field}: ")),
                "{e}"
            );
        }
        let e = parse("[[rule]]\npath = \"$.a\"\nop = \"redact\"\nwhat = 1\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("what"), "{e}");
    }

    #[test]
    fn the_set_loads_from_the_policies_dir_and_hashes() {
        let d = tempfile::tempdir().unwrap();
        assert!(ProfileSet::load(d.path()).unwrap().is_empty());
        std::fs::create_dir(d.path().join("profiles")).unwrap();
        std::fs::write(
            d.path().join("profiles/a.toml"),
            "[[rule]]\npath = \"$..name\"\nop = \"redact\"\n",
        )
        .unwrap();
        std::fs::write(d.path().join("profiles/README.md"), "ignored").unwrap();
        let s1 = ProfileSet::load(d.path()).unwrap();
        assert_eq!(s1.names().collect::<Vec<_>>(), vec!["a"]);
        std::fs::write(
            d.path().join("profiles/a.toml"),
            "[[rule]]\npath = \"$..name\"\nop = \"drop\"\n",
        )
        .unwrap();
        let s2 = ProfileSet::load(d.path()).unwrap();
        assert_ne!(s1.hash(), s2.hash());
        assert_eq!(s2.hash().len(), 64);
        std::fs::write(d.path().join("profiles/b.toml"), "[[rule]]\n").unwrap();
        let e = ProfileSet::load(d.path()).unwrap_err();
        assert!(e.file.ends_with("b.toml"), "{e}");
    }

    #[test]
    fn the_shipped_profiles_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let set = ProfileSet::load(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(set.get("safe_harbor").is_some());
        assert!(set.get("minimum_necessary_billing").is_some());
    }
}
