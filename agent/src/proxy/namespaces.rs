//! Serving every network namespace protected processes live in: the one agent holds
//! a listener (the configured listen addresses) inside each container's namespace,
//! registered with the redirect under that namespace's cookie, and serves it like
//! its own. Namespaces are found at start and every few seconds by walking the
//! protected cgroup (`redirect::protected_netns`), and at once when the programs
//! report a protected connect from a namespace with no listener; a namespace none of
//! whose processes is protected any more loses its listener.
//!
//! Upstream connections leave from the agent's own namespace (the host's), with the
//! same verified TLS and exemptions as for host processes: the container's namespace
//! is only where its connection is accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Proxy;
use crate::identity::{container::Container, runtime::RuntimeFacts};
use crate::redirect::{open_netns, protected_netns, NetnsEvents, NetnsId, Redirector};

/// How often the protected cgroup is walked for namespaces that came or went.
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// One served namespace.
struct Served {
    /// Its cookie (what the programs and the by-peer map key it by).
    cookie: u64,
    /// A protected process found in it.
    pid: u32,
    listeners: Vec<SocketAddr>,
    /// The container that process runs in, and what its runtime says of it.
    container: Option<(Container, RuntimeFacts)>,
    /// Cancelled when the namespace goes: its listeners close.
    stop: CancellationToken,
}

/// A served namespace, as `phigate status` shows it.
#[derive(Debug, Clone)]
pub struct ServedNamespace {
    pub inode: u64,
    pub cookie: u64,
    pub pid: u32,
    pub listeners: Vec<SocketAddr>,
    pub container: Option<(Container, RuntimeFacts)>,
}

/// The namespaces the agent serves besides its own.
pub struct Namespaces {
    proxy: Arc<Proxy>,
    redirector: Arc<Redirector>,
    cgroup: PathBuf,
    home: NetnsId,
    served: Mutex<BTreeMap<NetnsId, Served>>,
    /// (namespace, reason) pairs already warned about: a namespace that cannot be
    /// served is reported by every protected connect from it, warned about once.
    warned: Mutex<BTreeSet<(NetnsId, String)>>,
}

impl Namespaces {
    pub fn new(proxy: Arc<Proxy>, redirector: Arc<Redirector>) -> anyhow::Result<Namespaces> {
        let home = crate::redirect::own_netns().context("reading /proc/self/ns/net")?;
        Ok(Namespaces {
            cgroup: redirector.cgroup().to_path_buf(),
            proxy,
            redirector,
            home,
            served: Mutex::new(BTreeMap::new()),
            warned: Mutex::new(BTreeSet::new()),
        })
    }

    /// Serves the namespaces found now, and those that come, until the agent stops
    /// accepting; stops serving those that go.
    pub fn spawn(self: &Arc<Self>) {
        let events = self
            .redirector
            .take_netns_events()
            .map(NetnsEvents::new)
            .transpose()
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot watch for unserved namespaces; rescanning only");
                None
            });
        tokio::spawn(Arc::clone(self).follow(events));
    }

    async fn follow(self: Arc<Self>, mut events: Option<NetnsEvents>) {
        let stop = self.proxy.stop_accepting.clone();
        let mut tick = tokio::time::interval(RESCAN_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.reconcile(),
                reported = next_event(&mut events) => {
                    for e in reported {
                        self.serve_reported(e.pid);
                    }
                }
            }
        }
    }

    /// Makes the served namespaces those of the protected processes now.
    pub fn reconcile(&self) {
        let mut found = protected_netns(&self.cgroup);
        found.remove(&self.home);
        let mut served = lock(&self.served);
        served.retain(|id, s| {
            let keep = found.contains_key(id);
            if !keep {
                self.stop_serving(id, s);
            }
            keep
        });
        // A namespace that went may come back under its inode: warn about it again.
        lock(&self.warned).retain(|(id, _)| found.contains_key(id));
        for (id, pid) in found {
            if !served.contains_key(&id) {
                self.try_serve(&mut served, pid);
            }
        }
    }

    /// A protected connect came from a namespace with no listener: serve it now
    /// (the pid's namespace, whichever it is by now; a namespace with no protected
    /// process left is dropped again by the next scan).
    fn serve_reported(&self, pid: u32) {
        let mut served = lock(&self.served);
        self.try_serve(&mut served, pid);
    }

    fn try_serve(&self, served: &mut BTreeMap<NetnsId, Served>, pid: u32) {
        let (file, id) = match open_netns(pid) {
            Ok(x) => x,
            // The process exited: nothing to serve.
            Err(_) => return,
        };
        if id == self.home || served.contains_key(&id) {
            return;
        }
        match self.serve(&file, pid) {
            Ok(s) => {
                info!(
                    netns_inode = id.ino,
                    netns_cookie = s.cookie,
                    pid,
                    listeners = ?s.listeners,
                    container = s.container.as_ref().map(|(c, _)| c.id.as_str()),
                    "serving network namespace"
                );
                lock(&self.warned).retain(|(w, _)| *w != id);
                served.insert(id, s);
            }
            Err(e) => {
                let reason = format!("{e:#}");
                if lock(&self.warned).insert((id, reason.clone())) {
                    warn!(
                        netns_inode = id.ino,
                        pid,
                        error = reason,
                        "cannot serve network namespace; its protected connects are refused while the agent runs"
                    );
                }
            }
        }
    }

    /// Listens inside the namespace `file`, registers the listeners, serves them.
    fn serve(&self, file: &std::fs::File, pid: u32) -> anyhow::Result<Served> {
        let config = self.proxy.config();
        let v4_addr = config.agent.listen_v4;
        let v4 = crate::sockets::listen_in(Some(file), v4_addr)
            .with_context(|| format!("listening on {v4_addr} in the namespace"))?;
        let v6 = config.agent.listen_v6.and_then(|a| {
            crate::sockets::listen_in(Some(file), a)
                .inspect_err(|e| {
                    warn!(addr = %a, error = %e, "no IPv6 listener in the namespace; its IPv6 connects are refused");
                })
                .ok()
        });
        let cookie = self.redirector.register_netns_listeners(&v4, v6.as_ref())?;
        let stop = CancellationToken::new();
        let mut listeners = Vec::new();
        for l in std::iter::once(v4).chain(v6) {
            listeners.push(l.local_addr()?);
            let l = TcpListener::from_std(l)?;
            tokio::spawn(Arc::clone(&self.proxy).serve_until(l, stop.clone()));
        }
        Ok(Served {
            cookie,
            pid,
            listeners,
            container: self.proxy.identity.container_of(pid),
            stop,
        })
    }

    fn stop_serving(&self, id: &NetnsId, s: &Served) {
        s.stop.cancel();
        self.redirector.forget_netns_listeners(s.cookie);
        info!(
            netns_inode = id.ino,
            netns_cookie = s.cookie,
            "network namespace gone; its listeners closed"
        );
    }

    /// The namespaces served now.
    pub fn served(&self) -> Vec<ServedNamespace> {
        lock(&self.served)
            .iter()
            .map(|(id, s)| ServedNamespace {
                inode: id.ino,
                cookie: s.cookie,
                pid: s.pid,
                listeners: s.listeners.clone(),
                container: s.container.clone(),
            })
            .collect()
    }
}

/// The next reports of unserved namespaces; never, without a ring buffer.
async fn next_event(events: &mut Option<NetnsEvents>) -> Vec<phigate_common::NetnsEvent> {
    let Some(ev) = events else {
        return std::future::pending().await;
    };
    match ev.next().await {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "reading the unserved-namespace reports failed; rescanning only");
            *events = None;
            Vec::new()
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
