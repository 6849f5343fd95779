//! Just-in-time approval through the real redirect: requests held until a reviewer
//! decides with `phigate approvals` (known by SO_PEERCRED), retry-mode grants bound
//! to the exact request, quorum, self-approval and outsiders refused, a webhook to a
//! local receiver, a restart with a pending approval, and the reviewer console in
//! headless Chromium.
//!
//! Reviewers are the host's own users: `daemon` (uid 1, group daemon) and `bin`
//! (uid 2, group bin) review; `nobody` does not.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const HOOK_PORT: u16 = 9700;
const DAEMON: u32 = 1;
const BIN: u32 = 2;
const NOBODY: u32 = 65534;

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

@id("everything-else")
permit (principal, action, resource) when {
  !(context.path like "*$export") && context.path != "/fhir/Observation" &&
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
"#
    )
}

struct Jit {
    w: World,
    _upstream: Background,
    _hook: Background,
    ca: PathBuf,
}

/// Receives webhooks on 127.0.0.1:HOOK_PORT in the world's netns, one JSON line each.
const HOOK: &str = r#"
import http.server, sys
out = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        with open(out, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

impl Jit {
    fn start(tag: &str, admin_extra: &str) -> Jit {
        let mut w = World::new(tag);
        let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
        let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
        let hook = Background::spawn(
            w.outside(),
            &[
                "python3",
                "-c",
                HOOK,
                &HOOK_PORT.to_string(),
                w.path("hooks.jsonl").to_str().unwrap(),
            ],
            w.path("hook.log"),
        );
        w.write_policies(&[("jit.cedar", POLICIES)]);
        std::fs::write(w.policies_dir().join("approvals.toml"), rules()).unwrap();
        let mut config = w.agent_section("");
        if !admin_extra.is_empty() {
            // Extra keys go into the [admin] table the harness writes.
            config = config.replacen("[admin]\n", &format!("[admin]\n{admin_extra}\n"), 1);
        }
        w.write_config(&format!(
            "{config}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
            pki.ca.display()
        ));
        w.start_agent(false);
        // The clients run as several users: the CA must be readable by all.
        let ca = w.path("ca-public.pem");
        std::fs::copy(w.path("state/ca.pem"), &ca).unwrap();
        Jit {
            w,
            _upstream: upstream,
            _hook: hook,
            ca,
        }
    }

    fn socket(&self) -> String {
        self.w.path("admin.sock").display().to_string()
    }

    /// curl through the redirect as `uid`: (status, body, approval id header).
    fn curl(&self, uid: Option<u32>, path: &str) -> (u16, Value, Option<String>) {
        let place = Place {
            uid,
            ..self.w.inside()
        };
        let out = output(
            place,
            &[
                "curl",
                "-sS",
                "--max-time",
                "60",
                "--cacert",
                self.ca.to_str().unwrap(),
                "-D",
                "-",
                &format!("https://{UP}{path}"),
            ],
        );
        assert!(out.status.success(), "curl {path}: {}", stderr(&out));
        parse_response(&stdout(&out))
    }

    fn curl_background(&self, path: &str, tag: &str) -> (Background, PathBuf) {
        let out = self.w.path(&format!("{tag}.out"));
        let bg = Background::spawn(
            self.w.inside(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "60",
                "--cacert",
                self.ca.to_str().unwrap(),
                "-D",
                "-",
                "-o",
                out.to_str().unwrap(),
                &format!("https://{UP}{path}"),
            ],
            self.w.path(&format!("{tag}.log")),
        );
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

#[test]
fn a_reviewer_approves_in_the_console_in_headless_chromium_and_the_held_request_completes() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.toml");
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
    std::fs::write(
        &accounts,
        format!("[[account]]\nname = \"alice\"\npassword = \"{hash}\"\ngroups = [\"privacy\"]\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&accounts, std::fs::Permissions::from_mode(0o600)).unwrap();
    let j = Jit::start(
        "jit-console",
        &format!(
            "console_listen = \"127.0.0.1:15443\"\nconsole_accounts = \"{}\"",
            accounts.display()
        ),
    );
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
