//! Empty on purpose: the programs are the `phigate-ebpf` binary target (src/main.rs),
//! built for bpfel-unknown-none by `agent/build.rs`. This library target only lets the
//! agent build-depend on the package.
#![no_std]
