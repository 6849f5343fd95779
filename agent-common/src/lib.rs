//! Types shared by the eBPF programs (`agent-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of padding the verifier could
//! trip over: both sides read and write these bytes through BPF maps.
#![no_std]

#[cfg(feature = "host")]
pub mod host;

/// Address family values as the kernel uses them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Default SO_MARK set on the agent's own upstream sockets, for the host's firewall
/// rules. The programs do not trust it: any CAP_NET_RAW holder can set a mark. The
/// agent's sockets are exempt by their socket cookies ([`maps::OWN_SOCKETS`]).
pub const DEFAULT_AGENT_MARK: u32 = 0x7068_6701;

/// Capacity of the hash maps that hold in-flight connect state. They are not LRU maps:
/// no namespace can evict another's entries by churning connects. Entries live as
/// long as the client socket: by-cookie until the socket is released, by-peer until
/// the agent accepts the connection or the socket closes. A connect that cannot be
/// stored is refused (fail closed).
pub const CONN_MAP_CAPACITY: u32 = 65_536;
/// Capacity of the map of the agent's own sockets (cookies registered just before
/// each upstream connect, removed right after).
pub const OWN_SOCKETS_CAPACITY: u32 = 16_384;
/// Slots of the agent's listening sockets in [`maps::LISTENERS`] (one of each per
/// served network namespace, see [`ListenerKey`]).
pub const LISTENER_V4: u32 = 0;
pub const LISTENER_V6: u32 = 1;
/// Network namespaces the agent can serve at once (listeners: two per namespace).
pub const NETNS_CAPACITY: u32 = 1_024;
/// Size in bytes of the ring buffer of [`NetnsEvent`]s (a power of two, pages).
pub const NETNS_EVENTS_BYTES: u32 = 64 * 1024;
/// Capacity of each protected-destination LPM trie.
pub const DEST_MAP_CAPACITY: u32 = 4_096;

/// Map names, shared so userspace looks up exactly what the programs declare.
pub mod maps {
    pub const DESTS_V4: &str = "PHIGATE_DESTS_V4";
    pub const DESTS_V6: &str = "PHIGATE_DESTS_V6";
    pub const SETTINGS: &str = "PHIGATE_SETTINGS";
    pub const BY_COOKIE: &str = "PHIGATE_BY_COOKIE";
    pub const BY_PEER: &str = "PHIGATE_BY_PEER";
    pub const COUNTERS: &str = "PHIGATE_COUNTERS";
    /// SOCKHASH of the agent's listening sockets, keyed by network namespace and
    /// slot ([`super::ListenerKey`]): a connect is redirected only when the socket
    /// the kernel would deliver it to is the one registered for the caller's own
    /// namespace. The kernel drops a socket from the map when it closes, so "agent
    /// down" needs no cooperation from a dead agent.
    pub const LISTENERS: &str = "PHIGATE_LISTENERS";
    /// Ring buffer of [`super::NetnsEvent`]s: a protected connect came from a
    /// network namespace the agent holds no listener in.
    pub const NETNS_EVENTS: &str = "PHIGATE_NETNS_EVENTS";
    /// Socket cookies of the agent's own outbound sockets: never redirected.
    pub const OWN_SOCKETS: &str = "PHIGATE_OWN_SOCKETS";
}

/// Program names (the Rust fn names in agent-ebpf).
pub mod programs {
    pub const CONNECT4: &str = "phigate_connect4";
    pub const CONNECT6: &str = "phigate_connect6";
    pub const GETPEERNAME4: &str = "phigate_getpeername4";
    pub const GETPEERNAME6: &str = "phigate_getpeername6";
    pub const SOCKOPS: &str = "phigate_sockops";
    pub const SOCK_RELEASE: &str = "phigate_sock_release";
}

