//! Small helpers for running commands with clear output.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

pub fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs a named step, printing its start and outcome.
pub fn step(name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("\n== {name}");
    let r = f();
    if let Err(e) = &r {
        println!("== {name}: FAILED: {e:#}");
    }
    r
}

pub fn cargo(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    exec(&mut cmd)
}

/// Runs a command inheriting stdio; fails with the command line on a non-zero exit.
pub fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Runs a command quietly; true when it exits 0.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a command and returns its stdout (trimmed) when it exits 0.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("run this as root: {why} (e.g. `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

/// Mounts bpffs at /sys/fs/bpf unless a bpf filesystem is mounted there already.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split(" - ").nth(1).is_some_and(|t| t.starts_with("bpf "))
            && l.split(' ').nth(4) == Some("/sys/fs/bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    exec(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The cgroup2 mount point (the agent's own reading of /proc/self/mountinfo).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    Ok(phigate_common::host::cgroup2_root()?)
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Runs this same xtask command again inside a fresh network namespace with only
/// loopback, so the demo and benchmarks never collide with ports of the host.
/// Returns `true` when the child did the work (the caller just returns), `false`
/// when already inside.
pub fn reexec_in_netns(name: &str) -> anyhow::Result<bool> {
    const MARK: &str = "PHIGATE_XTASK_NETNS";
    if std::env::var_os(MARK).is_some() {
        return Ok(false);
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    exec(Command::new("ip").args(["netns", "add", name]))?;
    let result = (|| {
        exec(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        // Ctrl-C reaches the child too; it cleans up, this process waits for it.
        // A handler (not SIG_IGN) so the child starts with the default disposition.
        // SAFETY: installing a handler that does nothing.
        unsafe {
            libc::signal(
                libc::SIGINT,
                ignore_signal as *const () as libc::sighandler_t,
            )
        };
        let status = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{name}"))
            .arg("--")
            .arg(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env(MARK, name)
            .status()
            .context("running nsenter")?;
        if !status.success() {
            bail!("{status}");
        }
        Ok(())
    })();
    let _ = Command::new("ip").args(["netns", "del", name]).status();
    result.map(|()| true)
}

/// Files of a test PKI made by [`make_pki`].
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA and a server certificate signed by it (P-256, two days), made with openssl in
/// `dir`: `upstream-ca.pem`, `server.pem`, `server.key`. `sans` e.g.
/// `IP:127.0.0.2,DNS:api.test`.
pub fn make_pki(dir: &Path, ca_name: &str, sans: &str) -> anyhow::Result<Pki> {
    std::fs::write(
        dir.join("ext.cnf"),
        format!("subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        exec(
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_subj = format!("/CN={ca_name}");
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "upstream-ca.key",
                "-out",
                "upstream-ca.pem",
                "-days",
                "2",
                "-subj",
                &ca_subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=upstream",
            ],
        ]
        .concat(),
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "upstream-ca.pem",
        "-CAkey",
        "upstream-ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    Ok(Pki {
        ca: dir.join("upstream-ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    })
}

/// A policy directory (shipped schema) with one permit for everything: for runs that
/// measure or show something other than policy.
pub fn allow_all_policies(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(
        root_dir().join("policies/schema.cedarschema"),
        dir.join("schema.cedarschema"),
    )?;
    std::fs::write(
        dir.join("allow-all.cedar"),
        "@id(\"allow-all\")\npermit (principal, action, resource);\n",
    )?;
    Ok(())
}

/// A fixed-offset zone (`Etc/GMT-5` is UTC+5) in which it is now `hour` o'clock: the
/// demo pins its policy clock with `[policy] timezone`, the setting operators use, so
/// the tour decides the same at any hour (the e2e harness has the same helper).
pub fn timezone_at(hour: u8) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let utc_hour = ((now / 3600) % 24) as i64;
    // tzdb has offsets from UTC-12 to UTC+14.
    let mut offset = (i64::from(hour) - utc_hour).rem_euclid(24);
    if offset > 14 {
        offset -= 24;
    }
    match offset {
        0 => "Etc/GMT".into(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}
