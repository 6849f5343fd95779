//! Start-up checks that turn kernel errors into messages naming the problem and the fix.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use crate::redirect::cgroup2_root;

/// Linux capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("missing capabilities: {missing}. phigate loads eBPF programs into cgroups and marks its sockets; run it as root (e.g. `sudo phigate run ...`) or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (the systemd unit does)")]
    Capabilities { missing: String },
    #[error("no cgroup v2 filesystem is mounted (looked for a cgroup2 entry in /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1")]
    NoCgroup2,
    #[error("cgroup directory {0} does not exist; create it (`mkdir {0}`) or set [agent] cgroup to an existing cgroup v2 directory")]
    CgroupMissing(PathBuf),
    #[error("{0} is not a directory on a cgroup v2 filesystem (cgroup2 is mounted at {1}); set [agent] cgroup to a directory below it")]
    NotCgroup2(PathBuf, PathBuf),
}

/// Effective capability bits of this process.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Checks the capabilities attaching cgroup programs and marking sockets need.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let caps = effective_caps();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_SYS_ADMIN) {
        // Needed to mount bpffs and to pin links there.
        missing.push("CAP_SYS_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        })
    }
}

/// Resolves the cgroup the programs attach to: the configured one, checked, or the
/// cgroup2 root.
pub fn resolve_cgroup(configured: Option<&Path>) -> Result<PathBuf, PreflightError> {
    let root = cgroup2_root().map_err(|_| PreflightError::NoCgroup2)?;
    let Some(dir) = configured else {
        return Ok(root);
    };
    if !dir.exists() {
        return Err(PreflightError::CgroupMissing(dir.to_owned()));
    }
    let on_cgroup2 = nix::sys::statfs::statfs(dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !dir.is_dir() || !on_cgroup2 {
        return Err(PreflightError::NotCgroup2(dir.to_owned(), root));
    }
    Ok(dir.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_wrong_cgroup_dirs_are_named() {
        if cgroup2_root().is_err() {
            return; // no cgroup2 on this machine: covered by NoCgroup2
        }
        let e = resolve_cgroup(Some(Path::new("/nonexistent/cg"))).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/cg does not exist"),
            "{e}"
        );
        let e = resolve_cgroup(Some(Path::new("/tmp"))).unwrap_err();
        assert!(
            e.to_string()
                .contains("/tmp is not a directory on a cgroup v2"),
            "{e}"
        );
        assert!(resolve_cgroup(None).is_ok());
    }
}