/// Indices into the per-CPU counters array.
pub mod counters {
    pub const REDIRECTED: u32 = 0;
    /// A connect from one of the agent's own sockets (cookie registered): passed.
    pub const EXEMPT_OWN: u32 = 1;
    /// fail_mode = "open" and no agent listener is registered: passed untouched.
    pub const PASSED_AGENT_DOWN: u32 = 2;
    pub const ESTABLISHED: u32 = 3;
    pub const RELEASED: u32 = 4;
    /// A native IPv6 connect matched a protected destination but the agent has no IPv6
    /// listener (`Settings::listen_v6_port == 0`): refused (the config rejects this).
    pub const V6_NO_LISTENER: u32 = 5;
    /// A connect could not be stored (map full): refused.
    pub const STORE_FAILED: u32 = 6;
    /// fail_mode = "closed" and no agent listener is registered: refused (EPERM).
    pub const REFUSED_AGENT_DOWN: u32 = 7;
    /// The socket listening at the agent's address in the caller's network namespace
    /// is not the agent's (another process bound the port, or the caller is in a
    /// namespace the agent does not serve): refused in both fail modes.
    pub const REFUSED_NOT_AGENT: u32 = 8;
    /// A redirected socket closed before the agent accepted it: its entry was removed.
    pub const CLOSED_UNACCEPTED: u32 = 9;
    /// The agent is up but the caller's network namespace has no agent listener yet
    /// (and no other socket at the agent's address): refused with ECONNREFUSED in
    /// both fail modes, the agent told.
    pub const REFUSED_UNSERVED_NETNS: u32 = 10;
    /// No longer counted (an unserved namespace is refused in both fail modes since
    /// the agent checks its own listener); kept so `phigate status` keeps its key.
    pub const PASSED_UNSERVED_NETNS: u32 = 11;
    pub const COUNT: u32 = 16;
}

/// Key of the IPv4 destination trie: port first so a prefix covers "this port, this
/// CIDR" (prefix length = 16 + CIDR bits). Both fields are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestKeyV4 {
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// Key of the IPv6 destination trie; same layout idea as [`DestKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestKeyV6 {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Value of both destination tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestValue {
    /// Index of the destination in the agent's config (stable for one config load).
    pub dest_id: u32,
    pub flags: u32,
}

/// Global settings the agent writes at start and on reload (array map, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Agent IPv4 listener, address in network byte order, port in host byte order.
    pub listen_v4_addr: u32,
    pub listen_v4_port: u16,
    /// Agent IPv6 listener port (host order); 0 = no IPv6 listener.
    pub listen_v6_port: u16,
    /// Agent IPv6 listener address, network byte order.
    pub listen_v6_addr: [u32; 4],
    /// 1 = fail open: when no agent listener is registered, connects pass untouched.
    pub fail_open: u32,
    /// 0 until the agent has written valid settings; programs do nothing before that.
    pub enabled: u32,
    /// Cookie of the agent's own network namespace (0 until its listeners are
    /// registered): there, a missing listener means the agent is down.
    pub home_netns: u64,
}

/// Key of [`maps::LISTENERS`]: the agent's listener of one family in one namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// bpf_get_netns_cookie() of the namespace (SO_NETNS_COOKIE of the socket).
    pub netns_cookie: u64,
    /// [`LISTENER_V4`] or [`LISTENER_V6`].
    pub slot: u32,
    /// Explicit padding (zero).
    pub _pad: u32,
}

/// What the programs tell the agent through [`maps::NETNS_EVENTS`]: a process of the
/// protected cgroup connected to a protected destination from a network namespace
/// the agent does not serve yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsEvent {
    pub netns_cookie: u64,
    /// Thread-group id of the connecting process (its /proc/PID/ns/net is the way in).
    pub pid: u32,
    pub _pad: u32,
}

/// What the kernel attested at connect time, plus the original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Original destination address, network byte order; IPv4 in `orig_addr[0]`.
    pub orig_addr: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// AF_INET or AF_INET6 of the original destination (a v4-mapped v6 connect is AF_INET).
    pub family: u16,
    pub dest_id: u32,
    /// Thread-group id (what userspace calls the pid) and thread id.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub netns_cookie: u64,
    /// bpf_ktime_get_boot_ns() at connect (CLOCK_BOOTTIME, as /proc start times):
    /// the process the agent reads in /proc must have started before it.
    pub connect_ns: u64,
    pub comm: [u8; 16],
}

/// Key of the by-peer map: the client's local address as the agent sees it on accept,
/// in the client's network namespace. Within one namespace only one open socket has a
/// given address and port towards the agent's listener, and the entry is removed when
/// that socket closes: so the entry belongs to the very connection the agent accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerKey {
    /// Network byte order; IPv4 in `addr[0]`, rest zero.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    /// Explicit padding (zero) so the key has no uninitialized bytes.
    pub _pad: u32,
    /// bpf_get_netns_cookie() of the client socket's namespace.
    pub netns_cookie: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding, any bit pattern is valid (and so for
    // each type below).
    unsafe impl aya::Pod for super::DestKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DestKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DestValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
}
