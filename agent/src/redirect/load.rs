//! Loading and attaching: [`Redirector::attach`] loads phigate's eBPF object, attaches
//! it to one cgroup with pinned links, and hands over from a previous instance.
//!
//! Layout in bpffs, per attached cgroup (so agents on different cgroups coexist):
//!
//! ```text
//! <pin_dir>/cg<cgroup inode>/phigate_connect4        pinned bpf_link (one per program)
//! <pin_dir>/cg<cgroup inode>/...
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_BY_COOKIE  connection state, shared across restarts
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_BY_PEER
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_LISTENERS  the agent's listening sockets,
//!                                                    per network namespace
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_OWN_SOCKETS cookies of the agent's own sockets
//! ```
//!
//! Pinned links keep the programs attached when the agent exits or dies. The kernel
//! drops a closed listener from `PHIGATE_LISTENERS`, so from then on protected connects
//! are refused (EPERM), which is how phigate fails closed; with `fail_open` they pass
//! untouched. A socket somebody else binds on the listen port is never the registered
//! one: connects are refused in both modes rather than delivered to it.
//!
//! Restart: the new programs are attached next to the old ones (cgroup multi-attach) and
//! the old links are detached only once the new programs hold their destinations (the
//! first [`Redirector::set_destinations`]), so protection has no gap. The connection-state
//! maps are pinned and reused by the new programs, so connections the old programs
//! redirected (also while the agent was restarting) are found by the new agent.
//! Destinations and settings are per instance: the old programs keep their own until
//! they are detached.

use std::fs;
use std::io;
use std::net::{SocketAddrV4, SocketAddrV6};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context as _};
use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use phigate_common::{
    maps, programs, ConnectInfo, DestKeyV4, DestKeyV6, DestValue, ListenerKey, Settings,
};

use super::bpffs::{check_cgroup_dir, drop_incompatible_pinned_map, ensure_bpffs, make_dir};
use super::detach::detach_and_remove;
use super::lookup::PeerLookup;
use super::maps::to_kernel_settings;

/// The eBPF object built from `agent-ebpf` by build.rs (aya-build copies the
/// `phigate-ebpf` binary target to `$OUT_DIR/phigate-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/phigate-ebpf"));

pub(super) const MAPS_SUBDIR: &str = "maps";
/// Maps pinned per cgroup and reused across agent restarts (the previous instance's
/// programs, attached until the new ones take over, see the new agent's listeners and
/// own sockets).
const SHARED_MAPS: [&str; 4] = [
    maps::BY_COOKIE,
    maps::BY_PEER,
    maps::LISTENERS,
    maps::OWN_SOCKETS,
];

/// The programs, in attach order, with the section name used in messages.
pub(super) const PROGRAMS: [(&str, &str); 6] = [
    (programs::SOCKOPS, "sockops"),
    (programs::SOCK_RELEASE, "cgroup/sock_release"),
    (programs::GETPEERNAME4, "cgroup/getpeername4"),
    (programs::GETPEERNAME6, "cgroup/getpeername6"),
    // The connect hooks last: by the time they redirect anything, everything that
    // completes the picture (sockops, getpeername) is in place.
    (programs::CONNECT4, "cgroup/connect4"),
    (programs::CONNECT6, "cgroup/connect6"),
];

pub(super) const CAPS_HINT: &str = "run as root or grant CAP_BPF+CAP_NET_ADMIN(+CAP_SYS_ADMIN)";

/// Where and how to redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RedirectSettings {
    /// cgroup2 directory whose processes (and descendants) are redirected.
    pub(crate) cgroup: PathBuf,
    /// bpffs directory for the pinned links and maps (e.g. /sys/fs/bpf/phigate).
    pub(crate) pin_dir: PathBuf,
    /// The agent's IPv4 listener: protected IPv4 (and v4-mapped) connects go here.
    pub(crate) listen_v4: SocketAddrV4,
    /// The agent's IPv6 listener; None: native IPv6 connects to protected destinations
    /// are refused (the config does not allow IPv6 destinations without it).
    pub(crate) listen_v6: Option<SocketAddrV6>,
    /// true: when no agent listener is registered, protected connects pass untouched.
    pub(crate) fail_open: bool,
}

/// The redirect attached to one cgroup. Dropping it leaves the redirect attached
/// (pinned); [`detach_pinned`](super::detach_pinned) removes it.
pub(crate) struct Redirector {
    pub(super) cgroup: PathBuf,
    pub(super) link_dir: PathBuf,
    pub(super) state: Mutex<State>,
    pub(super) lookup: PeerLookup,
    pub(super) by_cookie: Mutex<HashMap<MapData, u64, ConnectInfo>>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    pub(super) listeners: Mutex<SockHash<MapData, ListenerKey>>,
    pub(super) own_sockets: Mutex<HashMap<MapData, u64, u8>>,
    /// The programs' reports of unserved namespaces, until the agent takes them
    /// ([`Redirector::take_netns_events`]).
    pub(super) netns_events: Mutex<Option<RingBuf<MapData>>>,
    /// Cookie of the agent's own network namespace (0 until its listeners are
    /// registered); written into the settings.
    pub(super) home_netns: std::sync::atomic::AtomicU64,
}

