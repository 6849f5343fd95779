//! The client side of an intercepted connection: read the ClientHello first, then
//! either pass the untouched bytes through (pinned hosts) or terminate TLS with a
//! minted leaf.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::{Acceptor, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

use super::{LeafMinter, LeafName, TlsError};

/// A ClientHello is at most a few KiB; anything larger before it completes is refused.
const MAX_HELLO_BYTES: usize = 64 * 1024;

/// What the client asked for in its ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

pub enum Sniffed<IO> {
    Tls {
        hello: ClientHelloInfo,
        start: Handshake<IO>,
    },
    /// The first bytes are not a TLS handshake record.
    NotTls,
}

/// A connection whose ClientHello has been read but not answered.
pub struct Handshake<IO> {
    prefix: Vec<u8>,
    io: IO,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Handshake<IO> {
    /// Completes the handshake as the server named by `config`'s certificate.
    pub async fn intercept(self, config: Arc<ServerConfig>) -> io::Result<TlsStream<Prefixed<IO>>> {
        tokio_rustls::TlsAcceptor::from(config)
            .accept(Prefixed::new(self.prefix, self.io))
            .await
    }

    /// The bytes read so far and the stream, to relay untouched.
    pub fn into_passthrough(self) -> (Vec<u8>, IO) {
        (self.prefix, self.io)
    }
}

/// Reads until a whole ClientHello has arrived (bounded in time and size).
pub async fn sniff_client_hello<IO>(mut io: IO, timeout: Duration) -> Result<Sniffed<IO>, TlsError>
where
    IO: AsyncRead + Unpin,
{
    let mut prefix = Vec::with_capacity(2048);
    let mut acceptor = Acceptor::default();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, io.read(&mut chunk))
            .await
            .map_err(|_| {
                TlsError::Handshake(format!("no complete ClientHello within {timeout:?}"))
            })?
            .map_err(|e| TlsError::Handshake(format!("reading the ClientHello: {e}")))?;
        if n == 0 {
            return Err(TlsError::Handshake(
                "the client closed before completing its ClientHello".into(),
            ));
        }
        prefix.extend_from_slice(&chunk[..n]);
        // A TLS handshake record starts with content type 22.
        if prefix[0] != 0x16 {
            return Ok(Sniffed::NotTls);
        }
        if prefix.len() > MAX_HELLO_BYTES {
            return Err(TlsError::Handshake("ClientHello larger than 64 KiB".into()));
        }
        let mut feed = &chunk[..n];
        while !feed.is_empty() {
            acceptor
                .read_tls(&mut feed)
                .map_err(|e| TlsError::Handshake(format!("malformed TLS record: {e}")))?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let ch = accepted.client_hello();
                let hello = ClientHelloInfo {
                    sni: ch.server_name().map(|s| s.to_ascii_lowercase()),
                    alpn: ch
                        .alpn()
                        .map(|a| a.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                };
                return Ok(Sniffed::Tls {
                    hello,
                    start: Handshake { prefix, io },
                });
            }
            Err((e, _alert)) => {
                return Err(TlsError::Handshake(format!("malformed ClientHello: {e}")))
            }
        }
    }
}

/// Server config presenting the leaf for `name`, offering `alpn` (in preference order).
pub fn server_config(
    minter: &LeafMinter,
    name: &LeafName,
    alpn: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    minter.server_config(name, alpn, |key| {
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Fixed(key)));
        config.alpn_protocols = alpn.to_vec();
        config.ticketer = minter.ticketer.clone();
        config.session_storage = minter.sessions.clone();
        Ok(config)
    })
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// "TLSv1_3" style name of the negotiated version.
pub fn tls_version<IO>(s: &TlsStream<IO>) -> Option<String> {
    s.get_ref().1.protocol_version().map(|v| format!("{v:?}"))
}

pub fn negotiated_alpn<IO>(s: &TlsStream<IO>) -> Option<String> {
    s.get_ref()
        .1
        .alpn_protocol()
        .map(|a| String::from_utf8_lossy(a).into_owned())
}

/// A stream that first yields `prefix`, then reads from `io`.
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Prefixed { prefix, pos: 0, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    // Forwarded so rustls hands all its pending TLS records to one writev, not one
    // write per record.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
