//! The write-ahead journal: every record lands here first, durably, before the
//! Parquet writer sees it.
//!
//! Segments `journal/<first seq>.wal` start with an 8-byte magic; then entries:
//! `u32 LE body length | u32 LE CRC-32 of body | body`, body = `u64 LE journal seq |
//! i64 LE time (µs) | u8 table tag | JSON record`. A torn or corrupt tail (a crash in
//! the middle of a write) ends a segment's readable entries; it was never
//! acknowledged, so nothing acknowledged is lost.
//!
//! One thread writes: it takes everything queued, writes it with one `write`, syncs
//! once (group commit), then acknowledges every waiter. Concurrent requests share one
//! fsync; the cost per record falls as load rises.
//!
//! Segments are preallocated with zeros in PREALLOC steps (synced once), so a commit
//! overwrites blocks that already exist and `fdatasync` need not also commit a new
//! file size: measured here, that halves the sync's median and tail. A zero length
//! where an entry would start, with only zeros after it, is the clean end.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{RecordError, Table};

pub const MAGIC: &[u8; 8] = b"PHGJRNL1";
const HEADER: usize = 8;
const BODY_FIXED: usize = 8 + 8 + 1;
/// Larger bodies are corruption, not records.
const MAX_BODY: usize = 64 << 20;
/// A segment is closed after this many bytes (and after each Parquet flush).
const SEGMENT_BYTES: u64 = 64 << 20;
/// One group commit writes at most this much.
const BATCH_BYTES: usize = 8 << 20;
/// Segments grow by this much zeroed, synced space at a time.
const PREALLOC: u64 = 1 << 20;

/// One journaled record.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub time_us: i64,
    pub table: Table,
    pub json: Vec<u8>,
}

impl Entry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = BODY_FIXED + self.json.len();
        let start = out.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.time_us.to_le_bytes());
        out.push(self.table.tag());
        out.extend_from_slice(&self.json);
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Why decoding stopped before the end of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte was a whole, valid entry.
    Clean,
    /// Bytes at `offset` are not a valid entry: a torn write or corruption.
    Torn { offset: u64, reason: String },
}

/// Decodes a segment's bytes: the entries up to the first invalid one.
pub fn decode(bytes: &[u8]) -> (Vec<Entry>, Tail) {
    let mut entries = Vec::new();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return (
            entries,
            Tail::Torn {
                offset: 0,
                reason: "no journal header".into(),
            },
        );
    }
    let mut off = MAGIC.len();
    while off < bytes.len() {
        let torn = |reason: &str| Tail::Torn {
            offset: off as u64,
            reason: reason.to_owned(),
        };
        if bytes.len() - off < HEADER {
            return (entries, torn("truncated entry header"));
        }
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
        if len == 0 && bytes[off..].iter().all(|&b| b == 0) {
            // The preallocated, never written rest of the segment.
            return (entries, Tail::Clean);
        }
        if !(BODY_FIXED..=MAX_BODY).contains(&len) {
            return (entries, torn("implausible entry length"));
        }
        if bytes.len() - off - HEADER < len {
            return (entries, torn("truncated entry body"));
        }
        let body = &bytes[off + HEADER..off + HEADER + len];
        if crc32fast::hash(body) != crc {
            return (entries, torn("checksum mismatch"));
        }
        let Some(table) = Table::from_tag(body[16]) else {
            return (entries, torn("unknown table tag"));
        };
        entries.push(Entry {
            seq: u64::from_le_bytes(body[0..8].try_into().expect("8 bytes")),
            time_us: i64::from_le_bytes(body[8..16].try_into().expect("8 bytes")),
            table,
            json: body[BODY_FIXED..].to_vec(),
        });
        off += HEADER + len;
    }
    (entries, Tail::Clean)
}

/// Segments in the journal directory, oldest first: (first seq, path).
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(first) = name.strip_suffix(".wal").and_then(|s| s.parse().ok()) {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// A segment whose end was torn, and how.
pub type TornSegment = (PathBuf, Tail);

/// Reads every segment: the entries, and any torn tails found (logged by the caller).
pub fn read_all(dir: &Path) -> std::io::Result<(Vec<Entry>, Vec<TornSegment>)> {
    let mut all = Vec::new();
    let mut tails = Vec::new();
    for (_, path) in segments(dir)? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let (entries, tail) = decode(&bytes);
        all.extend(entries);
        if tail != Tail::Clean {
            tails.push((path, tail));
        }
    }
    Ok((all, tails))
}

