//! Kernel side of the redirect: loads phigate's eBPF object, attaches it to one cgroup
//! with pinned links, and reads the per-connection state it records.
//!
//! Layout in bpffs, per attached cgroup (so agents on different cgroups coexist):
//!
//! ```text
//! <pin_dir>/cg<cgroup inode>/phigate_connect4        pinned bpf_link (one per program)
//! <pin_dir>/cg<cgroup inode>/...
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_BY_COOKIE  connection state, shared across restarts
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_BY_PEER
//! <pin_dir>/cg<cgroup inode>/maps/PHIGATE_LISTENERS  the agent's listening sockets
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

use std::collections::HashMap as StdHashMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use ipnet::IpNet;
use phigate_common::{
    counters, maps, programs, ConnectInfo, DestKeyV4, DestKeyV6, DestValue, PeerKey, Settings,
    AF_INET, AF_INET6, CONN_MAP_CAPACITY, DEST_MAP_CAPACITY, LISTENER_V4, LISTENER_V6,
    OWN_SOCKETS_CAPACITY,
};

use super::{Attested, LookupError, OrigDstLookup};

/// The eBPF object built from `agent-ebpf` by build.rs (aya-build copies the
/// `phigate-ebpf` binary target to `$OUT_DIR/phigate-ebpf`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/phigate-ebpf"));

const BPFFS_DEFAULT: &str = "/sys/fs/bpf";
const MAPS_SUBDIR: &str = "maps";
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
const PROGRAMS: [(&str, &str); 6] = [
    (programs::SOCKOPS, "sockops"),
    (programs::SOCK_RELEASE, "cgroup/sock_release"),
    (programs::GETPEERNAME4, "cgroup/getpeername4"),
    (programs::GETPEERNAME6, "cgroup/getpeername6"),
    // The connect hooks last: by the time they redirect anything, everything that
    // completes the picture (sockops, getpeername) is in place.
    (programs::CONNECT4, "cgroup/connect4"),
    (programs::CONNECT6, "cgroup/connect6"),
];

/// Counter names, by index in the per-CPU counters map.
const COUNTER_NAMES: [(&str, u32); 10] = [
    ("redirected", counters::REDIRECTED),
    ("exempt_own_socket", counters::EXEMPT_OWN),
    ("passed_agent_down", counters::PASSED_AGENT_DOWN),
    ("established", counters::ESTABLISHED),
    ("released", counters::RELEASED),
    ("v6_no_listener", counters::V6_NO_LISTENER),
    ("store_failed", counters::STORE_FAILED),
    ("refused_agent_down", counters::REFUSED_AGENT_DOWN),
    ("refused_not_agent", counters::REFUSED_NOT_AGENT),
    ("closed_unaccepted", counters::CLOSED_UNACCEPTED),
];

const CAPS_HINT: &str = "run as root or grant CAP_BPF+CAP_NET_ADMIN(+CAP_SYS_ADMIN)";

/// Where and how to redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSettings {
    /// cgroup2 directory whose processes (and descendants) are redirected.
    pub cgroup: PathBuf,
    /// bpffs directory for the pinned links and maps (e.g. /sys/fs/bpf/phigate).
    pub pin_dir: PathBuf,
    /// The agent's IPv4 listener: protected IPv4 (and v4-mapped) connects go here.
    pub listen_v4: SocketAddrV4,
    /// The agent's IPv6 listener; None: native IPv6 connects to protected destinations
    /// are refused (the config does not allow IPv6 destinations without it).
    pub listen_v6: Option<SocketAddrV6>,
    /// true: when no agent listener is registered, protected connects pass untouched.
    pub fail_open: bool,
}

/// One protected destination: connects to `port` on an address in `net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestEntry {
    /// Index of the destination in the config (reported back in [`Attested::dest_id`]).
    pub dest_id: u32,
    pub net: IpNet,
    /// Destination port; must not be 0.
    pub port: u16,
}