pub(super) struct State {
    pub(super) settings: Array<MapData, Settings>,
    pub(super) dests_v4: LpmTrie<MapData, DestKeyV4, DestValue>,
    pub(super) dests_v6: LpmTrie<MapData, DestKeyV6, DestValue>,
    /// Pinned links of this instance (keep the fds for the process' lifetime).
    pinned: Vec<PinnedLink>,
    /// Links attached next to a previous instance's, pinned (and the old ones detached)
    /// by the first `set_destinations`. Dropped unpinned (detached) if that never happens.
    pub(super) pending: Vec<(&'static str, FdLink)>,
}

impl Redirector {
    /// Loads the programs, writes the settings and attaches everything to
    /// `settings.cgroup`. Protected destinations are set with [`Self::set_destinations`];
    /// when a previous instance's links exist for the cgroup, they stay attached until
    /// that first call (no unprotected gap).
    pub(crate) fn attach(settings: &RedirectSettings) -> anyhow::Result<Redirector> {
        let result = Self::attach_inner(settings);
        if result.is_err() {
            // Leave no empty per-cgroup directories behind (non-empty ones are kept).
            if let Ok(meta) = fs::metadata(&settings.cgroup) {
                let dir = settings.pin_dir.join(format!("cg{}", meta.ino()));
                let _ = fs::remove_dir(dir.join(MAPS_SUBDIR));
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    fn attach_inner(settings: &RedirectSettings) -> anyhow::Result<Redirector> {
        let cgroup = check_cgroup_dir(&settings.cgroup)?;
        let inode = fs::metadata(&cgroup)
            .with_context(|| format!("cannot stat cgroup directory {}", cgroup.display()))?
            .ino();
        ensure_bpffs(&settings.pin_dir)?;
        let link_dir = settings.pin_dir.join(format!("cg{inode}"));
        let maps_dir = link_dir.join(MAPS_SUBDIR);
        make_dir(&maps_dir)?;
        bump_memlock_rlimit();

        let mut loader = EbpfLoader::new();
        for name in SHARED_MAPS {
            let path = maps_dir.join(name);
            drop_incompatible_pinned_map(&path, name)?;
            loader.map_pin_path(name, path);
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(load_error)?;
        load_programs(&mut ebpf)?;

        let mut settings_map: Array<MapData, Settings> = take_map(&mut ebpf, maps::SETTINGS)?;
        settings_map
            .set(0, to_kernel_settings(settings, 0), 0)
            .context("writing the redirect settings map failed")?;
        let dests_v4 = take_map(&mut ebpf, maps::DESTS_V4)?;
        let dests_v6 = take_map(&mut ebpf, maps::DESTS_V6)?;
        let by_cookie = take_map(&mut ebpf, maps::BY_COOKIE)?;
        let by_peer = take_map(&mut ebpf, maps::BY_PEER)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let listeners = take_map(&mut ebpf, maps::LISTENERS)?;
        let own_sockets = take_map(&mut ebpf, maps::OWN_SOCKETS)?;
        let netns_events = take_map(&mut ebpf, maps::NETNS_EVENTS)?;

        let links = attach_programs(&mut ebpf, &cgroup)?;
        // The links are ours now; the programs stay loaded through them.
        drop(ebpf);

        let previous = PROGRAMS
            .iter()
            .any(|(name, _)| link_dir.join(name).exists());
        let mut state = State {
            settings: settings_map,
            dests_v4,
            dests_v6,
            pinned: Vec::new(),
            pending: links,
        };
        if !previous {
            state.pin_pending(&link_dir)?;
        }
        Ok(Redirector {
            cgroup,
            link_dir,
            state: Mutex::new(state),
            lookup: PeerLookup {
                by_peer: Mutex::new(by_peer),
            },
            by_cookie: Mutex::new(by_cookie),
            counters,
            listeners: Mutex::new(listeners),
            own_sockets: Mutex::new(own_sockets),
            netns_events: Mutex::new(Some(netns_events)),
            home_netns: Default::default(),
        })
    }

    /// The cgroup the redirect is attached to.
    pub(crate) fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The directory holding this cgroup's pinned links.
    pub(crate) fn pin_path(&self) -> &Path {
        &self.link_dir
    }
}

impl State {
    /// Pins this instance's links, replacing (detaching) any previous instance's.
    pub(super) fn pin_pending(&mut self, link_dir: &Path) -> anyhow::Result<()> {
        for (name, link) in std::mem::take(&mut self.pending) {
            let path = link_dir.join(name);
            if path.exists() {
                detach_and_remove(&path).with_context(|| {
                    format!(
                        "replacing the previous pinned link {} failed",
                        path.display()
                    )
                })?;
            }
            let pinned = link
                .pin(&path)
                .with_context(|| format!("pinning link {} failed", path.display()))?;
            self.pinned.push(pinned);
        }
        Ok(())
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        anyhow!("the eBPF object has no map {name} (agent and eBPF programs out of sync?)")
    })?;
    M::try_from(map).with_context(|| format!("map {name} has an unexpected type or size"))
}

fn load_error(e: EbpfError) -> anyhow::Error {
    match &e {
        EbpfError::MapError(MapError::CreateError { name, io_error }) => {
            let hint = if io_error.raw_os_error() == Some(libc::EPERM) {
                format!(" — {CAPS_HINT}")
            } else {
                String::new()
            };
            anyhow!("loading the eBPF object failed: creating map {name}: {io_error}{hint}")
        }
        _ => anyhow!("loading the eBPF object failed: {e}"),
    }
}

fn load_programs(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for (name, section) in PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
        let result = match section {
            "sockops" => <&mut SockOps>::try_from(program).map(|p| p.load()),
            "cgroup/sock_release" => <&mut CgroupSock>::try_from(program).map(|p| p.load()),
            _ => <&mut CgroupSockAddr>::try_from(program).map(|p| p.load()),
        };
        let result = result.and_then(|r| r);
        if let Err(e) = result {
            return Err(program_error(
                e,
                &format!("loading {section} ({name})"),
                None,
            ));
        }
    }
    Ok(())
}

fn attach_programs(ebpf: &mut Ebpf, cgroup: &Path) -> anyhow::Result<Vec<(&'static str, FdLink)>> {
    let cgroup_fd = fs::File::open(cgroup)
        .with_context(|| format!("cannot open cgroup directory {}", cgroup.display()))?;
    // bpf links to a cgroup always allow several programs per hook (that is what the
    // restart hand-over relies on); the kernel rejects BPF_F_ALLOW_MULTI in
    // link_create.flags (EINVAL), so the mode must be Single (flags 0) here.
    let mode = CgroupAttachMode::Single;
    let mut links = Vec::new();
    for (name, section) in PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
        let what = format!("attaching {section} to {}", cgroup.display());
        let attached = match section {
            "sockops" => <&mut SockOps>::try_from(program).and_then(|p| {
                let id = p.attach(&cgroup_fd, mode)?;
                p.take_link(id).map(|l| l.try_into())
            }),
            "cgroup/sock_release" => <&mut CgroupSock>::try_from(program).and_then(|p| {
                let id = p.attach(&cgroup_fd, mode)?;
                p.take_link(id).map(|l| l.try_into())
            }),
            _ => <&mut CgroupSockAddr>::try_from(program).and_then(|p| {
                let id = p.attach(&cgroup_fd, mode)?;
                p.take_link(id).map(|l| l.try_into())
            }),
        };
        match attached {
            Ok(Ok(link)) => links.push((name, link)),
            Ok(Err(e)) => {
                bail!("{what}: the kernel did not return a bpf link ({e}); Linux 5.7+ is required")
            }
            Err(e) => return Err(program_error(e, &what, Some(cgroup))),
        }
    }
    Ok(links)
}

fn program_error(e: ProgramError, what: &str, cgroup: Option<&Path>) -> anyhow::Error {
    let io_error = match &e {
        ProgramError::SyscallError(s) => Some(&s.io_error),
        ProgramError::LoadError { io_error, .. } => Some(io_error),
        _ => None,
    };
    let attaching = cgroup.is_some();
    let hint = match io_error.and_then(io::Error::raw_os_error) {
        Some(libc::EPERM) => format!(" — {CAPS_HINT}"),
        // From the verifier EACCES means "rejected" (its log follows); from attach, a
        // missing capability or a cgroup directory we may not use.
        Some(libc::EACCES) if attaching => format!(" — {CAPS_HINT}"),
        Some(libc::EINVAL | libc::EOPNOTSUPP) if attaching => {
            " — the kernel needs CONFIG_CGROUP_BPF and bpf links for cgroups (Linux 5.7+)"
                .to_string()
        }
        _ => String::new(),
    };
    match (&e, io_error) {
        (ProgramError::LoadError { verifier_log, .. }, Some(io)) => {
            anyhow!("{what} failed: {io}{hint}\nverifier log:\n{verifier_log}")
        }
        (_, Some(io)) => anyhow!("{what} failed: {io}{hint}"),
        _ => anyhow!("{what} failed: {e}"),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; raising it is harmless
/// elsewhere and failures surface as map/program load errors.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "raising RLIMIT_MEMLOCK failed");
    }
}
