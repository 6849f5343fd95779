//! A real container runtime: Podman (runc, the cgroupfs manager) runs containers
//! whose rootfs is made from the host's own /usr (no image, no registry), in network
//! namespaces joined to the world's by veth pairs, under the protected cgroup. Their
//! curl and Python clients reach the protected API through phigate; the records
//! (DuckDB over Parquet) carry the container id Podman gave them, and the pod and
//! image Podman recorded for it. docs/threat-model.md
//! points at these tests.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

/// The protected API, on the world's side of the first veth pair.
const UP_HOST: &str = "10.77.1.1";
const UP: &str = "10.77.1.1:9443";

/// A container's network namespace, the `n`th joined to the world's (10.77.n.0/30).
pub fn container_netns(w: &World, n: u8) -> Netns {
    let c = Netns::new(&format!("pod{n}"));
    w.netns.veth_to(
        &c,
        &n.to_string(),
        &format!("10.77.{n}.1/30"),
        &format!("10.77.{n}.2/30"),
    );
    c
}

/// `podman` as this host runs it: runc (crun fails on the hybrid cgroup layout),
/// the cgroupfs manager (PID 1 is not systemd), no CNI/netavark network (the test
/// gives each container a namespace of its own).
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--network-backend",
            "netavark",
        ])
        .args(args)
        .output()
        .expect("podman (cargo xtask setup installs it)")
}

/// The local image [`Ctr::from_image`] runs.
pub const IMAGE: &str = "localhost/phigate-e2e:rootfs";

/// A running container, removed on drop.
pub struct Ctr {
    pub id: String,
}

impl Ctr {
    /// Starts a container whose main process sleeps, in `netns`, under `w`'s
    /// protected cgroup, the agent's CA mounted at /ca.pem. `extra`: more `podman
    /// run` options (e.g. `--user`, an annotation).
    pub fn start(w: &World, netns: &Netns, extra: &[&str]) -> Ctr {
        let root = rootfs(w).display().to_string();
        Ctr::run(w, netns, extra, &["--rootfs", &root])
    }

    /// As [`Ctr::start`], from a local image made of the same rootfs (`podman
    /// import`: an image in Podman's own store, no registry), [`IMAGE`].
    pub fn from_image(w: &World, netns: &Netns, extra: &[&str]) -> Ctr {
        // Imported every time (a few files): an image an older run left is replaced.
        let tar = w.path("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(rootfs(w))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {}", stderr(&out));
        let out = podman(&["import", tar.to_str().unwrap(), IMAGE]);
        assert!(out.status.success(), "podman import: {}", stderr(&out));
        Ctr::run(w, netns, extra, &[IMAGE])
    }

