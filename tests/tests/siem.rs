//! The SIEM stream to a real receiver: rsyslog (Debian's `rsyslog` with
//! `rsyslog-gnutls`), started by each test with a config of its own (imtcp with the
//! gtls stream driver, a certificate from the test's CA, every message's parsed
//! RFC 5424 fields written to a file), traffic through the real redirect. Each
//! exchange arrives as one line with its ids, status and decision, and nothing of
//! its bodies, header values or raw patient ids; a receiver whose certificate is
//! from another CA gets nothing while requests pass; lines wait while the receiver
//! is down and arrive in order when it is back; a full buffer drops the oldest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const SIEM: &str = "127.0.0.1:6514";
const METRICS: &str = "127.0.0.1:9464";

/// rsyslogd in the foreground in the world's netns, receiving syslog over TLS on
/// SIEM and writing `app-name TAB msgid TAB structured-data TAB msg` per message to
/// `out` (appended across restarts).
struct Rsyslog {
    bg: Option<Background>,
    conf: PathBuf,
    out: PathBuf,
}

impl Rsyslog {
    /// `pki`: the receiver's certificate; `clients_from`: with a CA, the receiver
    /// requires a client certificate from it.
    fn start(w: &World, tag: &str, pki: &TestPki, clients_from: Option<&Path>) -> Rsyslog {
        let dir = w.path(tag);
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let (auth, ca) = match clients_from {
            Some(ca) => ("x509/certvalid", ca.to_owned()),
            None => ("anon", pki.ca.clone()),
        };
        let (host, port) = SIEM.split_once(':').unwrap();
        let out = dir.join("received.log");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{auth}")
input(type="imtcp" address="{host}" port="{port}")
template(name="fields" type="string" string="%app-name%\t%msgid%\t%structured-data%\t%msg%\n")
*.* action(type="omfile" file="{out}" template="fields")
"#,
                work = dir.join("work").display(),
                ca = ca.display(),
                cert = pki.cert.display(),
                key = pki.key.display(),
                out = out.display(),
            ),
        )
        .unwrap();
        let mut r = Rsyslog {
            bg: None,
            conf,
            out,
        };
        r.restart(w);
        r
    }

    fn restart(&mut self, w: &World) {
        let pid = self.conf.with_file_name("rsyslogd.pid");
        let bg = Background::spawn(
            w.outside(),
            &[
                "rsyslogd",
                "-n",
                "-f",
                self.conf.to_str().unwrap(),
                "-i",
                pid.to_str().unwrap(),
            ],
            w.path(&unique("rsyslogd.log")),
        );
        assert!(
            w.netns
                .wait_port(SIEM.parse().unwrap(), Duration::from_secs(10)),
            "rsyslogd did not start: {}",
            bg.log_text()
        );
        self.bg = Some(bg);
    }

    /// SIGTERM and wait: rsyslog writes what it received, then closes the sessions.
    fn stop(&mut self) {
        let mut bg = self.bg.take().expect("running");
        // SAFETY: signalling our child.
        unsafe { libc::kill(bg.pid() as i32, libc::SIGTERM) };
        let _ = bg.child.wait();
    }

    /// Every message received so far: (msgid, SD params, msg).
    fn received(&self) -> Vec<Line> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines().map(parse_line).collect()
    }

    fn raw(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

#[derive(Debug)]
struct Line {
    app: String,
    msgid: String,
    params: HashMap<String, String>,
    msg: String,
}

impl Line {
    fn get(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
    fn seq(&self) -> u64 {
        self.get("seq").expect("seq").parse().unwrap()
    }
}

/// `app TAB msgid TAB [phigate@32473 k="v" ...] TAB msg`, SD-PARAM values unescaped.
fn parse_line(l: &str) -> Line {
    let mut parts = l.splitn(4, '\t');
    let (app, msgid, sd, msg) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let body = sd
        .strip_prefix("[phigate@32473")
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not phigate's SD-ELEMENT: {l}"));
    let mut params = HashMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'), "{l}");
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => v.push(chars.next().unwrap()),
                '"' => break,
                c => v.push(c),
            }
        }
        params.insert(name, v);
    }
    Line {
        app: app.into(),
        msgid: msgid.into(),
        params,
        msg: msg.into(),
    }
}

