//! The packaged unit under a real systemd. PID 1 of these machines is not systemd, so
//! a Debian tree (made by `cargo xtask test` with debootstrap, target/systemd-root) is
//! booted with `systemd-nspawn --boot`, the .deb is installed in it, and the unit is
//! started, reloaded and stopped by that systemd, with its sandbox as shipped.
//!
//! Inside the container: the protected API (tests/systemd/upstream.py, HTTPS on
//! 127.0.0.2:9443) and its clients (curl), each run as a unit of the container's
//! systemd so they live in the cgroup tree phigate attaches to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

/// The unit's CapabilityBoundingSet: CAP_CHOWN (0), CAP_DAC_READ_SEARCH (2),
/// CAP_NET_ADMIN (12), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21), CAP_PERFMON (38),
/// CAP_BPF (39).
const UNIT_CAPS: u64 =
    (1 << 0) | (1 << 2) | (1 << 12) | (1 << 19) | (1 << 21) | (1 << 38) | (1 << 39);

/// The container's DefaultLimitNOFILE hard limit: what the agent would get (it raises
/// its soft limit to the hard one) if the unit set no LimitNOFILE.
const DEFAULT_NOFILE_HARD: u64 = 4096;

/// A booted container; powered off, and everything it used removed, on drop.
struct Machine {
    nspawn: Child,
    /// PID 1 of the container, as the host sees it.
    leader: u32,
    cgroup: Cgroup,
    bpffs: PathBuf,
    work: tempfile::TempDir,
    log: PathBuf,
}