    fn run(w: &World, netns: &Netns, extra: &[&str], source: &[&str]) -> Ctr {
        let cg = w.cgroup.relative();
        let net = format!("ns:/run/netns/{}", netns.name);
        let ca = format!("{}:/ca.pem:ro", w.path("state/ca.pem").display());
        let mut args = vec![
            "run",
            "-d",
            // The host's limits are below Podman's defaults; runc may not raise them.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
            &cg,
            "--network",
            &net,
            "-v",
            "/usr:/usr:ro",
            "-v",
            &ca,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(source);
        args.extend(["sleep", "600"]);
        let out = podman(&args);
        assert!(out.status.success(), "podman run: {}", stderr(&out));
        let id = stdout(&out).trim().to_owned();
        assert_eq!(id.len(), 64, "a container id: {id}");
        Ctr { id }
    }

    /// Runs `argv` in the container (`podman exec`: the container's namespaces and
    /// cgroup), as `user` if given.
    pub fn exec(&self, user: Option<&str>, argv: &[&str]) -> Output {
        let mut args = vec!["exec"];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.push(&self.id);
        args.extend_from_slice(argv);
        podman(&args)
    }

    pub fn remove(&mut self) {
        if !self.id.is_empty() {
            let out = podman(&["rm", "-f", "-t", "0", &self.id]);
            assert!(out.status.success(), "podman rm: {}", stderr(&out));
            self.id.clear();
        }
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        if !self.id.is_empty() {
            let _ = podman(&["rm", "-f", "-t", "0", &self.id]);
        }
    }
}

/// A rootfs of the host's own files: /usr is bind-mounted read-only, the rest are
/// its usual links and an /etc naming root and nobody.
fn rootfs(w: &World) -> PathBuf {
    let r = w.path("rootfs");
    if r.exists() {
        return r;
    }
    for d in ["usr", "etc", "tmp", "proc", "sys", "dev", "run"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    for l in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{l}"), r.join(l)).unwrap();
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(r.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    r
}

/// Inodes of the namespaces `phigate status` lists as served.
pub fn served(w: &World) -> Vec<u64> {
    w.status()["namespaces"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["inode"].as_u64()).collect())
        .unwrap_or_default()
}

pub fn wait_served(w: &World, c: &Netns, want: bool) {
    let t = Instant::now();
    while served(w).contains(&c.inode()) != want {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "namespace {} {} served: {}\n{}",
            c.name,
            if want { "never" } else { "still" },
            w.status(),
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn listeners(w: &World) -> u64 {
    w.status()["ebpf_maps"]["listeners"]
        .as_u64()
        .expect("listeners map")
}

/// The world: an HTTPS FHIR upstream behind the first veth pair, masked with
/// `safe_harbor`, and `policy` as the only Cedar policy.
struct Env {
    w: World,
    _upstream: Background,
    identifiers: Vec<String>,
    nets: Vec<Netns>,
}

fn env(tag: &str, policy: &str, containers: u8) -> Env {
    let mut w = World::new(tag);
    let nets: Vec<Netns> = (1..=containers).map(|n| container_netns(&w, n)).collect();
    let pki = TestPki::new(w.dir.path(), "upstream", &format!("IP:{UP_HOST}"));
    let files = w.path("files");
    std::fs::create_dir_all(&files).unwrap();
    let one = fhir::patient(42, 200);
    std::fs::write(files.join("patient.json"), fhir::to_vec(&one.resources[0])).unwrap();
    let upstream = node_upstream(
        &w,
        UP_HOST,
        9443,
        Some(&pki),
        &["--files", files.to_str().unwrap()],
    );
    w.write_policies(&[("only.cedar", policy)]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\nmask_profile = \"safe_harbor\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    Env {
        w,
        _upstream: upstream,
        identifiers: one.identifiers,
        nets,
    }
}

const URL: &str = "https://10.77.1.1:9443/files/patient.json";

fn curl(c: &Ctr, user: Option<&str>) -> (u16, String) {
    let out = c.exec(
        user,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            "/ca.pem",
            "-w",
            "\n%{http_code}",
            URL,
        ],
    );
    let text = stdout(&out);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", stderr(&out)),
    )
}

/// Python's own TLS client (urllib, the system trust replaced by the agent's CA).
fn python(c: &Ctr) -> (u16, String) {
    let script = format!(
        "import ssl, urllib.request, urllib.error\nctx = ssl.create_default_context(cafile='/ca.pem')\ntry:\n    r = urllib.request.urlopen('{URL}', context=ctx, timeout=10)\n    print(r.status); print(r.read().decode())\nexcept urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
    );
    let out = c.exec(None, &["python3", "-c", &script]);
    let text = stdout(&out);
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (
        code.trim().parse().unwrap_or(0),
        format!("{body}{}", stderr(&out)),
    )
}

fn assert_masked(e: &Env, what: &str, code: u16, body: &str) {
    assert_eq!(code, 200, "{what}: {body}");
    assert!(body.contains("[REDACTED:NAME]"), "{what}: masked: {body}");
    for id in &e.identifiers {
        assert!(!body.contains(id.as_str()), "{what}: {id:?} leaked");
    }
}

/// Two Podman containers; a Cedar policy permits only the first one's requests. Its
/// curl and Python clients are served, decided and masked, the second container's
/// curl is denied; every request is recorded with its container's id and the
/// runtime `podman`. The removed container's namespace loses its listeners and map
/// entries.
#[test]
fn podman_containers_are_decided_masked_and_recorded_with_their_id() {
    // The permitted container's id is known only once it runs: the policy names
    // it by a file rewritten after the start (hot reload).
    let e = env(
        "podman",
        "@id(\"nobody-yet\")\nforbid (principal, action, resource);\n",
        2,
    );
    let home = listeners(&e.w);
    // The permitted one runs a local image in a pod's namespace and name (as a
    // Kubernetes runtime annotates its containers); the other a bare rootfs.
    let billing = Ctr::from_image(
        &e.w,
        &e.nets[0],
        &[
            "--annotation",
            "io.kubernetes.pod.namespace=billing",
            "--annotation",
            "io.kubernetes.pod.name=export-0",
        ],
    );
    let mut other = Ctr::start(&e.w, &e.nets[1], &[]);
    wait_served(&e.w, &e.nets[0], true);
    wait_served(&e.w, &e.nets[1], true);
    assert_eq!(listeners(&e.w), home + 4, "{}", e.w.status());

    e.w.write_policies(&[(
        "only.cedar",
        &format!(
            "@id(\"only-billing\")\npermit (principal, action, resource)\nwhen {{ principal.container == \"{}\" && principal.container_runtime == \"podman\" && principal.pod_namespace == \"billing\" && principal.pod_name == \"export-0\" && principal.image == \"{IMAGE}\" }};\n",
            billing.id
        ),
    )]);
    wait_until(
        "the policy naming the container",
        Duration::from_secs(10),
        || curl(&billing, None).0 == 200,
    )
    .unwrap();

    let (code, body) = curl(&billing, None);
    assert_masked(&e, "curl in the permitted container", code, &body);
    let (code, body) = python(&billing);
    assert_masked(&e, "python in the permitted container", code, &body);
    let (code, body) = curl(&other, None);
    assert_eq!(code, 403, "the other container is denied: {body}");
    let v: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
    assert!(v.get("error").is_some(), "phigate's refusal: {body}");

    let allowed = e.w.wait_rows("requests", 3, "the permitted requests", |r| {
        r["container_id"] == billing.id.as_str() && r["decision"] == "allow"
    });
    for r in &allowed {
        assert_eq!(r["container_runtime"], "podman", "{r}");
        assert_eq!(r["pod_namespace"], "billing", "{r}");
        assert_eq!(r["pod_name"], "export-0", "{r}");
        assert_eq!(r["container_image"], IMAGE, "{r}");
        assert_eq!(r["policy_ids"], serde_json::json!(["only-billing"]), "{r}");
        assert_eq!(r["masking_profile"], "safe_harbor", "{r}");
    }
    let denied = e.w.wait_row("requests", "the denied request", |r| {
        r["container_id"] == other.id.as_str()
    });
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["container_runtime"], "podman", "{denied}");
    assert!(denied["pod_namespace"].is_null(), "no pod: {denied}");
    assert!(
        denied["container_image"].is_null(),
        "a bare rootfs has no image: {denied}"
    );
    let conns =
        e.w.wait_row("connections", "a container's connection", |r| {
            r["container_id"] == billing.id.as_str()
        });
    assert_eq!(conns["container_runtime"], "podman", "{conns}");
    assert_eq!(conns["pod_namespace"], "billing", "{conns}");
    assert_eq!(conns["container_image"], IMAGE, "{conns}");
    // `phigate status` names each served namespace's container, pod and image.
    let status = e.w.status();
    let shown = status["namespaces"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["inode"] == e.nets[0].inode()))
        .unwrap_or_else(|| panic!("the billing namespace in {status}"));
    assert_eq!(shown["container"]["id"], billing.id.as_str(), "{shown}");
    assert_eq!(shown["container"]["pod_namespace"], "billing", "{shown}");
    assert_eq!(shown["container"]["pod_name"], "export-0", "{shown}");
    assert_eq!(shown["container"]["image"], IMAGE, "{shown}");
    let all = serde_json::to_string(&e.w.all_records("requests")).unwrap();
    for id in &e.identifiers {
        assert!(!all.contains(id.as_str()), "{id:?} in the records");
    }

