//! Authorization through the real redirect: the shipped FHIR policies, OIDC tokens
//! from a real provider (the `oidc-provider` npm package, tests/node), workload
//! identity rules, hot reload, and `phigate policy explain` agreeing with the proxy.

use std::path::PathBuf;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const IDP_PORT: u16 = 9600;

struct Env {
    w: World,
    upstream_pki: TestPki,
    idp_pki: TestPki,
    idp: Option<Background>,
    _upstream: Background,
    /// The agent's CA, readable by every user (curl runs as nobody too).
    ca: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca);
    }
}

impl Env {
    /// A world whose policy clock reads `hour` (see [`timezone_at`]): the shipped
    /// set holds clinicians' reads from 19:00 to 07:00.
    fn start(tag: &str, hour: u8, policies: &[(&str, &str)]) -> Env {
        let mut w = World::new(tag);
        let upstream_pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
        let idp_pki = TestPki::new(w.dir.path(), "idp", "IP:127.0.0.1");
        // Real FHIR JSON for every path the tests read, so an allowed read is a 200
        // the masking profiles pass (a 404 page would be a 502 masking_failed).
        let files = w.path("fhir");
        std::fs::create_dir_all(&files).unwrap();
        for (name, resource) in [
            ("Patient-1", "Patient"),
            ("Patient-123", "Patient"),
            ("Coverage-1", "Coverage"),
            ("Coverage-7", "Coverage"),
            ("Observation", "Bundle"),
        ] {
            let id = name.split_once('-').map(|(_, id)| id).unwrap_or("search");
            std::fs::write(
                files.join(format!("{name}.json")),
                format!(r#"{{"resourceType":"{resource}","id":"{id}","status":"active"}}"#),
            )
            .unwrap();
        }
        let upstream = node_upstream(
            &w,
            "127.0.0.2",
            9443,
            Some(&upstream_pki),
            &["--files", files.to_str().unwrap()],
        );
        let idp = start_idp(&w, &idp_pki, IDP_PORT, &w.path("idp-keys-1.json"), "k1");
        w.write_policies(policies);
        w.write_config(&format!(
            r#"{agent}
[policy]
headers = ["x-purpose"]
timezone = "{tz}"

[[oidc.issuers]]
issuer = "https://127.0.0.1:{IDP_PORT}"
audiences = ["patients-api"]
ca_file = "{idp_ca}"
group_map = {{ "fhir-clinicians" = "clinicians" }}
clock_skew_secs = 0
jwks_refresh_min_secs = 0

[[destinations]]
name = "patients-api"
addresses = ["{UP}"]
protocol = "https"
upstream_ca = "{up_ca}"
"#,
            agent = w.agent_section(""),
            tz = timezone_at(hour),
            idp_ca = idp_pki.ca.display(),
            up_ca = upstream_pki.ca.display(),
        ));
        w.start_agent(false);
        let ca = std::env::temp_dir().join(unique("phigate-policy-ca.pem"));
        std::fs::copy(w.path("state/ca.pem"), &ca).unwrap();
        Env {
            w,
            upstream_pki,
            idp_pki,
            idp: Some(idp),
            _upstream: upstream,
            ca,
        }
    }

    fn token_from(&self, port: u16, client: &str, resource: &str) -> String {
        idp_token(&self.w, &self.idp_pki, port, client, resource)
    }

    fn token(&self, client: &str) -> String {
        self.token_from(IDP_PORT, client, "https://patients-api")
    }

    /// A GET from the protected cgroup (as `uid`, default root): status and body.
    fn get(&self, token: Option<&str>, path: &str, uid: Option<u32>) -> (u16, Value) {
        let auth = token.map(|t| format!("authorization: Bearer {t}"));
        let url = format!("https://{UP}{path}");
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            self.ca.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
            "-H",
            "x-purpose: treatment",
        ];
        if let Some(a) = &auth {
            argv.extend(["-H", a.as_str()]);
        }
        argv.push(&url);
        let place = Place {
            uid,
            ..self.w.inside()
        };
        let out = output(place, &argv);
        let text = stdout(&out);
        let (body, code) = text
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl: {}{}", text, stderr(&out)));
        let code: u16 = code.trim().parse().unwrap_or(0);
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        (code, body)
    }

