//! Authorization: every request is decided by one policy set, loaded from
//! `policies_dir` (`*.cedar` plus `schema.cedarschema`), written in Cedar.
//!
//! * Loading parses and strictly validates the whole directory against the schema;
//!   any error names the file and line. Every policy needs a unique `@id("...")`.
//! * [`PolicySet::decide`] builds the Cedar request from an [`AccessRequest`] (the
//!   kernel-attested workload, the validated token, the HTTP request, the time, the
//!   approval) and evaluates it. Deny by default: nothing is allowed unless a permit
//!   applies and no forbid does.
//! * Obligations ride on annotations: `@mask("profile")` and `@approval("rule")` on
//!   permits; `@require_token` on forbids turns their denial into a 401.
//!
//! policies/README.md documents the model for policy authors.
#![forbid(unsafe_code)]

pub(crate) mod config;
pub mod explain;
pub mod gate;
mod index;
pub mod normalize;
pub mod revoke;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use crate::config::line_of;
use crate::identity::token::{TokenError, TokenIdentity};
use crate::identity::Workload;

/// The schema file in `policies_dir`.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Annotations phigate understands; any other is rejected (a typo such as
/// `@aproval` must not silently drop an obligation).
pub const ANNOTATIONS: [&str; 5] = ["id", "description", "mask", "approval", "require_token"];
/// The action a method outside the schema's actions maps to.
pub const OTHER_ACTION: &str = "OTHER";

/// What phigate passes besides HTTP requests: connections whose bytes it does not
/// inspect, and a request's switch to another protocol. Each is a Cedar action of
/// its own, outside `read`/`write`, so a set that does not name it denies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passage {
    /// A connection to a `tcp` destination.
    Tcp,
    /// A TLS connection relayed uninspected (its SNI is in `passthrough_hosts`).
    Tunnel,
    /// An HTTP/1.1 request switching protocols (WebSocket), once its method is
    /// allowed: what follows is a tunnel.
    Upgrade,
}

impl Passage {
    pub const ALL: [Passage; 3] = [Passage::Tcp, Passage::Tunnel, Passage::Upgrade];

    pub fn action(self) -> &'static str {
        match self {
            Passage::Tcp => "TCP",
            Passage::Tunnel => "TUNNEL",
            Passage::Upgrade => "UPGRADE",
        }
    }
}

const NS: &str = "Phigate";

/// One problem in the policy directory, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line, when the problem has a location.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a policy directory (loading reports them all).
#[derive(Debug, Clone)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Wall-clock facts policies may use, in the configured time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub hour: u8,
    pub minute: u8,
    /// ISO weekday, 1 = Monday .. 7 = Sunday.
    pub weekday: u8,
}

impl Clock {
    pub fn now(tz: &jiff::tz::TimeZone) -> Clock {
        let dt = jiff::Timestamp::now().to_zoned(tz.clone());
        Clock {
            hour: dt.hour() as u8,
            minute: dt.minute() as u8,
            weekday: dt.weekday().to_monday_one_offset() as u8,
        }
    }

    fn weekday_name(self) -> &'static str {
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][(self.weekday.clamp(1, 7) - 1) as usize]
    }
}

/// Everything a decision may depend on.
#[derive(Debug, Clone)]
pub struct AccessRequest<'a> {
    pub workload: &'a Workload,
    /// The validated token, if the request carried a valid one.
    pub token: Option<&'a TokenIdentity>,
    /// Why there is no valid token (`Missing` when none was presented).
    pub token_error: Option<TokenError>,
    /// The destination's configured name.
    pub destination: &'a str,
    pub method: &'a str,
    /// Normalized with [`normalize::normalize_path`].
    pub path: &'a str,
    pub query: &'a [(String, String)],
    /// The configured request headers (lower-case names), every value.
    pub headers: &'a [(String, String)],
    /// The host the request names (Host / `:authority`; lower case, no port).
    pub host: Option<&'a str>,
    /// The SNI of the client's TLS handshake.
    pub sni: Option<&'a str>,
    pub clock: Clock,
    pub has_approval: bool,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A permit applied and no forbid did.
    Permitted,
    /// No permit applies (deny by default).
    NoPermit,
    /// A forbid applies.
    Forbidden,
    /// A `@require_token` forbid applies and the request has no valid token.
    TokenRequired(TokenError),
    /// The deciding permits carry different masking profiles or approval rules.
    ConflictingObligations,
    /// A forbid policy could not be evaluated: denied rather than skipped.
    EvaluationError,
}

