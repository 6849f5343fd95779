//! phigate's own outbound sockets (upstreams, OIDC discovery, webhooks), made by one
//! [`SocketFactory`] injected at the bottom of every layer that connects out.
//!
//! When the agent itself runs inside a protected cgroup, its connects to a protected
//! destination would be redirected back to it. Each socket is therefore exempted by
//! its kernel socket cookie, registered with the redirect ([`Exemptions`]) just
//! before `connect()` and removed right after: a cookie is unique per boot and only
//! the agent can write the map, so no other process can claim the exemption (SO_MARK
//! could be set by any CAP_NET_RAW holder; it is still set, for host firewall rules,
//! but nothing trusts it).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Where the agent registers the cookies of its own sockets (the eBPF map, or nothing
/// when no redirect is attached, as for `phigate policy explain`).
pub trait Exemptions: Send + Sync + 'static {
    /// From now on, a connect from the socket with this cookie is not redirected.
    fn exempt(&self, cookie: u64) -> io::Result<()>;
    /// The socket has connected (or failed to): forget it.
    fn forget(&self, cookie: u64);
}

/// Makes the agent's outbound TCP connections.
#[derive(Clone)]
pub struct SocketFactory {
    mark: u32,
    exemptions: Option<Arc<dyn Exemptions>>,
}

impl std::fmt::Debug for SocketFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketFactory")
            .field("mark", &self.mark)
            .field("exempt", &self.exemptions.is_some())
            .finish()
    }
}

impl SocketFactory {
    /// `mark`: SO_MARK for the host's firewall (0: none). `exemptions`: the redirect's
    /// own-socket registry, if a redirect is attached.
    pub fn new(mark: u32, exemptions: Option<Arc<dyn Exemptions>>) -> Self {
        SocketFactory { mark, exemptions }
    }

    /// Connects to `addr` within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if self.mark != 0 {
            socket2::SockRef::from(&socket).set_mark(self.mark)?;
        }
        // Held across connect(); dropped (forgotten) on success, failure or timeout.
        let _exempt = match &self.exemptions {
            Some(e) => Some(Exempt::register(e.clone(), socket_cookie(&socket)?)?),
            None => None,
        };
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out after {timeout:?}"),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A registered exemption, removed on drop.
struct Exempt {
    registry: Arc<dyn Exemptions>,
    cookie: u64,
}

impl Exempt {
    fn register(registry: Arc<dyn Exemptions>, cookie: u64) -> io::Result<Exempt> {
        registry.exempt(cookie)?;
        Ok(Exempt { registry, cookie })
    }
}

impl Drop for Exempt {
    fn drop(&mut self) {
        self.registry.forget(self.cookie);
    }
}

/// A listening TCP socket on `addr` (non-blocking, SO_REUSEADDR, IPv6-only for an
/// IPv6 address), made in the network namespace `netns` (a `/proc/PID/ns/net` file)
/// or in the agent's own when `None`. A socket stays in the namespace it was created
/// in: a short-lived thread enters the namespace, creates it and ends, so no other
/// thread of the agent ever changes namespace.
pub(crate) fn listen_in(
    netns: Option<&std::fs::File>,
    addr: SocketAddr,
) -> io::Result<std::net::TcpListener> {
    let Some(ns) = netns else {
        return listen(addr);
    };
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("phigate-setns".into())
        .spawn(move || {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on this thread only (it ends right after), valid fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            listen(addr)
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The kernel's cookie of a socket (SO_COOKIE): what `bpf_get_socket_cookie` returns.
pub(crate) fn socket_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    getsockopt_u64(s, libc::SO_COOKIE)
}

/// The cookie of the network namespace a socket lives in (SO_NETNS_COOKIE, Linux
/// 5.14+): what `bpf_get_netns_cookie` returns for sockets of that namespace.
pub(crate) fn netns_cookie(s: &impl AsRawFd) -> io::Result<u64> {
    /// Not in every libc crate version yet.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    getsockopt_u64(s, SO_NETNS_COOKIE)
}

fn getsockopt_u64(s: &impl AsRawFd, opt: libc::c_int) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a u64 out-buffer with its length.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<(bool, u64)>>);
    impl Exemptions for Log {
        fn exempt(&self, cookie: u64) -> io::Result<()> {
            self.0.lock().unwrap().push((true, cookie));
            Ok(())
        }
        fn forget(&self, cookie: u64) {
            self.0.lock().unwrap().push((false, cookie));
        }
    }

    #[tokio::test]
    async fn a_connect_is_exempt_by_its_own_cookie_only_while_connecting() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let log = Arc::new(Log::default());
        let f = SocketFactory::new(0, Some(log.clone()));
        let s = f
            .connect(l.local_addr().unwrap(), Duration::from_secs(2))
            .await
            .unwrap();
        let cookie = socket_cookie(&s).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![(true, cookie), (false, cookie)]
        );
    }

    #[tokio::test]
    async fn a_failed_connect_is_forgotten_too() {
        // A port nothing listens on (bound, then closed).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = Arc::new(Log::default());
        let f = SocketFactory::new(0, Some(log.clone()));
        assert!(f.connect(addr, Duration::from_secs(2)).await.is_err());
        let log = log.0.lock().unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!((log[0].0, log[1].0), (true, false));
        assert_eq!(log[0].1, log[1].1);
    }

    #[test]
    fn sockets_of_one_namespace_share_its_cookie() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(netns_cookie(&a).unwrap(), netns_cookie(&b).unwrap());
        assert_ne!(socket_cookie(&a).unwrap(), socket_cookie(&b).unwrap());
    }
}