    /// `phigate policy explain` for the same request, inside the netns (it validates
    /// tokens against the same provider).
    /// Returns (decision, reason, status, policies) as printed.
    fn explain(&self, token: Option<&str>, path: &str, user: &str) -> Explained {
        let config = self.w.config_path();
        let token_file = self.w.path(&unique("token"));
        let mut argv: Vec<String> = vec![
            phigate_bin().display().to_string(),
            "policy".into(),
            "explain".into(),
            "--config".into(),
            config.display().to_string(),
            "--user".into(),
            user.into(),
            "-H".into(),
            "x-purpose: treatment".into(),
        ];
        if let Some(t) = token {
            std::fs::write(&token_file, t).unwrap();
            argv.extend(["--token-file".into(), token_file.display().to_string()]);
        }
        argv.push(format!("GET https://{UP}{path}"));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = output(self.w.outside(), &argv);
        let text = stdout(&out);
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .unwrap_or_else(|| panic!("explain printed no {k}: {text}{}", stderr(&out)))
                .to_owned()
        };
        Explained {
            decision: field("decision"),
            reason: field("reason"),
            status: field("status").parse().unwrap(),
            policies: field("policies"),
            approval: field("approval"),
            exit: out.status.code(),
        }
    }
}

#[derive(Debug)]
struct Explained {
    decision: String,
    reason: String,
    status: u16,
    policies: String,
    approval: String,
    exit: Option<i32>,
}

/// phigate's own refusals are JSON naming an `error` and the `request_id`.
fn phigate_refused(body: &Value) -> bool {
    body.get("error").is_some() && body.get("request_id").is_some()
}

/// The request reached the test upstream and its answer came back through phigate:
/// not a refusal, a 502 (masking or upstream failure) or a failed curl.
fn upstream_answered(code: u16, body: &Value) -> bool {
    code == 200 && !phigate_refused(body)
}

fn shipped_fhir() -> String {
    std::fs::read_to_string(shipped_policies().join("fhir.cedar")).unwrap()
}

/// A workload rule beside the shipped set: root may read /json (with any valid token,
/// which the shipped set requires).
const ROOT_JSON: &str = r#"
@id("root-reads-json")
permit (principal, action == Phigate::Action::"GET", resource == Phigate::Destination::"patients-api")
when { principal.user == "root" && context.path == "/json" };
"#;

fn tamper(token: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["groups"] = serde_json::json!(["fhir-clinicians", "billing"]);
    format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    )
}

fn alg_none(token: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"at+jwt"}"#),
        parts[1]
    )
}

