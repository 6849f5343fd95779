//! What phigate lets through without reading it is decided like every request:
//! a connection to a `tcp` destination (`TCP`), a TLS connection whose SNI is in
//! `passthrough_hosts` (`TUNNEL`), and a request switching protocols (`UPGRADE`).
//! Under a policy set that names none of them, each is refused and recorded with
//! the decision; a permit naming one lets exactly that one through. Real clients
//! (curl, `openssl s_client`, websocket-client) through the real redirect.

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
when { principal.user == "root" };

@id("passages.pinned")
permit (principal, action == Phigate::Action::"TUNNEL", resource == Phigate::Destination::"fhir-api")
when { context has sni && context.sni == "pinned.test" };

@id("passages.websocket")
permit (principal, action == Phigate::Action::"UPGRADE", resource == Phigate::Destination::"fhir-api")
when { context.path == "/fhir/Patient/stream" };
"#;

struct Passages {
    w: World,
    pki: TestPki,
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
        w,
        pki,
        db,
        _api: api,
    }
}

impl Passages {
    fn db_connect(&self) -> String {
        let out = output(
            self.w.inside(),
            &["curl", "-sS", "--max-time", "5", &format!("http://{DB}/")],
        );
        format!("{}{}", stdout(&out), stderr(&out))
    }

    fn tunnel(&self) -> String {
        let out = output(
            self.w.inside(),
            &[
                "sh",
                "-c",
                &format!(
                    "openssl s_client -connect {API} -servername pinned.test -CAfile {} -verify_return_error </dev/null 2>&1",
                    self.pki.ca.display()
                ),
            ],
        );
        stdout(&out)
    }

    /// websocket-client to /fhir/Patient/stream: `Ok(echo)` or `Err(status)`.
    fn websocket(&self) -> Result<String, u64> {
        let ca = self.w.path("state/ca.pem").display().to_string();
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
        let out = output(self.w.inside(), &["python3", "-c", &script]);
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
    let ca = w.path("state/ca.pem").display().to_string();
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
    let out = output(w.inside(), &["python3", "-c", &script]);
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
