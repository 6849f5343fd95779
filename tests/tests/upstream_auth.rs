//! The backend credential lives in phigate, not in the apps (issue 24): a
//! destination's `upstream_auth` is presented to the real upstream after the policy
//! permits, in place of whatever the client sent. A real Node upstream records what
//! it received; tokens come from the real OIDC provider (oidc-provider, client
//! credentials with a secret and with a SMART-style signed assertion); mutual TLS
//! against an upstream that refuses clients without a certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const IDP_PORT: u16 = 9600;
const STATIC_SECRET: &str = "s3cret-static-backend-token";
const CLIENT_TOKEN: &str = "the-apps-own-token";

struct Env {
    w: World,
    upstream_pki: TestPki,
    idp_pki: TestPki,
    /// What the upstream received, one JSON line per request.
    seen: PathBuf,
    _upstream: Background,
}

impl Env {
    /// An upstream on 127.0.0.2:9443 recording what it receives (`upstream_args`:
    /// e.g. `--client-ca`); the agent is started by the test.
    fn new(tag: &str, upstream_args: &[&str]) -> Env {
        let w = World::new(tag);
        let upstream_pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
        let idp_pki = TestPki::new(w.dir.path(), "idp", "IP:127.0.0.1");
        let seen = w.path("seen.jsonl");
        let mut args = vec!["--record", seen.to_str().unwrap()];
        args.extend_from_slice(upstream_args);
        let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&upstream_pki), &args);
        Env {
            w,
            upstream_pki,
            idp_pki,
            seen,
            _upstream: upstream,
        }
    }

    /// The config with one https destination whose table ends with `auth`.
    fn config(&self, auth: &str) -> String {
        format!(
            "{}\n[[destinations]]\nname = \"fhir\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n{auth}\n",
            self.w.agent_section(""),
            self.upstream_pki.ca.display()
        )
    }

    /// A secret file of the world, 0600 unless `mode` says otherwise.
    fn secret(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = self.w.path(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// GET from the protected cgroup with the app's own credential: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let ca = self.w.path("state/ca.pem");
        let out = output(
            self.w.inside(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                ca.to_str().unwrap(),
                "-H",
                &format!("authorization: Bearer {CLIENT_TOKEN}"),
                "-H",
                "x-api-key: the-apps-own-key",
                "-w",
                "\n%{http_code}",
                &format!("https://{UP}{path}"),
            ],
        );
        let text = stdout(&out);
        let (body, code) = text
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl: {text}{}", stderr(&out)));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// The requests the upstream received, in order.
    fn seen(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.seen)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn hup_and_wait(&self, what: &str) {
        let before = self.w.agent_log().matches(what).count();
        // SAFETY: signalling our child.
        unsafe { libc::kill(self.w.agent_pid() as i32, libc::SIGHUP) };
        wait_until(what, Duration::from_secs(10), || {
            self.w.agent_log().matches(what).count() > before
        })
        .unwrap();
    }

    /// The request records of `path`, once there are `n`.
    fn records_of(&self, path: &str, n: usize) -> Vec<Value> {
        self.w.wait_rows("requests", n, path, |r| r["path"] == path)
    }

    /// Nothing phigate wrote (records as DuckDB-readable rows, its log, `status`)
    /// holds `secret`.
    fn assert_never_written(&self, secret: &str) {
        for table in ["requests", "events", "connections"] {
            let rows = serde_json::to_string(&self.w.all_records(table)).unwrap();
            assert!(!rows.contains(secret), "{table} records hold the secret");
        }
        assert!(
            !self.w.agent_log().contains(secret),
            "the log holds the secret"
        );
        let status = self.w.status().to_string();
        assert!(
            !status.contains(secret),
            "status shows the secret: {status}"
        );
    }
}

fn config_check(config: &Path) -> std::process::Output {
    Command::new(phigate_bin())
        .args(["config", "check"])
        .arg(config)
        .output()
        .unwrap()
}

/// The payload of a JWT (no verification: the provider signed it, the test reads it).
fn jwt_claims(bearer: &str) -> Value {
    use base64::Engine as _;
    let token = bearer.strip_prefix("Bearer ").expect("a bearer token");
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_static_credential_replaces_the_apps_and_a_bad_secret_file_is_refused() {
    let mut e = Env::new("ua-static", &[]);
    let bearer = e.secret("fhir.token", &format!("{STATIC_SECRET}\n"), 0o600);
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-static\"\nbearer_file = \"{}\"\n",
        bearer.display()
    )));
    e.w.start_agent(false);

    // The upstream gets phigate's credential, never the app's.
    let (code, body) = e.get("/json?bytes=100");
    assert_eq!(code, 200, "{body}");
    let seen = e.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0]["headers"]["authorization"],
        format!("Bearer {STATIC_SECRET}")
    );
    assert_eq!(seen[0]["headers"]["x-api-key"], "the-apps-own-key");
    let r = &e.records_of("/json", 1)[0];
    assert_eq!(r["upstream_credential"], "fhir-static");
    assert_eq!(r["upstream_credential_source"], "static");

    // An API-key header instead, the app's Authorization stripped (SIGHUP reload).
    let key = e.secret("fhir.key", "api-key-from-phigate", 0o600);
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-key\"\nheader = \"X-API-Key\"\nvalue_file = \"{}\"\nforward_client_token = false\n",
        key.display()
    )));
    e.hup_and_wait("config reloaded");
    let (code, body) = e.get("/json?bytes=101");
    assert_eq!(code, 200, "{body}");
    let h = &e.seen()[1]["headers"];
    assert_eq!(h["x-api-key"], "api-key-from-phigate");
    assert!(h.get("authorization").is_none(), "forwarded: {h}");

    // The file changes (rotated in place): phigate reloads it by itself.
    let reloads = e.w.agent_log().matches("config reloaded").count();
    std::fs::write(&key, "api-key-rotated").unwrap();
    wait_until(
        "the reload on the file change",
        Duration::from_secs(10),
        || e.w.agent_log().matches("config reloaded").count() > reloads,
    )
    .unwrap();
    let (code, _) = e.get("/json?bytes=101");
    assert_eq!(code, 200);
    assert_eq!(e.seen()[2]["headers"]["x-api-key"], "api-key-rotated");

    // A secret readable by others: `config check` names the file, the field, why.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = config_check(&e.w.config_path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:", e.w.config_path().display()))
            && err.contains("destinations[0].upstream_auth.value_file")
            && err.contains(&format!("{}: readable by group or others", key.display())),
        "{err}"
    );
    // ... and a reload with it is rejected: the running credential keeps serving.
    e.hup_and_wait("config reload rejected");
    assert!(e.w.agent_log().contains("readable by group or others"));
    let (code, _) = e.get("/json?bytes=102");
    assert_eq!(code, 200);
    assert_eq!(e.seen()[3]["headers"]["x-api-key"], "api-key-rotated");

    // A secret owned by another user is refused the same way.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let err = stderr(&config_check(&e.w.config_path()));
    assert!(err.contains("owned by uid 65534"), "{err}");
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();

    e.records_of("/json", 4);
    e.assert_never_written(STATIC_SECRET);
    e.assert_never_written("api-key-from-phigate");
    e.assert_never_written("api-key-rotated");
}

