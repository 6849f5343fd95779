//! Just-in-time approval through the real redirect: requests held until a reviewer
//! decides with `phigate approvals` (known by SO_PEERCRED), retry-mode grants bound
//! to the exact request, quorum, self-approval and outsiders refused, a webhook to a
//! local receiver (no PHI in it, retried, `notify_failed` when it never answers, over
//! verified HTTPS), a restart with a pending approval, the reviewer console in
//! headless Chromium, and the console's CSRF and Origin checks over plain HTTP.
//!
//! Reviewers are the host's own users: `daemon` (uid 1, group daemon) and `bin`
//! (uid 2, group bin) review; `nobody` does not.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const HOOK_PORT: u16 = 9700;
/// HTTPS webhook receivers: one with a certificate from a CA the agent trusts, one
/// from a CA it does not.
const HOOK_TLS_PORT: u16 = 9701;
const HOOK_ROGUE_PORT: u16 = 9702;
const CONSOLE: &str = "https://127.0.0.1:15443";
const DAEMON: u32 = 1;
const BIN: u32 = 2;
const IDP_PORT: u16 = 9600;

const POLICIES: &str = r#"
@id("export.needs-approval")
@approval("export_hold")
permit (principal, action, resource) when { context.path == "/fhir/Patient/$export" };

@id("slow-export.needs-approval")
@approval("expire_fast")
permit (principal, action, resource) when { context.path == "/fhir/Group/1/$export" };

@id("search.needs-approval")
@approval("search_retry")
permit (principal, action, resource) when { context.path == "/fhir/Observation" };

@id("condition.needs-two")
@approval("two_reviewers")
permit (principal, action, resource) when { context.path == "/fhir/Condition" };

@id("everything.needs-approval")
@approval("export_hold")
permit (principal, action, resource) when { context.path like "/fhir/Patient/*/$everything" };

@id("hook-flaky-500.needs-approval")
@approval("hook_flaky_500")
permit (principal, action, resource) when { context.path == "/fhir/Basic/flaky-500" };

@id("hook-flaky-close.needs-approval")
@approval("hook_flaky_close")
permit (principal, action, resource) when { context.path == "/fhir/Basic/flaky-close" };

@id("hook-down.needs-approval")
@approval("hook_down")
permit (principal, action, resource) when { context.path == "/fhir/Basic/down" };

@id("hook-https.needs-approval")
@approval("hook_https")
permit (principal, action, resource) when { context.path == "/fhir/Basic/https" };

@id("hook-untrusted.needs-approval")
@approval("hook_untrusted")
permit (principal, action, resource) when { context.path == "/fhir/Basic/untrusted" };

@id("everything-else")
permit (principal, action, resource) when {
  !(context.path like "*$export") && !(context.path like "*$everything") &&
  !(context.path like "/fhir/Basic/*") && context.path != "/fhir/Observation" &&
  context.path != "/fhir/Condition"
};
"#;

fn rules() -> String {
    format!(
        r#"
[[rule]]
name = "export_hold"
reviewers = ["daemon", "privacy"]
mode = "hold"
timeout_secs = 30
webhook = "http://127.0.0.1:{HOOK_PORT}/hook"

[[rule]]
name = "expire_fast"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 1

[[rule]]
name = "search_retry"
reviewers = ["daemon", "bin"]
mode = "retry"
grant_secs = 60
uses = 1

[[rule]]
name = "two_reviewers"
reviewers = ["daemon", "bin"]
quorum = 2
mode = "retry"

# The receiver fails the first 2 attempts at /fail/MODE/2/...: 500, or the
# connection closed without an answer.
[[rule]]
name = "hook_flaky_500"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 60
webhook = "http://127.0.0.1:{HOOK_PORT}/fail/500/2/hook"

[[rule]]
name = "hook_flaky_close"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 60
webhook = "http://127.0.0.1:{HOOK_PORT}/fail/close/2/hook"

[[rule]]
name = "hook_down"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 60
webhook = "http://127.0.0.1:{HOOK_PORT}/fail/500/1000/hook"

[[rule]]
name = "hook_https"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 60
webhook = "https://127.0.0.1:{HOOK_TLS_PORT}/hook"

[[rule]]
name = "hook_untrusted"
reviewers = ["daemon"]
mode = "hold"
timeout_secs = 60
webhook = "https://127.0.0.1:{HOOK_ROGUE_PORT}/hook"
"#
    )
}

struct Jit {
    w: World,
    _upstream: Background,
    _hooks: Vec<Background>,
    ca: PathBuf,
    /// The OIDC provider's TLS, when the world has one.
    idp_pki: Option<TestPki>,
}

