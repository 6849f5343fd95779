//! What phigate lets through without reading it is decided like every request:
//! a connection to a `tcp` destination (`TCP`), a TLS connection whose SNI is in
//! `passthrough_hosts` (`TUNNEL`), and a request switching protocols (`UPGRADE`).
//! Under a policy set that names none of them, each is refused and recorded with
//! the decision; a permit naming one lets exactly that one through, and a later set
//! that no longer names it closes it. Real clients (curl, `openssl s_client`,
//! websocket-client) through the real redirect, run as `nobody`.

use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const API: &str = "127.0.0.2:9443";
const DB: &str = "127.0.0.3:5432";

/// Only reads of /fhir/Patient/* on the API: nothing about passages.
const READS: &str = r#"@id("passages.reads")
permit (principal, action in Phigate::Action::"read", resource == Phigate::Destination::"fhir-api")
when { context.path like "/fhir/Patient/*" };
"#;

/// READS, plus one permit per passage, each as narrow as it can be.
const PASSAGES: &str = r#"
@id("passages.db")
permit (principal, action == Phigate::Action::"TCP", resource == Phigate::Destination::"raw-db")
when { principal.user == "nobody" };

@id("passages.pinned")
permit (principal, action == Phigate::Action::"TUNNEL", resource == Phigate::Destination::"fhir-api")
when { context has sni && context.sni == "pinned.test" };

@id("passages.websocket")
permit (principal, action == Phigate::Action::"UPGRADE", resource == Phigate::Destination::"fhir-api")
when { context.path == "/fhir/Patient/stream" };
"#;

struct Passages {
    w: World,
    /// The upstream's CA and the agent's, readable by the unprivileged clients.
    upstream_ca: std::path::PathBuf,
    ca: std::path::PathBuf,
    db: CountingServer,
    _api: Background,
}

fn start(tag: &str) -> Passages {
    let mut w = World::new(tag);
    w.write_policies(&[("p.cedar", READS)]);
    let pki = TestPki::new(
        w.dir.path(),
        "upstream",
        "IP:127.0.0.2,DNS:api.test,DNS:pinned.test",
    );
    // HTTP/1.1 only: Node's HTTP/2 server does not hand HTTP/1 upgrades over.
    let api = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &["--h1only"]);
    let db = CountingServer::start(&w.netns, DB, "db");
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"fhir-api\"\naddresses = [\"{API}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\npassthrough_hosts = [\"pinned.test\"]\n\n[[destinations]]\nname = \"raw-db\"\naddresses = [\"{DB}\"]\nprotocol = \"tcp\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    Passages {
        upstream_ca: w.public_copy(&pki.ca),
        ca: w.public_copy(&w.path("state/ca.pem")),
        w,
        db,
        _api: api,
    }
}

impl Passages {
    fn db_connect(&self) -> String {
        let out = output(
            self.w.unprivileged(),
            &["curl", "-sS", "--max-time", "5", &format!("http://{DB}/")],
        );
        format!("{}{}", stdout(&out), stderr(&out))
    }

    fn tunnel(&self) -> String {
        let out = output(
            self.w.unprivileged(),
            &[
                "sh",
                "-c",
                &format!(
                    "openssl s_client -connect {API} -servername pinned.test -CAfile {} -verify_return_error </dev/null 2>&1",
                    self.upstream_ca.display()
                ),
            ],
        );
        stdout(&out)
    }

    /// websocket-client to /fhir/Patient/stream: `Ok(echo)` or `Err(status)`.
    fn websocket(&self) -> Result<String, u64> {
        let ca = self.ca.display().to_string();
        let script = format!(
            r#"
import json, ssl, socket, websocket
ctx = ssl.create_default_context(cafile={ca:?})
sock = ctx.wrap_socket(socket.create_connection(("127.0.0.2", 9443)), server_hostname="api.test")
try:
    ws = websocket.create_connection("wss://api.test:9443/fhir/Patient/stream", socket=sock)
    ws.send("ping")
    print(json.dumps({{"echo": ws.recv()}}))
except websocket.WebSocketBadStatusException as e:
    print(json.dumps({{"status": e.status_code}}))
"#
        );
        let out = output(self.w.unprivileged(), &["/usr/bin/python3", "-c", &script]);
        let v: Value = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
        match v["status"].as_u64() {
            Some(s) => Err(s),
            None => Ok(v["echo"].as_str().unwrap_or_default().to_owned()),
        }
    }

