//! Who is calling: the workload identity the kernel attested at connect time
//! ([`Attested`]), enriched from /proc and the cgroup filesystem.
//!
//! The kernel facts (pid, uid, gid, comm, cgroup id) cannot be forged by the caller.
//! The enrichment (executable, its hash, supplementary groups) reads /proc after
//! accept, and only for the very process that connected: the thread group `pid` whose
//! start time (which no process can change) is before the connect. A pid reused
//! since, or a process gone, leaves those facts unknown; names a process can set
//! (comm, thread names) play no part. Unknown facts are listed in
//! [`Workload::unknown`], in the records and to policies (`principal.unknown`), so a
//! policy can require them.
//!
//! Hashing an executable is bounded: files over [`EXE_HASH_MAX_BYTES`] are not hashed,
//! a hash takes at most [`EXE_HASH_TIME_LIMIT`], one executable is hashed once at a
//! time (others wait for that result), and results are cached by (device, inode,
//! ctime, size): ctime changes on every write and cannot be set back by the owner.

pub mod container;
pub mod oidc;
pub mod runtime;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::redirect::Attested;

/// The calling workload, as recorded and as policies see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Login name of `uid`, when the host's user database has one.
    pub user: Option<String>,
    pub gid: u32,
    /// Supplementary groups of the process at accept time.
    pub groups: Vec<u32>,
    pub comm: String,
    pub cgroup_id: u64,
    /// Path relative to the cgroup2 root, starting with `/`.
    pub cgroup_path: Option<String>,
    /// The systemd unit owning the cgroup (`foo.service`, `session-3.scope`).
    pub systemd_unit: Option<String>,
    /// The container the process runs in, from its cgroup path
    /// ([`container::from_cgroup_path`]): the runtime's id, the runtime, and the
    /// Kubernetes pod's UID.
    pub container_id: Option<String>,
    pub container_runtime: Option<String>,
    pub pod_uid: Option<String>,
    /// From the runtime's own state on the host ([`runtime::RuntimeState`]): the
    /// Kubernetes pod's namespace and name, and the container's image.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_image: Option<String>,
    pub exe_path: Option<String>,
    /// SHA-256 of the executable the process runs (read through /proc/PID/exe, so a
    /// replaced file on disk does not fool it).
    pub exe_sha256: Option<String>,
    /// Facts that could not be established for this caller (`exe`, `exe_sha256`,
    /// `groups`, `cgroup`), and so are empty: policies see them as
    /// `principal.unknown` and can require them.
    #[serde(rename = "identity_unknown")]
    pub unknown: Vec<&'static str>,
}

/// Executables larger than this are not hashed (`exe_sha256` unknown). Large enough
/// for binaries with debug info (phigate's own release build is ~300 MB); the time
/// limit bounds what hashing one can cost.
pub const EXE_HASH_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// A hash taking longer than this is abandoned (`exe_sha256` unknown).
pub const EXE_HASH_TIME_LIMIT: Duration = Duration::from_secs(2);

/// (device, inode, ctime seconds, ctime nanoseconds, size) of an executable.
type ExeKey = (u64, u64, i64, i64, u64);

/// Enriches attested identities; caches the expensive parts (exe hashes, cgroup
/// paths, user names). Blocking: call from `spawn_blocking`.
pub struct IdentityResolver {
    cgroup_root: PathBuf,
    /// Executable -> its SHA-256.
    exe_hashes: Mutex<LruCache<ExeKey, String>>,
    /// Executables being hashed now, and a condvar for those waiting on them.
    hashing: (Mutex<HashSet<ExeKey>>, Condvar),
    cgroup_paths: Mutex<LruCache<u64, String>>,
    users: Mutex<HashMap<u32, Option<String>>>,
    runtimes: runtime::RuntimeState,
}

impl IdentityResolver {
    /// `cgroup_root`: the cgroup2 mount; the runtimes' state is read under `/`.
    pub fn new(cgroup_root: PathBuf) -> Self {
        Self::with_runtime_root(cgroup_root, PathBuf::from("/"))
    }

    /// As [`IdentityResolver::new`], reading the container runtimes' state under
    /// `runtime_root` (a directory laid out like `/`, in tests).
    pub fn with_runtime_root(cgroup_root: PathBuf, runtime_root: PathBuf) -> Self {
        let cap = std::num::NonZeroUsize::new(1024).expect("non-zero");
        IdentityResolver {
            cgroup_root,
            exe_hashes: Mutex::new(LruCache::new(cap)),
            hashing: (Mutex::new(HashSet::new()), Condvar::new()),
            cgroup_paths: Mutex::new(LruCache::new(cap)),
            users: Mutex::new(HashMap::new()),
            runtimes: runtime::RuntimeState::new(runtime_root),
        }
    }

