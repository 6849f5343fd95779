//! TLS interception and the HTTP data path, through the real redirect: real curl,
//! openssl, Python and Node clients; a real Node HTTPS upstream (HTTP/2 + HTTP/1.1)
//! with its own test CA.

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";

struct Https {
    w: World,
    pki: TestPki,
    _upstream: Background,
}

impl Https {
    /// An https destination on 127.0.0.2:9443; `dest_extra` goes into its table,
    /// `top_extra` after the [agent] section (e.g. [limits]).
    fn start(tag: &str, dest_extra: &str, top_extra: &str, trust_upstream: bool) -> Https {
        Https::start_with(tag, dest_extra, top_extra, trust_upstream, &[])
    }

    fn start_with(
        tag: &str,
        dest_extra: &str,
        top_extra: &str,
        trust_upstream: bool,
        upstream_args: &[&str],
    ) -> Https {
        let mut w = World::new(tag);
        let pki = TestPki::new(
            w.dir.path(),
            "upstream",
            "IP:127.0.0.2,DNS:patients.example.test,DNS:pinned.example.test",
        );
        let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), upstream_args);
        let trust = if trust_upstream {
            format!("upstream_ca = \"{}\"", pki.ca.display())
        } else {
            String::new()
        };
        w.write_config(&format!(
            "{}\n{top_extra}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\n{trust}\n{dest_extra}\n",
            w.agent_section("")
        ));
        w.start_agent(false);
        Https {
            w,
            pki,
            _upstream: upstream,
        }
    }

    fn ca(&self) -> String {
        self.w.path("state/ca.pem").display().to_string()
    }

    fn trusted(tag: &str) -> Https {
        Https::start(tag, "", "", true)
    }

    fn curl(&self, args: &[&str]) -> std::process::Output {
        let ca = self.ca();
        let mut argv = vec!["curl", "-sS", "--max-time", "30", "--cacert", ca.as_str()];
        argv.extend_from_slice(args);
        output(self.w.inside(), &argv)
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn curl_over_http2_and_http1_is_intercepted_and_recorded() {
    let h = Https::trusted("curl-h2");
    let out = h.curl(&[
        "--http2",
        "-w",
        "\n%{http_version}",
        &format!("https://{UP}/json?bytes=500"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let (body, version) = text.rsplit_once('\n').unwrap();
    assert_eq!(version, "2");
    assert_eq!(json(body)["resourceType"], "Bundle");

    let out = h.curl(&[
        "--http1.1",
        "-w",
        "\n%{http_version}",
        &format!("https://{UP}/json?bytes=500"),
    ]);
    let text = stdout(&out);
    assert_eq!(text.rsplit_once('\n').unwrap().1, "1.1", "{}", stderr(&out));

    let recs = h.w.wait_records("requests", 2);
    let (a, b) = (&recs[0], &recs[1]);
    assert_eq!(a["alpn"], "h2");
    assert_eq!(a["http_version"], "HTTP/2.0");
    assert_eq!(b["alpn"], "http/1.1");
    assert_eq!(b["http_version"], "HTTP/1.1");
    for r in [a, b] {
        assert_eq!(r["status"], 200);
        assert_eq!(r["method"], "GET");
        assert_eq!(r["path"], "/json");
        assert_eq!(r["tls_version"], "TLSv1_3");
        assert_eq!(r["upstream_tls_version"], "TLSv1_3");
        assert_eq!(r["upstream_cert_subject"], "CN=upstream");
        assert_eq!(r["comm"], "curl");
        assert_eq!(r["original_dst"], UP);
        assert_eq!(r["outcome"], "complete", "{r}");
        assert!(r["response_bytes"].as_u64().unwrap() >= 500);
    }
    for c in h.w.wait_records("connections", 2) {
        assert_eq!(
            c["outcome"], "closed",
            "a client that hangs up normally: {c}"
        );
        assert_eq!(c["requests"], 1);
    }
}

#[test]
fn openssl_sees_a_leaf_for_the_sni_chained_to_phigates_ca() {
    let h = Https::trusted("s-client");
    let ca = h.ca();
    let out = output(
        h.w.inside(),
        &["sh", "-c", &format!("openssl s_client -connect {UP} -servername patients.example.test -CAfile {ca} -verify_return_error </dev/null 2>&1")],
    );
    let text = stdout(&out);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(
        text.contains("CN = patients.example.test") || text.contains("CN=patients.example.test"),
        "{text}"
    );
    assert!(text.contains("phigate local CA"), "{text}");
    let conns = h.w.wait_records("connections", 1);
    assert_eq!(conns[0]["sni"], "patients.example.test");
}

/// A client that comes back resumes its TLS session (a ticket from phigate's shared
/// ticketer) instead of paying for a full handshake: the intercepted side keeps one
/// server configuration per leaf, not one per connection.
#[test]
fn a_returning_client_resumes_its_tls_session() {
    let h = Https::trusted("resume");
    let ca = h.ca();
    let (host, port) = UP.split_once(':').unwrap();
    let py = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(cafile='{ca}')
def get(session=None):
    s = ctx.wrap_socket(socket.create_connection(('{host}', {port})), server_hostname='patients.example.test', session=session)
    s.sendall(b'GET /json HTTP/1.1\r\nHost: patients.example.test\r\nConnection: close\r\n\r\n')
    while s.recv(65536):
        pass
    reused, session = s.session_reused, s.session
    s.close()
    return reused, session
first, session = get()
second, _ = get(session)
print(first, second)
"#
    );
    let out = output(h.w.inside(), &["python3", "-c", &py]);
    assert_eq!(stdout(&out).trim(), "False True", "{}", stderr(&out));
    let conns = h.w.wait_records("connections", 2);
    assert!(conns.iter().all(|c| c["requests"] == 1), "{conns:?}");
}

#[test]
fn python_requests_and_node_fetch_work_unchanged() {
    let h = Https::trusted("py-node");
    let ca = h.ca();
    let py = format!(
        "import requests;r=requests.get('https://{UP}/json?bytes=300',verify='{ca}',timeout=10);print(r.status_code,r.json()['resourceType'])"
    );
    let out = output(h.w.inside(), &["python3", "-c", &py]);
    assert_eq!(stdout(&out).trim(), "200 Bundle", "{}", stderr(&out));

    let js = format!("fetch('https://{UP}/json?bytes=300').then(r=>r.json().then(j=>console.log(r.status,j.resourceType))).catch(e=>{{console.error(e);process.exit(1)}})");
    let env_ca = format!("NODE_EXTRA_CA_CERTS={ca}");
    let out = output(h.w.inside(), &["env", &env_ca, "node", "-e", &js]);
    assert_eq!(stdout(&out).trim(), "200 Bundle", "{}", stderr(&out));

    let recs = h.w.wait_records("requests", 2);
    assert!(
        recs[0]["comm"].as_str().unwrap().starts_with("python"),
        "{}",
        recs[0]
    );
    assert_eq!(recs[1]["comm"], "node");
}

#[test]
fn keep_alive_reuses_client_and_upstream_connections() {
    let h = Https::trusted("keepalive");
    let url = format!("https://{UP}/headers");
    let out = h.curl(&[
        "--http1.1",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out).to_lowercase();
    let conns: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("x-upstream-conn: "))
        .collect();
    assert_eq!(conns.len(), 2, "{text}");
    assert_eq!(
        conns[0], conns[1],
        "the upstream connection is pooled and reused"
    );
    h.w.wait_records("requests", 2);
    let c = &h.w.wait_records("connections", 1)[0];
    assert_eq!(
        c["requests"], 2,
        "one client connection carried both requests: {c}"
    );
}

#[test]
fn hundred_megabyte_streams_both_ways_with_bounded_agent_memory() {
    let h = Https::trusted("large");
    const SIZE: u64 = 100 * 1024 * 1024;
    // What the agent holds before any body moves (policies, keys, pools): the bound
    // is on what moving 200 MB adds to it.
    let baseline_mib = peak_rss_kib(h.w.agent_pid()) / 1024;
    let out = h.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("https://{UP}/stream?bytes={SIZE}"),
    ]);
    assert_eq!(stdout(&out), SIZE.to_string(), "{}", stderr(&out));

    let ca = h.ca();
    let out = output(
        h.w.inside(),
        &["sh", "-c", &format!("head -c {SIZE} /dev/zero | curl -sS --max-time 60 --cacert {ca} -H 'content-type: application/octet-stream' -T - https://{UP}/upload")],
    );
    let v = json(&stdout(&out));
    assert_eq!(v["received"], SIZE, "{}", stderr(&out));

    let rss_mib = peak_rss_kib(h.w.agent_pid()) / 1024;
    assert!(
        rss_mib.saturating_sub(baseline_mib) < 48,
        "agent peak RSS {rss_mib} MiB (from {baseline_mib} MiB at start) after moving 200 MB: bodies must stream"
    );
    let recs = h.w.wait_records("requests", 2);
    assert_eq!(recs[0]["response_bytes"], SIZE);
    assert_eq!(recs[1]["request_bytes"], SIZE);
}

#[test]
fn an_untrusted_upstream_certificate_is_answered_502_and_recorded() {
    // No upstream_ca: the test CA is not in the system roots.
    let h = Https::start("badcert", "", "", false);
    let out = h.curl(&["-w", "\n%{http_code}", &format!("https://{UP}/json")]);
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{text}");
    let v = json(body);
    assert!(v["reason"].as_str().unwrap().contains("not trusted"), "{v}");
    assert!(v["request_id"].is_string());
    let r = &h.w.wait_records("requests", 1)[0];
    assert_eq!(r["status"], 502);
    assert_eq!(r["outcome"], "upstream_error");
    assert!(r["error"].as_str().unwrap().contains("not trusted"), "{r}");
}

#[test]
fn an_upstream_that_is_down_is_answered_502() {
    let mut w = World::new("down");
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"127.0.0.2:9444\"]\nprotocol = \"https\"\n",
        w.agent_section("")
    ));
    w.start_agent(false);
    let ca = w.path("state/ca.pem");
    let out = output(
        w.inside(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca.to_str().unwrap(),
            "-w",
            "\n%{http_code}",
            "https://127.0.0.2:9444/x",
        ],
    );
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "502", "{text} {}", stderr(&out));
    assert!(
        json(body)["reason"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{body}"
    );
    assert_eq!(w.wait_records("requests", 1)[0]["status"], 502);
}

