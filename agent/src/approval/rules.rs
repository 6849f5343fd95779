//! Approval rules: who may approve what, how many must, and how long a request may
//! wait. They live in `<policies_dir>/approvals.toml`; a policy's obligation names one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::people::{People, Person};
use crate::config::{ConfigError, TomlSource};

pub const RULES_FILE: &str = "approvals.toml";

/// What the client experiences while its request waits for a reviewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The request waits (up to the timeout) and proceeds the moment it is approved.
    Hold,
    /// The request is refused at once with the approval id; once approved, the same
    /// request passes within the grant window, `uses` times.
    Retry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    pub name: String,
    /// Reviewer groups: local groups (admin socket) or OIDC groups (console).
    pub reviewers: Vec<String>,
    /// Distinct reviewers who must approve.
    pub quorum: usize,
    pub mode: Mode,
    /// How long a request may wait for a decision before it expires.
    pub timeout: Duration,
    /// Retry mode: how long after approval the grant may be used, and how often.
    pub grant: Duration,
    pub uses: u32,
    /// Slack-compatible webhook notified when an approval is requested.
    pub webhook: Option<String>,
}

/// Every rule, by name, and who the people deciding and asking are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: BTreeMap<String, ApprovalRule>,
    /// `[[person]]`: the names each person uses.
    pub people: People,
    /// Approvals one person may have pending at once; beyond, requests get 429.
    pub max_pending_per_requester: usize,
}

/// Each pending approval rewrites (and fsyncs) the approvals file and may notify a
/// webhook: one requester must not be able to flood reviewers and the disk.
pub const DEFAULT_MAX_PENDING_PER_REQUESTER: usize = 10;

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            rules: BTreeMap::new(),
            people: People::default(),
            max_pending_per_requester: DEFAULT_MAX_PENDING_PER_REQUESTER,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    max_pending_per_requester: Option<Spanned<u64>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    person: Vec<Spanned<RawPerson>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerson {
    name: Spanned<String>,
    unix: Option<Spanned<Vec<String>>>,
    console: Option<Spanned<Vec<String>>>,
    oidc: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    reviewers: Spanned<Vec<String>>,
    quorum: Option<Spanned<u64>>,
    mode: Option<Spanned<String>>,
    timeout_secs: Option<Spanned<f64>>,
    grant_secs: Option<Spanned<f64>>,
    uses: Option<Spanned<u32>>,
    webhook: Option<Spanned<String>>,
}

