//! `cargo xtask <task>`: everything a fresh machine needs, in one place.
//!
//! - `setup`: install what building and testing need (idempotent; prints each step).
//! - `check`: fmt, clippy, cargo deny, unit tests: the lane that needs no root.
//! - `test`:  setup, the checks, build, every test (what `.ci/run` runs).
//! - `demo`:  setup, build, then a guided run of phigate on a demo API.
//! - `bench`: side-by-side figures (`bench proxy`, `bench mask`).
//! - `fuzz`:  the cargo-fuzz targets, each for a bounded time.
//! - `soak`:  the long hardening suites (load, faults, hostile input, fuzzing).
//! - `fhir-table`: regenerate the masker's FHIR R4 element table from the official definitions.
//! - `systemd-root`: the Debian tree the systemd test boots (made by `test` too).

mod bench;
mod demo;
mod fhir_table;
mod fuzz;
mod layers;
mod setup;
mod soak;
mod systemd;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "phigate project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain parts and packages building and testing need (idempotent).
    Setup,
    /// fmt, the module layers, clippy, cargo deny and the unit tests; needs no root.
    Check,
    /// Only the structure check: module layers and function sizes (xtask/src/layers.rs).
    Layers,
    /// Run every check and test of the project (needs root: eBPF, netns, cgroups).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Build and run the guided demo on a local demo API.
    Demo,
    /// Build the Debian package (target/debian/phigate_*.deb) with cargo-deb.
    Package,
    /// Make the Debian tree the systemd test boots (target/systemd-root), if missing.
    SystemdRoot,
    /// Benchmarks, printed side by side with a peer in the same run.
    Bench {
        /// Which benchmark: `proxy`, `records`, `policy`, `mask`; `guard` is the
        /// short phigate/nginx ratio check `cargo xtask test` runs.
        name: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// The long hardening suites: load, faults, hostile input, every fuzz target.
    Soak {
        /// Seconds of load, and per fuzz target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Concurrent keep-alive clients in the load suite.
        #[arg(long, default_value_t = 1000)]
        clients: u64,
    },
    /// Regenerate the FHIR R4 element table (agent/mask/src/fhir/r4.table) from the
    /// official StructureDefinitions (npm package, see xtask/src/fhir_table.rs).
    FhirTable {
        /// An unpacked package directory instead of `npm pack`.
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
    /// Run the fuzz targets (fuzz/, cargo-fuzz, nightly) for a bounded time each.
    Fuzz {
        /// One target (`mask_json`, `json_path`, `config`, `policy`, `journal`,
        /// `verify`); default: all.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

/// libFuzzer seed for the short fuzz runs in `cargo xtask test`.
const CI_FUZZ_SEED: u32 = 20261123;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.task {
        Task::Setup => setup::run(),
        Task::Check => setup::toolchain().and_then(|_| check()),
        Task::Layers => layers::check(&util::root_dir()),
        Task::Test { filter } => setup::run().and_then(|_| test(filter.as_deref())),
        Task::Demo => setup::run().and_then(|_| demo::run()),
        Task::Package => {
            setup::run().and_then(|_| package().map(|deb| println!("{}", deb.display())))
        }
        Task::SystemdRoot => {
            setup::run().and_then(|_| systemd::prepare().map(|dir| println!("{}", dir.display())))
        }
        // The guard runs inside `cargo xtask test`, after its setup.
        Task::Bench { name, duration } if name == "guard" => bench::run(&name, duration),
        Task::Bench { name, duration } => setup::run().and_then(|_| bench::run(&name, duration)),
        Task::Soak { secs, clients } => setup::run().and_then(|_| soak::run(secs, clients)),
        Task::FhirTable { from } => fhir_table::run(&util::root_dir(), from),
        Task::Fuzz { target, secs } => {
            setup::run().and_then(|_| fuzz::run(target.as_deref(), secs, fuzz::Mode::EXPLORE))
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the release binary and the .deb; returns the package's path.
fn package() -> anyhow::Result<std::path::PathBuf> {
    util::cargo(&["build", "--release", "-p", "phigate"], &[])?;
    deb_of_built_binary()
}

/// The .deb of the release binary as built; returns the package's path.
fn deb_of_built_binary() -> anyhow::Result<std::path::PathBuf> {
    use util::{cargo, root_dir};
    cargo(&["deb", "-p", "phigate", "--no-build", "--no-strip"], &[])?;
    let dir = root_dir().join("target/debian");
    let mut debs: Vec<_> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop()
        .ok_or_else(|| anyhow::anyhow!("cargo deb made no package in {}", dir.display()))
}

/// Runs one named step of a lane and notes its time and result for the summary.
type StepRunner<'a> =
    dyn FnMut(&str, &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> + 'a;

/// The static checks, shared by `check` and `test`.
fn static_checks(run: &mut StepRunner<'_>) -> anyhow::Result<()> {
    use util::cargo;
    run("cargo fmt --check", &mut || {
        cargo(&["fmt", "--all", "--", "--check"], &[])
    })?;
    run("module layers, function sizes", &mut || {
        layers::check(&util::root_dir())
    })?;
    run("cargo clippy -D warnings", &mut || {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
    })?;
    run(
        "Kubernetes manifests (kubernetes-validate --strict)",
        &mut || kubernetes_manifests(&util::root_dir()),
    )?;
    // Licenses, banned crates, sources (deny.toml). Advisories need the RustSec
    // database, which these machines cannot fetch: see deny.toml.
    run("cargo deny check", &mut || {
        cargo(&["deny", "check", "bans", "licenses", "sources"], &[])
    })
}

/// packaging/kubernetes/*.yaml against the Kubernetes API schemas (kubernetes-validate,
/// from PyPI, installed by `cargo xtask setup`): strict, so a misspelt or misplaced
/// field is an error rather than silently dropped by the API server.
fn kubernetes_manifests(root: &std::path::Path) -> anyhow::Result<()> {
    let dir = root.join("packaging/kubernetes");
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    util::exec(
        std::process::Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "--no-warn"])
            .args(&files),
    )
}

/// The crates whose unit tests need no root.
const UNIT_TESTED: [&str; 8] = [
    "-p",
    "phigate",
    "-p",
    "phigate-mask",
    "-p",
    "phigate-record",
    "-p",
    "phigate-common",
];

/// `cargo xtask check`: what a contributor without root can run.
fn check() -> anyhow::Result<()> {
    use util::{cargo, step};
    let mut summary = Vec::new();
    let mut run = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let t = std::time::Instant::now();
        let r = step(name, f);
        summary.push((name.to_owned(), t.elapsed(), r.is_ok()));
        r
    };
    let result = static_checks(&mut run).and_then(|_| {
        run("unit tests", &mut || {
            let mut args = vec!["test"];
            args.extend(UNIT_TESTED);
            cargo(&args, &[])
        })
    });
    print_summary(&summary);
    result
}

fn print_summary(summary: &[(String, std::time::Duration, bool)]) {
    println!("\n== summary");
    for (name, d, ok) in summary {
        println!(
            "  {} {:<28} {:>6.1}s",
            if *ok { "ok  " } else { "FAIL" },
            name,
            d.as_secs_f64()
        );
    }
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    use util::{cargo, root_dir, step};
    util::require_root("the tests load eBPF programs and create network namespaces and cgroups")?;
    util::ensure_bpffs()?;
    let root = root_dir();
    let mut summary = Vec::new();
    let mut run = |name: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let t = std::time::Instant::now();
        let r = step(name, f);
        summary.push((name.to_owned(), t.elapsed(), r.is_ok()));
        r
    };
    let result = (|| {
        static_checks(&mut run)?;
        // The agent with the end-to-end tests' crate, in one feature resolution:
        // `cargo test -p phigate-e2e` then reuses this build of the agent rather
        // than compiling it again with the features its own dependencies unify.
        run("cargo build --release", &mut || {
            cargo(
                &["build", "--release", "-p", "phigate", "-p", "phigate-e2e"],
                &[],
            )
        })?;
        let bin = root.join("target/release/phigate");
        let bin = bin.to_str().expect("utf-8 path").to_owned();
        run("unit tests", &mut || {
            // Library and test targets; examples are checked by clippy, and there
            // are no doctests to link.
            let mut args = vec!["test", "--release"];
            args.extend(UNIT_TESTED);
            args.extend(["--lib", "--tests"]);
            if let Some(f) = filter {
                args.push(f);
            }
            cargo(&args, &[])
        })?;
        // A brief run of the masker's and the path parser's fuzz targets, from a
        // fixed seed so a commit passes or fails the same way every time, without
        // ASan (longer runs with fresh seeds and ASan: `cargo xtask fuzz`, `soak`).
        run("fuzz mask_json, json_path (20 s each)", &mut || {
            let ci = fuzz::Mode {
                seed: Some(CI_FUZZ_SEED),
                asan: false,
            };
            fuzz::run(Some("mask_json"), 20, ci)?;
            fuzz::run(Some("json_path"), 20, ci)
        })?;
        let mut deb = String::new();
        run("Debian package of that build", &mut || {
            deb = deb_of_built_binary()?.display().to_string();
            Ok(())
        })?;
        let mut systemd_root = String::new();
        run("Debian tree for the systemd test", &mut || {
            systemd_root = systemd::prepare()?.display().to_string();
            Ok(())
        })?;
        run("end-to-end tests", &mut || {
            // Every failing test of every binary, not just the first binary's.
            let mut args = vec![
                "test",
                "--release",
                "--no-fail-fast",
                "-p",
                "phigate-e2e",
                "--",
            ];
            if let Some(f) = filter {
                args.push(f);
            }
            args.extend(["--test-threads", "2"]);
            cargo(
                &args,
                &[
                    ("PHIGATE_BIN", bin.as_str()),
                    ("PHIGATE_DEB", deb.as_str()),
                    ("PHIGATE_SYSTEMD_ROOT", systemd_root.as_str()),
                ],
            )
        })?;
        // A short side-by-side run against nginx: a throughput regression fails the
        // suite instead of going unnoticed. Skipped when only some tests were asked
        // for.
        if filter.is_none() {
            run("performance guard (1 KB keep-alive vs nginx)", &mut || {
                util::exec(std::process::Command::new(std::env::current_exe()?).args([
                    "bench",
                    "guard",
                    "--duration",
                    "15",
                ]))
            })?;
        }
        Ok(())
    })();
    print_summary(&summary);
    result
}
