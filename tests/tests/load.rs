//! Load through the real redirect: many concurrent keep-alive HTTPS clients, then a
//! new-connection storm, against a real upstream. Nothing lost (every response has
//! its record), nothing failed, memory bounded, no file descriptor leaked.
//!
//! Short by default (CI); `cargo xtask soak` runs it bigger and longer through
//! PHIGATE_SOAK_CLIENTS and PHIGATE_SOAK_SECS. Figures go to stderr, for
//! docs/reliability.md.

use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Load {
    sent: u64,
    ok: u64,
    errors: u64,
    connections: u64,
    raw: Value,
}

fn run_clients(w: &World, ca: &str, clients: u64, secs: u64, storm: bool) -> Load {
    let out = load_client(w.inside(), ca, "/json?bytes=512", clients, secs, storm)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let raw = load_report(&out);
    Load {
        sent: raw["sent"].as_u64().unwrap(),
        ok: raw["status"]["200"].as_u64().unwrap_or(0),
        errors: raw["error_count"].as_u64().unwrap(),
        connections: raw["connections"].as_u64().unwrap(),
        raw,
    }
}

#[test]
fn concurrent_clients_and_a_connection_storm_lose_nothing() {
    let clients = env_or("PHIGATE_SOAK_CLIENTS", 200);
    let secs = env_or("PHIGATE_SOAK_SECS", 8);
    let mut w = World::new("load");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    // HTTP/2 to the upstream: phigate multiplexes its clients onto pooled h2
    // connections (and sends again the bodiless GETs caught by a GOAWAY).
    let _upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let pid = w.agent_pid();
    let ca = w.path("state/ca.pem").display().to_string();
    let fds_before = open_fds(pid);

    // Keep-alive clients, all at once.
    let keep = run_clients(&w, &ca, clients, secs, false);
    // A storm of new connections: every request its own TCP + TLS handshake.
    let storm = run_clients(&w, &ca, (clients / 4).max(20), secs.div_ceil(2), true);
    let rss_mib = peak_rss_kib(pid) / 1024;

    let failed: std::collections::BTreeMap<String, usize> = w
        .all_records("requests")
        .iter()
        .filter(|r| r["status"] != 200)
        .fold(Default::default(), |mut m, r| {
            *m.entry(format!("{} {} {}", r["status"], r["outcome"], r["error"]))
                .or_default() += 1;
            m
        });
    eprintln!("load: responses other than 200, by reason: {failed:?}");
    for (name, l) in [("keep-alive", &keep), ("storm", &storm)] {
        eprintln!(
            "load {name}: {} requests, {} ok, {} errors, {} connections ({})",
            l.sent, l.ok, l.errors, l.connections, l.raw["status"]
        );
        assert_eq!(l.errors, 0, "{name}: {}", l.raw);
        assert_eq!(
            l.ok, l.sent,
            "{name}: every request answered 200: {}",
            l.raw
        );
        assert!(l.ok > 0, "{name}: nothing was sent");
    }
    assert!(keep.connections >= clients, "{}", keep.raw);

    // Every response has its request record, and every connection its row.
    let responses = keep.ok + storm.ok;
    let connections = keep.connections + storm.connections;
    let t = std::time::Instant::now();
    let (mut requests, mut conns) = (0, 0);
    while t.elapsed() < Duration::from_secs(60) {
        requests = w.all_records("requests").len() as u64;
        conns = w.all_records("connections").len() as u64;
        if requests >= responses && conns >= connections {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(requests, responses, "request records vs responses");
    assert_eq!(conns, connections, "connection records vs connections");

    // Closed clients leave nothing open in the agent (pooled upstream connections
    // close after the pool's idle timeout, hence the wait).
    let mut fds_after = open_fds(pid);
    let t = std::time::Instant::now();
    while fds_after > fds_before + 8 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(500));
        fds_after = open_fds(pid);
    }
    eprintln!(
        "load: {clients} clients, {secs} s; {responses} responses = {requests} request records; {connections} connections = {conns} connection records; agent peak RSS {rss_mib} MiB; fds before {fds_before}, after {fds_after}"
    );
    assert!(
        fds_after <= fds_before + 8,
        "fd leak: {fds_before} -> {fds_after}"
    );
    assert!(rss_mib < 1024, "agent peak RSS {rss_mib} MiB");
}