/// What [`detach_pinned`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetachReport {
    /// Pinned links that were detached and removed, then pinned maps and directories.
    pub removed: Vec<PathBuf>,
}

/// The redirect attached to one cgroup. Dropping it leaves the redirect attached
/// (pinned); [`detach_pinned`] removes it.
pub struct Redirector {
    cgroup: PathBuf,
    link_dir: PathBuf,
    state: Mutex<State>,
    lookup: PeerLookup,
    by_cookie: Mutex<HashMap<MapData, u64, ConnectInfo>>,
    counters: PerCpuArray<MapData, u64>,
    listeners: Mutex<SockMap<MapData>>,
    own_sockets: Mutex<HashMap<MapData, u64, u8>>,
}

struct State {
    settings: Array<MapData, Settings>,
    dests_v4: LpmTrie<MapData, DestKeyV4, DestValue>,
    dests_v6: LpmTrie<MapData, DestKeyV6, DestValue>,
    /// Pinned links of this instance (keep the fds for the process' lifetime).
    pinned: Vec<PinnedLink>,
    /// Links attached next to a previous instance's, pinned (and the old ones detached)
    /// by the first `set_destinations`. Dropped unpinned (detached) if that never happens.
    pending: Vec<(&'static str, FdLink)>,
}

/// The by-peer map, usable from many tasks: see [`OrigDstLookup`].
pub struct PeerLookup {
    by_peer: Mutex<HashMap<MapData, PeerKey, ConnectInfo>>,
    /// The agent's network namespace (its listeners'), which accepted peers are in.
    netns_cookie: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Redirector {
    /// Loads the programs, writes the settings and attaches everything to
    /// `settings.cgroup`. Protected destinations are set with [`Self::set_destinations`];
    /// when a previous instance's links exist for the cgroup, they stay attached until
    /// that first call (no unprotected gap).
    pub fn attach(settings: &RedirectSettings) -> anyhow::Result<Redirector> {
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
            .set(0, to_kernel_settings(settings), 0)
            .context("writing the redirect settings map failed")?;
        let dests_v4 = take_map(&mut ebpf, maps::DESTS_V4)?;
        let dests_v6 = take_map(&mut ebpf, maps::DESTS_V6)?;
        let by_cookie = take_map(&mut ebpf, maps::BY_COOKIE)?;
        let by_peer = take_map(&mut ebpf, maps::BY_PEER)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let listeners = take_map(&mut ebpf, maps::LISTENERS)?;
        let own_sockets = take_map(&mut ebpf, maps::OWN_SOCKETS)?;

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
                netns_cookie: Default::default(),
            },
            by_cookie: Mutex::new(by_cookie),
            counters,
            listeners: Mutex::new(listeners),
            own_sockets: Mutex::new(own_sockets),
        })
    }

    /// Registers the agent's listening sockets: protected connects are redirected only
    /// to these very sockets (the programs compare the socket the kernel would deliver
    /// to with the registered one). Call before [`Self::set_destinations`]; the kernel
    /// removes a socket from the map when it closes.
    pub fn register_listeners(
        &self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> anyhow::Result<()> {
        let netns = crate::sockets::netns_cookie(v4)
            .context("reading the listener's network namespace cookie (Linux 5.14+)")?;
        let mut map = lock(&self.listeners);
        map.set(LISTENER_V4, v4, 0)
            .context("registering the IPv4 listener in the listeners map failed")?;
        if let Some(v6) = v6 {
            map.set(LISTENER_V6, v6, 0)
                .context("registering the IPv6 listener in the listeners map failed")?;
        }
        self.lookup
            .netns_cookie
            .store(netns, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The cgroup the redirect is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The directory holding this cgroup's pinned links.
    pub fn pin_path(&self) -> &Path {
        &self.link_dir
    }

    /// Makes the destination tries hold exactly `dests` (new ones inserted, stale ones
    /// removed; never empty in between for destinations in both sets). The first call
    /// also completes a restart: the previous instance's links are detached.
    pub fn set_destinations(&self, dests: &[DestEntry]) -> anyhow::Result<()> {
        let mut want_v4: StdHashMap<(u32, [u8; 6]), DestValue> = StdHashMap::new();
        let mut want_v6: StdHashMap<(u32, [u8; 18]), DestValue> = StdHashMap::new();
        for d in dests {
            if d.port == 0 {
                bail!(
                    "protected destination {} (id {}): port 0 is not supported",
                    d.net,
                    d.dest_id
                );
            }
            let value = DestValue {
                dest_id: d.dest_id,
                flags: 0,
            };
            let port = d.port.to_be_bytes();
            match v4_view(d.net) {
                Some((addr, bits)) => {
                    let mut k = [0u8; 6];
                    k[..2].copy_from_slice(&port);
                    k[2..].copy_from_slice(&addr.octets());
                    if let Some(prev) = want_v4.insert((16 + u32::from(bits), k), value) {
                        warn_duplicate(d, prev.dest_id);
                    }
                }
                None => {
                    let IpNet::V6(n) = d.net.trunc() else {
                        unreachable!("v4_view handles IPv4")
                    };
                    let mut k = [0u8; 18];
                    k[..2].copy_from_slice(&port);
                    k[2..].copy_from_slice(&n.network().octets());
                    if let Some(prev) = want_v6.insert((16 + u32::from(n.prefix_len()), k), value) {
                        warn_duplicate(d, prev.dest_id);
                    }
                }
            }
        }

        for (family, n) in [("IPv4", want_v4.len()), ("IPv6", want_v6.len())] {
            if n > DEST_MAP_CAPACITY as usize {
                bail!("{n} protected {family} networks exceed the map capacity of {DEST_MAP_CAPACITY}");
            }
        }

        let mut state = lock(&self.state);
        // Insert (or update) first, then remove what is no longer wanted.
        for ((prefix, k), v) in &want_v4 {
            let key = Key::new(*prefix, dest_key_v4(k));
            state
                .dests_v4
                .insert(&key, v, 0)
                .context("updating the IPv4 destination map failed")?;
        }
        for ((prefix, k), v) in &want_v6 {
            let key = Key::new(*prefix, dest_key_v6(k));
            state
                .dests_v6
                .insert(&key, v, 0)
                .context("updating the IPv6 destination map failed")?;
        }
        let stale_v4: Vec<Key<DestKeyV4>> = state
            .dests_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|key| {
                let d = key.data();
                let mut k = [0u8; 6];
                k[..2].copy_from_slice(&d.port);
                k[2..].copy_from_slice(&d.addr);
                !want_v4.contains_key(&(key.prefix_len(), k))
            })
            .collect();
        for key in &stale_v4 {
            remove_ok(state.dests_v4.remove(key))
                .context("pruning the IPv4 destination map failed")?;
        }
        let stale_v6: Vec<Key<DestKeyV6>> = state
            .dests_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|key| {
                let d = key.data();
                let mut k = [0u8; 18];
                k[..2].copy_from_slice(&d.port);
                k[2..].copy_from_slice(&d.addr);
                !want_v6.contains_key(&(key.prefix_len(), k))
            })
            .collect();
        for key in &stale_v6 {
            remove_ok(state.dests_v6.remove(key))
                .context("pruning the IPv6 destination map failed")?;
        }

        if !state.pending.is_empty() {
            state.pin_pending(&self.link_dir)?;
        }
        Ok(())
    }

    /// Rewrites the settings (listeners, fail mode) on reload. `cgroup` and
    /// `pin_dir` of `settings` are ignored: moving the redirect needs a new attach.
    pub fn update_settings(&self, settings: &RedirectSettings) -> anyhow::Result<()> {
        lock(&self.state)
            .settings
            .set(0, to_kernel_settings(settings), 0)
            .context("writing the redirect settings map failed")
    }

    /// The programs' counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        COUNTER_NAMES
            .iter()
            .map(|(name, index)| {
                let per_cpu = self
                    .counters
                    .get(index, 0)
                    .with_context(|| format!("reading counter {name} failed"))?;
                Ok((*name, per_cpu.iter().copied().sum::<u64>()))
            })
            .collect()
    }

    /// Entries in each map (walks the maps; meant for occasional status output).
    pub fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
        let by_cookie = lock(&self.by_cookie).keys().filter(Result::is_ok).count();
        let by_peer = lock(&self.lookup.by_peer)
            .keys()
            .filter(Result::is_ok)
            .count();
        let state = lock(&self.state);
        vec![
            ("by_cookie", by_cookie),
            ("by_peer", by_peer),
            (
                "dests_v4",
                state.dests_v4.keys().filter(Result::is_ok).count(),
            ),
            (
                "dests_v6",
                state.dests_v6.keys().filter(Result::is_ok).count(),
            ),
        ]
    }
}