#[test]
fn client_credentials_from_the_provider_cached_refreshed_and_an_outage_is_a_502() {
    let mut e = Env::new("ua-oauth", &[]);
    let idp = start_idp_with(
        &e.w,
        &e.idp_pki,
        IDP_PORT,
        &e.w.path("idp-keys.json"),
        "k1",
        &["--backend-ttl", "10"],
    );
    let secret = e.secret("client.secret", "secret\n", 0o600);
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-oauth\"\ntoken_url = \"https://127.0.0.1:{IDP_PORT}/token\"\nclient_id = \"fhir-backend\"\nclient_secret_file = \"{}\"\nresource = \"https://fhir-backend\"\nca_file = \"{}\"\nforward_client_token = false\n",
        secret.display(),
        e.idp_pki.ca.display()
    )));
    e.w.start_agent(false);

    // Concurrent first requests share one fetch: one token reaches the upstream.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| assert_eq!(e.get("/json?bytes=10").0, 200));
        }
    });
    let seen = e.seen();
    let first = seen[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    for r in &seen {
        assert_eq!(r["headers"]["authorization"], first.as_str(), "one fetch");
    }
    let claims = jwt_claims(&first);
    assert_eq!(claims["aud"], "fhir-backend");
    assert_eq!(claims["client_id"], "fhir-backend");
    // Then cached.
    assert_eq!(e.get("/json?bytes=11").0, 200);
    assert_eq!(e.seen()[6]["headers"]["authorization"], first.as_str());

    // Refreshed before it expires: in the last fifth of its 10 s, a new token.
    let exp = claims["exp"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(8600).saturating_sub(t0.elapsed()));
    assert_eq!(e.get("/json?bytes=12").0, 200);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let second = e.seen()[7]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second, first, "refreshed");
    assert!(now < exp, "the first token was still valid when replaced");
    let sources: Vec<String> = e
        .records_of("/json", 8)
        .iter()
        .map(|r| r["upstream_credential_source"].as_str().unwrap().to_owned())
        .collect();
    // The first requests' (those that waited for the one fetch, or came just after
    // it) are token_endpoint or cached; the refresh is a fetch, the one between cached.
    let fetched = sources.iter().filter(|s| *s == "token_endpoint").count();
    let cached = sources.iter().filter(|s| *s == "cached").count();
    assert!(
        fetched >= 2 && cached >= 1 && fetched + cached == 8,
        "{sources:?}"
    );

    // The provider goes away: once the token expires, requests are refused with a
    // 502 naming the reason and recorded; nothing reaches the upstream, and never
    // the app's own token.
    drop(idp);
    std::thread::sleep(Duration::from_millis(10_500));
    let (code, body) = e.get("/json?bytes=13");
    assert_eq!(code, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "upstream_credential_unavailable");
    assert!(
        body["reason"].as_str().unwrap().contains("token endpoint"),
        "{body}"
    );
    assert_eq!(e.seen().len(), 8, "nothing reached the upstream");
    let r = e.w.wait_row("requests", "of the refused request", |r| {
        r["status"] == 502 && r["upstream_credential"] == "fhir-oauth"
    });
    assert_eq!(r["outcome"], "upstream_error");
    assert!(r["upstream_credential_source"].is_null());

    let status = e.w.status();
    let c = &status["credentials"][0];
    assert_eq!(c["id"], "fhir-oauth");
    assert_eq!(c["kind"], "client_credentials");
    assert!(c["failures"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["valid_until"].is_string(), "{c}");
    e.assert_never_written(first.trim_start_matches("Bearer "));
    e.assert_never_written(second.trim_start_matches("Bearer "));
}

