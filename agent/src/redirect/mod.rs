//! Transparent redirect: eBPF cgroup hooks rewrite protected connects to the agent's
//! listener and remember, per connection, the original destination and the caller as
//! the kernel saw it at connect time.
//!
//! The proxy only depends on [`OrigDstLookup`], so the L7 pipeline is testable without
//! eBPF ([`StaticOrigDst`]); [`Redirector`] is the kernel-backed implementation, and
//! the one entry point to the kernel side:
//!
//! * `load`: [`Redirector::attach`] loads the eBPF object, attaches and pins its links,
//!   and hands over from a previous instance without a gap (the bpffs layout is
//!   described there).
//! * `maps`: what the agent writes into the maps (destinations, settings, its
//!   listeners and own sockets) and reads from them (counters, occupancy).
//! * `lookup`: the original destination of an accepted connection, from the by-peer
//!   map ([`OrigDstLookup`]).
//! * `bpffs`: the cgroup2 directory and the bpf filesystem the links are pinned in.
//! * `detach`: removing pinned links: [`detach_pinned`] (`phigate detach`), and the
//!   previous instance's on restart.
//! * `netns`: the network namespaces protected processes live in (containers), and
//!   the programs' reports of namespaces the agent does not serve yet.

mod bpffs;
mod detach;
mod load;
mod lookup;
mod maps;
mod netns;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

use phigate_common::{ConnectInfo, AF_INET};

pub(crate) use bpffs::cgroup2_root;
pub(crate) use detach::detach_pinned;
pub(crate) use load::{RedirectSettings, Redirector};
pub(crate) use maps::DestEntry;
pub(crate) use netns::{open_netns, own_netns, protected_netns, NetnsEvents, NetnsId};

/// What the kernel attested about a redirected connection at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// Where the client meant to connect.
    pub original_dst: SocketAddr,
    /// Index of the protected destination in the config the maps were filled from.
    pub dest_id: u32,
    /// Thread-group id of the connecting process, and the connecting thread.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The task's comm (at most 15 bytes).
    pub comm: String,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    /// CLOCK_BOOTTIME at connect, in ns: the process found in /proc for `pid` must
    /// have started before this, or it is not the one that connected.
    pub connect_boot_ns: u64,
}

impl From<&ConnectInfo> for Attested {
    fn from(c: &ConnectInfo) -> Self {
        let ip = if c.family == AF_INET {
            IpAddr::V4(Ipv4Addr::from(u32::from_be(c.orig_addr[0])))
        } else {
            let mut b = [0u8; 16];
            for (i, w) in c.orig_addr.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        };
        let comm_len = c.comm.iter().position(|b| *b == 0).unwrap_or(c.comm.len());
        Attested {
            original_dst: SocketAddr::new(ip, c.orig_port),
            dest_id: c.dest_id,
            pid: c.pid,
            tid: c.tid,
            uid: c.uid,
            gid: c.gid,
            comm: String::from_utf8_lossy(&c.comm[..comm_len]).into_owned(),
            cgroup_id: c.cgroup_id,
            socket_cookie: c.socket_cookie,
            connect_boot_ns: c.connect_ns,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("original-destination map lookup failed: {0}")]
    Map(String),
}

/// Answers, for an accepted connection, where the client meant to go and who it was.
pub trait OrigDstLookup: Send + Sync + 'static {
    /// Looks up the connection whose client address (the accepted socket's peer) is
    /// `peer` in the network namespace `netns` (the cookie of the listener that
    /// accepted it), removing the entry. `Ok(None)`: the connection was not
    /// redirected by us (someone connected to the listener directly) and must be
    /// refused.
    fn take(&self, peer: SocketAddr, netns: u64) -> Result<Option<Attested>, LookupError>;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A lookup table filled by hand: the data path tested without eBPF
/// (proxy/tests.rs).
#[cfg(test)]
#[derive(Default)]
pub struct StaticOrigDst {
    entries: std::sync::Mutex<std::collections::HashMap<SocketAddr, Attested>>,
}

#[cfg(test)]
impl StaticOrigDst {
    pub fn insert(&self, peer: SocketAddr, attested: Attested) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, attested);
    }
}

#[cfg(test)]
impl OrigDstLookup for StaticOrigDst {
    fn take(&self, peer: SocketAddr, _netns: u64) -> Result<Option<Attested>, LookupError> {
        Ok(self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attested_decodes_v4_and_v6() {
        let mut c = ConnectInfo {
            orig_addr: [u32::from(Ipv4Addr::new(127, 0, 0, 2)).to_be(), 0, 0, 0],
            orig_port: 9443,
            family: AF_INET,
            dest_id: 3,
            pid: 10,
            tid: 11,
            uid: 1000,
            gid: 1000,
            cgroup_id: 77,
            socket_cookie: 99,
            netns_cookie: 1,
            connect_ns: 5,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        let a = Attested::from(&c);
        assert_eq!(a.original_dst, "127.0.0.2:9443".parse().unwrap());
        assert_eq!(a.comm, "curl");
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        let o = v6.octets();
        for i in 0..4 {
            c.orig_addr[i] =
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
        }
        c.family = phigate_common::AF_INET6;
        assert_eq!(
            Attested::from(&c).original_dst,
            "[fd00::1]:9443".parse().unwrap()
        );
    }
}
