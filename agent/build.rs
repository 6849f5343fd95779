//! Builds the eBPF programs in `agent-ebpf` for bpfel-unknown-none (nightly, build-std)
//! so that a plain `cargo build` produces an agent with its programs embedded.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let root_dir = metadata
        .canonicalize()
        .context("agent-ebpf directory not found next to agent/")?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "phigate-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` (rust-src and bpf-linker for the nightly toolchain)")
}