#[test]
fn a_smart_backend_assertion_gets_the_token() {
    let mut e = Env::new("ua-smart", &[]);
    let key = e.w.path("smart.key");
    let public = e.w.path("smart.pub");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-out",
        key.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let _idp = start_idp_with(
        &e.w,
        &e.idp_pki,
        IDP_PORT,
        &e.w.path("idp-keys.json"),
        "k1",
        &["--smart-key", public.to_str().unwrap()],
    );
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-smart\"\ntoken_url = \"https://127.0.0.1:{IDP_PORT}/token\"\nclient_id = \"smart-backend\"\nprivate_key_file = \"{}\"\nassertion_alg = \"ES384\"\nkey_id = \"smart-1\"\nresource = \"https://fhir-backend\"\nca_file = \"{}\"\n",
        key.display(),
        e.idp_pki.ca.display()
    )));
    let out = config_check(&e.w.config_path());
    assert!(out.status.success(), "{}", stderr(&out));
    e.w.start_agent(false);
    let (code, body) = e.get("/json?bytes=10");
    assert_eq!(code, 200, "{body}");
    let claims = jwt_claims(e.seen()[0]["headers"]["authorization"].as_str().unwrap());
    assert_eq!(claims["client_id"], "smart-backend");
    assert_eq!(claims["aud"], "fhir-backend");
    let r = &e.records_of("/json", 1)[0];
    assert_eq!(r["upstream_credential"], "fhir-smart");
    assert_eq!(r["upstream_credential_source"], "token_endpoint");
}

/// A client certificate (CA + leaf for clientAuth) made with openssl.
fn client_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    std::fs::write(dir.join("client.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client-ca.key",
        "-out",
        "client-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=client test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=phigate",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "client-ca.pem",
        "-CAkey",
        "client-ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
        "-extfile",
        "client.cnf",
    ]);
    let key = dir.join("client.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.join("client-ca.pem"), dir.join("client.pem"), key)
}

#[test]
fn mutual_tls_to_an_upstream_that_refuses_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (client_ca, cert, key) = client_pki(dir.path());
    let mut e = Env::new("ua-mtls", &["--client-ca", client_ca.to_str().unwrap()]);
    // Without the certificate: the upstream refuses phigate's handshake.
    e.w.write_config(&e.config(""));
    e.w.start_agent(false);
    let (code, body) = e.get("/json?bytes=10");
    assert_eq!(code, 502, "{body}");
    assert!(e.seen().is_empty());

    // With it (a SIGHUP reload): served, and recorded as the client certificate.
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-mtls\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    )));
    e.hup_and_wait("config reloaded");
    let (code, body) = e.get("/json?bytes=10");
    assert_eq!(code, 200, "{body}");
    assert_eq!(e.seen().len(), 1);
    // The app's own credential still passes (forward_client_token defaults to true).
    assert_eq!(
        e.seen()[0]["headers"]["authorization"],
        format!("Bearer {CLIENT_TOKEN}")
    );
    let r =
        e.w.wait_row("requests", "served over mTLS", |r| r["status"] == 200);
    assert_eq!(r["upstream_credential"], "fhir-mtls");
    assert_eq!(r["upstream_credential_source"], "client_certificate");

    // A key readable by others is refused.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = stderr(&config_check(&e.w.config_path()));
    assert!(
        err.contains("upstream_auth.client_key_file")
            && err.contains("readable by group or others"),
        "{err}"
    );
}