impl Reason {
    /// Stable code for JSON bodies and records.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Permitted => "permitted",
            Reason::NoPermit => "no_permit",
            Reason::Forbidden => "forbidden",
            Reason::TokenRequired(_) => "token_required",
            Reason::ConflictingObligations => "conflicting_obligations",
            Reason::EvaluationError => "evaluation_error",
        }
    }
}

/// The outcome of one decision, with obligations for later stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Ids of the policies that decided (the permits that allowed, or the forbids that
    /// denied; empty for deny by default), sorted.
    pub policy_ids: Vec<String>,
    /// Masking profile the response must get (`@mask` of the deciding permits).
    pub mask_profile: Option<String>,
    /// Approval rule that must be satisfied (`@approval` of the deciding permits).
    pub approval_rule: Option<String>,
    pub reason: Reason,
    /// Policies that failed to evaluate (`id: message`); they did not apply.
    pub errors: Vec<String>,
}

/// What phigate answers for a decision: 200 stands for "forwarded" (the upstream
/// answers), 401 when a `@require_token` forbid denied a request without a valid
/// token, 403 for every other denial.
pub fn status_for(d: &Decision) -> http::StatusCode {
    match d.reason {
        _ if d.allowed => http::StatusCode::OK,
        Reason::TokenRequired(_) => http::StatusCode::UNAUTHORIZED,
        _ => http::StatusCode::FORBIDDEN,
    }
}

/// Annotations phigate acts on, per policy.
#[derive(Debug, Clone, Default)]
struct Obligations {
    mask: Option<String>,
    approval: Option<String>,
    require_token: bool,
    effect_forbid: bool,
}

/// Where a policy came from.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub file: PathBuf,
    pub line: usize,
}

/// A validated policy set with its schema, ready to decide.
pub struct PolicySet {
    policies: cedar_policy::PolicySet,
    schema: Schema,
    /// Per action, its entity and its groups' (`read`/`write`) from the schema: all a
    /// request's `action in ...` needs. Cloning these few per request, rather than
    /// the schema's whole action store, keeps the closure Cedar recomputes small.
    action_entities: HashMap<String, Vec<Entity>>,
    action_names: HashSet<String>,
    obligations: HashMap<String, Obligations>,
    sources: BTreeMap<String, PolicySource>,
    hash: String,
    dir: PathBuf,
    authorizer: Authorizer,
    /// Which policies may apply to a request, so Cedar evaluates only those.
    index: index::Index,
    /// What of the request model the schema declares beyond the oldest shipped one.
    features: SchemaFeatures,
    /// Workload and token entities, built once per caller (see `entities`).
    principals: entities::EntityCache<Workload>,
    tokens: entities::EntityCache<TokenIdentity>,
    /// Decisions for requests that repeat every part Cedar sees (see `memo`).
    decisions: memo::DecisionMemo,
}

/// Parts of the request model added after schemas were first shipped. A schema
/// written before one does not declare it; its policies cannot name it, so it is
/// left out of the requests (with a warning at load) rather than the set refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SchemaFeatures {
    /// `Workload.unknown`.
    workload_unknown: bool,
    /// `context.host` and `context.sni`.
    authority: bool,
    /// `Workload.container`, `Workload.container_runtime`, `Workload.pod_uid`.
    container: bool,
    /// `Workload.pod_namespace`, `Workload.pod_name`, `Workload.image` (the
    /// container runtime's own state).
    runtime: bool,
}

impl SchemaFeatures {
    const ALL: SchemaFeatures = SchemaFeatures {
        workload_unknown: true,
        authority: true,
        container: true,
        runtime: true,
    };

    /// Every combination, the fullest first.
    fn fallbacks() -> impl Iterator<Item = SchemaFeatures> {
        let mut all: Vec<SchemaFeatures> = (0..16u8)
            .map(|i| SchemaFeatures {
                workload_unknown: i & 1 == 0,
                authority: i & 2 == 0,
                container: i & 4 == 0,
                runtime: i & 8 == 0,
            })
            .collect();
        all.sort_by_key(|f| f.missing().len());
        all.into_iter()
    }

    fn missing(self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.workload_unknown {
            m.push("Workload.unknown (policies cannot require identity facts)");
        }
        if !self.authority {
            m.push("context.host and context.sni (policies cannot see the request's authority)");
        }
        if !self.container {
            m.push("Workload.container, container_runtime and pod_uid (policies cannot tell containers apart)");
        }
        if !self.runtime {
            m.push(
                "Workload.pod_namespace, pod_name and image (policies cannot name pods or images)",
            );
        }
        m
    }
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("dir", &self.dir)
            .field("policies", &self.sources.len())
            .field("hash", &self.hash)
            .finish()
    }
}

