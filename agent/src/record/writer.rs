//! The background writer: durable journal entries become hash-chained, signed Parquet
//! files in hive partitions `records_dir/<table>/date=YYYY-MM-DD/<host>-<seq>.parquet`.
//!
//! A file is written under a `.tmp` name, fsynced, its manifest written and fsynced,
//! then renamed into place, so a `*.parquet` name only ever holds a whole file with a
//! footer. The table's signed head is the commit point: journal segments are deleted
//! only once every entry they hold is behind the heads, and on start a file beyond the
//! head is either rolled forward (whole and linked) or removed (its rows are still in
//! the journal and are written again).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use sha2::{Digest, Sha256};
use time::{Date, OffsetDateTime};
use tracing::{error, info, warn};

use super::chain::{self, Hash};
use super::journal::{Entry, JournalState, Submission};
use super::schema::SCHEMA_VERSION;
use super::seal::{self, file_sha256, list_manifests, walk, Head, Manifest, Signer};
use super::{micros, EventRecord, Origin, Record, Table};

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub records_dir: PathBuf,
    pub journal_dir: PathBuf,
    /// Host name as it appears in file names.
    pub host: String,
    /// A file is closed at this many rows, bytes of records, or age, whichever first.
    pub rotate_rows: usize,
    pub rotate_bytes: usize,
    pub rotate_age: Duration,
    pub row_group_rows: usize,
    pub retention_days: u32,
}

/// A table's rows not yet in a file. Entries are decoded into Arrow as they arrive
/// (every [`DECODE_EVERY`]) and their JSON is dropped then: a decoded row holds a
/// fraction of its JSON's memory, and the data path's allocations are reused while
/// their pages are still mapped instead of waiting for the file to close.
struct Pending {
    head: Head,
    /// Rows decoded so far, in journal order.
    decoded: Vec<RecordBatch>,
    /// Entries not decoded yet, in journal order.
    buf: Vec<Entry>,
    /// Undecodable entries met so far: copied to `held/`, reported once the file
    /// that leaves them out is written.
    bad: Vec<u64>,
    /// Entries taken (decoded, undecodable or waiting) and their JSON bytes.
    rows: usize,
    bytes: usize,
    /// The lowest and highest journal seqs taken.
    seq_first: Option<u64>,
    seq_last: u64,
    date: Option<Date>,
    since: Option<Instant>,
}

/// Entries are decoded into Arrow this many at a time.
const DECODE_EVERY: usize = 256;

impl Pending {
    fn new(head: Head) -> Pending {
        Pending {
            head,
            decoded: Vec::new(),
            buf: Vec::new(),
            bad: Vec::new(),
            rows: 0,
            bytes: 0,
            seq_first: None,
            seq_last: 0,
            date: None,
            since: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Decodes the waiting entries. Undecodable ones are copied to `held/` before
    /// their JSON goes (the head will move past them). On an error the entries
    /// stay, to be decoded again.
    fn decode_waiting(&mut self, t: Table, journal_dir: &Path) -> anyhow::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let (batch, bad) = decode(t, &self.buf)?;
        for e in self.buf.iter().filter(|e| bad.contains(&e.seq)) {
            hold(journal_dir, e)?;
        }
        if batch.num_rows() > 0 {
            self.decoded.push(batch);
        }
        self.bad.extend(bad);
        self.buf.clear();
        Ok(())
    }
}

pub struct Writer {
    cfg: WriterConfig,
    signer: Arc<Signer>,
    tables: BTreeMap<Table, Pending>,
    journal: Arc<JournalState>,
    /// Set while Parquet cannot be written; records stay in the journal meanwhile.
    pub failing: Arc<AtomicBool>,
    /// Held while files, manifests and heads change (flush, retention) and while they
    /// are verified, so a verification never sees a half-written file set.
    pub files: Arc<Mutex<()>>,
    retry_at: Option<Instant>,
    /// For the writer's own events (retention deletions), through the journal.
    events: Sender<Submission>,
    origin: Origin,
    last_retention: Option<Instant>,
}

const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Beyond this many buffered rows the store stops accepting new requests.
pub const MAX_BUFFERED_ROWS: usize = 2_000_000;

impl Writer {
    /// Recovers every table's head (rolling forward or removing files beyond it).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        cfg: WriterConfig,
        signer: Arc<Signer>,
        journal: Arc<JournalState>,
        events: Sender<Submission>,
        origin: Origin,
    ) -> anyhow::Result<Writer> {
        let held = held_seqs(&cfg.journal_dir)
            .with_context(|| format!("{}/{HELD_DIR}", cfg.journal_dir.display()))?;
        if !held.is_empty() {
            warn!(entries = held.len(), dir = %cfg.journal_dir.join(HELD_DIR).display(), "records: journal entries that would not decode are kept for inspection; their segments stay until the copies are removed");
        }
        journal
            .held_entries
            .store(held.len() as u64, Ordering::Relaxed);
        let mut tables = BTreeMap::new();
        for t in Table::ALL {
            let head = recover(&cfg.records_dir, t, &signer)?;
            tables.insert(t, Pending::new(head));
        }
        check_against_list(&cfg.records_dir, &signer, &tables)?;
        publish_heads(&cfg, &signer, &tables)?;
        Ok(Writer {
            cfg,
            signer,
            tables,
            journal,
            failing: Arc::new(AtomicBool::new(false)),
            files: Arc::new(Mutex::new(())),
            retry_at: None,
            events,
            origin,
            last_retention: None,
        })
    }

