//! Removing pinned links: [`detach_pinned`] (`phigate detach`) detaches and unpins
//! phigate's links and removes its pinned maps; a restart replaces the previous
//! instance's links one by one ([`detach_and_remove`]). Through raw bpf(2), because
//! aya 0.14 cannot force-detach a link.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};

use super::load::{CAPS_HINT, MAPS_SUBDIR, PROGRAMS};

/// What [`detach_pinned`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DetachReport {
    /// Pinned links that were detached and removed, then pinned maps and directories.
    pub(crate) removed: Vec<PathBuf>,
}

// --- raw bpf(2) for pinned links: aya 0.14 cannot force-detach a link ----------------

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised 128-byte bpf_attr owned by the caller.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64; // pathname; bpf_fd and file_flags stay 0
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the pinned link at `path` (even if some process still holds it) and
/// removes the pin. Pins that are not links (or already gone) are just removed.
pub(super) fn detach_and_remove(path: &Path) -> anyhow::Result<()> {
    match obj_get(path) {
        Ok(fd) => {
            let mut attr = [0u64; 16];
            attr[0] = fd.as_raw_fd() as u64; // link_detach.link_fd
            match sys_bpf(BPF_LINK_DETACH, &mut attr) {
                Ok(_) => {}
                // Not a link (EINVAL), or a link type without detach (EOPNOTSUPP):
                // removing the pin below releases it.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    bail!("detaching {} failed: {e} — {CAPS_HINT}", path.display())
                }
                Err(e) => bail!("detaching {} failed: {e}", path.display()),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            bail!(
                "opening pinned object {} failed: {e} — {CAPS_HINT}",
                path.display()
            )
        }
        // Not a bpf object: just remove it below.
        Err(_) => {}
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("cannot remove {}: {e}", path.display())),
    }
}

/// Detaches and unpins every phigate link under `pin_dir`: for the cgroup `cgroup` only,
/// or for all cgroups when None. The pinned connection-state maps and the directories
/// are removed too. Afterwards nothing of phigate stays attached to those cgroups.
pub(crate) fn detach_pinned(pin_dir: &Path, cgroup: Option<&Path>) -> anyhow::Result<DetachReport> {
    let mut report = DetachReport::default();
    let dirs: Vec<PathBuf> = match cgroup {
        Some(cg) => {
            let inode = fs::metadata(cg)
                .with_context(|| format!("cgroup directory {} does not exist", cg.display()))?
                .ino();
            vec![pin_dir.join(format!("cg{inode}"))]
        }
        None => match fs::read_dir(pin_dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .filter(|e| {
                    e.file_name().to_str().is_some_and(|n| {
                        n.strip_prefix("cg")
                            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                    })
                })
                .map(|e| e.path())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(anyhow!("cannot read {}: {e}", pin_dir.display())),
        },
    };
    for dir in dirs {
        if !dir.is_dir() {
            continue;
        }
        // Links first (the connect hooks first of all), then the maps.
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| !p.is_dir())
            .collect();
        let order = |p: &PathBuf| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            PROGRAMS
                .iter()
                .rev()
                .position(|(n, _)| *n == name)
                .unwrap_or(PROGRAMS.len())
        };
        files.sort_by_key(order);
        for f in files {
            detach_and_remove(&f)?;
            report.removed.push(f);
        }
        let maps_dir = dir.join(MAPS_SUBDIR);
        if maps_dir.is_dir() {
            for e in fs::read_dir(&maps_dir)
                .with_context(|| format!("cannot read {}", maps_dir.display()))?
                .filter_map(Result::ok)
            {
                let p = e.path();
                fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
                report.removed.push(p);
            }
            fs::remove_dir(&maps_dir)
                .with_context(|| format!("cannot remove {}", maps_dir.display()))?;
        }
        fs::remove_dir(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        report.removed.push(dir);
    }
    Ok(report)
}
