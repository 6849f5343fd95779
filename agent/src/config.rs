//! What every TOML file of the agent shares: `TomlSource`, which gives each file
//! (phigate.toml, approvals.toml, console accounts) the same `file:line: key: message`
//! errors, and [`ConfigError`]; and the phigate.toml sections many layers use:
//! `[agent]`, `[admin]`, `[timeouts]`, `[limits]` and `[[destinations]]`.
//!
//! Each other section is its owner's (`tls`, `identity::oidc`, `record`, `mask`,
//! `policy`); [`crate::settings`] composes them into the whole config.
#![forbid(unsafe_code)]

pub mod upstream_auth;

/// The default `[agent] mark` (for host firewall rules; not trusted by the redirect).
pub use phigate_common::DEFAULT_AGENT_MARK;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// Where phigate.toml is read from unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/phigate/phigate.toml";

/// A config error, pointing at where in which file it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the error has a location.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `destinations[1].addresses[0]`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
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

impl std::error::Error for ConfigError {}

/// What a destination speaks, and so what phigate does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Bidirectional byte pass-through, recorded per connection.
    Tcp,
    /// TLS terminated with a minted certificate, HTTP inside, verified TLS upstream.
    Https,
    /// Plain HTTP on both sides.
    Http,
    /// The client speaks plain HTTP; phigate originates verified TLS upstream.
    HttpToHttps,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Https => "https",
            Protocol::Http => "http",
            Protocol::HttpToHttps => "http-to-https",
        }
    }
}

/// What happens to protected connects while no agent listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// The programs stay attached: protected connects are refused.
    #[default]
    Closed,
    /// Protected connects go to the original destination untouched.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One CIDR + port the redirect protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedAddr {
    pub net: IpNet,
    pub port: u16,
}

impl fmt::Display for ProtectedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V6(n) if n.prefix_len() == 128 => write!(f, "[{}]:{}", n.addr(), self.port),
            IpNet::V4(n) if n.prefix_len() == 32 => write!(f, "{}:{}", n.addr(), self.port),
            IpNet::V6(n) => write!(f, "[{n}]:{}", self.port),
            IpNet::V4(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl ProtectedAddr {
    /// Parses `1.2.3.4:443`, `10.0.0.0/8:443`, `[::1]:443`, `[fd00::/8]:443`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port; write ADDRESS[/PREFIX]:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` in `{s}` is not a port number"))?;
        if port == 0 {
            return Err(format!("port 0 in `{s}` is not a valid destination port"));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let net = if host.contains('/') {
            let net: IpNet = host
                .parse()
                .map_err(|_| format!("`{host}` in `{s}` is not a CIDR block"))?;
            if net.trunc() != net {
                return Err(format!(
                    "`{host}` has host bits set; did you mean `{}`?",
                    net.trunc()
                ));
            }
            net
        } else {
            let ip: IpAddr = host
                .parse()
                .map_err(|_| format!("`{host}` in `{s}` is not an IP address (names are not resolved; use an address or CIDR)"))?;
            IpNet::from(ip)
        };
        Ok(ProtectedAddr { net, port })
    }

    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        addr.port() == self.port && self.net.contains(&ip)
    }
}

/// Timeouts of the data path. HIPAA's automatic logoff is `max_connection_lifetime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub tls_handshake: Duration,
    pub idle: Duration,
    pub request: Duration,
    pub max_connection_lifetime: Duration,
    /// How long SIGTERM waits for open connections before closing them.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            tls_handshake: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            request: Duration::from_secs(300),
            max_connection_lifetime: Duration::from_secs(8 * 3600),
            drain: Duration::from_secs(20),
        }
    }
}

/// Size limits of the HTTP path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Request line + headers: 431 beyond it.
    pub max_header_bytes: usize,
    /// Request body: 413 beyond it.
    pub max_request_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_request_body_bytes: 1 << 30,
        }
    }
}

/// A protected destination, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub name: String,
    pub addresses: Vec<ProtectedAddr>,
    pub protocol: Protocol,
    /// Extra CA bundle (PEM) trusted for this destination's upstream, beside the system roots.
    pub upstream_ca: Option<PathBuf>,
    /// SNI names not intercepted (certificate-pinning clients): passed as TCP, recorded uninspected.
    pub passthrough_hosts: Vec<String>,
    /// The names this destination serves (lower case, `*.suffix` allowed): a request
    /// for another Host / `:authority` is answered 421. Empty: any name.
    pub hosts: Arc<[String]>,
    /// ALPN protocols offered to clients, in preference order (`h2`, `http/1.1`).
    pub alpn: Vec<String>,
    /// The masking profile (a file in `<policies_dir>/profiles`) applied to this
    /// destination's bodies; checked against the loaded profiles when the pipeline
    /// is built.
    pub mask_profile: Option<String>,
    /// The reviewer key (`review.pub`) this destination's unmasked response bodies
    /// are sealed to (HPKE); loaded at config load, so a bad key refuses the config.
    pub seal_originals_to: Option<Arc<phigate_record::original::ReviewKey>>,
    /// The credential phigate presents to this upstream, in the apps' stead.
    pub upstream_auth: Option<upstream_auth::UpstreamAuth>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSection {
    pub listen_v4: SocketAddr,
    pub listen_v6: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub records_dir: PathBuf,
    pub policies_dir: PathBuf,
    /// The cgroup v2 directory the programs attach to; `None` = the cgroup2 root.
    pub cgroup: Option<PathBuf>,
    pub fail_mode: FailMode,
    /// SO_MARK of the agent's upstream sockets.
    pub mark: u32,
    /// Where links are pinned in bpffs (a per-cgroup subdirectory is used below it).
    pub bpf_pin_dir: PathBuf,
    pub log_format: LogFormat,
}