#[test]
fn plain_bytes_on_an_https_destination_are_closed_and_recorded() {
    let h = Https::trusted("nottls");
    let out = output(
        h.w.inside(),
        &["curl", "-sS", "--max-time", "5", &format!("http://{UP}/")],
    );
    assert!(
        !out.status.success(),
        "plain HTTP must not be served on an https destination"
    );
    let c = &h.w.wait_records("connections", 1)[0];
    assert_eq!(c["outcome"], "not_tls", "{c}");
    assert!(h.w.records("requests").is_empty());
    // The agent is unharmed.
    assert!(h.curl(&[&format!("https://{UP}/json")]).status.success());
}

#[test]
fn http_to_https_originates_verified_tls() {
    let mut w = World::new("origin");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9080, Some(&pki), &[]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"legacy-client\"\naddresses = [\"127.0.0.2:9080\"]\nprotocol = \"http-to-https\"\nupstream_ca = \"{}\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let out = output(
        w.inside(),
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "http://127.0.0.2:9080/json?bytes=100",
        ],
    );
    assert_eq!(
        json(&stdout(&out))["resourceType"],
        "Bundle",
        "{}",
        stderr(&out)
    );
    let r = &w.wait_records("requests", 1)[0];
    assert_eq!(r["upstream_tls_version"], "TLSv1_3");
    assert_eq!(r["tls_version"], Value::Null);
}

