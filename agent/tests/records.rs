//! The record store end to end without the data path: what it writes is read back,
//! survives a crash, and every kind of tampering is caught by `audit verify`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use phigate::record::journal::Durability;
use phigate::record::seal::{self, list_manifests, Manifest, PublicKey};
use phigate::record::store::{RecordStore, StoreConfig};
use phigate::record::verify::{verify, Report};
use phigate::record::{read, EventRecord, Origin, Record, RecordSink, Table};
use tempfile::TempDir;

struct Fixture {
    tmp: TempDir,
    key: PublicKey,
}

impl Fixture {
    fn records(&self) -> PathBuf {
        self.tmp.path().join("records")
    }
    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
}

fn store_config(root: &Path, rotate_rows: usize, rotate_age: Duration) -> StoreConfig {
    StoreConfig {
        records_dir: root.join("records"),
        state_dir: root.join("state"),
        durability: Durability::Strict,
        rotate_rows,
        rotate_bytes: 64 << 20,
        rotate_age,
        row_group_rows: 4,
        retention_days: 0,
        metrics: Default::default(),
        shipping: None,
        ship_sockets: None,
        siem: None,
        otlp: None,
    }
}

fn origin() -> Origin {
    Origin {
        host: "test-host".into(),
        agent_version: "test",
    }
}

