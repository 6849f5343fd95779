//! `protocol = "https"`: read the ClientHello, then either pass a pinned host through
//! uninspected or terminate TLS with a minted leaf and serve HTTP inside.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{tcp, Proxy, Redirected};
use crate::config::Destination;
use crate::io::Meter;
use crate::pipeline::ClientTls;
use crate::record::{ConnectionRecord, Outcome};
use crate::settings::Config;
use crate::tls::{self, LeafName, Sniffed};

#[allow(clippy::too_many_arguments)]
pub async fn serve<IO>(
    proxy: &Proxy,
    client: IO,
    meter: &Meter,
    conn: &Redirected,
    dest_index: u32,
    dest: &Destination,
    config: &Config,
    rec: &mut ConnectionRecord,
) -> (Outcome, Option<String>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = &config.timeouts;
    // The handshake's stages are boxed (as is serving, below): this future lives as
    // long as the connection, and should not keep room for states it has left.
    let (hello, start) = match Box::pin(tls::sniff_client_hello(client, t.tls_handshake)).await {
        Err(e) => return (Outcome::TlsHandshakeFailed, Some(e.to_string())),
        Ok(Sniffed::NotTls) => {
            return (
                Outcome::NotTls,
                Some("the client sent non-TLS bytes to an https destination".into()),
            )
        }
        Ok(Sniffed::Tls { hello, start }) => (hello, start),
    };
    rec.sni = hello.sni.clone();

    let pinned = hello.sni.as_deref().is_some_and(|sni| {
        dest.passthrough_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(sni))
    });
    if pinned {
        // An uninspected tunnel the client chose by its SNI: decided and recorded
        // like any passage, refused while it cannot be recorded.
        if !proxy.records.writable() {
            return (
                Outcome::RecordsUnavailable,
                Some("records cannot be written".into()),
            );
        }
        let open = match proxy.open_passage(
            rec,
            &conn.workload,
            &dest.name,
            crate::policy::Passage::Tunnel,
            hello.sni.as_deref(),
        ) {
            Ok(open) => open,
            Err(refused) => return refused,
        };
        let (prefix, io) = start.into_passthrough();
        let (outcome, error) = Box::pin(tcp::relay(
            io,
            meter,
            &prefix,
            conn.original_dst,
            config,
            &proxy.sockets,
            open.conn.stop(),
        ))
        .await;
        let (outcome, error) = open.conn.outcome(outcome, error);
        return match outcome {
            Outcome::Closed => (Outcome::Uninspected, error),
            other => (other, error),
        };
    }

    let name = match &hello.sni {
        Some(sni) => LeafName::Dns(sni.clone()),
        None => LeafName::Ip(conn.original_dst.ip()),
    };
    let alpn: Vec<Vec<u8>> = dest.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let server_config = match tls::server_config(&proxy.minter, &name, &alpn) {
        Ok(c) => c,
        Err(e) => {
            return (
                Outcome::Error,
                Some(format!("minting a certificate failed: {e}")),
            )
        }
    };
    let handshake_t0 = std::time::Instant::now();
    let handshake = Box::pin(tokio::time::timeout(
        t.tls_handshake,
        start.intercept(server_config),
    ));
    let stream = match handshake.await {
        Err(_) => {
            return (
                Outcome::TlsHandshakeFailed,
                Some(format!(
                    "TLS handshake not finished within {:?}",
                    t.tls_handshake
                )),
            )
        }
        Ok(Err(e)) => return (Outcome::TlsHandshakeFailed, Some(e.to_string())),
        Ok(Ok(s)) => s,
    };
    proxy
        .metrics
        .observe(crate::metrics::Stage::TlsHandshake, handshake_t0.elapsed());
    let client_tls = ClientTls {
        sni: hello.sni.clone(),
        version: tls::tls_version(&stream),
        alpn: tls::negotiated_alpn(&stream),
    };
    rec.tls_version = client_tls.version.clone();
    rec.alpn = client_tls.alpn.clone();

    // Boxed, the stream is one allocation its owners pass along by pointer, and
    // this function's handshake state is not kept beside the serving state.
    Box::pin(proxy.serve_requests(
        Box::new(stream),
        Some(client_tls),
        meter,
        conn,
        dest_index,
        dest,
        config,
        rec,
    ))
    .await
}
