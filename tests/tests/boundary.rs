//! The enforcement boundary, tried as a local attacker would: a real unprivileged
//! process (`nobody`; CAP_NET_RAW alone where that is the point) inside the protected
//! cgroup, against a real upstream, through the real redirect. Each test is a way
//! around phigate that used to work; each must now be refused, or served through
//! phigate and recorded. docs/threat-model.md points at these tests.
//!
//! The attacker is tests/attacker/attacker.py, run with the system's Python.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const PYTHON: &str = "/usr/bin/python3";

fn tcp_world(tag: &str, agent_extra: &str) -> World {
    let w = World::new(tag);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"tcp\"\n",
        w.agent_section(agent_extra)
    ));
    w
}

/// The attacker script, copied where every user can read it.
fn script(w: &World) -> PathBuf {
    let dst = w.path("attacker.py");
    if !dst.exists() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("attacker/attacker.py");
        std::fs::copy(src, &dst).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dst
}

/// Runs an attacker mode and returns the JSON line it printed.
fn attack(w: &World, place: Place<'_>, prefix: &[&str], args: &[&str]) -> Value {
    let s = script(w);
    let mut argv: Vec<&str> = prefix.to_vec();
    argv.extend([PYTHON, s.to_str().unwrap()]);
    argv.extend(args);
    let out = output(place, &argv);
    last_json(&stdout(&out)).unwrap_or_else(|| {
        panic!(
            "the attacker printed no result: {}{}",
            stdout(&out),
            stderr(&out)
        )
    })
}

fn last_json(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
}

fn nobody_inside(w: &World) -> Place<'_> {
    Place {
        uid: Some(NOBODY),
        ..w.inside()
    }
}

fn curl(place: Place<'_>) -> std::process::Output {
    output(
        place,
        &["curl", "-sS", "--max-time", "5", &format!("http://{UP}/")],
    )
}

