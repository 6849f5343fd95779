//! The whole phigate.toml: every module's section, parsed with the one shared
//! `TomlSource` and validated together, so a bad file on reload is rejected and the
//! running config stays.
//!
//! It sits above every section's owner (`tls`, `identity`, `record`, `mask`,
//! `policy`, and `config` for the shared ones) and below those that hold a whole
//! config (proxy, state, app, cli).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Where phigate.toml is read from unless `--config` says otherwise.
pub use crate::config::DEFAULT_CONFIG_PATH;
use crate::config::{
    admin_section, agent_section, destinations_section, limits_section, timeouts_section,
    AdminSection, AgentSection, ConfigError, Destination, Limits, RawAdmin, RawAgent,
    RawDestination, RawLimits, RawTimeouts, Timeouts, TomlSource,
};
use crate::identity::oidc::config::{oidc_section, OidcSection, RawOidc};
use crate::mask::config::{masking_section, MaskingSection, RawMasking};
use crate::policy::config::{policy_section, PolicySection, RawPolicy};
use crate::record::config::{records_section, RawRecords, RecordsSection};
use crate::tls::config::{tls_section, RawTls, TlsSection};

/// The agent's whole configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this came from (errors and reload refer to it).
    pub source: PathBuf,
    pub agent: AgentSection,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub tls: TlsSection,
    pub records: RecordsSection,
    pub admin: AdminSection,
    pub masking: MaskingSection,
    pub destinations: Vec<Destination>,
    pub policy: PolicySection,
    pub oidc: OidcSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<Spanned<RawAgent>>,
    timeouts: Option<RawTimeouts>,
    limits: Option<RawLimits>,
    masking: Option<RawMasking>,
    tls: Option<Spanned<RawTls>>,
    records: Option<RawRecords>,
    admin: Option<RawAdmin>,
    policy: Option<RawPolicy>,
    oidc: Option<RawOidc>,
    #[serde(default)]
    destinations: Vec<Spanned<RawDestination>>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read config: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` is used for errors and relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let src = TomlSource::new(path, text);
        let raw: RawConfig = src.parse()?;
        let agent = agent_section(&src, raw.agent)?;
        let timeouts = timeouts_section(&src, raw.timeouts)?;
        let limits = limits_section(&src, raw.limits)?;
        let masking = masking_section(&src, raw.masking)?;
        let records = records_section(&src, raw.records)?;
        let tls = tls_section(&src, raw.tls)?;
        let policy = policy_section(&src, raw.policy)?;
        let oidc = oidc_section(&src, raw.oidc)?;
        let destinations =
            destinations_section(&src, raw.destinations, agent.listen_v4, agent.listen_v6)?;
        let admin = admin_section(&src, raw.admin)?;
        Ok(Config {
            source: path.to_owned(),
            agent,
            timeouts,
            limits,
            tls,
            records,
            admin,
            masking,
            destinations,
            policy,
            oidc,
        })
    }

    /// The destination protecting `addr`, with its index (the id the eBPF maps carry).
    pub fn destination_for(&self, addr: SocketAddr) -> Option<(u32, &Destination)> {
        crate::config::destination_for(&self.destinations, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FailMode, Protocol};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/phigate/test.toml"), text)
    }

    const GOOD: &str = r#"
[agent]
listen = ["127.0.0.1:15001", "[::1]:15001"]
state_dir = "/var/lib/phigate"
records_dir = "/var/lib/phigate/records"
policies_dir = "/etc/phigate/policies"
cgroup = "/sys/fs/cgroup/unified"
fail_mode = "closed"

[[destinations]]
name = "patients-api"
addresses = ["127.0.0.2:9443", "10.20.0.0/16:443", "[fd00::/64]:443"]
protocol = "tcp"
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.listen_v4, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.agent.listen_v6, Some("[::1]:15001".parse().unwrap()));
        assert_eq!(c.agent.fail_mode, FailMode::Closed);
        assert_eq!(c.agent.mark, phigate_common::DEFAULT_AGENT_MARK);
        assert_eq!(c.destinations.len(), 1);
        let d = &c.destinations[0];
        assert_eq!(d.protocol, Protocol::Tcp);
        assert_eq!(d.addresses[1].to_string(), "10.20.0.0/16:443");
        assert_eq!(d.addresses[2].to_string(), "[fd00::/64]:443");
        assert_eq!(
            c.destination_for("10.20.3.4:443".parse().unwrap())
                .map(|(i, _)| i),
            Some(0)
        );
        assert!(c.destination_for("10.20.3.4:80".parse().unwrap()).is_none());
        // IPv4-mapped IPv6 matches the IPv4 entry.
        assert!(c
            .destination_for("[::ffff:127.0.0.2]:9443".parse().unwrap())
            .is_some());
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = Config::load(Path::new("/nonexistent/phigate.toml")).unwrap_err();
        assert!(e.to_string().contains("cannot read config"), "{e}");
    }
}