#[test]
fn tokens_from_a_real_provider_decide_per_group_and_reason() {
    let mut e = Env::start(
        "pol-oidc",
        12,
        &[("fhir.cedar", &shipped_fhir()), ("root.cedar", ROOT_JSON)],
    );
    let clin = e.token("clinician-app");
    let bill = e.token("billing-app");
    let plain = e.token("plain-app");

    // Allowed per group: the upstream answers (its own status, not phigate's).
    let (code, body) = e.get(Some(&clin), "/fhir/Patient/123", None);
    assert!(upstream_answered(code, &body), "clinician: {code} {body}");
    let (code, body) = e.get(Some(&bill), "/fhir/Coverage/7", None);
    assert!(
        upstream_answered(code, &body),
        "billing coverage: {code} {body}"
    );
    let (code, body) = e.get(Some(&bill), "/fhir/Patient/123", None);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert_eq!(body["reason"], "no_permit");
    assert_eq!(body["policy_ids"], serde_json::json!([]));
    // The shipped set cannot be widened: an operation, a search that pulls in other
    // resources, or a longer name is not a read of /fhir/Patient/*.
    for path in [
        "/fhir/Patient/$export",
        "/fhir/Patient/123/$everything",
        "/fhir/Patient?_revinclude=Observation:patient",
        "/fhir/Patient?_include:iterate=Patient:link",
        "/fhir/Patient?_has:Observation:patient:code=1234",
        "/fhir/PatientSecrets",
    ] {
        let (code, body) = e.get(Some(&clin), path, None);
        assert_eq!(code, 403, "clinician {path}: {body}");
    }
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    let (code, body) = e.get(Some(&clin), "/fhir//Patient/../Coverage/7", None);
    assert_eq!((code, body["reason"].as_str()), (403, Some("no_permit")));

    // Each token problem is a 401 naming it.
    let short = e.token_from(IDP_PORT, "clinician-app", "https://short-lived");
    let other_aud = e.token_from(IDP_PORT, "clinician-app", "https://other-api");
    let second = start_idp(&e.w, &e.idp_pki, 9601, &e.w.path("idp2-keys.json"), "x1");
    let foreign = e.token_from(9601, "clinician-app", "https://patients-api");
    drop(second);
    std::thread::sleep(Duration::from_millis(2500));
    for (what, token, reason) in [
        ("none", None, "missing"),
        ("expired", Some(short.as_str()), "expired"),
        ("audience", Some(other_aud.as_str()), "wrong_audience"),
        ("issuer", Some(foreign.as_str()), "wrong_issuer"),
        ("tampered", Some(tamper(&clin).as_str()), "bad_signature"),
        (
            "alg none",
            Some(alg_none(&clin).as_str()),
            "alg_not_allowed",
        ),
    ] {
        let (code, body) = e.get(token, "/fhir/Patient/123", None);
        assert_eq!(code, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthenticated", "{what}");
        assert_eq!(body["reason"], reason, "{what}");
        assert_eq!(
            body["policy_ids"],
            serde_json::json!(["patients-api.token-required"]),
            "{what}"
        );
    }

    // Workload identity: the same request as root is allowed, as nobody denied.
    let (code, _) = e.get(Some(&plain), "/json", None);
    assert_eq!(code, 200);
    let (code, body) = e.get(Some(&plain), "/json", Some(NOBODY));
    assert_eq!((code, body["reason"].as_str()), (403, Some("no_permit")));

    // Key rotation: the provider restarts with a new key; its tokens carry an unknown
    // kid, phigate re-fetches the keys and accepts them.
    drop(e.idp.take());
    e.idp = Some(start_idp(
        &e.w,
        &e.idp_pki,
        IDP_PORT,
        &e.w.path("idp-keys-2.json"),
        "k2",
    ));
    let rotated = e.token("clinician-app");
    assert!(rotated.len() > 20);
    let (code, body) = e.get(Some(&rotated), "/fhir/Patient/1", None);
    assert!(upstream_answered(code, &body), "rotated key: {code} {body}");

    // Records: decision, deciding ids, set hash, the token's identity, never the token.
    let recs = e.w.wait_records("requests", 13);
    let allowed = recs
        .iter()
        .find(|r| r["policy_ids"] == serde_json::json!(["clinicians.read-clinical"]))
        .expect("the clinician's request is recorded");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["oidc_subject"], "clinician-app");
    assert_eq!(
        allowed["oidc_issuer"],
        format!("https://127.0.0.1:{IDP_PORT}")
    );
    assert_eq!(allowed["oidc_groups"], serde_json::json!(["clinicians"]));
    assert!(
        allowed["oidc_expiry"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z')),
        "{allowed}"
    );
    assert_eq!(allowed["policy_set_hash"].as_str().map(str::len), Some(64));
    let denied: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "deny").collect();
    assert!(denied.len() >= 8, "{denied:?}");
    assert!(denied.iter().all(|r| r["outcome"] == "refused"));
    let all = serde_json::to_string(&recs).unwrap();
    for t in [&clin, &bill, &plain, &rotated] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(
            !all.contains(sig),
            "a token's signature reached the records"
        );
    }
    let _ = &e.upstream_pki;
}

