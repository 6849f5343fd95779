//! The redirect's maps as the agent writes and reads them: protected destinations
//! (LPM tries keyed by port and network), settings, the agent's listeners and own
//! sockets, counters; and how their keys and values are encoded for the programs.
#![forbid(unsafe_code)]

use std::collections::HashMap as StdHashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use anyhow::{bail, Context as _};
use aya::maps::lpm_trie::Key;
use aya::maps::MapError;
use ipnet::IpNet;
use phigate_common::{
    counters, DestKeyV4, DestKeyV6, DestValue, ListenerKey, Settings, DEST_MAP_CAPACITY,
    LISTENER_V4, LISTENER_V6,
};

use super::{lock, RedirectSettings, Redirector};

/// Counter names, by index in the per-CPU counters map.
const COUNTER_NAMES: [(&str, u32); 12] = [
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
    ("refused_unserved_netns", counters::REFUSED_UNSERVED_NETNS),
    ("passed_unserved_netns", counters::PASSED_UNSERVED_NETNS),
];

/// One protected destination: connects to `port` on an address in `net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DestEntry {
    /// Index of the destination in the config (reported back in [`Attested::dest_id`]).
    pub(crate) dest_id: u32,
    pub(crate) net: IpNet,
    /// Destination port; must not be 0.
    pub(crate) port: u16,
}

impl Redirector {
    /// Registers the agent's listening sockets in its own network namespace:
    /// protected connects are redirected only to these very sockets (the programs
    /// compare the socket the kernel would deliver to with the registered one). Call
    /// before [`Self::set_destinations`]; the kernel removes a socket from the map
    /// when it closes.
    pub(crate) fn register_listeners(
        &self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> anyhow::Result<()> {
        let netns = self.register_netns_listeners(v4, v6)?;
        self.home_netns.store(netns, Ordering::Relaxed);
        let mut state = lock(&self.state);
        let mut settings = state
            .settings
            .get(&0, 0)
            .context("reading the redirect settings map failed")?;
        settings.home_netns = netns;
        state
            .settings
            .set(0, settings, 0)
            .context("writing the redirect settings map failed")
    }

    /// Registers the agent's listeners of one network namespace (the one the
    /// sockets were created in), replacing any before them; returns the namespace's
    /// cookie.
    pub(crate) fn register_netns_listeners(
        &self,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
    ) -> anyhow::Result<u64> {
        let netns = crate::sockets::netns_cookie(v4)
            .context("reading the listener's network namespace cookie (Linux 5.14+)")?;
        let mut map = lock(&self.listeners);
        map.insert(listener_key(netns, LISTENER_V4), v4.as_raw_fd(), 0)
            .context("registering the IPv4 listener in the listeners map failed")?;
        if let Some(v6) = v6 {
            map.insert(listener_key(netns, LISTENER_V6), v6.as_raw_fd(), 0)
                .context("registering the IPv6 listener in the listeners map failed")?;
        }
        Ok(netns)
    }

    /// Removes a namespace's listeners from the map (closing them does too; this
    /// makes it immediate and independent of who else holds the sockets).
    pub(crate) fn forget_netns_listeners(&self, netns: u64) {
        let mut map = lock(&self.listeners);
        for slot in [LISTENER_V4, LISTENER_V6] {
            if let Err(e) = remove_ok(map.remove(&listener_key(netns, slot))) {
                tracing::warn!(error = %e, netns, "removing a namespace's listener failed");
            }
        }
    }

    /// The programs' reports of protected connects from namespaces with no agent
    /// listener; `None` once taken.
    pub(crate) fn take_netns_events(&self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        lock(&self.netns_events).take()
    }

    /// The cookie of the agent's own network namespace (0 before
    /// [`Self::register_listeners`]).
    pub(crate) fn home_netns(&self) -> u64 {
        self.home_netns.load(Ordering::Relaxed)
    }

    /// Makes the destination tries hold exactly `dests` (new ones inserted, stale ones
    /// removed; never empty in between for destinations in both sets). The first call
    /// also completes a restart: the previous instance's links are detached.
    pub(crate) fn set_destinations(&self, dests: &[DestEntry]) -> anyhow::Result<()> {
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
    pub(crate) fn update_settings(&self, settings: &RedirectSettings) -> anyhow::Result<()> {
        lock(&self.state)
            .settings
            .set(0, to_kernel_settings(settings, self.home_netns()), 0)
            .context("writing the redirect settings map failed")
    }

    /// The programs' counters, summed over CPUs.
    pub(crate) fn counters(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
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
    pub(crate) fn map_occupancy(&self) -> Vec<(&'static str, usize)> {
        let by_cookie = lock(&self.by_cookie).keys().filter(Result::is_ok).count();
        let by_peer = lock(&self.lookup.by_peer)
            .keys()
            .filter(Result::is_ok)
            .count();
        let listeners = lock(&self.listeners).keys().filter(Result::is_ok).count();
        let state = lock(&self.state);
        vec![
            ("by_cookie", by_cookie),
            ("by_peer", by_peer),
            ("listeners", listeners),
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

/// IPv6 address as four u32 whose memory bytes are in network order.
pub(super) fn ipv6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

fn listener_key(netns_cookie: u64, slot: u32) -> ListenerKey {
    ListenerKey {
        netns_cookie,
        slot,
        _pad: 0,
    }
}

pub(super) fn to_kernel_settings(s: &RedirectSettings, home_netns: u64) -> Settings {
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
        home_netns,
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
pub(super) fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

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
        let s = to_kernel_settings(
            &RedirectSettings {
                cgroup: PathBuf::new(),
                pin_dir: PathBuf::new(),
                listen_v4: "127.0.0.1:15001".parse().unwrap(),
                listen_v6: Some("[::1]:15002".parse().unwrap()),
                fail_open: true,
            },
            7,
        );
        assert_eq!(s.listen_v4_addr.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(s.listen_v4_port, 15001);
        assert_eq!(s.listen_v6_port, 15002);
        assert_eq!(s.listen_v6_addr[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!((s.fail_open, s.enabled, s.home_netns), (1, 1, 7));
    }
}
