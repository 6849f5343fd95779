//! Which policies can apply to a request, found before Cedar runs.
//!
//! Cedar evaluates every policy of a set, about a microsecond each here, so 200
//! policies cost ~200 us a request. Most policies are about one destination, one
//! method group, one unit or one token group, and most requests cannot match them.
//! At load each policy gets a *prefilter*: its scope (action, resource) and the
//! leading conjuncts of its first `when` clause that phigate can decide from the
//! request alone (`principal.unit == "..."`, `context.path like "..."`,
//! `context.hour < 6`, `context has token`, `context.token.groups.contains("...")`,
//! `context.query.hasTag("...")`, negations of these...). A policy is skipped only
//! when a conjunct is certainly false and every conjunct before it certainly true:
//! Cedar's `&&` would then stop at that conjunct too, without an error, so the
//! decision, its deciding ids and its errors are exactly those of the whole set.
//! Anything not understood (or that could make Cedar raise an error) ends the
//! prefilter there and the policy is evaluated.
//!
//! The candidate sets are cached (identities and routes repeat), so a request costs
//! the prefilter scan plus Cedar on the few policies that may apply.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use cedar_policy::Policy;
use serde_json::Value;

use super::AccessRequest;

/// Bound on cached candidate sets; the cache is emptied when it is reached.
const CACHE_LIMIT: usize = 1024;

pub(super) struct Index {
    entries: Vec<Entry>,
    /// Action id -> itself and its groups (`GET` -> `GET`, `read`).
    action_groups: HashMap<String, HashSet<String>>,
    cache: RwLock<HashMap<Vec<u64>, Arc<Candidates>>>,
}

/// The policies that may apply to a request, and what of the request's context any
/// of them reads.
pub(super) struct Candidates {
    pub(super) set: cedar_policy::PolicySet,
    pub(super) reads: ContextReads,
}

/// The per-request parts of the Cedar context that policies may read. Building the
/// `query` and `headers` entities (and Cedar closing over them) was a tenth of a
/// request's CPU; a request whose candidate policies cannot observe them is decided
/// without them, with the same outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ContextReads {
    pub(super) query: bool,
    pub(super) headers: bool,
}

impl ContextReads {
    pub(super) const ALL: ContextReads = ContextReads {
        query: true,
        headers: true,
    };
    const NONE: ContextReads = ContextReads {
        query: false,
        headers: false,
    };

    fn union(self, o: ContextReads) -> ContextReads {
        ContextReads {
            query: self.query || o.query,
            headers: self.headers || o.headers,
        }
    }

    /// What a policy (its JSON form) reads: `context.query`, `context has headers`,
    /// `context["headers"]` name what they read; `context` used any other way (compared
    /// whole, say), or a policy that has no JSON form, reads everything.
    pub(super) fn of(est: &Value) -> ContextReads {
        let mut reads = ContextReads::NONE;
        if est.is_null() || !walk_context(est, &mut reads) {
            return ContextReads::ALL;
        }
        reads
    }
}

/// Adds the context attributes `v` reads to `reads`; false when `context` is used
/// other than through one named attribute.
fn walk_context(v: &Value, reads: &mut ContextReads) -> bool {
    let is_context = |e: &Value| e.get("Var").and_then(Value::as_str) == Some("context");
    match v {
        Value::Object(map) => {
            if is_context(v) {
                return false;
            }
            for op in [".", "has"] {
                let Some(access) = map.get(op) else { continue };
                if is_context(&access["left"]) {
                    match access["attr"].as_str() {
                        Some("query") => reads.query = true,
                        Some("headers") => reads.headers = true,
                        Some(_) => {}
                        None => return false,
                    }
                    return true;
                }
            }
            map.values().all(|x| walk_context(x, reads))
        }
        Value::Array(items) => items.iter().all(|x| walk_context(x, reads)),
        _ => true,
    }
}

struct Entry {
    policy: Policy,
    /// Action ids the scope allows (None: any).
    actions: Option<Vec<String>>,
    /// The destination the scope names (None: any).
    destination: Option<String>,
    guards: Vec<Guard>,
    reads: ContextReads,
}

