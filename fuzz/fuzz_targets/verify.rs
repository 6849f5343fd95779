//! `audit verify` on a records directory with one file changed.
//!
//! A small records directory is written once per process by the record store (two
//! tables, several signed files per table). Each input names a file of it (data,
//! manifest or head) and how to change it: flip bytes, truncate, insert, or replace
//! it outright. Invariants: verify never panics, and never reports ok when a file's
//! content changed (for the JSON manifests and heads: its parsed value changed).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use phigate::record::journal::Durability;
use phigate::record::seal::{PublicKey, PUBLIC_KEY_FILE};
use phigate::record::store::{RecordStore, StoreConfig, JOURNAL_DIR};
use phigate::record::{ConnectionRecord, EventRecord, Origin, Outcome, Record, RecordSink};

struct Seed {
    _dir: tempfile::TempDir,
    records: PathBuf,
    key: PublicKey,
    /// Paths relative to `records`, sorted, with their bytes.
    files: Vec<(PathBuf, Vec<u8>)>,
}

fn write_seed() -> Seed {
    let dir = tempfile::tempdir().expect("temp dir");
    let records = dir.path().join("records");
    let state = dir.path().join("state");
    let origin = Origin {
        host: "fuzz-host".into(),
        agent_version: "fuzz",
    };
    let (store, _) = RecordStore::open(
        StoreConfig {
            records_dir: records.clone(),
            state_dir: state.clone(),
            durability: Durability::Batched {
                window: Duration::from_millis(5),
            },
            rotate_rows: 3,
            rotate_bytes: 1 << 30,
            rotate_age: Duration::from_secs(3600),
            row_group_rows: 2,
            retention_days: 0,
            metrics: Default::default(),
            shipping: None,
        },
        origin.clone(),
    )
    .expect("open the record store");
    for i in 0..7 {
        let mut ev = EventRecord::new(&origin, "config_reload", "ok");
        ev.message = Some(format!("event {i}"));
        store.submit(Record::Event(ev));
        store.submit(Record::Connection(connection(&origin, i)));
    }
    store.close();
    drop(store);
    let key = PublicKey::read(&state.join(PUBLIC_KEY_FILE)).expect("public key");
    let mut files = Vec::new();
    collect(&records, &records, &mut files);
    files.sort();
    let report = phigate::record::verify::verify(&records, &key).expect("verify the seed");
    assert!(
        report.ok(),
        "the seed does not verify: {:?}",
        report.problems
    );
    assert!(files.len() >= 6, "the seed has too few files: {files:?}");
    Seed {
        _dir: dir,
        records,
        key,
        files,
    }
}

fn connection(origin: &Origin, i: u32) -> ConnectionRecord {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 + u64::from(i));
    ConnectionRecord {
        connection_id: format!("conn-{i}"),
        start_time: t,
        end_time: t + Duration::from_millis(40),
        origin: origin.clone(),
        duration_ms: 40.0,
        destination: Some("fhir".into()),
        protocol: Some("https"),
        original_dst: Some("127.0.0.1:8443".into()),
        client_addr: "127.0.0.1:40000".into(),
        workload: None,
        bytes_up: 100,
        bytes_down: 2000 + u64::from(i),
        sni: Some("fhir.example.test".into()),
        tls_version: Some("TLSv1_3".into()),
        alpn: Some("h2".into()),
        requests: 1,
        outcome: Outcome::Closed,
        error: None,
    }
}

/// The files verify answers for: Parquet data, manifests, heads (not the journal or
/// the lock, which it does not read).
fn collect(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == JOURNAL_DIR || name == ".lock" {
            continue;
        }
        if p.is_dir() {
            collect(base, &p, out);
        } else {
            let rel = p.strip_prefix(base).expect("under base").to_owned();
            out.push((rel, std::fs::read(&p).expect("read")));
        }
    }
}

static SEED: LazyLock<Seed> = LazyLock::new(write_seed);

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_name() == JOURNAL_DIR || e.file_name() == ".lock" {
            continue;
        }
        if src.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

fn mutate(orig: &[u8], how: u8, arg: &[u8]) -> Vec<u8> {
    let at = |k: usize| -> usize {
        let v = arg
            .get(k..k + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        usize::from(v) % (orig.len() + 1)
    };
    let mut v = orig.to_vec();
    match how % 4 {
        0 => {
            for pair in arg.chunks(3) {
                if pair.len() == 3 && !v.is_empty() {
                    let i = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % v.len();
                    v[i] ^= pair[2];
                }
            }
        }
        1 => v.truncate(at(0)),
        2 => {
            let i = at(0);
            v.splice(i..i, arg.iter().skip(2).copied());
        }
        _ => v = arg.to_vec(),
    }
    v
}

/// Whether a JSON file's new bytes still mean what the old ones meant.
fn same_json(old: &[u8], new: &[u8]) -> bool {
    let a = serde_json::from_slice::<serde_json::Value>(old);
    let b = serde_json::from_slice::<serde_json::Value>(new);
    matches!((a, b), (Ok(a), Ok(b)) if a == b)
}

fuzz_target!(|data: &[u8]| {
    let [which, how, arg @ ..] = data else {
        return;
    };
    let seed = &*SEED;
    let (rel, orig) = &seed.files[usize::from(*which) % seed.files.len()];
    let changed = mutate(orig, *how, arg);
    let work = tempfile::tempdir().expect("temp dir");
    let dir = work.path().join("records");
    copy_tree(&seed.records, &dir);
    std::fs::write(dir.join(rel), &changed).expect("write the changed file");
    let Ok(report) = phigate::record::verify::verify(&dir, &seed.key) else {
        return;
    };
    if changed == *orig {
        assert!(
            report.ok(),
            "an unchanged copy fails: {:?}",
            report.problems
        );
        return;
    }
    let is_json = rel.extension().is_some_and(|e| e == "json");
    if report.ok() {
        assert!(
            is_json && same_json(orig, &changed),
            "verify reports ok for a changed {}",
            rel.display()
        );
    }
});
