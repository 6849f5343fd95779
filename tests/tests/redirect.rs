//! The foundation: transparent redirect, kernel-attested identity, TCP pass-through,
//! fail closed/open, restarts without a direct connect, detach, drain, start-up
//! errors. Each test has its own netns and cgroup and a real phigate.

use std::time::Duration;

use phigate_e2e::*;

const UP: &str = "127.0.0.2:9443";

fn tcp_world(tag: &str, agent_extra: &str, addresses: &str) -> World {
    let w = World::new(tag);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [{addresses}]\nprotocol = \"tcp\"\n",
        w.agent_section(agent_extra)
    ));
    w
}

fn curl(place: Place<'_>, url: &str) -> std::process::Output {
    output(place, &["curl", "-sS", "--max-time", "5", url])
}

#[test]
fn curl_in_the_cgroup_is_redirected_and_identified() {
    let mut w = tcp_world("curl", "", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "hello from upstream");
    w.start_agent(false);

    let child = command(
        w.inside(),
        &["curl", "-sS", "--max-time", "5", "http://127.0.0.2:9443/"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from upstream");

    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["original_dst"], UP);
    assert_eq!(r["destination"], "patients-api");
    assert_eq!(r["protocol"], "tcp");
    assert_eq!(r["pid"], pid);
    assert_eq!(r["comm"], "curl");
    assert_eq!(r["uid"], 0);
    assert_eq!(r["user"], "root");
    let curl_path = std::fs::canonicalize("/usr/bin/curl").unwrap();
    assert_eq!(r["exe_path"], curl_path.to_str().unwrap());
    assert_eq!(r["exe_sha256"], sha256_file(&curl_path));
    assert_eq!(r["cgroup_path"], w.cgroup.relative());
    assert_eq!(r["cgroup_id"], w.cgroup.inode());
    assert!(r["bytes_up"].as_u64().unwrap() > 0);
    assert!(r["bytes_down"].as_u64().unwrap() >= "hello from upstream".len() as u64);
    assert_eq!(r["outcome"], "closed");
    // The upstream was reached once, by the agent (not by curl directly).
    assert_eq!(up.connections(), 1);
}

#[test]
fn a_python_client_running_as_nobody_is_attributed_to_nobody() {
    let mut w = tcp_world("nobody", "", "\"127.0.0.2:9443\"");
    let _up = CountingServer::start(&w.netns, UP, "ok");
    w.start_agent(false);
    let place = Place {
        uid: Some(65534),
        ..w.inside()
    };
    let py = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.2:9443/', timeout=5).read().decode())";
    let out = output(place, &["python3", "-c", py]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "ok");
    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["uid"], 65534);
    assert_eq!(r["gid"], 65534);
    assert_eq!(r["user"], "nobody");
    assert!(r["comm"].as_str().unwrap().starts_with("python"), "{r}");
    assert!(r["exe_path"].as_str().unwrap().contains("python"), "{r}");
}

#[test]
fn outside_the_cgroup_or_unprotected_destinations_are_not_redirected() {
    let mut w = tcp_world("scope", "", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "direct");
    let other = CountingServer::start(&w.netns, "127.0.0.2:9555", "unprotected");
    w.start_agent(false);

    let out = curl(w.outside(), "http://127.0.0.2:9443/");
    assert_eq!(stdout(&out), "direct", "{}", stderr(&out));
    let out = curl(w.inside(), "http://127.0.0.2:9555/");
    assert_eq!(stdout(&out), "unprotected", "{}", stderr(&out));
    assert_eq!(up.connections(), 1);
    assert_eq!(other.connections(), 1);
    // Both reached their servers straight from curl, not via the agent.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.records("connections").is_empty(),
        "{:?}",
        w.records("connections")
    );
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_redirected() {
    let mut w = tcp_world("v6", "", "\"127.0.0.2:9443\", \"[::1]:9446\"");
    let _v4 = CountingServer::start(&w.netns, UP, "v4");
    let v6 = CountingServer::start(&w.netns, "[::1]:9446", "v6");
    w.start_agent(false);

    let py = |host: &str, port: u16| {
        format!(
            "import socket;s=socket.socket(socket.AF_INET6);s.settimeout(5);s.connect(('{host}',{port}));s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d.split(b'\\r\\n\\r\\n',1)[1].decode())"
        )
    };
    let out = output(w.inside(), &["python3", "-c", &py("::1", 9446)]);
    assert_eq!(stdout(&out).trim(), "v6", "{}", stderr(&out));
    let out = output(
        w.inside(),
        &["python3", "-c", &py("::ffff:127.0.0.2", 9443)],
    );
    assert_eq!(stdout(&out).trim(), "v4", "{}", stderr(&out));

    let recs = w.wait_records("connections", 2);
    let dsts: Vec<&str> = recs
        .iter()
        .map(|r| r["original_dst"].as_str().unwrap())
        .collect();
    assert!(dsts.contains(&"[::1]:9446"), "{dsts:?}");
    assert!(dsts.contains(&UP), "{dsts:?}");
    assert_eq!(v6.connections(), 1);
}