/// The admin side, apart from the data plane: the local socket reviewers and the CLI
/// talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSection {
    /// Unix socket of `phigate approvals` (and `phigate status`); callers are known by
    /// their peer credentials.
    pub socket: PathBuf,
    /// When set, the socket is 0660 and owned by this group; otherwise 0666 and every
    /// action is still authorized by the caller's uid and groups.
    pub socket_group: Option<String>,
    /// Base URL of the reviewer console, for links in notifications.
    pub console_url: Option<String>,
    /// The reviewer console's HTTPS listener (none: no console).
    pub console_listen: Option<SocketAddr>,
    /// The name its certificate is minted for (default: the listen address).
    pub console_name: Option<String>,
    /// Local console accounts (0600 TOML; see `phigate console hash-password`).
    pub console_accounts: Option<PathBuf>,
    /// Plain-HTTP listener of `GET /metrics` (Prometheus); none: no metrics listener.
    pub metrics_listen: Option<SocketAddr>,
}

// ---- raw, as written in TOML -------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    console_url: Option<String>,
    console_listen: Option<Spanned<String>>,
    console_name: Option<String>,
    console_accounts: Option<PathBuf>,
    metrics_listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgent {
    /// A string or a list of strings (untagged enums lose spans, so it is read raw).
    listen: Option<Spanned<toml::Value>>,
    state_dir: Option<PathBuf>,
    records_dir: Option<PathBuf>,
    policies_dir: Option<PathBuf>,
    cgroup: Option<Spanned<PathBuf>>,
    #[serde(default)]
    fail_mode: FailMode,
    mark: Option<Spanned<u32>>,
    bpf_pin_dir: Option<PathBuf>,
    #[serde(default)]
    log_format: LogFormat,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    connect_ms: Option<Spanned<u64>>,
    tls_handshake_ms: Option<Spanned<u64>>,
    idle_secs: Option<Spanned<u64>>,
    request_secs: Option<Spanned<u64>>,
    max_connection_lifetime_secs: Option<Spanned<u64>>,
    drain_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    max_header_bytes: Option<Spanned<u64>>,
    max_request_body_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDestination {
    name: Spanned<String>,
    addresses: Spanned<Vec<Spanned<String>>>,
    protocol: Protocol,
    upstream_ca: Option<PathBuf>,
    #[serde(default)]
    passthrough_hosts: Vec<String>,
    hosts: Option<Spanned<Vec<String>>>,
    alpn: Option<Spanned<Vec<String>>>,
    mask_profile: Option<Spanned<String>>,
    upstream_auth: Option<Spanned<upstream_auth::RawUpstreamAuth>>,
    seal_originals_to: Option<Spanned<PathBuf>>,
}

/// The destination protecting `addr`, with its index (the id the eBPF maps carry).
pub fn destination_for(
    destinations: &[Destination],
    addr: SocketAddr,
) -> Option<(u32, &Destination)> {
    // Longest prefix wins, as in the kernel's LPM trie.
    destinations
        .iter()
        .enumerate()
        .flat_map(|(i, d)| d.addresses.iter().map(move |a| (i, d, a)))
        .filter(|(_, _, a)| a.contains(addr))
        .max_by_key(|(_, _, a)| a.net.prefix_len())
        .map(|(i, d, _)| (i as u32, d))
}

/// Why an IPv6 destination address cannot be protected as written, if it cannot.
/// IPv4-mapped networks (`::ffff:a.b.c.d`) are IPv4 destinations; NAT64 forms
/// (`64:ff9b::a.b.c.d`) of a protected IPv4 address are protected with it, so they are
/// written as that IPv4 address; anything else IPv6 needs an IPv6 listener, or native
/// IPv6 connects to it could not be redirected.
fn ipv6_problem(pa: &ProtectedAddr, have_v6_listener: bool) -> Option<String> {
    let IpNet::V6(net) = pa.net else { return None };
    let mapped: ipnet::Ipv6Net = "::ffff:0:0/96".parse().expect("valid");
    let nat64: ipnet::Ipv6Net = "64:ff9b::/96".parse().expect("valid");
    if mapped.contains(&net) {
        return None;
    }
    if nat64.contains(&net) || net.contains(&nat64) {
        let seg = net.addr().segments();
        let v4 = std::net::Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        return Some(format!(
            "{pa} is a NAT64 (64:ff9b::/96) form of an IPv4 address: list the IPv4 address it embeds (e.g. {v4}:{}); phigate protects both forms of every protected IPv4 address",
            pa.port
        ));
    }
    if !have_v6_listener {
        return Some(format!(
            "{pa} is an IPv6 destination but [agent] listen has no IPv6 address: native IPv6 connects to it could not be redirected; add one (e.g. listen = [\"127.0.0.1:15001\", \"[::1]:15001\"])"
        ));
    }
    None
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// A TOML file being read (the config, approvals.toml, console accounts): every
/// error names its path, the line of the span and the key, the same way.
pub(crate) struct TomlSource<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> TomlSource<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str) -> TomlSource<'a> {
        TomlSource { path, text }
    }

    /// The file as `T`; a TOML error keeps the first line of its message and its line.
    pub(crate) fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            // toml's message is multi-line with a source excerpt; keep its first line.
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_owned();
            self.err(e.span(), None, message)
        })
    }

    pub(crate) fn err(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line: span.map(|s| line_of(self.text, s.start)),
            key,
            message,
        }
    }

    /// A path of the file, relative to the file's own directory.
    pub(crate) fn resolve(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

/// `[agent]`, validated: loopback listeners on fixed ports, absolute cgroup, a
/// non-zero mark.
pub(crate) fn agent_section(
    src: &TomlSource<'_>,
    raw: Option<Spanned<RawAgent>>,
) -> Result<AgentSection, ConfigError> {
    let raw_agent = raw.map(Spanned::into_inner).unwrap_or_default();
    let (listen_v4, listen_v6) = match raw_agent.listen {
        None => (
            "127.0.0.1:15001".parse().expect("valid literal"),
            Some("[::1]:15001".parse().expect("valid literal")),
        ),
        Some(listen) => {
            let span = listen.span();
            let not_strings = || {
                src.err(
                    Some(span.clone()),
                    Some("agent.listen".into()),
                    "must be a string or a list of strings like \"127.0.0.1:15001\"".into(),
                )
            };
            let items: Vec<String> = match listen.into_inner() {
                toml::Value::String(s) => vec![s],
                toml::Value::Array(a) => a
                    .into_iter()
                    .map(|v| v.as_str().map(str::to_owned).ok_or_else(not_strings))
                    .collect::<Result<_, _>>()?,
                _ => return Err(not_strings()),
            };
            let mut v4 = None;
            let mut v6 = None;
            for item in items {
                let addr: SocketAddr = item.parse().map_err(|_| {
                    src.err(
                        Some(span.clone()),
                        Some("agent.listen".into()),
                        format!(
                            "`{item}` is not ADDRESS:PORT (e.g. \"127.0.0.1:15001\" or \"[::1]:15001\")"
                        ),
                    )
                })?;
                if addr.port() == 0 {
                    return Err(src.err(
                        Some(span.clone()),
                        Some("agent.listen".into()),
                        "the listener needs a fixed port (the redirect points at it)".into(),
                    ));
                }
                let slot = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
                if slot.replace(addr).is_some() {
                    return Err(src.err(
                        Some(span.clone()),
                        Some("agent.listen".into()),
                        "at most one IPv4 and one IPv6 listener".into(),
                    ));
                }
            }
            let v4 = v4.ok_or_else(|| {
                src.err(
                    None,
                    Some("agent.listen".into()),
                    "an IPv4 listener is required (IPv4 and IPv4-mapped connects go to it)".into(),
                )
            })?;
            (v4, v6)
        }
    };
    for addr in std::iter::once(listen_v4).chain(listen_v6) {
        if !addr.ip().is_loopback() {
            return Err(src.err(
                None,
                Some("agent.listen".into()),
                format!("{addr} is not a loopback address; the agent listens on loopback only so redirected traffic never leaves the host"),
            ));
        }
    }

    let state_dir = raw_agent
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/phigate"));
    let records_dir = raw_agent
        .records_dir
        .unwrap_or_else(|| state_dir.join("records"));
    let policies_dir = raw_agent
        .policies_dir
        .unwrap_or_else(|| PathBuf::from("/etc/phigate/policies"));
    let cgroup = match raw_agent.cgroup {
        None => None,
        Some(c) => {
            if !c.get_ref().is_absolute() {
                return Err(src.err(
                    Some(c.span()),
                    Some("agent.cgroup".into()),
                    "must be an absolute path to a cgroup v2 directory".into(),
                ));
            }
            Some(c.into_inner())
        }
    };
    let mark = match raw_agent.mark {
        None => phigate_common::DEFAULT_AGENT_MARK,
        Some(m) if *m.get_ref() == 0 => {
            return Err(src.err(
                Some(m.span()),
                Some("agent.mark".into()),
                "0 is every unmarked socket's mark; choose a non-zero mark".into(),
            ))
        }
        Some(m) => m.into_inner(),
    };
    Ok(AgentSection {
        listen_v4,
        listen_v6,
        state_dir,
        records_dir,
        policies_dir,
        cgroup,
        fail_mode: raw_agent.fail_mode,
        mark,
        bpf_pin_dir: raw_agent
            .bpf_pin_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/phigate")),
        log_format: raw_agent.log_format,
    })
}

/// `[timeouts]`, validated.
pub(crate) fn timeouts_section(
    src: &TomlSource<'_>,
    raw: Option<RawTimeouts>,
) -> Result<Timeouts, ConfigError> {
    Ok(match raw {
        None => Timeouts::default(),
        Some(t) => {
            let d = Timeouts::default();
            let pos = |v: Option<Spanned<u64>>,
                       key: &str,
                       unit: fn(u64) -> Duration,
                       default: Duration|
             -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(v) if *v.get_ref() == 0 => Err(src.err(
                        Some(v.span()),
                        Some(format!("timeouts.{key}")),
                        "must be greater than 0".into(),
                    )),
                    Some(v) => Ok(unit(v.into_inner())),
                }
            };
            Timeouts {
                connect: pos(t.connect_ms, "connect_ms", Duration::from_millis, d.connect)?,
                tls_handshake: pos(
                    t.tls_handshake_ms,
                    "tls_handshake_ms",
                    Duration::from_millis,
                    d.tls_handshake,
                )?,
                idle: pos(t.idle_secs, "idle_secs", Duration::from_secs, d.idle)?,
                request: pos(
                    t.request_secs,
                    "request_secs",
                    Duration::from_secs,
                    d.request,
                )?,
                max_connection_lifetime: pos(
                    t.max_connection_lifetime_secs,
                    "max_connection_lifetime_secs",
                    Duration::from_secs,
                    d.max_connection_lifetime,
                )?,
                drain: pos(t.drain_secs, "drain_secs", Duration::from_secs, d.drain)?,
            }
        }
    })
}

