//! `phigate policy explain`: what the proxy would decide for one request, through the
//! same [`Gatekeeper::check`](super::gate::Gatekeeper::check), without sending it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use http::{header, HeaderMap, HeaderName, HeaderValue, Uri};

use super::config::PolicySection;
use super::gate::{Gatekeeper, Subject, Verdict};
use super::Clock;
use crate::config::{AgentSection, Destination, DEFAULT_CONFIG_PATH};
use crate::identity::oidc::OidcSection;
use crate::identity::Workload;

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The request: "METHOD URL", e.g. "GET https://127.0.0.2:9443/fhir/Patient/1".
    pub request: String,
    /// The calling process's systemd unit.
    #[arg(long)]
    pub unit: Option<String>,
    /// The calling process's user (name; its uid is looked up unless --uid is given).
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
    /// Executable path and its SHA-256 (hex).
    #[arg(long)]
    pub exe: Option<String>,
    #[arg(long)]
    pub exe_sha256: Option<String>,
    /// A file holding the bearer token (validated exactly as the proxy does; keys may
    /// be fetched from the issuer).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The destination's name, when the URL's host is not one of its addresses.
    #[arg(long)]
    pub destination: Option<String>,
    /// A request header, "name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// The request carries a granted approval.
    #[arg(long)]
    pub approved: bool,
    /// Decide at this time instead of now: "Mon 14:30" (in [policy] timezone).
    #[arg(long)]
    pub at: Option<String>,
}

/// What explain reads of the config at `--config`; the command line loads it (the
/// whole config is composed in a layer above policy).
pub struct ConfigParts {
    pub agent: AgentSection,
    pub destinations: Vec<Destination>,
    pub policy: PolicySection,
    pub oidc: OidcSection,
}

pub fn run(args: ExplainArgs, config: ConfigParts) -> anyhow::Result<ExitCode> {
    let (method, url) = args
        .request
        .trim()
        .split_once(char::is_whitespace)
        .context("the request must be \"METHOD URL\", e.g. \"GET https://host/path\"")?;
    let uri: Uri = url
        .trim()
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    let destination = destination_of(&args, &config, &uri)?;
    let workload = workload_of(&args);
    let headers = headers_of(&args)?;
    let clock = args.at.as_deref().map(parse_at).transpose()?;
    // The URL's host is the request's authority; a client of an https URL names it
    // in its SNI too (never an address).
    let host = uri.host().map(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    });
    let sni = host
        .clone()
        .filter(|h| uri.scheme_str() == Some("https") && h.parse::<IpAddr>().is_err());

    // No redirect is attached here: plain sockets (explain runs outside the
    // protected cgroup, as an operator's command).
    let sockets = crate::sockets::SocketFactory::new(config.agent.mark, None);
    let gate = Gatekeeper::from_config(
        &config.agent.policies_dir,
        &config.policy,
        &config.oidc,
        &sockets,
    )?;
    let rules = crate::approval::RuleSet::load(&config.agent.policies_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let verdict = rt
        .block_on(gate.check(
            &Subject {
                workload: &workload,
                destination: &destination,
                method,
                path: uri.path(),
                query: uri.query(),
                headers: &headers,
                host: host.as_deref(),
                sni: sni.as_deref(),
                has_approval: args.approved,
            },
            clock,
        ))
        .context("the URL's path cannot be normalized")?;
    // What the proxy will do, not only what Cedar said: a permit with an approval
    // obligation is held (403 approval_pending) until a reviewer grants it.
    let outcome = Explained::of(&verdict.decision, args.approved, |rule| {
        rules.get(rule).is_some()
    });
    print_explained(&outcome, &verdict, &destination, gate.policies.hash());
    Ok(match outcome.decision {
        "allow" => ExitCode::SUCCESS,
        "held" => ExitCode::from(3),
        _ => ExitCode::from(2),
    })
}

/// The destination named by `--destination`, else the one the URL's address and
/// port are protected as.
fn destination_of(args: &ExplainArgs, config: &ConfigParts, uri: &Uri) -> anyhow::Result<String> {
    if let Some(d) = &args.destination {
        if !config.destinations.iter().any(|x| &x.name == d) {
            bail!("no destination named `{d}` in {}", args.config.display());
        }
        return Ok(d.clone());
    }
    let host = uri.host().context("the URL has no host")?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| anyhow::anyhow!("`{host}` is not an address: phigate matches destinations by address; give --destination NAME"))?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    let (_, d) = crate::config::destination_for(&config.destinations, SocketAddr::new(ip, port))
        .with_context(|| {
            format!(
                "{ip}:{port} is not a protected destination in {}",
                args.config.display()
            )
        })?;
    Ok(d.name.clone())
}

/// The calling process as the options describe it.
fn workload_of(args: &ExplainArgs) -> Workload {
    let mut workload = Workload {
        user: args.user.clone(),
        systemd_unit: args.unit.clone(),
        exe_path: args.exe.clone(),
        exe_sha256: args.exe_sha256.clone(),
        comm: "explain".into(),
        ..Workload::default()
    };
    if let Some(u) = &args.user {
        if let Ok(Some(pw)) = nix::unistd::User::from_name(u) {
            workload.uid = pw.uid.as_raw();
            workload.gid = pw.gid.as_raw();
        }
    }
    workload.uid = args.uid.unwrap_or(workload.uid);
    workload.gid = args.gid.unwrap_or(workload.gid);
    workload
}

