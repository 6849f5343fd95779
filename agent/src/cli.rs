//! The `phigate` command line.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, DEFAULT_CONFIG_PATH};
use crate::settings::Config;

#[derive(Parser)]
#[command(
    name = "phigate",
    version,
    about = "Transparent, auditable gateway for APIs that return protected health information"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what the systemd unit starts).
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Remove the redirect programs this config attached (they stay pinned after the agent stops).
    Detach {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Remove every phigate pin under the config's bpf_pin_dir, for all cgroups.
        #[arg(long)]
        all: bool,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Auditor tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Authorization policies (Cedar) in policies_dir.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The local certificate authority clients must trust.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The reviewer console.
    Console {
        #[command(subcommand)]
        command: ConsoleCommand,
    },
    /// Review requests held for approval (over the running agent's admin socket; you
    /// are known by your login and groups).
    Approvals {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH, global = true)]
        config: PathBuf,
        /// The admin socket; default: the config's [admin] socket.
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// The running agent's state: redirect, destinations, policy set, records,
    /// approvals, counters (from its admin socket).
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The admin socket; default: the config's [admin] socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mask a JSON, NDJSON or FHIR XML (.xml) file with a masking profile; the result
    /// goes to stdout.
    Mask {
        /// The profile (a file name in <policies_dir>/profiles, without .toml).
        #[arg(long, short)]
        profile: String,
        /// The directory holding profiles/ (default: the config's policies_dir).
        #[arg(long)]
        policies_dir: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The file is NDJSON (default: by its extension, .ndjson or .jsonl; .xml is FHIR XML).
        #[arg(long)]
        ndjson: bool,
        /// `stream` (the agent's single-pass transform) or `dom` (serde_json
        /// parse, mask, serialize: the benchmark's peer).
        #[arg(long, default_value = "stream")]
        engine: String,
        /// Print throughput, peak memory and the masked count to stderr.
        #[arg(long)]
        stats: bool,
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConsoleCommand {
    /// Read a password on standard input, print its Argon2id hash for an accounts file.
    HashPassword,
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Open approvals you may review.
    List,
    /// One approval in full (JSON).
    Show { id: String },
    /// Approve a request (a reason is required and recorded).
    Approve {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Deny a request (a reason is required and recorded).
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Print the pseudonym under which records hold a patient id (to query by patient).
    Pseudonym {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The patient id as it appears in request paths (e.g. the FHIR Patient id).
        value: String,
    },
    /// Check the records against their signed manifests and hash chains, and against
    /// the signed heads shipped off the host. Exits 1 with a report of every altered,
    /// deleted, inserted, reordered, truncated or rolled-back row, file or table.
    Verify(Box<VerifyArgs>),
    /// Print the public key that verifies this host's records (give it to auditors).
    Pubkey {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// On the reviewer's machine: make a review key pair for sealed originals,
    /// `review.key` (private, 0600: keep it off the host) and `review.pub` (for the
    /// host's `seal_originals_to`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// On the reviewer's machine: print the original response body sealed for a
    /// request (from a copy of the records), opened with `review.key`.
    Unseal {
        /// The reviewer's private key (`phigate audit keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The records directory (a copy works too).
        #[arg(long, default_value = "/var/lib/phigate/records")]
        records: PathBuf,
        #[arg(long)]
        request_id: String,
    },
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// The records directory (a copy works too), or `s3://bucket/prefix` to verify every
    /// host shipped there (with --endpoint and --keys); default: the config's records_dir.
    dir: Option<PathBuf>,
    /// The records public key (`phigate audit pubkey`); default: from the config's state_dir.
    #[arg(long)]
    pubkey: Option<PathBuf>,
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Compare with the heads shipped to this store (`s3://bucket/prefix`) instead of
    /// the config's [records.shipping]; credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY.
    #[arg(long, conflicts_with = "local_only")]
    remote: Option<String>,
    /// The object store's URL (https://, or http:// to loopback), for --remote or s3://.
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Whose records these are in the store; default: the host the signed list of
    /// tables (_heads.json) names.
    #[arg(long)]
    host: Option<String>,
    /// Check only the records here, without the off-host anchor.
    #[arg(long)]
    local_only: bool,
    /// For `s3://bucket/prefix`: a directory of `<host>.pub` public keys, one for
    /// every host that must be in the store.
    #[arg(long)]
    keys: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Print the CA certificate (PEM), creating the CA on first use.
    Export {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Add the CA certificate to the host's trust store (Debian: update-ca-certificates).
    Install {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// File name in the trust store (without .crt).
        #[arg(long, default_value = "phigate-ca")]
        name: String,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory (schema and every *.cedar file); prints each error
    /// as FILE:LINE: message and exits 1 if there is any.
    Check {
        /// The policy directory; default: the config's policies_dir.
        dir: Option<PathBuf>,
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the decision the running policies would make for one request, the
    /// deciding policy ids and the obligations. Sends nothing to the destination.
    Explain(Box<crate::policy::explain::ExplainArgs>),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; errors name file:line and the key.
    Check { file: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("phigate: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run_agent(&config),
        Command::Detach { config, all } => detach(&config, all),
        Command::Audit { command } => audit(command),
        Command::Ca { command } => ca(command),
        Command::Approvals {
            config,
            socket,
            command,
        } => approvals(&config, socket, command),
        Command::Status {
            config,
            socket,
            json,
        } => status(&config, socket, json),
        Command::Console {
            command: ConsoleCommand::HashPassword,
        } => hash_password(),
        Command::Policy {
            command: PolicyCommand::Check { dir, config },
        } => policy_check(dir, &config),
        Command::Policy {
            command: PolicyCommand::Explain(args),
        } => {
            let c = Config::load(&args.config)?;
            let parts = crate::policy::explain::ConfigParts {
                agent: c.agent,
                destinations: c.destinations,
                policy: c.policy,
                oidc: c.oidc,
            };
            crate::policy::explain::run(*args, parts)
        }
        Command::Mask {
            profile,
            policies_dir,
            config,
            ndjson,
            engine,
            stats,
            file,
        } => {
            let agent = Config::load(&config).ok().map(|c| c.agent);
            crate::mask::tool::run(crate::mask::tool::Args {
                profile,
                policies_dir,
                config,
                agent,
                ndjson,
                engine,
                stats,
                file,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
    }
}

/// `phigate run`: the agent, in the foreground, until SIGTERM.
fn run_agent(config: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    init_logging(config.agent.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("phigate")
        // Blocking work is short (/proc reads for a caller's identity, a status
        // snapshot): a few threads serve it, queued, where the default 512 each
        // kept a stack and an allocator heap through a burst of connections.
        .max_blocking_threads(16)
        .build()?;
    rt.block_on(crate::app::run(config))?;
    Ok(ExitCode::SUCCESS)
}

fn detach(config: &std::path::Path, all: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let cgroup = if all {
        None
    } else {
        Some(crate::preflight::resolve_cgroup(
            config.agent.cgroup.as_deref(),
        )?)
    };
    let report = crate::redirect::detach_pinned(&config.agent.bpf_pin_dir, cgroup.as_deref())?;
    if report.removed.is_empty() {
        println!(
            "nothing attached under {}",
            config.agent.bpf_pin_dir.display()
        );
    }
    for p in &report.removed {
        println!("detached {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Pseudonym { config, value } => {
            let config = Config::load(&config)?;
            let p = crate::record::pseudonym::load_or_create(
                &config.agent.state_dir,
                config.records.patient_path_segments.clone(),
            )?;
            // The raw id would otherwise sit in shell history beside its pseudonym;
            // that is the auditor's choice, on the host that holds the key.
            println!("{}", p.pseudonym(&value));
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify(args) => audit_verify(*args),
        AuditCommand::Keygen { out } => audit_keygen(&out),
        AuditCommand::Unseal {
            key,
            records,
            request_id,
        } => audit_unseal(&key, &records, &request_id),
        AuditCommand::Pubkey { config } => {
            let config = Config::load(&config)?;
            let signer = crate::record::seal::Signer::load_or_create(&config.agent.state_dir)?;
            print!("{}", signer.public.to_text());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn audit_keygen(out: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(out)?;
    let (secret, public) = phigate_record::original::generate();
    let key = out.join("review.key");
    // create_new: an existing private key (and what was sealed to it) is never overwritten.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let public_path = out.join("review.pub");
    std::fs::write(&public_path, public)
        .map_err(|e| anyhow::anyhow!("{}: {e}", public_path.display()))?;
    println!(
        "wrote {} (keep it off the host) and {}",
        key.display(),
        public_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_unseal(
    key: &std::path::Path,
    records: &std::path::Path,
    request_id: &str,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let secret = phigate_record::original::ReviewSecret::load(key)?;
    let rows = phigate_record::read::rows(records, phigate_record::Table::Requests)?;
    let row = rows
        .iter()
        .find(|r| r["request_id"].as_str() == Some(request_id))
        .ok_or_else(|| anyhow::anyhow!("no request `{request_id}` in {}", records.display()))?;
    let Some(blob) = row["response_original_sealed"].as_str() else {
        anyhow::bail!("request `{request_id}` has no sealed original");
    };
    let key_id = row["response_original_key_id"].as_str().unwrap_or("");
    let original = secret.open(request_id, blob, key_id)?;
    std::io::stdout().write_all(&original.body)?;
    if original.truncated {
        eprintln!("(truncated at the record body size)");
    }
    Ok(ExitCode::SUCCESS)
}

fn ca(command: CaCommand) -> anyhow::Result<ExitCode> {
    let (config, install) = match command {
        CaCommand::Export { config } => (config, None),
        CaCommand::Install { config, name } => (config, Some(name)),
    };
    let config = Config::load(&config)?;
    let ca = crate::app::load_ca(&config)?;
    if let Some(name) = install {
        let path = crate::tls::install_into_trust_store(ca.cert_pem(), &name)?;
        println!(
            "installed the phigate CA as {} and refreshed the system trust store",
            path.display()
        );
    } else {
        print!("{}", ca.cert_pem());
    }
    Ok(ExitCode::SUCCESS)
}

/// `phigate console hash-password`: the password is read from standard input.
fn hash_password() -> anyhow::Result<ExitCode> {
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "no password on standard input");
    println!("{}", crate::console::accounts::hash_password(password)?);
    Ok(ExitCode::SUCCESS)
}

fn policy_check(dir: Option<PathBuf>, config: &std::path::Path) -> anyhow::Result<ExitCode> {
    let dir = match dir {
        Some(d) => d,
        None => Config::load(config)?.agent.policies_dir,
    };
    match crate::policy::PolicySet::load(&dir) {
        Ok(set) => {
            println!(
                "{}: ok ({} polic{}, set {})",
                dir.display(),
                set.len(),
                if set.len() == 1 { "y" } else { "ies" },
                set.hash()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            println!("{} error(s) in {}", errors.0.len(), dir.display());
            Ok(ExitCode::from(1))
        }
    }
}

fn config_check(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let c = Config::load(file)?;
    // The credentials' files are read as the agent would: a key that cannot sign or
    // a certificate that does not parse is found now.
    check_credentials(&c)?;
    println!(
        "{}: ok ({} destination{})",
        file.display(),
        c.destinations.len(),
        if c.destinations.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// Loads every destination's upstream credential and client certificate without
/// using them (no token is fetched).
fn check_credentials(c: &Config) -> anyhow::Result<()> {
    let sockets = crate::sockets::SocketFactory::new(c.agent.mark, None);
    crate::credential::Credentials::load(&c.destinations, &sockets)?;
    for d in &c.destinations {
        if let Some(cert) = d
            .upstream_auth
            .as_ref()
            .and_then(|a| a.client_cert.as_ref())
        {
            crate::tls::UpstreamTls::new(d.upstream_ca.as_deref(), Some(cert))
                .map_err(|e| anyhow::anyhow!("destination `{}`: {e}", d.name))?;
        }
    }
    Ok(())
}

fn audit_verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    use crate::record::seal::PublicKey;
    if let Some(url) = args
        .dir
        .as_deref()
        .and_then(|d| d.to_str())
        .filter(|d| d.starts_with("s3://"))
    {
        return audit_verify_fleet(url, &args);
    }
    // A copy elsewhere needs only the directory and the public key: no config. The
    // config is still read, when it is there, for where records are shipped.
    let needed = args.dir.is_none() || args.pubkey.is_none();
    let (loaded, unread) = match Config::load(&args.config) {
        Ok(c) => (Some(c), None),
        Err(e) if needed => return Err(e.into()),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| loaded.as_ref().expect("loaded").agent.records_dir.clone());
    let pubkey = args.pubkey.clone().unwrap_or_else(|| {
        crate::record::verify::default_public_key(&loaded.as_ref().expect("loaded").agent.state_dir)
    });
    let key = PublicKey::read(&pubkey)?;
    let report = crate::record::verify::verify(&dir, &key)?;
    print_tables(&report);
    let mut problems = report.problems;
    let remote = match (&args.remote, args.local_only) {
        (_, true) => None,
        (Some(url), false) => {
            let endpoint = args
                .endpoint
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--remote needs --endpoint URL"))?;
            Some(crate::record::ship::remote_section(
                url,
                endpoint,
                &args.region,
            )?)
        }
        (None, false) => loaded.as_ref().and_then(|c| c.records.shipping.clone()),
    };
    match remote {
        Some(cfg) => problems.extend(remote_anchor(&cfg, &dir, &key, args.host.as_deref())?),
        None if args.local_only => println!("remote anchor: not checked (--local-only)"),
        None => println!(
            "remote anchor: none ({}, no --remote): only the records here were checked",
            unread.unwrap_or_else(|| format!("no [records.shipping] in {}", args.config.display()))
        ),
    }
    if problems.is_empty() {
        println!(
            "OK: every file, row and chain link verified with key {}",
            key.key_id()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("FAIL {p}");
        }
        println!("{} problem(s) found in {}", problems.len(), dir.display());
        Ok(ExitCode::from(1))
    }
}

fn print_tables(report: &crate::record::verify::Report) {
    for (table, t) in &report.tables {
        let retired = if t.retired_rows > 0 {
            format!(
                ", {} earlier rows removed by documented retention",
                t.retired_rows
            )
        } else {
            String::new()
        };
        println!("{table}: {} files, {} rows{retired}", t.files, t.rows);
    }
}

/// The records in `dir` against what was shipped for them. An unreachable store is
/// an error (the anchor could not be checked), never a pass.
fn remote_anchor(
    cfg: &crate::record::config::ShippingSection,
    dir: &std::path::Path,
    key: &crate::record::seal::PublicKey,
    host: Option<&str>,
) -> anyhow::Result<Vec<crate::record::verify::Problem>> {
    use crate::record::seal;
    let host = match host {
        Some(h) => h.to_owned(),
        None => seal::read_json::<seal::Heads>(&seal::heads_path(dir))
            .map(|h| h.host)
            .map_err(|e| {
                anyhow::anyhow!("cannot tell whose records these are for the remote anchor ({e:#}); give --host")
            })?,
    };
    let remote = crate::record::ship::Remote::new(cfg)?;
    let shipped = remote.shipped(&host).map_err(|e| {
        e.context(
            "the off-host anchor could not be read (--local-only checks only the records here)",
        )
    })?;
    let anchor = crate::record::anchor::compare(dir, key, &shipped);
    for (table, a) in &anchor.tables {
        println!(
            "{table}: {} file(s) anchored at {}{}",
            a.shipped_files,
            shipped.location,
            if a.unshipped_files > 0 {
                format!(", {} here not shipped yet", a.unshipped_files)
            } else {
                String::new()
            }
        );
    }
    if let Some(at) = &anchor.anchored_at {
        println!("remote anchor: heads shipped {at} to {}", shipped.location);
    }
    Ok(anchor.problems)
}

/// `audit verify s3://bucket/prefix`: every host in the store, each with its own key,
/// and every key's host present.
fn audit_verify_fleet(url: &str, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    use crate::record::seal::PublicKey;
    let endpoint = args
        .endpoint
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("{url} needs --endpoint URL"))?;
    let keys_dir = args.keys.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{url} needs --keys DIR (one <host>.pub per host, from `phigate audit pubkey`)"
        )
    })?;
    let cfg = crate::record::ship::remote_section(url, endpoint, &args.region)?;
    let remote = crate::record::ship::Remote::new(&cfg)?;
    let mut keys = std::collections::BTreeMap::new();
    for e in
        std::fs::read_dir(keys_dir).map_err(|e| anyhow::anyhow!("{}: {e}", keys_dir.display()))?
    {
        let p = e?.path();
        if let Some(host) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pub"))
        {
            keys.insert(host.to_owned(), PublicKey::read(&p)?);
        }
    }
    let hosts = remote.hosts()?;
    let mut failed = Vec::new();
    for host in keys.keys().filter(|h| !hosts.contains(h)) {
        failed.push(format!(
            "FAIL {host}: missing host: a key in {} but nothing under {}",
            keys_dir.display(),
            crate::record::ship::location(&cfg, host)
        ));
    }
    let scratch = std::env::temp_dir().join(format!("phigate-fleet-{}", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        for host in &hosts {
            let Some(key) = keys.get(host) else {
                failed.push(format!(
                    "FAIL {host}: in the store but no {host}.pub in {}: its records cannot be verified",
                    keys_dir.display()
                ));
                continue;
            };
            let dir = scratch.join(host);
            let n = remote.pull(host, &dir)?;
            // Object storage has no empty directories: a table without files.
            for t in crate::record::Table::ALL {
                std::fs::create_dir_all(dir.join(t.name()))?;
            }
            let report = crate::record::verify::verify(&dir, key)?;
            let anchor = crate::record::anchor::compare(&dir, key, &remote.shipped(host)?);
            let rows: u64 = report.tables.values().map(|t| t.rows).sum();
            println!("{host}: {n} object(s), {rows} rows");
            for p in report.problems.iter().chain(&anchor.problems) {
                failed.push(format!("FAIL {host}: {p}"));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    if failed.is_empty() {
        println!(
            "OK: {} host(s) in {url}: every file, row and chain link verified with each host's key",
            hosts.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failed {
            println!("{f}");
        }
        println!("{} problem(s) found in {url}", failed.len());
        Ok(ExitCode::from(1))
    }
}

/// `phigate status`'s upstream credentials: state, never the secret.
/// `  pod billing/export-7d9f (uid …)  image registry.local/export:1.4`, as far as known.
fn container_detail(c: &crate::admin::StatusContainer) -> String {
    let mut out = String::new();
    match (&c.pod_namespace, &c.pod_name) {
        (Some(ns), Some(name)) => out.push_str(&format!("  pod {ns}/{name}")),
        (None, Some(name)) => out.push_str(&format!("  pod {name}")),
        _ => {}
    }
    if let Some(uid) = &c.pod_uid {
        out.push_str(&format!("  pod uid {uid}"));
    }
    if let Some(image) = &c.image {
        out.push_str(&format!("  image {image}"));
    }
    out
}

fn print_credentials(credentials: &[crate::credential::CredentialState]) {
    if credentials.is_empty() {
        return;
    }
    println!("upstream credentials:");
    for c in credentials {
        println!(
            "  {:<20} {:<18} for {}: valid until {}, last refresh {}, {} failure(s){}",
            c.id,
            c.kind,
            c.destination,
            c.valid_until.as_deref().unwrap_or("-"),
            c.last_refresh.as_deref().unwrap_or("-"),
            c.failures,
            c.last_error
                .as_deref()
                .map(|e| format!(" (last: {e})"))
                .unwrap_or_default()
        );
    }
}

/// The admin socket: as given, else the config's.
fn admin_socket(config: &std::path::Path, socket: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match socket {
        Some(s) => Ok(s),
        None => Ok(Config::load(config)?.admin.socket),
    }
}

fn status(
    config: &std::path::Path,
    socket: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let socket = admin_socket(config, socket)?;
    let resp = crate::admin::call(&socket, &crate::admin::AdminRequest::Status)?;
    let Some(s) = resp.status.filter(|_| resp.ok) else {
        eprintln!("phigate: {}", resp.error.unwrap_or_default());
        return Ok(ExitCode::from(1));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let r = &s.records;
    println!(
        "phigate {} (pid {}, up {}s)",
        s.version, s.pid, s.uptime_secs
    );
    println!("listening:     {}", s.listeners.join(", "));
    if let Some(m) = &s.metrics_listen {
        println!("metrics:       http://{m}/metrics");
    }
    println!(
        "redirect:      cgroup {} (fail {}), pinned under {}",
        s.cgroup, s.fail_mode, s.bpf_pin_dir
    );
    let join = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("ebpf maps:     {}", join(&s.ebpf_maps));
    println!("ebpf events:   {}", join(&s.ebpf_counters));
    println!("destinations:");
    for d in &s.destinations {
        println!(
            "  {:<20} {:<14} {}{}",
            d.name,
            d.protocol,
            d.addresses.join(", "),
            d.mask_profile
                .as_deref()
                .map(|p| format!("  (mask {p})"))
                .unwrap_or_default()
        );
    }
    if !s.namespaces.is_empty() {
        println!("namespaces:");
        for n in &s.namespaces {
            println!(
                "  net:[{}]  pid {}  {}",
                n.inode,
                n.pid,
                n.listeners.join(", ")
            );
            if let Some(c) = &n.container {
                println!(
                    "    container {} ({}){}",
                    c.id,
                    c.runtime,
                    container_detail(c)
                );
            }
        }
    }
    print_credentials(&s.credentials);
    println!("policies:      {} in set {}", s.policies, s.policy_set_hash);
    println!(
        "records:       {} ({}), journal {} entries / {} bytes, parquet {} rows, lag {}{}{}",
        if s.records_writable {
            "writable"
        } else {
            "NOT WRITABLE: requests are refused"
        },
        r.durability,
        r.journal_entries,
        r.journal_bytes,
        r.parquet_rows,
        r.lag_entries,
        if r.journal_failing {
            ", journal failing"
        } else {
            ""
        },
        if r.parquet_failing {
            ", parquet failing"
        } else {
            ""
        },
    );
    if let Some(sh) = &r.shipping {
        println!(
            "shipping:      {} shipped, {} waiting (oldest {}s), {} failed passes to {}{}{}",
            sh.shipped_files,
            sh.unshipped_files,
            sh.lag_secs,
            sh.failures,
            sh.destination,
            if sh.failing_closed {
                ", FAILING CLOSED: past max_unshipped_secs"
            } else {
                ""
            },
            sh.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        if let Some(a) = &sh.anchor {
            println!(
                "anchor:        {}{a}",
                if sh.anchor_behind { "WARNING: " } else { "" }
            );
        }
    }
    if let Some(si) = &r.siem {
        print_stream(
            "siem",
            si,
            ("connected", "NOT CONNECTED"),
            "failed connections",
        );
    }
    if let Some(o) = &r.otlp {
        print_stream("otlp", o, ("up", "NOT UP"), "failed exports");
    }
    if r.held_entries > 0 {
        println!(
            "               {} journal entr{} would not decode: not in Parquet, kept in <records_dir>/_journal/held/",
            r.held_entries,
            if r.held_entries == 1 { "y" } else { "ies" }
        );
    }
    println!("connections:   {} open", s.open_connections);
    println!("approvals:     {} pending", s.approvals_pending);
    println!("counters:      {}", join(&s.counters));
    Ok(ExitCode::SUCCESS)
}

fn approvals(
    config: &std::path::Path,
    socket: Option<PathBuf>,
    command: ApprovalsCommand,
) -> anyhow::Result<ExitCode> {
    use crate::admin::AdminRequest;
    let socket = admin_socket(config, socket)?;
    #[derive(PartialEq)]
    enum Show {
        List,
        Full,
        Decided(&'static str),
    }
    let (req, show) = match command {
        ApprovalsCommand::List => (AdminRequest::List, Show::List),
        ApprovalsCommand::Show { id } => (AdminRequest::Show { id }, Show::Full),
        ApprovalsCommand::Approve { id, reason } => (
            AdminRequest::Approve { id, reason },
            Show::Decided("approved"),
        ),
        ApprovalsCommand::Deny { id, reason } => {
            (AdminRequest::Deny { id, reason }, Show::Decided("denied"))
        }
    };
    let resp = crate::admin::call(&socket, &req)?;
    if !resp.ok {
        eprintln!(
            "phigate: {} (you are {})",
            resp.error.unwrap_or_default(),
            resp.reviewer
        );
        return Ok(ExitCode::from(1));
    }
    if let Show::Decided(verb) = show {
        for a in &resp.approvals {
            println!(
                "{verb} {} as {}: the approval is now {} ({} of {} approvals)",
                a.id,
                resp.reviewer,
                a.state.as_str(),
                a.approvals.len(),
                a.quorum
            );
        }
    } else if show == Show::List {
        if resp.approvals.is_empty() {
            println!("no open approvals for {}", resp.reviewer);
        }
        for a in &resp.approvals {
            println!(
                "{}  {:<8} {:<16} {} {} {}  by {}  ({} of {} approvals)",
                a.id,
                a.state.as_str(),
                a.rule,
                a.summary.method,
                a.summary.destination,
                a.summary.path,
                a.requester_label(),
                a.approvals.len(),
                a.quorum
            );
        }
    } else {
        for a in &resp.approvals {
            println!("{}", serde_json::to_string_pretty(a)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PHIGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// One live stream's line of `phigate status`.
fn print_stream(
    name: &str,
    p: &crate::record::stream::StreamProgress,
    (up, down): (&str, &str),
    failures: &str,
) {
    let rejected = if p.rejected > 0 {
        format!(", {} rejected by the receiver", p.rejected)
    } else {
        String::new()
    };
    println!(
        "{:<15}{} to {}, {} sent, {} waiting, {} dropped{rejected}, {} {failures}{}",
        format!("{name}:"),
        if p.connected { up } else { down },
        p.destination,
        p.sent,
        p.buffered,
        p.dropped,
        p.failures,
        p.last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
}
