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
