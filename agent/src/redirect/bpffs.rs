//! The filesystems the redirect needs: the cgroup2 directory it attaches to, and the
//! bpf filesystem its links and maps are pinned in (mounted when missing).
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{MapInfo, MapType};
use phigate_common::{
    maps, ConnectInfo, ListenerKey, PeerKey, CONN_MAP_CAPACITY, NETNS_CAPACITY,
    OWN_SOCKETS_CAPACITY,
};

const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// A pinned shared map from another build whose layout differs cannot be reused:
/// unpin it (programs still using it keep it) so a fresh one is created.
pub(super) fn drop_incompatible_pinned_map(path: &Path, name: &str) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let (map_type, key_size, value_size, capacity) = match name {
        n if n == maps::BY_COOKIE => (
            MapType::Hash,
            size_of::<u64>(),
            size_of::<ConnectInfo>(),
            CONN_MAP_CAPACITY,
        ),
        n if n == maps::BY_PEER => (
            MapType::Hash,
            size_of::<PeerKey>(),
            size_of::<ConnectInfo>(),
            CONN_MAP_CAPACITY,
        ),
        n if n == maps::LISTENERS => (
            MapType::SockHash,
            size_of::<ListenerKey>(),
            size_of::<u32>(),
            2 * NETNS_CAPACITY,
        ),
        _ => (
            MapType::Hash,
            size_of::<u64>(),
            size_of::<u8>(),
            OWN_SOCKETS_CAPACITY,
        ),
    };
    let compatible = match MapInfo::from_pin(path) {
        Ok(info) => {
            info.map_type().is_ok_and(|t| t == map_type)
                && info.key_size() as usize == key_size
                && info.value_size() as usize == value_size
                && info.max_entries() == capacity
        }
        Err(_) => false,
    };
    if !compatible {
        tracing::warn!(path = %path.display(), "pinned map has another layout; starting a new one");
        fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

pub(super) fn check_cgroup_dir(cgroup: &Path) -> anyhow::Result<PathBuf> {
    let meta = match fs::metadata(cgroup) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("cgroup directory {} does not exist", cgroup.display())
        }
        Err(e) => bail!("cannot stat cgroup directory {}: {e}", cgroup.display()),
    };
    if !meta.is_dir() {
        bail!("cgroup {} is not a directory", cgroup.display());
    }
    let fs_type = nix::sys::statfs::statfs(cgroup)
        .with_context(|| format!("statfs {} failed", cgroup.display()))?
        .filesystem_type();
    if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        let root = cgroup2_root()
            .map(|r| format!(" (the cgroup2 hierarchy is mounted at {})", r.display()))
            .unwrap_or_default();
        bail!("{} is not on a cgroup2 filesystem{root}", cgroup.display());
    }
    cgroup
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", cgroup.display()))
}

/// Every mount: (mount point, filesystem type).
fn mounts() -> anyhow::Result<Vec<(PathBuf, String)>> {
    Ok(phigate_common::host::mounts()?)
}

/// The mount point of the cgroup2 hierarchy (e.g. /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on hybrid systems), from /proc/self/mountinfo.
pub(crate) fn cgroup2_root() -> anyhow::Result<PathBuf> {
    Ok(phigate_common::host::cgroup2_root()?)
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting bpffs at /sys/fs/bpf when
/// `pin_dir` is under it and nothing is mounted there yet.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let default = Path::new(BPFFS_DEFAULT);
    if pin_dir.starts_with(default) {
        let mounted = mounts()?
            .iter()
            .any(|(p, t)| p.as_path() == default && t == "bpf");
        if !mounted {
            fs::create_dir_all(default)
                .with_context(|| format!("cannot create {BPFFS_DEFAULT}"))?;
            nix::mount::mount(
                Some("bpf"),
                default,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| {
                anyhow!("mounting bpffs at {BPFFS_DEFAULT} failed: {e} — run as root (CAP_SYS_ADMIN) or mount it beforehand: `mount -t bpf bpf {BPFFS_DEFAULT}`")
            })?;
            tracing::info!("mounted bpffs at {BPFFS_DEFAULT}");
        }
    }
    make_dir(pin_dir)?;
    if !is_bpffs(pin_dir) {
        bail!(
            "pin directory {} is not on a bpf filesystem — choose one under {BPFFS_DEFAULT} or mount one: `mount -t bpf bpf {}`",
            pin_dir.display(),
            pin_dir.display()
        );
    }
    Ok(())
}

pub(super) fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
}