fn event(n: usize) -> Record {
    let mut ev = EventRecord::new(&origin(), "config_reload", "ok");
    ev.message = Some(format!("event number {n}"));
    Record::Event(ev)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Submits `n` events one at a time, each awaited as durable.
fn submit(store: &RecordStore, rt: &tokio::runtime::Runtime, from: usize, n: usize) {
    for i in from..from + n {
        rt.block_on(store.submit(event(i))).expect("durable");
    }
}

/// A records directory with `n` events in several files (5 rows per file).
fn produce(n: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (store, _) = RecordStore::open(
        store_config(tmp.path(), 5, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    // One file per five rows: wait for each, since rows arriving while a file is
    // being written would join the next one.
    for chunk in (0..n).step_by(5) {
        let len = 5.min(n - chunk);
        submit(&store, &rt, chunk, len);
        if len == 5 {
            wait_for_files(&tmp.path().join("records"), chunk / 5 + 1);
        }
    }
    store.close();
    let key = PublicKey::read(&tmp.path().join("state").join(seal::PUBLIC_KEY_FILE)).unwrap();
    Fixture { tmp, key }
}

/// The table's data files, oldest first.
fn files(records: &Path, t: Table) -> Vec<PathBuf> {
    let mut ms: Vec<Manifest> = list_manifests(records, t)
        .unwrap()
        .iter()
        .map(|p| seal::read_json(p).unwrap())
        .collect();
    ms.sort_by_key(|m| m.file_seq);
    ms.iter().map(|m| records.join(&m.file)).collect()
}

fn manifest_of(p: &Path) -> PathBuf {
    seal::manifest_path(p)
}

fn read_batch(p: &Path) -> RecordBatch {
    let r = ParquetRecordBatchReaderBuilder::try_new(File::open(p).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = r.map(Result::unwrap).collect();
    arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn write_batch(p: &Path, b: &RecordBatch) {
    let mut w = ArrowWriter::try_new(File::create(p).unwrap(), b.schema(), None).unwrap();
    w.write(b).unwrap();
    w.close().unwrap();
}

/// Replaces one string column's value in `row`.
fn with_string(b: &RecordBatch, column: &str, row: usize, value: &str) -> RecordBatch {
    let idx = b.schema().index_of(column).unwrap();
    let old = b
        .column(idx)
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let new: StringArray = (0..old.len())
        .map(|i| {
            if i == row {
                Some(value.to_owned())
            } else if old.is_null(i) {
                None
            } else {
                Some(old.value(i).to_owned())
            }
        })
        .collect();
    let mut cols = b.columns().to_vec();
    cols[idx] = Arc::new(new) as ArrayRef;
    RecordBatch::try_new(b.schema(), cols).unwrap()
}

fn rows_except(b: &RecordBatch, skip: usize) -> RecordBatch {
    let parts: Vec<RecordBatch> = (0..b.num_rows())
        .filter(|&i| i != skip)
        .map(|i| b.slice(i, 1))
        .collect();
    arrow_select::concat::concat_batches(&b.schema(), &parts).unwrap()
}

fn report(fx: &Fixture) -> Report {
    verify(&fx.records(), &fx.key).unwrap()
}

/// Asserts that verify fails and some problem mentions each of `needles`.
fn assert_caught(fx: &Fixture, needles: &[&str]) {
    let r = report(fx);
    let text: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
    assert!(!r.ok(), "tampering not detected");
    for n in needles {
        assert!(
            text.iter().any(|t| t.contains(n)),
            "no problem mentions {n:?}; problems: {text:#?}"
        );
    }
}

#[test]
fn untouched_records_verify_and_read_back_in_order() {
    let fx = produce(23);
    let r = report(&fx);
    assert!(r.ok(), "{:?}", r.problems);
    let events = &r.tables["events"];
    assert_eq!(events.rows, 23);
    assert_eq!(events.files, 5, "expected rotation by rows: {events:?}");
    let rows = read::rows(&fx.records(), Table::Events).unwrap();
    let messages: Vec<&str> = rows
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..23).map(|i| format!("event number {i}")).collect();
    assert_eq!(messages, expected);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["chain_seq"], i as u64);
        assert_eq!(r["host"], "test-host");
    }
    // Hive partitions by date; the journal is trimmed once rows are in Parquet.
    for f in files(&fx.records(), Table::Events) {
        let rel = f
            .strip_prefix(fx.records())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(rel.starts_with("events/date=20"), "{rel}");
        assert!(rel.ends_with(".parquet"), "{rel}");
    }
    // Keys and data are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&fx.state().join(seal::SIGNING_KEY_FILE)), 0o600);
    assert_eq!(mode(&files(&fx.records(), Table::Events)[0]), 0o600);
}

#[test]
fn an_altered_row_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    let b = read_batch(f);
    write_batch(f, &with_string(&b, "message", 2, "nothing happened"));
    assert_caught(&fx, &["row altered", "file altered"]);
}

#[test]
fn an_altered_row_with_a_recomputed_chain_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    let m: Manifest = seal::read_json(&manifest_of(f)).unwrap();
    let b = with_string(&read_batch(f), "message", 0, "nothing happened");
    // The attacker knows the chain algorithm and recomputes every hash in the file.
    let columns: Vec<usize> = (0..b.num_columns() - 2).collect();
    let prev = phigate::record::chain::from_hex(&m.prev_hash).unwrap();
    let hashes = phigate::record::chain::hash_rows(&b, &columns, prev, m.first_chain_seq);
    let hex: StringArray = hashes
        .iter()
        .map(|h| Some(phigate::record::chain::to_hex(h)))
        .collect();
    let mut cols = b.columns().to_vec();
    let last = cols.len() - 1;
    cols[last] = Arc::new(hex);
    write_batch(f, &RecordBatch::try_new(b.schema(), cols).unwrap());
    assert_caught(
        &fx,
        &[
            "file altered",
            "last row's hash differs from the signed manifest",
        ],
    );
}

#[test]
fn a_deleted_row_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    write_batch(f, &rows_except(&read_batch(f), 2));
    assert_caught(
        &fx,
        &[
            "(rows deleted, inserted or reordered)",
            "rows, the signed manifest says",
        ],
    );
}

#[test]
fn an_inserted_row_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    let b = read_batch(f);
    let grown =
        arrow_select::concat::concat_batches(&b.schema(), &[b.clone(), b.slice(1, 1)]).unwrap();
    write_batch(f, &grown);
    assert_caught(
        &fx,
        &[
            "rows deleted, inserted or reordered",
            "rows, the signed manifest says",
        ],
    );
}

#[test]
fn reordered_rows_are_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    let b = read_batch(f);
    let parts = [b.slice(1, 1), b.slice(0, 1), b.slice(2, b.num_rows() - 2)];
    write_batch(
        f,
        &arrow_select::concat::concat_batches(&b.schema(), &parts).unwrap(),
    );
    assert_caught(&fx, &["rows deleted, inserted or reordered"]);
}