fn type_name(t: &str) -> EntityTypeName {
    // Parsing a name runs Cedar's parser: the request's types are parsed once.
    static TYPES: std::sync::LazyLock<HashMap<&'static str, EntityTypeName>> =
        std::sync::LazyLock::new(|| {
            [
                "Workload",
                "Token",
                "Params",
                "Headers",
                "Destination",
                "Action",
            ]
            .into_iter()
            .map(|t| {
                let name = EntityTypeName::from_str(&format!("{NS}::{t}"));
                (t, name.expect("valid type name"))
            })
            .collect()
        });
    match TYPES.get(t) {
        Some(n) => n.clone(),
        None => EntityTypeName::from_str(&format!("{NS}::{t}")).expect("valid type name"),
    }
}

fn uid(t: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(t), EntityId::new(id))
}

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

/// The first labelled offset of a Cedar diagnostic, and its message with help.
fn diag(e: &dyn miette::Diagnostic) -> (Option<usize>, String) {
    let offset = e.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    let mut message = e.to_string();
    if let Some(help) = e.help() {
        message.push_str(&format!(" ({help})"));
    }
    (offset, message)
}

/// The schema, its action entities and the names of its actions.
fn read_schema(
    schema_path: &Path,
    schema_text: &str,
) -> Result<(Schema, Entities, HashSet<String>), PolicyErrors> {
    let schema = match Schema::from_cedarschema_str(schema_text) {
        Ok((s, _warnings)) => s,
        Err(e) => {
            let (off, message) = diag(&e);
            return Err(PolicyErrors(vec![PolicyError {
                file: schema_path.to_owned(),
                line: off.map(|o| line_of(schema_text, o)),
                message,
            }]));
        }
    };
    let actions = schema.action_entities().map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: schema_path.to_owned(),
            line: None,
            message: e.to_string(),
        }])
    })?;
    let action_names: HashSet<String> = schema
        .actions()
        .filter(|a| a.type_name().to_string() == format!("{NS}::Action"))
        .map(|a| a.id().unescaped().to_owned())
        .collect();
    Ok((schema, actions, action_names))
}

/// The policies of a set's files as they are parsed, and every error found.
struct Parsed {
    set: cedar_policy::PolicySet,
    sources: BTreeMap<String, PolicySource>,
    obligations: HashMap<String, Obligations>,
    /// Policy id -> (file text) for locating validation errors.
    text_of: HashMap<String, usize>,
    errors: Vec<PolicyError>,
}

impl Parsed {
    fn new() -> Parsed {
        Parsed {
            set: cedar_policy::PolicySet::new(),
            sources: BTreeMap::new(),
            obligations: HashMap::new(),
            text_of: HashMap::new(),
            errors: Vec::new(),
        }
    }

    /// Adds the policies of file `fi`, each under its `@id`.
    fn add_file(&mut self, fi: usize, file: &Path, text: &str) {
        let parsed = match cedar_policy::PolicySet::from_str(text) {
            Ok(p) => p,
            Err(errs) => {
                for e in errs.iter() {
                    let (off, message) = diag(e);
                    self.errors.push(PolicyError {
                        file: file.to_owned(),
                        line: off.map(|o| line_of(text, o)),
                        message,
                    });
                }
                return;
            }
        };
        if let Some(t) = parsed.templates().next() {
            self.errors.push(PolicyError {
                file: file.to_owned(),
                line: locate(text, &t.to_cedar(), 0).map(|o| line_of(text, o)),
                message: "templates (`?principal`, `?resource`) are not used by phigate; write static policies".into(),
            });
        }
        // Cedar numbers policies in source order: policy0, policy1, ...
        let mut ps: Vec<&Policy> = parsed.policies().collect();
        ps.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let mut cursor = 0;
        for p in ps {
            let offset = p
                .to_cedar()
                .and_then(|src| locate(text, &src, cursor).inspect(|o| cursor = o + src.len()));
            let line = offset.map(|o| line_of(text, o)).unwrap_or(1);
            self.add_policy(fi, file, line, p);
        }
    }

