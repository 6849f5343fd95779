//! `[policy]` of phigate.toml: what policies see beyond the request, parsed with
//! the shared [`TomlSource`].

use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, TomlSource};

/// What policies see beyond the request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySection {
    /// IANA time zone (or "UTC") of `context.hour`, `minute` and `weekday`.
    pub timezone: String,
    /// Request headers (lower case) policies see as `context.headers`.
    pub headers: Vec<String>,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            timezone: "UTC".into(),
            headers: Vec::new(),
        }
    }
}

impl PolicySection {
    /// The configured zone (validated when the config was parsed).
    pub fn tz(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(&self.timezone).unwrap_or(jiff::tz::TimeZone::UTC)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    timezone: Option<Spanned<String>>,
    headers: Option<Vec<String>>,
}

/// `[policy]`, validated.
pub(crate) fn policy_section(
    src: &TomlSource<'_>,
    raw: Option<RawPolicy>,
) -> Result<PolicySection, ConfigError> {
    Ok(match raw {
        None => PolicySection::default(),
        Some(p) => {
            let timezone = match p.timezone {
                None => "UTC".to_owned(),
                Some(tz) => {
                    if jiff::tz::TimeZone::get(tz.get_ref()).is_err() {
                        return Err(src.err(
                            Some(tz.span()),
                            Some("policy.timezone".into()),
                            format!("`{}` is not a time zone of this host's tz database (use e.g. \"UTC\" or \"America/New_York\")", tz.get_ref()),
                        ));
                    }
                    tz.into_inner()
                }
            };
            PolicySection {
                timezone,
                headers: p
                    .headers
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::ConfigError;
    use crate::settings::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/phigate/test.toml"), text)
    }

    #[test]
    fn policy_section() {
        let c = parse("[policy]\ntimezone = \"America/New_York\"\nheaders = [\"X-Purpose\"]\n\n[[oidc.issuers]]\nissuer = \"https://idp.test/r\"\naudiences = [\"patients-api\"]\ngroup_map = { \"fhir-clinicians\" = \"clinicians\" }\n").unwrap();
        assert_eq!(c.policy.timezone, "America/New_York");
        assert_eq!(c.policy.headers, ["x-purpose"]);
        assert_eq!(parse("").unwrap().policy.timezone, "UTC");

        let e = parse("[policy]\ntimezone = \"Mars/Olympus\"\n").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("policy.timezone"))
        );
    }
}