    /// The journal position each table's files already cover.
    pub fn covered(&self, t: Table) -> u64 {
        self.tables[&t].head.journal_seq_last
    }

    /// Takes entries replayed from the journal (those not yet covered).
    pub fn replay(&mut self, entries: Vec<Entry>) -> usize {
        let fresh: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.seq > self.covered(e.table))
            .collect();
        let n = fresh.len();
        self.accept(fresh);
        n
    }

    pub fn buffered(&self) -> usize {
        self.tables.values().map(|p| p.rows).sum()
    }

    /// Runs until the journal thread is gone, then writes what is left.
    pub fn run(mut self, rx: Receiver<Vec<Entry>>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(entries) => {
                    self.accept(entries);
                    while let Ok(more) = rx.try_recv() {
                        self.accept(more);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.flush_due(false);
            self.retention_due();
        }
        self.retry_at = None;
        self.flush_due(true);
        if self.buffered() > 0 {
            error!(rows = self.buffered(), "records: could not write every row to Parquet at shutdown; they stay in the journal and are written at the next start");
        }
        info!("records writer closed");
    }

    fn accept(&mut self, entries: Vec<Entry>) {
        for e in entries {
            let e_table = e.table;
            let date = date_of(e.time_us);
            let due_for_date = {
                let p = &self.tables[&e.table];
                p.date.is_some_and(|d| d != date) && !p.is_empty()
            };
            if due_for_date {
                // A file holds one day: close the previous day's first.
                let _ = self.flush(e.table);
            }
            let p = self.tables.get_mut(&e.table).expect("every table");
            p.date.get_or_insert(date);
            p.since.get_or_insert_with(Instant::now);
            p.bytes += e.json.len();
            p.rows += 1;
            p.seq_first.get_or_insert(e.seq);
            p.seq_last = p.seq_last.max(e.seq);
            p.buf.push(e);
            if p.buf.len() >= DECODE_EVERY {
                // A failure here (held/ not writable) leaves the entries waiting;
                // the flush decodes them again and reports it.
                let _ = p.decode_waiting(e_table, &self.cfg.journal_dir);
            }
        }
    }

    fn flush_due(&mut self, all: bool) {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // While a verification runs, rows wait here (they are durable in the journal);
        // at shutdown they are written once it is done.
        let files = self.files.clone();
        let _files = if all {
            files.lock().unwrap_or_else(|p| p.into_inner())
        } else {
            match files.try_lock() {
                Ok(g) => g,
                Err(_) => return,
            }
        };
        let mut flushed = false;
        for t in Table::ALL {
            let p = &self.tables[&t];
            if p.is_empty() {
                continue;
            }
            let due = all
                || p.rows >= self.cfg.rotate_rows
                || p.bytes >= self.cfg.rotate_bytes
                || p.since.is_some_and(|s| s.elapsed() >= self.cfg.rotate_age);
            if !due {
                continue;
            }
            match self.flush(t) {
                Ok(()) => flushed = true,
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        error!(table = %t, error = %format!("{e:#}"), "records: cannot write Parquet; rows stay in the journal, retrying");
                    }
                    self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    return;
                }
            }
        }
        if flushed {
            if self.failing.swap(false, Ordering::Relaxed) {
                info!("records: Parquet writes work again");
            }
            self.retry_at = None;
            self.journal.rotate.store(true, Ordering::Relaxed);
            if let Err(e) = self.trim_journal() {
                warn!(error = %e, "records: cannot remove old journal segments");
            }
        }
    }

    /// Writes table `t`'s buffered rows as one Parquet file and advances its head.
    fn flush(&mut self, t: Table) -> anyhow::Result<()> {
        let p = self.tables.get_mut(&t).expect("every table");
        if p.is_empty() {
            return Ok(());
        }
        let date = p.date.unwrap_or_else(|| OffsetDateTime::now_utc().date());
        // Undecodable entries are kept in held/ before the head moves past them:
        // once it has, replay skips them.
        p.decode_waiting(t, &self.cfg.journal_dir)?;
        let batch = arrow_select_concat(&t.record_schema(), &p.decoded)?;
        let journal_seq_last = p.seq_last;
        let written = write_file(
            &self.cfg,
            &self.signer,
            t,
            &p.head,
            date,
            &batch,
            journal_seq_last,
        )?;
        let bad = std::mem::take(&mut p.bad);
        *p = Pending::new(written);
        self.journal
            .parquet_rows
            .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
        for seq in bad {
            self.report_held(t, seq);
        }
        // After the table's head: the list may lag it by a crash, never lead it.
        publish_heads(&self.cfg, &self.signer, &self.tables)
    }

    /// An entry that will not decode: said loudly (log, event, `held_entries`), never
    /// silently dropped. Its row is not in Parquet; the entry waits in `held/`.
    fn report_held(&self, t: Table, seq: u64) {
        let file = held_name(t, seq);
        // The entry's content may hold PHI: neither the log nor the event repeats it.
        error!(table = %t, journal_seq = seq, file = %file, "records: a journal entry does not match the table schema; its row is not in Parquet; kept in the journal's held/ directory for inspection");
        if let Ok(n) = held_seqs(&self.cfg.journal_dir).map(|h| h.len() as u64) {
            self.journal.held_entries.store(n, Ordering::Relaxed);
        }
        let mut ev = EventRecord::new(&self.origin, "journal_entry_held", "failed");
        ev.table_name = Some(t.name().into());
        ev.message = Some(format!(
            "journal entry {seq} does not match the {t} schema: kept as {}/{HELD_DIR}/{file}, not written to Parquet",
            super::store::JOURNAL_DIR
        ));
        if let Ok(json) = Record::Event(ev).to_json() {
            let _ = self.events.send(Submission {
                table: Table::Events,
                time_us: micros::of(SystemTime::now()),
                json,
                done: None,
            });
        }
    }

    /// Removes journal segments whose every entry is behind all heads. A held entry
    /// (undecodable, see `hold`) keeps its segment and every later one until an
    /// operator has inspected it and removed its copy in `held/`.
    fn trim_journal(&self) -> std::io::Result<()> {
        let held = held_seqs(&self.cfg.journal_dir)?;
        self.journal
            .held_entries
            .store(held.len() as u64, Ordering::Relaxed);
        let low = self
            .tables
            .values()
            .filter_map(|p| p.seq_first)
            .chain(held.first().copied())
            .min()
            .unwrap_or(u64::MAX);
        let segs = super::journal::segments(&self.cfg.journal_dir)?;
        for w in segs.windows(2) {
            let (_, ref path) = w[0];
            let (next_first, _) = w[1];
            if next_first <= low {
                fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    fn retention_due(&mut self) {
        if self.cfg.retention_days == 0
            || self
                .last_retention
                .is_some_and(|t| t.elapsed() < RETENTION_EVERY)
        {
            return;
        }
        let files = self.files.clone();
        let Ok(_files) = files.try_lock() else {
            return;
        };
        self.last_retention = Some(Instant::now());
        let cutoff =
            OffsetDateTime::now_utc().date() - time::Duration::days(self.cfg.retention_days as i64);
        for t in Table::ALL {
            if let Err(e) = self.expire(t, cutoff) {
                warn!(table = %t, error = %format!("{e:#}"), "records: retention pass failed");
            }
        }
    }

    /// Deletes files of partitions before `cutoff`, oldest first, each deletion
    /// recorded (durably) in `events` before the file goes.
    fn expire(&mut self, t: Table, cutoff: Date) -> anyhow::Result<()> {
        let head_file = self.tables[&t].head.last_file.clone();
        let mut old: Vec<(Manifest, PathBuf)> = Vec::new();
        for mpath in list_manifests(&self.cfg.records_dir, t)? {
            let m: Manifest = seal::read_json(&mpath)?;
            let Some(date) = partition_date(&m.file) else {
                continue;
            };
            if date < cutoff && Some(&m.file) != head_file.as_ref() {
                old.push((m, mpath));
            }
        }
        old.sort_by_key(|(m, _)| m.file_seq);
        for (m, mpath) in old {
            let mut ev = EventRecord::new(&self.origin, "retention_delete", "ok");
            ev.table_name = Some(t.name().into());
            ev.file = Some(m.file.clone());
            ev.first_chain_seq = Some(m.first_chain_seq);
            ev.last_chain_seq = Some(m.last_chain_seq);
            ev.last_hash = Some(m.last_hash.clone());
            ev.message = Some(format!(
                "{} rows older than {} days",
                m.rows, self.cfg.retention_days
            ));
            let (tx, rx) = tokio::sync::oneshot::channel();
            let rec = Record::Event(ev);
            self.events
                .send(Submission {
                    table: Table::Events,
                    time_us: micros::of(SystemTime::now()),
                    json: rec.to_json()?,
                    done: Some(tx),
                })
                .map_err(|_| anyhow::anyhow!("journal closed"))?;
            rx.blocking_recv()
                .map_err(|_| anyhow::anyhow!("journal closed"))?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let data = self.cfg.records_dir.join(&m.file);
            match fs::remove_file(&data) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| data.display().to_string()),
            }
            fs::remove_file(&mpath)?;
            if let Some(dir) = data.parent() {
                let _ = fs::remove_dir(dir); // only when empty
            }
            info!(table = %t, file = %m.file, "records: retention deleted a file");
        }
        Ok(())
    }
}