    /// Adds one policy at `file:line`, unless its `@id` is missing, unprintable or
    /// taken.
    fn add_policy(&mut self, fi: usize, file: &Path, line: usize, p: &Policy) {
        let at = |message: String| PolicyError {
            file: file.to_owned(),
            line: Some(line),
            message,
        };
        let Some(id) = p.annotation("id").map(str::to_owned) else {
            self.errors.push(at("policy has no @id(\"...\") annotation; every policy needs a unique id (records name it)".into()));
            return;
        };
        if id.trim().is_empty() || id.chars().any(|c| c.is_control()) {
            self.errors.push(at(format!(
                "@id({id:?}) must be a non-empty printable name"
            )));
            return;
        }
        if let Some(prev) = self.sources.get(&id) {
            self.errors.push(at(format!(
                "@id(\"{id}\") is already used at {}:{}; policy ids must be unique",
                prev.file.display(),
                prev.line
            )));
            return;
        }
        let ob = obligations_of(p, &id, &at, &mut self.errors);
        let renamed = p.new_id(PolicyId::new(&id));
        if let Err(e) = self.set.add(renamed) {
            self.errors.push(at(e.to_string()));
            return;
        }
        self.sources.insert(
            id.clone(),
            PolicySource {
                file: file.to_owned(),
                line,
            },
        );
        self.text_of.insert(id.clone(), fi);
        self.obligations.insert(id, ob);
    }

    /// Strict validation against the schema; each error at its policy's file and line.
    fn validate(&mut self, schema: &Schema, schema_path: &Path, files: &[(PathBuf, String)]) {
        let validator = Validator::new(schema.clone());
        let result = validator.validate(&self.set, ValidationMode::Strict);
        for e in result.validation_errors() {
            let id = e.policy_id().to_string();
            let (off, message) = diag(e);
            let (file, text) = match self.text_of.get(&id) {
                Some(fi) => (files[*fi].0.clone(), Some(&files[*fi].1)),
                None => (schema_path.to_owned(), None),
            };
            let line = match (off, text) {
                (Some(o), Some(t)) => Some(line_of(t, o)),
                _ => self.sources.get(&id).map(|s| s.line),
            };
            self.errors.push(PolicyError {
                file,
                line,
                message: if message.contains(&format!("`{id}`")) {
                    message
                } else {
                    format!("policy `{id}`: {message}")
                },
            });
        }
    }
}

/// What policy `id`'s annotations oblige; a misplaced or unknown one is an error
/// (`at` its line).
fn obligations_of(
    p: &Policy,
    id: &str,
    at: &dyn Fn(String) -> PolicyError,
    errors: &mut Vec<PolicyError>,
) -> Obligations {
    let mut ob = Obligations {
        effect_forbid: p.effect() == Effect::Forbid,
        ..Obligations::default()
    };
    for (k, v) in p.annotations() {
        match k {
            "id" | "description" => {}
            "mask" | "approval" if ob.effect_forbid => errors.push(at(format!(
                "@{k} is an obligation of a permit; policy `{id}` is a forbid"
            ))),
            "mask" | "approval" if v.trim().is_empty() => {
                errors.push(at(format!("@{k} needs a name, e.g. @{k}(\"...\")")))
            }
            "mask" => ob.mask = Some(v.to_owned()),
            "approval" => ob.approval = Some(v.to_owned()),
            "require_token" if !ob.effect_forbid => errors.push(at(format!(
                "@require_token belongs on a forbid (the rule that denies requests without a valid token); policy `{id}` is a permit"
            ))),
            "require_token" => ob.require_token = true,
            other => errors.push(at(format!(
                "unknown annotation @{other}; phigate understands @{}",
                ANNOTATIONS.join(", @")
            ))),
        }
    }
    ob
}

