//! What stands between the sign-in form and the password hashes: a bound on the
//! Argon2id checks running at once (each takes 19 MiB and tens of milliseconds of a
//! core, so a flood of sign-ins must not exhaust the host), and a backoff per
//! account and per client address after failed attempts, so a password cannot be
//! guessed at the rate the hashes can be checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// Password checks at once; beyond, sign-ins are turned away (503), not queued.
pub const CONCURRENT_CHECKS: usize = 2;
/// Failed attempts allowed before the backoff starts.
const FREE_FAILURES: u32 = 3;
/// The first wait; it doubles with each further failure, up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
/// Accounts and addresses remembered at most (oldest forgotten first).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// Until when further attempts are refused.
    fn until(&self) -> Instant {
        if self.count < FREE_FAILURES {
            return self.last;
        }
        let doublings = (self.count - FREE_FAILURES).min(20);
        self.last + (FIRST_WAIT * 2u32.pow(doublings)).min(MAX_WAIT)
    }
}

/// Why a sign-in attempt was not even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many checks running: try again shortly.
    Busy,
    /// The account or the address failed too often: wait this long.
    Backoff(Duration),
}

pub struct SignInGuard {
    checks: Semaphore,
    failures: Mutex<HashMap<Key, Failures>>,
}

impl Default for SignInGuard {
    fn default() -> Self {
        SignInGuard {
            checks: Semaphore::new(CONCURRENT_CHECKS),
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl SignInGuard {
    /// Admits an attempt for `account` from `addr`: a permit to check the password
    /// (hold it while checking), or why not.
    pub fn admit(&self, account: &str, addr: IpAddr) -> Result<SemaphorePermit<'_>, Refused> {
        let now = Instant::now();
        let wait = {
            let f = self.lock();
            [Key::Account(account.to_owned()), Key::Address(addr)]
                .iter()
                .filter_map(|k| f.get(k))
                .map(|x| x.until().saturating_duration_since(now))
                .max()
                .unwrap_or_default()
        };
        if !wait.is_zero() {
            return Err(Refused::Backoff(wait));
        }
        self.checks.try_acquire().map_err(|_| Refused::Busy)
    }

    /// Notes a failed attempt against the account and the address.
    pub fn failed(&self, account: &str, addr: IpAddr) {
        let now = Instant::now();
        let mut f = self.lock();
        if f.len() >= MAX_KEYS {
            // Forget what no longer holds anything back, then the oldest.
            f.retain(|_, x| x.until() > now);
            if f.len() >= MAX_KEYS {
                if let Some(oldest) = f.iter().min_by_key(|(_, x)| x.last).map(|(k, _)| k.clone()) {
                    f.remove(&oldest);
                }
            }
        }
        for k in [Key::Account(account.to_owned()), Key::Address(addr)] {
            let e = f.entry(k).or_insert(Failures {
                count: 0,
                last: now,
            });
            e.count = e.count.saturating_add(1);
            e.last = now;
        }
    }

    /// A successful sign-in clears the account's failures (not the address's: one
    /// right password must not reset guessing at other accounts from there).
    pub fn succeeded(&self, account: &str) {
        self.lock().remove(&Key::Account(account.to_owned()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Failures>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn failures_back_off_per_account_and_per_address() {
        let g = SignInGuard::default();
        for _ in 0..FREE_FAILURES - 1 {
            assert!(g.admit("alice", A).is_ok());
            g.failed("alice", A);
        }
        assert!(g.admit("alice", A).is_ok());
        g.failed("alice", A);
        // The account waits, from any address; the address waits, for any account.
        assert!(matches!(g.admit("alice", B), Err(Refused::Backoff(d)) if d <= FIRST_WAIT));
        assert!(matches!(g.admit("bob", A), Err(Refused::Backoff(_))));
        assert!(g.admit("bob", B).is_ok());
        // Doubling, capped.
        let f = Failures {
            count: FREE_FAILURES + 3,
            last: Instant::now(),
        };
        assert_eq!(f.until() - f.last, FIRST_WAIT * 8);
        let f = Failures {
            count: 1000,
            last: Instant::now(),
        };
        assert_eq!(f.until() - f.last, MAX_WAIT);
        // Success clears the account, not the address.
        g.succeeded("alice");
        assert!(g.admit("alice", B).is_ok());
        assert!(g.admit("carol", A).is_err());
    }

    #[test]
    fn password_checks_at_once_are_bounded() {
        let g = SignInGuard::default();
        let held: Vec<_> = (0..CONCURRENT_CHECKS)
            .map(|_| g.admit("alice", A).unwrap())
            .collect();
        assert_eq!(g.admit("bob", B).unwrap_err(), Refused::Busy);
        drop(held);
        assert!(g.admit("bob", B).is_ok());
    }

    #[test]
    fn the_table_is_bounded() {
        let g = SignInGuard::default();
        for i in 0..(MAX_KEYS as u32 + 50) {
            g.failed(&format!("user{i}"), A);
        }
        assert!(g.lock().len() <= MAX_KEYS + 1);
    }
}