impl Machine {
    fn boot(root: &Path, deb_dir: &Path) -> Machine {
        let work = tempfile::tempdir().unwrap();
        let cgroup = Cgroup::new("systemd");
        // A bpffs instance of its own: pins made in the container stay apart from the
        // host's /sys/fs/bpf (and other tests' pins).
        let bpffs = work.path().join("bpffs");
        std::fs::create_dir(&bpffs).unwrap();
        run_host(&["mount", "-t", "bpf", "bpf", bpffs.to_str().unwrap()]);
        // Services get this hard limit unless their unit says otherwise; set below
        // the host's so that LimitNOFILE= is observable (see the_unit_runs...).
        let conf = work.path().join("system.conf.d");
        std::fs::create_dir(&conf).unwrap();
        std::fs::write(
            conf.join("phigate-test.conf"),
            format!("[Manager]\nDefaultLimitNOFILE=1024:{DEFAULT_NOFILE_HARD}\n"),
        )
        .unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for f in ["upstream.py", "sandbox_probe.py"] {
            std::fs::copy(src.join(f), work.path().join(f)).unwrap();
        }
        let bind = |host: &Path, inside: &str| format!("{}:{inside}", host.display());
        let args = [
            format!("--directory={}", root.display()),
            // The tree's root is an overlay with its upper layer in memory: installing
            // the package and configuring it never change target/systemd-root.
            "--volatile=overlay".into(),
            "--boot".into(),
            // No systemd on the host: nothing to register with (machined) and no
            // manager to make a scope for the container, which stays in our cgroup.
            "--register=no".into(),
            "--keep-unit".into(),
            // Its own network namespace with loopback only: the API, phigate and the
            // clients talk over the container's 127.0.0.0/8.
            "--private-network".into(),
            format!("--machine={}", unique("phigate")),
            // The console is not read; the test talks to systemd through nsenter.
            "--console=passive".into(),
            // nspawn's default set lacks these: load programs and create maps
            // (CAP_BPF), what the verifier grants only with CAP_PERFMON, attach cgroup
            // programs (CAP_NET_ADMIN). The unit bounds phigate to its own set.
            "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN".into(),
            // nspawn's seccomp filter refuses bpf(2) (EPERM) unless allowed.
            "--system-call-filter=bpf".into(),
            // nspawn builds /sys with no /sys/fs/bpf; the unit's ReadWritePaths=
            // names it, and phigate pins its links there.
            format!("--bind={}", bind(&bpffs, "/sys/fs/bpf")),
            format!("--bind={}", bind(work.path(), "/mnt/test")),
            format!("--bind-ro={}", bind(deb_dir, "/mnt/deb")),
            format!("--bind-ro={}", bind(&conf, "/etc/systemd/system.conf.d")),
        ];
        let mut argv = vec!["systemd-nspawn"];
        argv.extend(args.iter().map(String::as_str));
        let log = work.path().join("nspawn.log");
        let f = std::fs::File::create(&log).unwrap();
        let nspawn = command(
            Place {
                cgroup: Some(&cgroup),
                ..Place::default()
            },
            &argv,
        )
        // The host mounts cgroup v1 controllers beside cgroup2 (hybrid); phigate
        // attaches to the cgroup2 root it finds, so the container gets cgroup2 only.
        .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("systemd-nspawn (apt-get install systemd-container; cargo xtask setup does)");
        let mut m = Machine {
            nspawn,
            leader: 0,
            cgroup,
            bpffs,
            work,
            log,
        };
        let t = Instant::now();
        while m.leader == 0 {
            m.leader = m.find_leader().unwrap_or(0);
            if t.elapsed() > Duration::from_secs(30) || m.nspawn.try_wait().unwrap().is_some() {
                panic!("the container did not start: {}", m.nspawn_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // `--wait` waits for the boot to finish, once the manager answers at all.
        let (out, state) = loop {
            let out = m.run(&["systemctl", "is-system-running", "--wait"]);
            let state = stdout(&out);
            if !matches!(state.trim(), "" | "offline") || t.elapsed() > Duration::from_secs(60) {
                break (out, state);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            matches!(state.trim(), "running" | "degraded"),
            "the container's systemd did not come up: {state}{}\n{}",
            stderr(&out),
            stdout(&m.run(&["systemctl", "--failed", "--no-pager"]))
        );
        println!("container booted in {:.1} s", t.elapsed().as_secs_f64());
        m
    }

    /// The container's PID 1: the process of its cgroup tree that is pid 1 in its
    /// own pid namespace.
    fn find_leader(&self) -> Option<u32> {
        let payload = self.cgroup.path.join("payload");
        ["init.scope/cgroup.procs", "cgroup.procs"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(payload.join(f)).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .is_some_and(|ns| ns.split_whitespace().last() == Some("1"))
                })
            })
    }

    fn nspawn_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `argv` in all of the container's namespaces (but in the host's cgroup,
    /// so outside what phigate redirects: clients go through [`Machine::client`]).
    fn run(&self, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(argv)
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter {argv:?}: {e}"))
    }

    fn sh(&self, script: &str) -> Output {
        self.run(&["sh", "-c", script])
    }

    /// `sh -c script` in the container, which must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
            .trim()
            .to_owned()
    }

    /// `curl -i` of https://127.0.0.2:9443{path} as a unit of the container's systemd
    /// (so in the cgroup phigate protects), trusting the container's store only.
    fn client(&self, path: &str) -> Answer {
        let url = format!("https://127.0.0.2:9443{path}");
        let out = self.run(&[
            "systemd-run",
            "--pipe",
            "--wait",
            "--quiet",
            "--service-type=exec",
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "20",
            &url,
        ]);
        Answer::parse(out)
    }