impl PolicySet {
    /// Loads and validates `dir`: every `*.cedar` file and `schema.cedarschema`.
    /// Subdirectories (e.g. masking `profiles/`) are not read here.
    pub fn load(dir: &Path) -> Result<PolicySet, PolicyErrors> {
        let one = |file: &Path, line: Option<usize>, message: String| {
            PolicyErrors(vec![PolicyError {
                file: file.to_owned(),
                line,
                message,
            }])
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            one(
                dir,
                None,
                format!("cannot read the policy directory (agent.policies_dir): {e}"),
            )
        })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for e in entries {
            let e = e.map_err(|e| one(dir, None, e.to_string()))?;
            let p = e.path();
            if p.extension().is_some_and(|x| x == "cedar") && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        let schema_path = dir.join(SCHEMA_FILE);
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| one(p, None, format!("cannot read: {e}")))
        };
        let schema_text = read(&schema_path)?;
        let mut texts = Vec::with_capacity(files.len());
        for f in &files {
            texts.push(read(f)?);
        }
        let hash = set_hash(
            std::iter::once((schema_path.as_path(), schema_text.as_bytes())).chain(
                files
                    .iter()
                    .map(PathBuf::as_path)
                    .zip(texts.iter().map(|t| t.as_bytes())),
            ),
        );
        let named: Vec<(PathBuf, String)> = files.into_iter().zip(texts).collect();
        Self::from_texts(dir, &schema_path, &schema_text, &named, hash)
    }

    /// Builds a set from texts already read (`load`, tests and the fuzz targets).
    pub(crate) fn from_texts(
        dir: &Path,
        schema_path: &Path,
        schema_text: &str,
        files: &[(PathBuf, String)],
        hash: String,
    ) -> Result<PolicySet, PolicyErrors> {
        let (schema, actions, action_names) = read_schema(schema_path, schema_text)?;
        let mut parsed = Parsed::new();
        for (fi, (file, text)) in files.iter().enumerate() {
            parsed.add_file(fi, file, text);
        }
        if parsed.errors.is_empty() {
            parsed.validate(&schema, schema_path, files);
        }
        if !parsed.errors.is_empty() {
            return Err(PolicyErrors(parsed.errors));
        }

        let action_groups = action_names
            .iter()
            .map(|a| {
                let groups = actions
                    .ancestors(&uid("Action", a))
                    .map(|it| it.map(|g| g.id().unescaped().to_owned()).collect())
                    .unwrap_or_default();
                (a.clone(), groups)
            })
            .collect();
        let action_entities = action_names
            .iter()
            .map(|a| {
                let me = uid("Action", a);
                let groups: Vec<EntityUid> = actions
                    .ancestors(&me)
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                let parts = std::iter::once(me)
                    .chain(groups)
                    .filter_map(|u| actions.get(&u).cloned())
                    .collect();
                (a.clone(), parts)
            })
            .collect();
        let mut ps = PolicySet {
            index: index::Index::new(&parsed.set, action_groups),
            policies: parsed.set,
            schema,
            action_entities,
            action_names,
            obligations: parsed.obligations,
            sources: parsed.sources,
            hash,
            dir: dir.to_owned(),
            authorizer: Authorizer::new(),
            features: SchemaFeatures::ALL,
            principals: entities::EntityCache::new(),
            tokens: entities::EntityCache::new(),
            decisions: memo::DecisionMemo::new(),
        };
        ps.fit_request_model(schema_path)?;
        // The shape checks' made-up caller is no caller: start from nothing.
        ps.principals.clear();
        ps.tokens.clear();
        ps.decisions.clear();
        Ok(ps)
    }

    /// Settles which request model the schema describes (the fullest it fits, with
    /// a warning per part it lacks) and refuses a schema that fits none.
    fn fit_request_model(&mut self, schema_path: &Path) -> Result<(), PolicyErrors> {
        if self.check_request_shape().is_err() {
            let fits = SchemaFeatures::fallbacks().skip(1).find(|f| {
                self.features = *f;
                self.check_request_shape().is_ok()
            });
            match fits {
                Some(f) => {
                    self.features = f;
                    for m in f.missing() {
                        tracing::warn!(schema = %schema_path.display(), "the policy schema does not declare {m}; update it from the shipped policies/schema.cedarschema");
                    }
                }
                // Report the errors of the full model.
                None => self.features = SchemaFeatures::ALL,
            }
        }
        for p in Passage::ALL {
            if !self.action_names.contains(p.action()) {
                tracing::warn!(schema = %schema_path.display(), "the policy schema declares no action \"{}\": every such passage is refused; update it from the shipped policies/schema.cedarschema", p.action());
            }
        }
        // The schema must describe the requests phigate builds, or policies would be
        // validated against a model that never occurs.
        self.check_request_shape().map_err(|message| {
            PolicyErrors(vec![PolicyError {
                file: schema_path.to_owned(),
                line: None,
                message: format!("the schema does not describe the requests phigate makes: {message} (start from the shipped policies/schema.cedarschema)"),
            }])
        })
    }

    /// SHA-256 over the schema and the policy files (names and contents, sorted).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Policy ids with the file and line they were written at.
    pub fn sources(&self) -> &BTreeMap<String, PolicySource> {
        &self.sources
    }

    /// Every `@mask` and `@approval` obligation: (policy id, profile, approval rule),
    /// so the names can be checked against the profiles and rules that must exist.
    pub fn obligations(&self) -> impl Iterator<Item = (&str, Option<&str>, Option<&str>)> {
        self.obligations
            .iter()
            .map(|(id, o)| (id.as_str(), o.mask.as_deref(), o.approval.as_deref()))
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    fn check_request_shape(&self) -> Result<(), String> {
        // Each try may declare other attributes: no entity built for another stays.
        self.principals.clear();
        self.tokens.clear();
        self.decisions.clear();
        let w = Workload::default();
        let token = TokenIdentity {
            claims: [("client_id".to_owned(), "x".to_owned())].into(),
            groups: vec!["g".into()],
            ..TokenIdentity::default()
        };
        let q = [("a".to_owned(), "b".to_owned())];
        let req = AccessRequest {
            workload: &w,
            token: Some(&token),
            token_error: None,
            destination: "d",
            method: "GET",
            path: "/",
            query: &q,
            headers: &q,
            host: Some("h"),
            sni: Some("h"),
            clock: Clock {
                hour: 0,
                minute: 0,
                weekday: 1,
            },
            has_approval: false,
        };
        if !self.action_names.contains(OTHER_ACTION) {
            return Err(format!(
                "it declares no action \"{OTHER_ACTION}\" (methods without an action of their own map to it)"
            ));
        }
        let (_, entities) = self.cedar_request(
            &req,
            self.action_for(req.method),
            Some(&self.schema),
            index::ContextReads::ALL,
        )?;
        for p in Passage::ALL {
            if self.action_names.contains(p.action()) {
                self.cedar_request(
                    &req,
                    p.action(),
                    Some(&self.schema),
                    index::ContextReads::ALL,
                )
                .map_err(|e| format!("action \"{}\": {e}", p.action()))?;
            }
        }
        Entities::from_entities(entities.iter().cloned(), Some(&self.schema))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The schema action a method is asked as. Methods are case-sensitive (RFC 9110
    /// 9.1): `get` is not GET.
    /// A method named like a passage (`TCP /x HTTP/1.1`) is no passage: OTHER.
    fn action_for<'m>(&self, method: &'m str) -> &'m str {
        if self.action_names.contains(method)
            && method != OTHER_ACTION
            && !Passage::ALL.iter().any(|p| p.action() == method)
        {
            method
        } else {
            OTHER_ACTION
        }
    }

    /// The principal: the workload with the attributes the schema declares.
    fn workload_entity(&self, w: &Workload) -> Result<Entity, String> {
        let principal = uid("Workload", &w.pid.to_string());
        let unknown = String::new();
        let mut attrs: HashMap<String, RestrictedExpression> = HashMap::from([
            ("user".into(), s(w.user.as_ref().unwrap_or(&unknown))),
            ("uid".into(), RestrictedExpression::new_long(w.uid.into())),
            ("gid".into(), RestrictedExpression::new_long(w.gid.into())),
            (
                "groups".into(),
                RestrictedExpression::new_set(
                    w.groups
                        .iter()
                        .map(|g| RestrictedExpression::new_long((*g).into())),
                ),
            ),
            (
                "unit".into(),
                s(w.systemd_unit.as_ref().unwrap_or(&unknown)),
            ),
            ("exe".into(), s(w.exe_path.as_ref().unwrap_or(&unknown))),
            (
                "exe_sha256".into(),
                s(w.exe_sha256.as_ref().unwrap_or(&unknown)),
            ),
            ("comm".into(), s(&w.comm)),
            (
                "cgroup".into(),
                s(w.cgroup_path.as_ref().unwrap_or(&unknown)),
            ),
        ]);
        if self.features.container {
            attrs.extend(container_attrs(w));
        }
        if self.features.runtime {
            attrs.extend(runtime_attrs(w));
        }
        if self.features.workload_unknown {
            attrs.insert(
                "unknown".into(),
                RestrictedExpression::new_set(
                    w.unknown
                        .iter()
                        .map(|f| RestrictedExpression::new_string((*f).into())),
                ),
            );
        }
        Entity::new(principal, attrs, HashSet::new()).map_err(|e| e.to_string())
    }

    /// The Cedar request and entities for `req` (validated against `schema` if given).
    fn cedar_request(
        &self,
        req: &AccessRequest<'_>,
        action: &str,
        schema: Option<&Schema>,
        reads: index::ContextReads,
    ) -> Result<(Request, Entities), String> {
        let workload = self
            .principals
            .get_or_build(req.workload, || self.workload_entity(req.workload))?;
        let principal = workload.uid();
        let multi = |kind: &str, pairs: &[(String, String)]| {
            let mut tags: BTreeMap<&str, Vec<RestrictedExpression>> = BTreeMap::new();
            for (k, v) in pairs {
                tags.entry(k).or_default().push(s(v));
            }
            Entity::new_with_tags(
                uid(kind, "request"),
                [],
                [],
                tags.into_iter()
                    .map(|(k, v)| (k.to_owned(), RestrictedExpression::new_set(v))),
            )
            .map_err(|e| e.to_string())
        };
        let mut entities = vec![workload];
        let mut ctx: Vec<(String, RestrictedExpression)> = vec![
            ("method".into(), s(req.method)),
            ("path".into(), s(req.path)),
            (
                "hour".into(),
                RestrictedExpression::new_long(req.clock.hour.into()),
            ),
            (
                "minute".into(),
                RestrictedExpression::new_long(req.clock.minute.into()),
            ),
            ("weekday".into(), s(req.clock.weekday_name())),
            (
                "has_approval".into(),
                RestrictedExpression::new_bool(req.has_approval),
            ),
        ];
        if self.features.authority {
            if let Some(h) = req.host {
                ctx.push(("host".into(), s(h)));
            }
            if let Some(n) = req.sni {
                ctx.push(("sni".into(), s(n)));
            }
        }
        // Only what the policies may read (see `index::ContextReads`).
        for (read, name, kind, pairs) in [
            (reads.query, "query", "Params", req.query),
            (reads.headers, "headers", "Headers", req.headers),
        ] {
            if read {
                let e = multi(kind, pairs)?;
                ctx.push((name.into(), RestrictedExpression::new_entity_uid(e.uid())));
                entities.push(e);
            }
        }
        if let Some(t) = req.token {
            let token = self.tokens.get_or_build(t, || token_entity(t))?;
            ctx.push((
                "token".into(),
                RestrictedExpression::new_entity_uid(token.uid()),
            ));
            entities.push(token);
        }
        let context = Context::from_pairs(ctx).map_err(|e| e.to_string())?;
        let request = Request::new(
            principal,
            uid("Action", action),
            uid("Destination", req.destination),
            context,
            schema,
        )
        .map_err(|e| e.to_string())?;
        entities.extend(
            self.action_entities
                .get(action)
                .into_iter()
                .flatten()
                .cloned(),
        );
        let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
        Ok((request, entities))
    }

    /// Decides one request. Deny by default; see the module docs for obligations.
    pub fn decide(&self, req: &AccessRequest<'_>) -> Decision {
        let action = self.action_for(req.method);
        self.decide_remembered(req, action)
    }

    /// Decides a passage: `req` describes the connection (no method or path for a
    /// TCP or TUNNEL connection) or the request that asks to upgrade. A schema that
    /// does not declare the passage's action cannot permit it: denied.
    pub fn decide_passage(&self, req: &AccessRequest<'_>, passage: Passage) -> Decision {
        let action = passage.action();
        if !self.action_names.contains(action) {
            return Decision {
                allowed: false,
                policy_ids: Vec::new(),
                mask_profile: None,
                approval_rule: None,
                reason: Reason::NoPermit,
                errors: vec![format!(
                    "the policy schema declares no action \"{action}\" (see the shipped policies/schema.cedarschema)"
                )],
            };
        }
        self.decide_remembered(req, action)
    }

    /// Decides among the candidates for `req`, or answers what an identical request
    /// was answered (see `memo`).
    fn decide_remembered(&self, req: &AccessRequest<'_>, action: &str) -> Decision {
        let candidates = self.index.candidates(req, action);
        self.decisions
            .get_or_decide(action, req, candidates.reads, || {
                self.decide_among(req, action, &candidates.set, candidates.reads)
            })
    }

    /// Decides with `policies`: the candidates for `req`, or (in tests) the whole set.
    fn decide_among(
        &self,
        req: &AccessRequest<'_>,
        action: &str,
        policies: &cedar_policy::PolicySet,
        reads: index::ContextReads,
    ) -> Decision {
        let deny = |reason: Reason, policy_ids: Vec<String>, errors: Vec<String>| Decision {
            allowed: false,
            policy_ids,
            mask_profile: None,
            approval_rule: None,
            reason,
            errors,
        };
        let (request, entities) = match self.cedar_request(req, action, None, reads) {
            Ok(r) => r,
            Err(e) => return deny(Reason::EvaluationError, Vec::new(), vec![e]),
        };
        let response = self.authorizer.is_authorized(&request, policies, &entities);
        let diagnostics = response.diagnostics();
        let mut errors = Vec::new();
        let mut forbid_failed = Vec::new();
        for e in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(pe) = e;
            let id = pe.policy_id().to_string();
            if self.obligations.get(&id).is_some_and(|o| o.effect_forbid) {
                forbid_failed.push(id.clone());
            }
            errors.push(e.to_string());
        }
        let mut ids: Vec<String> = diagnostics.reason().map(|p| p.to_string()).collect();
        ids.sort();
        if !forbid_failed.is_empty() {
            forbid_failed.sort();
            return deny(Reason::EvaluationError, forbid_failed, errors);
        }
        match response.decision() {
            cedar_policy::Decision::Deny if ids.is_empty() => deny(Reason::NoPermit, ids, errors),
            cedar_policy::Decision::Deny => {
                let token_required = req.token.is_none()
                    && ids
                        .iter()
                        .any(|id| self.obligations.get(id).is_some_and(|o| o.require_token));
                let reason = if token_required {
                    Reason::TokenRequired(req.token_error.unwrap_or(TokenError::Missing))
                } else {
                    Reason::Forbidden
                };
                deny(reason, ids, errors)
            }
            cedar_policy::Decision::Allow => {
                // Several permits may decide: masking applies if any of them asks for
                // it; two different profiles (or approval rules) cannot both be
                // honoured, so the request is denied rather than guessed at.
                let masks: BTreeSet<&str> = ids
                    .iter()
                    .filter_map(|id| self.obligations.get(id)?.mask.as_deref())
                    .collect();
                let approvals: BTreeSet<&str> = ids
                    .iter()
                    .filter_map(|id| self.obligations.get(id)?.approval.as_deref())
                    .collect();
                if masks.len() > 1 || approvals.len() > 1 {
                    return deny(Reason::ConflictingObligations, ids, errors);
                }
                Decision {
                    allowed: true,
                    mask_profile: masks.first().map(|m| m.to_string()),
                    approval_rule: approvals.first().map(|a| a.to_string()),
                    policy_ids: ids,
                    reason: Reason::Permitted,
                    errors,
                }
            }
        }
    }

    /// The Cedar policy set and the request `decide` would evaluate, for comparing
    /// against plain Cedar evaluation (`cargo xtask bench policy`).
    pub fn cedar_parts(
        &self,
        req: &AccessRequest<'_>,
    ) -> Result<(&cedar_policy::PolicySet, Request, Entities), String> {
        let (r, e) = self.cedar_request(
            req,
            self.action_for(req.method),
            None,
            index::ContextReads::ALL,
        )?;
        Ok((&self.policies, r, e))
    }
}

