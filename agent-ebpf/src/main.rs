//! phigate's eBPF programs.
//!
//! * `cgroup/connect4`, `cgroup/connect6`: a TCP connect to a protected destination is
//!   rewritten to the agent's listener; the original destination and the caller (as the
//!   kernel sees it in the connecting task) are stored under the socket cookie.
//! * `sockops` (ACTIVE_ESTABLISHED_CB): copies that entry to a map keyed by the client's
//!   own address, which is what the agent sees as the peer after `accept()`.
//! * `cgroup/getpeername4`, `cgroup/getpeername6`: a redirected socket reports the
//!   original destination as its peer.
//! * `cgroup/sock_release`: forgets the socket's entry.
//!
//! Every program returns 1 (allow): failing closed is done by redirecting to an agent
//! that may not be listening (ECONNREFUSED), never by rejecting the syscall.
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
        bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    };
    use aya_ebpf::helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_sk_lookup_tcp, bpf_sk_release,
    };
    use aya_ebpf::helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    };
    use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops};
    use aya_ebpf::maps::lpm_trie::Key;
    use aya_ebpf::maps::{Array, LpmTrie, LruHashMap, PerCpuArray};
    use aya_ebpf::programs::{SockAddrContext, SockContext, SockOpsContext};
    use phigate_common::{
        counters, maps, ConnectInfo, DestKeyV4, DestKeyV6, DestValue, PeerKey, Settings, AF_INET,
        AF_INET6, CONN_MAP_CAPACITY, DEST_MAP_CAPACITY,
    };

    const SOCK_STREAM: u32 = 1;
    /// `::ffff:0:0/96`, third 32-bit word, network byte order.
    const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

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

    #[map(name = "PHIGATE_DESTS_V4")]
    static DESTS_V4: LpmTrie<DestKeyV4, DestValue> =
        LpmTrie::with_max_entries(DEST_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_DESTS_V6")]
    static DESTS_V6: LpmTrie<DestKeyV6, DestValue> =
        LpmTrie::with_max_entries(DEST_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_SETTINGS")]
    static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

    #[map(name = "PHIGATE_BY_COOKIE")]
    static BY_COOKIE: LruHashMap<u64, ConnectInfo> =
        LruHashMap::with_max_entries(CONN_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_BY_PEER")]
    static BY_PEER: LruHashMap<PeerKey, ConnectInfo> =
        LruHashMap::with_max_entries(CONN_MAP_CAPACITY, 0);

    #[map(name = "PHIGATE_COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

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

    /// Whether a TCP socket listens on addr:port (both network byte order) in the
    /// caller's network namespace (fail-open check).
    #[inline(always)]
    fn listening_v4(ctx: &SockAddrContext, addr: u32, port_be: u16) -> bool {
        // SAFETY: an all-zero bpf_sock_tuple is valid.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv4.daddr = addr;
        tuple.__bindgen_anon_1.ipv4.dport = port_be;
        let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
        lookup_tcp(ctx, &mut tuple, size as u32)
    }

    #[inline(always)]
    fn listening_v6(ctx: &SockAddrContext, addr: [u32; 4], port_be: u16) -> bool {
        // SAFETY: an all-zero bpf_sock_tuple is valid.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv6.daddr = addr;
        tuple.__bindgen_anon_1.ipv6.dport = port_be;
        let size = size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
        lookup_tcp(ctx, &mut tuple, size as u32)
    }

    #[inline(always)]
    fn lookup_tcp(ctx: &SockAddrContext, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
        // SAFETY: helper call with a valid ctx and tuple; a found socket is released.
        unsafe {
            let sk = bpf_sk_lookup_tcp(
                ctx.sock_addr as *mut c_void,
                tuple as *mut bpf_sock_tuple,
                size,
                BPF_F_CURRENT_NETNS as u64,
                0,
            );
            if sk.is_null() {
                false
            } else {
                bpf_sk_release(sk as *mut c_void);
                true
            }
        }
    }

    /// The socket type (SOCK_STREAM for TCP) and the socket's SO_MARK.
    ///
    /// # Safety
    /// `ctx` must be a cgroup sock_addr context (ctx->sk is then never NULL).
    #[inline(always)]
    unsafe fn sock_type_and_mark(ctx: &SockAddrContext) -> (u32, u32) {
        let sa: *mut bpf_sock_addr = ctx.sock_addr;
        let ty = read_volatile(&raw const (*sa).type_);
        let sk = read_volatile(&raw const (*sa).__bindgen_anon_1.sk);
        let mark = read_volatile(&raw const (*sk).mark);
        (ty, mark)
    }

    /// Records the connect under its socket cookie.
    #[inline(always)]
    fn store(
        ctx: &SockAddrContext,
        orig_addr: [u32; 4],
        orig_port: u16,
        family: u16,
        dest_id: u32,
    ) {
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
                bpf_ktime_get_ns(),
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
        if BY_COOKIE.insert(cookie, info, 0).is_err() {
            count(counters::STORE_FAILED);
        }
    }

    #[cgroup_sock_addr(connect4)]
    pub fn phigate_connect4(ctx: SockAddrContext) -> i32 {
        // SAFETY: ctx fields readable/writable in cgroup/connect4.
        unsafe { connect4(&ctx) };
        1
    }

    #[inline(always)]
    unsafe fn connect4(ctx: &SockAddrContext) {
        let Some(s) = settings() else { return };
        let (ty, mark) = sock_type_and_mark(ctx);
        if ty != SOCK_STREAM {
            return;
        }
        let sa = ctx.sock_addr;
        let ip = read_volatile(&raw const (*sa).user_ip4);
        let port_be = read_volatile(&raw const (*sa).user_port) as u16;
        let Some(dest_id) = match_v4(ip, port_be) else {
            return;
        };
        if s.agent_mark != 0 && mark == s.agent_mark {
            count(counters::EXEMPT_MARK);
            return;
        }
        let listen_port_be = s.listen_v4_port.to_be();
        if s.fail_open != 0 && !listening_v4(ctx, s.listen_v4_addr, listen_port_be) {
            count(counters::PASSED_AGENT_DOWN);
            return;
        }
        store(ctx, [ip, 0, 0, 0], u16::from_be(port_be), AF_INET, dest_id);
        write_volatile(&raw mut (*sa).user_ip4, s.listen_v4_addr);
        write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
        count(counters::REDIRECTED);
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
        unsafe { connect6(&ctx) };
        1
    }

    #[inline(always)]
    unsafe fn connect6(ctx: &SockAddrContext) {
        let Some(s) = settings() else { return };
        let (ty, mark) = sock_type_and_mark(ctx);
        if ty != SOCK_STREAM {
            return;
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

        if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD {
            // ::ffff:a.b.c.d — an IPv4 connect made through an IPv6 socket.
            let Some(dest_id) = match_v4(ip[3], port_be) else {
                return;
            };
            if s.agent_mark != 0 && mark == s.agent_mark {
                count(counters::EXEMPT_MARK);
                return;
            }
            let listen_port_be = s.listen_v4_port.to_be();
            if s.fail_open != 0 && !listening_v4(ctx, s.listen_v4_addr, listen_port_be) {
                count(counters::PASSED_AGENT_DOWN);
                return;
            }
            store(ctx, [ip[3], 0, 0, 0], port, AF_INET, dest_id);
            write_volatile(&raw mut (*sa).user_ip6[3], s.listen_v4_addr);
            write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
            count(counters::REDIRECTED);
            return;
        }

        let key = Key::new(
            144,
            DestKeyV6 {
                port: port_be.to_ne_bytes(),
                addr: words_to_bytes(ip),
            },
        );
        let Some(dest_id) = DESTS_V6.get(&key).map(|v| v.dest_id) else {
            return;
        };
        if s.agent_mark != 0 && mark == s.agent_mark {
            count(counters::EXEMPT_MARK);
            return;
        }
        if s.listen_v6_port == 0 {
            count(counters::V6_NO_LISTENER);
            return;
        }
        let listen_port_be = s.listen_v6_port.to_be();
        if s.fail_open != 0 && !listening_v6(ctx, s.listen_v6_addr, listen_port_be) {
            count(counters::PASSED_AGENT_DOWN);
            return;
        }
        store(ctx, ip, port, AF_INET6, dest_id);
        write_volatile(&raw mut (*sa).user_ip6[0], s.listen_v6_addr[0]);
        write_volatile(&raw mut (*sa).user_ip6[1], s.listen_v6_addr[1]);
        write_volatile(&raw mut (*sa).user_ip6[2], s.listen_v6_addr[2]);
        write_volatile(&raw mut (*sa).user_ip6[3], s.listen_v6_addr[3]);
        write_volatile(&raw mut (*sa).user_port, listen_port_be as u32);
        count(counters::REDIRECTED);
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
        if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            established(&ctx);
        }
        1
    }

    #[inline(always)]
    fn established(ctx: &SockOpsContext) {
        // SAFETY: helper allowed for sockops with its ctx.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        // SAFETY: the value is copied out before any other map operation.
        let Some(info) = (unsafe { BY_COOKIE.get(cookie) }) else {
            return;
        };
        let info = *info;
        let family = ctx.family();
        let port = ctx.local_port() as u16;
        let key = if family == AF_INET as u32 {
            PeerKey {
                addr: [ctx.local_ip4(), 0, 0, 0],
                port,
                family: AF_INET,
            }
        } else {
            let ip = ctx.local_ip6();
            if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD {
                // The agent accepted on its IPv4 listener and sees a plain IPv4 peer.
                PeerKey {
                    addr: [ip[3], 0, 0, 0],
                    port,
                    family: AF_INET,
                }
            } else {
                PeerKey {
                    addr: ip,
                    port,
                    family: AF_INET6,
                }
            }
        };
        if BY_PEER.insert(key, info, 0).is_ok() {
            count(counters::ESTABLISHED);
        } else {
            count(counters::STORE_FAILED);
        }
    }

    /// The original destination of a redirected socket, if `ctx`'s socket is one.
    #[inline(always)]
    fn redirected(ctx: &SockAddrContext) -> Option<ConnectInfo> {
        settings()?;
        // SAFETY: helper allowed for cgroup sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        // SAFETY: copied out at once.
        unsafe { BY_COOKIE.get(cookie) }.copied()
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
        if BY_COOKIE.remove(cookie).is_ok() {
            count(counters::RELEASED);
        }
        1
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
