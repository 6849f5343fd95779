//! Decisions remembered. A decision is a pure function of the policy set and the
//! request's parts Cedar sees: the workload, the token (or why there is none), the
//! destination, the action, method and path, the host and SNI, the clock's hour,
//! minute and weekday, the approval, and the query and headers when a candidate
//! policy reads them. Clients repeat those parts (a service polling one endpoint,
//! the same caller on a keep-alive connection), and building the Cedar request
//! (entity store, transitive closure, context) then evaluating it was the largest
//! cost of `decide()`; a repeat is now a hash and a comparison.
//!
//! Keys hold every part, compared for equality: a hash collision or a request that
//! differs in anything Cedar could see never gets another's decision. The memo
//! belongs to one policy set, so a reload starts empty; it is emptied before each
//! request-model fit like the entity caches. Bounded: a full memo is emptied and
//! refilled.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;

use super::index::ContextReads;
use super::{AccessRequest, Clock, Decision};
use crate::identity::token::{TokenError, TokenIdentity};
use crate::identity::Workload;

/// Decisions held at most: far more distinct (caller, endpoint, minute) triples
/// than a host's clients repeat within a minute.
const CAPACITY: usize = 4096;

pub(super) struct DecisionMemo {
    state: foldhash::fast::RandomState,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Keyed by the parts' hash; a bucket holds the (rare) colliding keys.
    map: HashMap<u64, Vec<(Key, Decision)>, foldhash::fast::RandomState>,
    len: usize,
}

/// Every part of a request a decision depends on, owned.
struct Key {
    action: String,
    workload: Workload,
    token: Option<TokenIdentity>,
    token_error: Option<TokenError>,
    destination: String,
    method: String,
    path: String,
    host: Option<String>,
    sni: Option<String>,
    clock: Clock,
    has_approval: bool,
    /// Present only when a candidate policy reads them (else they cannot matter).
    query: Option<Vec<(String, String)>>,
    headers: Option<Vec<(String, String)>>,
}

impl Key {
    fn of(action: &str, req: &AccessRequest<'_>, reads: ContextReads) -> Key {
        Key {
            action: action.to_owned(),
            workload: req.workload.clone(),
            token: req.token.cloned(),
            token_error: req.token_error,
            destination: req.destination.to_owned(),
            method: req.method.to_owned(),
            path: req.path.to_owned(),
            host: req.host.map(str::to_owned),
            sni: req.sni.map(str::to_owned),
            clock: req.clock,
            has_approval: req.has_approval,
            query: reads.query.then(|| req.query.to_vec()),
            headers: reads.headers.then(|| req.headers.to_vec()),
        }
    }

    fn matches(&self, action: &str, req: &AccessRequest<'_>, reads: ContextReads) -> bool {
        self.action == action
            && self.clock == req.clock
            && self.has_approval == req.has_approval
            && self.token_error == req.token_error
            && self.path == req.path
            && self.method == req.method
            && self.destination == req.destination
            && self.host.as_deref() == req.host
            && self.sni.as_deref() == req.sni
            && self.token.as_ref() == req.token
            && self.query.as_deref() == reads.query.then_some(req.query)
            && self.headers.as_deref() == reads.headers.then_some(req.headers)
            && &self.workload == req.workload
    }
}

impl DecisionMemo {
    pub(super) fn new() -> Self {
        DecisionMemo {
            state: foldhash::fast::RandomState::default(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The decision remembered for this request, or `decide`'s, remembered.
    pub(super) fn get_or_decide(
        &self,
        action: &str,
        req: &AccessRequest<'_>,
        reads: ContextReads,
        decide: impl FnOnce() -> Decision,
    ) -> Decision {
        let hash = self.hash(action, req, reads);
        if let Some(bucket) = self.lock().map.get(&hash) {
            if let Some((_, d)) = bucket.iter().find(|(k, _)| k.matches(action, req, reads)) {
                return d.clone();
            }
        }
        // Decided outside the lock: two first requests may both decide; both are right.
        let decision = decide();
        let mut inner = self.lock();
        if inner.len >= CAPACITY {
            inner.map.clear();
            inner.len = 0;
        }
        inner
            .map
            .entry(hash)
            .or_default()
            .push((Key::of(action, req, reads), decision.clone()));
        inner.len += 1;
        decision
    }

    pub(super) fn clear(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.len = 0;
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len
    }

    /// Hashes the parts [`Key::matches`] compares (equal parts, equal hash).
    fn hash(&self, action: &str, req: &AccessRequest<'_>, reads: ContextReads) -> u64 {
        let mut h = self.state.build_hasher();
        action.hash(&mut h);
        req.workload.hash(&mut h);
        req.token.hash(&mut h);
        req.token_error.map(|e| e.code()).hash(&mut h);
        req.destination.hash(&mut h);
        req.method.hash(&mut h);
        req.path.hash(&mut h);
        req.host.hash(&mut h);
        req.sni.hash(&mut h);
        (req.clock.hour, req.clock.minute, req.clock.weekday).hash(&mut h);
        req.has_approval.hash(&mut h);
        reads.query.then_some(req.query).hash(&mut h);
        reads.headers.then_some(req.headers).hash(&mut h);
        h.finish()
    }

    /// A panic while holding the lock leaves only a memo behind: use it.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