    /// The first row of `table` that `pred` accepts, waiting for it to be written.
    fn connection(&self, destination: &str, outcome: &str) -> Value {
        self.w.wait_row(
            "connections",
            &format!("for {destination} with outcome {outcome}"),
            |r| r["destination"] == destination && r["outcome"] == outcome,
        )
    }
}

#[test]
fn passages_no_policy_names_are_refused_and_recorded_and_a_permit_opens_exactly_one() {
    require_root();
    let p = start("passages");

    // TCP: refused before any byte reaches the database.
    let said = p.db_connect();
    assert!(!said.contains("db"), "{said}");
    assert_eq!(p.db.connections(), 0, "the database saw a connection");
    let c = p.connection("raw-db", "denied");
    assert_eq!(c["decision"], "deny", "{c}");
    assert_eq!(c["policy_ids"], serde_json::json!([]));
    assert!(
        c["policy_set_hash"].as_str().is_some_and(|h| !h.is_empty()),
        "{c}"
    );
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("TCP denied by policy: no_permit"),
        "{c}"
    );

    // TUNNEL: the pinned name gets no tunnel (no certificate at all arrives).
    let text = p.tunnel();
    assert!(!text.contains("upstream test CA"), "{text}");
    let c = p.connection("fhir-api", "denied");
    assert_eq!(c["sni"], "pinned.test");
    assert_eq!(c["decision"], "deny", "{c}");

    // UPGRADE: the read is permitted, the switch of protocols is not.
    assert_eq!(p.websocket(), Err(403));
    let r =
        p.w.wait_row("requests", "refused 403", |r| r["status"] == 403);
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["upgraded"], false);

    // One permit per passage, each as narrow as can be: each now passes.
    p.w.write_policies(&[("p.cedar", READS), ("passages.cedar", PASSAGES)]);
    wait_until(
        "the passages to be permitted",
        Duration::from_secs(15),
        || p.db_connect().contains("db"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", p.w.agent_log()));
    let c = p.connection("raw-db", "closed");
    assert_eq!(c["decision"], "allow", "{c}");
    assert_eq!(c["policy_ids"], serde_json::json!(["passages.db"]));

    let text = p.tunnel();
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(
        text.contains("upstream test CA"),
        "the upstream's own certificate: {text}"
    );
    let c = p.connection("fhir-api", "uninspected");
    assert_eq!(c["policy_ids"], serde_json::json!(["passages.pinned"]));

    assert_eq!(p.websocket(), Ok("ping".to_owned()));
    let r =
        p.w.wait_row("requests", "upgraded", |r| r["upgraded"] == true);
    assert_eq!(r["status"], 101, "{r}");
    // The tunnel's bytes are counted: a WebSocket frame each way at least.
    assert!(r["response_bytes"].as_u64().unwrap() >= 6, "{r}");
    assert!(r["request_bytes"].as_u64().unwrap() >= 6, "{r}");
}

#[test]
fn an_upgraded_tunnel_ends_at_the_idle_timeout() {
    require_root();
    let mut w = World::new("tunnel-idle");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2,DNS:api.test");
    let _api = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &["--h1only"]);
    w.write_config(&format!(
        "{}\n[timeouts]\nidle_secs = 2\n\n[[destinations]]\nname = \"fhir-api\"\naddresses = [\"{API}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem")).display().to_string();
    // Upgrade, exchange one message, then stay silent: the tunnel must be closed
    // by phigate within the idle bound, as any connection is.
    let script = format!(
        r#"
import json, ssl, socket, time, websocket
ctx = ssl.create_default_context(cafile={ca:?})
sock = ctx.wrap_socket(socket.create_connection(("127.0.0.2", 9443)), server_hostname="api.test")
ws = websocket.create_connection("wss://api.test:9443/ws", socket=sock)
ws.send("ping"); ws.recv()
t = time.time()
ws.settimeout(20)
try:
    ws.recv()
    closed = "message"
except websocket.WebSocketConnectionClosedException:
    closed = "closed"
except Exception as e:
    closed = type(e).__name__
print(json.dumps({{"closed": closed, "after": time.time() - t}}))
"#
    );
    let out = output(w.unprivileged(), &["/usr/bin/python3", "-c", &script]);
    let v: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
    assert_eq!(v["closed"], "closed", "{v}");
    let after = v["after"].as_f64().unwrap();
    assert!((1.5..10.0).contains(&after), "closed after {after} s: {v}");
    let mut rec = None;
    let _ = wait_until("the tunnel's record", Duration::from_secs(10), || {
        rec = w
            .all_records("requests")
            .into_iter()
            .find(|r| r["upgraded"] == true);
        rec.is_some()
    });
    let r = rec.expect("the tunnel's record");
    assert_eq!(r["outcome"], "idle_timeout", "{r}");
}