    pub fn resolve(&self, a: &Attested) -> Workload {
        let mut w = Workload {
            pid: a.pid,
            tid: a.tid,
            uid: a.uid,
            gid: a.gid,
            comm: a.comm.clone(),
            cgroup_id: a.cgroup_id,
            user: self.user_name(a.uid),
            ..Workload::default()
        };
        w.cgroup_path = self.cgroup_path(a.pid, a.cgroup_id);
        w.systemd_unit = w.cgroup_path.as_deref().and_then(systemd_unit);
        if let Some(c) = w
            .cgroup_path
            .as_deref()
            .and_then(container::from_cgroup_path)
        {
            let facts = self.runtimes.facts(&c);
            w.pod_namespace = facts.pod_namespace;
            w.pod_name = facts.pod_name;
            w.container_image = facts.image;
            w.container_id = Some(c.id);
            w.container_runtime = Some(c.runtime.to_owned());
            w.pod_uid = c.pod_uid;
        }
        if w.cgroup_path.is_none() {
            w.unknown.push("cgroup");
        }

        let proc_dir = PathBuf::from(format!("/proc/{}", a.pid));
        // The same process still? Its start time cannot be changed by it, and a pid
        // reused after the connect belongs to a process that started after it.
        if started_before(&proc_dir, a.connect_boot_ns) {
            w.exe_path = std::fs::read_link(proc_dir.join("exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            w.exe_sha256 = self.exe_hash(&proc_dir.join("exe"));
            w.groups = read_groups(&proc_dir.join("status")).unwrap_or_else(|| {
                w.unknown.push("groups");
                Vec::new()
            });
        } else {
            w.unknown.push("groups");
        }
        if w.exe_path.is_none() {
            w.unknown.push("exe");
        }
        if w.exe_sha256.is_none() {
            w.unknown.push("exe_sha256");
        }
        w
    }

    /// The container `pid` runs in and what its runtime says of it (for `status`:
    /// the process named is one the agent found in a served namespace).
    pub fn container_of(&self, pid: u32) -> Option<(container::Container, runtime::RuntimeFacts)> {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
        let c = container::from_cgroup_path(path)?;
        let facts = self.runtimes.facts(&c);
        Some((c, facts))
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    /// The executable's SHA-256, or None when it is too large, too slow to read, or
    /// unreadable. Concurrent callers for one executable share one computation.
    fn exe_hash(&self, exe: &Path) -> Option<String> {
        let f = File::open(exe).ok()?;
        let m = f.metadata().ok()?;
        if m.size() > EXE_HASH_MAX_BYTES {
            return None;
        }
        let key = (m.dev(), m.ino(), m.ctime(), m.ctime_nsec(), m.size());
        let deadline = Instant::now() + EXE_HASH_TIME_LIMIT;
        let (in_flight, done) = &self.hashing;
        {
            let mut busy = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(h) = self.cached_hash(&key) {
                    return Some(h);
                }
                if busy.insert(key) {
                    break;
                }
                // Another task hashes this file: wait for it, within the bound.
                let left = deadline.checked_duration_since(Instant::now())?;
                busy = done
                    .wait_timeout(busy, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let h = hash_file(f, deadline);
        if let Some(h) = &h {
            self.exe_hashes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(key, h.clone());
        }
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        done.notify_all();
        h
    }

    fn cached_hash(&self, key: &ExeKey) -> Option<String> {
        self.exe_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// The cgroup path for `cgroup_id` (the cgroup directory's inode number). Tries the
    /// process's /proc/PID/cgroup first (cheap), checking the inode, then a bounded walk.
    fn cgroup_path(&self, pid: u32, cgroup_id: u64) -> Option<String> {
        if let Some(p) = self
            .cgroup_paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cgroup_id)
        {
            return Some(p.clone());
        }
        let found = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .filter(|rel| self.inode_of(rel) == Some(cgroup_id))
            .or_else(|| self.walk_for(cgroup_id))?;
        self.cgroup_paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(cgroup_id, found.clone());
        Some(found)
    }

    fn inode_of(&self, rel: &str) -> Option<u64> {
        std::fs::metadata(self.cgroup_root.join(rel.trim_start_matches('/')))
            .ok()
            .map(|m| m.ino())
    }

    fn walk_for(&self, cgroup_id: u64) -> Option<String> {
        let mut stack = vec![(self.cgroup_root.clone(), String::from("/"))];
        let mut visited = 0;
        while let Some((dir, rel)) = stack.pop() {
            visited += 1;
            if visited > 20_000 {
                return None;
            }
            if std::fs::metadata(&dir).ok()?.ino() == cgroup_id {
                return Some(rel);
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let child_rel = if rel == "/" {
                        format!("/{name}")
                    } else {
                        format!("{rel}/{name}")
                    };
                    stack.push((e.path(), child_rel));
                }
            }
        }
        None
    }
}

/// The systemd unit of a cgroup path: the innermost `.service` or `.scope` component.
pub fn systemd_unit(cgroup_path: &str) -> Option<String> {
    cgroup_path
        .split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_owned)
}

fn read_groups(status: &Path) -> Option<Vec<u32>> {
    std::fs::read_to_string(status).ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("Groups:").map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
    })
}

/// SHA-256 of `f`, or None if reading fails or passes `deadline`.
fn hash_file(mut f: File, deadline: Instant) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if Instant::now() > deadline {
            return None;
        }
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(hex::encode(hasher.finalize()))
}

