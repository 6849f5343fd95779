//! Hostile input through the real redirect: request smuggling shapes, slow clients,
//! malformed ClientHellos, encoded paths against path policies, bodies the masker
//! must refuse. Each is refused cleanly or re-framed harmlessly, recorded, and the
//! agent keeps serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const HOST: &str = "patients.example.test";

/// Only these paths are permitted; anything else (e.g. /fhir/Patient/1) is denied.
const POLICY: &str = r#"@id("hostile.some-paths")
permit (principal, action, resource)
when {
  context.path == "/upload" || context.path == "/stats" || context.path == "/json" ||
  context.path like "/fhir/Coverage/*" || context.path like "/files/*"
};
"#;

struct Hostile {
    w: World,
    _upstream: Background,
}

impl Hostile {
    fn start(tag: &str, top_extra: &str, dest_extra: &str, upstream_args: &[&str]) -> Hostile {
        let mut w = World::new(tag);
        w.write_policies(&[("hostile.cedar", POLICY)]);
        let pki = TestPki::new(
            w.dir.path(),
            "upstream",
            &format!("IP:127.0.0.2,DNS:{HOST}"),
        );
        let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), upstream_args);
        w.write_config(&format!(
            "{}\n{top_extra}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n{dest_extra}\n",
            w.agent_section(""),
            pki.ca.display()
        ));
        w.start_agent(false);
        Hostile {
            w,
            _upstream: upstream,
        }
    }

    fn ca(&self) -> String {
        self.w.path("state/ca.pem").display().to_string()
    }

    /// raw.py in the protected cgroup; its JSON report.
    fn raw(&self, tls: bool, extra: &[&str], payload: &str) -> Value {
        let script = script("raw.py");
        let ca = self.ca();
        let mut argv = vec!["python3", script.to_str().unwrap(), "--connect", UP];
        if tls {
            argv.extend(["--tls", "--ca", &ca, "--sni", HOST]);
        }
        argv.extend_from_slice(extra);
        argv.push(payload);
        let out = output(self.w.inside(), &argv);
        serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("raw.py ({e}): {} {}", stdout(&out), stderr(&out)))
    }

    fn curl(&self, args: &[&str]) -> std::process::Output {
        let ca = self.ca();
        let mut argv = vec!["curl", "-sS", "--max-time", "20", "--cacert", ca.as_str()];
        argv.extend_from_slice(args);
        output(self.w.inside(), &argv)
    }

    /// The upstream's own count of requests it received (this one included).
    fn upstream_requests(&self) -> u64 {
        let out = self.curl(&[&format!("https://{UP}/stats")]);
        let v: Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("/stats ({e}): {}", stderr(&out)));
        v["requests"].as_u64().unwrap()
    }

    fn assert_serves(&self) {
        let out = self.curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{UP}/json"),
        ]);
        assert_eq!(
            stdout(&out),
            "200",
            "the agent still serves: {}",
            stderr(&out)
        );
    }

    /// Waits until the table stops growing (rotation is 0.2 s) and returns it.
    fn settled(&self, table: &str) -> Vec<Value> {
        let mut last = usize::MAX;
        let t = std::time::Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(600));
            let rows = self.w.records(table);
            if rows.len() == last {
                return rows;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the {table} records never settled: {} and growing",
                rows.len()
            );
            last = rows.len();
        }
    }
}