/// SHA-256 over (name, contents) of the schema then the policy files, sorted.
fn set_hash<'a>(files: impl Iterator<Item = (&'a Path, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (p, t) in files {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((t.len() as u64).to_be_bytes());
        hasher.update(t);
    }
    hex::encode(hasher.finalize())
}

/// The hash [`PolicySet::hash`] would have for `dir` as it is on disk, computed
/// without parsing (a rejected set is recorded with it).
pub fn hash_dir(dir: &Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar") && p.is_file())
        .collect();
    files.sort();
    let schema = dir.join(SCHEMA_FILE);
    let mut contents = vec![(schema.clone(), std::fs::read(&schema).ok()?)];
    for f in files {
        let b = std::fs::read(&f).ok()?;
        contents.push((f, b));
    }
    Some(set_hash(
        contents.iter().map(|(p, b)| (p.as_path(), b.as_slice())),
    ))
}

/// Byte offset of `needle` in `text` at or after `from`.
fn locate(text: &str, needle: &str, from: usize) -> Option<usize> {
    text.get(from..)?.find(needle).map(|o| o + from)
}

mod entities;
mod memo;
#[cfg(test)]
mod tests;

/// `principal.container`, `container_runtime`, `pod_uid` ("" when not in one).
fn container_attrs(w: &Workload) -> Vec<(String, RestrictedExpression)> {
    optional_strings([
        ("container", &w.container_id),
        ("container_runtime", &w.container_runtime),
        ("pod_uid", &w.pod_uid),
    ])
}

