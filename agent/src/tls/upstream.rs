//! TLS from phigate to the real upstream: always verified, against the system roots
//! plus an optional per-destination CA bundle. There is no switch to turn it off.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::TlsError;
use crate::config::upstream_auth::{agent_uid, secret_file_problem, ClientCert};

/// Why the upstream TLS session failed, in words fit for a 502 body (no secrets).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("upstream certificate not trusted (unknown issuer)")]
    UnknownIssuer,
    #[error("upstream certificate is not valid for {0}")]
    NotValidForName(String),
    #[error("upstream certificate expired")]
    Expired,
    #[error("upstream certificate rejected: {0}")]
    BadCertificate(String),
    #[error("TLS handshake with upstream failed: {0}")]
    Handshake(String),
}

pub struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
}

/// A verified TLS stream to the upstream with what was negotiated.
pub struct UpstreamTlsStream {
    stream: TlsStream<TcpStream>,
    subject: Option<String>,
    version: Option<String>,
}

impl UpstreamTls {
    /// System roots (/etc/ssl/certs via rustls-native-certs) plus `extra_ca` (PEM);
    /// with `client_cert`, the certificate chain and key (PEM, the key 0600) phigate
    /// presents when the upstream asks for one (mutual TLS).
    pub fn new(
        extra_ca: Option<&Path>,
        client_cert: Option<&ClientCert>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    message: format!("cannot read upstream_ca: {e}"),
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    message: format!("upstream_ca is not a PEM certificate bundle: {e}"),
                })?;
            if certs.is_empty() {
                return Err(TlsError::File {
                    path: path.to_owned(),
                    message: "upstream_ca holds no certificates".into(),
                });
            }
            for c in certs {
                roots.add(c).map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    message: format!("upstream_ca certificate rejected: {e}"),
                })?;
            }
        }
        if roots.is_empty() {
            return Err(TlsError::Config(
                "no trusted roots: the system store is empty and no upstream_ca is set".into(),
            ));
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some(c) => {
                let (chain, key) = client_identity(c)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::File {
                        path: c.key.clone(),
                        message: format!("client key does not fit client_cert_file: {e}"),
                    })?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    pub async fn connect(
        &self,
        tcp: TcpStream,
        name: ServerName<'static>,
    ) -> Result<UpstreamTlsStream, UpstreamTlsError> {
        let shown = match &name {
            ServerName::DnsName(d) => d.as_ref().to_owned(),
            ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
            other => format!("{other:?}"),
        };
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| classify(e, &shown))?;
        let (_, conn) = stream.get_ref();
        let subject = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| {
                x509_parser::parse_x509_certificate(der)
                    .ok()
                    .map(|(_, c)| c.subject().to_string())
            });
        let version = conn.protocol_version().map(|v| format!("{v:?}"));
        Ok(UpstreamTlsStream {
            stream,
            subject,
            version,
        })
    }
}

/// The client certificate chain and its key, the key checked like every secret.
pub(crate) fn client_identity(
    c: &ClientCert,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let fail = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| {
            fail(
                &c.cert,
                format!("client_cert_file is not a PEM certificate chain: {e}"),
            )
        })?;
    if chain.is_empty() {
        return Err(fail(
            &c.cert,
            "client_cert_file holds no certificate".into(),
        ));
    }
    if let Some(problem) = secret_file_problem(&c.key, agent_uid()) {
        return Err(TlsError::Config(problem));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| {
        fail(
            &c.key,
            format!("client_key_file is not a PEM private key: {e}"),
        )
    })?;
    Ok((chain, key))
}

fn classify(e: io::Error, name: &str) -> UpstreamTlsError {
    let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return UpstreamTlsError::Handshake(e.to_string());
    };
    match rustls_err {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => UpstreamTlsError::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                UpstreamTlsError::NotValidForName(name.to_owned())
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                UpstreamTlsError::Expired
            }
            other => UpstreamTlsError::BadCertificate(format!("{other:?}")),
        },
        other => UpstreamTlsError::Handshake(other.to_string()),
    }
}

impl UpstreamTlsStream {
    pub fn alpn(&self) -> Option<&[u8]> {
        self.stream.get_ref().1.alpn_protocol()
    }
    pub fn tls_version(&self) -> Option<&str> {
        self.version.as_deref()
    }
    pub fn peer_subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }
}

impl tokio::io::AsyncRead for UpstreamTlsStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for UpstreamTlsStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    // Forwarded so hyper queues a request's head and body as separate buffers for one
    // vectored TLS write, instead of first copying them into one.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