#[test]
fn getpeername_shows_the_original_destination() {
    let mut w = tcp_world("peer", "", "\"127.0.0.2:9443\"");
    let _up = CountingServer::start(&w.netns, UP, "x");
    w.start_agent(false);
    let py = "import socket;s=socket.create_connection(('127.0.0.2',9443),timeout=5);print(s.getpeername())";
    let out = output(w.inside(), &["python3", "-c", py]);
    assert_eq!(
        stdout(&out).trim(),
        "('127.0.0.2', 9443)",
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_agents_own_upstream_connections_are_not_looped_back() {
    let mut w = tcp_world("loop", "", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "no loop");
    // The agent runs inside the protected cgroup: its upstream connect is marked.
    w.start_agent(true);
    let out = curl(w.inside(), "http://127.0.0.2:9443/");
    assert_eq!(stdout(&out), "no loop", "{}", stderr(&out));
    assert_eq!(w.wait_records("connections", 1).len(), 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.records("connections").len(), 1);
    assert_eq!(up.connections(), 1);
}

#[test]
fn fail_closed_refuses_while_the_agent_is_dead_and_recovers_on_restart() {
    let mut w = tcp_world("closed", "fail_mode = \"closed\"", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "served"
    );
    assert_eq!(up.connections(), 1);
    // A tcp connection's record is written when both sides have closed, which may be
    // just after curl is done: let it land before the agent is killed.
    w.wait_records("connections", 1);

    w.kill9();
    let out = curl(w.inside(), "http://127.0.0.2:9443/");
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl must fail to connect: {}",
        stderr(&out)
    );
    assert_eq!(
        up.connections(),
        1,
        "nothing may reach the upstream directly"
    );

    w.start_agent(false);
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "served"
    );
    assert_eq!(up.connections(), 2);
    assert_eq!(w.wait_records("connections", 2).len(), 2);
}

#[test]
fn fail_open_lets_traffic_through_while_the_agent_is_down() {
    let mut w = tcp_world("open", "fail_mode = \"open\"", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "served"
    );
    w.wait_records("connections", 1);

    w.kill9();
    let out = curl(w.inside(), "http://127.0.0.2:9443/");
    assert_eq!(stdout(&out), "served", "{}", stderr(&out));
    assert_eq!(up.connections(), 2);
    // Direct: the upstream saw curl's own connection, and nothing was recorded.
    assert_eq!(w.records("connections").len(), 1);

    w.start_agent(false);
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "served"
    );
    assert_eq!(w.wait_records("connections", 2).len(), 2);
}

#[test]
fn detach_removes_every_program_and_pin() {
    let mut w = tcp_world("detach", "", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "direct");
    w.start_agent(false);
    let cg = w.cgroup.path.clone();
    let show = move || {
        let o = std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cg)
            .output()
            .unwrap();
        stdout(&o)
    };
    assert!(show().contains("phigate_connect4"), "{}", show());
    w.kill9();
    let out = w.detach();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("detached"), "{}", stdout(&out));
    assert_eq!(show().trim(), "", "programs left attached: {}", show());
    assert!(!w.pin_dir.exists() || std::fs::read_dir(&w.pin_dir).unwrap().next().is_none());
    // No longer redirected: the connect goes straight to the upstream.
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "direct"
    );
    assert_eq!(up.connections(), 1);
}

