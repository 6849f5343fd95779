//! Leaf certificates minted per server name from the local CA.
//!
//! One P-256 leaf key is generated at start and reused for every leaf (as mitmproxy
//! does): minting is then one signature, and the cache bounds how often even that
//! happens. Leaves live 397 days at most (browser limit), never past the CA, and are
//! backdated two days for clock skew.
//!
//! The TLS server configuration presenting a leaf is cached beside it: building one
//! per connection cost a provider, a session cache and their allocations each time,
//! and made resumption impossible. Every configuration shares one ticketer and one
//! session store, so a client that comes back resumes instead of a full handshake.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use super::{CertAuthority, TlsError};

/// The name a leaf is for: the client's SNI, or the original destination's address
/// when the client sent none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LeafName {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for LeafName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafName::Dns(d) => f.write_str(d),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// TLS 1.2 session ids remembered for resumption (TLS 1.3 uses tickets, which
/// the agent does not store).
const SESSION_CACHE_ENTRIES: usize = 1024;

/// A server configuration's cache key: the leaf's name and the ALPN list offered.
type ConfigKey = (LeafName, Vec<Vec<u8>>);

/// A cached server configuration and the leaf it presents.
struct ServedLeaf {
    key: Arc<CertifiedKey>,
    config: Arc<ServerConfig>,
}

pub struct LeafMinter {
    ca: Arc<CertAuthority>,
    leaf_key: KeyPair,
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    cache: Mutex<LruCache<LeafName, Arc<CertifiedKey>>>,
    /// Server configurations by leaf and ALPN list, each with the leaf it was built
    /// for: reused only while that is still the leaf the cache gives.
    configs: Mutex<LruCache<ConfigKey, ServedLeaf>>,
    /// Resumption state shared by every configuration (TLS 1.3 tickets, TLS 1.2
    /// session ids).
    pub(crate) ticketer: Arc<dyn ProducesTickets>,
    pub(crate) sessions: Arc<dyn StoresServerSessions>,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl LeafMinter {
    pub fn new(ca: Arc<CertAuthority>, cache_capacity: usize) -> Result<Self, TlsError> {
        let leaf_key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TlsError::rcgen)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| TlsError::Config(format!("leaf key: {e}")))?;
        Ok(LeafMinter {
            ca,
            leaf_key,
            signing_key,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(cache_capacity.max(1)).expect("non-zero"),
            )),
            configs: Mutex::new(LruCache::new(
                NonZeroUsize::new(cache_capacity.max(1)).expect("non-zero"),
            )),
            ticketer: rustls::crypto::ring::Ticketer::new()
                .map_err(|e| TlsError::Config(format!("session ticketer: {e}")))?,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The leaf (with the CA in its chain) for `name`, from the cache or minted now.
    pub fn certified_key(&self, name: &LeafName) -> Result<Arc<CertifiedKey>, TlsError> {
        if let Some(k) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(k.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Minted outside the lock: two concurrent misses for one name both mint.
        let key = Arc::new(self.mint(name)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(name.clone(), key.clone());
        Ok(key)
    }

    /// The server configuration presenting `name`'s leaf and offering `alpn`,
    /// cached; `build` makes one for a leaf when none is cached for it.
    pub(crate) fn server_config(
        &self,
        name: &LeafName,
        alpn: &[Vec<u8>],
        build: impl FnOnce(Arc<CertifiedKey>) -> Result<ServerConfig, TlsError>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let key = self.certified_key(name)?;
        let lookup = (name.clone(), alpn.to_vec());
        if let Some(served) = self
            .configs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lookup)
        {
            if Arc::ptr_eq(&served.key, &key) {
                return Ok(served.config.clone());
            }
        }
        let config = Arc::new(build(key.clone())?);
        self.configs.lock().unwrap_or_else(|p| p.into_inner()).put(
            lookup,
            ServedLeaf {
                key,
                config: config.clone(),
            },
        );
        Ok(config)
    }

    fn mint(&self, name: &LeafName) -> Result<CertifiedKey, TlsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(d) => SanType::DnsName(d.clone().try_into().map_err(|_| {
                TlsError::Config(format!("`{d}` is not a valid DNS name for a certificate"))
            })?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(2);
        params.not_after = (now + Duration::days(397)).min(self.ca.not_after());
        let (issuer, issuer_key) = self.ca.issuer();
        let cert = params
            .signed_by(&self.leaf_key, issuer, issuer_key)
            .map_err(TlsError::rcgen)?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.ca.cert_der().clone()],
            self.signing_key.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mints_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(CertAuthority::load_or_create(dir.path(), None).unwrap());
        let m = LeafMinter::new(ca, 8).unwrap();
        let name = LeafName::Dns("patients.example.test".into());
        let a = m.certified_key(&name).unwrap();
        let b = m.certified_key(&name).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(m.hits.load(Ordering::Relaxed), 1);
        assert_eq!(a.cert.len(), 2, "leaf + CA");
        let (_, leaf) = x509_parser::parse_x509_certificate(&a.cert[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value).contains("patients.example.test"));
        assert!(
            leaf.validity().not_before.timestamp()
                < OffsetDateTime::now_utc().unix_timestamp() - 86_400
        );
        let ip = m
            .certified_key(&LeafName::Ip("127.0.0.2".parse().unwrap()))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &ip));
    }
}