#[test]
fn plain_http_destinations_are_proxied() {
    let mut w = World::new("plain");
    let _up = node_upstream(&w, "127.0.0.2", 9081, None, &[]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"plain\"\naddresses = [\"127.0.0.2:9081\"]\nprotocol = \"http\"\n",
        w.agent_section("")
    ));
    w.start_agent(false);
    // In plaintext no ALPN says which HTTP: a client with prior knowledge of
    // HTTP/2 (h2c) is told apart from HTTP/1.1 by its first bytes.
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let out = output(
            w.inside(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                version,
                "http://127.0.0.2:9081/json",
            ],
        );
        assert_eq!(
            json(&stdout(&out))["resourceType"],
            "Bundle",
            "{version}: {}",
            stderr(&out)
        );
    }
    let rows = w.wait_records("requests", 2);
    for r in &rows {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["upstream_tls_version"], Value::Null);
    }
    let mut versions: Vec<&str> = rows
        .iter()
        .map(|r| r["http_version"].as_str().unwrap_or_default())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, ["HTTP/1.1", "HTTP/2.0"], "{rows:?}");
}

#[test]
fn passthrough_hosts_are_relayed_uninspected() {
    let h = Https::start(
        "pinned",
        "passthrough_hosts = [\"pinned.example.test\"]",
        "",
        true,
    );
    let out = output(
        h.w.inside(),
        &["sh", "-c", &format!("openssl s_client -connect {UP} -servername pinned.example.test -CAfile {} -verify_return_error </dev/null 2>&1", h.pki.ca.display())],
    );
    let text = stdout(&out);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "the upstream's own certificate must arrive: {text}"
    );
    assert!(text.contains("upstream test CA"), "{text}");
    let c = &h.w.wait_records("connections", 1)[0];
    assert_eq!(c["outcome"], "uninspected", "{c}");
    assert_eq!(c["sni"], "pinned.example.test");
    assert!(h.w.records("requests").is_empty());
}