#[test]
fn an_inserted_file_is_caught() {
    let fx = produce(12);
    let fs_ = files(&fx.records(), Table::Events);
    let extra = fs_[0].with_file_name("test-host-000000000099.parquet");
    fs::copy(&fs_[0], &extra).unwrap();
    assert_caught(&fx, &["without a signed manifest"]);
    // Copying the manifest along does not help: it names the original file.
    fs::copy(manifest_of(&fs_[0]), manifest_of(&extra)).unwrap();
    assert_caught(&fx, &["files moved or swapped", "does not follow"]);
}

#[test]
fn a_deleted_middle_file_is_caught() {
    let fx = produce(17);
    let fs_ = files(&fx.records(), Table::Events);
    fs::remove_file(&fs_[1]).unwrap();
    assert_caught(&fx, &["file deleted (manifest says"]);
    // With its manifest gone too, the gap in file numbers and the chain shows.
    fs::remove_file(manifest_of(&fs_[1])).unwrap();
    assert_caught(
        &fx,
        &["are missing (deleted)", "does not continue the chain"],
    );
}

#[test]
fn deleting_the_newest_file_is_caught_by_the_signed_head() {
    let fx = produce(17);
    let last = files(&fx.records(), Table::Events).pop().unwrap();
    fs::remove_file(&last).unwrap();
    fs::remove_file(manifest_of(&last)).unwrap();
    assert_caught(&fx, &["files deleted from the end"]);
}

/// Found in review: `rm -rf records/<table>` verified as OK.
#[test]
fn a_deleted_or_emptied_table_directory_is_caught_and_the_agent_will_not_start_over_it() {
    let fx = produce(12);
    // A table that never had a file, and one that had three.
    fs::remove_dir_all(fx.records().join("connections")).unwrap();
    fs::remove_dir_all(fx.records().join("events")).unwrap();
    assert_caught(
        &fx,
        &[
            "connections: table directory connections/ is missing",
            "events: table directory events/ is missing (deleted); the signed list of tables names 3 file(s)",
        ],
    );
    // Recreated empty, as an agent start would: the signed list still remembers.
    fs::create_dir(fx.records().join("events")).unwrap();
    fs::create_dir(fx.records().join("connections")).unwrap();
    assert_caught(
        &fx,
        &["the table's head names 0 file(s), the signed list of tables 3 ending in events/"],
    );
    let started = RecordStore::open(
        store_config(fx.tmp.path(), 5, Duration::from_secs(3600)),
        origin(),
    );
    let err = format!("{:#}", started.err().expect("refused"));
    assert!(
        err.contains("table events has 0 file(s) where the signed list of tables names 3"),
        "{err}"
    );
    // Without the list, deleted tables could not be told: its absence is a problem.
    fs::remove_file(seal::heads_path(&fx.records())).unwrap();
    assert_caught(&fx, &["the signed list of tables is missing"]);
}

/// Found in review: deleting the newest files and restoring an older signed head
/// verified as OK.
#[test]
fn an_older_head_restored_after_deleting_the_newest_file_is_caught() {
    let fx = produce(12);
    let mut fs_ = files(&fx.records(), Table::Events);
    let last = fs_.pop().unwrap();
    let before: Manifest = seal::read_json(&manifest_of(fs_.last().unwrap())).unwrap();
    fs::remove_file(&last).unwrap();
    fs::remove_file(manifest_of(&last)).unwrap();
    // The head as it was after the second file: genuine, signed with the host's key.
    let hpath = seal::head_path(&fx.records(), "events");
    let mut head: seal::Head = seal::read_json(&hpath).unwrap();
    head.next_file_seq = before.file_seq + 1;
    head.next_chain_seq = before.last_chain_seq + 1;
    head.last_hash = before.last_hash.clone();
    head.last_file = Some(before.file.clone());
    seal::Signer::load_or_create(&fx.state())
        .unwrap()
        .sign(&mut head);
    fs::write(&hpath, serde_json::to_vec_pretty(&head).unwrap()).unwrap();
    assert_caught(
        &fx,
        &["the table's head names 2 file(s), the signed list of tables 3"],
    );
}

#[test]
fn deleting_the_oldest_file_without_a_retention_record_is_caught() {
    let fx = produce(17);
    let first = files(&fx.records(), Table::Events).remove(0);
    fs::remove_file(&first).unwrap();
    fs::remove_file(manifest_of(&first)).unwrap();
    assert_caught(&fx, &["deleted without a retention record"]);
}