/// `principal.pod_namespace`, `pod_name`, `image` ("" when the runtime's state does
/// not say).
fn runtime_attrs(w: &Workload) -> Vec<(String, RestrictedExpression)> {
    optional_strings([
        ("pod_namespace", &w.pod_namespace),
        ("pod_name", &w.pod_name),
        ("image", &w.container_image),
    ])
}

/// Named string attributes, "" for an unknown value.
fn optional_strings<const N: usize>(
    attrs: [(&str, &Option<String>); N],
) -> Vec<(String, RestrictedExpression)> {
    attrs
        .into_iter()
        .map(|(name, value)| {
            (
                name.to_owned(),
                RestrictedExpression::new_string(value.clone().unwrap_or_default()),
            )
        })
        .collect()
}

/// A token's entity: issuer, subject, groups, expiry, and its configured claims as tags.
fn token_entity(t: &TokenIdentity) -> Result<Entity, String> {
    Entity::new_with_tags(
        uid("Token", &format!("{}#{}", t.issuer, t.subject)),
        [
            ("issuer".to_owned(), s(&t.issuer)),
            ("subject".to_owned(), s(&t.subject)),
            (
                "groups".to_owned(),
                RestrictedExpression::new_set(t.groups.iter().map(|g| s(g))),
            ),
            (
                "expires_at".to_owned(),
                RestrictedExpression::new_long(t.expires_at),
            ),
        ],
        [],
        t.claims.iter().map(|(k, v)| (k.clone(), s(v))),
    )
    .map_err(|e| e.to_string())
}