/// A request record for /fhir/Patient/ID (records hold the ID pseudonymized).
fn patient_path(r: &Value) -> bool {
    r["path"]
        .as_str()
        .is_some_and(|p| p.starts_with("/fhir/Patient/"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("hostile")
        .join(name)
}

#[test]
fn request_smuggling_shapes_never_reach_the_upstream_unseen() {
    let h = Hostile::start("smuggle", "", "", &["--h1only"]);
    // The request a smuggler wants the upstream to run without phigate deciding it.
    let hidden = format!("GET /fhir/Patient/1 HTTP/1.1\\r\\nHost: {HOST}\\r\\n\\r\\n");
    let h2 = |name: &str, v: &str| format!("{name}: {v}\\r\\n");
    let post = |headers: &str, body: &str| {
        format!("POST /upload HTTP/1.1\\r\\nHost: {HOST}\\r\\n{headers}\\r\\n{body}")
    };
    let chunk_of_hidden = {
        // The hidden request as one chunk: its length in hex, counted unescaped.
        let plain = hidden.replace("\\r\\n", "\r\n");
        format!("{:x}\\r\\n{hidden}\\r\\n0\\r\\n\\r\\n", plain.len())
    };
    // (case, payload, statuses the client must see). Every shape below ends with the
    // connection closed by phigate, except the pipelined pair.
    let cases: Vec<(&str, String, &[u16])> = vec![
        // Two pipelined requests: each is decided on its own; the second is denied.
        (
            "a pipelined second request",
            format!("GET /json HTTP/1.1\\r\\nHost: {HOST}\\r\\n\\r\\n{hidden}"),
            &[200, 403],
        ),
        // CL.TE: a front end honouring Content-Length would pass the hidden request
        // on as body, one honouring chunked would run it next. hyper takes chunked
        // (RFC 9112 6.1), answers, and closes the connection (6.3): the bytes after
        // the last chunk are never parsed.
        (
            "content-length and chunked, hidden request after the last chunk",
            post(
                &(h2("Content-Length", "60") + &h2("Transfer-Encoding", "chunked")),
                &format!("0\\r\\n\\r\\n{hidden}"),
            ),
            &[200],
        ),
        // TE.CL: the hidden request is chunk data; it reaches the upstream only as
        // the body of the POST phigate re-frames with its own length.
        (
            "chunked and a short content-length, hidden request inside a chunk",
            post(
                &(h2("Content-Length", "4") + &h2("Transfer-Encoding", "chunked")),
                &chunk_of_hidden,
            ),
            &[200],
        ),
        (
            "two different content-lengths",
            post(
                &(h2("Content-Length", "0") + &h2("Content-Length", "44")),
                &hidden,
            ),
            &[400],
        ),
        (
            "transfer-encoding with chunked not last",
            post(
                &h2("Transfer-Encoding", "chunked, identity"),
                &chunk_of_hidden,
            ),
            &[400],
        ),
        (
            "an unknown transfer-encoding",
            post(&h2("Transfer-Encoding", "xchunked"), &chunk_of_hidden),
            &[400],
        ),
        (
            "whitespace before the colon",
            post(&h2("Transfer-Encoding ", "chunked"), &chunk_of_hidden),
            &[400],
        ),
        (
            "obs-fold continuation line",
            post(
                &(h2("Content-Length", "0") + "X-Folded: a\\r\\n Transfer-Encoding: chunked\\r\\n"),
                &hidden,
            ),
            &[400],
        ),
        (
            "a signed content-length",
            post(&h2("Content-Length", "+44"), &hidden),
            &[400],
        ),
    ];
    for (what, payload, want) in &cases {
        let r = h.raw(true, &["--read-secs", "3"], payload);
        let got: Vec<u16> = r["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as u16)
            .collect();
        assert_eq!(&got[..], *want, "{what}: {r}");
        if want.len() == 1 {
            assert_eq!(r["closed_by_peer"], true, "{what}: phigate must close: {r}");
        }
    }

    // What the upstream received is exactly what phigate forwarded and recorded.
    let upstream = h.upstream_requests();
    let requests = h.settled("requests");
    let forwarded: Vec<&Value> = requests
        .iter()
        .filter(|r| !r["upstream_http_version"].is_null())
        .collect();
    assert_eq!(upstream, forwarded.len() as u64, "{requests:#?}");
    assert!(
        forwarded.iter().all(|r| !patient_path(r)),
        "the hidden request was forwarded: {forwarded:#?}"
    );
    let hidden_seen: Vec<&Value> = requests.iter().filter(|r| patient_path(r)).collect();
    assert_eq!(hidden_seen.len(), 1, "{requests:#?}");
    assert_eq!(hidden_seen[0]["decision"], "deny");
    assert_eq!(hidden_seen[0]["status"], 403);

    // Every refused shape is on record: its connection ended as not HTTP, with
    // hyper's reason.
    let conns = h.settled("connections");
    let refused = conns.iter().filter(|c| c["outcome"] == "not_http").count();
    let want_refused = cases.iter().filter(|c| c.2 == [400]).count();
    assert_eq!(refused, want_refused, "{conns:#?}");
    assert!(conns
        .iter()
        .filter(|c| c["outcome"] == "not_http")
        .all(|c| c["error"].as_str().is_some_and(|e| !e.is_empty())));
    h.assert_serves();
}

#[test]
fn slow_clients_are_cut_off_and_do_not_starve_others() {
    let h = Hostile::start(
        "slowloris",
        "[timeouts]\nrequest_secs = 3\ntls_handshake_ms = 2000\n",
        "",
        &[],
    );
    let script = script("raw.py");
    let ca = h.ca();
    let slow_head = format!(
        "GET /json HTTP/1.1\\r\\nHost: {HOST}\\r\\nX-Slow: {}\\r\\n\\r\\n",
        "a".repeat(200)
    );
    // 40 clients trickling their headers, one byte every 200 ms (a header takes
    // ~50 s to arrive), and 10 that complete TCP but never say hello.
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(
            command(
                h.w.inside(),
                &[
                    "python3",
                    script.to_str().unwrap(),
                    "--connect",
                    UP,
                    "--tls",
                    "--ca",
                    &ca,
                    "--sni",
                    HOST,
                    "--trickle-ms",
                    "200",
                    "--read-secs",
                    "2",
                    &slow_head,
                ],
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        );
    }
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            command(
                h.w.inside(),
                &[
                    "python3",
                    "-c",
                    "import socket,time\ns=socket.create_connection(('127.0.0.2',9443))\nt=time.monotonic()\nd=s.recv(1)\nprint(round(time.monotonic()-t,2))",
                ],
            )
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    // Others are served meanwhile, promptly.
    let t = Instant::now();
    h.assert_serves();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    for c in silent {
        let out = c.wait_with_output().unwrap();
        let secs: f64 = stdout(&out)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("silent client: {} {}", stdout(&out), stderr(&out)));
        assert!(
            (1.5..6.0).contains(&secs),
            "closed after {secs} s (handshake bound 2 s)"
        );
    }
    for c in slow {
        let out = c.wait_with_output().unwrap();
        let r: Value = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("slow client ({e}): {}", stdout(&out)));
        assert_eq!(r["closed_by_peer"], true, "{r}");
        let secs = r["seconds"].as_f64().unwrap();
        assert!(
            secs < 12.0,
            "a slow header held for {secs} s (bound 3 s): {r}"
        );
        // No request was ever complete, so nothing reached a policy or the upstream.
        assert!(
            r["statuses"].as_array().unwrap().iter().all(|s| s != 200),
            "{r}"
        );
    }
    let conns = h.settled("connections");
    let timed_out = conns
        .iter()
        .filter(|c| c["outcome"] == "idle_timeout")
        .count();
    let handshake = conns
        .iter()
        .filter(|c| c["outcome"] == "tls_handshake_failed")
        .count();
    assert_eq!(timed_out, 40, "{conns:#?}");
    assert_eq!(handshake, 10, "{conns:#?}");
    let requests = h.settled("requests");
    assert_eq!(
        requests.len(),
        1,
        "only the prompt client's request: {requests:#?}"
    );
    h.assert_serves();
}

#[test]
fn malformed_client_hellos_are_closed_and_recorded() {
    let h = Hostile::start("hello", "[timeouts]\ntls_handshake_ms = 2000\n", "", &[]);
    let hello_header = "\\x16\\x03\\x01";
    let cases: Vec<(&str, String)> = vec![
        (
            "a record longer than TLS allows",
            format!("{hello_header}\\xff\\xff{}", "\\x01".repeat(64)),
        ),
        (
            "a handshake claiming 16 MiB",
            format!("{hello_header}\\x00\\x08\\x01\\xff\\xff\\xff\\x03\\x03\\x00\\x00"),
        ),
        (
            "garbage inside a handshake record",
            format!("{hello_header}\\x00\\x30{}", "\\x5a".repeat(48)),
        ),
        ("a truncated record header", hello_header.to_string()),
        (
            "an SSLv2-style hello",
            "\\x80\\x2e\\x01\\x00\\x02\\x00\\x15\\x00\\x00\\x00\\x10".into(),
        ),
        (
            "an alert before any hello",
            "\\x15\\x03\\x03\\x00\\x02\\x02\\x28".into(),
        ),
        (
            "a zero-length handshake record",
            format!("{hello_header}\\x00\\x00"),
        ),
        (
            "a client hello with no cipher suites",
            format!(
                "{hello_header}\\x00\\x2d\\x01\\x00\\x00\\x29\\x03\\x03{}\\x00\\x00\\x00\\x01\\x00",
                "\\x11".repeat(32)
            ),
        ),
    ];
    for (what, payload) in &cases {
        let r = h.raw(false, &["--read-secs", "4"], payload);
        assert_eq!(r["closed_by_peer"], true, "{what}: {r}");
        assert!(r["seconds"].as_f64().unwrap() < 4.0, "{what}: {r}");
    }
    // A hello naming a server that is not a DNS name, from a real TLS stack.
    let ca = h.ca();
    let _ = output(
        h.w.inside(),
        &[
            "sh",
            "-c",
            &format!("echo | timeout 5 openssl s_client -connect {UP} -servername 'bad_name..x' -CAfile {ca} 2>&1 | head -c 0"),
        ],
    );
    let conns = h.settled("connections");
    assert_eq!(
        conns.len(),
        cases.len() + 1,
        "every attempt recorded: {conns:#?}"
    );
    for c in &conns {
        assert!(
            ["not_tls", "tls_handshake_failed"].contains(&c["outcome"].as_str().unwrap()),
            "{c}"
        );
        assert!(
            c["error"].as_str().is_some_and(|e| !e.is_empty()),
            "the reason is recorded: {c}"
        );
    }
    assert!(h.w.records("requests").is_empty());
    h.assert_serves();
}

#[test]
fn encoded_paths_are_decided_on_the_normalized_path() {
    let h = Hostile::start("paths", "", "", &[]);
    // (path as sent, status the client must get, path the policy saw or None)
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("/fhir/Coverage/../Patient/1", 403, Some("/fhir/Patient/")),
        (
            "/fhir/Coverage/%2e%2e/Patient/1",
            403,
            Some("/fhir/Patient/"),
        ),
        ("/fhir/Coverage/x/..%2F..%2FPatient%2F1", 400, None),
        ("/fhir/Coverage/x%2F..%2F..%2FPatient%2F1", 400, None),
        ("/fhir/Coverage/x%5C..%5C..%5CPatient", 400, None),
        ("//fhir//Patient//1", 403, Some("/fhir/Patient/")),
        // Dot segments above the root stop at the root (RFC 3986 5.2.4).
        ("/files/../../etc/passwd", 403, Some("/etc/passwd")),
        // Allowed once normalized: forwarded as the path the policy allowed.
        ("/fhir/Coverage/../../json", 200, Some("/json")),
        ("/fhir/Coverage/%00", 400, None),
        ("/fhir/Coverage/1%0D%0AX-Injected:%20yes", 400, None),
    ];
    for (path, want, _) in cases {
        let out = h.curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{HOST}:9443{path}"),
            "--resolve",
            &format!("{HOST}:9443:127.0.0.2"),
        ]);
        assert_eq!(stdout(&out), want.to_string(), "{path}: {}", stderr(&out));
    }
    let requests = h.settled("requests");
    assert_eq!(
        requests.len(),
        cases.len(),
        "each one recorded: {requests:#?}"
    );
    for (r, (sent, want, seen)) in requests.iter().zip(cases) {
        assert_eq!(r["status"], *want, "{sent}: {r}");
        assert_eq!(
            r["upstream_http_version"].is_null(),
            *want != 200,
            "{sent}: only the allowed one is forwarded: {r}"
        );
        if let Some(p) = seen {
            // Policies saw the normalized path; the record names it, beside what was
            // sent (patient ids pseudonymized in both).
            assert!(r["path"].as_str().unwrap().starts_with(p), "{sent}: {r}");
            assert_ne!(r["path_as_sent"], Value::Null, "{sent}: {r}");
            let decision = if *want == 200 { "allow" } else { "deny" };
            assert_eq!(r["decision"], decision, "{sent}");
        }
    }
}

