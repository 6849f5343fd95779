//! Cedar entities for the parts of a request that repeat: the calling workload and
//! its token. Every request on a connection has the same workload and usually the
//! same token, and building their entities (a dozen attributes, each evaluated into
//! a Cedar value) was the largest part of `decide()`. Each policy set keeps its own
//! caches, so a reloaded set (whose schema may declare other attributes) never sees
//! another set's entities.
//!
//! Keys are the whole workload or token, compared for equality, so a hash collision
//! can never hand one caller another's entity. Bounded: a full cache is emptied and
//! refilled, which is cheap next to what an unbounded one would cost a host with
//! many short-lived processes.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use cedar_policy::Entity;

/// Entries per cache: far more callers than a host runs at once.
const CAPACITY: usize = 4096;

pub(super) struct EntityCache<K> {
    map: Mutex<HashMap<K, Entity, foldhash::fast::RandomState>>,
}

impl<K: Hash + Eq + Clone> EntityCache<K> {
    pub(super) fn new() -> Self {
        EntityCache {
            map: Mutex::new(HashMap::default()),
        }
    }

    /// The entity for `key`, built by `build` the first time.
    pub(super) fn get_or_build(
        &self,
        key: &K,
        build: impl FnOnce() -> Result<Entity, String>,
    ) -> Result<Entity, String> {
        if let Some(e) = self.lock().get(key) {
            return Ok(e.clone());
        }
        // Built outside the lock: two first requests may both build; both are right.
        let entity = build()?;
        let mut map = self.lock();
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(key.clone(), entity.clone());
        Ok(entity)
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// A panic while holding the lock leaves only a cache behind: use it.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entity, foldhash::fast::RandomState>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}
