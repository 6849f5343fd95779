//! `cargo xtask fuzz [TARGET] [--secs N]`: runs the cargo-fuzz targets in fuzz/ for a
//! bounded time each, starting from the committed corpus. New inputs go to a scratch
//! directory (the committed corpus only changes when someone minimizes and commits
//! it, see docs/fuzzing.md); a crash fails the run and leaves its input in
//! fuzz/artifacts/TARGET/.

use std::process::Command;

use anyhow::bail;

use crate::util::{exec, root_dir};

/// Targets that fuzz the agent crate itself (feature `agent` of fuzz/Cargo.toml);
/// the others need only the masking crate.
const AGENT_TARGETS: [&str; 4] = ["config", "policy", "journal", "verify"];

/// Every target, in fuzz/Cargo.toml.
pub const TARGETS: [&str; 6] = [
    "mask_json",
    "json_path",
    "config",
    "policy",
    "journal",
    "verify",
];

/// How a run is built and seeded.
#[derive(Clone, Copy)]
pub struct Mode {
    /// libFuzzer's seed; `None` lets it pick one. `cargo xtask test` passes a fixed
    /// seed so that a CI run is reproducible: a crash still fails it, and the same
    /// commit fails the same way on the next run.
    pub seed: Option<u32>,
    /// AddressSanitizer. Off for the short CI runs: the masker and the path parser
    /// are safe Rust but for one `from_utf8_unchecked` on bytes checked to be ASCII,
    /// and the instrumented build is the slowest step of `cargo xtask test`.
    pub asan: bool,
}

impl Mode {
    /// Long runs: fresh seeds, AddressSanitizer.
    pub const EXPLORE: Mode = Mode {
        seed: None,
        asan: true,
    };
}

pub fn run(target: Option<&str>, secs: u64, mode: Mode) -> anyhow::Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!(
            "no fuzz target `{t}`; the targets are {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    let fuzz_dir = root_dir().join("fuzz");
    for t in targets {
        let scratch = tempfile::tempdir()?;
        let corpus = fuzz_dir.join("corpus").join(t);
        println!("== fuzz {t}: {secs} s from {}", corpus.display());
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", "-O"])
            .args(if mode.asan {
                &[][..]
            } else {
                &["--sanitizer", "none"][..]
            })
            .args(if AGENT_TARGETS.contains(&t) {
                &["--features", "agent"][..]
            } else {
                &[][..]
            })
            .arg(t)
            .arg(scratch.path())
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={secs}"),
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ]);
        if let Some(seed) = mode.seed {
            cmd.arg(format!("-seed={seed}"));
        }
        exec(&mut cmd)?;
    }
    Ok(())
}