/// Where undecodable journal entries are kept, under the journal directory.
pub const HELD_DIR: &str = "held";

fn held_name(t: Table, seq: u64) -> String {
    format!("{seq:020}-{t}.json")
}

/// Copies an undecodable entry's JSON to `held/<seq>-<table>.json` (0600, synced).
fn hold(journal_dir: &Path, e: &Entry) -> anyhow::Result<()> {
    let dir = journal_dir.join(HELD_DIR);
    create_private_dir(&dir).with_context(|| dir.display().to_string())?;
    write_atomically(&dir.join(held_name(e.table, e.seq)), &e.json)
}

/// Journal seqs of the entries kept in `held/`, lowest first.
pub fn held_seqs(journal_dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    let rd = match fs::read_dir(journal_dir.join(HELD_DIR)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(seqs),
        Err(e) => return Err(e),
    };
    for e in rd {
        let name = e?.file_name();
        let seq = name
            .to_str()
            .filter(|n| n.ends_with(".json"))
            .and_then(|n| n.split('-').next())
            .and_then(|s| s.parse::<u64>().ok());
        seqs.extend(seq);
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Decodes journal entries into one batch of the table's record schema. Entries that
/// do not decode are left out and their journal seqs returned.
fn decode(t: Table, entries: &[Entry]) -> anyhow::Result<(RecordBatch, Vec<u64>)> {
    let schema = t.record_schema();
    let all = || {
        let mut d = arrow_json::ReaderBuilder::new(schema.clone())
            .with_batch_size(entries.len().max(1))
            .build_decoder()?;
        for e in entries {
            d.decode(&e.json)?;
        }
        d.flush()
    };
    match all() {
        Ok(Some(b)) => return Ok((b, vec![])),
        Ok(None) => return Ok((RecordBatch::new_empty(schema), vec![])),
        Err(_) => {}
    }
    // Slow path: isolate the entries that do not fit.
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for e in entries {
        let mut d = arrow_json::ReaderBuilder::new(schema.clone()).build_decoder()?;
        match d.decode(&e.json).and_then(|_| d.flush()) {
            Ok(Some(b)) => good.push(b),
            _ => bad.push(e.seq),
        }
    }
    let batch = arrow_select_concat(&schema, &good)?;
    Ok((batch, bad))
}

fn arrow_select_concat(
    schema: &arrow_schema::SchemaRef,
    batches: &[RecordBatch],
) -> anyhow::Result<RecordBatch> {
    Ok(arrow_select::concat::concat_batches(schema, batches)?)
}

/// Writes one file (tmp, fsync, manifest, rename) and the table's new head.
fn write_file(
    cfg: &WriterConfig,
    signer: &Signer,
    t: Table,
    head: &Head,
    date: Date,
    batch: &RecordBatch,
    journal_seq_last: u64,
) -> anyhow::Result<Head> {
    let prev = chain::from_hex(&head.last_hash).context("head hash is not hex")?;
    let columns: Vec<usize> = (0..batch.num_columns()).collect();
    let hashes = chain::hash_rows(batch, &columns, prev, head.next_chain_seq);
    let rows = batch.num_rows() as u64;
    let seqs: ArrayRef = Arc::new(UInt64Array::from_iter_values(
        head.next_chain_seq..head.next_chain_seq + rows,
    ));
    let hex_hashes: ArrayRef = Arc::new(StringArray::from_iter_values(
        hashes.iter().map(chain::to_hex),
    ));
    let mut cols = batch.columns().to_vec();
    cols.push(seqs);
    cols.push(hex_hashes);
    let file_batch = RecordBatch::try_new(t.file_schema(), cols)?;
    let last: Hash = hashes.last().copied().unwrap_or(prev);

    let table_dir = cfg.records_dir.join(t.name());
    let part = format!("date={}", date_text(date));
    let dir = table_dir.join(&part);
    create_private_dir(&dir)?;
    let name = format!("{}-{:012}.parquet", cfg.host, head.next_file_seq);
    let rel = format!("{}/{part}/{name}", t.name());
    let final_path = dir.join(&name);
    let tmp_path = dir.join(format!("{name}.tmp"));

    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(cfg.row_group_rows.max(1)))
        .set_created_by(format!("phigate {}", env!("CARGO_PKG_VERSION")))
        .build();
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp_path)
        .with_context(|| tmp_path.display().to_string())?;
    let mut w = ArrowWriter::try_new(HashingWriter::new(file), file_batch.schema(), Some(props))?;
    w.write(&file_batch)?;
    let hw = w.into_inner()?;
    let (file, sha, bytes) = hw.finish();
    file.sync_all()
        .with_context(|| format!("fsync {}", tmp_path.display()))?;
    drop(file);

    let mut m = Manifest {
        format: seal::MANIFEST_FORMAT.into(),
        table: t.name().into(),
        file: rel.clone(),
        file_seq: head.next_file_seq,
        rows,
        first_chain_seq: head.next_chain_seq,
        last_chain_seq: (head.next_chain_seq + rows).saturating_sub(1),
        prev_hash: head.last_hash.clone(),
        last_hash: chain::to_hex(&last),
        sha256: hex::encode(sha),
        bytes,
        journal_seq_last,
        schema_version: SCHEMA_VERSION,
        created: seal::now_rfc3339(),
        key_id: String::new(),
        signature: String::new(),
    };
    signer.sign(&mut m);
    write_atomically(
        &seal::manifest_path(&final_path),
        &serde_json::to_vec_pretty(&m)?,
    )?;
    fs::rename(&tmp_path, &final_path)
        .with_context(|| format!("rename {} into place", tmp_path.display()))?;
    File::open(&dir)?.sync_all()?;

    let mut next = head.clone();
    next.next_file_seq += 1;
    next.next_chain_seq += rows;
    next.last_hash = m.last_hash.clone();
    next.last_file = Some(rel);
    next.journal_seq_last = journal_seq_last.max(head.journal_seq_last);
    next.updated = seal::now_rfc3339();
    signer.sign(&mut next);
    write_atomically(
        &seal::head_path(&cfg.records_dir, t.name()),
        &serde_json::to_vec_pretty(&next)?,
    )?;
    Ok(next)
}