/// `policy explain` tells what the proxy will answer, by day and by night: the
/// shipped off-hours rule holds a clinician's read from 19:00 to 07:00 in the
/// configured time zone, and explain says "held" exactly when the proxy holds.
#[test]
fn explain_agrees_with_the_proxy() {
    for (hour, tag) in [(12, "pol-explain-day"), (3, "pol-explain-night")] {
        let e = Env::start(
            tag,
            hour,
            &[("fhir.cedar", &shipped_fhir()), ("root.cedar", ROOT_JSON)],
        );
        let clin = e.token("clinician-app");
        let bill = e.token("billing-app");
        let plain = e.token("plain-app");
        let cases: Vec<(Option<&str>, &str, Option<u32>, &str)> = vec![
            (Some(&clin), "/fhir/Patient/1", None, "root"),
            (Some(&clin), "/fhir/Coverage/1", None, "root"),
            (Some(&bill), "/fhir/Coverage/1", None, "root"),
            (Some(&bill), "/fhir/Observation?patient=1", None, "root"),
            (None, "/fhir/Patient/1", None, "root"),
            (Some(&plain), "/json", None, "root"),
            (Some(&plain), "/json", Some(NOBODY), "nobody"),
        ];
        for (token, path, uid, user) in cases {
            let (code, body) = e.get(token, path, uid);
            let x = e.explain(token, path, user);
            let what = format!("{hour}:00 {path} as {user}: proxy {code} {body}; explain {x:?}");
            let refused = phigate_refused(&body);
            match x.decision.as_str() {
                "allow" => {
                    assert!(upstream_answered(code, &body), "{what}");
                    assert_eq!(x.exit, Some(0), "{what}");
                }
                "held" => {
                    assert_eq!(
                        (code, body["error"].as_str()),
                        (403, Some("approval_pending")),
                        "{what}"
                    );
                    assert_eq!(
                        (x.status, x.reason.as_str()),
                        (403, "approval_pending"),
                        "{what}"
                    );
                    assert_eq!(x.exit, Some(3), "{what}");
                }
                "deny" => {
                    assert!(refused, "{what}");
                    assert_eq!(x.status, code, "{what}");
                    assert_eq!(body["reason"].as_str(), Some(x.reason.as_str()), "{what}");
                    let proxy_ids: Vec<&str> = body["policy_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap())
                        .collect();
                    let explained = if x.policies.starts_with('(') {
                        ""
                    } else {
                        &x.policies
                    };
                    assert_eq!(proxy_ids.join(", "), explained, "{what}");
                    assert_eq!(x.exit, Some(2), "{what}");
                }
                other => panic!("explain printed decision `{other}`: {what}"),
            }
        }
        // The clinician's read: allowed by day, held by night under `off_hours`.
        let x = e.explain(Some(&clin), "/fhir/Patient/1", "root");
        if hour == 12 {
            assert_eq!((x.decision.as_str(), x.approval.as_str()), ("allow", "-"));
        } else {
            assert_eq!(
                (x.decision.as_str(), x.approval.as_str()),
                ("held", "off_hours")
            );
            let recs = e.w.wait_records("requests", 1);
            assert!(
                recs.iter().any(|r| r["decision"] == "held"
                    && r["policy_ids"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|i| i == "clinicians.off-hours"))),
                "the held read is recorded as held: {recs:?}"
            );
        }
    }
}