/// `[limits]`, validated.
pub(crate) fn limits_section(
    src: &TomlSource<'_>,
    raw: Option<RawLimits>,
) -> Result<Limits, ConfigError> {
    Ok(match raw {
        None => Limits::default(),
        Some(l) => {
            let d = Limits::default();
            let max_header_bytes = match l.max_header_bytes {
                None => d.max_header_bytes,
                Some(v) if !(8192..=1 << 20).contains(v.get_ref()) => {
                    return Err(src.err(
                        Some(v.span()),
                        Some("limits.max_header_bytes".into()),
                        "must be between 8192 and 1048576".into(),
                    ))
                }
                Some(v) => v.into_inner() as usize,
            };
            let max_request_body_bytes = match l.max_request_body_bytes {
                None => d.max_request_body_bytes,
                Some(v) if *v.get_ref() == 0 => {
                    return Err(src.err(
                        Some(v.span()),
                        Some("limits.max_request_body_bytes".into()),
                        "must be greater than 0".into(),
                    ))
                }
                Some(v) => v.into_inner(),
            };
            Limits {
                max_header_bytes,
                max_request_body_bytes,
            }
        }
    })
}

/// `[[destinations]]`, validated: unique names, addresses protected once, never
/// the agent's own listeners (`listen_v4`, `listen_v6`).
pub(crate) fn destinations_section(
    src: &TomlSource<'_>,
    raw: Vec<Spanned<RawDestination>>,
    listen_v4: SocketAddr,
    listen_v6: Option<SocketAddr>,
) -> Result<Vec<Destination>, ConfigError> {
    let mut destinations = Vec::with_capacity(raw.len());
    let mut seen: Vec<(ProtectedAddr, String)> = Vec::new();
    for (i, d) in raw.into_iter().enumerate() {
        let dspan = d.span();
        let d = d.into_inner();
        let name = d.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err(src.err(
                Some(d.name.span()),
                Some(format!("destinations[{i}].name")),
                "must not be empty".into(),
            ));
        }
        if destinations.iter().any(|x: &Destination| x.name == name) {
            return Err(src.err(
                Some(d.name.span()),
                Some(format!("destinations[{i}].name")),
                format!("`{name}` is used by another destination; names must be unique"),
            ));
        }
        if d.addresses.get_ref().is_empty() {
            return Err(src.err(
                Some(d.addresses.span()),
                Some(format!("destinations[{i}].addresses")),
                "at least one ADDRESS[/PREFIX]:PORT is required".into(),
            ));
        }
        let mut addresses = Vec::new();
        for (j, a) in d.addresses.into_inner().into_iter().enumerate() {
            let key = format!("destinations[{i}].addresses[{j}]");
            let pa = ProtectedAddr::parse(a.get_ref())
                .map_err(|m| src.err(Some(a.span()), Some(key.clone()), m))?;
            if let Some((_, other)) = seen.iter().find(|(s, _)| *s == pa) {
                return Err(src.err(
                    Some(a.span()),
                    Some(key),
                    format!("{pa} is already protected by destination `{other}`"),
                ));
            }
            if let Some(reason) = ipv6_problem(&pa, listen_v6.is_some()) {
                return Err(src.err(Some(a.span()), Some(key), reason));
            }
            if pa.contains(listen_v4) || listen_v6.is_some_and(|l| pa.contains(l)) {
                return Err(src.err(
                    Some(a.span()),
                    Some(key),
                    format!("{pa} covers the agent's own listener; that would redirect the agent to itself"),
                ));
            }
            seen.push((pa.clone(), name.clone()));
            addresses.push(pa);
        }
        let alpn = match d.alpn {
            None => vec!["h2".to_owned(), "http/1.1".to_owned()],
            Some(a) => {
                for p in a.get_ref() {
                    if p != "h2" && p != "http/1.1" {
                        return Err(src.err(
                            Some(a.span()),
                            Some(format!("destinations[{i}].alpn")),
                            format!("`{p}` is not a supported ALPN protocol (use \"h2\" and/or \"http/1.1\")"),
                        ));
                    }
                }
                if a.get_ref().is_empty() {
                    return Err(src.err(
                        Some(a.span()),
                        Some(format!("destinations[{i}].alpn")),
                        "must list at least one protocol".into(),
                    ));
                }
                a.into_inner()
            }
        };
        if d.protocol == Protocol::Tcp && !d.passthrough_hosts.is_empty() {
            return Err(src.err(
                Some(dspan),
                Some(format!("destinations[{i}].passthrough_hosts")),
                "only meaningful for protocol = \"https\" (a tcp destination is never intercepted)"
                    .into(),
            ));
        }
        let hosts = hosts_of(src, i, d.protocol, d.hosts)?;
        let upstream_ca = d.upstream_ca.map(|p| src.resolve(p));
        let upstream_auth = d
            .upstream_auth
            .map(|a| upstream_auth::upstream_auth_section(src, i, d.protocol, a))
            .transpose()?;
        let seal_originals_to = match d.seal_originals_to {
            None => None,
            Some(p) => {
                let span = p.span();
                let path = src.resolve(p.into_inner());
                let key = phigate_record::original::ReviewKey::load(&path).map_err(|e| {
                    src.err(
                        Some(span),
                        Some(format!("destinations[{i}].seal_originals_to")),
                        e.to_string(),
                    )
                })?;
                Some(Arc::new(key))
            }
        };
        destinations.push(Destination {
            upstream_auth,
            seal_originals_to,
            name,
            addresses,
            protocol: d.protocol,
            upstream_ca,
            passthrough_hosts: d
                .passthrough_hosts
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            hosts,
            alpn,
            mask_profile: match d.mask_profile {
                None => None,
                Some(p) if d.protocol == Protocol::Tcp => {
                    return Err(src.err(
                        Some(p.span()),
                        Some(format!("destinations[{i}].mask_profile")),
                        "a tcp destination's bytes are not inspected, so they cannot be masked"
                            .into(),
                    ))
                }
                Some(p) => Some(p.into_inner()),
            },
        });
    }
    Ok(destinations)
}

