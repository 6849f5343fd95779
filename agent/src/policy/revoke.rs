//! Revocation: a new policy set applies to connections already open, not only to the
//! requests still to come. Each connection keeps the accesses it was granted (those in
//! flight and the latest one); when the set changes each is decided again, and a
//! connection holding one that is no longer allowed is closed at once, in-flight
//! streams and upgraded tunnels included.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tokio_util::sync::CancellationToken;

use super::gate::Access;

/// Why a connection was closed by a new policy set.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The hash of the set that no longer allows it.
    pub policy_set_hash: String,
    /// The policies that decided the denial (empty: no permit matches any more).
    pub policy_ids: Vec<String>,
    /// The decision's reason code (`no_permit`, `forbidden`, `token_required`...).
    pub reason: String,
    /// The method of the access that is no longer allowed (never its path: it may
    /// name a patient).
    pub method: String,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "access revoked by policy set {}: {} ({})",
            self.policy_set_hash,
            self.reason,
            if self.policy_ids.is_empty() {
                "no permit matches".to_owned()
            } else {
                format!("policies {}", self.policy_ids.join(", "))
            }
        )
    }
}

/// The accesses one connection holds, and its revocation switch.
#[derive(Default)]
pub struct Grants {
    held: Mutex<Held>,
    closed: CancellationToken,
    why: OnceLock<Revoked>,
}

#[derive(Default)]
struct Held {
    open: HashMap<u64, Arc<Access>>,
    latest: Option<Arc<Access>>,
    next: u64,
}

/// An access in use by one request; released when the request's record is written.
pub struct Grant {
    grants: Arc<Grants>,
    id: u64,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Ok(mut h) = self.grants.held.lock() {
            h.open.remove(&self.id);
        }
    }
}

impl Grants {
    /// Grants whose revocation switch also trips when `parent` is cancelled (the
    /// drain), so one token stops the connection for either reason.
    pub fn under(parent: &CancellationToken) -> Grants {
        Grants {
            closed: parent.child_token(),
            ..Grants::default()
        }
    }

    /// Notes an access the policies allowed; it stays held while the returned grant
    /// lives, and as the connection's latest access after that.
    pub fn grant(self: &Arc<Self>, access: Arc<Access>) -> Grant {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let id = h.next;
        h.next += 1;
        h.open.insert(id, Arc::clone(&access));
        h.latest = Some(access);
        Grant {
            grants: Arc::clone(self),
            id,
        }
    }

    /// Every access to decide again: those in flight and the latest.
    pub fn held(&self) -> Vec<Arc<Access>> {
        let h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Arc<Access>> = h.open.values().cloned().collect();
        if let Some(l) = &h.latest {
            if !all.iter().any(|a| Arc::ptr_eq(a, l)) {
                all.push(Arc::clone(l));
            }
        }
        all
    }

    /// Closes the connection; the first reason given is the one recorded.
    pub fn revoke(&self, why: Revoked) {
        let _ = self.why.set(why);
        self.closed.cancel();
    }

    /// Resolves when the connection has been revoked.
    pub fn revoked(&self) -> &CancellationToken {
        &self.closed
    }

    pub fn is_revoked(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn reason(&self) -> Option<&Revoked> {
        self.why.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(path: &str) -> Arc<Access> {
        Arc::new(Access {
            method: "GET".into(),
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            token: Err(crate::identity::token::TokenError::Missing),
            host: None,
            sni: None,
            has_approval: false,
        })
    }

    #[test]
    fn held_accesses_are_those_in_flight_and_the_latest() {
        let g = Arc::new(Grants::default());
        let long = g.grant(access("/export"));
        let short = g.grant(access("/a"));
        drop(short);
        let paths = |g: &Grants| {
            let mut p: Vec<String> = g.held().iter().map(|a| a.path.clone()).collect();
            p.sort();
            p
        };
        // The long-running export is still in flight; /a is the latest.
        assert_eq!(paths(&g), ["/a", "/export"]);
        drop(long);
        assert_eq!(paths(&g), ["/a"]);
        let _b = g.grant(access("/b"));
        assert_eq!(paths(&g), ["/b"]);
    }

    #[test]
    fn the_first_revocation_reason_is_kept() {
        let g = Grants::default();
        assert!(!g.is_revoked());
        let why = |r: &str| Revoked {
            policy_set_hash: "h".into(),
            policy_ids: vec!["p".into()],
            reason: r.into(),
            method: "GET".into(),
        };
        g.revoke(why("forbidden"));
        g.revoke(why("no_permit"));
        assert!(g.is_revoked());
        assert_eq!(g.reason().unwrap().reason, "forbidden");
        assert!(g.reason().unwrap().to_string().contains("policies p"));
    }
}
