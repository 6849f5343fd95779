//! The L7 path without eBPF: the original-destination lookup is a trait, so a
//! `StaticOrigDst` stands in for the kernel maps and the rest (accept, identity,
//! HTTP pipeline, forwarding, records) is the real code.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use crate::identity::IdentityResolver;
use crate::proxy::Proxy;
use crate::record::{RecordSink, Table};
use crate::redirect::{Attested, StaticOrigDst};
use crate::settings::Config;

/// A one-shot HTTP/1.1 upstream that answers every request with a fixed body.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\ncontent-type: application/json\r\n\r\n{\"ok\":true}").unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_flows_through_the_pipeline_with_a_static_lookup() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let up = upstream();
    let cfg = format!(
        "[agent]\nlisten = \"127.0.0.1:15001\"\nstate_dir = \"{d}/state\"\nrecords_dir = \"{d}/records\"\npolicies_dir = \"{d}/policies\"\n[[destinations]]\nname = \"api\"\naddresses = [\"{up}\"]\nprotocol = \"http\"\n",
        d = dir.path().display()
    );
    // Deny by default: this test is about the data path, so one permit for all.
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/schema.cedarschema"),
        policies.join("schema.cedarschema"),
    )
    .unwrap();
    std::fs::write(
        policies.join("allow-all.cedar"),
        "@id(\"test.allow-all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let config = Config::parse(&dir.path().join("phigate.toml"), &cfg).unwrap();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (store, _) = crate::app::open_store(
        &config,
        metrics.clone(),
        &crate::sockets::SocketFactory::new(0, None),
    )
    .unwrap();
    let store = Arc::new(store);
    let records: Arc<dyn RecordSink> = store.clone();
    let ca = Arc::new(crate::app::load_ca(&config).unwrap());
    let lookup = Arc::new(StaticOrigDst::default());
    let approvals = Arc::new(
        crate::approval::Approvals::open(
            &config.agent.state_dir,
            records.clone(),
            crate::approval::notify::Notifier {
                client: None,
                console_url: None,
            },
            metrics.clone(),
        )
        .await
        .unwrap(),
    );
    // No redirect here: the agent's own sockets need no exemption.
    let sockets = crate::sockets::SocketFactory::new(0, None);
    let pipeline = crate::state::build_pipeline(
        &config,
        records.clone(),
        approvals,
        &sockets,
        metrics.clone(),
    )
    .unwrap();
    let proxy = Arc::new(Proxy::new(
        config,
        pipeline,
        lookup.clone(),
        IdentityResolver::new(std::env::temp_dir()),
        records,
        Arc::new(crate::tls::LeafMinter::new(ca, 16).unwrap()),
        sockets,
        metrics,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = listener.local_addr().unwrap();
    tokio::spawn(Arc::clone(&proxy).serve(listener));

    let me = std::process::id();
    let body = tokio::task::spawn_blocking(move || {
        // Bind first so the lookup can be filled before the connection exists.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let local = sock.local_addr().unwrap().as_socket().unwrap();
        lookup.insert(
            local,
            Attested {
                original_dst: up,
                dest_id: 0,
                pid: me,
                tid: me,
                uid: 0,
                gid: 0,
                comm: "pipeline-test".into(),
                cgroup_id: 0,
                socket_cookie: 1,
                connect_boot_ns: u64::MAX,
            },
        );
        sock.connect(&agent.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.write_all(b"GET /Patient/1 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.ends_with("{\"ok\":true}"), "{body}");
    assert!(
        body.to_ascii_lowercase().contains("x-phigate-request-id"),
        "{body}"
    );

    // Let the connection's own record in, then close: closing the store writes
    // every buffered row to Parquet.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .unwrap();
    let rows = crate::record::read::rows(&dir.path().join("records"), Table::Requests).unwrap();
    assert_eq!(
        rows.len(),
        1,
        "{rows:?} {:?}",
        crate::record::seal::walk(&dir.path().join("records"))
    );
    let rec = &rows[0];
    // The patient id in the path is recorded only as its keyed pseudonym.
    let pseudonyms =
        crate::record::pseudonym::load_or_create(&dir.path().join("state"), vec!["Patient".into()])
            .unwrap();
    let p1 = pseudonyms.pseudonym("1");
    assert_eq!(rec["path"], format!("/Patient/{p1}"));
    assert_eq!(rec["patient_refs"], serde_json::json!([p1]));
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["comm"], "pipeline-test");
    assert_eq!(rec["destination"], "api");
    assert_eq!(rec["original_dst"], up.to_string());
    assert_eq!(rec["outcome"], "complete");
    assert_eq!(rec["chain_seq"], 0);
    assert_eq!(rec["response_headers"]["content-type"], "application/json");

    // The records verify with the exported public key.
    let key = crate::record::seal::PublicKey::read(&dir.path().join("state/records-signing.pub"))
        .unwrap();
    let report = crate::record::verify::verify(&dir.path().join("records"), &key).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.tables["requests"].rows, 1);
}
