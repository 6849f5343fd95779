//! Requests that two parties could read two ways, through the real redirect, with a
//! policy set that permits only reads of `/fhir/Patient/*` and `/fhir/Coverage/*`
//! under `safe_harbor` masking: a Host other than the TLS name, a second
//! credential, a method override, a byte range of a masked document, a path whose
//! `;` parameters hide a `..` from the policies, a WebSocket upgrade of a masked
//! read. Each is refused (or made unambiguous), recorded, and never reaches the
//! upstream as sent.

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const HOST: &str = "api.test";

const POLICY: &str = r#"@id("ambiguity.fhir-reads")
permit (principal, action in Phigate::Action::"read", resource)
when { context.path like "/fhir/Patient/*" || context.path like "/fhir/Coverage/*" };
"#;

struct Api {
    w: World,
    /// The agent's CA, readable by the unprivileged clients.
    ca: std::path::PathBuf,
    _upstream: Background,
    /// The raw family name of the Patient the upstream serves.
    family: String,
}

fn start(tag: &str) -> Api {
    let mut w = World::new(tag);
    w.write_policies(&[("fhir.cedar", POLICY)]);
    let files = w.path("files");
    std::fs::create_dir_all(&files).unwrap();
    let patient = fhir::patient(17, 1).resources[0].clone();
    let family = patient["name"][0]["family"].as_str().unwrap().to_owned();
    std::fs::write(
        files.join("Patient-123.json"),
        fhir::to_vec_pretty(&patient),
    )
    .unwrap();
    std::fs::write(
        files.join("Group-1-export.ndjson"),
        b"{\"resourceType\":\"Group\"}\n",
    )
    .unwrap();
    let pki = TestPki::new(
        w.dir.path(),
        "upstream",
        &format!("IP:127.0.0.2,DNS:{HOST},DNS:other.test"),
    );
    let upstream = node_upstream(
        &w,
        "127.0.0.2",
        9443,
        Some(&pki),
        &["--files", files.to_str().unwrap()],
    );
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"fhir-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\nmask_profile = \"safe_harbor\"\nhosts = [\"{HOST}\"]\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    Api {
        ca: w.public_copy(&w.path("state/ca.pem")),
        w,
        _upstream: upstream,
        family,
    }
}