/// A destination's `hosts`: host names (or `*.` and a name), lower case; none: any.
fn hosts_of(
    src: &TomlSource<'_>,
    i: usize,
    protocol: Protocol,
    hosts: Option<Spanned<Vec<String>>>,
) -> Result<Arc<[String]>, ConfigError> {
    Ok(match hosts {
        None => Arc::from([]),
        Some(h) => {
            let span = h.span();
            let field = format!("destinations[{i}].hosts");
            if protocol == Protocol::Tcp {
                return Err(src.err(
                    Some(span),
                    Some(field),
                    "only meaningful for HTTP destinations (a tcp destination has no Host)".into(),
                ));
            }
            let mut names = Vec::new();
            for name in h.into_inner() {
                let name = name.to_ascii_lowercase();
                let bare = name.strip_prefix("*.").unwrap_or(&name);
                if bare.is_empty()
                    || bare.contains('*')
                    || http::uri::Authority::try_from(bare)
                        .map_or(true, |a| a.port().is_some() || a.host() != bare)
                {
                    return Err(src.err(
                        Some(span.clone()),
                        Some(field),
                        format!("`{name}` is not a host name (a name, or `*.` and a name)"),
                    ));
                }
                names.push(name);
            }
            if names.is_empty() {
                return Err(src.err(
                    Some(span),
                    Some(field),
                    "must list at least one name (leave it out to serve any)".into(),
                ));
            }
            names.into()
        }
    })
}