/// Entries in one of the redirect's maps, from `phigate status --json`.
fn map_entries(w: &World, name: &str) -> u64 {
    let v = w.status();
    v["ebpf_maps"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no map {name} in {}", v["ebpf_maps"]))
}

fn counter(w: &World, name: &str) -> u64 {
    let c = w.status()["ebpf_counters"].clone();
    c[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {c}"))
}

/// Bypass 1: while the agent is not listening (SIGTERM drain, SIGKILL), an
/// unprivileged user binds the listen port, looping on bind. Protected connects are
/// refused rather than delivered to it, and nothing reaches the API directly.
#[test]
fn a_listener_bound_by_another_user_in_a_restart_gap_receives_nothing() {
    let mut w = tcp_world("hijack", "fail_mode = \"closed\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    assert_eq!(stdout(&curl(w.inside())), "served");
    let mut served = 1;

    for how in ["sigterm", "sigkill"] {
        let s = script(&w);
        let log = w.path(&unique("hijack.log"));
        let mut hijacker = Background::spawn(
            nobody_inside(&w),
            &[PYTHON, s.to_str().unwrap(), "hijack", "--secs", "4"],
            log.clone(),
        );
        match how {
            "sigterm" => assert!(w.sigterm(Duration::from_secs(20)).success()),
            _ => w.kill9(),
        }
        let t = Instant::now();
        while !hijacker.log_text().contains("\"bound\"") {
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "{how}: the attacker never got the port: {}",
                hijacker.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Protected clients during the gap: refused, from root and from nobody.
        for place in [w.inside(), nobody_inside(&w)] {
            let out = curl(place);
            assert_eq!(
                out.status.code(),
                Some(7),
                "{how}: a protected connect must fail while the agent is down: {}{}",
                stdout(&out),
                stderr(&out)
            );
        }
        hijacker.child.wait().unwrap();
        let result = last_json(&hijacker.log_text()).expect("hijack result");
        assert_eq!(result["bound"], true, "{result}");
        assert_eq!(
            result["received"], 0,
            "{how}: the attacker's listener received protected connections: {result}"
        );
        assert_eq!(
            up.connections(),
            served,
            "{how}: nothing reaches the API directly"
        );

        w.start_agent(false);
        assert_eq!(stdout(&curl(w.inside())), "served", "{how}: after restart");
        served += 1;
        assert!(counter(&w, "redirected") >= 1);
    }
    assert_eq!(up.connections(), served);
    // Served through the agent each time, recorded each time.
    assert_eq!(w.wait_records("connections", 3).len(), 3);
}

/// Bypass 1, same agent running: a second listener cannot take the agent's place
/// (the port is held), and connects in a namespace where somebody else holds the
/// address are refused, not delivered (fail_mode = "open" included).
#[test]
fn another_namespace_is_refused_in_both_fail_modes_not_passed() {
    let mut w = tcp_world("open-netns", "fail_mode = \"open\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let other = Netns::new("other");
    let local = CountingServer::start(&other, UP, "unrecorded");
    // In the other namespace, an unprivileged listener holds the agent's address.
    let s = script(&w);
    let other_place = Place {
        netns: Some(&other),
        cgroup: Some(&w.cgroup),
        uid: Some(NOBODY),
    };
    let mut hijacker = Background::spawn(
        Place {
            cgroup: None,
            ..other_place
        },
        &[PYTHON, s.to_str().unwrap(), "hijack", "--secs", "3"],
        w.path("hijack-other.log"),
    );
    let t = Instant::now();
    while !hijacker.log_text().contains("\"bound\"") {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{}",
            hijacker.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = curl(other_place);
    assert_eq!(
        out.status.code(),
        Some(7),
        "a process of the protected cgroup in another namespace must be refused: {}{}",
        stdout(&out),
        stderr(&out)
    );
    hijacker.child.wait().unwrap();
    let result = last_json(&hijacker.log_text()).expect("hijack result");
    assert_eq!(result["received"], 0, "{result}");
    assert_eq!(local.connections(), 0, "passed untouched in fail-open mode");
    assert!(counter(&w, "refused_not_agent") >= 1);
    // The agent's own namespace is served as before.
    assert_eq!(stdout(&curl(w.inside())), "served");
    assert_eq!(up.connections(), 1);
    assert_eq!(w.wait_records("connections", 1).len(), 1);
}

/// Bypass 2: SO_MARK needs only CAP_NET_RAW (Linux 5.17+), which containers get by
/// default. A `nobody` process with just that capability sets phigate's mark: it is
/// still redirected, decided and recorded as itself.
#[test]
fn a_cap_net_raw_holder_setting_the_agent_mark_is_still_redirected() {
    let mut w = tcp_world("mark", "");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
        "--bounding-set=-all,+net_raw",
    ];
    let mark = format!("{:#x}", phigate::config::DEFAULT_AGENT_MARK);
    let v = attack(
        &w,
        w.inside(),
        &setpriv,
        &[
            "marked",
            "--mark",
            &mark,
            "--host",
            "127.0.0.2",
            "--port",
            "9443",
        ],
    );
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(
        v["mark"].as_u64(),
        Some(u64::from(phigate::config::DEFAULT_AGENT_MARK)),
        "the attacker really holds the mark: {v}"
    );
    assert!(v["response"].as_str().unwrap().ends_with("served"), "{v}");
    let recs = w.wait_records("connections", 1);
    assert_eq!(recs[0]["uid"], NOBODY, "{recs:?}");
    assert_eq!(recs[0]["outcome"], "closed", "{recs:?}");
    assert_eq!(up.connections(), 1);
}

/// Bypass 3: the hand-over of a connection's identity is bound to the very
/// connection. A redirected connection that dies in the backlog of an agent that is
/// restarted leaves no entry behind, so a local user who binds the same source port
/// and connects to the new agent directly gets nothing (not the victim's identity
/// and destination). Direct connects are refused without a record each.
#[test]
fn a_dead_connections_identity_cannot_be_taken_over_by_its_source_port() {
    let mut w = tcp_world("steal", "");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let sport = "41977";
    // The agent stops accepting; the victim (root, protected) connects and waits.
    let agent_pid = w.agent_pid() as i32;
    // SAFETY: signalling our child.
    unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
    let s = script(&w);
    let mut victim = Background::spawn(
        w.inside(),
        &[
            PYTHON,
            s.to_str().unwrap(),
            "connect_from",
            "--sport",
            sport,
            "--host",
            "127.0.0.2",
            "--port",
            "9443",
        ],
        w.path("victim.log"),
    );
    std::thread::sleep(Duration::from_millis(500));
    // The agent dies with the victim in its backlog: the victim gets a reset.
    w.kill9();
    victim.child.wait().unwrap();
    w.start_agent(false);

    let v = attack(
        &w,
        Place {
            uid: Some(NOBODY),
            ..w.outside()
        },
        &[],
        &[
            "connect_from",
            "--sport",
            sport,
            "--host",
            "127.0.0.1",
            "--port",
            "15001",
        ],
    );
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(
        v["response"], "",
        "a direct connect from the victim's port was served: {v}"
    );
    assert_eq!(up.connections(), 0, "nothing reached the API");
    std::thread::sleep(Duration::from_millis(500));
    let conns = w.all_records("connections");
    assert!(
        conns.is_empty(),
        "no connection is recorded under the victim's identity (or at all): {conns:?}"
    );
    // The victim's entry went with its socket: the shared hand-over map is empty.
    assert_eq!(map_entries(&w, "by_peer"), 0);
}

/// Bypass 5: direct connects cost one counter each and one aggregate event, never a
/// record each (any user could otherwise fill the records disk).
#[test]
fn a_flood_of_direct_connects_writes_no_record_each() {
    let mut w = tcp_world("flood", "");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let v = attack(&w, nobody_inside(&w), &[], &["flood", "--count", "300"]);
    assert_eq!(v["count"], 300, "{v}");
    assert_eq!(stdout(&curl(nobody_inside(&w))), "served");
    w.wait_records("connections", 1);
    let refused: Vec<Value> = w
        .all_records("connections")
        .into_iter()
        .filter(|r| r["outcome"] == "not_redirected")
        .collect();
    assert!(
        refused.is_empty(),
        "{} direct connects recorded one by one",
        refused.len()
    );
    let events: Vec<Value> = w
        .all_records("events")
        .into_iter()
        .filter(|e| e["kind"] == "direct_connects")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["outcome"], "refused");
    assert_eq!(up.connections(), 1);
}

/// Bypass 4: enrichment no caller can empty. A connect from a thread that renamed
/// itself (prctl, as thread pools and io_uring workers do) keeps its executable, its
/// hash and its groups.
#[test]
fn a_renamed_thread_keeps_its_executable_identity() {
    let mut w = tcp_world("renamed", "");
    let _up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let v = attack(
        &w,
        nobody_inside(&w),
        &[],
        &["renamed_thread", "--host", "127.0.0.2", "--port", "9443"],
    );
    assert!(v["response"].as_str().unwrap().ends_with("served"), "{v}");
    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["comm"], "not-my-exe", "{r}");
    let python = std::fs::canonicalize(PYTHON).unwrap();
    assert_eq!(r["exe_path"], python.to_str().unwrap(), "{r}");
    assert_eq!(r["exe_sha256"], sha256_file(&python), "{r}");
    assert_eq!(r["identity_unknown"], serde_json::json!([]), "{r}");
}

/// Bypass 4: a huge (sparse) executable cannot stall the agent; its hash is unknown,
/// the record says so, and a policy that requires the hash refuses it.
#[test]
fn a_huge_executable_is_not_hashed_and_a_policy_can_require_the_hash() {
    let mut w = World::new("hugeexe");
    let _up = CountingServer::start(&w.netns, UP, "served");
    w.write_policies(&[(
        "p.cedar",
        "@id(\"allow\")\npermit (principal, action, resource);\n\
         @id(\"hash-required\")\nforbid (principal, action, resource) when { principal.unknown.contains(\"exe_sha256\") };\n",
    )]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"http\"\n",
        w.agent_section("")
    ));
    w.start_agent(false);
    // curl, grown past the hashing bound with a sparse tail the loader ignores.
    let huge = w.path("huge-curl");
    std::fs::copy("/usr/bin/curl", &huge).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&huge).unwrap();
    f.set_len(phigate::identity::EXE_HASH_MAX_BYTES + 4096)
        .unwrap();
    drop(f);
    let t = Instant::now();
    let out = output(
        nobody_inside(&w),
        &[
            huge.to_str().unwrap(),
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            &format!("http://{UP}/"),
        ],
    );
    let text = stdout(&out);
    assert!(text.ends_with("\n403"), "{text}{}", stderr(&out));
    assert!(text.contains("hash-required"), "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the agent did not read the oversized file"
    );
    // The ordinary curl is allowed: the forbid applies only to the unknown hash.
    let out = output(
        nobody_inside(&w),
        &[
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            &format!("http://{UP}/"),
        ],
    );
    assert!(stdout(&out).ends_with("served\n200"), "{}", stdout(&out));
    let reqs = w.wait_records("requests", 2);
    let refused = reqs
        .iter()
        .find(|r| r["status"] == 403)
        .expect("the refused request is recorded");
    assert_eq!(
        refused["identity_unknown"],
        serde_json::json!(["exe_sha256"])
    );
    assert_eq!(refused["exe_path"], huge.to_str().unwrap());
}

/// IPv4-embedded IPv6: a connect to the NAT64 form (64:ff9b::/96) of a protected
/// IPv4 address is the protected destination, redirected and recorded.
#[test]
fn a_nat64_form_of_a_protected_address_is_redirected() {
    let mut w = tcp_world("nat64", "");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let py = "import socket;s=socket.socket(socket.AF_INET6);s.settimeout(5);s.connect(('64:ff9b::7f00:2',9443));s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n');d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d.split(b'\\r\\n\\r\\n',1)[1].decode())";
    let out = output(nobody_inside(&w), &[PYTHON, "-c", py]);
    assert_eq!(stdout(&out).trim(), "served", "{}", stderr(&out));
    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["original_dst"], UP, "{r}");
    assert_eq!(r["uid"], NOBODY);
    assert_eq!(up.connections(), 1);
}