/// Whether the process at `proc_dir` started no later than `boot_ns` (CLOCK_BOOTTIME).
/// /proc/PID/stat gives the start in clock ticks since boot (field 22), so the check
/// is exact to one tick: a pid reused within the same tick after a connect would pass,
/// which takes wrapping the whole pid space in 10 ms.
fn started_before(proc_dir: &Path, boot_ns: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    // rest starts at field 3 (state); starttime is field 22.
    let Some(ticks) = rest
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse::<u64>().ok())
    else {
        return false;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    ticks.saturating_mul(1_000_000_000 / hz) <= boot_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_from_cgroup_path() {
        assert_eq!(
            systemd_unit("/system.slice/billing-export.service").as_deref(),
            Some("billing-export.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-1000.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            systemd_unit("/system.slice/app.service/worker").as_deref(),
            Some("app.service")
        );
        assert_eq!(systemd_unit("/phigate-test"), None);
    }

    #[test]
    fn resolves_this_process() {
        let me = std::process::id();
        let comm = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let a = Attested {
            original_dst: "127.0.0.2:1".parse().unwrap(),
            dest_id: 0,
            pid: me,
            tid: me,
            uid,
            gid: nix::unistd::getgid().as_raw(),
            comm: comm.trim_end().to_owned(),
            cgroup_id: 0,
            socket_cookie: 0,
            connect_boot_ns: boot_ns(),
        };
        let r = IdentityResolver::new(PathBuf::from("/nonexistent"));
        let w = r.resolve(&a);
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(w.exe_path.as_deref(), Some(exe.to_str().unwrap()));
        let want = hex::encode(Sha256::digest(std::fs::read(&exe).unwrap()));
        assert_eq!(w.exe_sha256.as_deref(), Some(want.as_str()));
        if uid == 0 {
            assert_eq!(w.user.as_deref(), Some("root"));
        }
        assert!(!w.unknown.contains(&"exe_sha256"), "{:?}", w.unknown);
        // Another comm (prctl, a thread's name) changes nothing.
        let w2 = r.resolve(&Attested {
            comm: "renamed".into(),
            ..a.clone()
        });
        assert_eq!(w2.exe_sha256, w.exe_sha256);
        // A connect from before this process started (its pid reused since) leaves
        // the /proc facts unknown, and says so.
        let w = r.resolve(&Attested {
            connect_boot_ns: 1,
            ..a
        });
        assert_eq!(w.exe_path, None);
        assert_eq!(w.exe_sha256, None);
        assert_eq!(w.unknown, vec!["cgroup", "groups", "exe", "exe_sha256"]);
    }

    fn boot_ns() -> u64 {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid out-pointer.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
        assert_eq!(r, 0);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }

    #[test]
    fn exe_hashing_is_bounded_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("huge-sparse");
        let f = File::create(&big).unwrap();
        f.set_len(EXE_HASH_MAX_BYTES + 1).unwrap();
        let r = IdentityResolver::new(PathBuf::from("/nonexistent"));
        let t = Instant::now();
        assert_eq!(r.exe_hash(&big), None);
        assert!(t.elapsed() < Duration::from_millis(100));

        let small = dir.path().join("small");
        std::fs::write(&small, b"#!/bin/sh\n").unwrap();
        let want = hex::encode(Sha256::digest(b"#!/bin/sh\n"));
        let r = std::sync::Arc::new(r);
        let hashes: Vec<_> = (0..8)
            .map(|_| {
                let (r, small) = (r.clone(), small.clone());
                std::thread::spawn(move || r.exe_hash(&small))
            })
            .collect();
        for h in hashes {
            assert_eq!(h.join().unwrap().as_deref(), Some(want.as_str()));
        }
        // Rewriting the file changes its ctime: hashed anew.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&small, b"#!/bin/sh\nexit 1\n").unwrap();
        let again = r.exe_hash(&small).unwrap();
        assert_ne!(again, want);
    }
}
