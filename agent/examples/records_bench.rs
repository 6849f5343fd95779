//! `cargo xtask bench records`: what recording costs, measured on the record store
//! itself with realistic request records (about 1 KiB of JSON each).
//!
//! - throughput: records/s made durable with many concurrent writers, in strict mode
//!   (each writer waits for its fsync) and in batched mode (submit, then one final
//!   durable marker), and the rate at which they reach signed Parquet files;
//! - added latency: at a fixed 1,000 records/s, how long a strict record waits to be
//!   durable (what strict mode adds to a response), beside recording off (zero wait).
//!
//! Usage: records_bench DIR SECONDS

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use phigate::identity::Workload;
use phigate::record::journal::Durability;
use phigate::record::store::{RecordStore, StoreConfig};
use phigate::record::{new_id, EventRecord, Origin, Record, RecordSink, RequestRecord};

const CONCURRENCY: usize = 256;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "/tmp/phigate-bench".into()));
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let workload = Arc::new(sample_workload());

    println!(
        "records bench: {secs} s per figure, {CONCURRENCY} concurrent writers, records in {}",
        dir.display()
    );
    // Latency first, on a quiet disk.
    println!("added latency per request at 1,000 req/s (time until the record is durable)");
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "mode", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "recording off", 0.0, 0.0, 0.0
    );
    let d = fresh(&dir, "disk")?;
    let disk = disk_sync_latency(&d, secs)?;
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "the disk alone (1 KiB + fdatasync)",
        pct(&disk, 0.50),
        pct(&disk, 0.99),
        pct(&disk, 1.0)
    );
    let d = fresh(&dir, "latency")?;
    let lat = rt.block_on(paced_latency(&d, secs, &workload))?;
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "strict",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );

    println!(
        "\n{:<34} {:>14} {:>16}",
        "mode", "durable rec/s", "in Parquet rec/s"
    );
    for (name, durability) in [
        ("strict (fsync before release)", Durability::Strict),
        (
            "batched (window 10 ms)",
            Durability::Batched {
                window: Duration::from_millis(10),
            },
        ),
    ] {
        let d = fresh(&dir, name)?;
        let (durable, parquet) = rt.block_on(throughput(&d, durability, secs, &workload))?;
        println!("{name:<34} {durable:>14.0} {parquet:>16.0}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A new directory for one run, after earlier runs' data reached the disk (their
/// writeback would otherwise be charged to this run's fsyncs).
fn fresh(base: &Path, name: &str) -> anyhow::Result<PathBuf> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let d = base.join(name.split_whitespace().next().unwrap_or("run"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn open(dir: &Path, durability: Durability) -> anyhow::Result<Arc<RecordStore>> {
    let (store, _) = RecordStore::open(
        StoreConfig {
            records_dir: dir.join("records"),
            state_dir: dir.join("state"),
            durability,
            // The agent's defaults.
            rotate_rows: 100_000,
            rotate_bytes: 64 << 20,
            rotate_age: Duration::from_secs(60),
            row_group_rows: 10_000,
            retention_days: 0,
            metrics: Default::default(),
            shipping: None,
            ship_sockets: None,
            siem: None,
            otlp: None,
        },
        Origin::this_host(),
    )?;
    Ok(Arc::new(store))
}

async fn throughput(
    dir: &Path,
    durability: Durability,
    secs: u64,
    workload: &Arc<Workload>,
) -> anyhow::Result<(f64, f64)> {
    let store = open(dir, durability)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (store, stop, count, workload) =
            (store.clone(), stop.clone(), count.clone(), workload.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                store
                    .submit(Record::Request(Box::new(sample_request(&store, &workload))))
                    .await
                    .expect("record written");
                count.fetch_add(1, Ordering::Relaxed);
                // Batched tickets resolve at once: yield so the journal keeps up
                // instead of the queue growing without bound.
                tokio::task::yield_now().await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    // A strict marker after everything: once it is durable, so is all before it.
    store
        .event(EventRecord::new(store.origin(), "verify", "ok"))
        .await?;
    let durable_secs = t0.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed) as f64;
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close()).await?;
    let parquet_secs = t0.elapsed().as_secs_f64();
    let rows = phigate::record::read::rows(&dir.join("records"), phigate::record::Table::Requests)?
        .len() as f64;
    anyhow::ensure!(rows == n, "{n} records submitted but {rows} in Parquet");
    Ok((n / durable_secs, rows / parquet_secs))
}

/// One request record every millisecond, each awaited as its response would be.
async fn paced_latency(
    dir: &Path,
    secs: u64,
    workload: &Arc<Workload>,
) -> anyhow::Result<Vec<f64>> {
    let store = open(dir, Durability::Strict)?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tick.tick().await;
        let (store, tx, workload) = (store.clone(), tx.clone(), workload.clone());
        tokio::spawn(async move {
            let rec = Record::Request(Box::new(sample_request(&store, &workload)));
            let t = Instant::now();
            let r = store.submit(rec).await;
            let _ = tx.send(r.map(|()| t.elapsed().as_secs_f64() * 1000.0));
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    while let Some(r) = rx.recv().await {
        lat.push(r?);
    }
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close()).await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

/// The floor under strict mode: one 1 KiB overwrite of preallocated space plus
/// fdatasync every millisecond, as the journal does, with nothing else around it.
fn disk_sync_latency(dir: &Path, secs: u64) -> anyhow::Result<Vec<f64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dir.join("sync.test"))?;
    f.write_all_at(&vec![0u8; 4 << 20], 0)?;
    f.sync_all()?;
    let block = [b'x'; 1024];
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut off = 0u64;
    while Instant::now() < end {
        f.write_all_at(&block, off % (4 << 20))?;
        off += 1024;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(1));
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn sample_workload() -> Workload {
    Workload {
        pid: 4242,
        tid: 4242,
        uid: 998,
        user: Some("ehr-sync".into()),
        gid: 998,
        groups: vec![998, 27],
        comm: "python3".into(),
        cgroup_id: 12345,
        cgroup_path: Some("/system.slice/ehr-sync.service".into()),
        systemd_unit: Some("ehr-sync.service".into()),
        container_id: None,
        container_runtime: None,
        pod_uid: None,
        pod_namespace: None,
        pod_name: None,
        container_image: None,
        exe_path: Some("/usr/bin/python3.11".into()),
        exe_sha256: Some("9f2c5a0e4b1d7c3e8a6f0b2d4c6e8a0b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c".into()),
        unknown: Vec::new(),
    }
}

fn sample_request(store: &RecordStore, workload: &Arc<Workload>) -> RequestRecord {
    let now = SystemTime::now();
    let headers: BTreeMap<String, String> = [
        ("authorization".to_owned(), "Bearer [REDACTED]".to_owned()),
        ("user-agent".to_owned(), "python-requests/2.32".to_owned()),
        (
            "content-type".to_owned(),
            "application/fhir+json".to_owned(),
        ),
    ]
    .into();
    RequestRecord {
        request_id: new_id(),
        connection_id: new_id(),
        start_time: now,
        end_time: now,
        origin: store.origin().clone(),
        destination: "patients-api".into(),
        original_dst: "10.20.30.40:443".into(),
        client_addr: "127.0.0.1:51234".into(),
        workload: workload.clone(),
        oidc_issuer: Some("https://login.hospital.example".into()),
        oidc_subject: Some("svc-ehr-sync".into()),
        oidc_groups: vec!["clinical-sync".into()],
        oidc_expiry: Some(1_800_000_000_000_000),
        sni: Some("fhir.hospital.example".into()),
        tls_version: Some("TLSv1_3".into()),
        alpn: Some("h2".into()),
        http_version: "HTTP/2.0".into(),
        upstream_http_version: Some("HTTP/2.0".into()),
        upstream_tls_version: Some("TLSv1_3".into()),
        upstream_cert_subject: Some("CN=fhir.hospital.example".into()),
        upstream_credential: None,
        upstream_credential_source: None,
        method: "GET".into(),
        authority: Some("fhir.hospital.example".into()),
        path: "/fhir/Patient/p:4f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e".into(),
        path_as_sent: None,
        query: Some("_elements=[REDACTED]".into()),
        request_headers: headers.clone(),
        response_headers: headers,
        request_body: None,
        request_body_truncated: false,
        response_body: Some(
            r#"{"resourceType":"Patient","id":"[REDACTED:ID]","name":[{"family":"[REDACTED:NAME]"}],"birthDate":"1961","address":[{"postalCode":"021"}]}"#
                .into(),
        ),
        response_body_truncated: false,
        response_original_sealed: None,
        response_original_key_id: None,
        patient_refs: vec!["p:4f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e".into()],
        status: 200,
        request_bytes: 0,
        response_bytes: 1834,
        latency_ms: 3.2,
        duration_ms: 3.4,
        decision: phigate::record::RequestDecision::Allow,
        policy_ids: vec!["clinician-read-patient".into()],
        policy_set_hash: Some("5e3b".repeat(16)),
        masking_profile: Some("safe_harbor".into()),
        masking_counts: [("NAME".to_owned(), 2), ("DATE".to_owned(), 1), ("ZIP".to_owned(), 1)].into(),
        masking_set_hash: Some("a1b2".repeat(16)),
        approval_id: None,
        approvers: Vec::new(),
        approval_reason: None,
        upgraded: false,
        outcome: phigate::record::RequestOutcome::Complete,
        error: None,
    }
}