/// Silent holes in configuration: an IPv6 destination without an IPv6 listener is
/// refused at start with file:line, and the agent does not run.
#[test]
fn an_ipv6_destination_without_an_ipv6_listener_is_refused_at_start() {
    let w = World::new("v6cfg");
    let agent = w.agent_section("").replace(", \"[::1]:15001\"]", "]");
    w.write_config(&format!(
        "{agent}\n[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"[fd00::1]:443\"]\n"
    ));
    let out = std::process::Command::new(phigate_bin())
        .args(["config", "check"])
        .arg(w.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    let cfg = w.config_path();
    assert!(
        err.contains(&format!("{}:", cfg.display()))
            && err.contains("destinations[0].addresses[0]")
            && err.contains("no IPv6 address"),
        "{err}"
    );
}

/// A CAP_NET_ADMIN holder (not root) cannot reach the pinned programs and maps to
/// detach or rewrite them: bpffs under the pin directory is root's.
#[test]
fn a_cap_net_admin_holder_cannot_open_the_pinned_redirect() {
    let mut w = tcp_world("netadmin", "");
    let _up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let link = std::fs::read_dir(&w.pin_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("phigate_connect4"))
        .find(|p| p.exists())
        .expect("a pinned connect4 link");
    let map = link.with_file_name("maps").join("PHIGATE_OWN_SOCKETS");
    assert!(map.exists(), "{}", map.display());
    for target in [&link, &map] {
        let py = format!(
            "import os\ntry:\n  os.open('{}', os.O_RDWR)\n  print('opened')\nexcept PermissionError:\n  print('denied')",
            target.display()
        );
        let out = output(
            w.inside(),
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all,+net_admin,+net_raw",
                "--ambient-caps=-all,+net_admin,+net_raw",
                "--bounding-set=-all,+net_admin,+net_raw",
                PYTHON,
                "-c",
                &py,
            ],
        );
        assert_eq!(
            stdout(&out).trim(),
            "denied",
            "{}: {}",
            target.display(),
            stderr(&out)
        );
    }
    assert_eq!(stdout(&curl(w.inside())), "served");
}