#[test]
fn oversize_headers_and_bodies_are_refused() {
    let h = Https::start(
        "limits",
        "",
        "[limits]\nmax_header_bytes = 8192\nmax_request_body_bytes = 1000",
        true,
    );
    let big = format!("x-big: {}", "a".repeat(20_000));
    let out = h.curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &big,
        &format!("https://{UP}/headers"),
    ]);
    assert_eq!(stdout(&out), "431", "{}", stderr(&out));

    let body = "b".repeat(2000);
    let out = h.curl(&[
        "--http1.1",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        &body,
        &format!("https://{UP}/upload"),
    ]);
    assert_eq!(stdout(&out), "413", "{}", stderr(&out));
    let r = h.w.wait_records("requests", 1);
    assert_eq!(r[0]["status"], 413);
}

#[test]
fn websocket_style_upgrades_are_relayed_and_recorded() {
    // An HTTP/1.1 upstream: upgrades are an HTTP/1.1 mechanism.
    let h = Https::start_with("upgrade", "", "", true, &["--h1only"]);
    let ca = h.ca();
    let py = format!(
        "import socket,ssl\nctx=ssl.create_default_context(cafile='{ca}')\nctx.set_alpn_protocols(['http/1.1'])\ns=ctx.wrap_socket(socket.create_connection(('127.0.0.2',9443),timeout=10),server_hostname='patients.example.test')\ns.sendall(b'GET /ws HTTP/1.1\\r\\nHost: patients.example.test\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n')\nhead=b''\nwhile b'\\r\\n\\r\\n' not in head: head+=s.recv(1)\nprint(head.split(b'\\r\\n')[0].decode())\ns.sendall(b'ping-123')\nd=b''\nwhile len(d)<8: d+=s.recv(8-len(d))\nprint(d.decode())\ns.close()"
    );
    let out = output(h.w.inside(), &["python3", "-c", &py]);
    let text = stdout(&out);
    assert!(text.starts_with("HTTP/1.1 101"), "{text} {}", stderr(&out));
    assert!(text.contains("ping-123"), "{text}");
    let r = &h.w.wait_records("requests", 1)[0];
    assert_eq!(r["upgraded"], true);
    assert_eq!(r["status"], 101);
}