/// The request's headers: `--header`s, and the token file's bearer token.
fn headers_of(args: &ExplainArgs) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for h in &args.headers {
        let (n, v) = h
            .split_once(':')
            .with_context(|| format!("--header `{h}`: expected \"name: value\""))?;
        headers.append(
            HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        );
    }
    if let Some(f) = &args.token_file {
        let token =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .context("the token file holds characters a header cannot carry")?,
        );
    }
    Ok(headers)
}

fn print_explained(outcome: &Explained, verdict: &Verdict, destination: &str, set_hash: &str) {
    let d = &verdict.decision;
    println!("decision: {}", outcome.decision);
    println!("reason: {}", outcome.reason);
    println!("status: {}", outcome.status.as_u16());
    println!("destination: {destination}");
    println!("path: {}", verdict.access.path);
    println!(
        "policies: {}",
        if d.policy_ids.is_empty() {
            "(none: deny by default)".to_owned()
        } else {
            d.policy_ids.join(", ")
        }
    );
    println!("mask: {}", d.mask_profile.as_deref().unwrap_or("-"));
    println!("approval: {}", d.approval_rule.as_deref().unwrap_or("-"));
    match &verdict.access.token {
        Ok(t) => println!(
            "token: valid; issuer {}, subject {}, groups [{}], expires {}",
            t.issuer,
            t.subject,
            t.groups.join(", "),
            t.expires_at
        ),
        Err(e) => println!("token: {} ({e})", e.code()),
    }
    println!("policy set: {set_hash}");
    for e in &d.errors {
        println!("evaluation error: {e}");
    }
}

/// The proxy's answer to a decision, as `explain` prints it.
#[derive(Debug, PartialEq, Eq)]
struct Explained {
    /// `allow`, `deny` or `held` (waits for a reviewer).
    decision: &'static str,
    /// The `reason` of the proxy's JSON answer (for a 401, the token's problem).
    reason: &'static str,
    status: http::StatusCode,
}

impl Explained {
    /// Mirrors the pipeline: an approval obligation holds the request unless it
    /// carries a granted approval; a rule nobody defined can never be granted.
    fn of(d: &super::Decision, approved: bool, rule_defined: impl Fn(&str) -> bool) -> Explained {
        match &d.approval_rule {
            Some(rule) if d.allowed && !rule_defined(rule) => Explained {
                decision: "deny",
                reason: "approval_unavailable",
                status: http::StatusCode::FORBIDDEN,
            },
            Some(_) if d.allowed && !approved => Explained {
                decision: "held",
                reason: "approval_pending",
                status: http::StatusCode::FORBIDDEN,
            },
            _ => Explained {
                decision: if d.allowed { "allow" } else { "deny" },
                reason: match &d.reason {
                    super::Reason::TokenRequired(e) => e.code(),
                    other => other.code(),
                },
                status: super::status_for(d),
            },
        }
    }
}

fn parse_at(s: &str) -> anyhow::Result<Clock> {
    let bad = || anyhow::anyhow!("--at `{s}`: expected e.g. \"Mon 14:30\"");
    let (day, time) = s.trim().split_once(' ').ok_or_else(bad)?;
    let weekday = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .position(|d| day.to_ascii_lowercase().starts_with(d))
        .ok_or_else(bad)? as u8
        + 1;
    let (h, m) = time.trim().split_once(':').ok_or_else(bad)?;
    let hour: u8 = h.parse().map_err(|_| bad())?;
    let minute: u8 = m.parse().map_err(|_| bad())?;
    if hour > 23 || minute > 59 {
        return Err(bad());
    }
    Ok(Clock {
        hour,
        minute,
        weekday,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Decision, Reason};

    fn permit(approval: Option<&str>) -> Decision {
        Decision {
            allowed: true,
            policy_ids: vec!["p".into()],
            mask_profile: None,
            approval_rule: approval.map(Into::into),
            reason: Reason::Permitted,
            errors: vec![],
        }
    }

    #[test]
    fn an_approval_obligation_is_held_unless_approved() {
        let held = Explained::of(&permit(Some("off_hours")), false, |_| true);
        assert_eq!(
            (held.decision, held.reason, held.status.as_u16()),
            ("held", "approval_pending", 403)
        );
        let approved = Explained::of(&permit(Some("off_hours")), true, |_| true);
        assert_eq!(
            (approved.decision, approved.status.as_u16()),
            ("allow", 200)
        );
        let undefined = Explained::of(&permit(Some("nobody")), true, |_| false);
        assert_eq!(
            (undefined.decision, undefined.reason),
            ("deny", "approval_unavailable")
        );
        let plain = Explained::of(&permit(None), false, |_| false);
        assert_eq!((plain.decision, plain.status.as_u16()), ("allow", 200));
    }
}