#[test]
fn a_truncated_file_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[0];
    let len = fs::metadata(f).unwrap().len();
    File::options()
        .write(true)
        .open(f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_caught(&fx, &["file altered", "truncated", "unreadable"]);
}

#[test]
fn swapped_files_are_caught() {
    let fx = produce(17);
    let fs_ = files(&fx.records(), Table::Events);
    let (a, b) = (&fs_[0], &fs_[1]);
    let tmp = a.with_extension("swap");
    // Data files only.
    fs::rename(a, &tmp).unwrap();
    fs::rename(b, a).unwrap();
    fs::rename(&tmp, b).unwrap();
    assert_caught(&fx, &["file altered", "chain_seq 5 where 0 was expected"]);
    // Data files and their manifests together.
    let (ma, mb) = (manifest_of(a), manifest_of(b));
    fs::rename(&ma, &tmp).unwrap();
    fs::rename(&mb, &ma).unwrap();
    fs::rename(&tmp, &mb).unwrap();
    assert_caught(&fx, &["files moved or swapped"]);
}

#[test]
fn a_forged_manifest_is_caught() {
    let fx = produce(12);
    let f = &files(&fx.records(), Table::Events)[1];
    let mpath = manifest_of(f);
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    m["rows"] = serde_json::json!(4);
    fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_caught(&fx, &["manifest signature invalid"]);
}

#[test]
fn a_forged_head_is_caught() {
    let fx = produce(12);
    let hpath = seal::head_path(&fx.records(), "events");
    let mut h: serde_json::Value = serde_json::from_slice(&fs::read(&hpath).unwrap()).unwrap();
    h["next_file_seq"] = serde_json::json!(1);
    fs::write(&hpath, serde_json::to_vec_pretty(&h).unwrap()).unwrap();
    assert_caught(&fx, &["head signature invalid"]);
}

#[test]
fn another_key_does_not_verify() {
    let mut fx = produce(6);
    let other = tempfile::tempdir().unwrap();
    fx.key = seal::Signer::load_or_create(other.path()).unwrap().public;
    assert_caught(
        &fx,
        &["manifest signature invalid", "head signature invalid"],
    );
}

