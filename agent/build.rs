//! Builds the eBPF programs in `agent-ebpf` for bpfel-unknown-none (nightly, build-std)
//! so that a plain `cargo build` produces an agent with its programs embedded.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Read at run time: `env!` would bake in the directory this script was first
    // compiled in, and a reused target directory would build another checkout's eBPF.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let metadata = std::path::Path::new(&manifest_dir).join("../agent-ebpf");
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