/// A world with the test upstream, the given policies and `[records.siem]` toward
/// SIEM trusting `ca`; the agent started.
fn siem_world(tag: &str, siem_extra: &str, ca: &Path, policies: &str) -> (World, Background) {
    let w = World::new(tag);
    w.write_policies(&[("test.cedar", policies)]);
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    w.write_config(&format!(
        "{}\n[records.siem]\naddress = \"{SIEM}\"\nca_file = \"{}\"\napp_name = \"phigate-test\"\n{siem_extra}\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
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

fn siem_metrics(w: &World) -> HashMap<String, f64> {
    metrics_with_prefix(w, METRICS, "phigate_siem_")
}

fn siem_status(w: &World) -> Value {
    w.status()["records"]["siem"].clone()
}

fn wait_lines(r: &Rsyslog, what: &str, pred: impl Fn(&[Line]) -> bool) -> Vec<Line> {
    let mut last = Vec::new();
    let ok = wait_until(what, Duration::from_secs(20), || {
        last = r.received();
        pred(&last)
    });
    if let Err(e) = ok {
        panic!(
            "{e:#}: received:\n{}\nrsyslogd:\n{}",
            r.raw(),
            r.bg.as_ref().map(|b| b.log_text()).unwrap_or_default()
        );
    }
    last
}

fn requests_of(lines: &[Line]) -> Vec<&Line> {
    lines.iter().filter(|l| l.msgid == "requests").collect()
}

#[test]
fn each_durable_exchange_streams_as_one_line_with_its_metadata_and_no_phi_and_waits_out_an_outage()
{
    let pkis = tempfile::tempdir().unwrap();
    let siem_pki = TestPki::new(pkis.path(), "siem", "IP:127.0.0.1");
    let (client_pem, client_key) = client_cert(&siem_pki);
    let (mut w, _up) = siem_world(
        "siem",
        &format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\nfacility = \"local4\"\n",
            client_pem.display(),
            client_key.display()
        ),
        &siem_pki.ca,
        ALLOW_BUT_DENIED,
    );
    // The receiver requires a client certificate from its CA: phigate's.
    let mut rs = Rsyslog::start(&w, "rsyslog", &siem_pki, Some(&siem_pki.ca));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    wait_until("the stream to connect", Duration::from_secs(20), || {
        siem_status(&w)["connected"] == true
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", w.status(), w.agent_log()));

    // Five exchanges: patient reads (the id is PHI), a POST whose body and a
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
        "/upload",
    );
    assert_eq!(posted, "200");
    assert_eq!(curl(&w, &ca, &[], "/admin/users"), "403");
    let rows = w.wait_records("requests", 5);
    let lines = wait_lines(&rs, "5 request lines", |l| requests_of(l).len() >= 5);

    let reqs = requests_of(&lines);
    assert_eq!(reqs.len(), 5, "{}", rs.raw());
    for row in &rows {
        let id = row["request_id"].as_str().unwrap();
        let l = reqs
            .iter()
            .find(|l| l.get("request_id") == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}: {}", rs.raw()));
        assert_eq!(l.app, "phigate-test");
        assert_eq!(l.get("connection_id"), row["connection_id"].as_str());
        assert_eq!(l.get("status"), Some(row["status"].to_string().as_str()));
        assert_eq!(l.get("decision"), row["decision"].as_str());
        assert_eq!(l.get("path"), row["path"].as_str());
        assert_eq!(l.get("method"), row["method"].as_str());
        assert_eq!(l.get("outcome"), row["outcome"].as_str());
        assert_eq!(l.get("destination"), Some("patients-api"));
        assert_eq!(l.get("user"), Some("root"));
        assert!(l.get("exe_path").unwrap().ends_with("curl"), "{l:?}");
    }
    let denied = reqs
        .iter()
        .find(|l| l.get("path") == Some("/admin/users"))
        .unwrap();
    assert_eq!(
        (denied.get("decision"), denied.get("status")),
        (Some("deny"), Some("403"))
    );
    assert_eq!(denied.get("policy_ids"), Some("test.no-admin"));
    assert!(
        denied.msg.contains("GET /admin/users deny -> 403"),
        "{denied:?}"
    );
    // Patient ids only as the records' pseudonyms; the header value and the body,
    // which the record holds, never.
    let pseudo = |id: &str| {
        let out = Command::new(phigate_bin())
            .args(["audit", "pseudonym", "--config"])
            .arg(w.config_path())
            .arg(id)
            .output()
            .unwrap();
        stdout(&out).trim().to_owned()
    };
    let raw = rs.raw();
    for i in 0..3 {
        let p = pseudo(&format!("RAWPATIENT{i}"));
        assert!(p.starts_with("p:"), "{p}");
        assert!(
            reqs.iter()
                .any(|l| l.get("path") == Some(format!("/fhir/Patient/{p}").as_str())),
            "{raw}"
        );
    }
    assert!(
        !raw.contains("RAWPATIENT"),
        "a raw patient id was streamed:\n{raw}"
    );
    let upload = rows.iter().find(|r| r["path"] == "/upload").unwrap();
    assert!(
        upload.to_string().contains("HDRVALUE4242"),
        "the record holds the header value: {upload}"
    );
    for secret in ["HDRVALUE4242", "BODYVALUE31337"] {
        assert!(!raw.contains(secret), "{secret} was streamed:\n{raw}");
    }
    // Connections and events too, in journal order.
    assert!(lines.iter().any(|l| l.msgid == "connections"), "{raw}");
    assert!(
        lines
            .iter()
            .any(|l| l.msgid == "events" && l.get("kind") == Some("agent_start")),
        "{raw}"
    );
    let seqs: Vec<u64> = lines.iter().map(Line::seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");
    let st = siem_status(&w);
    assert!(st["sent"].as_u64().unwrap() >= lines.len() as u64, "{st}");
    assert_eq!(st["dropped"], 0, "{st}");

    // The receiver goes away: requests pass, their lines wait, and arrive in order
    // when it is back.
    rs.stop();
    wait_until("the stream to notice", Duration::from_secs(20), || {
        siem_status(&w)["connected"] == false
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let before = rs.received().len();
    for i in 10..13 {
        assert_eq!(
            curl(&w, &ca, &[], &format!("/fhir/Patient/RAWPATIENT{i}")),
            "404"
        );
    }
    w.wait_records("requests", 8);
    let st = siem_status(&w);
    assert!(st["buffered"].as_u64().unwrap() >= 3, "{st}");
    assert!(st["failures"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(rs.received().len(), before);
    rs.restart(&w);
    let lines = wait_lines(&rs, "the waiting lines", |l| requests_of(l).len() >= 8);
    let seqs: Vec<u64> = lines.iter().map(Line::seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in order: {seqs:?}");
    assert!(!rs.raw().contains("RAWPATIENT"));
    wait_until("the buffer to empty", Duration::from_secs(20), || {
        let st = siem_status(&w);
        st["connected"] == true && st["buffered"] == 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let m = siem_metrics(&w);
    assert_eq!(m["phigate_siem_connected"], 1.0, "{m:?}");
    assert!(m["phigate_siem_sent_lines"] >= lines.len() as f64, "{m:?}");
    assert_eq!(m["phigate_siem_dropped_lines"], 0.0, "{m:?}");
    for outcome in ["failed", "ok"] {
        w.wait_row("events", &format!("siem {outcome}"), |e| {
            e["kind"] == "siem" && e["outcome"] == outcome
        });
    }
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_receiver_whose_certificate_is_from_another_ca_gets_nothing_and_requests_pass() {
    let pkis = tempfile::tempdir().unwrap();
    let trusted = TestPki::new(pkis.path(), "siem", "IP:127.0.0.1");
    let rogue = TestPki::new(pkis.path(), "rogue", "IP:127.0.0.1");
    let (mut w, _up) = siem_world("siem-rogue", "", &trusted.ca, ALLOW_BUT_DENIED);
    let rs = Rsyslog::start(&w, "rsyslog", &rogue, None);
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    for i in 0..3 {
        assert_eq!(curl(&w, &ca, &[], &format!("/fhir/Patient/{i}")), "404");
    }
    w.wait_records("requests", 3);
    wait_until("failures counted", Duration::from_secs(20), || {
        siem_status(&w)["failures"].as_u64().unwrap_or(0) >= 2
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = siem_status(&w);
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(st["sent"], 0, "{st}");
    assert!(st["buffered"].as_u64().unwrap() >= 3, "{st}");
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("certificate failed verification") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let m = siem_metrics(&w);
    assert!(m["phigate_siem_failures"] >= 2.0, "{m:?}");
    assert_eq!(
        (m["phigate_siem_connected"], m["phigate_siem_sent_lines"]),
        (0.0, 0.0),
        "{m:?}"
    );
    assert!(m["phigate_siem_buffered_lines"] >= 3.0, "{m:?}");
    // Nothing reached the receiver, not even a partial message.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rs.raw(), "", "the untrusted receiver got lines");
    let ev = w.wait_row("events", "siem failed", |e| {
        e["kind"] == "siem" && e["outcome"] == "failed"
    });
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            .contains("certificate failed verification"),
        "{ev}"
    );
    // The human status says so too.
    let out = Command::new(phigate_bin())
        .args(["status", "--config"])
        .arg(w.config_path())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("siem:          NOT CONNECTED") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_full_buffer_drops_the_oldest_lines_counts_them_and_says_so_in_events() {
    let pkis = tempfile::tempdir().unwrap();
    let siem_pki = TestPki::new(pkis.path(), "siem", "IP:127.0.0.1");
    let (mut w, _up) = siem_world(
        "siem-full",
        "buffer_records = 4\n",
        &siem_pki.ca,
        ALLOW_BUT_DENIED,
    );
    // No receiver yet: lines wait, and past 4 the oldest go.
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    for i in 0..6 {
        assert_eq!(curl(&w, &ca, &[], &format!("/fhir/Patient/{i}")), "404");
    }
    let rows = w.wait_records("requests", 6);
    wait_until("drops counted", Duration::from_secs(20), || {
        siem_status(&w)["dropped"].as_u64().unwrap_or(0) > 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = siem_status(&w);
    assert!(st["buffered"].as_u64().unwrap() <= 4, "{st}");
    assert!(siem_metrics(&w)["phigate_siem_dropped_lines"] > 0.0);
    let rs = Rsyslog::start(&w, "rsyslog", &siem_pki, None);
    wait_until("caught up", Duration::from_secs(20), || {
        let st = siem_status(&w);
        st["connected"] == true && st["buffered"] == 0
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    // The newest exchange arrived, the oldest did not.
    let mut rows = rows;
    rows.sort_by_key(|r| r["start_time"].as_i64());
    let newest = rows.last().unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let oldest = rows[0]["request_id"].as_str().unwrap().to_owned();
    let lines = wait_lines(&rs, "the newest request", |l| {
        l.iter().any(|l| l.get("request_id") == Some(&newest))
    });
    assert!(
        !lines.iter().any(|l| l.get("request_id") == Some(&oldest)),
        "the oldest line should have been dropped: {}",
        rs.raw()
    );
    let seqs: Vec<u64> = lines.iter().map(Line::seq).collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "in order: {seqs:?}");
    for outcome in ["failed", "ok"] {
        w.wait_row("events", &format!("siem_drops {outcome}"), |e| {
            e["kind"] == "siem_drops" && e["outcome"] == outcome
        });
    }
    assert!(w.sigterm(Duration::from_secs(30)).success());
}

#[test]
fn a_bad_siem_section_is_refused_by_config_check_and_a_reload_keeps_the_running_one() {
    let pkis = tempfile::tempdir().unwrap();
    let siem_pki = TestPki::new(pkis.path(), "siem", "IP:127.0.0.1");
    let (mut w, _up) = siem_world("siem-bad", "", &siem_pki.ca, ALLOW_BUT_DENIED);
    let rs = Rsyslog::start(&w, "rsyslog", &siem_pki, None);
    w.start_agent(false);
    let good = std::fs::read_to_string(w.config_path()).unwrap();
    // A client key others can read.
    let key = w.path("siem-client.key");
    std::fs::copy(&siem_pki.key, &key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let bad = good.replace(
        "app_name = \"phigate-test\"\n",
        &format!(
            "app_name = \"phigate-test\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            siem_pki.cert.display(),
            key.display()
        ),
    );
    w.write_config(&bad);
    let out = Command::new(phigate_bin())
        .args(["config", "check"])
        .arg(w.config_path())
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&w.config_path().display().to_string())
            && text.contains("records.siem.client_key_file")
            && text.contains("chmod 600"),
        "{text}"
    );
    // SIGHUP with the bad file: rejected, the stream goes on.
    // SAFETY: signalling our child.
    unsafe { libc::kill(w.agent_pid() as i32, libc::SIGHUP) };
    w.wait_row("events", "config reload rejected", |e| {
        e["kind"] == "config_reload" && e["outcome"] == "rejected"
    });
    // (`phigate status` reads the config file too: the good one again.)
    w.write_config(&good);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    assert_eq!(curl(&w, &ca, &[], "/fhir/Patient/1"), "404");
    wait_lines(&rs, "the request after the rejected reload", |l| {
        !requests_of(l).is_empty()
    });
    assert_eq!(siem_status(&w)["connected"], true);
    assert!(w.sigterm(Duration::from_secs(30)).success());
}
