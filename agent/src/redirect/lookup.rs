//! The original-destination lookup: for an accepted connection, the by-peer map's
//! entry the programs recorded at connect time (see [`OrigDstLookup`]).
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, MapError};
use phigate_common::{ConnectInfo, PeerKey, AF_INET, AF_INET6};

use super::maps::{ipv6_words, remove_ok};
use super::{lock, Attested, LookupError, OrigDstLookup, Redirector};

/// The by-peer map, usable from many tasks: see [`OrigDstLookup`].
pub(super) struct PeerLookup {
    pub(super) by_peer: Mutex<HashMap<MapData, PeerKey, ConnectInfo>>,
}

impl PeerLookup {
    fn take_info(&self, peer: SocketAddr, netns: u64) -> Result<Option<ConnectInfo>, MapError> {
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
    fn take(&self, peer: SocketAddr, netns: u64) -> Result<Option<Attested>, LookupError> {
        self.take_info(peer, netns)
            .map(|o| o.map(|info| Attested::from(&info)))
            .map_err(|e| LookupError::Map(e.to_string()))
    }
}

impl OrigDstLookup for Redirector {
    fn take(&self, peer: SocketAddr, netns: u64) -> Result<Option<Attested>, LookupError> {
        self.lookup.take(peer, netns)
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
}
