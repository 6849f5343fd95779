//! Approval rules: who may approve what, how many must, and how long a request may
//! wait. They live in `<policies_dir>/approvals.toml`; a policy's obligation names one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{line_of, ConfigError};

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

/// Every rule, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: BTreeMap<String, ApprovalRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
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
        let err =
            |span: Option<std::ops::Range<usize>>, key: String, message: String| ConfigError {
                file: PathBuf::from(path),
                line: span.map(|s| line_of(text, s.start)),
                key: Some(key),
                message,
            };
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)),
            key: None,
            message: e.message().to_owned(),
        })?;
        let mut rules = BTreeMap::new();
        for (i, r) in raw.rule.into_iter().enumerate() {
            let r = r.into_inner();
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
                Some(w) => {
                    let uri: http::Uri = w.get_ref().parse().map_err(|e| {
                        err(Some(w.span()), key("webhook"), format!("not a URL: {e}"))
                    })?;
                    if uri.scheme_str() != Some("https") && uri.scheme_str() != Some("http") {
                        return Err(err(
                            Some(w.span()),
                            key("webhook"),
                            "must be an http or https URL".into(),
                        ));
                    }
                    Some(w.into_inner())
                }
            };
            rules.insert(
                name.clone(),
                ApprovalRule {
                    name,
                    reviewers,
                    quorum,
                    mode,
                    timeout,
                    grant,
                    uses,
                    webhook,
                },
            );
        }
        Ok(RuleSet { rules })
    }

    pub fn get(&self, name: &str) -> Option<&ApprovalRule> {
        self.rules.get(name)
    }
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
}
