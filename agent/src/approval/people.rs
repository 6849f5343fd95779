//! People: one person behind the names they use. A reviewer approves as a Unix login
//! (admin socket) or a console account; a requester asks as a workload's Unix login
//! and, usually, an OIDC subject that is an opaque id. Self-approval and quorum are
//! decided on persons, so one human cannot approve their own request under another
//! name, nor vote twice toward a quorum.
//!
//! A name maps to its person through `[[person]]` entries of approvals.toml. A name
//! no entry lists is its own person: a Unix login and a console account that are
//! spelled the same are one person (the safe reading), a token's person is the value
//! of its issuer's `person_claim` when configured, else its `issuer#subject`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The name someone used, in the namespace it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    /// A login on this host (admin socket peer, or a workload's user).
    Unix(&'a str),
    /// A console account.
    Console(&'a str),
    /// A validated token: its issuer and subject, and the configured person claim.
    Token(&'a TokenName),
}

/// What an approval keeps of the requester's token to find its person later (the
/// mapping may change by reload while the approval is pending).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenName {
    pub issuer: String,
    pub subject: String,
    /// The value of the issuer's `person_claim`, when configured and present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<String>,
}

impl TokenName {
    /// `issuer#subject`, how `[[person]] oidc` names an exact subject.
    pub fn qualified(&self) -> String {
        format!("{}#{}", self.issuer, self.subject)
    }
}

/// Every mapping of approvals.toml's `[[person]]` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct People {
    unix: HashMap<String, String>,
    console: HashMap<String, String>,
    /// `issuer#subject` or a person-claim value → person.
    oidc: HashMap<String, String>,
}

/// One `[[person]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub name: String,
    pub unix: Vec<String>,
    pub console: Vec<String>,
    pub oidc: Vec<String>,
}

/// A name listed under two persons.
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict {
    pub kind: &'static str,
    pub name: String,
    pub first: String,
}

impl People {
    /// Adds a person's names; a name another person already has is refused.
    pub fn add(&mut self, p: &Person) -> Result<(), Conflict> {
        for (kind, names, map) in [
            ("unix", &p.unix, &mut self.unix),
            ("console", &p.console, &mut self.console),
            ("oidc", &p.oidc, &mut self.oidc),
        ] {
            for n in names {
                if let Some(first) = map.get(n).filter(|f| **f != p.name) {
                    return Err(Conflict {
                        kind,
                        name: n.clone(),
                        first: first.clone(),
                    });
                }
                map.insert(n.clone(), p.name.clone());
            }
        }
        Ok(())
    }

    /// The person behind `name`.
    pub fn person(&self, name: Name<'_>) -> String {
        match name {
            Name::Unix(n) => self.unix.get(n).cloned().unwrap_or_else(|| n.to_owned()),
            Name::Console(n) => self.console.get(n).cloned().unwrap_or_else(|| n.to_owned()),
            Name::Token(t) => {
                let exact = t.qualified();
                self.oidc
                    .get(&exact)
                    .or_else(|| t.person.as_ref().and_then(|c| self.oidc.get(c)))
                    .cloned()
                    .or_else(|| t.person.clone())
                    .unwrap_or(exact)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dana() -> Person {
        Person {
            name: "dana".into(),
            unix: vec!["dana".into(), "dana-admin".into()],
            console: vec!["dana.r".into()],
            oidc: vec!["https://idp.test#00u1x9".into()],
        }
    }

    #[test]
    fn every_name_of_a_person_resolves_to_them() {
        let mut p = People::default();
        p.add(&dana()).unwrap();
        let token = TokenName {
            issuer: "https://idp.test".into(),
            subject: "00u1x9".into(),
            person: None,
        };
        for n in [
            Name::Unix("dana"),
            Name::Unix("dana-admin"),
            Name::Console("dana.r"),
            Name::Token(&token),
        ] {
            assert_eq!(p.person(n), "dana", "{n:?}");
        }
        // Unlisted names: a login and an account spelled alike are one person; an
        // opaque subject is its own.
        assert_eq!(p.person(Name::Unix("erin")), "erin");
        assert_eq!(p.person(Name::Console("erin")), "erin");
        let other = TokenName {
            issuer: "https://idp.test".into(),
            subject: "00u7".into(),
            person: None,
        };
        assert_eq!(p.person(Name::Token(&other)), "https://idp.test#00u7");
        // The person claim: mapped when listed, else the claim's value itself.
        let claimed = TokenName {
            person: Some("erin".into()),
            ..other.clone()
        };
        assert_eq!(p.person(Name::Token(&claimed)), "erin");
        let mut q = People::default();
        q.add(&Person {
            oidc: vec!["dana@hospital.test".into()],
            ..dana()
        })
        .unwrap();
        let by_email = TokenName {
            person: Some("dana@hospital.test".into()),
            ..other
        };
        assert_eq!(q.person(Name::Token(&by_email)), "dana");
    }

    #[test]
    fn a_name_belongs_to_one_person() {
        let mut p = People::default();
        p.add(&dana()).unwrap();
        let e = p
            .add(&Person {
                name: "eve".into(),
                unix: vec![],
                console: vec!["dana.r".into()],
                oidc: vec![],
            })
            .unwrap_err();
        assert_eq!(
            (e.kind, e.name.as_str(), e.first.as_str()),
            ("console", "dana.r", "dana")
        );
    }
}
