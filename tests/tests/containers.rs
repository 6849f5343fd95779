//! Containers on the host: processes of the protected cgroup in network namespaces
//! of their own, joined to the agent's by veth pairs (as a container on a bridge
//! is), served by the one agent through the listeners it holds in each namespace.
//! Real curl clients, a real upstream, the real redirect. docs/threat-model.md
//! points at these tests.

use std::time::{Duration, Instant};

use phigate_e2e::*;
use serde_json::Value;

/// The protected API, on the agent's (the host's) side of the first veth pair.
const UP: &str = "10.77.1.1:9443";

fn world(tag: &str, agent_extra: &str) -> World {
    let w = World::new(tag);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"tcp\"\n",
        w.agent_section(agent_extra)
    ));
    w
}

/// A container's network namespace, the `n`th joined to the world's (10.77.n.0/30).
fn container(w: &World, n: u8) -> Netns {
    let c = Netns::new(&format!("ctr{n}"));
    w.netns.veth_to(
        &c,
        &n.to_string(),
        &format!("10.77.{n}.1/30"),
        &format!("10.77.{n}.2/30"),
    );
    c
}

/// A process of the protected cgroup in `c`, alive until dropped (the container's
/// main process).
fn resident(w: &World, c: &Netns) -> Background {
    Background::spawn(
        inside(w, c),
        &["sleep", "600"],
        w.path(&unique("resident.log")),
    )
}

fn inside<'a>(w: &'a World, c: &'a Netns) -> Place<'a> {
    Place {
        netns: Some(c),
        cgroup: Some(&w.cgroup),
        uid: None,
    }
}

fn curl(place: Place<'_>) -> std::process::Output {
    output(
        place,
        &["curl", "-sS", "--max-time", "5", &format!("http://{UP}/")],
    )
}

/// Inodes of the namespaces `phigate status` lists as served.
fn served(w: &World) -> Vec<u64> {
    w.status()["namespaces"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["inode"].as_u64()).collect())
        .unwrap_or_default()
}