pub use super::config::Durability;

/// A record on its way into the journal.
pub struct Submission {
    pub table: Table,
    pub time_us: i64,
    pub json: Vec<u8>,
    pub done: Option<tokio::sync::oneshot::Sender<Result<(), RecordError>>>,
}

/// Shared between the journal thread and the rest of the store.
#[derive(Default)]
pub struct JournalState {
    /// Set when a write failed; cleared by the next successful one.
    pub failing: AtomicBool,
    /// The Parquet writer asks for a new segment after a flush, so old ones can go.
    pub rotate: AtomicBool,
    /// Entries and bytes committed since start, and rows the writer has put into
    /// Parquet: their difference is the journal's lag.
    pub committed_entries: AtomicU64,
    pub committed_bytes: AtomicU64,
    pub parquet_rows: AtomicU64,
    /// Entries that would not decode, kept in the journal's `held/` for inspection.
    pub held_entries: AtomicU64,
}

pub struct JournalThread {
    dir: PathBuf,
    durability: Durability,
    next_seq: u64,
    file: File,
    /// Bytes of entries written; the segment's zeroed space reaches `allocated`.
    size: u64,
    allocated: u64,
    last_sync: Instant,
    dirty: bool,
    state: Arc<JournalState>,
    /// Durable entries go on to the Parquet writer.
    downstream: Sender<Vec<Entry>>,
    /// Set by the store on close: drain what is queued, sync, stop.
    shutdown: Arc<AtomicBool>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The live streams (SIEM, OTLP), each handed every committed batch.
    feeds: Vec<Arc<super::stream::Feed>>,
}

impl JournalThread {
    /// Opens a fresh segment starting at `next_seq`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        next_seq: u64,
        state: Arc<JournalState>,
        downstream: Sender<Vec<Entry>>,
        shutdown: Arc<AtomicBool>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<JournalThread> {
        let file = new_segment(dir, next_seq)?;
        Ok(JournalThread {
            dir: dir.to_owned(),
            durability,
            next_seq,
            file,
            size: MAGIC.len() as u64,
            allocated: MAGIC.len() as u64,
            last_sync: Instant::now(),
            dirty: false,
            state,
            downstream,
            shutdown,
            metrics,
            feeds: Vec::new(),
        })
    }

    /// Committed entries also go to a live stream (never waiting for it).
    pub fn feed_to(mut self, feed: Arc<super::stream::Feed>) -> JournalThread {
        self.feeds.push(feed);
        self
    }