#[test]
fn sigterm_drains_open_connections_and_exits_zero() {
    let mut w = tcp_world("drain", "", "\"127.0.0.2:9443\"");
    w.write_config(&format!(
        "{}\n[timeouts]\ndrain_secs = 2\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"127.0.0.2:9443\"]\nprotocol = \"tcp\"\n",
        w.agent_section("")
    ));
    // An upstream that keeps the connection open.
    let listener = w.netns.run(|| std::net::TcpListener::bind(UP).unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    w.start_agent(false);
    let py = "import socket,time;s=socket.create_connection(('127.0.0.2',9443),timeout=30)\nfor i in range(100):\n  s.sendall(b'x');time.sleep(0.1)";
    let _client = Background::spawn(w.inside(), &["python3", "-c", py], w.path("client.log"));
    wait_until(
        "the connection to be accepted",
        Duration::from_secs(5),
        || w.agent_log().contains("redirected connection"),
    )
    .unwrap();
    let status = w.sigterm(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["outcome"], "drained", "{r}");
    assert!(r["bytes_up"].as_u64().unwrap() > 0);
}

#[test]
fn startup_errors_name_the_problem() {
    let w = World::new("errors");
    let bin = phigate_bin();
    let run = |cfg: &str| {
        w.write_config(cfg);
        output(
            w.outside(),
            &[
                bin.to_str().unwrap(),
                "run",
                "--config",
                w.config_path().to_str().unwrap(),
            ],
        )
    };

    // Bad config: file, line and key.
    let text = format!("{}\n[[destinations]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.0/33:443\"]\n", w.agent_section(""));
    let line = text
        .lines()
        .position(|l| l.starts_with("addresses"))
        .unwrap()
        + 1;
    let out = run(&text);
    assert!(!out.status.success());
    let err = stderr(&out);
    let want = format!("{}:{line}", w.config_path().display());
    assert!(
        err.contains(&want) && err.contains("destinations[0].addresses[0]"),
        "{err}"
    );

    // Missing cgroup directory.
    let text = w.agent_section("").replace(
        w.cgroup.path.to_str().unwrap(),
        "/sys/fs/cgroup/unified/does-not-exist",
    );
    let out = run(&text);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does-not-exist does not exist"),
        "{}",
        stderr(&out)
    );

    // Listener port taken inside the namespace.
    let _taken = w
        .netns
        .run(|| std::net::TcpListener::bind("127.0.0.1:15001").unwrap());
    let out = run(&w.agent_section(""));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("address already in use"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sighup_reloads_destinations_and_a_broken_config_changes_nothing() {
    let mut w = tcp_world("reload", "", "\"127.0.0.2:9443\"");
    let _a = CountingServer::start(&w.netns, UP, "a");
    let b = CountingServer::start(&w.netns, "127.0.0.2:9447", "b");
    w.start_agent(false);
    let hup = |w: &World| {
        // SAFETY: signalling our child.
        unsafe { libc::kill(w.agent_pid() as i32, libc::SIGHUP) };
    };

    // 9447 is not protected yet: direct.
    assert_eq!(stdout(&curl(w.inside(), "http://127.0.0.2:9447/")), "b");
    assert!(w.records("connections").is_empty());

    // Protect it: the maps are updated in place.
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"127.0.0.2:9443\", \"127.0.0.2:9447\"]\nprotocol = \"tcp\"\n",
        w.agent_section("")
    ));
    hup(&w);
    wait_until("the reload", Duration::from_secs(5), || {
        w.agent_log().contains("config reloaded")
    })
    .unwrap();
    assert_eq!(stdout(&curl(w.inside(), "http://127.0.0.2:9447/")), "b");
    let r = &w.wait_records("connections", 1)[0];
    assert_eq!(r["original_dst"], "127.0.0.2:9447");

    // A broken file is rejected with its line; the running config keeps serving.
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"x\"\n",
        w.agent_section("")
    ));
    hup(&w);
    wait_until("the rejection", Duration::from_secs(5), || {
        w.agent_log().contains("config reload rejected")
    })
    .unwrap();
    assert!(w.agent_log().contains("phigate.toml:"), "{}", w.agent_log());
    assert_eq!(stdout(&curl(w.inside(), "http://127.0.0.2:9447/")), "b");
    assert_eq!(w.wait_records("connections", 2).len(), 2);
    assert_eq!(b.connections(), 3);
}

#[test]
fn fail_mode_changes_on_reload_without_a_restart() {
    let mut w = tcp_world("failmode", "fail_mode = \"closed\"", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"127.0.0.2:9443\"]\nprotocol = \"tcp\"\n",
        w.agent_section("fail_mode = \"open\"")
    ));
    // SAFETY: signalling our child.
    unsafe { libc::kill(w.agent_pid() as i32, libc::SIGHUP) };
    wait_until("the reload", Duration::from_secs(5), || {
        w.agent_log().contains("config reloaded")
    })
    .unwrap();
    assert!(
        w.agent_log().contains("fail_mode=Open"),
        "{}",
        w.agent_log()
    );
    w.kill9();
    // Now open: with no agent, the connect goes straight through.
    assert_eq!(
        stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
        "served"
    );
    assert_eq!(up.connections(), 1);
}