/// Receives webhooks on 127.0.0.1:PORT in the world's netns: every attempt's URL path
/// is a line of PREFIX.attempts, every body answered 200 a line of PREFIX.jsonl. A
/// path /fail/500/N/... is answered 500 for its first N attempts, /fail/close/N/...
/// has its connection closed without an answer; anything else 200. With CERT and
/// KEY it speaks HTTPS.
const HOOK: &str = r#"
import http.server, ssl, sys
port, prefix = int(sys.argv[1]), sys.argv[2]
attempts = {}
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        n = attempts[self.path] = attempts.get(self.path, 0) + 1
        with open(prefix + ".attempts", "a") as f:
            f.write(self.path + "\n")
        parts = self.path.split("/")
        if len(parts) > 3 and parts[1] == "fail" and n <= int(parts[3]):
            if parts[2] == "close":
                self.close_connection = True
                return
            self.send_response(500); self.send_header("content-length", "0"); self.end_headers()
            return
        with open(prefix + ".jsonl", "ab") as f:
            f.write(body + b"\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if len(sys.argv) > 4:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// Starts a [`HOOK`] receiver (HTTPS with `pki`) and waits until it accepts.
fn hook_receiver(w: &World, port: u16, prefix: &str, pki: Option<&TestPki>) -> Background {
    let port_s = port.to_string();
    let prefix = w.path(prefix);
    let mut argv = vec!["python3", "-c", HOOK, &port_s, prefix.to_str().unwrap()];
    if let Some(p) = pki {
        argv.extend([p.cert.to_str().unwrap(), p.key.to_str().unwrap()]);
    }
    let bg = Background::spawn(w.outside(), &argv, w.path(&format!("hook-{port}.log")));
    assert!(
        w.netns.wait_port(
            format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(10)
        ),
        "webhook receiver on {port} did not start: {}",
        bg.log_text()
    );
    bg
}

impl Jit {
    fn start(tag: &str, admin_extra: &str) -> Jit {
        Jit::start_with(tag, admin_extra, false)
    }

    /// `tls_hooks`: also HTTPS receivers on HOOK_TLS_PORT (certificate from a CA the
    /// agent trusts through the system trust store, here SSL_CERT_FILE) and
    /// HOOK_ROGUE_PORT (a CA it does not trust).
    fn start_with(tag: &str, admin_extra: &str, tls_hooks: bool) -> Jit {
        Jit::build(tag, admin_extra, tls_hooks, None, "")
    }

    /// `idp`: a real OIDC provider on IDP_PORT whose tokens the agent accepts (its
    /// `email` claim names the person); `rules_extra` is appended to approvals.toml.
    fn build(
        tag: &str,
        admin_extra: &str,
        tls_hooks: bool,
        idp: Option<&std::path::Path>,
        rules_extra: &str,
    ) -> Jit {
        let mut w = World::new(tag);
        let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
        let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
        let mut hooks = vec![hook_receiver(&w, HOOK_PORT, "hooks", None)];
        if tls_hooks {
            let trusted = TestPki::new(w.dir.path(), "hook", "IP:127.0.0.1");
            let rogue = TestPki::new(w.dir.path(), "rogue", "IP:127.0.0.1");
            hooks.push(hook_receiver(
                &w,
                HOOK_TLS_PORT,
                "hooks-tls",
                Some(&trusted),
            ));
            hooks.push(hook_receiver(
                &w,
                HOOK_ROGUE_PORT,
                "hooks-rogue",
                Some(&rogue),
            ));
            // The webhook client trusts the system roots: the test CA stands in for
            // an organization's CA installed in the host's trust store.
            w.agent_env
                .push(format!("SSL_CERT_FILE={}", trusted.ca.display()));
        }
        let mut oidc = String::new();
        let idp_pki = idp.map(|dir| TestPki::new(dir, "idp", "IP:127.0.0.1"));
        if let (Some(dir), Some(idp_pki)) = (idp, &idp_pki) {
            hooks.push(start_idp(
                &w,
                idp_pki,
                IDP_PORT,
                &dir.join("idp-keys.json"),
                "k1",
            ));
            oidc = format!(
                "\n[[oidc.issuers]]\nissuer = \"https://127.0.0.1:{IDP_PORT}\"\naudiences = [\"patients-api\"]\nca_file = \"{}\"\nperson_claim = \"email\"\n",
                idp_pki.ca.display()
            );
        }
        w.write_policies(&[("jit.cedar", POLICIES)]);
        std::fs::write(
            w.policies_dir().join("approvals.toml"),
            format!("{rules_extra}\n{}", rules()),
        )
        .unwrap();
        let mut config = w.agent_section("");
        if !admin_extra.is_empty() {
            // Extra keys go into the [admin] table the harness writes.
            config = config.replacen("[admin]\n", &format!("[admin]\n{admin_extra}\n"), 1);
        }
        w.write_config(&format!(
            "{config}{oidc}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
            pki.ca.display()
        ));
        w.start_agent(false);
        // The clients run as several users: the CA must be readable by all.
        let ca = w.path("ca-public.pem");
        std::fs::copy(w.path("state/ca.pem"), &ca).unwrap();
        Jit {
            w,
            _upstream: upstream,
            _hooks: hooks,
            ca,
            idp_pki,
        }
    }

    fn socket(&self) -> String {
        self.w.path("admin.sock").display().to_string()
    }

    /// curl through the redirect as `uid`: (status, body, approval id header).
    fn curl(&self, uid: Option<u32>, path: &str) -> (u16, Value, Option<String>) {
        self.curl_with(uid, path, &[])
    }

    /// As [`Self::curl`], with more curl arguments (`-H ...`).
    fn curl_with(
        &self,
        uid: Option<u32>,
        path: &str,
        extra: &[&str],
    ) -> (u16, Value, Option<String>) {
        let place = Place {
            uid,
            ..self.w.inside()
        };
        let url = format!("https://{UP}{path}");
        let mut argv = self.curl_argv();
        argv.extend_from_slice(extra);
        argv.push(&url);
        let out = output(place, &argv);
        assert!(out.status.success(), "curl {path}: {}", stderr(&out));
        parse_response(&stdout(&out))
    }

    /// curl trusting the agent's CA, response head on stdout.
    fn curl_argv(&self) -> Vec<&str> {
        vec![
            "curl",
            "-sS",
            "--max-time",
            "60",
            "--cacert",
            self.ca.to_str().unwrap(),
            "-D",
            "-",
        ]
    }

    fn curl_background(&self, path: &str, tag: &str) -> (Background, PathBuf) {
        self.curl_background_with(path, tag, &[])
    }

    /// As [`Self::curl_background`], with more curl arguments (`-X POST`, `--data`).
    fn curl_background_with(&self, path: &str, tag: &str, extra: &[&str]) -> (Background, PathBuf) {
        let out = self.w.path(&format!("{tag}.out"));
        let url = format!("https://{UP}{path}");
        let mut argv = self.curl_argv();
        argv.extend(["-o", out.to_str().unwrap()]);
        argv.extend_from_slice(extra);
        argv.push(&url);
        let bg = Background::spawn(self.w.inside(), &argv, self.w.path(&format!("{tag}.log")));
        (bg, out)
    }

    /// `phigate approvals ARGS` as `uid` over the admin socket.
    fn approvals(&self, uid: u32, args: &[&str]) -> std::process::Output {
        let bin = phigate_bin();
        let socket = self.socket();
        let mut argv = vec![bin.to_str().unwrap(), "approvals", "--socket", &socket];
        argv.extend_from_slice(args);
        output(
            Place {
                netns: None,
                cgroup: None,
                uid: Some(uid),
            },
            &argv,
        )
    }

    /// Waits for one open approval whose listing mentions `needle`; its id.
    fn pending(&self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let out = self.approvals(DAEMON, &["list"]);
            let text = stdout(&out);
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return line.split_whitespace().next().unwrap().to_owned();
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "no pending approval for {needle}: {text}{}\n{}",
                stderr(&out),
                self.w.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn request_record(&self, request_id: &str) -> Value {
        let t = Instant::now();
        loop {
            if let Some(r) = self
                .w
                .records("requests")
                .into_iter()
                .find(|r| r["request_id"] == request_id)
            {
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no record {request_id}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the approvals table has a `state` row for `id`; that row.
    fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            if let Some(r) = self
                .w
                .records("approvals")
                .into_iter()
                .find(|r| r["approval_id"] == id && r["state"] == state)
            {
                return r;
            }
            assert!(
                t.elapsed() < within,
                "no {state} row for {id} within {within:?}: {:?}\n{}",
                self.approval_states(id),
                self.w.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL paths the receiver with `prefix` was asked for, one per attempt.
    fn hook_attempts(&self, prefix: &str) -> Vec<String> {
        std::fs::read_to_string(self.w.path(&format!("{prefix}.attempts")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The bodies the receiver with `prefix` answered 200.
    fn hook_bodies(&self, prefix: &str) -> Vec<String> {
        std::fs::read_to_string(self.w.path(&format!("{prefix}.jsonl")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn approval_states(&self, id: &str) -> Vec<String> {
        self.w
            .records("approvals")
            .into_iter()
            .filter(|r| r["approval_id"] == id)
            .map(|r| r["state"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// `curl -D -` output: status, JSON body (or Null), the approval id header.
fn parse_response(text: &str) -> (u16, Value, Option<String>) {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let approval = head
        .lines()
        .find_map(|l| l.strip_prefix("x-phigate-approval-id: "))
        .map(|s| s.trim().to_owned());
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::Null),
        approval,
    )
}

fn wait_file(p: &std::path::Path, within: Duration) -> String {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Ok(s) = std::fs::read_to_string(p) {
            if !s.is_empty() {
                return s;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} did not appear", p.display());
}

#[test]
fn a_held_export_completes_once_a_reviewer_approves_and_the_record_names_them() {
    let j = Jit::start("jit-hold", "");
    let (mut curl, _) = j.curl_background("/fhir/Patient/$export", "held");
    let id = j.pending("/fhir/Patient/$export");
    // The request is still waiting.
    assert!(curl.child.try_wait().unwrap().is_none());

    // Outsiders, missing reasons: refused, and nothing changes.
    let out = j.approvals(NOBODY, &["approve", &id, "--reason", "looks fine"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no approval") || stderr(&out).contains("not in a reviewer group"),
        "{}",
        stderr(&out)
    );
    let out = j.approvals(DAEMON, &["approve", &id, "--reason", " "]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reason is required"),
        "{}",
        stderr(&out)
    );

    let out = j.approvals(
        DAEMON,
        &["approve", &id, "--reason", "quarterly report, ticket 7"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let status = curl.child.wait().unwrap();
    assert!(status.success(), "{}", curl.log_text());
    // curl -D - -o FILE prints the response head on stdout (its log).
    let head = curl.log_text();
    assert!(head.contains(" 404"), "the upstream answered: {head}");
    let request_id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-phigate-request-id: "))
        .map(|s| s.trim().to_owned());
    let r = j.request_record(&request_id.expect("request id header"));
    assert_eq!(r["decision"], "approved");
    assert_eq!(r["approval_id"], id.as_str());
    assert_eq!(r["approvers"], serde_json::json!(["daemon"]));
    assert_eq!(r["approval_reason"], "quarterly report, ticket 7");
    assert_eq!(
        r["policy_ids"],
        serde_json::json!(["export.needs-approval"])
    );

    // Every state change is a row; the webhook was delivered and carries no PHI.
    let t = Instant::now();
    let want = ["requested", "notified", "approved", "used"];
    while want
        .iter()
        .any(|s| !j.approval_states(&id).contains(&s.to_string()))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            j.approval_states(&id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let hook: Value = serde_json::from_str(
        wait_file(&j.w.path("hooks.jsonl"), Duration::from_secs(5))
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(hook["approval_id"], id.as_str());
    assert_eq!(hook["rule"], "export_hold");
    assert!(hook["text"].as_str().unwrap().contains(&id));
}

#[test]
fn denied_and_expired_holds_get_403_with_the_approval_id() {
    let j = Jit::start("jit-deny", "");
    let (mut curl, body) = j.curl_background("/fhir/Patient/$export", "denied");
    let id = j.pending("/fhir/Patient/$export");
    let out = j.approvals(DAEMON, &["deny", &id, "--reason", "no export this week"]);
    assert!(out.status.success(), "{}", stderr(&out));
    curl.child.wait().unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&body).unwrap()).unwrap();
    assert_eq!(v["error"], "approval_denied");
    assert_eq!(v["approval_id"], id.as_str());
    assert!(std::fs::read_to_string(&curl.log).unwrap().contains(" 403"));

    // Nobody decides within the rule's 1 s.
    let (status, v, header) = j.curl(None, "/fhir/Group/1/$export");
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "approval_expired");
    let expired = v["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(header.as_deref(), Some(expired.as_str()));
    let r = j.request_record(v["request_id"].as_str().unwrap());
    assert_eq!(r["decision"], "expired");
    let t = Instant::now();
    while !j.approval_states(&expired).contains(&"expired".to_string()) {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn retry_mode_binds_the_grant_to_the_request_and_requester_and_counts_quorum() {
    let j = Jit::start("jit-retry", "");
    // 403 at once, with the approval id in the body and a header.
    let (status, v, header) = j.curl(None, "/fhir/Observation?patient=123");
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "approval_pending");
    let id = v["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(header.as_deref(), Some(id.as_str()));
    assert_eq!(
        j.request_record(v["request_id"].as_str().unwrap())["decision"],
        "held"
    );
    // Asking again before a decision names the same approval.
    assert_eq!(
        j.curl(None, "/fhir/Observation?patient=123").1["approval_id"],
        id.as_str()
    );

    let out = j.approvals(BIN, &["approve", &id, "--reason", "care coordination"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A different request does not ride on it...
    let (status, other, _) = j.curl(None, "/fhir/Observation?patient=456");
    assert_eq!(status, 403);
    assert_ne!(other["approval_id"], id.as_str());
    // ...nor the same request from another requester.
    let (status, _, _) = j.curl(Some(NOBODY), "/fhir/Observation?patient=123");
    assert_eq!(status, 403);
    // The same request passes once (uses = 1), then needs a new approval.
    let (status, _, _) = j.curl(None, "/fhir/Observation?patient=123");
    assert_eq!(status, 404, "the upstream answers the approved request");
    let (status, again, _) = j.curl(None, "/fhir/Observation?patient=123");
    assert_eq!(status, 403);
    assert_ne!(again["approval_id"], id.as_str());

    // Self-approval: the requester (here daemon) cannot approve their own request.
    let (_, mine, _) = j.curl(Some(DAEMON), "/fhir/Observation?_count=5");
    let mine = mine["approval_id"].as_str().unwrap().to_owned();
    let out = j.approvals(DAEMON, &["approve", &mine, "--reason", "it is mine"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot approve"), "{}", stderr(&out));

    // Quorum of two: daemon alone is not enough; daemon and bin are.
    let (_, c, _) = j.curl(None, "/fhir/Condition");
    let cid = c["approval_id"].as_str().unwrap().to_owned();
    assert!(j
        .approvals(DAEMON, &["approve", &cid, "--reason", "ok"])
        .status
        .success());
    assert_eq!(j.curl(None, "/fhir/Condition").0, 403);
    let out = j.approvals(DAEMON, &["approve", &cid, "--reason", "again"]);
    assert!(
        stderr(&out).contains("already approved"),
        "{}",
        stderr(&out)
    );
    assert!(j
        .approvals(BIN, &["approve", &cid, "--reason", "ok too"])
        .status
        .success());
    let (status, _, _) = j.curl(None, "/fhir/Condition");
    assert_eq!(status, 404);
}

#[test]
fn a_pending_retry_approval_survives_a_restart() {
    let mut j = Jit::start("jit-restart", "");
    let (_, v, _) = j.curl(None, "/fhir/Observation?patient=9");
    let id = v["approval_id"].as_str().unwrap().to_owned();
    assert!(j.w.sigterm(Duration::from_secs(20)).success());
    j.w.start_agent(false);
    assert_eq!(j.pending("/fhir/Observation"), id);
    assert!(j
        .approvals(DAEMON, &["approve", &id, "--reason", "after restart"])
        .status
        .success());
    assert_eq!(j.curl(None, "/fhir/Observation?patient=9").0, 404);
}

const BROWSER: &str = r#"
import sys
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.support import expected_conditions as EC
base, approval_id, shot = sys.argv[1], sys.argv[2], sys.argv[3]
o = webdriver.ChromeOptions()
o.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"]:
    o.add_argument(a)
# The console's certificate is minted from the test's own phigate CA.
o.set_capability("acceptInsecureCerts", True)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
wait = WebDriverWait(d, 20)
try:
    d.get(base + "/approvals")
    wait.until(EC.presence_of_element_located((By.ID, "username")))
    # A wrong password first.
    d.find_element(By.ID, "username").send_keys("alice")
    d.find_element(By.ID, "password").send_keys("wrong")
    d.find_element(By.ID, "signin").click()
    wait.until(EC.presence_of_element_located((By.ID, "error")))
    d.find_element(By.ID, "username").send_keys("alice")
    d.find_element(By.ID, "password").send_keys("correct horse battery")
    d.find_element(By.ID, "signin").click()
    wait.until(EC.presence_of_element_located((By.ID, "pending")))
    assert approval_id in d.page_source, d.page_source
    # Reviewers see the recorded form of the request: never the raw patient id.
    assert "patient=123" not in d.page_source, "the raw patient id reached the console"
    d.find_element(By.CSS_SELECTOR, "a.open").click()
    wait.until(EC.presence_of_element_located((By.ID, "reason")))
    d.find_element(By.ID, "reason").send_keys("monthly quality report")
    d.save_screenshot(shot)
    d.find_element(By.ID, "approve").click()
    # Approved, and at once used by the held request.
    wait.until(EC.text_to_be_present_in_element((By.ID, "votes"), "approved by alice"))
    d.get(base + "/history")
    wait.until(EC.presence_of_element_located((By.ID, "history")))
    assert "monthly quality report" in d.page_source
    print("ok")
except Exception:
    d.save_screenshot(shot + ".fail.png")
    print("URL", d.current_url, "PAGE", d.page_source[-3000:])
    raise
finally:
    d.quit()
"#;

/// A console accounts file in `dir` with one reviewer, `alice` (group `privacy`,
/// password `correct horse battery`); the `[admin]` lines serving the console with it
/// on CONSOLE.
fn console_admin(dir: &std::path::Path) -> String {
    console_admin_for(dir, &[("alice", &["privacy"])])
}

/// As [`console_admin`], with these accounts (name, groups), all with the password
/// `correct horse battery`.
fn console_admin_for(dir: &std::path::Path, accounts_of: &[(&str, &[&str])]) -> String {
    let accounts = dir.join("accounts.toml");
    let hash = {
        let mut c = std::process::Command::new(phigate_bin())
            .args(["console", "hash-password"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin
            .take()
            .unwrap()
            .write_all(b"correct horse battery\n")
            .unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let text: String = accounts_of
        .iter()
        .map(|(name, groups)| {
            format!(
                "[[account]]\nname = \"{name}\"\npassword = \"{hash}\"\ngroups = {groups:?}\n\n"
            )
        })
        .collect();
    std::fs::write(&accounts, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&accounts, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "console_listen = \"127.0.0.1:15443\"\nconsole_accounts = \"{}\"",
        accounts.display()
    )
}

#[test]
fn a_reviewer_approves_in_the_console_in_headless_chromium_and_the_held_request_completes() {
    let dir = tempfile::tempdir().unwrap();
    let j = Jit::start("jit-console", &console_admin(dir.path()));
    let (mut curl, _) = j.curl_background("/fhir/Patient/$export", "console");
    let id = j.pending("/fhir/Patient/$export");
    // The console's own certificate chains to phigate's CA.
    let out = output(
        j.w.outside(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            j.ca.to_str().unwrap(),
            "https://127.0.0.1:15443/login",
        ],
    );
    assert_eq!(stdout(&out), "200", "{}", stderr(&out));

    // Kept for a look after the run: target/tmp/console-review.png.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-review.png");
    let out = output(
        j.w.outside(),
        &[
            "python3",
            "-c",
            BROWSER,
            "https://127.0.0.1:15443",
            &id,
            shot.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(curl.child.wait().unwrap().success(), "{}", curl.log_text());
    let head = std::fs::read_to_string(&curl.log).unwrap();
    assert!(head.contains(" 404"), "the upstream answered: {head}");
    let t = Instant::now();
    loop {
        let rows: Vec<Value> =
            j.w.records("approvals")
                .into_iter()
                .filter(|r| r["approval_id"] == id.as_str() && r["state"] == "approved")
                .collect();
        if let Some(r) = rows.first() {
            assert_eq!(r["reviewer"], "alice");
            assert_eq!(r["reason"], "monthly quality report");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_webhook_names_the_approval_and_carries_no_phi_of_the_held_request() {
    let j = Jit::start("jit-hook-phi", "");
    // PHI in every part of the request: the path's patient id, search values, body.
    const PATIENT: &str = "8675309";
    const PHI: [&str; 6] = [
        PATIENT,
        "Zyxwvut",
        "Quentin",
        "1961-02-03",
        "4815162342",
        "078-05-1120",
    ];
    let path = format!(
        "/fhir/Patient/{PATIENT}/$everything?name=Zyxwvut&birthdate=1961-02-03&patient=4815162342"
    );
    let (mut curl, _) = j.curl_background_with(
        &path,
        "phi",
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"resourceType":"Parameters","ssn":"078-05-1120","name":"Quentin Zyxwvut"}"#,
        ],
    );
    let id = j.pending("$everything");
    j.wait_state(&id, "notified", Duration::from_secs(10));
    let bodies = j.hook_bodies("hooks");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let raw = &bodies[0];
    for phi in PHI {
        assert!(!raw.contains(phi), "the webhook carries {phi:?}: {raw}");
    }
    let hook: Value = serde_json::from_str(raw).unwrap();
    assert_eq!(hook["approval_id"], id.as_str());
    assert_eq!(hook["rule"], "export_hold");
    assert_eq!(hook["method"], "POST");
    assert_eq!(hook["destination"], "patients-api");
    // The patient id only as the records hold it: its keyed pseudonym.
    let out = output(
        Place::default(),
        &[
            phigate_bin().to_str().unwrap(),
            "audit",
            "pseudonym",
            "--config",
            j.w.config_path().to_str().unwrap(),
            PATIENT,
        ],
    );
    let pseudonym = stdout(&out).trim().to_owned();
    assert!(pseudonym.starts_with("p:"), "{}", stderr(&out));
    assert_eq!(
        hook["path"],
        format!("/fhir/Patient/{pseudonym}/$everything")
    );
    assert!(hook["text"].as_str().unwrap().contains(&id), "{hook}");

    // The notification decides nothing: still held until a reviewer denies it.
    assert!(curl.child.try_wait().unwrap().is_none());
    let out = j.approvals(DAEMON, &["deny", &id, "--reason", "not today"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(curl.child.wait().unwrap().success());
    assert!(curl.log_text().contains(" 403"), "{}", curl.log_text());
}

#[test]
fn a_webhook_is_retried_until_a_failing_receiver_answers() {
    let j = Jit::start("jit-hook-retry", "");
    // The receiver answers 500 twice at one URL and closes the connection without an
    // answer twice at the other, then takes each.
    let (_c500, _) = j.curl_background("/fhir/Basic/flaky-500", "flaky-500");
    let id_500 = j.pending("/fhir/Basic/flaky-500");
    let (_close, _) = j.curl_background("/fhir/Basic/flaky-close", "flaky-close");
    let id_close = j.pending("/fhir/Basic/flaky-close");
    for (id, url) in [
        (&id_500, "/fail/500/2/hook"),
        (&id_close, "/fail/close/2/hook"),
    ] {
        j.wait_state(id, "notified", Duration::from_secs(20));
        let attempts = j.hook_attempts("hooks");
        assert_eq!(
            attempts.iter().filter(|p| *p == url).count(),
            3,
            "two failed attempts, the third delivered: {attempts:?}"
        );
        let delivered = j
            .hook_bodies("hooks")
            .iter()
            .filter(|b| serde_json::from_str::<Value>(b).unwrap()["approval_id"] == id.as_str())
            .count();
        assert_eq!(delivered, 1);
        assert!(
            !j.approval_states(id).contains(&"notify_failed".to_string()),
            "{:?}",
            j.approval_states(id)
        );
    }
}

#[test]
fn a_webhook_that_never_succeeds_is_recorded_notify_failed_and_the_request_stays_held() {
    let j = Jit::start("jit-hook-down", "");
    let (mut curl, _) = j.curl_background("/fhir/Basic/down", "down");
    let id = j.pending("/fhir/Basic/down");
    // 4 attempts, 1 + 2 + 4 s apart.
    let row = j.wait_state(&id, "notify_failed", Duration::from_secs(30));
    let error = row["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("after 4 attempts") && error.contains("500"),
        "{row}"
    );
    assert_eq!(
        j.hook_attempts("hooks"),
        vec!["/fail/500/1000/hook"; 4],
        "every attempt reached the receiver"
    );
    assert!(j.hook_bodies("hooks").is_empty());
    assert!(!j.approval_states(&id).contains(&"notified".to_string()));

    // A failed notification decides nothing: the request is still held and pending,
    // and a reviewer who hears of it otherwise still decides it.
    assert!(curl.child.try_wait().unwrap().is_none());
    assert_eq!(j.pending("/fhir/Basic/down"), id);
    let out = j.approvals(DAEMON, &["approve", &id, "--reason", "paged by phone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(curl.child.wait().unwrap().success());
    assert!(
        curl.log_text().contains(" 404"),
        "the upstream answered: {}",
        curl.log_text()
    );
}

#[test]
fn https_webhooks_go_to_a_receiver_the_host_trusts_and_never_to_one_it_does_not() {
    let j = Jit::start_with("jit-hook-tls", "", true);
    let (_trusted, _) = j.curl_background("/fhir/Basic/https", "https");
    let ok = j.pending("/fhir/Basic/https");
    let (_rogue, _) = j.curl_background("/fhir/Basic/untrusted", "untrusted");
    let bad = j.pending("/fhir/Basic/untrusted");

    j.wait_state(&ok, "notified", Duration::from_secs(20));
    let bodies = j.hook_bodies("hooks-tls");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let hook: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(hook["approval_id"], ok.as_str());

    // The certificate is refused at the handshake: nothing is sent to that receiver.
    let row = j.wait_state(&bad, "notify_failed", Duration::from_secs(30));
    assert!(
        row["error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate")),
        "{row}"
    );
    assert!(
        j.hook_attempts("hooks-rogue").is_empty(),
        "an untrusted receiver got a request: {:?}",
        j.hook_attempts("hooks-rogue")
    );
    assert!(j.hook_bodies("hooks-rogue").is_empty());
    assert!(!j.approval_states(&bad).contains(&"notified".to_string()));
}

#[test]
fn the_console_refuses_decisions_without_its_origin_and_csrf_token_and_takes_its_own_form() {
    let dir = tempfile::tempdir().unwrap();
    let j = Jit::start("jit-csrf", &console_admin(dir.path()));
    let (mut held, _) = j.curl_background("/fhir/Patient/$export", "csrf");
    let id = j.pending("/fhir/Patient/$export");
    let ca = j.ca.to_str().unwrap().to_owned();
    let curl = |args: &[&str]| {
        let mut argv = vec!["curl", "-sS", "--max-time", "10", "--cacert", &ca];
        argv.extend_from_slice(args);
        let out = output(j.w.outside(), &argv);
        assert!(out.status.success(), "curl {args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let login = |jar: &std::path::Path| {
        let code = curl(&[
            "-c",
            jar.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Origin: {CONSOLE}"),
            "--data-urlencode",
            "username=alice",
            "--data-urlencode",
            "password=correct horse battery",
            &format!("{CONSOLE}/login"),
        ]);
        assert_eq!(code, "303", "login");
    };
    // The session's CSRF token, from the approval's page (its form carries it).
    let token_of = |jar: &std::path::Path| {
        let page = curl(&[
            "-b",
            jar.to_str().unwrap(),
            &format!("{CONSOLE}/approvals/{id}"),
        ]);
        let at = page
            .find(r#"name="csrf" value=""#)
            .unwrap_or_else(|| panic!("no CSRF token in {page}"))
            + r#"name="csrf" value=""#.len();
        let token = page[at..].split('"').next().unwrap().to_owned();
        assert_eq!(token.len(), 64, "{token}");
        token
    };
    // POSTs the approve form; the status and where it redirects.
    let decide = |jar: Option<&std::path::Path>, origin: Option<&str>, token: Option<&str>| {
        let (origin, token) = (
            origin.map(|o| format!("Origin: {o}")),
            token.map(|t| format!("csrf={t}")),
        );
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}"];
        if let Some(jar) = jar {
            args.extend(["-b", jar.to_str().unwrap()]);
        }
        if let Some(o) = &origin {
            args.extend(["-H", o]);
        }
        if let Some(t) = &token {
            args.extend(["--data-urlencode", t]);
        }
        let url = format!("{CONSOLE}/approvals/{id}/decide");
        args.extend([
            "--data-urlencode",
            "verdict=approve",
            "--data-urlencode",
            "reason=reviewed in the console",
            &url,
        ]);
        curl(&args)
    };

    let (jar, other_jar) = (dir.path().join("jar"), dir.path().join("other-jar"));
    login(&jar);
    login(&other_jar);
    let token = token_of(&jar);
    let other_token = token_of(&other_jar);
    assert_ne!(token, other_token, "tokens are per session");
    let wrong = "0".repeat(64);
    let (jar_path, token, other_token) = (jar.as_path(), token.as_str(), other_token.as_str());
    let refused = [
        (
            "a foreign origin with the right token",
            Some(jar_path),
            Some("https://evil.example"),
            Some(token),
            "403",
        ),
        (
            "the console's host on another port",
            Some(jar_path),
            Some("https://127.0.0.1:15444"),
            Some(token),
            "403",
        ),
        (
            "plain http from the console's host",
            Some(jar_path),
            Some("http://127.0.0.1:15443"),
            Some(token),
            "403",
        ),
        ("no token", Some(jar_path), Some(CONSOLE), None, "403"),
        (
            "a wrong token",
            Some(jar_path),
            Some(CONSOLE),
            Some(wrong.as_str()),
            "403",
        ),
        ("no origin and no token", Some(jar_path), None, None, "403"),
        (
            "another session's token",
            Some(jar_path),
            Some(CONSOLE),
            Some(other_token),
            "403",
        ),
        (
            "the right token without the session cookie",
            None,
            Some(CONSOLE),
            Some(token),
            "303",
        ),
    ];
    for (what, jar, origin, token, want) in refused {
        let got = decide(jar, origin, token);
        assert!(got.starts_with(want), "{what}: {got}");
        if want == "303" {
            assert!(got.ends_with("/login"), "{what}: {got}");
        }
        // Nothing was decided: still pending, the request still held.
        assert!(
            !j.approval_states(&id).contains(&"approved".to_string()),
            "{what}: {:?}",
            j.approval_states(&id)
        );
        assert_eq!(j.pending("/fhir/Patient/$export"), id, "{what}");
        assert!(held.child.try_wait().unwrap().is_none(), "{what}");
    }

    // The console's own form: its origin, the session's token.
    let got = decide(Some(jar_path), Some(CONSOLE), Some(token));
    assert_eq!(got, format!("303 {CONSOLE}/approvals/{id}"));
    assert!(held.child.wait().unwrap().success(), "{}", held.log_text());
    assert!(held.log_text().contains(" 404"), "{}", held.log_text());
    let row = j.wait_state(&id, "approved", Duration::from_secs(10));
    assert_eq!(row["reviewer"], "alice");
    assert_eq!(row["reason"], "reviewed in the console");
}

/// Signs in to the console as `user` in headless Chromium, opens approval `id`, and
/// approves it with a reason; prints `approved` or the console's error.
const BROWSER_DECIDE: &str = r#"
import sys
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.support import expected_conditions as EC
from selenium.common.exceptions import StaleElementReferenceException
base, approval_id, user = sys.argv[1], sys.argv[2], sys.argv[3]
o = webdriver.ChromeOptions()
o.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage"]:
    o.add_argument(a)
o.set_capability("acceptInsecureCerts", True)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
# The console re-renders while a decision lands: an element read mid-render is
# stale, and the wait reads it again.
wait = WebDriverWait(d, 20, ignored_exceptions=[StaleElementReferenceException])
try:
    d.get(base + "/login")
    wait.until(EC.presence_of_element_located((By.ID, "username")))
    d.find_element(By.ID, "username").send_keys(user)
    d.find_element(By.ID, "password").send_keys("correct horse battery")
    d.find_element(By.ID, "signin").click()
    wait.until(EC.presence_of_element_located((By.ID, "pending")))
    d.get(base + "/approvals/" + approval_id)
    wait.until(EC.presence_of_element_located((By.ID, "reason")))
    d.find_element(By.ID, "reason").send_keys("reviewed")
    d.find_element(By.ID, "approve").click()
    wait.until(lambda d: d.find_elements(By.ID, "error") or
               ("approved by " + user) in d.find_element(By.ID, "votes").text)
    errors = d.find_elements(By.ID, "error")
    print(("error: " + errors[0].text) if errors else "approved")
finally:
    d.quit()
"#;

/// Dana (approvals.toml `[[person]]`) is the Unix login `daemon`, the console account
/// `dana.r`, and the holder of tokens of the provider's client `0oa7x1q9dana`, whose
/// subject is opaque (her person comes from the token's `email` claim). She asks
/// with her token; under none of her names may she approve that request, in the
/// console (Chromium) or the CLI. On someone else's request needing two approvals
/// she counts once. One requester's pending approvals are bounded (429, recorded).
#[test]
fn one_person_cannot_approve_their_own_request_or_vote_twice_under_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let admin = console_admin_for(
        dir.path(),
        &[("dana.r", &["daemon"]), ("carol", &["daemon"])],
    );
    let people = r#"
max_pending_per_requester = 2

[[person]]
name = "dana"
unix = ["daemon"]
console = ["dana.r"]
oidc = ["dana@hospital.test"]
"#;
    let j = Jit::build("jit-people", &admin, false, Some(dir.path()), people);
    let token = idp_token(
        &j.w,
        j.idp_pki.as_ref().unwrap(),
        IDP_PORT,
        "0oa7x1q9dana",
        "https://patients-api",
    );
    let bearer = format!("authorization: Bearer {token}");
    let chromium = |id: &str, user: &str| {
        let out = output(
            j.w.outside(),
            &["python3", "-c", BROWSER_DECIDE, CONSOLE, id, user],
        );
        assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
        stdout(&out).trim().to_owned()
    };

    // Her own request, with her token, from a service's workload (root).
    let (status, body, id) = j.curl_with(None, "/fhir/Observation?code=hba1c", &["-H", &bearer]);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "approval_pending");
    let mine = id.expect("an approval id");
    let requested = j.wait_state(&mine, "requested", Duration::from_secs(10));
    assert_eq!(
        requested["requester"],
        "oidc:https://127.0.0.1:9600#0oa7x1q9dana"
    );
    assert_eq!(requested["requester_person"], "dana");
    // As her Unix login over the admin socket...
    let out = j.approvals(DAEMON, &["approve", &mine, "--reason", "mine"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("daemon is dana, who asked for this request"),
        "{}",
        stderr(&out)
    );
    // ...and as her console account in a browser.
    let said = chromium(&mine, "dana.r");
    assert!(
        said.contains("dana.r is dana, who asked for this request"),
        "{said}"
    );
    assert_eq!(j.approval_states(&mine), ["requested"]);
    assert_eq!(
        j.curl_with(None, "/fhir/Observation?code=hba1c", &["-H", &bearer])
            .0,
        403
    );

    // Someone else's request that needs two approvals.
    let (status, _, id) = j.curl(Some(NOBODY), "/fhir/Condition");
    assert_eq!(status, 403);
    let theirs = id.expect("an approval id");
    assert_eq!(chromium(&theirs, "dana.r"), "approved");
    let out = j.approvals(DAEMON, &["approve", &theirs, "--reason", "me again"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("daemon is dana, who already approved this request (as dana.r via console)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        j.curl(Some(NOBODY), "/fhir/Condition").0,
        403,
        "one person is not a quorum of two"
    );
    assert_eq!(chromium(&theirs, "carol"), "approved");
    assert_eq!(
        j.curl(Some(NOBODY), "/fhir/Condition").0,
        404,
        "the upstream answered"
    );
    let approved: Vec<(Value, Value)> =
        j.w.wait_rows("approvals", 2, "approving their request", |r| {
            r["approval_id"] == theirs.as_str() && r["state"] == "approved"
        })
        .into_iter()
        .map(|r| (r["reviewer"].clone(), r["reviewer_person"].clone()))
        .collect();
    assert_eq!(
        approved,
        [
            ("dana.r".into(), "dana".into()),
            ("carol".into(), "carol".into())
        ]
    );

    // Two pending approvals per requester here; the third is refused at once.
    for n in 1..=2 {
        let (status, body, _) = j.curl(Some(NOBODY), &format!("/fhir/Observation?n={n}"));
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("approval_pending"))
        );
    }
    let (status, body, id) = j.curl(Some(NOBODY), "/fhir/Observation?n=3");
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_pending_approvals");
    assert!(id.is_none());
    let refused = j.request_record(body["request_id"].as_str().unwrap());
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["outcome"], "refused");
    // Dana's own request is hers, not nobody's: it did not count. The rows are
    // written after the answers, so wait for them; then no fifth may exist.
    j.w.wait_rows("approvals", 4, "requested", |r| r["state"] == "requested");
    assert_eq!(
        j.w.records("approvals")
            .iter()
            .filter(|r| r["state"] == "requested")
            .count(),
        4
    );
}

/// Password guessing against the console over real HTTPS: after three failures the
/// account and the address wait (429 with Retry-After) even with the right password,
/// another account from that address waits too, and after the wait the right
/// password signs in.
#[test]
fn console_sign_ins_back_off_after_failures_per_account_and_address() {
    let dir = tempfile::tempdir().unwrap();
    let admin = console_admin_for(
        dir.path(),
        &[("alice", &["privacy"]), ("bob", &["privacy"])],
    );
    let j = Jit::start("jit-backoff", &admin);
    let ca = j.ca.to_str().unwrap().to_owned();
    let sign_in = |user: &str, password: &str| -> (String, u64) {
        let out = output(
            j.w.outside(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                &ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{retry-after}",
                "-H",
                &format!("Origin: {CONSOLE}"),
                "--data-urlencode",
                &format!("username={user}"),
                "--data-urlencode",
                &format!("password={password}"),
                &format!("{CONSOLE}/login"),
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let (code, retry) = text.split_once(' ').unwrap_or((&text, ""));
        (code.to_owned(), retry.trim().parse().unwrap_or(0))
    };
    for _ in 0..3 {
        assert_ne!(sign_in("alice", "guess").0, "303");
    }
    let (code, retry) = sign_in("alice", "correct horse battery");
    assert_eq!(code, "429", "the right password waits too");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        sign_in("bob", "correct horse battery").0,
        "429",
        "the address waits"
    );
    std::thread::sleep(Duration::from_secs(retry + 1));
    assert_eq!(sign_in("alice", "correct horse battery").0, "303");
}