impl Index {
    /// `action_groups`: for each action id, the ids of the action groups it is in.
    pub(super) fn new(
        policies: &cedar_policy::PolicySet,
        action_groups: HashMap<String, HashSet<String>>,
    ) -> Index {
        let entries = policies
            .policies()
            .map(|p| {
                let est = p.to_json().unwrap_or(Value::Null);
                Entry {
                    policy: p.clone(),
                    actions: action_scope(&est["action"]),
                    destination: resource_scope(&est["resource"]),
                    guards: leading_guards(&est),
                    reads: ContextReads::of(&est),
                }
            })
            .collect();
        Index {
            entries,
            action_groups,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The policies of the set that may apply to `req` (asked as `action`).
    pub(super) fn candidates(&self, req: &AccessRequest<'_>, action: &str) -> Arc<Candidates> {
        let groups = self.action_groups.get(action);
        let mut key = vec![0u64; self.entries.len().div_ceil(64)];
        for (i, e) in self.entries.iter().enumerate() {
            if e.may_apply(req, action, groups) {
                key[i / 64] |= 1 << (i % 64);
            }
        }
        if let Some(set) = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Arc::clone(set);
        }
        let mut set = cedar_policy::PolicySet::new();
        let mut reads = ContextReads::NONE;
        for (i, e) in self.entries.iter().enumerate() {
            if key[i / 64] & (1 << (i % 64)) != 0 {
                // Ids are unique in the whole set, so in any part of it.
                let _ = set.add(e.policy.clone());
                reads = reads.union(e.reads);
            }
        }
        let set = Arc::new(Candidates { set, reads });
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&set));
        set
    }
}

impl Entry {
    fn may_apply(
        &self,
        req: &AccessRequest<'_>,
        action: &str,
        groups: Option<&HashSet<String>>,
    ) -> bool {
        if let Some(allowed) = &self.actions {
            let matches = allowed
                .iter()
                .any(|a| a == action || groups.is_some_and(|g| g.contains(a)));
            if !matches {
                return false;
            }
        }
        if self
            .destination
            .as_deref()
            .is_some_and(|d| d != req.destination)
        {
            return false;
        }
        for g in &self.guards {
            match g.eval(req) {
                Some(true) => continue,
                Some(false) => return false,
                // Cedar would evaluate (and perhaps fail on) this conjunct.
                None => return true,
            }
        }
        true
    }
}

/// `action == A`, `action in A`, `action in [A, B]` of Phigate actions; else any.
fn action_scope(v: &Value) -> Option<Vec<String>> {
    let id = |e: &Value| -> Option<String> {
        (e["type"].as_str()? == "Phigate::Action").then(|| e["id"].as_str().map(str::to_owned))?
    };
    match v["op"].as_str()? {
        "==" | "in" if v.get("entity").is_some() => Some(vec![id(&v["entity"])?]),
        "in" => v["entities"]
            .as_array()?
            .iter()
            .map(id)
            .collect::<Option<Vec<_>>>(),
        _ => None,
    }
}

/// `resource == D` or `resource in D` (destinations have no parents); else any.
fn resource_scope(v: &Value) -> Option<String> {
    match v["op"].as_str()? {
        "==" | "in" => {
            let e = &v["entity"];
            (e["type"].as_str()? == "Phigate::Destination")
                .then(|| e["id"].as_str().map(str::to_owned))?
        }
        _ => None,
    }
}

/// The understood prefix of the first condition's conjuncts (only if it is a `when`).
fn leading_guards(est: &Value) -> Vec<Guard> {
    let Some(first) = est["conditions"].as_array().and_then(|c| c.first()) else {
        return Vec::new();
    };
    if first["kind"] != "when" {
        return Vec::new();
    }
    let mut conjuncts = Vec::new();
    flatten_and(&first["body"], &mut conjuncts);
    conjuncts.into_iter().map_while(Guard::parse).collect()
}

fn flatten_and<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v.get("&&") {
        Some(and) => {
            flatten_and(&and["left"], out);
            flatten_and(&and["right"], out);
        }
        None => out.push(v),
    }
}