impl Api {
    /// curl as an unprivileged process of the protected cgroup, to
    /// `https://NAME:9443PATH` with NAME resolved to the upstream's address. Returns
    /// (status, headers, body).
    fn curl(&self, name: &str, path: &str, args: &[&str]) -> (u16, String, String) {
        let ca = self.ca.display().to_string();
        let resolve = format!("{name}:9443:127.0.0.2");
        let url = format!("https://{name}:9443{path}");
        let mut argv = vec![
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--path-as-is",
            "--cacert",
            ca.as_str(),
            "--resolve",
            resolve.as_str(),
            // Headers before the body on stdout (an unprivileged process cannot
            // reopen /dev/stderr, a pipe of root's).
            "-D",
            "-",
            "-w",
            "\n%{http_code}",
        ];
        argv.extend_from_slice(args);
        argv.push(&url);
        let out = output(self.w.unprivileged(), &argv);
        let text = stdout(&out);
        let (rest, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        (
            code.trim().parse().unwrap_or(0),
            format!("{head}\r\n\r\n{}", stderr(&out)),
            body.to_owned(),
        )
    }

    /// The upstream's count of requests (from outside phigate).
    fn upstream_requests(&self) -> u64 {
        let out = output(
            self.w.outside(),
            &[
                "curl",
                "-sk",
                "--max-time",
                "5",
                &format!("https://{UP}/stats"),
            ],
        );
        let v: Value = serde_json::from_str(&stdout(&out)).expect("stats");
        v["requests"].as_u64().unwrap()
    }

    /// The request record whose error mentions `needle`, waiting for it.
    fn refused(&self, status: u16, needle: &str) -> Value {
        self.w.wait_row(
            "requests",
            &format!("{status} mentioning {needle:?}"),
            |r| r["status"] == status && r["error"].as_str().is_some_and(|e| e.contains(needle)),
        )
    }
}

#[test]
fn a_host_other_than_the_tls_name_or_the_destinations_hosts_is_misdirected() {
    require_root();
    let api = start("misdirected");
    let before = api.upstream_requests();
    // The right name on both layers: allowed, masked.
    let (code, _, body) = api.curl(HOST, "/fhir/Patient/123", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(&api.family), "masked: {body}");
    for version in ["--http1.1", "--http2"] {
        // SNI api.test, Host (HTTP/1.1) or :authority (HTTP/2) other.test.
        let (code, _, body) = api.curl(
            HOST,
            "/fhir/Patient/123",
            &[version, "-H", "Host: other.test:9443"],
        );
        assert_eq!(code, 421, "{version}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "misdirected_request", "{body}");
        // The TLS name itself is not one the destination serves.
        let (code, _, body) = api.curl("other.test", "/fhir/Patient/123", &[version]);
        assert_eq!(code, 421, "{version}: {body}");
    }
    api.refused(
        421,
        "other.test but the TLS connection was made for api.test",
    );
    api.refused(421, "host other.test is not served by this destination");
    // One allowed read reached the upstream, and the /stats probe itself.
    assert_eq!(api.upstream_requests(), before + 2);
}

#[test]
fn a_second_credential_or_a_method_override_is_refused() {
    require_root();
    let api = start("ambiguous");
    let before = api.upstream_requests();
    let (code, _, body) = api.curl(
        HOST,
        "/fhir/Patient/123",
        &[
            "-H",
            "Authorization: Bearer a",
            "-H",
            "Authorization: Bearer b",
        ],
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("ambiguous_request"), "{body}");
    let (code, _, body) = api.curl(
        HOST,
        "/fhir/Patient/123",
        &["-H", "X-HTTP-Method-Override: DELETE"],
    );
    assert_eq!(code, 400, "{body}");
    api.refused(400, "more than one Authorization header");
    api.refused(400, "X-Http-Method-Override is refused");
    assert_eq!(
        api.upstream_requests(),
        before + 1,
        "nothing reached the upstream"
    );
}

#[test]
fn path_parameters_hiding_dot_segments_are_refused() {
    require_root();
    let api = start("dotparams");
    let before = api.upstream_requests();
    for path in [
        "/fhir/Coverage/..;/Group/1/$export",
        "/fhir/Coverage/.;x/../Group/1/$export",
        "/fhir/Coverage/..%3B/Group/1/$export",
    ] {
        let (code, _, body) = api.curl(HOST, path, &[]);
        assert_eq!(code, 400, "{path}: {body}");
    }
    api.refused(400, "path");
    assert_eq!(
        api.upstream_requests(),
        before + 1,
        "nothing reached the upstream"
    );
}

#[test]
fn a_byte_range_of_a_masked_document_is_never_passed() {
    require_root();
    let api = start("ranges");
    // The slice `"family": "..."` of the Patient, were it served as asked.
    let (code, _, whole) = api.curl(HOST, "/fhir/Patient/123", &[]);
    assert_eq!(code, 200);
    // Range is removed before forwarding: the client gets the whole masked document.
    let (code, headers, body) = api.curl(
        HOST,
        "/fhir/Patient/123",
        &["-H", "Range: bytes=0-60", "-H", "If-Range: \"v1\""],
    );
    assert_eq!(code, 200, "{headers} {body}");
    assert_eq!(body, whole);
    assert!(
        !headers.to_ascii_lowercase().contains("x-upstream-range"),
        "{headers}"
    );
    assert!(!body.contains(&api.family));
    // An upstream answering 206 anyway: refused, never passed.
    let raw = fhir::patient(17, 1).resources[0].to_string();
    let at = raw.find(&api.family).unwrap();
    let partial = format!("{}-{}", at.saturating_sub(12), at + api.family.len() + 2);
    let (code, _, body) = api.curl(HOST, &format!("/fhir/Patient/123?partial={partial}"), &[]);
    assert_eq!(code, 502, "{body}");
    assert!(!body.contains(&api.family), "{body}");
    api.refused(502, "part of a document (206)");
}

#[test]
fn a_websocket_upgrade_of_a_masked_read_is_refused() {
    require_root();
    let api = start("upgrade");
    let ca = api.ca.display().to_string();
    // websocket-client (Debian's, under the system Python) over a TLS socket to the protected address; the URL
    // gives the Host and the SNI.
    let script = format!(
        r#"
import json, ssl, socket, websocket
ctx = ssl.create_default_context(cafile={ca:?})
sock = ctx.wrap_socket(socket.create_connection(("127.0.0.2", 9443)), server_hostname="{HOST}")
try:
    websocket.create_connection("wss://{HOST}:9443/fhir/Patient/123", socket=sock)
    print(json.dumps({{"upgraded": True}}))
except websocket.WebSocketBadStatusException as e:
    print(json.dumps({{"upgraded": False, "status": e.status_code}}))
"#
    );
    let out = output(api.w.unprivileged(), &["/usr/bin/python3", "-c", &script]);
    let v: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&out), stderr(&out)));
    assert_eq!(v["upgraded"], false, "{v}");
    assert_eq!(v["status"], 403, "{v}");
    api.refused(403, "protocol upgrade");
}
