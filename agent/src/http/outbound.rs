//! phigate's own outbound HTTP calls (webhooks): the agent's own sockets
//! ([`crate::sockets`]), which the redirect lets pass, and TLS is verified against the system roots (plus an optional CA),
//! like every upstream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

use crate::sockets::SocketFactory;
use crate::tls::UpstreamTls;

/// A client for small outbound requests: one connection per call.
#[derive(Clone)]
pub struct Outbound {
    pub sockets: SocketFactory,
    pub tls: Arc<UpstreamTls>,
    pub timeout: Duration,
}

impl Outbound {
    /// POSTs a JSON body; returns the response status, or why it failed.
    pub async fn post_json(&self, url: &str, body: Vec<u8>) -> Result<u16, String> {
        tokio::time::timeout(self.timeout, self.post(url, body))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    async fn post(&self, url: &str, body: Vec<u8>) -> Result<u16, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("only http and https URLs".into()),
        };
        let host = uri.host().ok_or("URL without a host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addr = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let tcp = self
            .sockets
            .connect(addr, self.timeout)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        let req = Request::post(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("phigate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        if https {
            let name = ServerName::try_from(bare).map_err(|e| format!("bad server name: {e}"))?;
            let tls = self
                .tls
                .connect(tcp, name)
                .await
                .map_err(|e| e.to_string())?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    // Read (and drop) the body so the exchange completes.
    let _ = resp.into_body().collect().await;
    Ok(status)
}