#[test]
fn a_crash_before_parquet_loses_nothing_and_a_torn_tail_is_ignored() {
    let live = tempfile::tempdir().unwrap();
    let rt = runtime();
    // Nothing rotates: every acknowledged record is only in the journal.
    let (store, _) = RecordStore::open(
        store_config(live.path(), 1_000_000, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    submit(&store, &rt, 0, 9);
    // The state a SIGKILL would leave: copy the disk while the store still runs.
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), crashed.path());
    // A write that was under way: half an entry at the end of the segment.
    let journal = crashed.path().join("records/_journal");
    let seg = fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0x40, 0, 0, 0, 1, 2, 3]);
    fs::write(&seg, bytes).unwrap();
    drop(store);

    let (store, replay) = RecordStore::open(
        store_config(crashed.path(), 1_000_000, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    assert_eq!(replay.replayed, 9);
    assert_eq!(replay.torn_tails, 1);
    submit(&store, &rt, 9, 2);
    store.close();
    let records = crashed.path().join("records");
    let rows = read::rows(&records, Table::Events).unwrap();
    let messages: Vec<&str> = rows
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..11).map(|i| format!("event number {i}")).collect();
    assert_eq!(messages, expected);
    let key = PublicKey::read(&crashed.path().join("state").join(seal::PUBLIC_KEY_FILE)).unwrap();
    let r = verify(&records, &key).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

#[test]
fn a_crash_between_rename_and_head_rolls_forward_without_duplicates() {
    let live = tempfile::tempdir().unwrap();
    let rt = runtime();
    let (store, _) = RecordStore::open(
        store_config(live.path(), 5, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    submit(&store, &rt, 0, 5);
    wait_for_files(&live.path().join("records"), 1);
    let head = seal::head_path(&live.path().join("records"), "events");
    // The file is renamed into place before its head is written: wait for both.
    let t = std::time::Instant::now();
    while !head.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let old_head = fs::read(&head).unwrap();
    submit(&store, &rt, 5, 5);
    wait_for_files(&live.path().join("records"), 2);
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(live.path(), crashed.path());
    drop(store);
    // The second file is in place but the head still names the first; the journal
    // may still hold the second file's rows too.
    fs::write(
        seal::head_path(&crashed.path().join("records"), "events"),
        old_head,
    )
    .unwrap();
    // And an interrupted write left a temporary file.
    let tmp =
        files(&crashed.path().join("records"), Table::Events)[0].with_extension("parquet.tmp");
    fs::write(&tmp, b"partial").unwrap();

    let (store, _) = RecordStore::open(
        store_config(crashed.path(), 5, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    store.close();
    assert!(!tmp.exists(), "temporary files are removed at start");
    let records = crashed.path().join("records");
    let rows = read::rows(&records, Table::Events).unwrap();
    assert_eq!(rows.len(), 10, "{rows:#?}");
    let key = PublicKey::read(&crashed.path().join("state").join(seal::PUBLIC_KEY_FILE)).unwrap();
    let r = verify(&records, &key).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

/// Found in review: an entry that would not decode was logged as "kept in the
/// journal", then trimmed away, and counted as a Parquet row.
#[test]
fn a_journal_entry_that_will_not_decode_is_held_reported_and_not_counted() {
    use phigate::record::journal::{self, Entry};
    let tmp = tempfile::tempdir().unwrap();
    let journal_dir = tmp.path().join("records/_journal");
    fs::create_dir_all(&journal_dir).unwrap();
    // What a crash would leave: three entries not yet in Parquet, the middle one
    // from a writer whose columns this one does not know.
    let mut seg = journal::MAGIC.to_vec();
    for seq in 1..=3u64 {
        let json = if seq == 2 {
            br#"{"event_id":"x","time":"not a time"}"#.to_vec()
        } else {
            event(seq as usize).to_json().unwrap()
        };
        let time_us = 1_800_000_000_000_000 + seq as i64;
        let table = Table::Events;
        Entry {
            seq,
            time_us,
            table,
            json,
        }
        .encode(&mut seg);
    }
    fs::write(journal_dir.join(format!("{:020}.wal", 1)), seg).unwrap();
    let rt = runtime();
    let (store, replay) = RecordStore::open(
        store_config(tmp.path(), 1, Duration::from_secs(3600)),
        origin(),
    )
    .unwrap();
    assert_eq!(replay.replayed, 3);
    let held = journal_dir
        .join("held")
        .join(format!("{:020}-events.json", 2));
    for _ in 0..200 {
        if held.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    submit(&store, &rt, 10, 3);
    store.close();
    let p = store.progress();
    assert_eq!(p.held_entries, 1, "{p:?}");
    assert!(held.exists(), "kept for inspection");
    // Two replayed, three submitted, and the writer's own event about the entry.
    assert_eq!(p.parquet_rows, 6, "only rows really written: {p:?}");
    let records = tmp.path().join("records");
    let rows = read::rows(&records, Table::Events).unwrap();
    let held_events: Vec<_> = rows
        .iter()
        .filter(|r| r["kind"] == "journal_entry_held")
        .collect();
    assert_eq!(held_events.len(), 1, "{rows:#?}");
    assert!(held_events[0]["message"]
        .as_str()
        .unwrap()
        .contains("journal entry 2 "));
    // Its segment was not trimmed, though every table's head is past it.
    assert!(journal_dir.join(format!("{:020}.wal", 1)).exists());
    let key = PublicKey::read(&tmp.path().join("state").join(seal::PUBLIC_KEY_FILE)).unwrap();
    let r = verify(&records, &key).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
}

#[test]
fn a_second_agent_on_the_same_records_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_store, _) = RecordStore::open(
        store_config(tmp.path(), 5, Duration::from_secs(1)),
        origin(),
    )
    .unwrap();
    let second = RecordStore::open(
        store_config(tmp.path(), 5, Duration::from_secs(1)),
        origin(),
    );
    let err = format!("{:#}", second.err().expect("refused"));
    assert!(err.contains("records"), "{err}");
}

fn wait_for_files(records: &Path, n: usize) {
    for _ in 0..200 {
        if files(records, Table::Events).len() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {n} files written");
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}
