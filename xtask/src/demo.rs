//! `cargo xtask demo`: a guided tour on a local demo API. Everything it creates (a
//! cgroup, pinned programs, a trusted demo CA, processes, a temp dir) is removed at
//! the end, also on Ctrl-C.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

use crate::util::{cargo, cgroup2_root, ensure_bpffs, make_pki, require_root, root_dir, Pki};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

const UPSTREAM: &str = "127.0.0.2:9443";
const IDP: &str = "127.0.0.1:9600";
const CA_NAME: &str = "phigate-demo-ca";

pub fn run() -> anyhow::Result<()> {
    require_root("the demo attaches eBPF programs to a cgroup")?;
    // Build first (outside), then run the tour in a network namespace of its own.
    if std::env::var_os("PHIGATE_XTASK_NETNS").is_none() {
        banner("building phigate (release)");
        cargo(&["build", "--release", "-p", "phigate"], &[])?;
    }
    if crate::util::reexec_in_netns("phigate-demo")? {
        return Ok(());
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    ensure_bpffs()?;
    let bin = root_dir().join("target/release/phigate");

    let mut demo = Demo::new(bin)?;
    let r = demo.tour();
    demo.cleanup();
    r
}

struct Demo {
    bin: PathBuf,
    dir: PathBuf,
    cgroup: PathBuf,
    config: PathBuf,
    upstream: Option<Child>,
    idp: Option<Child>,
    agent: Option<Child>,
    ca_installed: bool,
    /// `[policy] timezone` of the tour: a zone where it is clinic hours now.
    timezone: String,
    /// Users and groups the tour created (removed at the end).
    created_users: Vec<String>,
    created_groups: Vec<String>,
}

fn banner(s: &str) {
    println!("\n==> {s}");
}

fn say(s: &str) {
    println!("    {s}");
}

impl Demo {
    fn new(bin: PathBuf) -> anyhow::Result<Demo> {
        let dir = std::env::temp_dir().join(format!("phigate-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cgroup = cgroup2_root()?.join("phigate-demo");
        Ok(Demo {
            bin,
            config: dir.join("phigate.toml"),
            dir,
            cgroup,
            upstream: None,
            idp: None,
            agent: None,
            ca_installed: false,
            timezone: crate::util::timezone_at(10),
            created_users: Vec::new(),
            created_groups: Vec::new(),
        })
    }

    fn tour(&mut self) -> anyhow::Result<()> {
        banner(&format!(
            "1. a FHIR patient API over TLS on {UPSTREAM} (its own CA, as a real API has)"
        ));
        self.start_upstream()?;
        check_interrupt()?;

        banner(&format!(
            "2. an OpenID Connect provider on {IDP} issuing tokens to a clinician app and a billing app"
        ));
        self.start_idp()?;
        check_interrupt()?;

        banner("3. phigate with the shipped policies (policies/): Cedar rules, masking profiles, approval rules");
        std::fs::create_dir_all(&self.cgroup)
            .with_context(|| format!("creating {}", self.cgroup.display()))?;
        self.write_config()?;
        let out = Command::new(&self.bin)
            .args(["policy", "check", "--config"])
            .arg(&self.config)
            .output()?;
        say(String::from_utf8_lossy(&out.stdout).trim());
        say(&format!("protected cgroup: {}", self.cgroup.display()));
        say(&format!(
            "policy clock: [policy] timezone = \"{}\", where it is now 10 o'clock: clinic hours \
             (the off-hours rule holds clinicians' reads from 19:00 to 07:00; try \
             `phigate policy explain --at \"Mon 22:00\"`)",
            self.timezone
        ));
        self.start_agent()?;
        let out = Command::new(&self.bin)
            .args(["ca", "install", "--name", CA_NAME, "--config"])
            .arg(&self.config)
            .output()?;
        if !out.status.success() {
            bail!(
                "phigate ca install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.ca_installed = true;
        say("the host trusts phigate's CA: the only change clients need");
        check_interrupt()?;

        banner(
            "4. a clinician reads patient 123: allowed by policy, masked by the `clinical` profile",
        );
        let token = self.token("clinician-app")?;
        let answer = self.in_cgroup(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("authorization: Bearer {token}"),
            &format!("https://{UPSTREAM}/fhir/Patient/123"),
        ])?;
        let (client, status) = answer.rsplit_once('\n').unwrap_or(("", &answer));
        say(&format!("the client received HTTP {status}"));
        if status != "200" {
            // Show what really happened, never a table the client did not get.
            bail!(
                "the clinician's read was not answered by the API: HTTP {status} {}",
                truncate(client, 200)
            );
        }
        let raw = self.upstream_direct("/fhir/Patient/123")?;
        let (raw, client): (Value, Value) = (
            serde_json::from_str(&raw).context("the API's answer")?,
            serde_json::from_str(client).with_context(|| format!("phigate's answer: {client}"))?,
        );
        say(&format!(
            "{:<22} {:<34} {}",
            "field", "at the API (raw)", "at the client"
        ));
        for (label, ptr) in [
            ("SSN", "/identifier/0/value"),
            ("medical record no.", "/identifier/1/value"),
            ("name", "/name/0/family"),
            ("birth date", "/birthDate"),
        ] {
            say(&format!(
                "{label:<22} {:<34} {}",
                raw.pointer(ptr).map(|v| v.to_string()).unwrap_or_default(),
                client
                    .pointer(ptr)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "(removed)".into())
            ));
        }
        let rec = self.wait_request(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/fhir/Patient/p:"))
        })?;
        say(&format!(
            "recorded: {} by {} ({}), policies {}, profile {}, masked {}",
            rec["decision"].as_str().unwrap_or("?"),
            rec["oidc_subject"].as_str().unwrap_or("?"),
            rec["oidc_groups"],
            rec["policy_ids"],
            rec["masking_profile"].as_str().unwrap_or("-"),
            rec["masking_counts"]
        ));
        say(&format!(
            "the path is recorded as {} (the patient id as a keyed pseudonym)",
            rec["path"].as_str().unwrap_or("?")
        ));
        check_interrupt()?;

        banner("5. billing reads the same patient: denied (billing may read Coverage only)");
        let token = self.token("billing-app")?;
        let denied = self.in_cgroup(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            "-H",
            &format!("authorization: Bearer {token}"),
            &format!("https://{UPSTREAM}/fhir/Patient/123"),
        ])?;
        say(&format!("billing-app: {}", denied.trim()));
        let anonymous = self.in_cgroup(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            " (HTTP %{http_code})",
            &format!("https://{UPSTREAM}/fhir/Patient/123"),
        ])?;
        say(&format!("no token:    {}", anonymous.trim()));
        check_interrupt()?;

        banner("6. the nightly export job asks for $export: held until a privacy officer approves");
        self.export_with_approval()?;
        check_interrupt()?;

        banner("7. phigate stops: SIGTERM drains; the programs stay pinned (fail closed)");
        self.stop_agent()?;
        let r = self.in_cgroup(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("https://{UPSTREAM}/fhir/Patient/123"),
        ]);
        say(&match r {
            Ok(_) => "unexpected: the API answered while phigate was down".to_owned(),
            Err(e) => format!(
                "protected connect while phigate is down: refused ({})",
                truncate(&e.to_string(), 80)
            ),
        });
        check_interrupt()?;
        self.audit()
    }

    /// The export job (its own unit and user) waits; a reviewer (a local user in the
    /// rule's group) approves through the admin socket; the export completes masked.
    fn export_with_approval(&mut self) -> anyhow::Result<()> {
        self.ensure_group("privacy-officers")?;
        self.ensure_user("fhir-export", None)?;
        self.ensure_user("privacy-demo", Some("privacy-officers"))?;
        let unit = self.cgroup.join("fhir-export.service");
        std::fs::create_dir_all(&unit)?;
        let procs = unit.join("cgroup.procs");
        let job = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec setpriv --reuid=fhir-export --regid=fhir-export --init-groups \"$@\"",
                procs.display()
            ))
            .args(["sh", "curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}"])
            .arg(format!("https://{UPSTREAM}/fhir/Patient/$export"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        say("fhir-export.service (user fhir-export): GET /fhir/Patient/$export ... waiting");
        let t = Instant::now();
        let id = loop {
            check_interrupt()?;
            let list = self.as_user("privacy-demo", &["approvals", "list"])?;
            if let Some(line) = list.lines().find(|l| l.contains("$export")) {
                say("privacy-demo$ phigate approvals list");
                say(&format!("  {}", line.trim()));
                break line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            if t.elapsed() > Duration::from_secs(15) {
                bail!("the export was not held for approval: {list}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        std::thread::sleep(Duration::from_millis(800));
        let reason = "monthly registry report, ticket PRIV-1042";
        say(&format!(
            "privacy-demo$ phigate approvals approve {id} --reason \"{reason}\""
        ));
        let out = self.as_user(
            "privacy-demo",
            &["approvals", "approve", &id, "--reason", reason],
        )?;
        say(&format!(
            "  {}",
            truncate(out.lines().next().unwrap_or(""), 100)
        ));
        let done = job.wait_with_output()?;
        let text = String::from_utf8_lossy(&done.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let first = body.lines().next().unwrap_or_default().to_owned();
        say(&format!(
            "the job's request completed: HTTP {status}, the export masked by `safe_harbor`:"
        ));
        say(&format!("  {}", truncate(&first, 190)));
        let rec =
            self.wait_request(|r| r["approval_id"] == id.as_str() && r["decision"] == "approved")?;
        say(&format!(
            "recorded: decision {}, approval {}, approvers {}, reason \"{}\", unit {}, user {}",
            rec["decision"].as_str().unwrap_or("?"),
            truncate(rec["approval_id"].as_str().unwrap_or("?"), 13),
            rec["approvers"],
            rec["approval_reason"].as_str().unwrap_or("?"),
            rec["systemd_unit"].as_str().unwrap_or("?"),
            rec["user"].as_str().unwrap_or("?")
        ));
        Ok(())
    }

    /// The auditor's side: verify the records, then ask DuckDB who accessed a patient.
    fn audit(&self) -> anyhow::Result<()> {
        banner("8. the auditor: `phigate audit verify`, then DuckDB over the Parquet records");
        let config = self.config.to_str().unwrap_or_default();
        let out = Command::new(&self.bin)
            .args(["audit", "verify", "--config", config])
            .output()?;
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            say(l);
        }
        if !out.status.success() {
            bail!(
                "audit verify failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new(&self.bin)
            .args(["audit", "pseudonym", "--config", config, "123"])
            .output()?;
        let patient = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        say(&format!(
            "patient 123 appears in the records only as its keyed pseudonym {patient}"
        ));
        let sql = format!(
            "SELECT strftime(start_time, '%H:%M:%S') AS time, coalesce(oidc_subject, user) AS who, systemd_unit AS unit, \
             method, path, status, decision, policy_ids, masking_profile AS masked_by, approvers \
             FROM requests WHERE list_contains(patient_refs, '{patient}') OR path LIKE '%$export' ORDER BY start_time"
        );
        say("every access to patient 123 and every export, with who decided (docs/queries/patient_access.sql, decisions.sql):");
        for l in self.duckdb(&sql)?.lines() {
            say(l);
        }
        let sql =
            "SELECT strftime(time, '%H:%M:%S') AS time, state, rule, requester, reviewer, reason \
                   FROM approvals ORDER BY time";
        say("the approval, step by step (the approvals table):");
        for l in self.duckdb(sql)?.lines() {
            say(l);
        }
        say("every query in docs/queries works the same way; see README, Audit with DuckDB");
        Ok(())
    }

    fn start_upstream(&mut self) -> anyhow::Result<()> {
        let d = &self.dir;
        let Pki { ca, cert, key } =
            make_pki(d, "demo API CA", "IP:127.0.0.2,DNS:patients.demo.test")?;
        let files = d.join("fhir");
        std::fs::create_dir_all(&files)?;
        std::fs::write(
            files.join("Patient-123.json"),
            patient("123", "Chalmers", "Peter", "123-45-6789", "1974-12-25").to_string(),
        )?;
        let export: Vec<String> = [
            ("123", "Chalmers", "Peter", "123-45-6789", "1974-12-25"),
            ("124", "Windsor", "Amy", "987-65-4329", "1931-03-02"),
            ("125", "Okafor", "Chidi", "219-09-9999", "1988-07-14"),
        ]
        .iter()
        .map(|(id, f, g, ssn, b)| patient(id, f, g, ssn, b).to_string())
        .collect();
        std::fs::write(
            files.join("Patient-export.ndjson"),
            export.join("\n") + "\n",
        )?;
        let log = std::fs::File::create(d.join("upstream.log"))?;
        let child = Command::new("node")
            .arg(root_dir().join("tests/upstream/server.js"))
            .args(["--host", "127.0.0.2", "--port", "9443", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--files")
            .arg(&files)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting node (is nodejs installed? `cargo xtask setup`)")?;
        self.upstream = Some(child);
        wait_port(UPSTREAM, Duration::from_secs(10))?;
        say(&format!(
            "listening; certificate {} signed by {}",
            cert.display(),
            ca.display()
        ));
        Ok(())
    }

    fn write_config(&self) -> anyhow::Result<()> {
        // The shipped policies, as an operator installs them.
        let policies = self.dir.join("policies");
        copy_dir(&root_dir().join("policies"), &policies)?;
        let d = self.dir.display();
        std::fs::write(
            &self.config,
            format!(
                r#"[agent]
listen = ["127.0.0.1:15001"]
state_dir = "{d}/state"
records_dir = "{d}/records"
policies_dir = "{d}/policies"
cgroup = "{cg}"
bpf_pin_dir = "/sys/fs/bpf/phigate-demo"
fail_mode = "closed"

[admin]
socket = "{d}/admin.sock"

[records]
rotate_secs = 0.5   # the tour reads its records at once; hosts keep the default 60

[policy]
timezone = "{tz}"   # pinned by the tour to clinic hours; hosts name their own zone

[[oidc.issuers]]
issuer = "https://{IDP}"
audiences = ["patients-api"]
ca_file = "{d}/idp/ca.pem"
group_map = {{ "fhir-clinicians" = "clinicians" }}

[[destinations]]
name = "patients-api"
addresses = ["{UPSTREAM}"]
protocol = "https"
upstream_ca = "{d}/upstream-ca.pem"
"#,
                cg = self.cgroup.display(),
                tz = self.timezone,
            ),
        )?;
        Ok(())
    }

    /// The OIDC provider of the tests (tests/node: the `oidc-provider` package).
    fn start_idp(&mut self) -> anyhow::Result<()> {
        let d = self.dir.join("idp");
        std::fs::create_dir_all(&d)?;
        let Pki { ca, cert, key } = make_pki(&d, "demo IdP CA", "IP:127.0.0.1")?;
        std::fs::copy(&ca, d.join("ca.pem"))?;
        let script = root_dir().join("tests/node/oidc-provider.mjs");
        let log = std::fs::File::create(d.join("idp.log"))?;
        let child = Command::new("node")
            .arg(&script)
            .args(["--port", "9600", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--keys")
            .arg(d.join("keys.json"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the OIDC provider (`cargo xtask setup` installs it)")?;
        self.idp = Some(child);
        wait_port(IDP, Duration::from_secs(15))?;
        say("issuer https://127.0.0.1:9600; clients clinician-app (group fhir-clinicians), billing-app (group billing)");
        Ok(())
    }

    /// A client-credentials access token for `client`.
    fn token(&self, client: &str) -> anyhow::Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.dir.join("idp/ca.pem"))
            .arg(format!("https://{IDP}/token"))
            .args([
                "-d",
                "grant_type=client_credentials",
                "-d",
                &format!("client_id={client}"),
                "-d",
                "client_secret=secret",
                "-d",
                "resource=https://patients-api",
            ])
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("token response: {}", String::from_utf8_lossy(&out.stdout)))?;
        v["access_token"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no token in {v}"))
    }

    /// The API itself, outside the protected cgroup (what it really returns).
    fn upstream_direct(&self, path: &str) -> anyhow::Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.dir.join("upstream-ca.pem"))
            .arg(format!("https://{UPSTREAM}{path}"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ensure_group(&mut self, g: &str) -> anyhow::Result<()> {
        if Command::new("getent")
            .args(["group", g])
            .output()?
            .status
            .success()
        {
            return Ok(());
        }
        crate::util::exec(Command::new("groupadd").args(["--system", g]))?;
        self.created_groups.push(g.to_owned());
        Ok(())
    }

    fn ensure_user(&mut self, u: &str, group: Option<&str>) -> anyhow::Result<()> {
        if Command::new("getent")
            .args(["passwd", u])
            .output()?
            .status
            .success()
        {
            return Ok(());
        }
        let mut cmd = Command::new("useradd");
        cmd.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
        ]);
        if let Some(g) = group {
            cmd.args(["--groups", g]);
        }
        crate::util::exec(cmd.arg(u))?;
        self.created_users.push(u.to_owned());
        Ok(())
    }

    /// `phigate ARGS` run as local user `u` (the admin socket knows them by uid).
    fn as_user(&self, u: &str, args: &[&str]) -> anyhow::Result<String> {
        let socket = self.dir.join("admin.sock");
        let out = Command::new("setpriv")
            .args(["--reuid", u, "--regid", u, "--init-groups"])
            .arg(&self.bin)
            .args(&args[..1])
            .arg("--socket")
            .arg(&socket)
            .args(&args[1..])
            .output()?;
        if !out.status.success() {
            bail!(
                "phigate {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The first request record `f` accepts (records land every half second).
    fn wait_request(&self, f: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let t = Instant::now();
        loop {
            if let Some(r) = self.records("requests").into_iter().find(|r| f(r)) {
                return Ok(r);
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the expected request record did not appear");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("phigate.log"))?;
        let child = Command::new(&self.bin)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.agent = Some(child);
        // "ready": the programs are attached and the destinations loaded.
        let log = self.dir.join("phigate.log");
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.trim_end().ends_with(" ready"))
        {
            check_interrupt()?;
            if t.elapsed() > Duration::from_secs(15) {
                bail!(
                    "phigate did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        say("phigate is listening on 127.0.0.1:15001 (outside the protected cgroup)");
        Ok(())
    }

    fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let status = a.wait()?;
            say(&format!("phigate exited: {status}"));
        }
        Ok(())
    }

    /// Runs a command inside the protected cgroup; returns stdout or the error.
    fn in_cgroup(&self, argv: &[&str]) -> anyhow::Result<String> {
        let procs = self.cgroup.join("cgroup.procs");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && exec \"$@\"", procs.display()))
            .arg("sh")
            .args(argv)
            .output()?;
        if !out.status.success() {
            bail!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Rows of a records table as an auditor reads them: DuckDB over the Parquet files.
    fn records(&self, table: &str) -> Vec<Value> {
        let glob = self.dir.join("records").join(table).join("*/*.parquet");
        let out = Command::new("python3")
            .args(["-c", DUCKDB_ROWS])
            .arg(glob)
            .output();
        match out {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Runs SQL over the records with DuckDB and prints its table.
    fn duckdb(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("python3")
            .args(["-c", DUCKDB_SHOW])
            .arg(self.dir.join("records"))
            .arg(root_dir().join("docs/queries/views.sql"))
            .arg(sql)
            .output()?;
        if !out.status.success() {
            bail!("duckdb: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn cleanup(&mut self) {
        banner("cleaning up");
        let _ = self.stop_agent();
        if self.config.exists() {
            let _ = Command::new(&self.bin)
                .args(["detach", "--config"])
                .arg(&self.config)
                .status();
        }
        for mut c in [self.upstream.take(), self.idp.take()]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for u in self.created_users.drain(..) {
            let _ = Command::new("userdel").arg(&u).status();
        }
        for g in self.created_groups.drain(..) {
            let _ = Command::new("groupdel").arg(&g).status();
        }
        let _ = std::fs::remove_dir(self.cgroup.join("fhir-export.service"));
        if self.ca_installed {
            let _ = std::fs::remove_file(format!("/usr/local/share/ca-certificates/{CA_NAME}.crt"));
            let _ = Command::new("update-ca-certificates")
                .arg("--fresh")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            say("removed the demo CA from the trust store");
        }
        if self.cgroup.exists() {
            let _ = std::fs::remove_dir(&self.cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        say("done");
    }
}

/// Prints a table's rows as a JSON array (no rows yet: `[]`).
const DUCKDB_ROWS: &str = r#"
import duckdb, json, sys
try:
    cur = duckdb.connect().execute(
        "SELECT * FROM read_parquet(?, union_by_name = true) ORDER BY chain_seq", [sys.argv[1]])
except duckdb.IOException:
    print("[]"); sys.exit(0)
cols = [d[0] for d in cur.description]
print(json.dumps([dict(zip(cols, r)) for r in cur.fetchall()], default=str))
"#;

/// Creates the auditor views of docs/queries/views.sql, runs one query, prints it.
const DUCKDB_SHOW: &str = r#"
import duckdb, sys
records, views, sql = sys.argv[1:4]
c = duckdb.connect()
c.execute("SET VARIABLE records = ?", [records])
text = "\n".join(l for l in open(views).read().splitlines() if not l.strip().startswith("--"))
for stmt in (s.strip() for s in text.split(";")):
    if stmt:
        try:
            c.execute(stmt)
        except duckdb.IOException:
            pass  # a table with no files yet
c.sql(sql).show(max_width=200)
"#;

fn wait_port(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        check_interrupt()?;
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listens on {addr} after {timeout:?}")
}

fn truncate(s: &str, n: usize) -> String {
    let s = s.trim();
    if s.len() <= n {
        s.to_owned()
    } else {
        format!("{}…", &s[..n])
    }
}

/// A synthetic FHIR Patient with the identifiers the masking profiles act on.
fn patient(id: &str, family: &str, given: &str, ssn: &str, birth: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "id": id,
        "identifier": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn},
            {"system": "urn:oid:2.16.840.1.113883.19.5", "value": format!("MRN-{id}0042")}
        ],
        "name": [{"family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": "555-867-5309"}, {"system": "email", "value": format!("{}@example.org", given.to_lowercase())}],
        "gender": "unknown",
        "birthDate": birth,
        "address": [{"line": ["534 Erewhon St"], "city": "Springfield", "state": "IL", "postalCode": "62704"}]
    })
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}
