//! TLS interception: the local CA ([`CertAuthority`]), leaves minted per name
//! ([`LeafMinter`]), reading the ClientHello before deciding ([`sniff_client_hello`]),
//! and verified TLS to the upstream ([`UpstreamTls`]).
#![forbid(unsafe_code)]

mod accept;
mod ca;
pub(crate) mod config;
mod mint;
mod upstream;

use std::path::{Path, PathBuf};

pub use accept::{negotiated_alpn, server_config, sniff_client_hello, tls_version, Sniffed};
pub use ca::{install_into_trust_store, CertAuthority};
pub use mint::{LeafMinter, LeafName};
pub(crate) use upstream::client_identity;
pub use upstream::{UpstreamTls, UpstreamTlsError, UpstreamTlsStream};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(String),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake with the client: {0}")]
    Handshake(String),
}

impl TlsError {
    fn io(path: &Path, e: std::io::Error) -> Self {
        TlsError::File {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
    fn rcgen(e: rcgen::Error) -> Self {
        TlsError::Rcgen(e.to_string())
    }
}
