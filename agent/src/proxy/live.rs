//! The HTTP connections open right now, so a new policy set can be applied to them
//! (see [`crate::policy::revoke`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::pipeline::ConnContext;
use crate::policy::gate::Gatekeeper;
use crate::policy::revoke::Revoked;

#[derive(Default)]
pub struct LiveConnections {
    conns: Mutex<HashMap<String, Weak<ConnContext>>>,
}

/// Keeps a connection listed while it is served.
pub struct Listed<'a> {
    live: &'a LiveConnections,
    id: String,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// A connection a new policy set closed.
#[derive(Debug, Clone)]
pub struct RevokedConnection {
    pub connection_id: String,
    pub destination: String,
    pub pid: u32,
    pub uid: u32,
    pub why: Revoked,
}

impl LiveConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<ConnContext>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self, ctx: &Arc<ConnContext>) -> Listed<'_> {
        self.lock()
            .insert(ctx.connection_id.clone(), Arc::downgrade(ctx));
        Listed {
            live: self,
            id: ctx.connection_id.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every held access of every open connection with `gate`, and closes
    /// the connections holding one it no longer allows.
    pub fn revoke_disallowed(&self, gate: &Gatekeeper) -> Vec<RevokedConnection> {
        let open: Vec<Arc<ConnContext>> = self.lock().values().filter_map(Weak::upgrade).collect();
        let mut revoked = Vec::new();
        for ctx in open {
            if ctx.grants.is_revoked() {
                continue;
            }
            let denied = ctx.grants.held().into_iter().find_map(|access| {
                let d = gate.recheck(&ctx.workload, &ctx.destination, &access);
                (!d.allowed).then(|| Revoked {
                    policy_set_hash: gate.policies.hash().to_owned(),
                    policy_ids: d.policy_ids,
                    reason: d.reason.code().to_owned(),
                    method: access.method.clone(),
                })
            });
            if let Some(why) = denied {
                tracing::warn!(
                    connection = %ctx.connection_id,
                    destination = %ctx.destination,
                    reason = %why,
                    "closing an open connection: the new policy set no longer allows it"
                );
                ctx.grants.revoke(why.clone());
                revoked.push(RevokedConnection {
                    connection_id: ctx.connection_id.clone(),
                    destination: ctx.destination.clone(),
                    pid: ctx.workload.pid,
                    uid: ctx.workload.uid,
                    why,
                });
            }
        }
        revoked
    }
}
