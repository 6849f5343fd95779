//! phigate as a systemd service: the sd_notify protocol (`Type=notify`) spoken to a
//! socket standing in for systemd's.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use phigate_e2e::*;

/// Receives notifications until one contains `want` (each datagram is one message).
fn expect(sock: &UnixDatagram, want: &str, within: Duration) -> String {
    let t = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while t.elapsed() < within {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg
                .lines()
                .any(|l| l == want || l.starts_with(&format!("{want}=")))
            {
                return msg;
            }
            seen.push(msg);
        }
    }
    panic!("no {want} within {within:?}; got {seen:?}");
}

#[test]
fn sd_notify_reports_ready_reload_watchdog_and_stop() {
    let mut w = World::new("notify");
    let path = w.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    w.agent_env = vec![
        format!("NOTIFY_SOCKET={}", path.display()),
        "WATCHDOG_USEC=400000".into(),
    ];
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"api\"\naddresses = [\"127.0.0.2:9000\"]\nprotocol = \"tcp\"\n",
        w.agent_section("")
    ));
    w.start_agent(false);
    expect(&sock, "READY=1", Duration::from_secs(5));
    // The watchdog is pinged at half of WATCHDOG_USEC.
    expect(&sock, "WATCHDOG=1", Duration::from_secs(2));

    // SIGHUP: RELOADING=1 with the monotonic time systemd 253+ asks for, then READY=1.
    // SAFETY: signalling our child.
    unsafe { libc::kill(w.agent_pid() as i32, libc::SIGHUP) };
    let msg = expect(&sock, "RELOADING=1", Duration::from_secs(5));
    assert!(msg.contains("MONOTONIC_USEC="), "{msg}");
    expect(&sock, "READY=1", Duration::from_secs(5));

    // SIGTERM: STOPPING=1 before the drain, and a clean exit.
    // SAFETY: as above.
    unsafe { libc::kill(w.agent_pid() as i32, libc::SIGTERM) };
    expect(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(w.sigterm(Duration::from_secs(20)).success());
}

fn mode(p: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

fn run(argv: &[&str]) -> std::process::Output {
    std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// The package built by `cargo xtask package` installs on this machine, its unit
/// passes `systemd-analyze verify`, and it removes cleanly (keeping the records).
#[test]
fn the_debian_package_installs_verifies_and_purges() {
    let deb = std::env::var("PHIGATE_DEB").expect(
        "PHIGATE_DEB: the .deb to test (cargo xtask test builds it with cargo xtask package)",
    );
    let state_existed = std::path::Path::new("/var/lib/phigate").exists();
    let out = run(&["dpkg", "-i", &deb]);
    assert!(
        out.status.success(),
        "dpkg -i: {}{}",
        stdout(&out),
        stderr(&out)
    );

    assert_eq!(mode("/usr/bin/phigate"), 0o755);
    assert_eq!(mode("/etc/phigate/phigate.toml"), 0o600);
    assert_eq!(mode("/var/lib/phigate"), 0o700);
    assert_eq!(mode("/var/lib/phigate/ca-key.pem"), 0o600);
    assert!(std::path::Path::new("/usr/share/phigate/queries/patient_access.sql").exists());
    // The host trusts the CA the postinst created.
    let ca = std::fs::read_to_string("/var/lib/phigate/ca.pem").unwrap();
    let trusted =
        std::fs::read_to_string("/usr/local/share/ca-certificates/phigate-ca.crt").unwrap();
    assert_eq!(ca.trim(), trusted.trim());
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap();
    assert!(
        bundle.contains(ca.trim().lines().nth(1).unwrap()),
        "CA not in the bundle"
    );
    // Enabled (not started: there may be no running systemd).
    let unit = [
        "/lib/systemd/system/phigate.service",
        "/usr/lib/systemd/system/phigate.service",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("the unit file is installed");
    assert!(
        std::fs::symlink_metadata("/etc/systemd/system/multi-user.target.wants/phigate.service")
            .is_ok(),
        "the unit is enabled"
    );
    let out = run(&[
        "/usr/bin/phigate",
        "config",
        "check",
        "/etc/phigate/phigate.toml",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["systemd-analyze", "verify", unit]);
    let complaints: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap()
        .lines()
        .filter(|l| l.contains("phigate"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}",
        stderr(&out)
    );

    let out = run(&["dpkg", "--purge", "phigate"]);
    assert!(
        out.status.success(),
        "dpkg --purge: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(!std::path::Path::new("/usr/bin/phigate").exists());
    assert!(!std::path::Path::new("/usr/local/share/ca-certificates/phigate-ca.crt").exists());
    assert!(!std::path::Path::new(unit).exists());
    // Records and keys are audit evidence: kept, and the purge says so.
    assert!(std::path::Path::new("/var/lib/phigate/ca.pem").exists());
    assert!(stderr(&out).contains("is kept"), "{}", stderr(&out));
    if !state_existed {
        let _ = std::fs::remove_dir_all("/var/lib/phigate");
    }
}
