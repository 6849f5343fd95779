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
    agent: Option<Child>,
    ca_installed: bool,
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
            agent: None,
            ca_installed: false,
        })
    }

    fn tour(&mut self) -> anyhow::Result<()> {
        banner(&format!(
            "1. a demo patient API over TLS on {UPSTREAM} (its own CA, as a real API has)"
        ));
        self.start_upstream()?;
        check_interrupt()?;

        banner("2. phigate: config protecting that API, programs attached to a demo cgroup");
        std::fs::create_dir_all(&self.cgroup)
            .with_context(|| format!("creating {}", self.cgroup.display()))?;
        self.write_config()?;
        say(&format!("protected cgroup: {}", self.cgroup.display()));
        say(&format!("config: {}", self.config.display()));
        self.start_agent()?;
        check_interrupt()?;

        banner("3. the host trusts phigate's CA (the only change clients need)");
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
        say(String::from_utf8_lossy(&out.stdout).trim());
        check_interrupt()?;

        banner(&format!(
            "4. an unchanged client in the protected cgroup: curl https://{UPSTREAM}/json"
        ));
        let body = self.in_cgroup(&[
            "curl",
            "-sS",
            "--http2",
            "--max-time",
            "10",
            &format!("https://{UPSTREAM}/json?bytes=200"),
        ])?;
        say(&format!("response: {}", truncate(&body, 160)));
        let rec = self.wait_record("requests", 1)?;
        let conn = self.wait_connection(rec["connection_id"].as_str().unwrap_or_default())?;
        say("what phigate saw and recorded:");
        say(&format!(
            "  redirected        yes: original destination {}",
            rec["original_dst"].as_str().unwrap_or("?")
        ));
        say(&format!(
            "  caller            pid {} uid {} ({}) comm {}",
            rec["pid"],
            rec["uid"],
            rec["user"].as_str().unwrap_or("?"),
            rec["comm"].as_str().unwrap_or("?")
        ));
        say(&format!(
            "  executable        {} sha256 {}",
            rec["exe_path"].as_str().unwrap_or("?"),
            truncate(rec["exe_sha256"].as_str().unwrap_or("?"), 16)
        ));
        say(&format!(
            "  cgroup            {}",
            rec["cgroup_path"].as_str().unwrap_or("?")
        ));
        say(&format!(
            "  client TLS        {} ALPN {} SNI {}",
            rec["tls_version"].as_str().unwrap_or("?"),
            rec["alpn"].as_str().unwrap_or("?"),
            rec["sni"]
                .as_str()
                .unwrap_or("(none: IP address, certificate minted for the IP)")
        ));
        say(&format!(
            "  upstream TLS      {} verified, certificate subject {}",
            rec["upstream_tls_version"].as_str().unwrap_or("?"),
            rec["upstream_cert_subject"].as_str().unwrap_or("?")
        ));
        say(&format!(
            "  request           {} {} -> {} in {:.1} ms, {} bytes back",
            rec["method"].as_str().unwrap_or("?"),
            rec["path"].as_str().unwrap_or("?"),
            rec["status"],
            rec["latency_ms"].as_f64().unwrap_or(0.0),
            rec["response_bytes"]
        ));
        say(&format!(
            "  connection        {} bytes up, {} bytes down, outcome {}",
            conn["bytes_up"],
            conn["bytes_down"],
            conn["outcome"].as_str().unwrap_or("?")
        ));
        check_interrupt()?;

        banner(&format!(
            "4b. a read of patient 123: GET https://{UPSTREAM}/fhir/Patient/123"
        ));
        let status = self.in_cgroup(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            &format!("https://{UPSTREAM}/fhir/Patient/123"),
        ])?;
        say(&format!(
            "status {status}; recorded with the patient id pseudonymized"
        ));
        check_interrupt()?;

        banner("5. the same client outside the protected cgroup is not redirected");
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                "--cacert",
            ])
            .arg(self.dir.join("upstream-ca.pem"))
            .arg(format!("https://{UPSTREAM}/json?bytes=200"))
            .output()?;
        say(&format!(
            "status {} straight from the API (its own certificate); records still: {}",
            String::from_utf8_lossy(&out.stdout),
            self.records("requests").len()
        ));

        banner("6. phigate stops: SIGTERM drains; the programs stay pinned (fail closed)");
        self.stop_agent()?;
        let r = self.in_cgroup(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("https://{UPSTREAM}/json"),
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

    /// The auditor's side: verify the records, then ask DuckDB who accessed a patient.
    fn audit(&self) -> anyhow::Result<()> {
        banner("7. the auditor: `phigate audit verify`, then DuckDB over the Parquet records");
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
            "SELECT strftime(start_time, '%H:%M:%S') AS time, user, comm, method, path, status, decision \
             FROM requests WHERE list_contains(patient_refs, '{patient}') ORDER BY start_time"
        );
        say("who accessed patient 123 (docs/queries/patient_access.sql does this by date range):");
        say(&format!("  {sql}"));
        for l in self.duckdb(&sql)?.lines() {
            say(l);
        }
        say("every query in docs/queries works the same way; see README, Audit with DuckDB");
        Ok(())
    }

    fn start_upstream(&mut self) -> anyhow::Result<()> {
        let d = &self.dir;
        let Pki { ca, cert, key } =
            make_pki(d, "demo API CA", "IP:127.0.0.2,DNS:patients.demo.test")?;
        let log = std::fs::File::create(d.join("upstream.log"))?;
        let child = Command::new("node")
            .arg(root_dir().join("tests/upstream/server.js"))
            .args(["--host", "127.0.0.2", "--port", "9443", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
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
        crate::util::allow_all_policies(&self.dir.join("policies"))?;
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

[records]
rotate_secs = 0.5   # the tour reads its records at once; hosts keep the default 60

[[destinations]]
name = "patients-api"
addresses = ["{UPSTREAM}"]
protocol = "https"
upstream_ca = "{d}/upstream-ca.pem"
"#,
                cg = self.cgroup.display()
            ),
        )?;
        Ok(())
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

    fn wait_record(&self, table: &str, n: usize) -> anyhow::Result<Value> {
        let t = Instant::now();
        loop {
            let r = self.records(table);
            if r.len() >= n {
                return Ok(r[n - 1].clone());
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("no {table} record appeared");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The connection record with this id (written when the connection closes).
    fn wait_connection(&self, id: &str) -> anyhow::Result<Value> {
        let t = Instant::now();
        loop {
            if let Some(c) = self
                .records("connections")
                .into_iter()
                .find(|c| c["connection_id"] == id)
            {
                return Ok(c);
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("no connection record for {id}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
        if let Some(mut u) = self.upstream.take() {
            let _ = u.kill();
            let _ = u.wait();
        }
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