    // The other container goes: its namespace is no longer served, its listeners and
    // their map entries are gone.
    other.remove();
    wait_served(&e.w, &e.nets[1], false);
    assert_eq!(listeners(&e.w), home + 2, "{}", e.w.status());
    assert!(e.w.agent_log().contains("network namespace gone"));
    let (code, body) = curl(&billing, None);
    assert_masked(&e, "the remaining container", code, &body);
}

/// What an attacker in a container tries, one JSON line of outcomes: the
/// capabilities it would need, the agent's listener in its own namespace (connect
/// to it directly, squat its port), and the protected API's address in its IPv4 and
/// IPv4-mapped IPv6 forms (who answers: phigate's CA verifies phigate).
const PROBE: &str = r#"import errno, json, socket, ssl
MARK = int(__import__('sys').argv[1], 0)
out = {}
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
s = socket.socket()
try:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    out['mark'] = 'set'
except OSError as e:
    out['mark'] = err(e)
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    out['raw'] = 'opened'
except OSError as e:
    out['raw'] = err(e)
def squat(addr, family=socket.AF_INET):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(addr)
        s.listen()
        return 'bound'
    except OSError as e:
        return err(e)
out['squat_lo'] = squat(('127.0.0.1', 15001))
out['squat_any'] = squat(('0.0.0.0', 15001))
out['squat_v6_any'] = squat(('::', 15001), socket.AF_INET6)
try:
    d = socket.create_connection(('127.0.0.1', 15001), timeout=5)
    d.sendall(b'GET /files/patient.json HTTP/1.1\r\nHost: 10.77.1.1\r\n\r\n')
    out['direct'] = d.recv(4096).decode(errors='replace')