/// Writes the signed list of every table's head (`_heads.json`).
fn publish_heads(
    cfg: &WriterConfig,
    signer: &Signer,
    tables: &BTreeMap<Table, Pending>,
) -> anyhow::Result<()> {
    let mut heads = seal::Heads::new(&cfg.host, tables.values().map(|p| p.head.clone()));
    signer.sign(&mut heads);
    write_atomically(
        &seal::heads_path(&cfg.records_dir),
        &serde_json::to_vec_pretty(&heads)?,
    )
}

/// Refuses to start over records whose table was deleted or rolled back since the
/// signed list of tables was written: starting would overwrite the evidence.
fn check_against_list(
    records_dir: &Path,
    signer: &Signer,
    tables: &BTreeMap<Table, Pending>,
) -> anyhow::Result<()> {
    let path = seal::heads_path(records_dir);
    if !path.exists() {
        return Ok(()); // the first start
    }
    let listed: seal::Heads = seal::read_json(&path)?;
    let tampered = |what: String| {
        anyhow::anyhow!(
            "{}: {what}; the records may have been tampered with: run `phigate audit verify`",
            path.display()
        )
    };
    signer.public.check(&listed).map_err(tampered)?;
    for (t, p) in tables {
        if let Some(l) = listed.tables.get(t.name()) {
            if l.next_file_seq > p.head.next_file_seq {
                return Err(tampered(format!(
                    "table {t} has {} file(s) where the signed list of tables names {}",
                    p.head.next_file_seq, l.next_file_seq
                )));
            }
        }
    }
    Ok(())
}