/// A conjunct phigate can decide from the request, with Cedar's result.
#[derive(Debug, Clone, PartialEq)]
enum Guard {
    Compare(Cmp, Operand, Operand),
    Like(Attr, Vec<Pattern>),
    /// A Bool-typed attribute on its own (`context.has_approval`).
    Truth(Attr),
    HasToken,
    TokenGroup(String),
    Tag(Tags, String),
    Not(Box<Guard>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Attr(Attr),
    Lit(Val<'static>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Attr {
    User,
    Uid,
    Gid,
    Unit,
    Exe,
    ExeSha256,
    Comm,
    Cgroup,
    Method,
    Path,
    Hour,
    Minute,
    Weekday,
    HasApproval,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tags {
    Query,
    Headers,
    Token,
}

#[derive(Debug, Clone, PartialEq)]
enum Pattern {
    Literal(char),
    Wildcard,
}

#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Str(Cow<'a, str>),
    Long(i64),
    Bool(bool),
}

impl Attr {
    fn parse(v: &Value) -> Option<Attr> {
        let dot = v.get(".")?;
        let var = dot["left"].get("Var")?.as_str()?;
        let attr = dot["attr"].as_str()?;
        Some(match (var, attr) {
            ("principal", "user") => Attr::User,
            ("principal", "uid") => Attr::Uid,
            ("principal", "gid") => Attr::Gid,
            ("principal", "unit") => Attr::Unit,
            ("principal", "exe") => Attr::Exe,
            ("principal", "exe_sha256") => Attr::ExeSha256,
            ("principal", "comm") => Attr::Comm,
            ("principal", "cgroup") => Attr::Cgroup,
            ("context", "method") => Attr::Method,
            ("context", "path") => Attr::Path,
            ("context", "hour") => Attr::Hour,
            ("context", "minute") => Attr::Minute,
            ("context", "weekday") => Attr::Weekday,
            ("context", "has_approval") => Attr::HasApproval,
            _ => return None,
        })
    }

    /// The value phigate puts in the Cedar request (see `PolicySet::cedar_request`).
    fn value<'r>(self, r: &'r AccessRequest<'_>) -> Val<'r> {
        let w = r.workload;
        let text = |v: &'r Option<String>| Val::Str(Cow::Borrowed(v.as_deref().unwrap_or("")));
        match self {
            Attr::User => text(&w.user),
            Attr::Uid => Val::Long(w.uid.into()),
            Attr::Gid => Val::Long(w.gid.into()),
            Attr::Unit => text(&w.systemd_unit),
            Attr::Exe => text(&w.exe_path),
            Attr::ExeSha256 => text(&w.exe_sha256),
            Attr::Comm => Val::Str(Cow::Borrowed(&w.comm)),
            Attr::Cgroup => text(&w.cgroup_path),
            Attr::Method => Val::Str(Cow::Borrowed(r.method)),
            Attr::Path => Val::Str(Cow::Borrowed(r.path)),
            Attr::Hour => Val::Long(r.clock.hour.into()),
            Attr::Minute => Val::Long(r.clock.minute.into()),
            Attr::Weekday => Val::Str(Cow::Borrowed(r.clock.weekday_name())),
            Attr::HasApproval => Val::Bool(r.has_approval),
        }
    }
}

impl Operand {
    fn parse(v: &Value) -> Option<Operand> {
        if let Some(lit) = v.get("Value") {
            return Some(Operand::Lit(match lit {
                Value::String(s) => Val::Str(Cow::Owned(s.clone())),
                Value::Bool(b) => Val::Bool(*b),
                Value::Number(n) => Val::Long(n.as_i64()?),
                _ => return None,
            }));
        }
        Attr::parse(v).map(Operand::Attr)
    }

    fn value<'r>(&'r self, r: &'r AccessRequest<'_>) -> Val<'r> {
        match self {
            Operand::Attr(a) => a.value(r),
            Operand::Lit(Val::Str(s)) => Val::Str(Cow::Borrowed(s)),
            Operand::Lit(v) => v.clone(),
        }
    }
}