fn wait_served(w: &World, c: &Netns, want: bool) {
    let t = Instant::now();
    while served(w).contains(&c.inode()) != want {
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "namespace {} {} served: {}\n{}",
            c.name,
            if want { "never" } else { "still" },
            w.status(),
            w.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn counter(w: &World, name: &str) -> u64 {
    w.status()["ebpf_counters"][name].as_u64().unwrap_or(0)
}

fn listeners(w: &World) -> u64 {
    w.status()["ebpf_maps"]["listeners"]
        .as_u64()
        .expect("listeners map")
}

fn assert_served(out: &std::process::Output, what: &str) {
    assert_eq!(
        stdout(out),
        "served",
        "{what}: {}{}",
        stdout(out),
        stderr(out)
    );
}

/// A container running when the agent starts and one started after it are both
/// served through phigate and recorded as the processes that connected; a container
/// that goes loses its listener and its map entries.
#[test]
fn containers_before_and_after_the_agent_start_are_served_and_the_gone_one_forgotten() {
    let mut w = world("ctr", "");
    let early = container(&w, 1);
    let up = CountingServer::start(&w.netns, UP, "served");
    let mut early_main = resident(&w, &early);
    w.start_agent(false);
    // Served from the start (found by the scan before "ready").
    assert!(served(&w).contains(&early.inode()), "{}", w.status());
    let home_listeners = 2;
    assert_eq!(listeners(&w), home_listeners + 2);
    let out = curl(inside(&w, &early));
    assert_served(&out, "container running before the agent");

    let late = container(&w, 2);
    let _late_main = resident(&w, &late);
    wait_served(&w, &late, true);
    assert_served(
        &curl(inside(&w, &late)),
        "container started after the agent",
    );
    assert_eq!(up.connections(), 2);
    let rows = w.wait_records("connections", 2);
    for r in &rows {
        assert_eq!(r["comm"], "curl", "{r}");
        assert_eq!(r["outcome"], "closed", "{r}");
        assert_eq!(r["destination"], "patients-api", "{r}");
    }
    assert_eq!(counter(&w, "passed_unserved_netns"), 0);

    // The early container's last process exits: its listener and map entries go.
    early_main.child.kill().unwrap();
    early_main.child.wait().unwrap();
    wait_served(&w, &early, false);
    assert_eq!(listeners(&w), home_listeners + 2, "{}", w.status());
    assert!(w.agent_log().contains("network namespace gone"));
}

/// The agent restarted while a container runs: while it is down the container's
/// protected connects are refused (fail closed), nothing reaches the API; the new
/// agent serves the container again at start.
#[test]
fn agent_restart_with_a_container_running() {
    let mut w = world("ctr-restart", "fail_mode = \"closed\"");
    let c = container(&w, 1);
    let up = CountingServer::start(&w.netns, UP, "served");
    let _main = resident(&w, &c);
    w.start_agent(false);
    assert_served(&curl(inside(&w, &c)), "before the restart");
    assert_eq!(w.wait_records("connections", 1).len(), 1);

    w.kill9();
    let out = curl(inside(&w, &c));
    assert_eq!(
        out.status.code(),
        Some(7),
        "agent down, fail closed: refused: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        up.connections(),
        1,
        "nothing passed while the agent was down"
    );

    w.start_agent(false);
    assert!(served(&w).contains(&c.inode()), "{}", w.status());
    assert_served(&curl(inside(&w, &c)), "after the restart");
    assert_eq!(up.connections(), 2);
    assert_eq!(w.wait_records("connections", 2).len(), 2);
}

/// fail_mode = "open" decides per namespace: a served container is served through
/// phigate; with the agent down, the container's connects pass to the API untouched.
#[test]
fn fail_open_with_a_container_namespace() {
    let mut w = world("ctr-open", "fail_mode = \"open\"");
    let c = container(&w, 1);
    let up = CountingServer::start(&w.netns, UP, "served");
    let _main = resident(&w, &c);
    w.start_agent(false);
    assert_served(&curl(inside(&w, &c)), "served through phigate");
    assert_eq!(w.wait_records("connections", 1).len(), 1);
    assert_eq!(counter(&w, "redirected"), 1);

    w.kill9();
    assert_served(&curl(inside(&w, &c)), "agent down, fail open: passed");
    assert_eq!(up.connections(), 2);
    let rows: Vec<Value> = w.all_records("connections");
    assert_eq!(rows.len(), 1, "the passed connection is not recorded");
}

/// The fail-open first-connect gap, closed: a namespace created right before its
/// first protected connect (no agent listener in it yet, the agent up) is refused
/// with ECONNREFUSED in fail-open mode too, never passed; the agent, told through
/// the ring buffer, serves it at once and the client's retry goes through phigate.
#[test]
fn a_namespace_connecting_before_it_is_served_is_refused_in_fail_open_mode() {
    let mut w = world("ctr-gap", "fail_mode = \"open\"");
    // The API's address lives on the first veth pair, unused otherwise.
    let _api_side = container(&w, 1);
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let c = container(&w, 2);
    // Joins the protected cgroup and connects at once (no scan can come between),
    // then retries as a client would.
    let script = format!(
        r#"import json, socket, time
open('{}/cgroup.procs', 'w').write('0')
def get():
    s = socket.create_connection(('10.77.1.1', 9443), timeout=5)
    s.sendall(b'GET / HTTP/1.0\r\nHost: x\r\n\r\n')
    data = b''
    while True:
        d = s.recv(4096)
        if not d:
            return data.decode(errors='replace')
        data += d
try:
    first = get()
except OSError as e:
    first = e.errno
t = time.monotonic()
body = None
while body is None and time.monotonic() - t < 5:
    try:
        body = get()
    except OSError:
        time.sleep(0.05)
print(json.dumps({{'first': first, 'retry': body, 'ms': int((time.monotonic() - t) * 1000)}}))
"#,
        w.cgroup.path.display()
    );
    let out = output(
        Place {
            netns: Some(&c),
            cgroup: None,
            uid: None,
        },
        &["python3", "-c", &script],
    );
    let v: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    assert_eq!(
        v["first"],
        libc::ECONNREFUSED,
        "the first connect from an unserved namespace is refused, not passed: {v}"
    );
    assert!(
        v["retry"].as_str().is_some_and(|b| b.ends_with("served")),
        "the retry is served once the agent serves the namespace: {v}\n{}",
        w.agent_log()
    );
    assert_eq!(up.connections(), 1, "only the served retry reached the API");
    assert!(counter(&w, "refused_unserved_netns") >= 1, "{}", w.status());
    assert_eq!(counter(&w, "passed_unserved_netns"), 0);
    let rows = w.wait_records("connections", 1);
    assert_eq!(rows[0]["comm"], "python3", "{rows:?}");
    assert!(w.agent_log().contains("serving network namespace"));
}