/// The world's clock is the one its config names: `timezone_at` puts local time at
/// the hour asked for, checked with the system's own `date`.
#[test]
fn timezone_at_pins_the_policy_clock() {
    for hour in [0u8, 3, 7, 12, 18, 19, 23] {
        let tz = timezone_at(hour);
        let out = std::process::Command::new("date")
            .arg("+%H")
            .env("TZ", &tz)
            .output()
            .unwrap();
        let got: u8 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        // The hour may have turned between the two reads.
        assert!(
            got == hour || got == (hour + 1) % 24,
            "{tz}: {got} for {hour}"
        );
    }
}

#[test]
fn hot_reload_applies_a_good_set_and_keeps_the_old_one_on_error() {
    let allow_json =
        "@id(\"json\")\npermit (principal, action, resource) when { context.path == \"/json\" };\n";
    let e = Env::start("pol-reload", 12, &[("a.cedar", allow_json)]);
    let (code, _) = e.get(None, "/json", None);
    assert_eq!(code, 200);

    // A broken file: rejected with file:line, the old set keeps serving.
    std::fs::write(
        e.w.policies_dir().join("b.cedar"),
        "@id(\"broken\")\npermit (principal, action, resource)\nwhen { principal.nope == 1 };\n",
    )
    .unwrap();
    wait_until(
        "the broken set to be rejected",
        Duration::from_secs(10),
        || e.w.agent_log().contains("b.cedar:3"),
    )
    .unwrap();
    let (code, _) = e.get(None, "/json", None);
    assert_eq!(code, 200, "the old set must keep serving");

    // A good change (the file watcher, no signal): /json is no longer allowed.
    std::fs::remove_file(e.w.policies_dir().join("b.cedar")).unwrap();
    std::fs::write(
        e.w.policies_dir().join("a.cedar"),
        "@id(\"other\")\npermit (principal, action, resource) when { context.path == \"/other\" };\n",
    )
    .unwrap();
    let mut last = 0;
    wait_until("the new set to deny /json", Duration::from_secs(10), || {
        last = e.get(None, "/json", None).0;
        last == 403
    })
    .unwrap_or_else(|err| panic!("{err}: last status {last}\n{}", e.w.agent_log()));

    // SIGHUP reloads the same way.
    std::fs::write(e.w.policies_dir().join("a.cedar"), allow_json).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(e.w.agent_pid() as i32, libc::SIGHUP) };
    wait_until(
        "the set to allow /json again",
        Duration::from_secs(10),
        || e.get(None, "/json", None).0 == 200,
    )
    .unwrap();

    // Every outcome is an event with the set's hash.
    let t = std::time::Instant::now();
    let events = loop {
        let ev: Vec<Value> =
            e.w.all_records("events")
                .into_iter()
                .filter(|r| r["kind"] == "policy_reload")
                .collect();
        if ev.iter().any(|r| r["outcome"] == "rejected")
            && ev.iter().filter(|r| r["outcome"] == "ok").count() >= 2
        {
            break ev;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "policy_reload events: {ev:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rejected = events.iter().find(|r| r["outcome"] == "rejected").unwrap();
    assert!(
        rejected["message"].as_str().unwrap().contains("b.cedar:3"),
        "{rejected}"
    );
    let hashes: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|r| r["policy_set_hash"].as_str())
        .collect();
    assert!(hashes.len() >= 2, "{events:?}");
}