    /// The journal of `unit` as JSON entries.
    fn journal(&self, unit: &str) -> Vec<Value> {
        stdout(&self.run(&["journalctl", "-u", unit, "-o", "json", "--no-pager"]))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn journal_text(&self, unit: &str) -> String {
        stdout(&self.run(&["journalctl", "-u", unit, "--no-pager"]))
    }

    /// The records table `table` in the container, read from the host through the
    /// container's root.
    fn records(&self, table: &str) -> Vec<Value> {
        let dir = PathBuf::from(format!(
            "/proc/{}/root/var/lib/phigate/records",
            self.leader
        ));
        let t = phigate::record::Table::from_name(table).unwrap();
        let mut last = None;
        for _ in 0..5 {
            match phigate::record::read::rows(&dir, t) {
                Ok(rows) => return rows,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("reading {table} in {}: {:#}", dir.display(), last.unwrap())
    }

    fn wait_record(&self, table: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            if let Some(r) = self.records(table).into_iter().find(|r| f(r)) {
                return r;
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!(
                    "no {table} record {what}: {:?}\n{}",
                    self.records(table),
                    self.journal_text("phigate")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nspawn ----\n{}", self.nspawn_log());
            eprintln!(
                "---- phigate journal ----\n{}",
                self.journal_text("phigate")
            );
        }
        // SIGTERM asks the container's systemd to power off.
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever outlived a nspawn that had to be killed.
        let _ = std::fs::write(self.cgroup.path.join("cgroup.kill"), "1");
        let _ = Command::new("umount").arg(&self.bpffs).status();
        // nspawn leaves its payload/ and supervisor/ trees below our cgroup, which
        // Cgroup's drop removes only once they are gone (deepest first).
        let mut dirs = Vec::new();
        let mut stack = vec![self.cgroup.path.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                    dirs.push(e.path());
                }
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn run_host(argv: &[&str]) -> Output {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(out.status.success(), "{argv:?}: {}", stderr(&out));
    out
}

/// A client's exchange: curl's exit code, the status line's code, headers and body.
#[derive(Debug)]
struct Answer {
    exit: Option<i32>,
    status: u16,
    head: String,
    body: String,
    err: String,
}

impl Answer {
    fn parse(out: Output) -> Answer {
        let text = stdout(&out);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Answer {
            exit: out.status.code(),
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_owned(),
            err: stderr(&out),
        }
    }

    fn request_id(&self) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("x-phigate-request-id:"))
            .map(str::trim)
    }
}

/// A policy set in /etc/phigate/policy-sets/NAME: the package's schema, profiles and
/// approval rules with one policy file.
fn policy_set(m: &Machine, name: &str, cedar: &str) {
    let dir = format!("/etc/phigate/policy-sets/{name}");
    m.ok(&format!(
        "mkdir -p /etc/phigate/policy-sets && cp -r /etc/phigate/policies {dir} && rm {dir}/*.cedar && cat > {dir}/test.cedar <<'EOF'\n{cedar}\nEOF"
    ));
}

/// Monotonic time (µs) of the first journal entry of `unit` whose message `f` accepts.
fn journal_time(m: &Machine, unit: &str, what: &str, f: impl Fn(&str) -> bool) -> u64 {
    let entries = m.journal(unit);
    entries
        .iter()
        .find(|e| e["MESSAGE"].as_str().is_some_and(&f))
        .and_then(|e| e["__MONOTONIC_TIMESTAMP"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("no journal entry {what}:\n{}", m.journal_text(unit)))
}

/// The `sandbox-probe KEY=RESULT` lines the probe left in the journal.
fn probe_results(m: &Machine) -> std::collections::BTreeMap<String, String> {
    m.journal("phigate")
        .iter()
        .filter_map(|e| e["MESSAGE"].as_str()?.strip_prefix("sandbox-probe "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_packaged_unit_runs_under_systemd_with_its_sandbox() {
    require_root();
    let deb = PathBuf::from(std::env::var("PHIGATE_DEB").expect(
        "PHIGATE_DEB: the .deb to test (cargo xtask test builds it with cargo xtask package)",
    ));
    let root = std::env::var("PHIGATE_SYSTEMD_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/systemd-root"));
    assert!(
        root.join(".phigate-systemd-root").exists(),
        "no Debian tree at {} (cargo xtask test makes it with debootstrap)",
        root.display()
    );
    let t0 = Instant::now();
    let m = Machine::boot(&root, deb.parent().unwrap());
    let deb_name = deb.file_name().unwrap().to_str().unwrap();
    m.ok(&format!("dpkg -i /mnt/deb/{deb_name}"));
    assert_eq!(m.show("phigate", "UnitFileState"), "enabled");
    assert_eq!(m.show("phigate", "ActiveState"), "inactive");

    // The protected API, with its own CA (phigate trusts it as upstream_ca; clients
    // trust only the container's store, which has phigate's CA from the postinst).
    TestPki::new(m.work.path(), "pki", "IP:127.0.0.2");
    m.ok("systemd-run --unit=upstream --service-type=exec python3 /mnt/test/upstream.py 127.0.0.2 9443 /mnt/test/pki/server.pem /mnt/test/pki/server.key");

    // Two policy sets: `open` permits everything, `narrow` only paths under /open.
    // The config names a symlink to one of them: switching the link is a policy
    // change the agent's watch on the set's directory does not see, so only
    // `systemctl reload` can apply it.
    policy_set(
        &m,
        "open",
        "@id(\"test.allow-all\")\npermit (principal, action, resource);",
    );
    policy_set(
        &m,
        "narrow",
        "@id(\"test.open-only\")\npermit (principal, action, resource) when { context.path like \"/open*\" };",
    );
    m.ok("ln -s policy-sets/open /etc/phigate/policy-set");
    // The package's config (its directories are the ones the unit makes writable)
    // with the destination, that policy directory and quicker Parquet files.
    let config = m.ok("cat /etc/phigate/phigate.toml");
    assert!(config.contains("policies_dir = \"/etc/phigate/policies\""));
    let config = config
        .replace(
            "policies_dir = \"/etc/phigate/policies\"",
            "policies_dir = \"/etc/phigate/policy-set\"",
        )
        .replace("[records]\n", "[records]\nrotate_secs = 0.2\n")
        + "\n[timeouts]\ndrain_secs = 15\n\n[[destinations]]\nname = \"api\"\naddresses = [\"127.0.0.2:9443\"]\nprotocol = \"https\"\nupstream_ca = \"/mnt/test/pki/ca.pem\"\n";
    std::fs::write(m.work.path().join("phigate.toml"), config).unwrap();
    m.ok("cp /mnt/test/phigate.toml /etc/phigate/phigate.toml && phigate config check /etc/phigate/phigate.toml");

    // READY=1 only once the programs are attached. A unit ordered after phigate (as
    // the services it protects are) makes its first call as soon as systemd has
    // READY=1: had it come before the attach, that call would go straight to the API
    // (no programs are pinned yet), whose certificate curl does not trust.
    m.ok("cat > /etc/systemd/system/first-call.service <<'EOF'\n[Unit]\nRequires=phigate.service\nAfter=phigate.service\n[Service]\nType=oneshot\nExecStart=curl -sS -o /dev/null -D /run/first-call.head https://127.0.0.2:9443/open/first\nEOF\nsystemctl daemon-reload");
    let started = Instant::now();
    let out = m.run(&["systemctl", "start", "first-call.service"]);
    assert!(
        out.status.success(),
        "the first call after phigate was started did not go through phigate: {}\n{}\n{}",
        stderr(&out),
        m.journal_text("first-call"),
        m.journal_text("phigate")
    );
    println!(
        "phigate started (READY=1) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let head = m.ok("cat /run/first-call.head").to_ascii_lowercase();
    assert!(head.contains("x-phigate-request-id:"), "{head}");
    // And in the journal: the agent's attach is logged before systemd's "Started".
    let attached = journal_time(&m, "phigate", "redirect attached", |s| {
        s.contains("redirect attached")
    });
    let ready = journal_time(&m, "phigate", "Started phigate.service", |s| {
        s.starts_with("Started phigate.service")
    });
    assert!(
        attached < ready,
        "READY=1 ({ready}) before the attach ({attached})"
    );
    assert_eq!(m.show("phigate", "Type"), "notify");
    let watchdog_at_start: u64 = m
        .show("phigate", "WatchdogTimestampMonotonic")
        .parse()
        .unwrap();
    assert_eq!(m.show("phigate", "WatchdogUSec"), "30s");
    let pid = m.show("phigate", "MainPID");

    // A protected request goes through and is recorded, with the caller as the unit
    // systemd ran it in.
    let a = m.client("/blocked-later");
    assert_eq!((a.exit, a.status), (Some(0), 200), "{a:?}: {}", a.err);
    assert!(a.body.contains("/blocked-later"), "{a:?}");
    let id = a.request_id().expect("x-phigate-request-id").to_owned();
    let rec = m.wait_record("requests", "for the request", |r| r["request_id"] == id);
    assert_eq!(rec["path"], "/blocked-later");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["status"], 200);
    assert!(
        rec["systemd_unit"]
            .as_str()
            .is_some_and(|u| u.starts_with("run-") && u.ends_with(".service")),
        "{rec}"
    );
    // The kernel names the caller by its pid on the host; the agent, in the
    // container's pid namespace, cannot open it there, so the executable is not
    // established here (it is on a host, where both share one pid namespace).
    assert_eq!(rec["comm"], "curl", "{rec}");

    // The sandbox, as the running agent has it.
    let status = m.ok(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    let caps = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
    assert_eq!(
        caps("CapBnd:"),
        UNIT_CAPS,
        "bounding set {:x}",
        caps("CapBnd:")
    );
    assert_eq!(
        caps("CapEff:"),
        UNIT_CAPS,
        "effective set {:x}",
        caps("CapEff:")
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    // LimitNOFILE=65536, clamped by systemd to the most the container may grant:
    // systemd cannot raise a hard limit without CAP_SYS_RESOURCE, which these
    // machines' root lacks. Either way not the container's default for services.
    let nofile = |text: &str| -> (u64, u64) {
        let l = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let v: Vec<u64> = l
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (v[0], v[1])
    };
    let (_, pid1_hard) = nofile(&m.ok("cat /proc/1/limits"));
    assert!(
        pid1_hard > DEFAULT_NOFILE_HARD,
        "the container's own limit ({pid1_hard}) leaves no room to see LimitNOFILE"
    );
    let want = 65536.min(pid1_hard);
    assert_eq!(
        nofile(&m.ok(&format!("cat /proc/{pid}/limits"))),
        (want, want),
        "open files limit of the agent"
    );
    // Writes in the agent's mount namespace: the file system is read-only but for
    // the unit's State/Logs/RuntimeDirectory and /sys/fs/bpf; /tmp is its own, and
    // home directories are out of its sight.
    m.ok("echo secret > /root/phigate-home-probe");
    let inside = |script: &str| m.sh(&format!("nsenter -t {pid} -m -- sh -c '{script}'"));
    for path in ["/etc/phigate", "/usr/lib", "/var/lib", "/boot", "/mnt/test"] {
        let out = inside(&format!("touch {path}/.phigate-probe"));
        assert!(
            !out.status.success() && stderr(&out).contains("Read-only file system"),
            "write to {path}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    for path in ["/var/lib/phigate", "/var/log/phigate", "/run/phigate"] {
        let out = inside(&format!("touch {path}/.probe && rm {path}/.probe"));
        assert!(out.status.success(), "write to {path}: {}", stderr(&out));
    }
    let out = inside("mkdir /sys/fs/bpf/probe && rmdir /sys/fs/bpf/probe");
    assert!(out.status.success(), "mkdir in bpffs: {}", stderr(&out));
    let out = inside("touch /tmp/phigate-private-tmp");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !m.sh("test -e /tmp/phigate-private-tmp").status.success(),
        "PrivateTmp: the agent's /tmp is the container's"
    );
    assert!(
        !inside("cat /root/phigate-home-probe").status.success(),
        "ProtectHome: the agent reads /root"
    );

    // `systemctl reload` applies a policy change: the link now names `narrow`, which
    // the running agent does not see until systemd sends it SIGHUP.
    m.ok("ln -sfn policy-sets/narrow /etc/phigate/policy-set.new && mv -T /etc/phigate/policy-set.new /etc/phigate/policy-set");
    std::thread::sleep(Duration::from_secs(1));
    let a = m.client("/blocked-later");
    assert_eq!(a.status, 200, "changed before the reload: {a:?}");
    m.ok("systemctl reload phigate");
    let t = Instant::now();
    loop {
        let a = m.client("/blocked-later");
        if a.status == 403 {
            break;
        }
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the reload did not apply the new policy set\n{}",
            m.journal_text("phigate")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = m.client("/open/after-reload");
    assert_eq!(a.status, 200, "{a:?}");
    m.wait_record("events", "of the SIGHUP reload", |r| {
        r["kind"] == "policy_reload"
            && r["outcome"] == "ok"
            && r["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("sighup:"))
    });
    assert_eq!(m.show("phigate", "ActiveState"), "active");

    // The watchdog: pings (every 15 s) move systemd's watchdog timestamp, and the
    // agent is neither restarted nor replaced meanwhile.
    let t = Instant::now();
    loop {
        let now: u64 = m
            .show("phigate", "WatchdogTimestampMonotonic")
            .parse()
            .unwrap();
        if now > watchdog_at_start {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "no watchdog ping reached systemd"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(m.show("phigate", "NRestarts"), "0");
    assert_eq!(m.show("phigate", "MainPID"), pid);

    // `systemctl stop` drains: a request in flight (the API answers /open/slow after
    // 3 s) completes, and the unit ends inactive, not failed.
    m.ok("systemd-run --unit=slow-client --service-type=exec curl -sS -o /run/slow.body -D /run/slow.head https://127.0.0.2:9443/open/slow");
    let t = Instant::now();
    while !m
        .ok("phigate status --json")
        .contains("\"open_connections\": 1")
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the slow request did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop = Instant::now();
    m.ok("systemctl stop phigate");
    let took = stop.elapsed();
    assert!(
        took > Duration::from_secs(1),
        "stop did not wait for the request in flight ({took:?})"
    );
    m.ok("while systemctl is-active -q slow-client; do sleep 0.1; done");
    let head = m.ok("cat /run/slow.head");
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(m.ok("cat /run/slow.body").contains("/open/slow"));
    assert_eq!(m.show("phigate", "ActiveState"), "inactive");
    assert_eq!(m.show("phigate", "Result"), "success");
    assert!(m.journal_text("phigate").contains("draining open ones"));
    m.wait_record("requests", "of the drained request", |r| {
        r["path"] == "/open/slow" && r["status"] == 200
    });
    // Stopped, the programs stay pinned (fail_mode = "closed"): protected connects
    // are refused rather than passed unrecorded.
    let a = m.client("/open/while-stopped");
    assert_ne!(a.exit, Some(0), "{a:?}");
    assert_eq!(a.status, 0, "{a:?}");
    assert!(m.ok("ls /sys/fs/bpf/phigate").contains("cg"));
    let out = m.run(&["phigate", "audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        stdout(&out),
        stderr(&out)
    );

    // What the seccomp-based options deny, probed from the unit's own context: an
    // ExecStartPost= added by a drop-in runs with the unit's sandbox.
    m.ok("mkdir -p /etc/systemd/system/phigate.service.d && printf '[Service]\\nExecStartPost=python3 /mnt/test/sandbox_probe.py\\n' > /etc/systemd/system/phigate.service.d/probe.conf && systemctl daemon-reload && systemctl start phigate");
    let probe = probe_results(&m);
    let expect = [
        ("wx_mmap", "EPERM"),          // MemoryDenyWriteExecute
        ("unshare", "EPERM"),          // RestrictNamespaces
        ("af_packet", "EAFNOSUPPORT"), // RestrictAddressFamilies
        ("af_inet", "allowed"),
        ("write_usr", "EROFS"), // ProtectSystem=strict
        ("write_state", "allowed"),
    ];
    for (k, v) in expect {
        assert_eq!(probe.get(k).map(String::as_str), Some(v), "{k}: {probe:?}");
    }
    m.ok("systemctl stop phigate");
    println!("systemd test: {:.1} s", t0.elapsed().as_secs_f64());
}