/// Echoes every byte back until the peer closes.
const ECHO: &str = r#"
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
def serve(c):
    with c:
        while (b := c.recv(4096)):
            c.sendall(b)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"#;

/// Keeps one uninspected connection busy: a TCP echo (`tcp HOST PORT`) or a TLS
/// tunnel by SNI to the API (`tunnel CA`), one exchange every 100 ms; prints `up`
/// after the first, and `closed` with how many exchanges when it ends.
const BUSY: &str = r#"
import socket, ssl, sys, time
if sys.argv[1] == "tcp":
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=5)
    def exchange():
        s.sendall(b"x")
        return s.recv(16) == b"x"
else:
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.2", 9443), timeout=5),
                        server_hostname="pinned.test")
    def exchange():
        s.sendall(b"GET /fhir/Patient/1 HTTP/1.1\r\nHost: pinned.test\r\n\r\n")
        return s.recv(65536).startswith(b"HTTP/1.1 ")
n = 0
try:
    while exchange():
        n += 1
        if n == 1:
            print("up", flush=True)
        time.sleep(0.1)
except Exception as e:
    print("error", type(e).__name__, flush=True)
print("closed", n, flush=True)
"#;

/// A policy set that no longer permits a TCP relay or a TLS tunnel closes the ones
/// open at once, and records them `revoked` with the set that decided. The clients
/// run as `nobody`.
#[test]
fn a_new_policy_set_closes_open_tcp_relays_and_tunnels_it_no_longer_permits() {
    require_root();
    const ECHO_ADDR: &str = "127.0.0.4:7000";
    let mut w = World::new("passage-revoke");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2,DNS:pinned.test");
    let _api = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &["--h1only"]);
    let _echo = Background::spawn(
        w.outside(),
        &["python3", "-c", ECHO, "127.0.0.4", "7000"],
        w.path("echo.log"),
    );
    assert!(w
        .netns
        .wait_port(ECHO_ADDR.parse().unwrap(), Duration::from_secs(10)));
    let permits = r#"
@id("revoke.echo")
permit (principal, action == Phigate::Action::"TCP", resource == Phigate::Destination::"echo")
when { principal.user == "nobody" };

@id("revoke.pinned")
permit (principal, action == Phigate::Action::"TUNNEL", resource == Phigate::Destination::"fhir-api")
when { context has sni && context.sni == "pinned.test" };
"#;
    w.write_policies(&[("p.cedar", READS), ("permits.cedar", permits)]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"fhir-api\"\naddresses = [\"{API}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\npassthrough_hosts = [\"pinned.test\"]\n\n[[destinations]]\nname = \"echo\"\naddresses = [\"{ECHO_ADDR}\"]\nprotocol = \"tcp\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.public_copy(&pki.ca);
    let nobody = w.unprivileged();
    let tcp = Background::spawn(
        nobody,
        &["/usr/bin/python3", "-c", BUSY, "tcp", "127.0.0.4", "7000"],
        w.path("busy-tcp.log"),
    );
    let tunnel = Background::spawn(
        nobody,
        &[
            "/usr/bin/python3",
            "-c",
            BUSY,
            "tunnel",
            ca.to_str().unwrap(),
        ],
        w.path("busy-tunnel.log"),
    );
    for b in [&tcp, &tunnel] {
        wait_until(
            "the client's first exchange",
            Duration::from_secs(15),
            || b.log_text().contains("up"),
        )
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", b.log_text(), w.agent_log()));
    }
    // Both are still being served a moment later.
    std::thread::sleep(Duration::from_millis(500));
    for b in [&tcp, &tunnel] {
        assert!(!b.log_text().contains("closed"), "{}", b.log_text());
    }

    // The permits go: both connections close, each recorded as revoked.
    w.write_policies(&[("p.cedar", READS)]);
    for b in [&tcp, &tunnel] {
        wait_until(
            "the connection to be closed",
            Duration::from_secs(15),
            || b.log_text().contains("closed"),
        )
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", b.log_text(), w.agent_log()));
    }
    for (destination, passage) in [("echo", "TCP"), ("fhir-api", "TUNNEL")] {
        let c = w.wait_row("connections", &format!("revoked for {destination}"), |r| {
            r["destination"] == destination && r["outcome"] == "revoked"
        });
        let error = c["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("access revoked by policy set") && error.contains("no_permit"),
            "{passage}: {c}"
        );
        assert_eq!(
            c["decision"], "allow",
            "decided allowed when it opened: {c}"
        );
        assert_eq!(c["uid"], 65534, "{c}");
    }
}
