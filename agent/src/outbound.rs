//! phigate's own outbound HTTP calls, apart from the data plane: approval webhooks,
//! OIDC discovery and signing keys. The agent's own sockets ([`crate::sockets`]),
//! which the redirect lets pass; TLS verified against the system roots (plus an
//! optional CA), like every upstream; one connection per call, a bound on time and
//! on the answer's size.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
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
        let (status, _) = self
            .call(Method::POST, url, Some((body, "application/json")), 0)
            .await?;
        Ok(status)
    }

    /// POSTs a form (`application/x-www-form-urlencoded`, as OAuth 2.0 token requests
    /// are) over HTTPS only; returns the status and up to `limit` bytes of the answer.
    pub async fn post_form(
        &self,
        url: &str,
        form: String,
        limit: usize,
    ) -> Result<(u16, Bytes), String> {
        if !url.starts_with("https://") {
            return Err(format!("{url}: only https is used"));
        }
        let body = Some((form.into_bytes(), "application/x-www-form-urlencoded"));
        self.call(Method::POST, url, body, limit).await
    }

    /// GETs a JSON document of at most `limit` bytes over HTTPS (only: what it
    /// fetches decides who is trusted); an answer other than 200 is an error.
    pub async fn get_json(&self, url: &str, limit: usize) -> Result<serde_json::Value, String> {
        if !url.starts_with("https://") {
            return Err(format!("{url}: only https is used"));
        }
        let (status, body) = self.call(Method::GET, url, None, limit).await?;
        if status != 200 {
            return Err(format!("{url}: HTTP {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
    }

    /// PUTs `body` with `headers` as given (a presigned request: the caller signed
    /// them); returns the status and up to `limit` bytes of the answer.
    pub async fn put(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        limit: usize,
    ) -> Result<(u16, Bytes), String> {
        let body = Some((body, "application/octet-stream"));
        tokio::time::timeout(
            self.timeout,
            self.exchange(Method::PUT, url, body, headers, limit),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    /// One exchange within the timeout: the status and up to `limit` bytes of body.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<(Vec<u8>, &'static str)>,
        limit: usize,
    ) -> Result<(u16, Bytes), String> {
        tokio::time::timeout(self.timeout, self.exchange(method, url, body, &[], limit))
            .await
            .map_err(|_| format!("{url}: no answer within {:?}", self.timeout))?
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Option<(Vec<u8>, &'static str)>,
        headers: &[(String, String)],
        limit: usize,
    ) -> Result<(u16, Bytes), String> {
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
        let mut req = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("phigate/", env!("CARGO_PKG_VERSION")),
            );
        req = req.header(header::ACCEPT, "application/json");
        for (name, value) in headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let body = match body {
            Some((bytes, content_type)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        if https {
            let name = ServerName::try_from(bare).map_err(|e| format!("bad server name: {e}"))?;
            let tls = self
                .tls
                .connect(tcp, name)
                .await
                .map_err(|e| e.to_string())?;
            send(TokioIo::new(tls), req, limit).await
        } else {
            send(TokioIo::new(tcp), req, limit).await
        }
    }
}

async fn send<T>(io: T, req: Request<Full<Bytes>>, limit: usize) -> Result<(u16, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if limit == 0 {
        // Read (and drop) the body so the exchange completes.
        let _ = resp.into_body().collect().await;
        return Ok((status, Bytes::new()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
