//! phigate's eBPF programs.
//!
//! * `cgroup/connect4`, `cgroup/connect6`: a TCP connect to a protected destination is
//!   rewritten to the agent's listener, but only after proving in the kernel that the
//!   socket listening there is the agent's own (the one the agent put in
//!   `PHIGATE_LISTENERS`); the original destination and the caller (as the kernel sees
//!   it in the connecting task) are stored under the socket cookie. The agent's own
//!   outbound sockets are recognised by their cookies (`PHIGATE_OWN_SOCKETS`), which no
//!   other process can register; SO_MARK is not trusted (CAP_NET_RAW sets it).
//! * `sockops` (ACTIVE_ESTABLISHED_CB): copies that entry to a map keyed by the client's
//!   own address and network namespace, which is what the agent sees on `accept()`;
//!   (STATE_CB) removes it when that socket closes, so an entry never outlives the
//!   connection it describes and no later socket can inherit it.
//! * `cgroup/getpeername4`, `cgroup/getpeername6`: a redirected socket reports the
//!   original destination as its peer.
//! * `cgroup/sock_release`: forgets the socket's entry.
//!
//! Network namespaces: the agent holds a listener in every namespace protected
//! processes live in (containers), registered under that namespace's cookie. A
//! connect is redirected to the agent's listener in the caller's own namespace; from
//! a namespace with no agent listener and nothing else at the agent's address while
//! the agent is up (its own namespace's listener is registered), the agent is told
//! (`PHIGATE_NETNS_EVENTS`) so it serves the namespace at once, and the connect is
//! refused with ECONNREFUSED in both fail modes. Only when the agent is really down
//! (no listener registered in its own namespace either) does the fail mode decide.
//!
//! Failing closed means returning 0 from the connect hook (the caller's connect()
//! fails with EPERM) when no agent listener is registered, when the listener found is
//! not the agent's, or when the connect cannot be stored. Nothing is ever delivered to
//! a socket the agent does not own.
//!
//! Context fields are read and written with volatile 4-byte accesses: LLVM would
//! otherwise merge adjacent 4-byte accesses into 8-byte ones the verifier rejects.
//!
//! No `license` section is emitted, so aya declares the object as "GPL" to the kernel
//! (aya-obj's default). None of the helpers used here is GPL-only.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ffi::c_void;
    use core::mem::size_of;
    use core::ptr::{read_volatile, write_volatile};

    use aya_ebpf::bindings::{
        bpf_sock, bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    };
    use aya_ebpf::helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_map_lookup_elem, bpf_set_retval, bpf_sk_lookup_tcp,
        bpf_sk_release,
    };
    use aya_ebpf::helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    };
    use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops};
    use aya_ebpf::maps::lpm_trie::Key;
    use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SockHash};
    use aya_ebpf::programs::{SockAddrContext, SockContext, SockOpsContext};
    use phigate_common::{
        counters, maps, ConnectInfo, DestKeyV4, DestKeyV6, DestValue, ListenerKey, NetnsEvent,
        PeerKey, Settings, AF_INET, AF_INET6, CONN_MAP_CAPACITY, DEST_MAP_CAPACITY, LISTENER_V4,
        LISTENER_V6, NETNS_CAPACITY, NETNS_EVENTS_BYTES, OWN_SOCKETS_CAPACITY,
    };

    const SOCK_STREAM: u32 = 1;
    /// `::ffff:0:0/96`, third 32-bit word, network byte order.
    const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();
    /// `64:ff9b::/96` (RFC 6052 NAT64), first word, network byte order.
    const NAT64_WORD0: u32 = 0x0064_ff9bu32.to_be();

    /// Return values of a connect hook.
    const ALLOW: i32 = 1;
    /// The connect() fails with EPERM (or the errno set by bpf_set_retval).
    const REFUSE: i32 = 0;
    /// Linux's ECONNREFUSED.
    const ECONNREFUSED: i32 = 111;

    // The #[map] names must be literals; make sure they are the shared ones.
    const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    const _: () = assert!(same(maps::DESTS_V4, "PHIGATE_DESTS_V4"));
    const _: () = assert!(same(maps::DESTS_V6, "PHIGATE_DESTS_V6"));
    const _: () = assert!(same(maps::SETTINGS, "PHIGATE_SETTINGS"));
    const _: () = assert!(same(maps::BY_COOKIE, "PHIGATE_BY_COOKIE"));
    const _: () = assert!(same(maps::BY_PEER, "PHIGATE_BY_PEER"));
    const _: () = assert!(same(maps::COUNTERS, "PHIGATE_COUNTERS"));
    const _: () = assert!(same(maps::LISTENERS, "PHIGATE_LISTENERS"));
    const _: () = assert!(same(maps::OWN_SOCKETS, "PHIGATE_OWN_SOCKETS"));
    const _: () = assert!(same(maps::NETNS_EVENTS, "PHIGATE_NETNS_EVENTS"));

    #[map(name = "PHIGATE_DESTS_V4")]
    static DESTS_V4: LpmTrie<DestKeyV4, DestValue> =
        LpmTrie::with_max_entries(DEST_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_DESTS_V6")]
    static DESTS_V6: LpmTrie<DestKeyV6, DestValue> =
        LpmTrie::with_max_entries(DEST_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_SETTINGS")]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    #[map(name = "PHIGATE_BY_COOKIE")]
    static BY_COOKIE: HashMap<u64, ConnectInfo> = HashMap::with_max_entries(CONN_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_BY_PEER")]
    static BY_PEER: HashMap<PeerKey, ConnectInfo> = HashMap::with_max_entries(CONN_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

    #[map(name = "PHIGATE_LISTENERS")]
    static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(2 * NETNS_CAPACITY, 0);

    #[map(name = "PHIGATE_NETNS_EVENTS")]
    static NETNS_EVENTS: RingBuf = RingBuf::with_byte_size(NETNS_EVENTS_BYTES, 0);

    #[map(name = "PHIGATE_OWN_SOCKETS")]
    static OWN_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(OWN_SOCKETS_CAPACITY, 0);

    #[inline(always)]
    fn count(index: u32) {
        if let Some(p) = COUNTERS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, programs are not preempted on their CPU.
            unsafe { *p += 1 };
        }
    }

    /// The settings the agent wrote, or None while it has not enabled the programs.
    #[inline(always)]
    fn settings() -> Option<Settings> {
        let s = SETTINGS.get(0)?;
        if s.enabled == 0 {
            None
        } else {
            Some(*s)
        }
    }

    /// Who listens where a protected connect would be sent.
    enum Listener {
        /// The agent's registered listening socket: safe to redirect.
        Agent,
        /// No agent listener is registered (the agent is not running).
        AgentDown,
        /// In the caller's network namespace the agent's address is held by another
        /// socket (or, in the agent's own namespace, by none while the agent is up).
        NotAgent,
        /// The caller's network namespace (not the agent's) has no agent listener and
        /// nothing at the agent's address while the agent is up: not served yet.
        Unserved,
    }

    #[inline(always)]
    fn listener_v4(ctx: &SockAddrContext, s: &Settings, port_be: u16) -> Listener {
        // SAFETY: an all-zero bpf_sock_tuple is valid.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv4.daddr = s.listen_v4_addr;
        tuple.__bindgen_anon_1.ipv4.dport = port_be;
        let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
        listener(ctx, &mut tuple, size as u32, LISTENER_V4, s.home_netns)
    }

    #[inline(always)]
    fn listener_v6(ctx: &SockAddrContext, s: &Settings, port_be: u16) -> Listener {
        // SAFETY: an all-zero bpf_sock_tuple is valid.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv6.daddr = s.listen_v6_addr;
        tuple.__bindgen_anon_1.ipv6.dport = port_be;
        let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
        listener(ctx, &mut tuple, size as u32, LISTENER_V6, s.home_netns)
    }

    /// Compares the socket the kernel would deliver `tuple` to (in the caller's
    /// namespace) with the agent's listener registered for that namespace in `slot`.
    /// Both are the kernel's own socket pointers: equal means the very same socket,
    /// which only the agent could have put in the map.
    #[inline(always)]
    fn listener(
        ctx: &SockAddrContext,
        tuple: &mut bpf_sock_tuple,
        size: u32,
        slot: u32,
        home_netns: u64,
    ) -> Listener {
        let p = ctx.sock_addr as *mut c_void;
        // SAFETY: helper allowed for cgroup sock_addr programs, called with its ctx.
        let netns_cookie = unsafe { bpf_get_netns_cookie(p) };
        let key = ListenerKey {
            netns_cookie,
            slot,
            _pad: 0,
        };
        // SAFETY: map lookup on a SOCKHASH returns a referenced socket or NULL; the
        // socket sk_lookup returns likewise; every non-NULL socket is released before
        // returning.
        unsafe {
            let agent = bpf_map_lookup_elem(
                (&raw const LISTENERS) as *mut c_void,
                (&raw const key) as *const c_void,
            ) as *mut bpf_sock;
            let found = bpf_sk_lookup_tcp(
                p,
                tuple as *mut bpf_sock_tuple,
                size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            let same = !agent.is_null() && found as u64 == agent as u64;
            let anybody = !found.is_null();
            if anybody {
                bpf_sk_release(found as *mut c_void);
            }
            if !agent.is_null() {
                bpf_sk_release(agent as *mut c_void);
                return if same {
                    Listener::Agent
                } else {
                    Listener::NotAgent
                };
            }
            if home_netns == 0 || home_netns == netns_cookie {
                return Listener::AgentDown;
            }
            if anybody {
                return Listener::NotAgent;
            }
            // Another namespace with no agent listener: the agent is up (its own
            // namespace's listener is registered) and has not served this one yet,
            // or the agent is down. Only the latter is the fail mode's to decide.
            let home_key = ListenerKey {
                netns_cookie: home_netns,
                slot,
                _pad: 0,
            };
            let home = bpf_map_lookup_elem(
                (&raw const LISTENERS) as *mut c_void,
                (&raw const home_key) as *const c_void,
            ) as *mut bpf_sock;
            if home.is_null() {
                return Listener::AgentDown;
            }
            bpf_sk_release(home as *mut c_void);
        }
        notify_unserved(netns_cookie);
        Listener::Unserved
    }

    /// Tells the agent a namespace needs a listener. A full ring buffer loses the
    /// event; the agent's periodic scan finds the namespace anyway.
    #[inline(always)]
    fn notify_unserved(netns_cookie: u64) {
        let event = NetnsEvent {
            netns_cookie,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            _pad: 0,
        };
        let _ = NETNS_EVENTS.output::<NetnsEvent>(&event, 0);
    }

    /// What to do with a protected connect, given who listens: `None` to redirect it.
    #[inline(always)]
    fn refuse_or_pass(l: Listener, s: &Settings) -> Option<i32> {
        match l {
            Listener::Agent => None,
            Listener::AgentDown if s.fail_open != 0 => {
                count(counters::PASSED_AGENT_DOWN);
                Some(ALLOW)
            }
            Listener::AgentDown => {
                count(counters::REFUSED_AGENT_DOWN);
                Some(REFUSE)
            }
            Listener::NotAgent => {
                count(counters::REFUSED_NOT_AGENT);
                Some(REFUSE)
            }
            // In both fail modes: the agent is up and serves the namespace at once
            // on the report; the client sees ECONNREFUSED (as from a server not
            // listening yet) and may retry, rather than EPERM.
            Listener::Unserved => {
                count(counters::REFUSED_UNSERVED_NETNS);
                // SAFETY: helper allowed for cgroup sock_addr programs (Linux 5.18+);
                // it only sets the errno the refused connect() returns.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
                Some(REFUSE)
            }
        }
    }

    /// Whether the connecting socket is one of the agent's own (cookie registered by
    /// the agent just before its connect()).
    #[inline(always)]
    fn own_socket(ctx: &SockAddrContext) -> bool {
        // SAFETY: helper allowed for cgroup sock_addr programs, called with its ctx.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        // SAFETY: only tested for presence.
        unsafe { OWN_SOCKETS.get(&cookie) }.is_some()
    }

    /// The socket type (SOCK_STREAM for TCP).
    ///
    /// # Safety
    /// `ctx` must be a cgroup sock_addr context.
    #[inline(always)]
    unsafe fn sock_type(ctx: &SockAddrContext) -> u32 {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        read_volatile(&raw const (*sa).type_)
    }

    /// Records the connect under its socket cookie; false when it cannot be stored.
    #[inline(always)]
    fn store(
        ctx: &SockAddrContext,
        orig_addr: [u32; 4],
        orig_port: u16,
        family: u16,
        dest_id: u32,
    ) -> bool {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
        let p = ctx.sock_addr as *mut c_void;
        // SAFETY: helpers allowed for cgroup sock_addr programs, called with its ctx.
        let (cookie, netns_cookie, cgroup_id, now) = unsafe {
            (
                bpf_get_socket_cookie(p),
                bpf_get_netns_cookie(p),
                bpf_get_current_cgroup_id(),
                bpf_ktime_get_boot_ns(),
            )
        };
        let info = ConnectInfo {
            orig_addr,
            orig_port,
            family,
            dest_id,
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            uid: uid_gid as u32,
            gid: (uid_gid >> 32) as u32,
            cgroup_id,
            socket_cookie: cookie,
            netns_cookie,
            connect_ns: now,
            comm,
        };
        if BY_COOKIE.insert(&cookie, &info, 0).is_err() {
            count(counters::STORE_FAILED);
            return false;
        }
        true
    }

    #[cgroup_sock_addr(connect4)]
    pub fn phigate_connect4(ctx: SockAddrContext) -> i32 {
        // SAFETY: ctx fields readable/writable in cgroup/connect4.
        unsafe { connect4(&ctx) }
    }

    #[inline(always)]
    unsafe fn connect4(ctx: &SockAddrContext) -> i32 {
        let Some(s) = settings() else { return ALLOW };
        if sock_type(ctx) != SOCK_STREAM {
            return ALLOW;
        }
        let sa = ctx.sock_addr;
        let ip = read_volatile(&raw const (*sa).user_ip4);
        let port_be = read_volatile(&raw const (*sa).user_port) as u16;
        let Some(dest_id) = match_v4(ip, port_be) else {
            return ALLOW;
        };
        if own_socket(ctx) {
            count(counters::EXEMPT_OWN);
            return ALLOW;
        }
        let listen_port_be = s.listen_v4_port.to_be();
        if let Some(r) = refuse_or_pass(listener_v4(ctx, &s, listen_port_be), &s) {
            return r;
        }
        if !store(ctx, [ip, 0, 0, 0], u16::from_be(port_be), AF_INET, dest_id) {
            return REFUSE;
        }
        write_volatile(&raw mut (*sa).user_ip4, s.listen_v4_addr);
        write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
        count(counters::REDIRECTED);
        ALLOW
    }

    #[inline(always)]
    fn match_v4(ip: u32, port_be: u16) -> Option<u32> {
        let key = Key::new(
            48,
            DestKeyV4 {
                port: port_be.to_ne_bytes(),
                addr: ip.to_ne_bytes(),
            },
        );
        DESTS_V4.get(&key).map(|v| v.dest_id)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn phigate_connect6(ctx: SockAddrContext) -> i32 {
        // SAFETY: ctx fields readable/writable in cgroup/connect6.
        unsafe { connect6(&ctx) }
    }

    #[inline(always)]
    unsafe fn connect6(ctx: &SockAddrContext) -> i32 {
        let Some(s) = settings() else { return ALLOW };
        if sock_type(ctx) != SOCK_STREAM {
            return ALLOW;
        }
        let sa = ctx.sock_addr;
        let ip = [
            read_volatile(&raw const (*sa).user_ip6[0]),
            read_volatile(&raw const (*sa).user_ip6[1]),
            read_volatile(&raw const (*sa).user_ip6[2]),
            read_volatile(&raw const (*sa).user_ip6[3]),
        ];
        let port_be = read_volatile(&raw const (*sa).user_port) as u16;
        let port = u16::from_be(port_be);

        // ::ffff:a.b.c.d (an IPv4 connect made through an IPv6 socket) and
        // 64:ff9b::a.b.c.d (the same IPv4 host through a NAT64 gateway) are the
        // protected IPv4 destination they embed.
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
        let nat64 = ip[0] == NAT64_WORD0 && ip[1] == 0 && ip[2] == 0;
        if mapped || nat64 {
            let Some(dest_id) = match_v4(ip[3], port_be) else {
                return ALLOW;
            };
            if own_socket(ctx) {
                count(counters::EXEMPT_OWN);
                return ALLOW;
            }
            let listen_port_be = s.listen_v4_port.to_be();
            if let Some(r) = refuse_or_pass(listener_v4(ctx, &s, listen_port_be), &s) {
                return r;
            }
            if !store(ctx, [ip[3], 0, 0, 0], port, AF_INET, dest_id) {
                return REFUSE;
            }
            // The agent's IPv4 listener, reached through this IPv6 socket.
            write_volatile(&raw mut (*sa).user_ip6[0], 0);
            write_volatile(&raw mut (*sa).user_ip6[1], 0);
            write_volatile(&raw mut (*sa).user_ip6[2], V4_MAPPED_WORD);
            write_volatile(&raw mut (*sa).user_ip6[3], s.listen_v4_addr);
            write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
            count(counters::REDIRECTED);
            return ALLOW;
        }

        let key = Key::new(
            144,
            DestKeyV6 {
                port: port_be.to_ne_bytes(),
                addr: words_to_bytes(ip),
            },
        );
        let Some(dest_id) = DESTS_V6.get(&key).map(|v| v.dest_id) else {
            return ALLOW;
        };
        if own_socket(ctx) {
            count(counters::EXEMPT_OWN);
            return ALLOW;
        }
        if s.listen_v6_port == 0 {
            // The config refuses this; never let it pass untouched.
            count(counters::V6_NO_LISTENER);
            return REFUSE;
        }
        let listen_port_be = s.listen_v6_port.to_be();
        if let Some(r) = refuse_or_pass(listener_v6(ctx, &s, listen_port_be), &s) {
            return r;
        }
        if !store(ctx, ip, port, AF_INET6, dest_id) {
            return REFUSE;
        }
        write_volatile(&raw mut (*sa).user_ip6[0], s.listen_v6_addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], s.listen_v6_addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], s.listen_v6_addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], s.listen_v6_addr[3]);
        write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
        count(counters::REDIRECTED);
        ALLOW
    }

    #[inline(always)]
    fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
        let mut b = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let x = w[i].to_ne_bytes();
            b[i * 4] = x[0];
            b[i * 4 + 1] = x[1];
            b[i * 4 + 2] = x[2];
            b[i * 4 + 3] = x[3];
            i += 1;
        }
        b
    }

    #[sock_ops]
    pub fn phigate_sockops(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            established(&ctx);
        } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
            closed(&ctx);
        }
        1
    }

    /// The by-peer key of a redirected client socket: its own address (as the agent
    /// sees the peer) in its own network namespace.
    #[inline(always)]
    fn peer_key(ctx: &SockOpsContext) -> PeerKey {
        // SAFETY: helper allowed for sockops with its ctx.
        let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
        let port = ctx.local_port() as u16;
        let (addr, family) = if ctx.family() == AF_INET as u32 {
            ([ctx.local_ip4(), 0, 0, 0], AF_INET)
        } else {
            let ip = ctx.local_ip6();
            if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD {
                // The agent accepted on its IPv4 listener and sees a plain IPv4 peer.
                ([ip[3], 0, 0, 0], AF_INET)
            } else {
                (ip, AF_INET6)
            }
        };
        PeerKey {
            addr,
            port,
            family,
            _pad: 0,
            netns_cookie,
        }
    }

    #[inline(always)]
    fn established(ctx: &SockOpsContext) {
        // SAFETY: helper allowed for sockops with its ctx.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        // SAFETY: the value is copied out before any other map operation.
        let Some(info) = (unsafe { BY_COOKIE.get(&cookie) }) else {
            return;
        };
        let info = *info;
        let key = peer_key(ctx);
        if BY_PEER.insert(&key, &info, 0).is_ok() {
            count(counters::ESTABLISHED);
            // Be told when this socket closes, to remove the entry with it.
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        } else {
            count(counters::STORE_FAILED);
        }
    }

    /// A redirected socket closed: its by-peer entry goes (if the agent did not take
    /// it), so its address can never hand its identity to a later connection.
    #[inline(always)]
    fn closed(ctx: &SockOpsContext) {
        let key = peer_key(ctx);
        if BY_PEER.remove(&key).is_ok() {
            count(counters::CLOSED_UNACCEPTED);
        }
    }

    /// The original destination of a redirected socket, if `ctx`'s socket is one.
    #[inline(always)]
    fn redirected(ctx: &SockAddrContext) -> Option<ConnectInfo> {
        settings()?;
        // SAFETY: helper allowed for cgroup sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        // SAFETY: copied out at once.
        unsafe { BY_COOKIE.get(&cookie) }.copied()
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn phigate_getpeername4(ctx: SockAddrContext) -> i32 {
        if let Some(info) = redirected(&ctx) {
            if info.family == AF_INET {
                let sa = ctx.sock_addr;
                // SAFETY: user_ip4/user_port are writable in cgroup/getpeername4.
                unsafe {
                    write_volatile(&raw mut (*sa).user_ip4, info.orig_addr[0]);
                    write_volatile(&raw mut (*sa).user_port, info.orig_port.to_be() as u32);
                }
            }
        }
        1
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn phigate_getpeername6(ctx: SockAddrContext) -> i32 {
        if let Some(info) = redirected(&ctx) {
            let sa = ctx.sock_addr;
            let addr = if info.family == AF_INET {
                [0, 0, V4_MAPPED_WORD, info.orig_addr[0]]
            } else {
                info.orig_addr
            };
            // SAFETY: user_ip6/user_port are writable in cgroup/getpeername6.
            unsafe {
                write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
                write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
                write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
                write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
                write_volatile(&raw mut (*sa).user_port, info.orig_port.to_be() as u32);
            }
        }
        1
    }

    #[cgroup_sock(sock_release)]
    pub fn phigate_sock_release(ctx: SockContext) -> i32 {
        // SAFETY: helper allowed for cgroup sock programs with their ctx.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut c_void) };
        if BY_COOKIE.remove(&cookie).is_ok() {
            count(counters::RELEASED);
        }
        1
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
