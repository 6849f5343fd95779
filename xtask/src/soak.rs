//! `cargo xtask soak [--secs N] [--clients N]`: the long versions of the hardening
//! suites (docs/reliability.md): the load test with 1,000 keep-alive clients and a
//! connection storm, the fault tests (agent SIGKILL under load, upstream down and
//! stalling, disk full, broken policy reload), the hostile-input tests, then every
//! fuzz target for a bounded time.

use crate::util::{cargo, root_dir};

/// e2e tests that inject faults or hostile input; run as they are in `test`.
const FAULT_TESTS: [(&str, &str); 11] = [
    // Faults under load (stretched by PHIGATE_SOAK_*) and unusable CA files.
    ("faults", ""),
    // Every hostile-input test (smuggling, slow clients, ClientHellos, paths, bodies).
    ("hostile", ""),
    ("records", "kill"),
    (
        "https",
        "a_full_records_disk_fails_closed_with_503_and_recovers",
    ),
    (
        "https",
        "a_slow_upstream_is_answered_504_within_the_request_timeout",
    ),
    ("https", "an_upstream_that_is_down_is_answered_502"),
    ("https", "oversize_headers_and_bodies_are_refused"),
    ("https", "non_http_bytes_inside_tls_are_closed_and_recorded"),
    (
        "https",
        "plain_bytes_on_an_https_destination_are_closed_and_recorded",
    ),
    (
        "policy",
        "hot_reload_applies_a_good_set_and_keeps_the_old_one_on_error",
    ),
    (
        "policy",
        "tokens_from_a_real_provider_decide_per_group_and_reason",
    ),
];

pub fn run(secs: u64, clients: u64) -> anyhow::Result<()> {
    crate::util::require_root("the suites load eBPF programs and create network namespaces")?;
    crate::util::ensure_bpffs()?;
    cargo(&["build", "--release", "-p", "phigate"], &[])?;
    let bin = root_dir().join("target/release/phigate");
    let bin = bin.to_str().expect("utf-8 path").to_owned();
    let (secs_s, clients_s) = (secs.to_string(), clients.to_string());
    let mut summary = Vec::new();
    let mut step = |name: String, r: anyhow::Result<()>| {
        println!(
            "== soak {name}: {}",
            if r.is_ok() { "ok" } else { "FAILED" }
        );
        summary.push((name, r.is_ok()));
    };
    let load = cargo(
        &[
            "test",
            "--release",
            "-p",
            "phigate-e2e",
            "--test",
            "load",
            "--",
            "--nocapture",
        ],
        &[
            ("PHIGATE_BIN", &bin),
            ("PHIGATE_SOAK_SECS", &secs_s),
            ("PHIGATE_SOAK_CLIENTS", &clients_s),
        ],
    );
    step(format!("load ({clients} clients, {secs} s)"), load);
    for (file, test) in FAULT_TESTS {
        let r = cargo(
            &[
                "test",
                "--release",
                "-p",
                "phigate-e2e",
                "--test",
                file,
                "--",
                test,
                "--nocapture",
            ],
            &[
                ("PHIGATE_BIN", &bin),
                ("PHIGATE_SOAK_SECS", &secs_s),
                ("PHIGATE_SOAK_CLIENTS", &clients_s),
            ],
        );
        step(format!("{file}::{test}"), r);
    }
    for t in crate::fuzz::TARGETS {
        step(
            format!("fuzz {t} ({secs} s)"),
            crate::fuzz::run(Some(t), secs, crate::fuzz::Mode::EXPLORE),
        );
    }
    println!("== soak summary");
    for (name, ok) in &summary {
        println!("  {}  {name}", if *ok { "ok    " } else { "FAILED" });
    }
    if summary.iter().any(|(_, ok)| !ok) {
        anyhow::bail!("some soak suites failed");
    }
    Ok(())
}
