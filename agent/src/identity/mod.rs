//! Who is calling: the workload identity the kernel attested at connect time
//! ([`Attested`]), enriched from /proc and the cgroup filesystem.
//!
//! The kernel facts (pid, uid, gid, comm, cgroup id) cannot be forged by the caller.
//! The enrichment reads /proc after accept; if the process has meanwhile exited or
//! exec'd something else (its comm no longer matches), the /proc-derived fields are
//! left empty rather than attributed to the wrong program.

pub mod oidc;
pub mod token;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lru::LruCache;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::redirect::Attested;

/// The calling workload, as recorded and as policies see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
    pub exe_path: Option<String>,
    /// SHA-256 of the executable the process runs (read through /proc/PID/exe, so a
    /// replaced file on disk does not fool it).
    pub exe_sha256: Option<String>,
}

/// Enriches attested identities; caches the expensive parts (exe hashes, cgroup
/// paths, user names). Blocking: call from `spawn_blocking`.
pub struct IdentityResolver {
    cgroup_root: PathBuf,
    /// (dev, inode, mtime, size) of an executable -> its SHA-256.
    exe_hashes: Mutex<LruCache<(u64, u64, i64, u64), String>>,
    cgroup_paths: Mutex<LruCache<u64, String>>,
    users: Mutex<HashMap<u32, Option<String>>>,
}

impl IdentityResolver {
    pub fn new(cgroup_root: PathBuf) -> Self {
        let cap = std::num::NonZeroUsize::new(1024).expect("non-zero");
        IdentityResolver {
            cgroup_root,
            exe_hashes: Mutex::new(LruCache::new(cap)),
            cgroup_paths: Mutex::new(LruCache::new(cap)),
            users: Mutex::new(HashMap::new()),
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

        let proc_dir = PathBuf::from(format!("/proc/{}", a.pid));
        // Same process still? comm is what the kernel reported at connect time.
        let comm_now = std::fs::read_to_string(proc_dir.join("comm"))
            .map(|c| c.trim_end_matches('\n').to_owned())
            .ok();
        if comm_now.as_deref() == Some(a.comm.as_str()) {
            w.exe_path = std::fs::read_link(proc_dir.join("exe"))
                .ok()
                .map(|p| p.to_string_lossy().into_owned());
            w.exe_sha256 = self.exe_hash(&proc_dir.join("exe"));
            w.groups = read_groups(&proc_dir.join("status"));
        }
        w
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

    fn exe_hash(&self, exe: &Path) -> Option<String> {
        let mut f = File::open(exe).ok()?;
        let m = f.metadata().ok()?;
        let key = (m.dev(), m.ino(), m.mtime(), m.size());
        if let Some(h) = self
            .exe_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(h.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let h = hex::encode(hasher.finalize());
        self.exe_hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, h.clone());
        Some(h)
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

fn read_groups(status: &Path) -> Vec<u32> {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
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
        // A comm that does not match (pid reused, exec'd) leaves /proc fields empty.
        let w = r.resolve(&Attested {
            comm: "not-this-one".into(),
            ..a
        });
        assert_eq!(w.exe_path, None);
        assert_eq!(w.exe_sha256, None);
    }
}
