//! A real container runtime: Podman (runc, the cgroupfs manager) runs containers
//! whose rootfs is made from the host's own /usr (no image, no registry), in network
//! namespaces joined to the world's by veth pairs, under the protected cgroup. Their
//! curl and Python clients reach the protected API through phigate; the records
//! (DuckDB over Parquet) carry the container id Podman gave them. docs/threat-model.md
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

/// A running container, removed on drop.
pub struct Ctr {
    pub id: String,
}

impl Ctr {
    /// Starts a container whose main process sleeps, in `netns`, under `w`'s
    /// protected cgroup, the agent's CA mounted at /ca.pem. `extra`: more `podman
    /// run` options (e.g. `--user`, an annotation).
    pub fn start(w: &World, netns: &Netns, extra: &[&str]) -> Ctr {
        let rootfs = rootfs(w);
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
        let root = rootfs.display().to_string();
        args.extend(["--rootfs", &root, "sleep", "600"]);
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
    let billing = Ctr::start(&e.w, &e.nets[0], &[]);
    let mut other = Ctr::start(&e.w, &e.nets[1], &[]);
    wait_served(&e.w, &e.nets[0], true);
    wait_served(&e.w, &e.nets[1], true);
    assert_eq!(listeners(&e.w), home + 4, "{}", e.w.status());

    e.w.write_policies(&[(
        "only.cedar",
        &format!(
            "@id(\"only-billing\")\npermit (principal, action, resource)\nwhen {{ principal.container == \"{}\" && principal.container_runtime == \"podman\" }};\n",
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
        assert_eq!(r["policy_ids"], serde_json::json!(["only-billing"]), "{r}");
        assert_eq!(r["masking_profile"], "safe_harbor", "{r}");
    }
    let denied = e.w.wait_row("requests", "the denied request", |r| {
        r["container_id"] == other.id.as_str()
    });
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["container_runtime"], "podman", "{denied}");
    let conns =
        e.w.wait_row("connections", "a container's connection", |r| {
            r["container_id"] == billing.id.as_str()
        });
    assert_eq!(conns["container_runtime"], "podman", "{conns}");
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