/// The attacker is an unprivileged app in the protected cgroup (`nobody`) that wants
/// the backend credential phigate keeps from it. It cannot read the secret file or
/// the agent's memory, environment or records; and an upstream endpoint that echoes
/// its request (here `/headers`, as httpbin and many debug endpoints do; `TRACE`
/// does the same) would hand it the credential, so phigate refuses any answer that
/// repeats the credential it presented: a clean, recorded 502, over HTTP/1.1 and
/// HTTP/2, and the secret reaches the app in no byte.
#[test]
fn an_unprivileged_app_cannot_obtain_the_credential_even_from_an_echoing_upstream() {
    let mut e = Env::new("ua-echo", &[]);
    let bearer = e.secret("fhir.token", &format!("{STATIC_SECRET}\n"), 0o600);
    e.w.write_config(&e.config(&format!(
        "[destinations.upstream_auth]\nid = \"fhir-static\"\nbearer_file = \"{}\"\n",
        bearer.display()
    )));
    e.w.start_agent(false);
    let ca = e.w.public_copy(&e.w.path("state/ca.pem"));
    let nobody = e.w.unprivileged();

    // Asked as the app would: an ordinary answer passes (the guard is no outage).
    let curl = |extra: &[&str], path: &str| {
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            ca.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
        ];
        argv.extend_from_slice(extra);
        let url = format!("https://{UP}{path}");
        argv.push(&url);
        let out = output(nobody, &argv);
        (stdout(&out), stderr(&out))
    };
    let (body, _) = curl(&[], "/json?bytes=200");
    assert!(body.ends_with("\n200"), "{body}");

    // The echo, over HTTP/1.1 and HTTP/2, with and without a credential of its own.
    for (extra, tag) in [
        (&["--http1.1"][..], "h1"),
        (&["--http2"][..], "h2"),
        (
            &["--http1.1", "-H", "authorization: Bearer mine"][..],
            "h1-own",
        ),
    ] {
        let (body, err) = curl(extra, &format!("/headers?{tag}"));
        assert!(
            !body.contains(STATIC_SECRET) && !err.contains(STATIC_SECRET),
            "{tag}: the app got the credential: {body}{err}"
        );
        assert!(body.ends_with("\n502"), "{tag}: {body}{err}");
        assert!(body.contains("credential_reflected"), "{tag}: {body}");
    }
    // The upstream did get the credential each time: the refusal is of the answer.
    let echoed = e
        .seen()
        .iter()
        .filter(|s| s["path"].as_str().unwrap_or("").starts_with("/headers"))
        .count();
    assert_eq!(echoed, 3);
    let refused = e.records_of("/headers", 3);
    for r in &refused {
        assert_eq!(r["status"], 502, "{r}");
        assert_eq!(r["outcome"], "upstream_error", "{r}");
        assert_eq!(r["uid"], 65534, "{r}");
        let error = r["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("repeats the credential `fhir-static`"),
            "{r}"
        );
    }

    // Nor can it read the credential where it lives: the secret file, the agent's
    // environment, memory and open files, the records, the state directory.
    let agent = e.w.agent_pid();
    let script = format!(
        r#"
import os
for p in [{secret:?}, "/proc/{agent}/environ", "/proc/{agent}/mem", "/proc/{agent}/fd/0", {records:?}, {state:?}]:
    try:
        if os.path.isdir(p):
            print("READ", p, os.listdir(p))
        else:
            with open(p, "rb") as f:
                print("READ", p, f.read(64))
    except PermissionError as e:
        print("DENIED", p)
"#,
        secret = bearer.to_str().unwrap(),
        records = e.w.path("records").to_str().unwrap(),
        state = e.w.path("state").to_str().unwrap(),
    );
    let out = output(nobody, &["/usr/bin/python3", "-c", &script]);
    let text = stdout(&out);
    assert_eq!(text.matches("DENIED").count(), 6, "{text}{}", stderr(&out));
    assert!(!text.contains("READ"), "{text}");

    e.assert_never_written(STATIC_SECRET);
}
