//! The OTLP logs stream to a real OTLP/HTTP receiver. No OpenTelemetry collector
//! installs on these machines (not in PyPI, npm or Debian), so the receiver is
//! tests/otlp/receiver.py: an HTTPS server that decodes every `POST /v1/logs` with
//! the official protobuf classes of the PyPI package `opentelemetry-proto` (the
//! real schema) and answers a real `ExportLogsServiceResponse`. Traffic goes
//! through the real redirect. Each exchange arrives as one log record with its
//! ids, status and decision as attributes, and nothing of its bodies, query,
//! header values or raw patient ids; records wait while the receiver is down and
//! arrive in order when it is back; a receiver whose certificate is from another
//! CA gets nothing while requests pass; a full buffer drops the oldest; a bad
//! section is refused naming the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const OTLP: &str = "127.0.0.1:4318";
const METRICS: &str = "127.0.0.1:9464";

/// receiver.py in the world's netns, writing each log record as a JSON line to
/// `out` (appended across restarts).
struct Receiver {
    bg: Option<Background>,
    argv: Vec<String>,
    out: PathBuf,
}

impl Receiver {
    /// `pki`: the receiver's certificate; `clients_from`: with a CA, the receiver
    /// requires a client certificate from it.
    fn start(w: &World, tag: &str, pki: &TestPki, clients_from: Option<&Path>) -> Receiver {
        let dir = w.path(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("received.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp/receiver.py");
        let mut argv: Vec<String> = vec![
            "python3".into(),
            script.display().to_string(),
            "--listen".into(),
            OTLP.into(),
            "--cert".into(),
            pki.cert.display().to_string(),
            "--key".into(),
            pki.key.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(ca) = clients_from {
            argv.extend(["--client-ca".into(), ca.display().to_string()]);
        }
        let mut r = Receiver {
            bg: None,
            argv,
            out,
        };
        r.restart(w);
        r
    }

    fn restart(&mut self, w: &World) {
        let argv: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        let bg = Background::spawn(w.outside(), &argv, w.path(&unique("receiver.log")));
        assert!(
            w.netns
                .wait_port(OTLP.parse().unwrap(), Duration::from_secs(20)),
            "receiver.py did not start: {}",
            bg.log_text()
        );
        self.bg = Some(bg);
    }

    fn stop(&mut self) {
        drop(self.bg.take().expect("running"));
    }

    /// Every log record received so far.
    fn received(&self) -> Vec<Value> {
        self.raw()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn raw(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The request bodies as received, protobuf bytes.
    fn wire(&self) -> Vec<u8> {
        let mut p = self.out.clone().into_os_string();
        p.push(".raw");
        std::fs::read(p).unwrap_or_default()
    }

    fn log(&self) -> String {
        self.bg.as_ref().map(|b| b.log_text()).unwrap_or_default()
    }
}

fn attr<'a>(r: &'a Value, k: &str) -> &'a Value {
    &r["attributes"][format!("phigate.{k}")]
}

fn seq(r: &Value) -> i64 {
    attr(r, "seq").as_i64().expect("phigate.seq")
}

fn requests_of(rs: &[Value]) -> Vec<&Value> {
    rs.iter()
        .filter(|r| attr(r, "table") == "requests")
        .collect()
}

/// A world with the test upstream, the given policies and `[records.otlp]`
/// toward OTLP trusting `ca`; the agent not started.
fn otlp_world(tag: &str, otlp_extra: &str, ca: &Path) -> (World, Background) {
    let w = World::new(tag);
    w.write_policies(&[("test.cedar", ALLOW_BUT_DENIED)]);
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    w.write_config(&format!(
        "{}\n[records.otlp]\nendpoint = \"https://{OTLP}\"\nca_file = \"{}\"\n{otlp_extra}\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_and_records("", "")
            .replace("[admin]\n", &format!("[admin]\nmetrics_listen = \"{METRICS}\"\n")),
        ca.display(),
        pki.ca.display()
    ));
    (w, up)
}

const ALLOW_BUT_DENIED: &str = r#"
@id("test.allow-all")
permit (principal, action, resource);

@id("test.no-admin")
forbid (principal, action, resource)
when { context.path like "/admin*" };
"#;

/// curl through the redirect: the status code.
fn curl(w: &World, ca: &Path, extra: &[&str], path: &str) -> String {
    curl_status(w, ca, extra, &format!("https://{UP}{path}"))
}

fn otlp_metrics(w: &World) -> HashMap<String, f64> {
    metrics_with_prefix(w, METRICS, "phigate_otlp_")
}

fn otlp_status(w: &World) -> Value {
    w.status()["records"]["otlp"].clone()
}

fn wait_received(r: &Receiver, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(what, Duration::from_secs(30), || {
        last = r.received();
        pred(&last)
    });
    if let Err(e) = ok {
        panic!("{e:#}: received:\n{}\nreceiver:\n{}", r.raw(), r.log());
    }
    last
}

fn in_order(rs: &[Value]) {
    let seqs: Vec<i64> = rs.iter().map(seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in order: {seqs:?}");
}

#[test]
fn each_durable_exchange_is_one_log_record_with_its_metadata_and_no_phi_and_waits_out_an_outage() {
    let pkis = tempfile::tempdir().unwrap();
    let otlp_pki = TestPki::new(pkis.path(), "otlp", "IP:127.0.0.1");
    let (client_pem, client_key) = client_cert(&otlp_pki);
    let headers = pkis.path().join("otlp-headers");
    std::fs::write(&headers, "# the receiver's API key\nX-Api-Key: KEY-7f3e\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&headers, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (mut w, _up) = otlp_world(
        "otlp",
        &format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\nheaders_file = \"{}\"\nbatch_records = 2\n",
            client_pem.display(),
            client_key.display(),
            headers.display()
        ),
        &otlp_pki.ca,
    );
    // The receiver requires a client certificate from its CA: phigate's.
    let mut rx = Receiver::start(&w, "receiver", &otlp_pki, Some(&otlp_pki.ca));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    wait_received(&rx, "the agent's start event", |rs| {
        rs.iter().any(|r| attr(r, "kind") == "agent_start")
    });

    // Five exchanges: patient reads (the id is PHI), a POST whose body, query and a
    // recorded header carry values, and one the policies deny.
    for i in 0..3 {
        assert_eq!(
            curl(&w, &ca, &[], &format!("/fhir/Patient/RAWPATIENT{i}")),
            "404"
        );
    }
    let posted = curl(
        &w,
        &ca,
        &[
            "-H",
            "x-request-id: HDRVALUE4242",
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"note":"BODYVALUE31337"}"#,
        ],
        "/upload?q=QUERYVALUE777",
    );
    assert_eq!(posted, "200");
    assert_eq!(curl(&w, &ca, &[], "/admin/users"), "403");
    let rows = w.wait_records("requests", 5);
    let got = wait_received(&rx, "5 request log records", |rs| {
        requests_of(rs).len() >= 5
    });
    let reqs = requests_of(&got);
    assert_eq!(reqs.len(), 5, "{}", rx.raw());
    for row in &rows {
        let id = row["request_id"].as_str().unwrap();
        let r = reqs
            .iter()
            .find(|r| attr(r, "request_id") == id)
            .unwrap_or_else(|| panic!("no log record for {id}: {}", rx.raw()));
        assert_eq!(attr(r, "connection_id"), &row["connection_id"]);
        assert_eq!(attr(r, "status"), &row["status"]);
        assert_eq!(attr(r, "decision"), &row["decision"]);
        assert_eq!(attr(r, "path"), &row["path"]);
        assert_eq!(attr(r, "method"), &row["method"]);
        assert_eq!(attr(r, "outcome"), &row["outcome"]);
        assert_eq!(attr(r, "destination"), "patients-api");
        assert_eq!(attr(r, "user"), "root");
        assert!(
            attr(r, "exe_path").as_str().unwrap().ends_with("curl"),
            "{r}"
        );
        // The row's time, picked up moments later.
        let (t, seen) = (
            r["time_unix_nano"].as_u64().unwrap(),
            r["observed_time_unix_nano"].as_u64().unwrap(),
        );
        assert!(t > 0 && seen >= t && seen - t < 60_000_000_000, "{r}");
        assert_eq!(r["resource"]["service.name"], "phigate", "{r}");
        assert!(
            r["resource"]["host.name"]
                .as_str()
                .is_some_and(|h| !h.is_empty()),
            "{r}"
        );
        assert_eq!(r["scope"], "phigate");
        // The API key from headers_file went with every export.
        assert_eq!(r["headers"]["x-api-key"], "KEY-7f3e", "{r}");
        assert!(r["batch"].as_u64().unwrap() <= 2, "batch_records: {r}");
    }
    let denied = reqs
        .iter()
        .find(|r| attr(r, "path") == "/admin/users")
        .unwrap();
    assert_eq!(
        (&attr(denied, "decision"), &attr(denied, "status")),
        (&&Value::from("deny"), &&Value::from(403))
    );
    assert_eq!(
        attr(denied, "policy_ids"),
        &serde_json::json!(["test.no-admin"])
    );
    assert_eq!(denied["severity_text"], "WARN", "{denied}");
    assert_eq!(denied["severity_number"], 13, "{denied}");
    assert!(
        denied["body"]
            .as_str()
            .unwrap()
            .contains("GET /admin/users deny -> 403"),
        "{denied}"
    );
    let allowed = reqs
        .iter()
        .find(|r| attr(r, "decision") == "allow")
        .unwrap();
    assert_eq!(allowed["severity_text"], "INFO", "{allowed}");
    // Patient ids only as the records' pseudonyms; the header value, the query and
    // the body, which the record holds, never: not in the decoded records, not in
    // the bytes on the wire.
    let pseudo = |id: &str| {
        let out = Command::new(phigate_bin())
            .args(["audit", "pseudonym", "--config"])
            .arg(w.config_path())
            .arg(id)
            .output()
            .unwrap();
        stdout(&out).trim().to_owned()
    };
    for i in 0..3 {
        let p = pseudo(&format!("RAWPATIENT{i}"));
        assert!(p.starts_with("p:"), "{p}");
        assert!(
            reqs.iter()
                .any(|r| attr(r, "path") == format!("/fhir/Patient/{p}").as_str()),
            "{}",
            rx.raw()
        );
    }
    let upload = rows.iter().find(|r| r["path"] == "/upload").unwrap();
    assert!(
        upload.to_string().contains("HDRVALUE4242"),
        "the record holds the header value: {upload}"
    );
    let (raw, wire) = (rx.raw(), String::from_utf8_lossy(&rx.wire()).into_owned());
    assert!(
        wire.contains("patients-api"),
        "the wire copy is the exports"
    );
    for secret in [
        "RAWPATIENT",
        "HDRVALUE4242",
        "BODYVALUE31337",
        "QUERYVALUE777",
    ] {
        assert!(!raw.contains(secret), "{secret} was exported:\n{raw}");
        assert!(!wire.contains(secret), "{secret} was on the wire");
    }
    // Connections and events too, in journal order.
    assert!(
        got.iter().any(|r| attr(r, "table") == "connections"),
        "{raw}"
    );
    in_order(&got);
    let st = otlp_status(&w);
    assert_eq!(st["destination"], format!("https://{OTLP}/v1/logs"), "{st}");
    assert!(st["sent"].as_u64().unwrap() >= got.len() as u64, "{st}");
    assert_eq!(st["dropped"], 0, "{st}");

    // The receiver goes away: requests pass, their records wait, and arrive in
    // order, none lost, when it is back.
    rx.stop();
    let before = rx.received().len();
    for i in 10..13 {
        assert_eq!(
            curl(&w, &ca, &[], &format!("/fhir/Patient/RAWPATIENT{i}")),
            "404"
        );
    }
    let rows = w.wait_records("requests", 8);
    wait_until("the stream to fail", Duration::from_secs(20), || {
        otlp_status(&w)["failures"].as_u64().unwrap_or(0) >= 1
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = otlp_status(&w);
    assert_eq!(st["connected"], false, "{st}");
    assert!(st["buffered"].as_u64().unwrap() >= 3, "{st}");
    assert_eq!(rx.received().len(), before);
    rx.restart(&w);
    let got = wait_received(&rx, "the waiting records", |rs| requests_of(rs).len() >= 8);
    in_order(&got);
    for row in &rows {
        let id = row["request_id"].as_str().unwrap();
        assert_eq!(
            requests_of(&got)
                .iter()
                .filter(|r| attr(r, "request_id") == id)
                .count(),
            1,
            "{id} exactly once"
        );
    }
    assert!(!rx.raw().contains("RAWPATIENT"));
    wait_until("the buffer to empty", Duration::from_secs(20), || {
        let st = otlp_status(&w);
        st["connected"] == true && st["buffered"] == 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let m = otlp_metrics(&w);
    assert_eq!(m["phigate_otlp_up"], 1.0, "{m:?}");
    assert!(m["phigate_otlp_sent_records"] >= got.len() as f64, "{m:?}");
    assert!(m["phigate_otlp_failures"] >= 1.0, "{m:?}");
    assert_eq!(m["phigate_otlp_dropped_records"], 0.0, "{m:?}");
    assert_eq!(m["phigate_otlp_buffered_records"], 0.0, "{m:?}");
    for outcome in ["failed", "ok"] {
        w.wait_row("events", &format!("otlp {outcome}"), |e| {
            e["kind"] == "otlp" && e["outcome"] == outcome
        });
    }
    // The API key is never in the agent's log.
    assert!(!w.agent_log().contains("KEY-7f3e"));
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_receiver_whose_certificate_is_from_another_ca_gets_nothing_and_requests_pass() {
    let pkis = tempfile::tempdir().unwrap();
    let trusted = TestPki::new(pkis.path(), "otlp", "IP:127.0.0.1");
    let rogue = TestPki::new(pkis.path(), "rogue", "IP:127.0.0.1");
    let (mut w, _up) = otlp_world("otlp-rogue", "", &trusted.ca);
    let rx = Receiver::start(&w, "receiver", &rogue, None);
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    for i in 0..3 {
        assert_eq!(curl(&w, &ca, &[], &format!("/fhir/Patient/{i}")), "404");
    }
    w.wait_records("requests", 3);
    wait_until("failures counted", Duration::from_secs(20), || {
        otlp_status(&w)["failures"].as_u64().unwrap_or(0) >= 2
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = otlp_status(&w);
    assert_eq!(
        (&st["connected"], &st["sent"]),
        (&Value::from(false), &Value::from(0)),
        "{st}"
    );
    assert!(st["buffered"].as_u64().unwrap() >= 3, "{st}");
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("certificate failed verification") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let m = otlp_metrics(&w);
    assert!(m["phigate_otlp_failures"] >= 2.0, "{m:?}");
    assert_eq!(
        (m["phigate_otlp_up"], m["phigate_otlp_sent_records"]),
        (0.0, 0.0),
        "{m:?}"
    );
    // Nothing reached the receiver.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.raw(), "", "the untrusted receiver got records");
    assert!(rx.wire().is_empty(), "the untrusted receiver got an export");
    let ev = w.wait_row("events", "otlp failed", |e| {
        e["kind"] == "otlp" && e["outcome"] == "failed"
    });
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains("certificate failed verification"),
        "{ev}"
    );
    let out = Command::new(phigate_bin())
        .args(["status", "--config"])
        .arg(w.config_path())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("otlp:          NOT UP") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_full_buffer_drops_the_oldest_records_counts_them_and_says_so_in_events() {
    let pkis = tempfile::tempdir().unwrap();
    let otlp_pki = TestPki::new(pkis.path(), "otlp", "IP:127.0.0.1");
    let (mut w, _up) = otlp_world("otlp-full", "buffer_records = 4\n", &otlp_pki.ca);
    // No receiver yet: records wait, and past 4 the oldest go.
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    for i in 0..6 {
        assert_eq!(curl(&w, &ca, &[], &format!("/fhir/Patient/{i}")), "404");
    }
    let mut rows = w.wait_records("requests", 6);
    wait_until("drops counted", Duration::from_secs(20), || {
        otlp_status(&w)["dropped"].as_u64().unwrap_or(0) > 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = otlp_status(&w);
    assert!(st["buffered"].as_u64().unwrap() <= 4, "{st}");
    assert!(otlp_metrics(&w)["phigate_otlp_dropped_records"] > 0.0);
    let rx = Receiver::start(&w, "receiver", &otlp_pki, None);
    wait_until("caught up", Duration::from_secs(30), || {
        let st = otlp_status(&w);
        st["connected"] == true && st["buffered"] == 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    // The newest exchange arrived, the oldest did not.
    rows.sort_by_key(|r| r["start_time"].as_i64());
    let newest = rows.last().unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let oldest = rows[0]["request_id"].as_str().unwrap().to_owned();
    let got = wait_received(&rx, "the newest request", |rs| {
        rs.iter().any(|r| attr(r, "request_id") == newest.as_str())
    });
    assert!(
        !got.iter().any(|r| attr(r, "request_id") == oldest.as_str()),
        "the oldest record should have been dropped: {}",
        rx.raw()
    );
    in_order(&got);
    for outcome in ["failed", "ok"] {
        w.wait_row("events", &format!("otlp_drops {outcome}"), |e| {
            e["kind"] == "otlp_drops" && e["outcome"] == outcome
        });
    }
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_bad_otlp_section_is_refused_by_config_check_naming_the_field() {
    let pkis = tempfile::tempdir().unwrap();
    let otlp_pki = TestPki::new(pkis.path(), "otlp", "IP:127.0.0.1");
    let (w, _up) = otlp_world("otlp-bad", "", &otlp_pki.ca);
    let good = std::fs::read_to_string(w.config_path()).unwrap();
    let check = || {
        let out = Command::new(phigate_bin())
            .args(["config", "check"])
            .arg(w.config_path())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", stdout(&out), stderr(&out)),
        )
    };
    w.write_config(&good);
    let (ok, text) = check();
    assert!(ok, "the good config: {text}");
    // Headers others can read, a key others can read, a plain-http endpoint off
    // loopback, no ca_file for https, a batch of 0, a switch to skip verification.
    let open = w.path("open-headers");
    std::fs::write(&open, "X-Api-Key: k\n").unwrap();
    let key = w.path("client.key");
    std::fs::copy(&otlp_pki.key, &key).unwrap();
    for f in [&open, &key] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let ca_line = format!("ca_file = \"{}\"\n", otlp_pki.ca.display());
    let endpoint_line = format!("endpoint = \"https://{OTLP}\"\n");
    for (bad, field, says) in [
        (
            good.replace(
                &ca_line,
                &format!("{ca_line}headers_file = \"{}\"\n", open.display()),
            ),
            "records.otlp.headers_file",
            "chmod 600",
        ),
        (
            good.replace(
                &ca_line,
                &format!(
                    "{ca_line}client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                    otlp_pki.cert.display(),
                    key.display()
                ),
            ),
            "records.otlp.client_key_file",
            "chmod 600",
        ),
        (
            good.replace(&endpoint_line, "endpoint = \"http://10.1.2.3:4318\"\n"),
            "records.otlp.endpoint",
            "loopback",
        ),
        (
            good.replace(&ca_line, ""),
            "records.otlp.ca_file",
            "required",
        ),
        (
            good.replace(&ca_line, &format!("{ca_line}batch_records = 0\n")),
            "records.otlp.batch_records",
            "between 1 and",
        ),
        (
            good.replace(&ca_line, &format!("{ca_line}verify = false\n")),
            "verify",
            "unknown field",
        ),
    ] {
        w.write_config(&bad);
        let (ok, text) = check();
        assert!(!ok, "{field}: accepted: {text}");
        assert!(
            text.contains(&w.config_path().display().to_string())
                && text.contains(field)
                && text.contains(says),
            "{field}: {text}"
        );
        assert!(!text.contains("X-Api-Key"), "a header was printed: {text}");
    }
}