/// tmp, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("no parent directory")?;
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| tmp.display().to_string())?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| tmp.display().to_string())?;
    fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Brings table `t`'s head up to date with what is on disk after a crash: removes
/// temporary files, rolls forward whole files written after the head, and removes
/// the rest (their rows are still in the journal).
fn recover(records_dir: &Path, t: Table, signer: &Signer) -> anyhow::Result<Head> {
    let table_dir = records_dir.join(t.name());
    create_private_dir(&table_dir)?;
    let head_path = seal::head_path(records_dir, t.name());
    let mut head = if head_path.exists() {
        let h: Head = seal::read_json(&head_path)?;
        signer.public.check(&h).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; the records may have been tampered with: run `phigate audit verify`",
                head_path.display()
            )
        })?;
        h
    } else {
        Head::empty(t.name())
    };
    for p in walk(&table_dir)? {
        if p.extension().is_some_and(|e| e == "tmp") {
            let _ = fs::remove_file(&p);
        }
    }
    let mut beyond: Vec<(Manifest, PathBuf)> = Vec::new();
    for mpath in list_manifests(records_dir, t)? {
        let m: Manifest = seal::read_json(&mpath)?;
        if m.file_seq >= head.next_file_seq {
            beyond.push((m, mpath));
        }
    }
    beyond.sort_by_key(|(m, _)| m.file_seq);
    let mut advanced = false;
    for (m, mpath) in beyond {
        let data = records_dir.join(&m.file);
        let whole = m.file_seq == head.next_file_seq
            && m.prev_hash == head.last_hash
            && m.first_chain_seq == head.next_chain_seq
            && signer.public.check(&m).is_ok()
            && file_sha256(&data).is_ok_and(|(h, n)| hex::encode(h) == m.sha256 && n == m.bytes);
        if whole {
            head.next_file_seq += 1;
            head.next_chain_seq = m.last_chain_seq + 1;
            head.last_hash = m.last_hash.clone();
            head.last_file = Some(m.file.clone());
            head.journal_seq_last = head.journal_seq_last.max(m.journal_seq_last);
            advanced = true;
            info!(table = %t, file = %m.file, "records: rolled forward a file written before a crash");
        } else {
            warn!(table = %t, file = %m.file, "records: removing an incomplete file from before a crash; its rows are replayed from the journal");
            let _ = fs::remove_file(&data);
            let _ = fs::remove_file(&mpath);
        }
    }
    if advanced {
        head.updated = seal::now_rfc3339();
        signer.sign(&mut head);
        write_atomically(&head_path, &serde_json::to_vec_pretty(&head)?)?;
    }
    Ok(head)
}