impl RuleSet {
    /// Reads `<dir>/approvals.toml`; no file means no rules.
    pub fn load(dir: &Path) -> Result<RuleSet, ConfigError> {
        let path = dir.join(RULES_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => RuleSet::parse(&path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RuleSet::default()),
            Err(e) => Err(ConfigError {
                file: path,
                line: None,
                key: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<RuleSet, ConfigError> {
        let src = TomlSource::new(path, text);
        let raw: RawFile = src.parse()?;
        let mut rules = BTreeMap::new();
        for (i, r) in raw.rule.into_iter().enumerate() {
            let rule = parse_rule(&src, i, r.into_inner(), &rules)?;
            rules.insert(rule.name.clone(), rule);
        }
        let mut people = People::default();
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in raw.person.into_iter().enumerate() {
            add_person(&src, i, p.into_inner(), &mut names, &mut people)?;
        }
        let max_pending_per_requester = match raw.max_pending_per_requester {
            None => DEFAULT_MAX_PENDING_PER_REQUESTER,
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 10_000 => {
                return Err(src.err(
                    Some(n.span()),
                    Some("max_pending_per_requester".into()),
                    "must be 1 to 10000".into(),
                ))
            }
            Some(n) => n.into_inner() as usize,
        };
        Ok(RuleSet {
            rules,
            people,
            max_pending_per_requester,
        })
    }

    pub fn get(&self, name: &str) -> Option<&ApprovalRule> {
        self.rules.get(name)
    }
}

/// `rule[i]`, validated against the rules before it.
fn parse_rule(
    src: &TomlSource<'_>,
    i: usize,
    r: RawRule,
    rules: &BTreeMap<String, ApprovalRule>,
) -> Result<ApprovalRule, ConfigError> {
    let err = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
        src.err(span, Some(key), message)
    };
    let key = |k: &str| format!("rule[{i}].{k}");
    let name = r.name.get_ref().trim().to_owned();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(err(
            Some(r.name.span()),
            key("name"),
            "letters, digits, `_` and `-` only".into(),
        ));
    }
    if rules.contains_key(&name) {
        return Err(err(
            Some(r.name.span()),
            key("name"),
            format!("`{name}` is defined twice"),
        ));
    }
    let reviewers = r.reviewers.get_ref().clone();
    if reviewers.is_empty() || reviewers.iter().any(|g| g.trim().is_empty()) {
        return Err(err(
            Some(r.reviewers.span()),
            key("reviewers"),
            "name at least one reviewer group".into(),
        ));
    }
    let quorum = match r.quorum {
        None => 1,
        Some(q) if *q.get_ref() == 0 || *q.get_ref() > 16 => {
            return Err(err(Some(q.span()), key("quorum"), "must be 1 to 16".into()))
        }
        Some(q) => q.into_inner() as usize,
    };
    let mode = match r.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("hold") => Mode::Hold,
        Some("retry") => Mode::Retry,
        Some(other) => {
            return Err(err(
                r.mode.as_ref().map(|m| m.span()),
                key("mode"),
                format!("`{other}`: expected \"hold\" or \"retry\""),
            ))
        }
    };
    let secs = |v: Option<Spanned<f64>>, k: &str, default: f64| match v {
        None => Ok(Duration::from_secs_f64(default)),
        Some(v) if !(*v.get_ref() > 0.0 && *v.get_ref() <= 7.0 * 86400.0) => Err(err(
            Some(v.span()),
            key(k),
            "must be more than 0 and at most 604800 (a week)".into(),
        )),
        Some(v) => Ok(Duration::from_secs_f64(v.into_inner())),
    };
    let timeout = secs(r.timeout_secs, "timeout_secs", 900.0)?;
    let grant = secs(r.grant_secs, "grant_secs", 3600.0)?;
    let uses = match r.uses {
        None => 1,
        Some(u) if *u.get_ref() == 0 => {
            return Err(err(
                Some(u.span()),
                key("uses"),
                "must be at least 1".into(),
            ))
        }
        Some(u) => u.into_inner(),
    };
    let webhook = match r.webhook {
        None => None,
        Some(w) => Some(parse_webhook(src, w, key("webhook"))?),
    };
    Ok(ApprovalRule {
        name,
        reviewers,
        quorum,
        mode,
        timeout,
        grant,
        uses,
        webhook,
    })
}

/// A rule's `webhook`: an http or https URL.
fn parse_webhook(
    src: &TomlSource<'_>,
    w: Spanned<String>,
    key: String,
) -> Result<String, ConfigError> {
    let uri: http::Uri = w
        .get_ref()
        .parse()
        .map_err(|e| src.err(Some(w.span()), Some(key.clone()), format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") && uri.scheme_str() != Some("http") {
        return Err(src.err(
            Some(w.span()),
            Some(key),
            "must be an http or https URL".into(),
        ));
    }
    Ok(w.into_inner())
}

/// `person[i]`: one person's names, none shared with a person before (`names`
/// holds the people's own names so far).
fn add_person(
    src: &TomlSource<'_>,
    i: usize,
    p: RawPerson,
    names: &mut std::collections::BTreeSet<String>,
    people: &mut People,
) -> Result<(), ConfigError> {
    let err = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
        src.err(span, Some(key), message)
    };
    let key = |k: &str| format!("person[{i}].{k}");
    let name = p.name.get_ref().trim().to_owned();
    if name.is_empty() || !names.insert(name.clone()) {
        return Err(err(
            Some(p.name.span()),
            key("name"),
            if name.is_empty() {
                "a person needs a name".into()
            } else {
                format!("`{name}` is defined twice")
            },
        ));
    }
    let kinds = [
        ("unix", &p.unix),
        ("console", &p.console),
        ("oidc", &p.oidc),
    ];
    let span_of = |kind: &str| {
        kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v.as_ref().map(|v| v.span()))
    };
    for (kind, names) in kinds {
        let Some(names) = names else { continue };
        if let Some(bad) = names
            .get_ref()
            .iter()
            .find(|n| n.trim().is_empty() || n.trim() != n.as_str())
        {
            return Err(err(
                Some(names.span()),
                key(kind),
                format!("`{bad}`: a name is not empty and has no surrounding spaces"),
            ));
        }
    }
    let list = |v: &Option<Spanned<Vec<String>>>| {
        v.as_ref().map(|v| v.get_ref().clone()).unwrap_or_default()
    };
    people
        .add(&Person {
            name,
            unix: list(&p.unix),
            console: list(&p.console),
            oidc: list(&p.oidc),
        })
        .map_err(|c| {
            err(
                span_of(c.kind),
                key(c.kind),
                format!("`{}` is already a name of person `{}`", c.name, c.first),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_defaults_and_errors_name_the_line() {
        let text = r#"
[[rule]]
name = "bulk_export"
reviewers = ["privacy-officers"]

[[rule]]
name = "delete"
reviewers = ["privacy-officers", "security"]
quorum = 2
mode = "retry"
grant_secs = 600
uses = 3
"#;
        let set = RuleSet::parse(Path::new("approvals.toml"), text).unwrap();
        let b = set.get("bulk_export").unwrap();
        assert_eq!((b.mode, b.quorum, b.uses), (Mode::Hold, 1, 1));
        assert_eq!(b.timeout, Duration::from_secs(900));
        let d = set.get("delete").unwrap();
        assert_eq!((d.mode, d.quorum, d.uses), (Mode::Retry, 2, 3));
        assert_eq!(d.grant, Duration::from_secs(600));

        let bad = "[[rule]]\nname = \"x\"\nreviewers = [\"a\"]\nmode = \"later\"\n";
        let e = RuleSet::parse(Path::new("approvals.toml"), bad).unwrap_err();
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key.as_deref(), Some("rule[0].mode"));
        let e = RuleSet::parse(
            Path::new("a.toml"),
            "[[rule]]\nname = \"x\"\nreviewers = []\n",
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("a.toml:3: rule[0].reviewers"),
            "{e}"
        );
        let e = RuleSet::parse(
            Path::new("a.toml"),
            "[[rule]]\nname = \"x\"\nreviewer = [\"a\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn people_and_the_pending_bound_parse_and_conflicts_name_the_line() {
        use crate::approval::people::Name;
        let text = r#"
max_pending_per_requester = 3

[[person]]
name = "dana"
unix = ["dana"]
console = ["dana.r"]
oidc = ["https://idp.test#00u1x9"]
"#;
        let set = RuleSet::parse(Path::new("approvals.toml"), text).unwrap();
        assert_eq!(set.max_pending_per_requester, 3);
        assert_eq!(set.people.person(Name::Console("dana.r")), "dana");
        assert_eq!(
            RuleSet::default().max_pending_per_requester,
            DEFAULT_MAX_PENDING_PER_REQUESTER
        );

        let twice = format!("{text}\n[[person]]\nname = \"eve\"\nconsole = [\"dana.r\"]\n");
        let e = RuleSet::parse(Path::new("approvals.toml"), &twice).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("person[1].console"), "{e}");
        assert_eq!(e.line, Some(12), "{e}");
        assert!(e.message.contains("person `dana`"), "{e}");

        let e = RuleSet::parse(Path::new("a.toml"), "max_pending_per_requester = 0\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(1), Some("max_pending_per_requester"))
        );
        let e = RuleSet::parse(
            Path::new("a.toml"),
            "[[person]]\nname = \"x\"\nldap = [\"x\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }
}