impl Guard {
    fn parse(v: &Value) -> Option<Guard> {
        let (op, body) = v.as_object()?.iter().next()?;
        let cmp = |c| {
            Some(Guard::Compare(
                c,
                Operand::parse(&body["left"])?,
                Operand::parse(&body["right"])?,
            ))
        };
        match op.as_str() {
            "==" => cmp(Cmp::Eq),
            "!=" => cmp(Cmp::Ne),
            "<" => cmp(Cmp::Lt),
            "<=" => cmp(Cmp::Le),
            ">" => cmp(Cmp::Gt),
            ">=" => cmp(Cmp::Ge),
            "!" => Some(Guard::Not(Box::new(Guard::parse(&body["arg"])?))),
            "." => Some(Guard::Truth(Attr::parse(v)?)),
            "like" => {
                let pattern = body["pattern"]
                    .as_array()?
                    .iter()
                    .map(|p| match p {
                        Value::String(w) if w == "Wildcard" => Some(vec![Pattern::Wildcard]),
                        _ => Some(
                            p.get("Literal")?
                                .as_str()?
                                .chars()
                                .map(Pattern::Literal)
                                .collect(),
                        ),
                    })
                    .collect::<Option<Vec<Vec<Pattern>>>>()?
                    .concat();
                Some(Guard::Like(Attr::parse(&body["left"])?, pattern))
            }
            "has" => (body["left"].get("Var")? == "context" && body["attr"] == "token")
                .then_some(Guard::HasToken),
            "contains" => {
                let left = body["left"].get(".")?;
                let token = left["left"].get(".")?;
                let ok = token["left"].get("Var")? == "context"
                    && token["attr"] == "token"
                    && left["attr"] == "groups";
                let group = body["right"].get("Value")?.as_str()?;
                ok.then(|| Guard::TokenGroup(group.to_owned()))
            }
            "hasTag" => {
                let of = body["left"].get(".")?;
                if of["left"].get("Var")? != "context" {
                    return None;
                }
                let tags = match of["attr"].as_str()? {
                    "query" => Tags::Query,
                    "headers" => Tags::Headers,
                    "token" => Tags::Token,
                    _ => return None,
                };
                let tag = body["right"].get("Value")?.as_str()?;
                Some(Guard::Tag(tags, tag.to_owned()))
            }
            _ => None,
        }
    }

    /// Some(result) when Cedar would evaluate the conjunct to it without an error;
    /// None when phigate cannot tell (or Cedar would raise an error).
    fn eval(&self, r: &AccessRequest<'_>) -> Option<bool> {
        match self {
            Guard::Compare(c, a, b) => match (c, a.value(r), b.value(r)) {
                // Equality of different types is false in Cedar, not an error.
                (Cmp::Eq, x, y) => Some(x == y),
                (Cmp::Ne, x, y) => Some(x != y),
                (c, Val::Long(x), Val::Long(y)) => Some(match c {
                    Cmp::Lt => x < y,
                    Cmp::Le => x <= y,
                    Cmp::Gt => x > y,
                    Cmp::Ge => x >= y,
                    Cmp::Eq | Cmp::Ne => unreachable!("handled above"),
                }),
                _ => None,
            },
            Guard::Like(a, pattern) => match a.value(r) {
                Val::Str(s) => Some(like(&s, pattern)),
                _ => None,
            },
            Guard::Truth(a) => match a.value(r) {
                Val::Bool(b) => Some(b),
                _ => None,
            },
            Guard::HasToken => Some(r.token.is_some()),
            // Without a token, `context.token` is an error in Cedar: let it say so.
            Guard::TokenGroup(g) => r.token.map(|t| t.groups.iter().any(|x| x == g)),
            Guard::Tag(Tags::Token, tag) => r.token.map(|t| t.claims.contains_key(tag)),
            Guard::Tag(Tags::Query, tag) => Some(r.query.iter().any(|(k, _)| k == tag)),
            Guard::Tag(Tags::Headers, tag) => Some(r.headers.iter().any(|(k, _)| k == tag)),
            Guard::Not(g) => g.eval(r).map(|b| !b),
        }
    }
}

/// Cedar's `like`: `*` matches any run of characters (escaped stars are literals in
/// the pattern already).
fn like(text: &str, pattern: &[Pattern]) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(Pattern::Literal(c)) if *c == text[t] => {
                t += 1;
                p += 1;
            }
            Some(Pattern::Wildcard) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|x| *x == Pattern::Wildcard)
}