fn date_of(time_us: i64) -> Date {
    OffsetDateTime::from_unix_timestamp_nanos(time_us as i128 * 1000)
        .map(|t| t.date())
        .unwrap_or_else(|_| OffsetDateTime::now_utc().date())
}

fn date_text(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
}

/// The date of a file's hive partition (`<table>/date=YYYY-MM-DD/<name>`).
pub fn partition_date(rel: &str) -> Option<Date> {
    let part = rel.split('/').find_map(|s| s.strip_prefix("date="))?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(part, &fmt).ok()
}

/// File names carry the host: keep it to safe characters.
pub fn file_host(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Hashes what passes through, so a file's digest costs no second read.
struct HashingWriter {
    inner: File,
    hash: Sha256,
    bytes: u64,
}

impl HashingWriter {
    fn new(inner: File) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (File, [u8; 32], u64) {
        (self.inner, self.hash.finalize().into(), self.bytes)
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::verify::verify;

    fn origin() -> Origin {
        Origin {
            host: "test-host".into(),
            agent_version: "test",
        }
    }

    /// A writer's configuration for tests: files rotate only when told to.
    fn test_config(records: &Path, journal_dir: PathBuf) -> WriterConfig {
        WriterConfig {
            records_dir: records.to_path_buf(),
            journal_dir,
            host: "test-host".into(),
            rotate_rows: 1000,
            rotate_bytes: 1 << 30,
            rotate_age: Duration::from_secs(3600),
            row_group_rows: 100,
            retention_days: 0,
        }
    }

    fn event_entry(seq: u64, n: usize) -> Entry {
        let mut ev = EventRecord::new(&origin(), "config_reload", "ok");
        ev.message = Some(format!("event {n}"));
        Entry {
            seq,
            time_us: micros::of(SystemTime::now()),
            table: Table::Events,
            json: Record::Event(ev).to_json().unwrap(),
        }
    }

    #[test]
    fn retention_deletes_old_files_records_each_and_verify_accepts_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records");
        let journal_dir = records.join("_journal");
        fs::create_dir_all(&journal_dir).unwrap();
        let signer = Arc::new(Signer::load_or_create(&dir.path().join("state")).unwrap());
        // Stands in for the journal thread: hands the writer's own events back, to
        // be written like any journal entry, and then acknowledges them (in that
        // order, so an acknowledged event is already there to be read back).
        let (tx, rx) = std::sync::mpsc::channel::<Submission>();
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for s in rx {
                let _ = back_tx.send(s.json);
                if let Some(done) = s.done {
                    let _ = done.send(Ok(()));
                }
            }
        });
        let cfg = WriterConfig {
            retention_days: 1,
            ..test_config(&records, journal_dir)
        };
        let state = Arc::new(JournalState::default());
        let mut w = Writer::open(cfg, signer.clone(), state, tx, origin()).unwrap();
        let mut seq = 0;
        for file in 0..3 {
            for row in 0..2 {
                seq += 1;
                w.accept(vec![event_entry(seq, file * 2 + row)]);
            }
            w.flush(Table::Events).unwrap();
        }
        // Everything written today is "old" for a cutoff of tomorrow, except the
        // newest file, which the head names and which is never deleted.
        let tomorrow = OffsetDateTime::now_utc().date() + time::Duration::days(1);
        w.expire(Table::Events, tomorrow).unwrap();
        // Each deletion was acknowledged as durable before its file went.
        let deletions: Vec<Vec<u8>> = back_rx.try_iter().collect();
        assert_eq!(deletions.len(), 2, "one event per deleted file");
        let entries = deletions
            .into_iter()
            .map(|json| {
                seq += 1;
                Entry {
                    seq,
                    time_us: micros::of(SystemTime::now()),
                    table: Table::Events,
                    json,
                }
            })
            .collect();
        w.accept(entries);
        w.flush(Table::Events).unwrap();

        assert_eq!(list_manifests(&records, Table::Events).unwrap().len(), 2);
        let report = verify(&records, &signer.public).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(report.tables["events"].retired_rows, 4);
        assert_eq!(report.tables["events"].rows, 4);
    }

    /// Found in review: an undecodable entry was left out of Parquet, counted as
    /// written, and its journal segment trimmed later: the row was gone silently.
    #[test]
    fn an_undecodable_entry_is_held_reported_and_keeps_its_journal_segment() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records");
        let journal_dir = records.join("_journal");
        fs::create_dir_all(&journal_dir).unwrap();
        // Three segments: entries 1..=3, 4..=6, and the one being written.
        for first in [1u64, 4, 7] {
            fs::write(journal_dir.join(format!("{first:020}.wal")), b"").unwrap();
        }
        let signer = Arc::new(Signer::load_or_create(&dir.path().join("state")).unwrap());
        let (tx, events) = std::sync::mpsc::channel::<Submission>();
        let cfg = test_config(&records, journal_dir.clone());
        let state = Arc::new(JournalState::default());
        let mut w = Writer::open(cfg.clone(), signer.clone(), state.clone(), tx, origin()).unwrap();
        let bad = br#"{"event_id":"e","time":"yesterday"}"#.to_vec();
        let mut entries: Vec<Entry> = (1..=6).map(|s| event_entry(s, s as usize)).collect();
        entries[1].json = bad.clone();
        w.accept(entries);
        w.flush(Table::Events).unwrap();

        assert_eq!(
            state.parquet_rows.load(Ordering::Relaxed),
            5,
            "rows really written"
        );
        let kept = journal_dir.join(HELD_DIR).join(held_name(Table::Events, 2));
        assert_eq!(fs::read(&kept).unwrap(), bad, "kept for inspection");
        assert_eq!(state.held_entries.load(Ordering::Relaxed), 1);
        let ev: Vec<Submission> = events.try_iter().collect();
        assert_eq!(ev.len(), 1);
        let ev: serde_json::Value = serde_json::from_slice(&ev[0].json).unwrap();
        assert_eq!(ev["kind"], "journal_entry_held");
        assert!(
            ev["message"].as_str().unwrap().contains("journal entry 2 "),
            "{ev}"
        );
        assert!(
            !ev["message"].as_str().unwrap().contains("yesterday"),
            "no content: {ev}"
        );

        // The segment holding it stays, though the head is past it, and across a restart.
        w.trim_journal().unwrap();
        let segs = || super::super::journal::segments(&journal_dir).unwrap().len();
        assert_eq!(segs(), 3);
        drop(w);
        let state = Arc::new(JournalState::default());
        let (tx, _events) = std::sync::mpsc::channel::<Submission>();
        let w = Writer::open(cfg, signer.clone(), state.clone(), tx, origin()).unwrap();
        assert_eq!(state.held_entries.load(Ordering::Relaxed), 1);
        w.trim_journal().unwrap();
        assert_eq!(segs(), 3);
        // Inspected and removed by an operator: trimming goes on.
        fs::remove_file(&kept).unwrap();
        w.trim_journal().unwrap();
        assert_eq!(segs(), 1);
        assert_eq!(state.held_entries.load(Ordering::Relaxed), 0);
        let report = verify(&records, &signer.public).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(report.tables["events"].rows, 5);
    }

    /// Rows are decoded as they arrive, in chunks: a file still holds every good
    /// row in journal order, whichever chunk an undecodable entry fell in, and the
    /// JSON of decoded rows is not kept.
    #[test]
    fn rows_decoded_as_they_arrive_keep_their_order_and_hold_the_undecodable() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records");
        let journal_dir = records.join("_journal");
        fs::create_dir_all(&journal_dir).unwrap();
        let signer = Arc::new(Signer::load_or_create(&dir.path().join("state")).unwrap());
        let (tx, events) = std::sync::mpsc::channel::<Submission>();
        let cfg = WriterConfig {
            rotate_rows: 100_000,
            ..test_config(&records, journal_dir.clone())
        };
        let state = Arc::new(JournalState::default());
        let mut w = Writer::open(cfg, signer.clone(), state.clone(), tx, origin()).unwrap();
        let n = DECODE_EVERY * 2 + 10;
        // One bad entry in the first chunk, one among those still waiting at flush.
        let bad_seqs = [3u64, (DECODE_EVERY * 2 + 5) as u64];
        for seq in 1..=n as u64 {
            let mut e = event_entry(seq, seq as usize);
            if bad_seqs.contains(&seq) {
                e.json = br#"{"event_id":"e","time":"yesterday"}"#.to_vec();
            }
            w.accept(vec![e]);
        }
        let p = &w.tables[&Table::Events];
        assert!(
            p.buf.len() < DECODE_EVERY,
            "decoded on arrival: {}",
            p.buf.len()
        );
        assert_eq!(w.buffered(), n);
        w.flush(Table::Events).unwrap();
        assert_eq!(w.buffered(), 0);

        let rows = phigate_record::read::rows(&records, Table::Events).unwrap();
        let got: Vec<String> = rows
            .iter()
            .map(|r| r["message"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (1..=n as u64)
            .filter(|s| !bad_seqs.contains(s))
            .map(|s| format!("event {s}"))
            .collect();
        assert_eq!(got, want);
        for seq in bad_seqs {
            assert!(journal_dir
                .join(HELD_DIR)
                .join(held_name(Table::Events, seq))
                .exists());
        }
        assert_eq!(events.try_iter().count(), 2, "each held entry reported");
        assert_eq!(w.covered(Table::Events), n as u64);
        let report = verify(&records, &signer.public).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
    }

    /// Found by the `verify` fuzz target: a byte inserted into an events file made
    /// its reader return an error on every call, and verify looped forever.
    #[test]
    fn verify_ends_on_a_damaged_events_file() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("records");
        let journal_dir = records.join("_journal");
        fs::create_dir_all(&journal_dir).unwrap();
        let signer = Arc::new(Signer::load_or_create(&dir.path().join("state")).unwrap());
        let (tx, _rx) = std::sync::mpsc::channel::<Submission>();
        let cfg = WriterConfig {
            row_group_rows: 2,
            ..test_config(&records, journal_dir)
        };
        let state = Arc::new(JournalState::default());
        let mut w = Writer::open(cfg, signer.clone(), state, tx, origin()).unwrap();
        w.accept((1..=6).map(|seq| event_entry(seq, seq as usize)).collect());
        w.flush(Table::Events).unwrap();
        let manifest = list_manifests(&records, Table::Events).unwrap().remove(0);
        let name = manifest.to_str().unwrap();
        let data = PathBuf::from(name.strip_suffix(seal::MANIFEST_SUFFIX).unwrap());
        let good = fs::read(&data).unwrap();
        for at in (4..good.len() - 8).step_by(37) {
            let mut bad = good.clone();
            bad.insert(at, b'}');
            fs::write(&data, &bad).unwrap();
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            let (r, key) = (records.clone(), signer.public);
            std::thread::spawn(move || {
                let _ = done_tx.send(verify(&r, &key).map(|rep| rep.ok()));
            });
            let ok = done_rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("verify hangs on a byte inserted at {at}"));
            assert!(
                !ok.unwrap_or(false),
                "a damaged file verifies (byte at {at})"
            );
        }
    }
}