except OSError as e:
    out['direct'] = err(e)
def who(addr, family):
    ctx = ssl.create_default_context(cafile='/ca.pem')
    ctx.check_hostname = False
    try:
        s = socket.socket(family)
        s.settimeout(5)
        s.connect(addr)
        ctx.wrap_socket(s).close()
        return 'phigate'
    except ssl.SSLError as e:
        return 'not phigate: ' + str(e)
    except OSError as e:
        return err(e)
out['api'] = who(('10.77.1.1', 9443), socket.AF_INET)
out['api_mapped'] = who(('::ffff:10.77.1.1', 9443), socket.AF_INET6)
print(json.dumps(out))
"#;

/// An attacker in a Podman container with Podman's default capabilities, as root
/// inside (the host's uid 0: no user namespace) and as a non-root user, tries to go
/// around phigate: it cannot hold a mark or a raw socket, cannot take the agent's
/// port in its namespace (the agent holds it without SO_REUSEPORT), gets nothing
/// from the agent's listener directly, cannot make a network namespace of its own,
/// and whatever form of the API's address it dials, phigate answers and records it.
#[test]
fn an_attacker_in_a_container_cannot_go_around_phigate() {
    let e = env(
        "podman-attack",
        "@id(\"all\")\npermit (principal, action, resource);\n",
        1,
    );
    let c = Ctr::start(&e.w, &e.nets[0], &[]);
    wait_served(&e.w, &e.nets[0], true);
    let mark = format!("{:#x}", phigate::config::DEFAULT_AGENT_MARK);
    for user in [None, Some("65534")] {
        let who = user.unwrap_or("root inside");
        let out = c.exec(user, &["python3", "-c", PROBE, &mark]);
        let v: Value = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|err| panic!("{who}: {err}: {}{}", stdout(&out), stderr(&out)));
        assert_eq!(v["mark"], "EPERM", "{who}: {v}");
        assert_eq!(v["raw"], "EPERM", "{who}: {v}");
        for k in ["squat_lo", "squat_any", "squat_v6_any"] {
            assert_eq!(v[k], "EADDRINUSE", "{who}: {k}: {v}");
        }
        // The agent's listener accepts (it cannot refuse in the kernel) and closes a
        // connection with no redirect entry behind it: no byte of the API.
        assert!(
            v["direct"] == "" || v["direct"] == "ECONNRESET",
            "{who}: direct to the listener: {v}"
        );
        assert_eq!(v["api"], "phigate", "{who}: {v}");
        assert_eq!(v["api_mapped"], "phigate", "{who}: {v}");
        let out = c.exec(user, &["unshare", "-n", "true"]);
        assert!(
            !out.status.success(),
            "{who}: a network namespace of its own: {}",
            stderr(&out)
        );
        // The two TLS connections of this user, recorded as the container's.
        let uid = if user.is_some() { NOBODY } else { 0 };
        e.w.wait_rows("connections", 2, &format!("of {who}"), |r| {
            r["uid"] == uid && r["container_id"] == c.id.as_str()
        });
    }
    assert!(
        e.w.all_records("requests").is_empty(),
        "the direct connects reached nothing"
    );
}

/// A process outside the protected cgroup shares a container's namespace (a
/// sidecar) and holds the agent's address there before the agent serves it. The
/// container's protected connects are refused, never delivered to it nor passed,
/// and the agent warns once that it cannot serve the namespace, not at every scan
/// or connect.
#[test]
fn a_squatted_container_namespace_is_refused_and_warned_about_once() {
    let e = env(
        "podman-squat",
        "@id(\"all\")\npermit (principal, action, resource);\n",
        1,
    );
    let squatter = e.nets[0].run(|| std::net::TcpListener::bind("127.0.0.1:15001").unwrap());
    squatter.set_nonblocking(true).unwrap();
    let c = Ctr::start(&e.w, &e.nets[0], &[]);
    // Scans every 2 s and every refused connect try the namespace again.
    for _ in 0..3 {
        let (code, body) = curl(&c, None);
        assert_eq!(code, 0, "refused: {body}");
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(
        squatter.accept().is_err(),
        "the squatter received a connect"
    );
    let log = e.w.agent_log();
    assert_eq!(
        log.matches("cannot serve network namespace").count(),
        1,
        "{log}"
    );
    assert!(!served(&e.w).contains(&e.nets[0].inode()));
    assert!(e.w.all_records("connections").is_empty());
}
