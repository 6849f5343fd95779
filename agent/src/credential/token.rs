//! The access token cache of one credential: a token is used until it is close to
//! expiring (the last fifth of its life, at most a minute), then one fetch replaces
//! it, shared by every request that needs it meanwhile (single flight). A failed
//! fetch fails those requests; it never hands out a token past its expiry.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// An access token as the token endpoint issued it.
#[derive(Clone)]
pub struct Token {
    /// The `Authorization` value (`Bearer …`), marked sensitive.
    pub value: http::HeaderValue,
    pub lifetime: Duration,
}

/// Fetches a new token (the token endpoint, or a test's stand-in).
pub trait Fetch: Send + Sync {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, String>> + Send + '_>>;
}

/// Where a token handed out came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Fetched for this request (or by the one fetch it waited on).
    TokenEndpoint,
    Cached,
}

struct Held {
    value: http::HeaderValue,
    /// Used until then; fetched again after.
    refresh_at: Instant,
    expires_at: Instant,
    /// Wall clock, for `phigate status`.
    valid_until: SystemTime,
}

/// What the cache reports about itself (never the token).
#[derive(Debug, Clone, Default)]
pub struct CacheState {
    pub valid_until: Option<SystemTime>,
    pub last_refresh: Option<SystemTime>,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Fetches ended, successful or not.
    pub attempts: u64,
}

pub struct TokenCache {
    fetch: Arc<dyn Fetch>,
    held: Mutex<Option<Held>>,
    /// Held by the one fetch in flight; the others wait on it, then read `held`.
    fetching: tokio::sync::Mutex<()>,
    state: Mutex<CacheState>,
}

/// How long before expiry a token is replaced: a fifth of its life, at most 60 s.
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(Duration::from_secs(60))
}

impl TokenCache {
    pub fn new(fetch: Arc<dyn Fetch>) -> TokenCache {
        TokenCache {
            fetch,
            held: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// A token valid now: the cached one until its refresh time, else a new one.
    pub async fn token(&self) -> Result<(http::HeaderValue, Source), String> {
        if let Some(v) = self.fresh() {
            return Ok((v, Source::Cached));
        }
        let seen = self.read_state().attempts;
        let _flight = self.fetching.lock().await;
        if self.read_state().attempts != seen {
            // A fetch ended while this request waited for it: its outcome is this
            // request's too (a failure is not tried again by every waiter in turn).
            if let Some(v) = self.fresh() {
                return Ok((v, Source::TokenEndpoint));
            }
            return self.fallback();
        }
        let fetched = self.fetch.fetch().await;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.attempts += 1;
        match fetched {
            Ok(t) => {
                drop(s);
                Ok((self.hold(t), Source::TokenEndpoint))
            }
            Err(e) => {
                s.failures += 1;
                s.last_error = Some(e);
                drop(s);
                self.fallback()
            }
        }
    }

    /// After a failed fetch: a token still unexpired (past its refresh time) serves
    /// while the endpoint fails; never one past its expiry.
    fn fallback(&self) -> Result<(http::HeaderValue, Source), String> {
        match self.unexpired() {
            Some(v) => Ok((v, Source::Cached)),
            None => Err(self
                .read_state()
                .last_error
                .unwrap_or_else(|| "no token".into())),
        }
    }

    fn read_state(&self) -> CacheState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn hold(&self, t: Token) -> http::HeaderValue {
        let now = Instant::now();
        let valid_until = SystemTime::now() + t.lifetime;
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held {
            value: t.value.clone(),
            refresh_at: now + t.lifetime - margin(t.lifetime),
            expires_at: now + t.lifetime,
            valid_until,
        });
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.valid_until = Some(valid_until);
        s.last_refresh = Some(SystemTime::now());
        s.last_error = None;
        t.value
    }

    fn fresh(&self) -> Option<http::HeaderValue> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|h| Instant::now() < h.refresh_at)
            .map(|h| h.value.clone())
    }

    fn unexpired(&self) -> Option<http::HeaderValue> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|h| Instant::now() < h.expires_at)
            .map(|h| h.value.clone())
    }

    pub fn state(&self) -> CacheState {
        let mut s = self.read_state();
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        s.valid_until = held.as_ref().map(|h| h.valid_until);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Counts its fetches; each takes `delay` and returns token N, living `lifetime`,
    /// or fails while `down`.
    struct Counting {
        n: AtomicU32,
        delay: Duration,
        lifetime: Duration,
        down: std::sync::atomic::AtomicBool,
    }

    impl Fetch for Counting {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Token, String>> + Send + '_>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if self.down.load(Ordering::SeqCst) {
                    return Err("token endpoint unreachable".into());
                }
                let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Token {
                    value: format!("Bearer t{n}").parse().unwrap(),
                    lifetime: self.lifetime,
                })
            })
        }
    }

    fn counting(lifetime_secs: u64) -> Arc<Counting> {
        Arc::new(Counting {
            n: AtomicU32::new(0),
            delay: Duration::from_millis(50),
            lifetime: Duration::from_secs(lifetime_secs),
            down: Default::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_fetch() {
        let f = counting(300);
        let cache = Arc::new(TokenCache::new(f.clone()));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.token().await })
            })
            .collect();
        for t in tasks {
            let (v, how) = t.await.unwrap().unwrap();
            assert_eq!(v, "Bearer t1");
            assert_eq!(how, Source::TokenEndpoint);
        }
        assert_eq!(f.n.load(Ordering::SeqCst), 1);
        assert_eq!(cache.token().await.unwrap().1, Source::Cached);
        assert_eq!(f.n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_failed_fetch() {
        let f = counting(300);
        f.down.store(true, Ordering::SeqCst);
        let cache = Arc::new(TokenCache::new(f.clone()));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.token().await })
            })
            .collect();
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            assert!(e.contains("unreachable"), "{e}");
        }
        assert_eq!(cache.state().failures, 1, "one fetch failed, once");
        // The next request tries again.
        f.down.store(false, Ordering::SeqCst);
        assert_eq!(cache.token().await.unwrap().0, "Bearer t1");
    }

    #[tokio::test(start_paused = true)]
    async fn refreshed_before_expiry_and_never_served_expired() {
        let f = counting(100);
        let cache = TokenCache::new(f.clone());
        assert_eq!(cache.token().await.unwrap().0, "Bearer t1");
        // Within the first four fifths of its life: the same token.
        tokio::time::advance(Duration::from_secs(79)).await;
        assert_eq!(
            cache.token().await.unwrap(),
            ("Bearer t1".parse().unwrap(), Source::Cached)
        );
        // In the last fifth (still valid): replaced.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            cache.token().await.unwrap(),
            ("Bearer t2".parse().unwrap(), Source::TokenEndpoint)
        );
        // The endpoint goes down: the unexpired token serves until its expiry, then
        // requests fail rather than get an expired token.
        f.down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(85)).await;
        assert_eq!(cache.token().await.unwrap().0, "Bearer t2");
        tokio::time::advance(Duration::from_secs(20)).await;
        let e = cache.token().await.unwrap_err();
        assert!(e.contains("unreachable"), "{e}");
        let s = cache.state();
        assert_eq!(s.failures, 2);
        assert!(s.last_error.is_some());
    }
}
