//! Test harness: every test gets a network namespace and a cgroup of its own, a real
//! phigate binary attached to that cgroup, real upstreams and real clients.
//!
//! Processes enter the namespace with setns(2) and the cgroup by writing to
//! `cgroup.procs` between fork and exec, so no `ip netns exec` (which remounts /sys
//! and hides the cgroup2 mount).

pub mod fhir;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn require_root() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the end-to-end tests need root (eBPF, namespaces, cgroups): run `cargo xtask test` as root");
    }
}

/// The phigate binary under test: $PHIGATE_BIN, else the workspace's build.
pub fn phigate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PHIGATE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for p in ["target/release/phigate", "target/debug/phigate"] {
        let p = root.join(p);
        if p.exists() {
            return p;
        }
    }
    panic!("no phigate binary: set PHIGATE_BIN or run `cargo build --release -p phigate` (cargo xtask test does)");
}

/// The repository's shipped policies (policies/).
pub fn shipped_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// A fixed-offset time zone (`Etc/GMT-5` is UTC+5) in which the local hour is `hour`
/// now, for a world's `[policy] timezone`: tests pin their policy clock with the same
/// setting operators use, so the off-hours rules decide the same at any hour of CI.
/// The hour drifts by at most the suite's length, so pick hours well inside a window.
pub fn timezone_at(hour: u8) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let utc_hour = ((now / 3600) % 24) as i64;
    // tzdb has offsets from UTC-12 to UTC+14.
    let mut offset = (i64::from(hour) - utc_hour).rem_euclid(24);
    if offset > 14 {
        offset -= 24;
    }
    match offset {
        0 => "Etc/GMT".into(),
        // POSIX sign: Etc/GMT-N is N hours ahead of UTC.
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// The cgroup2 mount point, as the agent finds it.
pub fn cgroup2_root() -> PathBuf {
    phigate_common::host::cgroup2_root().expect("a cgroup2 mount")
}

/// A network namespace with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        require_root();
        let name = unique(&format!("pg-{tag}"));
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        let file = File::open(format!("/run/netns/{name}")).expect("netns file");
        Netns { name, file }
    }

    /// The namespace's inode (what `phigate status` lists for served namespaces).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().unwrap().ino()
    }

    /// Joins this namespace to `other` with a veth pair, as a container's bridge or
    /// veth does: `here` and `there` are the two ends' addresses (`10.77.0.1/30`),
    /// `tag` makes the interface names unique within both namespaces; `other`'s
    /// default route goes through `here`.
    pub fn veth_to(&self, other: &Netns, tag: &str, here: &str, there: &str) {
        let (a, b) = (format!("pgh{tag}"), format!("pgc{tag}"));
        run_ok(Command::new("ip").args([
            "-n",
            &self.name,
            "link",
            "add",
            &a,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]));
        for (ns, dev, addr) in [(&self.name, &a, here), (&other.name, &b, there)] {
            run_ok(Command::new("ip").args(["-n", ns, "addr", "add", addr, "dev", dev]));
            run_ok(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
        }
        // The other side reaches everything through this one, as a container does
        // through its bridge.
        let gateway = here.split('/').next().unwrap();
        run_ok(Command::new("ip").args([
            "-n",
            &other.name,
            "route",
            "add",
            "default",
            "via",
            gateway,
        ]));
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let fd = self.file.try_clone().unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with a valid netns fd.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Waits until something accepts on `addr` inside the namespace.
    pub fn wait_port(&self, addr: SocketAddr, timeout: Duration) -> bool {
        self.run(move || {
            let t = Instant::now();
            while t.elapsed() < timeout {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory; its processes are killed and it is removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let path = cgroup2_root().join(unique(&format!("phigate-test-{tag}")));
        std::fs::create_dir(&path).expect("create cgroup");
        Cgroup { path }
    }

    /// The path as phigate records it: relative to the cgroup2 root, leading `/`.
    pub fn relative(&self) -> String {
        format!(
            "/{}",
            self.path.strip_prefix(cgroup2_root()).unwrap().display()
        )
    }

    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).unwrap().ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                // SAFETY: killing leftover test processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The unprivileged user the attacker's processes run as.
pub const NOBODY: u32 = 65534;

/// Where a spawned process lives.
#[derive(Clone, Copy, Default)]
pub struct Place<'a> {
    pub netns: Option<&'a Netns>,
    pub cgroup: Option<&'a Cgroup>,
    /// Run as this uid/gid (e.g. 65534, nobody).
    pub uid: Option<u32>,
}

/// Builds a Command that enters `place` between fork and exec.
pub fn command(place: Place<'_>, argv: &[&str]) -> Command {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    let netns = place.netns.map(|n| n.file.try_clone().unwrap());
    let procs = place.cgroup.map(|c| {
        OpenOptions::new()
            .write(true)
            .open(c.path.join("cgroup.procs"))
            .expect("cgroup.procs")
    });
    let uid = place.uid;
    // SAFETY: only async-signal-safe calls (setns, write, setgroups, setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(n) = &netns {
                if libc::setns(n.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(p) = &procs {
                // "0" moves the writing process itself.
                if libc::write(p.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(u) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(u) != 0
                    || libc::setuid(u) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Runs to completion, capturing output.
pub fn output(place: Place<'_>, argv: &[&str]) -> Output {
    command(place, argv)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A background process killed on drop.
pub struct Background {
    pub child: Child,
    pub log: PathBuf,
}

impl Background {
    pub fn spawn(place: Place<'_>, argv: &[&str], log: PathBuf) -> Background {
        let f = File::create(&log).unwrap();
        let child = command(place, argv)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
        Background { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_exited(a: &mut Background) -> bool {
    a.child.try_wait().ok().flatten().is_some()
}

/// One test's world: netns, cgroup, temp dir, and the phigate agent configured for them.
/// Tests want records soon after traffic: files are closed this often.
pub const RECORDS_ROTATE_SECS: f64 = 0.2;

pub struct World {
    pub netns: Netns,
    pub cgroup: Cgroup,
    pub dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
    pub agent: Option<Background>,
    /// Extra environment for the agent (`KEY=VALUE`).
    pub agent_env: Vec<String>,
    /// A host name of its own for the agent (a UTS namespace), as a second machine.
    pub agent_hostname: Option<String>,
}

impl World {
    pub fn new(tag: &str) -> World {
        let netns = Netns::new(tag);
        let cgroup = Cgroup::new(tag);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique(&format!("phigate-test-{tag}"))
        ));
        let dir = tempfile::tempdir().unwrap();
        // Traversable by the unprivileged users tests run clients and reviewers as;
        // what phigate keeps private (state, records) it creates 0700 itself.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let w = World {
            netns,
            cgroup,
            dir,
            pin_dir,
            agent: None,
            agent_env: Vec::new(),
            agent_hostname: None,
        };
        // Deny by default: tests that are not about policy get one permit for all.
        w.write_policies(&[(
            "allow-all.cedar",
            "@id(\"test.allow-all\")\npermit (principal, action, resource);\n",
        )]);
        w
    }

    pub fn policies_dir(&self) -> PathBuf {
        self.path("policies")
    }

    /// Replaces the policy files (`*.cedar`) with `files`, beside the shipped schema,
    /// masking profiles and approval rules (policies may name them; a test may
    /// overwrite approvals.toml after).
    pub fn write_policies(&self, files: &[(&str, &str)]) {
        let dir = self.policies_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cedar") {
                std::fs::remove_file(p).unwrap();
            }
        }
        std::fs::copy(
            shipped_policies().join("schema.cedarschema"),
            dir.join("schema.cedarschema"),
        )
        .unwrap();
        if !dir.join("approvals.toml").exists() {
            std::fs::copy(
                shipped_policies().join("approvals.toml"),
                dir.join("approvals.toml"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(dir.join("profiles")).unwrap();
        for e in std::fs::read_dir(shipped_policies().join("profiles")).unwrap() {
            let p = e.unwrap().path();
            let target = dir.join("profiles").join(p.file_name().unwrap());
            if !target.exists() {
                std::fs::copy(&p, target).unwrap();
            }
        }
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn records_dir(&self) -> PathBuf {
        self.path("records")
    }

    /// The [agent] section for this world; `extra` is appended inside [agent].
    pub fn agent_section(&self, extra: &str) -> String {
        self.agent_and_records(extra, "")
    }

    /// The [agent] and [records] sections, each with extra lines.
    pub fn agent_and_records(&self, extra: &str, records_extra: &str) -> String {
        format!(
            "[agent]\nlisten = [\"127.0.0.1:15001\", \"[::1]:15001\"]\nstate_dir = \"{d}/state\"\nrecords_dir = \"{d}/records\"\npolicies_dir = \"{d}/policies\"\ncgroup = \"{cg}\"\nbpf_pin_dir = \"{pin}\"\n{extra}\n\n[admin]\nsocket = \"{d}/admin.sock\"\n\n[records]\nrotate_secs = {rotate}\n{records_extra}\n",
            d = self.dir.path().display(),
            cg = self.cgroup.path.display(),
            pin = self.pin_dir.display(),
            rotate = RECORDS_ROTATE_SECS,
        )
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("phigate.toml")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts phigate in the netns (outside the test cgroup unless `inside`).
    pub fn start_agent(&mut self, inside: bool) {
        let bin = phigate_bin();
        let config = self.config_path();
        let place = Place {
            netns: Some(&self.netns),
            cgroup: inside.then_some(&self.cgroup),
            uid: None,
        };
        let log = self.path(&format!("agent-{}.log", unique("run")));
        let mut argv: Vec<&str> = Vec::new();
        // unshare and sh exec in place: the agent keeps the pid SIGTERM goes to.
        let set_hostname = self
            .agent_hostname
            .as_ref()
            .map(|h| format!("hostname {h} && exec \"$@\""));
        if let Some(script) = &set_hostname {
            argv.extend(["unshare", "--uts", "sh", "-c", script, "sh"]);
        }
        if !self.agent_env.is_empty() {
            // As systemd does: WATCHDOG_PID names the agent's own pid.
            argv.extend(["sh", "-c", "export WATCHDOG_PID=$$; exec env \"$@\"", "sh"]);
            argv.extend(self.agent_env.iter().map(String::as_str));
        }
        argv.extend([
            bin.to_str().unwrap(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ]);
        let mut agent = Background::spawn(place, &argv, log);
        // The listener accepts (kernel backlog) before the programs are attached;
        // "ready" is logged once protected connects really reach the agent.
        let t = Instant::now();
        while !agent
            .log_text()
            .lines()
            .any(|l| l.trim_end().ends_with(" ready"))
        {
            if t.elapsed() > Duration::from_secs(20) || agent_exited(&mut agent) {
                panic!("phigate did not become ready:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = Some(agent);
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").pid()
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.child.kill().unwrap();
            a.child.wait().unwrap();
        }
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn sigterm(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut a = self.agent.take().expect("agent running");
        // SAFETY: signalling our child.
        unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = a.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > within {
                panic!(
                    "phigate did not exit within {within:?} of SIGTERM:\n{}",
                    a.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The running agent's `phigate status --json`.
    pub fn status(&self) -> Value {
        let out = Command::new(phigate_bin())
            .args(["status", "--json", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Waits (at most 5 s) until the running agent reports its records writable, or
    /// not (`phigate status`: the free-space check runs every 100 ms).
    pub fn wait_records_writable(&self, want: bool) {
        let t = Instant::now();
        loop {
            let v = self.status();
            if v["records_writable"] == want {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "records_writable is not {want}: {v}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn detach(&self) -> Output {
        Command::new(phigate_bin())
            .args(["detach", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap()
    }

    /// Records of `table`, leaving out the harness's own readiness probes (direct
    /// connects to the listener, recorded as `not_redirected`).
    pub fn records(&self, table: &str) -> Vec<Value> {
        self.all_records(table)
            .into_iter()
            .filter(|r| r["outcome"] != "not_redirected")
            .collect()
    }

    /// Every row of `table` in the Parquet files written so far (the agent under
    /// test closes a file every RECORDS_ROTATE_SECS).
    pub fn all_records(&self, table: &str) -> Vec<Value> {
        let t = phigate::record::Table::from_name(table).expect("a records table");
        // A read error is a failure, never "no records": the assertions that nothing
        // was recorded must not pass because reading broke. A file sealed while we
        // read is retried.
        let mut last = None;
        for _ in 0..5 {
            match phigate::record::read::rows(&self.records_dir(), t) {
                Ok(rows) => return rows,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "reading the {table} records in {} failed: {:#}",
            self.records_dir().display(),
            last.expect("an error")
        )
    }

    /// Waits until `table` has at least `n` records.
    pub fn wait_records(&self, table: &str, n: usize) -> Vec<Value> {
        let t = Instant::now();
        loop {
            let r = self.records(table);
            if r.len() >= n {
                return r;
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!(
                    "expected {n} {table} records, have {}: {r:?}\nagent log:\n{}",
                    r.len(),
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The rows of `table` (every file, as `all_records`) that `pred` accepts, once
    /// there are at least `n` of them, waiting up to 10 s; panics naming `what`.
    /// Waiting on a count of all rows instead races: a refusal's row can arrive
    /// before the served request's row that the test is about.
    pub fn wait_rows(
        &self,
        table: &str,
        n: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let t = Instant::now();
        loop {
            let rows = self.all_records(table);
            let hits: Vec<Value> = rows.iter().filter(|r| pred(r)).cloned().collect();
            if hits.len() >= n {
                return hits;
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!(
                    "expected {n} {table} rows {what}, have {}: {rows:?}",
                    hits.len()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The first row of `table` (every file, as `all_records`) that `pred` accepts,
    /// waiting up to 10 s for it to be written; panics naming `what` otherwise.
    pub fn wait_row(&self, table: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let rows = self.all_records(table);
            if let Some(r) = rows.iter().find(|r| pred(r)) {
                return r.clone();
            }
            if t.elapsed() > Duration::from_secs(10) {
                panic!("no {table} row {what}: {rows:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn inside(&self) -> Place<'_> {
        Place {
            netns: Some(&self.netns),
            cgroup: Some(&self.cgroup),
            uid: None,
        }
    }

    /// Where the threat model's attacker runs: an unprivileged process (`nobody`) in
    /// the protected cgroup. Its tools: curl, openssl, `/usr/bin/python3` (files it
    /// reads go through [`World::public_copy`]).
    pub fn unprivileged(&self) -> Place<'_> {
        Place {
            uid: Some(NOBODY),
            ..self.inside()
        }
    }

    /// A copy of `file` in the world's directory that every user may read (the
    /// agent's CA, an upstream's CA); its path.
    pub fn public_copy(&self, file: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("public-{}", file.file_name().unwrap().to_string_lossy());
        let to = self.dir.path().join(unique(&name));
        std::fs::copy(file, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        to
    }

    pub fn outside(&self) -> Place<'_> {
        Place {
            netns: Some(&self.netns),
            cgroup: None,
            uid: None,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.agent_log());
        }
        self.kill9();
        if self.config_path().exists() {
            let _ = self.detach();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A small tmpfs mounted over a directory (e.g. the records directory, to fill it);
/// unmounted on drop, before the temporary directory goes.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
        );
        Tmpfs(dir.to_owned())
    }

    /// Writes zeros into `fill` until the filesystem is full.
    pub fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.0.join("fill").display()))
            .stderr(Stdio::null())
            .status();
    }

    /// Frees what [`Self::fill`] took.
    pub fn free(&self) {
        std::fs::remove_file(self.0.join("fill")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold files in it until the world is dropped.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A plain TCP server inside a netns that answers each connection with a fixed
/// HTTP response and counts connections.
pub struct CountingServer {
    pub addr: SocketAddr,
    pub count: std::sync::Arc<AtomicU32>,
    pub peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl CountingServer {
    pub fn start(netns: &Netns, addr: &str, body: &'static str) -> CountingServer {
        let addr: SocketAddr = addr.parse().unwrap();
        let count = std::sync::Arc::new(AtomicU32::new(0));
        let peers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, p) = (count.clone(), peers.clone());
        let listener = netns.run(move || std::net::TcpListener::bind(addr).expect("bind upstream"));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                if let Ok(peer) = s.peer_addr() {
                    p.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    use std::io::Read;
                    let mut buf = [0u8; 4096];
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        CountingServer { addr, count, peers }
    }

    pub fn connections(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }
}

/// A CA and a server certificate made with openssl, for TLS upstreams.
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// `sans`: e.g. "IP:127.0.0.2,DNS:patients.example.test". `days` may be negative
    /// for an expired certificate.
    pub fn new(dir: &Path, name: &str, sans: &str) -> TestPki {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={name}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        TestPki {
            ca: d.join("ca.pem"),
            cert: d.join("server.pem"),
            key: d.join("server.key"),
        }
    }
}

/// A client certificate from `pki`'s CA (`clientAuth`), its key 0600.
pub fn client_cert(pki: &TestPki) -> (PathBuf, PathBuf) {
    let d = pki.ca.parent().unwrap();
    std::fs::write(
        d.join("client.cnf"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=phigate",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
        "-extfile",
        "client.cnf",
    ]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("client.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    (d.join("client.pem"), d.join("client.key"))
}

/// Starts the Node upstream (tests/upstream/server.js) in the netns.
pub fn node_upstream(
    world: &World,
    host: &str,
    port: u16,
    pki: Option<&TestPki>,
    extra: &[&str],
) -> Background {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("upstream/server.js");
    let port_s = port.to_string();
    let mut argv: Vec<String> = vec![
        "node".into(),
        script.display().to_string(),
        "--host".into(),
        host.into(),
        "--port".into(),
        port_s,
    ];
    match pki {
        Some(p) => argv.extend([
            "--cert".into(),
            p.cert.display().to_string(),
            "--key".into(),
            p.key.display().to_string(),
        ]),
        None => argv.push("--plain".into()),
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv_ref: Vec<&str> = argv.iter().map(String::as_str).collect();
    let bg = Background::spawn(
        world.outside(),
        &argv_ref,
        world.path(&unique("upstream.log")),
    );
    let addr: SocketAddr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
    .parse()
    .unwrap();
    assert!(
        world.netns.wait_port(addr, Duration::from_secs(10)),
        "upstream did not start: {}",
        bg.log_text()
    );
    bg
}

/// SHA-256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

/// Peak RSS (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The agent's Prometheus text at `addr` (`[metrics] listen`), scraped by a curl
/// outside the protected cgroup.
pub fn scrape_metrics(w: &World, addr: &str) -> String {
    let url = format!("http://{addr}/metrics");
    let out = output(w.outside(), &["curl", "-sS", "--max-time", "10", &url]);
    assert!(out.status.success(), "scrape failed: {}", stderr(&out));
    stdout(&out)
}

/// The agent's metrics whose names start with `prefix`, scraped: name -> value.
pub fn metrics_with_prefix(w: &World, addr: &str, prefix: &str) -> HashMap<String, f64> {
    scrape_metrics(w, addr)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// curl from the protected cgroup (through the redirect), trusting `ca`: the
/// status code.
pub fn curl_status(w: &World, ca: &Path, extra: &[&str], url: &str) -> String {
    let mut argv = vec![
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "20",
        "--cacert",
        ca.to_str().unwrap(),
    ];
    argv.extend(extra);
    argv.push(url);
    stdout(&output(w.inside(), &argv))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with context when a command did not succeed.
pub fn ok(o: Output) -> anyhow::Result<Output> {
    if !o.status.success() {
        bail!("exit {}: {}{}", o.status, stdout(&o), stderr(&o));
    }
    Ok(o)
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(anyhow::anyhow!("timed out waiting for {what}")).context(format!("after {timeout:?}"))
}

/// A number from the environment (the soak's PHIGATE_SOAK_*), else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// tests/load/client.py in `place`: `clients` concurrent keep-alive HTTPS clients
/// (with `storm`, a new connection per request) sending `GET path` to
/// 127.0.0.2:9443 for `secs`. Its report comes from [`load_report`].
pub fn load_client(
    place: Place<'_>,
    ca: &str,
    path: &str,
    clients: u64,
    secs: u64,
    storm: bool,
) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("load/client.py");
    let (clients, secs) = (clients.to_string(), secs.to_string());
    let mut argv = vec![
        "python3",
        script.to_str().unwrap(),
        "--host",
        "127.0.0.2",
        "--port",
        "9443",
        "--ca",
        ca,
        "--path",
        path,
        "--clients",
        &clients,
        "--secs",
        &secs,
    ];
    if storm {
        argv.push("--storm");
    }
    command(place, &argv)
}

/// The load client's JSON report: requests sent, responses by status, errors.
pub fn load_report(out: &Output) -> Value {
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("load client ({e}): {}{}", stdout(out), stderr(out)))
}

/// A script of tests/node (npm packages installed there by `cargo xtask setup`).
pub fn node_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("node")
        .join(name)
}

/// A real OIDC provider (the `oidc-provider` npm package, tests/node/oidc-provider.mjs)
/// in the world's netns on 127.0.0.1:`port`, serving HTTPS with `pki`; its signing
/// keys in `keys` (created with `kid` when missing).
pub fn start_idp(w: &World, pki: &TestPki, port: u16, keys: &Path, kid: &str) -> Background {
    start_idp_with(w, pki, port, keys, kid, &[])
}

/// [`start_idp`] with more of the provider's options (`--smart-key`, `--backend-ttl`).
pub fn start_idp_with(
    w: &World,
    pki: &TestPki,
    port: u16,
    keys: &Path,
    kid: &str,
    extra: &[&str],
) -> Background {
    let script = node_script("oidc-provider.mjs");
    assert!(
        script.with_file_name("node_modules/oidc-provider").exists(),
        "oidc-provider is not installed: run `cargo xtask setup` (npm install in tests/node)"
    );
    let port_s = port.to_string();
    let bg = Background::spawn(
        w.outside(),
        &[
            "node",
            script.to_str().unwrap(),
            "--port",
            &port_s,
            "--cert",
            pki.cert.to_str().unwrap(),
            "--key",
            pki.key.to_str().unwrap(),
            "--keys",
            keys.to_str().unwrap(),
            "--kid",
            kid,
        ]
        .into_iter()
        .chain(extra.iter().copied())
        .collect::<Vec<_>>(),
        w.path(&unique("idp.log")),
    );
    assert!(
        w.netns.wait_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(15)
        ),
        "the OIDC provider did not start: {}",
        bg.log_text()
    );
    bg
}

/// An access token from the provider on `port` by client credentials (every test
/// client's secret is `secret`) for `resource`.
pub fn idp_token(w: &World, pki: &TestPki, port: u16, client: &str, resource: &str) -> String {
    let out = output(
        w.outside(),
        &[
            "curl",
            "-sS",
            "--cacert",
            pki.ca.to_str().unwrap(),
            &format!("https://127.0.0.1:{port}/token"),
            "-d",
            "grant_type=client_credentials",
            "-d",
            &format!("client_id={client}"),
            "-d",
            "client_secret=secret",
            "-d",
            &format!("resource={resource}"),
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("token response ({e}): {}", stdout(&out)));
    v["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token: {v}"))
        .to_owned()
}