    /// Runs until the store closes (or every sender is gone), then syncs and returns;
    /// dropping the downstream sender tells the Parquet writer to finish.
    pub fn run(mut self, rx: Receiver<Submission>) {
        let tick = match self.durability {
            Durability::Strict => Duration::from_millis(50),
            Durability::Batched { window } => window.min(Duration::from_millis(50)),
        };
        let mut buf = Vec::with_capacity(1 << 20);
        loop {
            let first = match rx.recv_timeout(tick) {
                Ok(s) => s,
                Err(RecvTimeoutError::Timeout) => {
                    if self.shutdown.load(Ordering::Relaxed) {
                        break;
                    }
                    self.housekeeping();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            let mut bytes = batch[0].json.len();
            while bytes < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(s) => {
                        bytes += s.json.len();
                        batch.push(s);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch, &mut buf);
            self.housekeeping();
        }
        if self.dirty {
            let _ = self.file.sync_data();
        }
        drop(rx);
        info!("journal closed");
    }

    fn commit(&mut self, batch: Vec<Submission>, buf: &mut Vec<u8>) {
        buf.clear();
        let mut entries = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for (i, s) in batch.into_iter().enumerate() {
            let e = Entry {
                seq: self.next_seq + i as u64,
                time_us: s.time_us,
                table: s.table,
                json: s.json,
            };
            e.encode(buf);
            waiters.push((s.table, s.done, s.time_us));
            entries.push(e);
        }
        // No room to preallocate (a nearly full disk) is not a failure yet: the
        // entries may still fit, written plainly; if they do not, that write fails.
        if self.reserve(buf.len() as u64).is_err() {
            let _ = self.file.set_len(self.allocated.max(self.size));
        }
        let result = self
            .file
            .write_all_at(buf, self.size)
            .and_then(|()| match self.durability {
                Durability::Strict => self.file.sync_data(),
                Durability::Batched { window } => {
                    if self.last_sync.elapsed() >= window {
                        self.last_sync = Instant::now();
                        self.file.sync_data()
                    } else {
                        self.dirty = true;
                        Ok(())
                    }
                }
            });
        match result {
            Ok(()) => {
                self.next_seq += entries.len() as u64;
                self.size += buf.len() as u64;
                let s = &self.state;
                s.committed_entries
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                s.committed_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                if self.state.failing.swap(false, Ordering::Relaxed) {
                    info!("records: the journal accepts writes again");
                }
                let now = super::micros::of(std::time::SystemTime::now());
                let metrics = &self.metrics;
                for (_, done, submitted) in waiters {
                    if let Some(d) = done {
                        let waited = u64::try_from(now - submitted).unwrap_or(0);
                        metrics.observe(
                            crate::metrics::Stage::RecordDurable,
                            std::time::Duration::from_micros(waited),
                        );
                        let _ = d.send(Ok(()));
                    }
                }
                // Only durable entries are streamed, in journal order.
                for f in &self.feeds {
                    f.offer(&entries);
                }
                // Blocks when the Parquet writer is far behind: backpressure, not loss.
                let _ = self.downstream.send(entries);
            }
            Err(e) => {
                // Cut back whatever part of the batch landed, so the segment stays
                // whole; if even that fails, later writes go to a new segment.
                if self.file.set_len(self.size).is_err() {
                    self.state.rotate.store(true, Ordering::Relaxed);
                }
                self.allocated = self.size;
                if !self.state.failing.swap(true, Ordering::Relaxed) {
                    error!(error = %e, dir = %self.dir.display(), "records: journal write failed; refusing new requests until it works");
                }
                for (table, done, _) in waiters {
                    if let Some(d) = done {
                        let _ = d.send(Err(RecordError {
                            table,
                            reason: format!("journal write failed: {e}"),
                        }));
                    }
                }
            }
        }
    }

    /// Makes sure `len` more bytes fit in zeroed, synced space; extends by PREALLOC
    /// steps (one sync of data and size per step, not per commit).
    /// On failure `allocated` is unchanged and the caller cuts the file back to it.
    fn reserve(&mut self, len: u64) -> std::io::Result<()> {
        let need = self.size + len;
        // Never zero what plain (unreserved) writes already put past `allocated`.
        self.allocated = self.allocated.max(self.size);
        if need <= self.allocated {
            return Ok(());
        }
        let target = need.div_ceil(PREALLOC) * PREALLOC;
        let zeros = vec![0u8; (target - self.allocated) as usize];
        self.file.write_all_at(&zeros, self.allocated)?;
        self.file.sync_all()?;
        self.allocated = target;
        Ok(())
    }

    fn housekeeping(&mut self) {
        if self.dirty {
            if let Durability::Batched { window } = self.durability {
                if self.last_sync.elapsed() >= window {
                    match self.file.sync_data() {
                        Ok(()) => self.dirty = false,
                        Err(e) => warn!(error = %e, "journal sync failed"),
                    }
                    self.last_sync = Instant::now();
                }
            }
        }
        let rotate = self.state.rotate.swap(false, Ordering::Relaxed);
        if (rotate && self.size > MAGIC.len() as u64) || self.size >= SEGMENT_BYTES {
            let _ = self.file.sync_data();
            self.dirty = false;
            match new_segment(&self.dir, self.next_seq) {
                Ok(f) => {
                    self.file = f;
                    self.size = MAGIC.len() as u64;
                    self.allocated = self.size;
                }
                Err(e) => {
                    self.state.rotate.store(true, Ordering::Relaxed);
                    warn!(error = %e, "cannot open a new journal segment; keeping the current one");
                }
            }
        }
    }
}

fn new_segment(dir: &Path, first_seq: u64) -> std::io::Result<File> {
    let path = dir.join(format!("{first_seq:020}.wal"));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(MAGIC)?;
    f.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// Queue for submissions. Unbounded, because the data path must not block a runtime
/// thread; in strict mode the queue is bounded in practice by the requests waiting
/// on it (each holds its response until acknowledged).
pub fn channel() -> (Sender<Submission>, Receiver<Submission>) {
    std::sync::mpsc::channel()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, json: &str) -> Entry {
        Entry {
            seq,
            time_us: 1_700_000_000_000_000 + seq as i64,
            table: Table::Requests,
            json: json.as_bytes().to_vec(),
        }
    }

    #[test]
    fn round_trip_and_torn_tails() {
        let mut bytes = MAGIC.to_vec();
        entry(1, "{\"a\":1}").encode(&mut bytes);
        entry(2, "{\"a\":2}").encode(&mut bytes);
        let (es, tail) = decode(&bytes);
        assert_eq!(tail, Tail::Clean);
        assert_eq!(es.len(), 2);
        assert_eq!(es[1].seq, 2);
        assert_eq!(es[1].json, b"{\"a\":2}");

        // Every truncation point yields the whole entries before it, and a torn
        // tail unless it falls on an entry boundary.
        let first_end = MAGIC.len() + HEADER + BODY_FIXED + 7;
        for cut in MAGIC.len() + 1..bytes.len() {
            let (es, tail) = decode(&bytes[..cut]);
            let whole = usize::from(cut >= first_end);
            assert_eq!(es.len(), whole, "cut at {cut}");
            assert_eq!(tail == Tail::Clean, cut == first_end, "cut at {cut}");
        }
        // A flipped bit is caught by the checksum.
        let mut bad = bytes.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        let (es, tail) = decode(&bad);
        assert_eq!(es.len(), 1);
        assert!(matches!(tail, Tail::Torn { reason, .. } if reason == "checksum mismatch"));
    }

    #[test]
    fn preallocated_zeros_end_a_segment_cleanly_but_a_torn_entry_in_them_does_not() {
        let mut bytes = MAGIC.to_vec();
        entry(1, "{\"a\":1}").encode(&mut bytes);
        let written = bytes.len();
        bytes.resize(written + 4096, 0);
        let (es, tail) = decode(&bytes);
        assert_eq!((es.len(), tail), (1, Tail::Clean));
        // A write torn half-way leaves part of an entry among the zeros.
        let mut torn = Vec::new();
        entry(2, "{\"a\":2}").encode(&mut torn);
        bytes[written..written + 10].copy_from_slice(&torn[..10]);
        let (es, tail) = decode(&bytes);
        assert_eq!(es.len(), 1);
        assert!(matches!(tail, Tail::Torn { .. }), "{tail:?}");
    }

    #[test]
    fn committed_entries_are_handed_to_the_siem_feed_in_order_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let siem = Arc::new(super::super::stream::StreamState::default());
        let feed = Arc::new(super::super::stream::Feed::new(10, siem));
        let mut j = JournalThread::open(
            dir.path(),
            Durability::Strict,
            5,
            Arc::new(JournalState::default()),
            down_tx,
            Arc::new(AtomicBool::new(false)),
            Default::default(),
        )
        .unwrap()
        .feed_to(feed.clone());
        let sub = |i: i64| Submission {
            table: Table::Events,
            time_us: i,
            json: b"{}".to_vec(),
            done: None,
        };
        let mut buf = Vec::new();
        j.commit(vec![sub(1), sub(2)], &mut buf);
        j.commit(vec![sub(3)], &mut buf);
        assert_eq!(feed.waiting(), [5, 6, 7]);
        // A commit that fails hands nothing on: only durable entries are streamed.
        j.file = File::open(dir.path().join(format!("{:020}.wal", 5))).unwrap();
        j.commit(vec![sub(4)], &mut buf);
        assert!(j.state.failing.load(Ordering::Relaxed));
        assert_eq!(feed.waiting(), [5, 6, 7]);
        drop(j);
        assert_eq!(down_rx.try_iter().flatten().count(), 3);
    }

    #[test]
    fn commits_reuse_preallocated_space_and_replay_reads_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(JournalState::default());
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let mut j = JournalThread::open(
            dir.path(),
            Durability::Strict,
            1,
            state,
            down_tx,
            Arc::new(AtomicBool::new(false)),
            Default::default(),
        )
        .unwrap();
        let mut buf = Vec::new();
        for i in 0..100 {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            j.commit(
                vec![Submission {
                    table: Table::Events,
                    time_us: i,
                    json: format!("{{\"n\":{i}}}").into_bytes(),
                    done: Some(tx),
                }],
                &mut buf,
            );
            assert!(matches!(rx.try_recv(), Ok(Ok(()))));
        }
        assert_eq!(j.allocated, PREALLOC, "one step holds them all");
        let len = fs::metadata(&segments(dir.path()).unwrap()[0].1)
            .unwrap()
            .len();
        assert_eq!(len, PREALLOC);
        drop(j);
        assert_eq!(down_rx.try_iter().flatten().count(), 100);
        let (es, tails) = read_all(dir.path()).unwrap();
        assert!(tails.is_empty(), "{tails:?}");
        assert_eq!(es.len(), 100);
        assert_eq!(es[99].seq, 100);
    }
}