#[test]
fn hostile_bodies_under_masking_fail_closed() {
    let files_dir = tempfile::tempdir().unwrap();
    let files = files_dir.path().to_path_buf();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(files.join("deep.json"), "[".repeat(2_000_000)).unwrap();
    // Latin-1 where UTF-8 must be, in a value masking keeps (a value a rule redacts
    // is skipped unread: nothing of it reaches anyone).
    let mut latin1 =
        b"{\"resourceType\":\"Patient\",\"gender\":\"f\xe9minin\",\"name\":[{\"text\":\"Ren\xe9e\"}]}"
            .to_vec();
    latin1.push(b'\n');
    std::fs::write(files.join("latin1.json"), latin1).unwrap();
    std::fs::write(
        files.join("ok.json"),
        "{\"resourceType\":\"Patient\",\"id\":\"p1\",\"birthDate\":\"1970-04-05\"}",
    )
    .unwrap();
    let h = Hostile::start(
        "hostile-body",
        "[masking]\nbuffer_bytes = 16384\n",
        "mask_profile = \"safe_harbor\"",
        &["--files", files.to_str().unwrap()],
    );
    for (name, want) in [("deep.json", 502), ("latin1.json", 502), ("ok.json", 200)] {
        let out = h.curl(&[
            "-w",
            "\n%{http_code}",
            &format!("https://{UP}/files/{name}"),
        ]);
        let text = stdout(&out);
        let (body, code) = text.rsplit_once('\n').unwrap();
        assert_eq!(code, want.to_string(), "{name}: {body} {}", stderr(&out));
        if want == 502 {
            let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
            assert_eq!(v["error"], "masking_failed", "{v}");
            assert!(!body.contains("minin"), "no raw bytes in the error: {body}");
        } else {
            assert!(!body.contains("1970-04-05"), "{body}");
        }
    }
    let requests = h.settled("requests");
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for r in &requests {
        if r["status"] == 502 {
            assert_eq!(r["outcome"], "masking_failed", "{r}");
            assert!(
                r["response_body"].is_null()
                    || !r["response_body"].as_str().unwrap().contains("minin")
            );
        }
    }
}