impl State {
    /// Pins this instance's links, replacing (detaching) any previous instance's.
    fn pin_pending(&mut self, link_dir: &Path) -> anyhow::Result<()> {
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

impl crate::sockets::Exemptions for Redirector {
    fn exempt(&self, cookie: u64) -> io::Result<()> {
        lock(&self.own_sockets)
            .insert(cookie, 1, 0)
            .map_err(|e| io::Error::other(format!("registering an own socket: {e}")))
    }

    fn forget(&self, cookie: u64) {
        if let Err(e) = remove_ok(lock(&self.own_sockets).remove(&cookie)) {
            tracing::warn!(error = %e, "removing an own socket's cookie failed");
        }
    }
}

impl PeerLookup {
    fn take_info(&self, peer: SocketAddr) -> Result<Option<ConnectInfo>, MapError> {
        let netns = self.netns_cookie.load(std::sync::atomic::Ordering::Relaxed);
        let key = peer_key(peer, netns);
        let mut map = lock(&self.by_peer);
        let info = match map.get(&key, 0) {
            Ok(info) => info,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        remove_ok(map.remove(&key))?;
        Ok(Some(info))
    }
}

impl OrigDstLookup for PeerLookup {
    fn take(&self, peer: SocketAddr) -> Result<Option<Attested>, LookupError> {
        self.take_info(peer)
            .map(|o| o.map(|info| Attested::from(&info)))
            .map_err(|e| LookupError::Map(e.to_string()))
    }
}

impl OrigDstLookup for Redirector {
    fn take(&self, peer: SocketAddr) -> Result<Option<Attested>, LookupError> {
        self.lookup.take(peer)
    }
}

fn warn_duplicate(d: &DestEntry, previous_id: u32) {
    if previous_id != d.dest_id {
        tracing::warn!(
            net = %d.net,
            port = d.port,
            dest_id = d.dest_id,
            previous_id,
            "the same network and port are listed under two destinations; the later one wins"
        );
    }
}

/// The by-peer key for an accepted connection's peer address: a v4-mapped IPv6 peer is
/// the IPv4 client it stands for (the programs key v4-mapped sockets that way).
fn peer_key(peer: SocketAddr, netns_cookie: u64) -> PeerKey {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => PeerKey {
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            port: peer.port(),
            family: AF_INET,
            _pad: 0,
            netns_cookie,
        },
        IpAddr::V6(v6) => PeerKey {
            addr: ipv6_words(&v6),
            port: peer.port(),
            family: AF_INET6,
            _pad: 0,
            netns_cookie,
        },
    }
}

/// IPv6 address as four u32 whose memory bytes are in network order.
fn ipv6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

fn to_kernel_settings(s: &RedirectSettings) -> Settings {
    let (v6_addr, v6_port) = match &s.listen_v6 {
        Some(a) => (ipv6_words(a.ip()), a.port()),
        None => ([0; 4], 0),
    };
    Settings {
        listen_v4_addr: u32::from_ne_bytes(s.listen_v4.ip().octets()),
        listen_v4_port: s.listen_v4.port(),
        listen_v6_port: v6_port,
        listen_v6_addr: v6_addr,
        fail_open: u32::from(s.fail_open),
        enabled: 1,
    }
}

/// An IPv4 network, or an IPv6 network inside ::ffff:0:0/96 (IPv4-mapped: IPv6 sockets
/// connecting to it are matched against the IPv4 map), as (network, prefix bits).
fn v4_view(net: IpNet) -> Option<(Ipv4Addr, u8)> {
    match net.trunc() {
        IpNet::V4(n) => Some((n.network(), n.prefix_len())),
        IpNet::V6(n) if n.prefix_len() >= 96 => n
            .network()
            .to_ipv4_mapped()
            .map(|a| (a, n.prefix_len() - 96)),
        IpNet::V6(_) => None,
    }
}

fn dest_key_v4(k: &[u8; 6]) -> DestKeyV4 {
    DestKeyV4 {
        port: [k[0], k[1]],
        addr: [k[2], k[3], k[4], k[5]],
    }
}

fn dest_key_v6(k: &[u8; 18]) -> DestKeyV6 {
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&k[2..]);
    DestKeyV6 {
        port: [k[0], k[1]],
        addr,
    }
}

/// A delete of a missing key (raced with LRU eviction or another deleter) is success.
fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
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

/// A pinned shared map from another build whose layout differs cannot be reused:
/// unpin it (programs still using it keep it) so a fresh one is created.
fn drop_incompatible_pinned_map(path: &Path, name: &str) -> anyhow::Result<()> {
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
        n if n == maps::LISTENERS => (MapType::SockMap, size_of::<u32>(), size_of::<u32>(), 2),
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

fn check_cgroup_dir(cgroup: &Path) -> anyhow::Result<PathBuf> {
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
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    Ok(phigate_common::host::cgroup2_root()?)
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` exists on a bpf filesystem, mounting bpffs at /sys/fs/bpf when
/// `pin_dir` is under it and nothing is mounted there yet.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
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

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))
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
fn detach_and_remove(path: &Path) -> anyhow::Result<()> {
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
pub fn detach_pinned(pin_dir: &Path, cgroup: Option<&Path>) -> anyhow::Result<DetachReport> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_normalises_v4_mapped() {
        let a = peer_key("127.0.0.1:40000".parse().unwrap(), 9);
        let b = peer_key("[::ffff:127.0.0.1]:40000".parse().unwrap(), 9);
        assert_eq!(a, b);
        assert_eq!(a.family, AF_INET);
        assert_eq!(a.netns_cookie, 9);
        assert_eq!(a.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        let c = peer_key("[::1]:5".parse().unwrap(), 9);
        assert_eq!(c.family, AF_INET6);
        assert_eq!(c.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn v4_view_maps_v4_mapped_networks() {
        assert_eq!(
            v4_view("10.1.2.3/16".parse().unwrap()),
            Some((Ipv4Addr::new(10, 1, 0, 0), 16))
        );
        assert_eq!(
            v4_view("::ffff:10.0.0.0/104".parse().unwrap()),
            Some((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(v4_view("fd00::/8".parse().unwrap()), None);
    }

    #[test]
    fn settings_layout() {
        let s = to_kernel_settings(&RedirectSettings {
            cgroup: PathBuf::new(),
            pin_dir: PathBuf::new(),
            listen_v4: "127.0.0.1:15001".parse().unwrap(),
            listen_v6: Some("[::1]:15002".parse().unwrap()),
            fail_open: true,
        });
        assert_eq!(s.listen_v4_addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(s.listen_v4_port, 15001);
        assert_eq!(s.listen_v6_port, 15002);
        assert_eq!(s.listen_v6_addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!((s.fail_open, s.enabled), (1, 1));
    }
}
