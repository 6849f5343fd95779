//! Observability through the real redirect: Prometheus metrics scraped from
//! `[admin] metrics_listen` with curl after real traffic, and `phigate status`.

use std::collections::BTreeMap;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const METRICS: &str = "127.0.0.1:9464";

/// One sample line of the exposition text: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses OpenMetrics text; a malformed sample line fails the test.
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value ({e}): {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let mut labels = BTreeMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label: {line}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label: {line}"));
                    labels.insert(k.to_owned(), v.to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        out.push((name, labels, value));
    }
    assert!(text.ends_with("# EOF\n"), "no EOF marker");
    out
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn metrics_scrape_and_status_report_real_traffic() {
    let mut w = World::new("metrics");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    w.write_policies(&[(
        "a.cedar",
        "@id(\"json\")\npermit (principal, action, resource) when { context.path == \"/json\" };\n",
    )]);
    let base = w.agent_section("").replace(
        "[admin]\n",
        &format!("[admin]\nmetrics_listen = \"{METRICS}\"\n"),
    );
    w.write_config(&format!(
        "{base}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.path("state/ca.pem");
    let get = |path: &str| -> u16 {
        curl_status(&w, &ca, &[], &format!("https://{UP}{path}"))
            .trim()
            .parse()
            .unwrap_or(0)
    };
    for _ in 0..3 {
        assert_eq!(get("/json"), 200);
    }
    for _ in 0..2 {
        assert_eq!(get("/headers"), 403);
    }
    let scrape = || scrape_metrics(&w, METRICS);
    // Connection rows are counted when the connection ends; curl has closed.
    let mut samples = Vec::new();
    wait_until(
        "5 connections in the metrics",
        Duration::from_secs(10),
        || {
            samples = parse(&scrape());
            value(
                &samples,
                "phigate_connections_total",
                &[("destination", "patients-api")],
            ) >= 5.0
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {samples:?}"));

    let req = |decision: &str| {
        value(
            &samples,
            "phigate_requests_total",
            &[("destination", "patients-api"), ("decision", decision)],
        )
    };
    assert_eq!(req("allow"), 3.0);
    assert_eq!(req("deny"), 2.0);
    for stage in ["tls_handshake", "upstream", "record_durable"] {
        let n = value(
            &samples,
            "phigate_stage_duration_seconds_count",
            &[("stage", stage)],
        );
        assert!(n >= 3.0, "stage {stage}: {n}");
    }
    // Sampled at scrape: the policy set in force, the journal, the eBPF maps.
    let policy_hash = samples
        .iter()
        .find(|(n, _, _)| n == "phigate_policy_set_info")
        .map(|(_, l, _)| l["hash"].clone())
        .expect("policy_set_info");
    assert_eq!(value(&samples, "phigate_policies", &[]), 1.0);
    assert!(value(&samples, "phigate_journal_entries", &[]) >= 10.0);
    assert_eq!(value(&samples, "phigate_records_writable", &[]), 1.0);
    assert!(
        value(
            &samples,
            "phigate_ebpf_map_entries",
            &[("name", "dests_v4")]
        ) >= 1.0
    );

    // A reload is counted by outcome.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(w.agent_pid() as i32, libc::SIGHUP) };
    wait_until("the reload to be counted", Duration::from_secs(10), || {
        samples = parse(&scrape());
        value(
            &samples,
            "phigate_reloads_total",
            &[("kind", "policy"), ("outcome", "ok")],
        ) == 1.0
    })
    .unwrap();
    let out = output(
        w.outside(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{METRICS}/other"),
        ],
    );
    assert_eq!(stdout(&out), "404");

    // phigate status over the admin socket agrees.
    let bin = phigate_bin();
    let config = w.config_path();
    let out = output(
        w.outside(),
        &[
            bin.to_str().unwrap(),
            "status",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "status: {}", stderr(&out));
    let s: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(s["destinations"][0]["name"], "patients-api");
    assert_eq!(s["destinations"][0]["addresses"][0], UP);
    assert_eq!(s["policy_set_hash"], policy_hash.as_str());
    assert_eq!(s["counters"]["requests_allow"], 3);
    assert_eq!(s["counters"]["requests_deny"], 2);
    assert_eq!(s["records"]["durability"], "strict");
    assert!(s["cgroup"].as_str().unwrap().contains(&w.cgroup.relative()));
    let human = output(
        w.outside(),
        &[
            bin.to_str().unwrap(),
            "status",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let text = stdout(&human);
    assert!(
        text.contains("patients-api") && text.contains("pending"),
        "{text}"
    );
}