/// The connection maps hold an entry only while its connection is being handed over:
/// after redirected connections close, neither the by-cookie nor the by-peer map
/// keeps one (released on socket release, taken on accept).
#[test]
fn map_entries_go_with_their_sockets() {
    let mut w = tcp_world("maps", "", "\"127.0.0.2:9443\"");
    let _up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    for _ in 0..20 {
        assert_eq!(
            stdout(&curl(w.inside(), "http://127.0.0.2:9443/")),
            "served"
        );
    }
    w.wait_records("connections", 20);
    let t = std::time::Instant::now();
    loop {
        let v = w.status();
        let (cookie, peer) = (&v["ebpf_maps"]["by_cookie"], &v["ebpf_maps"]["by_peer"]);
        if cookie == 0 && peer == 0 {
            assert!(
                v["ebpf_counters"]["released"].as_u64().unwrap() >= 20,
                "{v}"
            );
            assert!(
                v["ebpf_counters"]["established"].as_u64().unwrap() >= 20,
                "{v}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "entries outlived their connections: by_cookie {cookie}, by_peer {peer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects to the protected destination in a loop until `stop` exists, sending a
/// request on every connection that opens; prints a JSON tally. EPERM is phigate's
/// refusal (no agent listening); a reset during the handshake comes from a listener
/// closing with the connect in its queue; a response is "served", a connection that
/// opened but got none is "cut". No pause between attempts: the denser the sampling,
/// the narrower a window it catches.
const CONNECT_LOOP: &str = r#"
import json, os, socket, sys, time
stop = sys.argv[1]
res = {"refused": 0, "reset": 0, "served": 0, "cut": 0, "other": []}
deadline = time.time() + 120
while not os.path.exists(stop) and time.time() < deadline:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.2", 9443))
    except PermissionError:
        res["refused"] += 1
        s.close()
        continue
    except ConnectionResetError:
        res["reset"] += 1
        s.close()
        continue
    except OSError as e:
        res["other"].append(str(e))
        s.close()
        continue
    data = b""
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while True:
            c = s.recv(4096)
            if not c:
                break
            data += c
    except OSError:
        pass
    s.close()
    if data.endswith(b"served"):
        res["served"] += 1
    else:
        res["cut"] += 1
print(json.dumps(res))
"#;

#[test]
fn restarts_under_a_connect_loop_never_let_a_connect_reach_the_upstream_directly() {
    let mut w = tcp_world("restart-gap", "", "\"127.0.0.2:9443\"");
    let up = CountingServer::start(&w.netns, UP, "served");
    w.start_agent(false);
    let stop = w.path("stop");
    let client = command(
        w.inside(),
        &["python3", "-c", CONNECT_LOOP, stop.to_str().unwrap()],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let relayed = |w: &World| {
        w.records("connections")
            .iter()
            .filter(|r| r["bytes_down"].as_u64().unwrap_or(0) > 0)
            .count()
    };
    // Served through this agent before it goes.
    let settle = |w: &World| {
        let before = relayed(w);
        wait_until(
            "connections relayed by the new agent",
            Duration::from_secs(10),
            || relayed(w) >= before + 5,
        )
        .unwrap();
    };
    settle(&w);
    for _ in 0..3 {
        // As `systemctl restart` does: stop (SIGTERM, drain), then start.
        assert!(w.sigterm(Duration::from_secs(20)).success());
        w.start_agent(false);
        settle(&w);
    }
    std::fs::write(&stop, "").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let tally: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    eprintln!("connect loop: {tally}");
    let served = tally["served"].as_u64().unwrap() as usize;
    // The gaps were hit: connects refused while no agent listened.
    assert!(tally["refused"].as_u64().unwrap() > 0, "{tally}");
    assert_eq!(tally["other"], serde_json::json!([]), "{tally}");
    // Every response came through phigate: one record per relayed connection, and
    // the upstream accepted no connection besides phigate's.
    assert!(w.sigterm(Duration::from_secs(20)).success());
    let relayed = relayed(&w);
    assert_eq!(served, relayed, "responses not on record: {tally}");
    assert_eq!(
        up.connections() as usize,
        relayed,
        "the upstream saw connections phigate did not relay: {tally}"
    );
}