#[test]
fn head_expect_continue_and_trailers_pass() {
    let h = Https::trusted("semantics");
    let out = h.curl(&[
        "-I",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://{UP}/json?bytes=100"),
    ]);
    assert_eq!(stdout(&out), "200", "HEAD: {}", stderr(&out));
    let out = h.curl(&[
        "--http1.1",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "0123456789",
        &format!("https://{UP}/upload"),
    ]);
    assert_eq!(
        json(&stdout(&out))["received"],
        10,
        "100-continue: {}",
        stderr(&out)
    );
    let out = h.curl(&["--http2", "-v", &format!("https://{UP}/trailers")]);
    assert_eq!(stdout(&out), "body-with-trailers", "{}", stderr(&out));
    assert!(
        stderr(&out).contains("x-checksum: abc123"),
        "trailers must pass: {}",
        stderr(&out)
    );
    let recs = h.w.wait_records("requests", 3);
    assert_eq!(recs[0]["method"], "HEAD");
    assert!(recs.iter().all(|r| r["outcome"] == "complete"), "{recs:?}");
}

#[test]
fn a_slow_upstream_is_answered_504_within_the_request_timeout() {
    let h = Https::start("slow", "", "[timeouts]\nrequest_secs = 1", true);
    let t = std::time::Instant::now();
    let out = h.curl(&[
        "-w",
        "\n%{http_code}",
        &format!("https://{UP}/slow?ms=5000"),
    ]);
    let text = stdout(&out);
    assert_eq!(text.rsplit_once('\n').unwrap().1, "504", "{text}");
    assert!(t.elapsed() < std::time::Duration::from_secs(4));
    let r = &h.w.wait_records("requests", 1)[0];
    assert_eq!(r["outcome"], "upstream_timeout");
}

#[test]
fn non_http_bytes_inside_tls_are_closed_and_recorded() {
    let h = Https::trusted("nothttp");
    let ca = h.ca();
    let _ = output(
        h.w.inside(),
        &["sh", "-c", &format!("printf 'this is not http at all\\r\\n\\r\\n' | timeout 5 openssl s_client -quiet -alpn http/1.1 -connect {UP} -CAfile {ca} 2>/dev/null")],
    );
    // HTTP/2 over TLS is negotiated by ALPN, never assumed: a client that agreed
    // on http/1.1 and then sends HTTP/2's preface is not served as HTTP/2.
    let _ = output(
        h.w.inside(),
        &["sh", "-c", &format!("printf 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' | timeout 5 openssl s_client -quiet -alpn http/1.1 -connect {UP} -CAfile {ca} 2>/dev/null")],
    );
    let conns = h.w.wait_records("connections", 2);
    for c in &conns {
        assert_eq!(c["outcome"], "not_http", "{c}");
        assert_eq!(c["tls_version"], "TLSv1_3");
    }
    assert!(h.w.records("requests").is_empty());
    assert!(
        h.curl(&[&format!("https://{UP}/json")]).status.success(),
        "the agent still serves"
    );
}

#[test]
fn ca_export_prints_the_ca_the_leaves_chain_to() {
    let h = Https::trusted("ca-export");
    let out = std::process::Command::new(phigate_bin())
        .args(["ca", "export", "--config"])
        .arg(h.w.config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let pem = std::fs::read_to_string(h.ca()).unwrap();
    assert_eq!(stdout(&out), pem);
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(h.w.path("state/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
}

#[test]
fn a_full_records_disk_fails_closed_with_503_and_recovers() {
    let mut w = World::new("diskfull");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    let records = Tmpfs::mount(&w.records_dir(), "4m");
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.path("state/ca.pem");
    let get = || {
        let o = output(
            w.inside(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                ca.to_str().unwrap(),
                "-w",
                "\n%{http_code}",
                &format!("https://{UP}/json"),
            ],
        );
        let text = stdout(&o);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_owned(), body.to_owned())
    };
    assert_eq!(get().0, "200");

    // Fill the records filesystem.
    records.fill();
    w.wait_records_writable(false);
    let (code, body) = get();
    assert_eq!(code, "503", "{body}");
    assert_eq!(json(&body)["error"], "records_unavailable");

    // Room again: serving resumes by itself.
    records.free();
    w.wait_records_writable(true);
    assert_eq!(get().0, "200");
    // Both served requests are on record (the refusal's own record may not have fit).
    let served = w.wait_rows("requests", 2, "with status 200", |r| r["status"] == 200);
    assert_eq!(served.len(), 2, "{served:?}");
}