/// `[admin]`, validated.
pub(crate) fn admin_section(
    src: &TomlSource<'_>,
    raw: Option<RawAdmin>,
) -> Result<AdminSection, ConfigError> {
    let raw_admin = raw.unwrap_or_default();
    let console_listen = match &raw_admin.console_listen {
        None => None,
        Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|e| {
            src.err(
                Some(v.span()),
                Some("admin.console_listen".into()),
                format!("`{}`: {e} (expected ADDRESS:PORT)", v.get_ref()),
            )
        })?),
    };
    let metrics_listen = match &raw_admin.metrics_listen {
        None => None,
        Some(v) => Some(v.get_ref().parse::<SocketAddr>().map_err(|e| {
            src.err(
                Some(v.span()),
                Some("admin.metrics_listen".into()),
                format!("`{}`: {e} (expected ADDRESS:PORT)", v.get_ref()),
            )
        })?),
    };
    if console_listen.is_some() && raw_admin.console_accounts.is_none() {
        return Err(src.err(
            raw_admin.console_listen.as_ref().map(|v| v.span()),
            Some("admin.console_accounts".into()),
            "the console needs an accounts file (console_accounts)".into(),
        ));
    }
    let console_url = raw_admin.console_url.or_else(|| {
        console_listen.map(|a| {
            let host = raw_admin
                .console_name
                .clone()
                .unwrap_or_else(|| match a.ip() {
                    IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                });
            format!("https://{host}:{}", a.port())
        })
    });
    Ok(AdminSection {
        socket: raw_admin
            .socket
            .map(|p| src.resolve(p))
            .unwrap_or_else(|| PathBuf::from("/run/phigate/admin.sock")),
        socket_group: raw_admin.socket_group,
        console_url,
        console_listen,
        console_name: raw_admin.console_name,
        console_accounts: raw_admin.console_accounts.map(|p| src.resolve(p)),
        metrics_listen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/phigate/test.toml"), text)
    }

    #[test]
    fn single_listen_string_and_defaults() {
        let c = parse("[agent]\nlisten = \"127.0.0.1:16000\"\n").unwrap();
        assert_eq!(c.agent.listen_v6, None);
        assert_eq!(
            c.agent.records_dir,
            PathBuf::from("/var/lib/phigate/records")
        );
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.destinations.is_empty());
    }

    #[test]
    fn a_bad_review_key_refuses_the_config_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("review.pub");
        std::fs::write(&bad, "not a key\n").unwrap();
        let dest = |path: &Path| {
            format!(
                "[[destinations]]\nname = \"api\"\naddresses = [\"127.0.0.2:443\"]\nprotocol = \"https\"\nseal_originals_to = \"{}\"\n",
                path.display()
            )
        };
        for path in [bad.clone(), dir.path().join("missing.pub")] {
            let e = parse(&dest(&path)).unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some("destinations[0].seal_originals_to"),
                "{e}"
            );
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
        let (_, public) = phigate_record::original::generate();
        std::fs::write(&bad, public).unwrap();
        let c = parse(&dest(&bad)).unwrap();
        assert!(c.destinations[0].seal_originals_to.is_some());
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[agent]\nlisten = \"127.0.0.1:15001\"\nfail_mod = \"open\"\n").unwrap_err();
        let s = e.to_string();
        assert_eq!(e.line, Some(3), "{s}");
        assert!(s.starts_with("/etc/phigate/test.toml:3"), "{s}");
        assert!(s.contains("fail_mod"), "{s}");
    }

    #[test]
    fn records_shipping_is_checked_where_it_is_written() {
        let ok = "[records.shipping]\nendpoint = \"https://s3.example.org/\"\nbucket = \"b\"\nprefix = \"/p/\"\naccess_key_file = \"id\"\nsecret_key_file = \"secret\"\nmax_unshipped_secs = 60\n";
        let c = parse(ok).unwrap();
        let sh = c.records.shipping.expect("shipping");
        assert_eq!(sh.endpoint, "https://s3.example.org");
        assert_eq!(sh.prefix, "p");
        assert_eq!(sh.region, "us-east-1");
        assert_eq!(sh.access_key_file, Some(PathBuf::from("/etc/phigate/id")));
        assert_eq!(sh.max_unshipped, Some(std::time::Duration::from_secs(60)));
        let e = parse("[records.shipping]\nendpoint = \"http://10.0.0.5:9000\"\nbucket = \"b\"\n")
            .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("records.shipping.endpoint"));
        assert!(e.message.contains("loopback"), "{e}");
        assert!(parse(
            "[records.shipping]\nendpoint = \"http://127.0.0.1:9000\"\nbucket = \"b\"\n"
        )
        .is_ok());
        let e = parse("[records.shipping]\nendpoint = \"https://s3\"\nbucket = \"b\"\naccess_key_file = \"id\"\n")
            .unwrap_err();
        assert!(e.message.contains("go together"), "{e}");
    }

    #[test]
    fn records_shipping_encryption_and_object_lock_are_checked_naming_the_field() {
        use crate::record::config::Sse;
        let base = "[records.shipping]\nendpoint = \"https://s3.example.org\"\nbucket = \"b\"\n";
        let c = parse(&format!(
            "{base}sse = \"AES256\"\nobject_lock_days = 2190\n"
        ))
        .unwrap();
        let sh = c.records.shipping.unwrap();
        assert_eq!(sh.sse, Some(Sse::Aes256));
        assert_eq!(sh.object_lock_days, Some(2190));
        let c = parse(&format!(
            "{base}sse = \"aws:kms\"\nsse_kms_key_id = \"arn:aws:kms:eu-west-1:1:key/k\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.records.shipping.unwrap().sse,
            Some(Sse::Kms {
                key_id: Some("arn:aws:kms:eu-west-1:1:key/k".into())
            })
        );
        let c = parse(&format!("{base}sse = \"aws:kms\"\n")).unwrap();
        assert_eq!(
            c.records.shipping.unwrap().sse,
            Some(Sse::Kms { key_id: None })
        );
        let c = parse(base).unwrap();
        let sh = c.records.shipping.unwrap();
        assert_eq!((sh.sse, sh.object_lock_days), (None, None));
        for (extra, field, says) in [
            (
                "sse = \"aes256\"\n",
                "sse",
                "expected \"AES256\" or \"aws:kms\"",
            ),
            ("sse = \"sse-c\"\n", "sse", "expected"),
            (
                "sse_kms_key_id = \"k\"\n",
                "sse_kms_key_id",
                "goes with sse",
            ),
            (
                "sse = \"AES256\"\nsse_kms_key_id = \"k\"\n",
                "sse_kms_key_id",
                "goes with sse",
            ),
            (
                "sse = \"aws:kms\"\nsse_kms_key_id = \" \"\n",
                "sse_kms_key_id",
                "empty",
            ),
            (
                "object_lock_days = 0\n",
                "object_lock_days",
                "between 1 and 36500",
            ),
            (
                "object_lock_days = 36501\n",
                "object_lock_days",
                "between 1 and 36500",
            ),
        ] {
            let e = parse(&format!("{base}{extra}")).unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some(format!("records.shipping.{field}").as_str()),
                "{extra}: {e}"
            );
            assert_eq!(e.line, Some(3 + extra.lines().count()), "{extra}: {e}");
            assert!(e.message.contains(says), "{extra}: {e}");
        }
    }

    #[test]
    fn records_siem_is_checked_where_it_is_written() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("phigate.toml");
        let parse = |text: &str| Config::parse(&file, text);
        let ck = rcgen::generate_simple_self_signed(vec!["siem.test".into()]).unwrap();
        std::fs::write(d.path().join("ca.pem"), ck.cert.pem()).unwrap();
        std::fs::write(d.path().join("client.pem"), ck.cert.pem()).unwrap();
        let key = d.path().join("client.key");
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(d.path().join("empty.pem"), "").unwrap();

        let ok = "[records.siem]\naddress = \"siem.test:6514\"\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\nfacility = \"local4\"\napp_name = \"phigate-ward\"\nbuffer_records = 10\n";
        let si = parse(ok).unwrap().records.siem.expect("siem");
        assert_eq!((si.host.as_str(), si.port), ("siem.test", 6514));
        assert_eq!(si.server_name, "siem.test");
        assert_eq!(si.ca_file, d.path().join("ca.pem"));
        assert_eq!((si.facility, si.buffer_records), (20, 10));
        let si = parse("[records.siem]\naddress = \"[::1]:6514\"\nca_file = \"ca.pem\"\n")
            .unwrap()
            .records
            .siem
            .unwrap();
        assert_eq!((si.server_name.as_str(), si.facility), ("::1", 13));
        assert_eq!(si.app_name, "phigate");

        let bad = |text: &str, key: &str, what: &str| {
            let e = parse(&format!("[records.siem]\n{text}")).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with(&file.display().to_string()), "{s}");
            assert_eq!(e.key.as_deref(), Some(key), "{s}");
            assert!(s.contains(what), "{s}");
        };
        bad(
            "address = \"siem.test\"\nca_file = \"ca.pem\"\n",
            "records.siem.address",
            "HOST:PORT",
        );
        bad(
            "address = \"::1:6514\"\nca_file = \"ca.pem\"\n",
            "records.siem.address",
            "HOST:PORT",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"none.pem\"\n",
            "records.siem.ca_file",
            "cannot read",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"empty.pem\"\n",
            "records.siem.ca_file",
            "no certificate",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"ca.pem\"\nfacility = \"loud\"\n",
            "records.siem.facility",
            "local7",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"ca.pem\"\napp_name = \"a b\"\n",
            "records.siem.app_name",
            "APP-NAME",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"ca.pem\"\nbuffer_records = 0\n",
            "records.siem.buffer_records",
            "between 1",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\n",
            "records.siem.client_cert_file",
            "neither",
        );
        bad(
            "address = \"h:6514\"\nca_file = \"ca.pem\"\nserver_name = \"a b\"\n",
            "records.siem.server_name",
            "DNS name",
        );
        let e =
            parse("[records.siem]\naddress = \"h:6514\"\nca_file = \"ca.pem\"\nverify = false\n")
                .unwrap_err();
        assert!(
            e.message.contains("unknown field") && e.message.contains("verify"),
            "{e}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        bad("address = \"h:6514\"\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\n", "records.siem.client_key_file", "chmod 600");
    }

    #[test]
    fn records_otlp_is_checked_where_it_is_written() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("phigate.toml");
        let parse = |text: &str| Config::parse(&file, text);
        let ck = rcgen::generate_simple_self_signed(vec!["otel.test".into()]).unwrap();
        std::fs::write(d.path().join("ca.pem"), ck.cert.pem()).unwrap();
        std::fs::write(d.path().join("client.pem"), ck.cert.pem()).unwrap();
        let key = d.path().join("client.key");
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let headers = d.path().join("headers");
        std::fs::write(&headers, "# key\nX-Api-Key: SECRET-VALUE\n\n").unwrap();
        std::fs::set_permissions(&headers, std::fs::Permissions::from_mode(0o600)).unwrap();
        let bad_headers = d.path().join("bad-headers");
        std::fs::write(&bad_headers, "X-Api-Key SECRET-VALUE\n").unwrap();
        std::fs::set_permissions(&bad_headers, std::fs::Permissions::from_mode(0o600)).unwrap();

        let ok = "[records.otlp]\nendpoint = \"https://otel.test:4318\"\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\nheaders_file = \"headers\"\nbuffer_records = 10\nbatch_records = 3\n";
        let o = parse(ok).unwrap().records.otlp.expect("otlp");
        assert_eq!(o.url, "https://otel.test:4318/v1/logs");
        assert_eq!(o.ca_file, Some(d.path().join("ca.pem")));
        assert_eq!(o.headers_file, Some(headers.clone()));
        assert_eq!((o.buffer_records, o.batch_records), (10, 3));
        assert!(o.client_cert.is_some());
        // A path is kept; plain http to loopback needs no CA.
        let o = parse("[records.otlp]\nendpoint = \"http://127.0.0.1:4318/otlp/v1/logs\"\n")
            .unwrap()
            .records
            .otlp
            .unwrap();
        assert_eq!(o.url, "http://127.0.0.1:4318/otlp/v1/logs");
        assert_eq!((o.ca_file, o.batch_records), (None, 512));

        let bad = |text: &str, key: &str, what: &str| {
            let e = parse(&format!("[records.otlp]\n{text}")).unwrap_err();
            let s = e.to_string();
            assert!(s.starts_with(&file.display().to_string()), "{s}");
            assert_eq!(e.key.as_deref(), Some(key), "{s}");
            assert!(s.contains(what), "{s}");
            assert!(!s.contains("SECRET-VALUE"), "{s}");
        };
        let ca = "ca_file = \"ca.pem\"\n";
        bad(
            &format!("endpoint = \"http://10.0.0.1:4318\"\n{ca}"),
            "records.otlp.endpoint",
            "loopback",
        );
        bad(
            &format!("endpoint = \"otel.test:4318\"\n{ca}"),
            "records.otlp.endpoint",
            "https",
        );
        bad(
            &format!("endpoint = \"https://otel.test/v1/logs?x=1\"\n{ca}"),
            "records.otlp.endpoint",
            "no query",
        );
        bad(
            "endpoint = \"https://otel.test\"\n",
            "records.otlp.ca_file",
            "required",
        );
        bad(
            "endpoint = \"https://otel.test\"\nca_file = \"none.pem\"\n",
            "records.otlp.ca_file",
            "cannot read",
        );
        let e = "endpoint = \"https://otel.test\"\n";
        bad(
            &format!("{e}{ca}buffer_records = 0\n"),
            "records.otlp.buffer_records",
            "between 1",
        );
        bad(
            &format!("{e}{ca}batch_records = 100000\n"),
            "records.otlp.batch_records",
            "between 1",
        );
        bad(
            &format!("{e}{ca}client_key_file = \"client.key\"\n"),
            "records.otlp.client_cert_file",
            "neither",
        );
        bad(
            &format!("{e}{ca}headers_file = \"bad-headers\"\n"),
            "records.otlp.headers_file",
            "line 1: expected `Name: value`",
        );
        std::fs::set_permissions(&headers, std::fs::Permissions::from_mode(0o644)).unwrap();
        bad(
            &format!("{e}{ca}headers_file = \"headers\"\n"),
            "records.otlp.headers_file",
            "chmod 600",
        );
        let err = parse(&format!("[records.otlp]\n{e}{ca}verify = false\n")).unwrap_err();
        assert!(
            err.message.contains("unknown field") && err.message.contains("verify"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        bad(
            &format!(
                "{e}{ca}client_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\n"
            ),
            "records.otlp.client_key_file",
            "chmod 600",
        );
    }

    #[test]
    fn bad_fail_mode_value() {
        let e = parse("[agent]\nfail_mode = \"sometimes\"\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(
            e.message.contains("sometimes") || e.message.contains("variant"),
            "{e}"
        );
    }

    #[test]
    fn bad_address_points_at_its_line_and_key() {
        let text = "[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\n  \"127.0.0.2:9443\",\n  \"10.20.0.0/33:443\",\n]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert_eq!(e.key.as_deref(), Some("destinations[0].addresses[1]"));
        assert!(e.message.contains("CIDR"), "{e}");
    }

    #[test]
    fn address_errors() {
        for (addr, needle) in [
            ("127.0.0.2", "no port"),
            ("127.0.0.2:http", "not a port"),
            ("127.0.0.2:0", "port 0"),
            ("api.example.org:443", "not an IP address"),
            ("10.20.1.0/16:443", "host bits"),
        ] {
            let e = ProtectedAddr::parse(addr).unwrap_err();
            assert!(e.contains(needle), "{addr}: {e}");
        }
    }

    #[test]
    fn duplicate_address_and_name_rejected() {
        let text = "[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.2:1\"]\n[[destinations]]\nname = \"b\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.2:1\"]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(8));
        assert!(
            e.message.contains("already protected by destination `a`"),
            "{e}"
        );
        let text = "[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.2:1\"]\n[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.3:1\"]\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(6));
        assert!(e.message.contains("unique"), "{e}");
    }

    #[test]
    fn listener_must_be_loopback_and_not_protected() {
        let e = parse("[agent]\nlisten = \"0.0.0.0:15001\"\n").unwrap_err();
        assert!(e.message.contains("loopback"), "{e}");
        let e = parse("[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"127.0.0.0/8:15001\"]\n").unwrap_err();
        assert!(e.message.contains("agent's own listener"), "{e}");
    }

    #[test]
    fn zero_timeout_and_mark_rejected() {
        let e = parse("[timeouts]\nidle_secs = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("timeouts.idle_secs"));
        assert_eq!(e.line, Some(2));
        let e = parse("[agent]\nmark = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("agent.mark"));
    }

    #[test]
    fn protocol_values() {
        for (p, want) in [
            ("tcp", Protocol::Tcp),
            ("https", Protocol::Https),
            ("http", Protocol::Http),
            ("http-to-https", Protocol::HttpToHttps),
        ] {
            let c = parse(&format!(
                "[[destinations]]\nname = \"a\"\nprotocol = \"{p}\"\naddresses = [\"127.0.0.2:1\"]\n"
            ))
            .unwrap();
            assert_eq!(c.destinations[0].protocol, want);
        }
        let e = parse(
            "[[destinations]]\nname = \"a\"\nprotocol = \"udp\"\naddresses = [\"127.0.0.2:1\"]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn ipv6_destinations_need_an_ipv6_listener_and_nat64_forms_are_refused() {
        let v4_only = "[agent]\nlisten = [\"127.0.0.1:15001\"]\n[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\n  \"127.0.0.2:1\",\n  \"[fd00::1]:443\",\n]\n";
        let e = parse(v4_only).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(8), Some("destinations[0].addresses[1]"))
        );
        assert!(e.message.contains("no IPv6 address"), "{e}");
        // v4-mapped is IPv4: fine without an IPv6 listener.
        parse(&v4_only.replace("[fd00::1]:443", "[::ffff:10.0.0.0/104]:443")).unwrap();
        // With an IPv6 listener, native IPv6 destinations are fine.
        parse(&v4_only.replace(
            "\"127.0.0.1:15001\"]",
            "\"127.0.0.1:15001\", \"[::1]:15001\"]",
        ))
        .unwrap();
        let e = parse(&v4_only.replace("[fd00::1]:443", "[64:ff9b::a00:1]:443")).unwrap_err();
        assert!(e.message.contains("10.0.0.1:443"), "{e}");
    }

    #[test]
    fn destination_hosts_are_names_and_only_for_http() {
        let dest = |extra: &str, protocol: &str| {
            parse(&format!(
                "[[destinations]]\nname = \"a\"\nprotocol = \"{protocol}\"\naddresses = [\"127.0.0.2:443\"]\n{extra}\n"
            ))
        };
        let c = dest("hosts = [\"API.test\", \"*.fhir.test\"]", "https").unwrap();
        assert_eq!(&*c.destinations[0].hosts, ["api.test", "*.fhir.test"]);
        assert!(dest("", "https").unwrap().destinations[0].hosts.is_empty());
        for bad in [
            "\"a b\"",
            "\"api.test:443\"",
            "\"*\"",
            "\"a.*.test\"",
            "\"\"",
        ] {
            let e = dest(&format!("hosts = [{bad}]"), "https").unwrap_err();
            assert_eq!(
                e.key.as_deref(),
                Some("destinations[0].hosts"),
                "{bad}: {e}"
            );
            assert_eq!(e.line, Some(5), "{bad}: {e}");
        }
        let e = dest("hosts = []", "https").unwrap_err();
        assert!(e.message.contains("at least one"), "{e}");
        let e = dest("hosts = [\"a.test\"]", "tcp").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("destinations[0].hosts"));
    }
}
