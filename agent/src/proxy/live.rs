//! The connections open right now, so a new policy set can be applied to them (see
//! [`crate::policy::revoke`]): HTTP connections by the accesses they hold, uninspected
//! passages (TCP relays, TLS tunnels) as the passage they were allowed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio_util::sync::CancellationToken;

use crate::identity::Workload;
use crate::pipeline::ConnContext;
use crate::policy::gate::Gatekeeper;
use crate::policy::revoke::{Grants, Revoked};
use crate::policy::Passage;
use crate::record::Outcome;

#[derive(Default)]
pub struct LiveConnections {
    conns: Mutex<HashMap<String, Live>>,
}

enum Live {
    Http(Weak<ConnContext>),
    Passage(Weak<PassageConn>),
}

/// An uninspected passage being relayed: who, where, which passage (and the SNI of a
/// tunnel), and its revocation switch, a child of the drain.
pub struct PassageConn {
    pub connection_id: String,
    pub workload: Arc<Workload>,
    pub destination: String,
    pub passage: Passage,
    pub sni: Option<String>,
    grants: Grants,
}

impl PassageConn {
    pub fn new(
        connection_id: String,
        workload: Arc<Workload>,
        destination: String,
        passage: Passage,
        sni: Option<String>,
        drain: &CancellationToken,
    ) -> PassageConn {
        PassageConn {
            connection_id,
            workload,
            destination,
            passage,
            sni,
            grants: Grants::under(drain),
        }
    }

    /// Cancelled by the drain or by revocation: the relay stops on either.
    pub fn stop(&self) -> &CancellationToken {
        self.grants.revoked()
    }

    /// The relay's outcome, told apart from a drain when a new policy set closed it.
    pub fn outcome(&self, outcome: Outcome, error: Option<String>) -> (Outcome, Option<String>) {
        match (outcome, self.grants.reason()) {
            (Outcome::Drained, Some(why)) => (Outcome::Revoked, Some(why.to_string())),
            other => (other.0, error),
        }
    }
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self, ctx: &Arc<ConnContext>) -> Listed<'_> {
        self.lock()
            .insert(ctx.connection_id.clone(), Live::Http(Arc::downgrade(ctx)));
        Listed {
            live: self,
            id: ctx.connection_id.clone(),
        }
    }

    /// Lists a passage. List it before deciding it: a reload after the decision then
    /// finds it here, and one before is the set that decides.
    pub fn list_passage(&self, p: &Arc<PassageConn>) -> Listed<'_> {
        self.lock()
            .insert(p.connection_id.clone(), Live::Passage(Arc::downgrade(p)));
        Listed {
            live: self,
            id: p.connection_id.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Decides every held access of every open connection, and every open passage,
    /// with `gate`, and closes the connections it no longer allows.
    pub fn revoke_disallowed(&self, gate: &Gatekeeper) -> Vec<RevokedConnection> {
        enum Open {
            Http(Arc<ConnContext>),
            Passage(Arc<PassageConn>),
        }
        let open: Vec<Open> = self
            .lock()
            .values()
            .filter_map(|l| match l {
                Live::Http(w) => w.upgrade().map(Open::Http),
                Live::Passage(w) => w.upgrade().map(Open::Passage),
            })
            .collect();
        let revoked_by = |d: crate::policy::Decision, method: &str| Revoked {
            policy_set_hash: gate.policies.hash().to_owned(),
            policy_ids: d.policy_ids,
            reason: d.reason.code().to_owned(),
            method: method.to_owned(),
        };
        let mut revoked = Vec::new();
        for conn in open {
            let (id, destination, workload, grants, why) = match &conn {
                Open::Http(ctx) => {
                    if ctx.grants.is_revoked() {
                        continue;
                    }
                    let why = ctx.grants.held().into_iter().find_map(|access| {
                        let d = gate.recheck(&ctx.workload, &ctx.destination, &access);
                        (!d.allowed).then(|| revoked_by(d, &access.method))
                    });
                    (
                        &ctx.connection_id,
                        &ctx.destination,
                        &ctx.workload,
                        &*ctx.grants,
                        why,
                    )
                }
                Open::Passage(p) => {
                    if p.grants.is_revoked() {
                        continue;
                    }
                    let d = gate.check_connection(
                        &p.workload,
                        &p.destination,
                        p.passage,
                        p.sni.as_deref(),
                    );
                    let why = (!d.allowed).then(|| revoked_by(d, p.passage.action()));
                    (
                        &p.connection_id,
                        &p.destination,
                        &p.workload,
                        &p.grants,
                        why,
                    )
                }
            };
            if let Some(why) = why {
                tracing::warn!(
                    connection = %id,
                    destination = %destination,
                    reason = %why,
                    "closing an open connection: the new policy set no longer allows it"
                );
                grants.revoke(why.clone());
                revoked.push(RevokedConnection {
                    connection_id: id.clone(),
                    destination: destination.clone(),
                    pid: workload.pid,
                    uid: workload.uid,
                    why,
                });
            }
        }
        revoked
    }
}
