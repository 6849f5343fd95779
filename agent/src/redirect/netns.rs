//! The network namespaces protected processes live in (containers): found by walking
//! the protected cgroup's subtree (`cgroup.procs`) and reading each process's
//! `/proc/PID/ns/net`, and reported by the programs (a protected connect from a
//! namespace with no agent listener) through a ring buffer.
//!
//! PIDs are the kernel's global ones (what the programs see): the agent reads /proc
//! in the host's PID namespace (`hostPID` in a Kubernetes DaemonSet).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use aya::maps::{MapData, RingBuf};
use phigate_common::NetnsEvent;
use tokio::io::unix::AsyncFd;

/// A network namespace, as the kernel names it in `/proc/PID/ns/net` (device and
/// inode of the nsfs file; `ip netns` and `lsns` show the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct NetnsId {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

impl NetnsId {
    fn of(meta: &fs::Metadata) -> NetnsId {
        NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// The agent's own network namespace.
pub(crate) fn own_netns() -> io::Result<NetnsId> {
    fs::metadata("/proc/self/ns/net").map(|m| NetnsId::of(&m))
}

/// Opens the network namespace of `pid` (to enter it with setns), with its id read
/// from the open file (so both name the same namespace even if the pid is reused).
pub(crate) fn open_netns(pid: u32) -> io::Result<(File, NetnsId)> {
    let file = File::open(format!("/proc/{pid}/ns/net"))?;
    let id = NetnsId::of(&file.metadata()?);
    Ok((file, id))
}

/// Every network namespace with a process in `cgroup` or below it, with one such
/// process each. Processes that exit while being looked at are skipped.
pub(crate) fn protected_netns(cgroup: &Path) -> BTreeMap<NetnsId, u32> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if let Ok(meta) = fs::metadata(format!("/proc/{pid}/ns/net")) {
                found.entry(NetnsId::of(&meta)).or_insert(pid);
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(e.path());
            }
        }
    }
    found
}

/// The programs' reports of unserved namespaces, read as they come.
pub(crate) struct NetnsEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl NetnsEvents {
    pub(crate) fn new(ring: RingBuf<MapData>) -> io::Result<NetnsEvents> {
        // SAFETY: the ring buffer owns its map fd, open and unchanged until the
        // AsyncFd (which owns the ring buffer) is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(NetnsEvents { ring })
    }

    /// Waits for reports and returns all there are (at least one).
    pub(crate) async fn next(&mut self) -> io::Result<Vec<NetnsEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut events = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<NetnsEvent>() {
                    // SAFETY: the item holds at least one NetnsEvent (repr(C), Copy, any
                    // bit pattern valid), read unaligned.
                    events.push(unsafe { item.as_ptr().cast::<NetnsEvent>().read_unaligned() });
                }
            }
            guard.clear_ready();
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_namespace_through_its_cgroup() {
        let cgroup_line = fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(rel) = cgroup_line.lines().find_map(|l| l.strip_prefix("0::")) else {
            return; // no cgroup2 membership to test with
        };
        let Ok(root) = crate::redirect::cgroup2_root() else {
            return;
        };
        let dir = root.join(rel.trim_start_matches('/'));
        let found = protected_netns(&dir);
        let me = own_netns().unwrap();
        assert!(found.contains_key(&me), "{found:?} lacks {me:?}");
        let (_, id) = open_netns(std::process::id()).unwrap();
        assert_eq!(id, me);
    }
}
