//! `cargo xtask setup`: idempotent installation of what the build and the tests need.
//! Each step says whether it did something or found it done.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::util::{exec, output, require_root, root_dir, succeeds};

/// Debian packages the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "ca-certificates",
    "iproute2",
    "bpftool",
    "procps",
    "psmisc",
    "nginx-light",
    "wrk",
    "nodejs",
    // The reviewer console is tested in headless Chromium through its driver.
    "chromium",
    "chromium-driver",
    // The packaged unit runs under a real systemd in a container (tests/tests/systemd.rs).
    "systemd-container",
    "debootstrap",
    // Test clients that play the unprivileged attacker run as `nobody` under the
    // system Python (root's own Python is not theirs to read): its WebSocket client.
    "python3-websocket",
    // A real container runtime for tests/tests/podman.rs: Podman with runc (crun
    // fails on a hybrid cgroup layout), its monitor and network backend.
    "podman",
    "runc",
    "conmon",
    "netavark",
    // A real syslog receiver over TLS (imtcp with the gtls stream driver) for the
    // SIEM stream: tests/tests/siem.rs.
    "rsyslog",
    "rsyslog-gnutls",
];

/// Python modules (import name, pip name).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("requests", "requests"),
    ("duckdb", "duckdb"),
    // DuckDB hands TIMESTAMP WITH TIME ZONE values to Python through pytz.
    ("pytz", "pytz"),
    ("selenium", "selenium"),
    // A real WebSocket client for the upgrade tests.
    ("websocket", "websocket-client"),
    // A third-party synthetic FHIR R4 generator: the masking corpus (tests/tests/masking.rs).
    ("carebundle", "carebundle==0.5.0"),
    // A third-party FHIR model library that writes the corpus as FHIR XML (with lxml,
    // which also reads the masked XML back): tests/tests/masking.rs.
    ("fhir.resources", "fhir.resources==8.3.0"),
    ("lxml", "lxml==6.2.0"),
    // The Kubernetes manifests' schema check (`cargo xtask check` and `test`).
    ("kubernetes_validate", "kubernetes-validate==1.37.0"),
    // The official OTLP protobuf classes: the OTLP logs receiver of tests/tests/otlp.rs
    // decodes what phigate exports with them (no OpenTelemetry collector installs here).
    (
        "opentelemetry.proto.collector.logs.v1.logs_service_pb2",
        "opentelemetry-proto==1.39.1",
    ),
    // An S3 server that implements Object Lock (moto's server mode) and the client
    // that sets its buckets up and inspects retention: tests/tests/shipping.rs.
    ("moto.server", "moto[server]==5.2.1"),
    ("boto3", "boto3==1.43.11"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_FUZZ_VERSION: &str = "0.13.1";
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn run() -> anyhow::Result<()> {
    println!("== setup");
    toolchain()?;
    cargo_tool("cargo-deb", "deb", CARGO_DEB_VERSION)?;
    cargo_tool("cargo-fuzz", "fuzz", CARGO_FUZZ_VERSION)?;
    debian_packages()?;
    python_packages()?;
    node_packages()?;
    println!("== setup: done");
    Ok(())
}

/// What building and the checks without root need: the eBPF toolchain and
/// cargo-deny, all under the user's own rustup and cargo (no root).
pub fn toolchain() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_tool("cargo-deny", "deny", CARGO_DENY_VERSION)
}

fn say(what: &str, state: &str) {
    println!("[setup] {what}: {state}");
}

fn rust_src() -> anyhow::Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        say("nightly toolchain", "installing");
        exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    } else {
        say("nightly toolchain", "already installed");
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say("rust-src (nightly)", "already installed");
        return Ok(());
    }
    say("rust-src (nightly)", "installing");
    exec(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker linked against the nightly toolchain's own LLVM (a system LLVM of the
/// right version is not available here).
fn bpf_linker() -> anyhow::Result<()> {
    let version =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        say(
            "bpf-linker",
            &format!("already installed ({})", version.unwrap_or_default()),
        );
        return Ok(());
    }
    say(
        "bpf-linker",
        &format!("building {BPF_LINKER_VERSION} against nightly's LLVM (about a minute)"),
    );
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
            .context("cannot find the nightly sysroot")?;
    let lib = PathBuf::from(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .join(".local/phigate-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// A cargo subcommand from crates.io at a pinned version: cargo-deb (`cargo xtask
/// package`), cargo-fuzz (fuzz/), cargo-deny (the dependency checks).
fn cargo_tool(krate: &str, subcommand: &str, version: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("cargo").args([subcommand, "--version"]));
    if installed.as_deref().is_some_and(|v| v.contains(version)) {
        say(krate, &format!("already installed ({version})"));
        return Ok(());
    }
    say(krate, &format!("installing {version}"));
    exec(Command::new("cargo").args(["install", krate, "--version", version, "--locked"]))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.ends_with("install ok installed"))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        say("Debian packages", "already installed");
        return Ok(());
    }
    require_root("installing Debian packages")?;
    say(
        "Debian packages",
        &format!("installing {}", missing.join(" ")),
    );
    let install = |update: bool| -> anyhow::Result<()> {
        if update {
            exec(
                Command::new("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install(false).is_err() {
        install(true)?;
    }
    // nginx-light starts a default server on :80 when installed; the benchmarks run
    // their own instances and need nothing from it.
    let _ = Command::new("sh")
        .args(["-c", "nginx -s stop 2>/dev/null; true"])
        .status();
    Ok(())
}

fn python_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(import, _)| {
            !succeeds(Command::new("python3").args(["-c", &format!("import {import}")]))
        })
        .map(|(_, pip)| *pip)
        .collect();
    if missing.is_empty() {
        say("Python packages", "already installed");
        return Ok(());
    }
    say(
        "Python packages",
        &format!("installing {}", missing.join(" ")),
    );
    exec(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing),
    )
}

/// npm packages of the end-to-end tests (tests/node: an OIDC provider, the s3rver
/// S3-compatible object store), when that package exists.
fn node_packages() -> anyhow::Result<()> {
    let dir = root_dir().join("tests/node");
    if !dir.join("package.json").exists() {
        return Ok(());
    }
    // Every dependency present, not just some: a package added later installs too.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)?;
    let deps = manifest["dependencies"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if deps.keys().all(|name| {
        dir.join("node_modules")
            .join(name)
            .join("package.json")
            .exists()
    }) {
        say("npm packages (tests/node)", "already installed");
        return Ok(());
    }
    say("npm packages (tests/node)", "installing");
    let lock = dir.join("package-lock.json").exists();
    let status = Command::new("npm")
        .args(if lock {
            vec!["ci", "--no-audit", "--no-fund"]
        } else {
            vec!["install", "--no-audit", "--no-fund"]
        })
        .current_dir(&dir)
        .status()?;
    if !status.success() {
        bail!("npm install in {} failed", dir.display());
    }
    Ok(())
}