/// Revocation: a reload that no longer allows what an open HTTP/2 connection was
/// granted closes that connection at once (no further request needed), records it,
/// and leaves connections whose accesses are still allowed open and serving.
#[test]
fn a_reload_closes_open_http2_connections_it_no_longer_allows() {
    let both = "@id(\"json\")\npermit (principal, action, resource) when { context.path == \"/json\" };\n\
                @id(\"headers\")\npermit (principal, action, resource) when { context.path == \"/headers\" };\n";
    let e = Env::start("pol-revoke", 12, &[("a.cedar", both)]);
    let script = node_script("h2-session.mjs");
    let go = e.w.path("go");
    let session = |path: &str, log: &str| {
        Background::spawn(
            e.w.inside(),
            &[
                "node",
                script.to_str().unwrap(),
                "--url",
                &format!("https://{UP}"),
                "--ca",
                e.ca.to_str().unwrap(),
                "--path",
                path,
                "--go",
                go.to_str().unwrap(),
                "--timeout",
                "30",
            ],
            e.w.path(log),
        )
    };
    let events = |b: &Background| -> Vec<Value> {
        b.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let revoked = session("/json", "revoked.log");
    let kept = session("/headers", "kept.log");
    for b in [&revoked, &kept] {
        wait_until("the first response", Duration::from_secs(15), || {
            events(b).iter().any(|v| v["event"] == "response")
        })
        .unwrap_or_else(|err| panic!("{err}: {}", b.log_text()));
        assert_eq!(events(b)[0]["status"], 200, "{}", b.log_text());
    }

    // /json is no longer allowed; both sessions sit idle, holding their connection.
    std::fs::write(
        e.w.policies_dir().join("a.cedar"),
        "@id(\"headers\")\npermit (principal, action, resource) when { context.path == \"/headers\" };\n",
    )
    .unwrap();
    wait_until(
        "the /json session to be closed by the agent",
        Duration::from_secs(10),
        || events(&revoked).iter().any(|v| v["event"] == "closed"),
    )
    .unwrap_or_else(|err| panic!("{err}: {}\n{}", revoked.log_text(), e.w.agent_log()));
    let r = events(&revoked);
    assert_eq!(
        r.iter().filter(|v| v["event"] == "response").count(),
        1,
        "closed without sending another request: {r:?}"
    );

    // The other session is still open and still served.
    std::fs::write(&go, "").unwrap();
    wait_until(
        "the kept session's second answer",
        Duration::from_secs(15),
        || events(&kept).iter().any(|v| v["event"] == "done"),
    )
    .unwrap_or_else(|err| panic!("{err}: {}", kept.log_text()));
    let k = events(&kept);
    let statuses: Vec<&Value> = k
        .iter()
        .filter(|v| v["event"] == "response")
        .map(|v| &v["status"])
        .collect();
    assert_eq!(statuses, [200, 200], "{k:?}");
    let closed_at = k.iter().position(|v| v["event"] == "closed");
    let done_at = k.iter().position(|v| v["event"] == "done").unwrap();
    assert!(closed_at.is_none_or(|c| c > done_at), "{k:?}");

    // Recorded: the connection's outcome, and an event naming it and the new set.
    let conns = wait_until_records(&e.w, "connections", |c| c["outcome"] == "revoked");
    assert_eq!(conns.len(), 1, "{conns:?}");
    let id = conns[0]["connection_id"].as_str().unwrap().to_owned();
    assert!(
        conns[0]["error"].as_str().unwrap().contains("no_permit"),
        "{}",
        conns[0]
    );
    let ev = wait_until_records(&e.w, "events", |r| r["kind"] == "connection_revoked");
    assert_eq!(ev.len(), 1, "{ev:?}");
    let msg = ev[0]["message"].as_str().unwrap();
    assert!(msg.contains(&id), "{msg}");
    let reload = wait_until_records(&e.w, "events", |r| {
        r["kind"] == "policy_reload" && r["outcome"] == "ok"
    });
    assert_eq!(reload[0]["policy_set_hash"], ev[0]["policy_set_hash"]);
    // The request on the revoked connection was recorded as allowed by `json`.
    let reqs = e.w.all_records("requests");
    assert!(reqs
        .iter()
        .any(|r| r["connection_id"] == id.as_str() && r["status"] == 200));
}

/// Rows of `table` matching `pred`, waiting up to 10 s for at least one.
fn wait_until_records(w: &World, table: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let t = std::time::Instant::now();
    loop {
        let rows: Vec<Value> = w.all_records(table).into_iter().filter(&pred).collect();
        if !rows.is_empty() || t.elapsed() > Duration::from_secs(10) {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
