//! The record store: the sink the data path writes to. It owns the journal thread
//! and the Parquet writer thread, replays the journal on open, and decides whether
//! records can be written at all (fail closed).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tracing::{info, warn};

use super::config::AnchorAtStart;
use super::journal::{self, Durability, JournalState, JournalThread, Submission};
use super::otlp::{self, Otlp, OtlpTarget};
use super::seal::Signer;
use super::ship::{self, ShipDeps, ShipProgress, ShipState, Shipper, StartAnchor};
use super::siem::{self, Siem, SiemTarget};
use super::stream::{Feed, StreamDeps, StreamProgress, StreamState};
use super::writer::{self, Writer, WriterConfig};
use super::{micros, Durable, EventRecord, Origin, Record, RecordError, RecordSink};

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub records_dir: PathBuf,
    pub state_dir: PathBuf,
    pub durability: Durability,
    pub rotate_rows: usize,
    pub rotate_bytes: usize,
    pub rotate_age: Duration,
    pub row_group_rows: usize,
    pub retention_days: u32,
    /// Where the time until a record is durable is counted.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Sealed files, manifests and heads copied to object storage.
    pub shipping: Option<super::config::ShippingSection>,
    /// The agent's own outbound sockets, for the Object Lock puts (exempt from the
    /// redirect, marked for the host's firewall).
    pub ship_sockets: Option<crate::sockets::SocketFactory>,
    /// Each durable record's metadata streamed to a SIEM.
    pub siem: Option<SiemTarget>,
    /// Each durable record's metadata exported as OTLP logs.
    pub otlp: Option<OtlpTarget>,
}

pub const JOURNAL_DIR: &str = "_journal";
const LOCK_FILE: &str = ".lock";

/// Free space is checked at most every SPACE_CHECK_MS, so a filling disk refuses new
/// exchanges before a record is lost, at the cost of one statvfs per period.
const SPACE_CHECK_MS: u64 = 100;
/// Free space below which records_dir counts as full.
const MIN_FREE_BYTES: u64 = 1 << 20;

pub struct RecordStore {
    tx: Sender<Submission>,
    durability: Durability,
    journal: Arc<JournalState>,
    writer_failing: Arc<AtomicBool>,
    /// The writer's lock over files, manifests and heads (see `verify`).
    files: Arc<Mutex<()>>,
    state_dir: PathBuf,
    shutdown: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    origin: Origin,
    records_dir: PathBuf,
    journal_dir: PathBuf,
    space_checked_ms: AtomicU64,
    space_ok: AtomicBool,
    t0: Instant,
    /// Shipping's progress and where it ships, when configured.
    ship: Option<(Arc<ShipState>, String)>,
    /// Stops the shipper once the writer has sealed its last file.
    ship_stop: Arc<AtomicBool>,
    ship_thread: Mutex<Option<JoinHandle<()>>>,
    /// The SIEM stream's progress and receiver, when configured; stopped after the
    /// journal's last commit.
    siem: Option<(Arc<StreamState>, String)>,
    /// The OTLP stream's, likewise.
    otlp: Option<(Arc<StreamState>, String)>,
    /// Stops both streams' senders.
    siem_stop: Arc<AtomicBool>,
    stream_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Held for the store's life: one agent per records_dir.
    _lock: File,
}

/// Records' progress since start (`phigate status`, metrics).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub journal_entries: u64,
    pub journal_bytes: u64,
    pub parquet_rows: u64,
    /// Durable in the journal, not yet in Parquet (replayed rows at start included
    /// in neither).
    pub lag_entries: u64,
    /// Journal entries that would not decode: not in Parquet, kept in `_journal/held/`.
    #[serde(default)]
    pub held_entries: u64,
    pub durability: String,
    pub journal_failing: bool,
    pub parquet_failing: bool,
    /// Off-host shipping, when configured.
    #[serde(default)]
    pub shipping: Option<ShipProgress>,
    /// The SIEM stream, when configured.
    #[serde(default)]
    pub siem: Option<StreamProgress>,
    /// The OTLP logs stream, when configured.
    #[serde(default)]
    pub otlp: Option<StreamProgress>,
}

/// What opening found in the journal.
#[derive(Debug, Default)]
pub struct Replay {
    pub replayed: usize,
    pub torn_tails: usize,
}

impl RecordStore {
    pub fn open(cfg: StoreConfig, origin: Origin) -> anyhow::Result<(RecordStore, Replay)> {
        let journal_dir = cfg.records_dir.join(JOURNAL_DIR);
        for d in [&cfg.records_dir, &journal_dir] {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .with_context(|| format!("cannot create {}", d.display()))?;
        }
        let lock = lock(&cfg.records_dir)?;
        let signer =
            Arc::new(Signer::load_or_create(&cfg.state_dir).context("records signing key")?);
        // Before anything here is written or shipped: shipping the heads of records
        // that were rolled back would overwrite the anchor that shows it.
        let start_anchor = cfg.shipping.as_ref().map(|sc| {
            ship::check_start_anchor(
                sc,
                &cfg.records_dir,
                &writer::file_host(&origin.host),
                &signer.public,
            )
        });
        let (tx, rx) = journal::channel();
        let (down_tx, down_rx) = std::sync::mpsc::channel();
        let state = Arc::new(JournalState::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut w = Writer::open(
            WriterConfig {
                records_dir: cfg.records_dir.clone(),
                journal_dir: journal_dir.clone(),
                host: writer::file_host(&origin.host),
                rotate_rows: cfg.rotate_rows,
                rotate_bytes: cfg.rotate_bytes,
                rotate_age: cfg.rotate_age,
                row_group_rows: cfg.row_group_rows,
                retention_days: cfg.retention_days,
            },
            signer,
            state.clone(),
            tx.clone(),
            origin.clone(),
        )?;
        let (entries, tails) = journal::read_all(&journal_dir)
            .with_context(|| format!("cannot read the journal in {}", journal_dir.display()))?;
        for (path, tail) in &tails {
            // Expected after a crash mid-write: that entry was never acknowledged.
            warn!(segment = %path.display(), ?tail, "records: journal segment ends in a torn entry (ignored)");
        }
        let max_seen = entries.iter().map(|e| e.seq).max().unwrap_or(0);
        let covered = super::Table::ALL
            .iter()
            .map(|t| w.covered(*t))
            .max()
            .unwrap_or(0);
        let next_seq = max_seen.max(covered) + 1;
        let replayed = w.replay(entries);
        if replayed > 0 {
            info!(
                records = replayed,
                "records: replayed journal entries not yet in Parquet"
            );
        }
        let writer_failing = w.failing.clone();
        let files = w.files.clone();
        let jt = JournalThread::open(
            &journal_dir,
            cfg.durability,
            next_seq,
            state.clone(),
            down_tx,
            shutdown.clone(),
            cfg.metrics.clone(),
        )
        .with_context(|| format!("cannot open a journal segment in {}", journal_dir.display()))?;
        let ship_stop = Arc::new(AtomicBool::new(false));
        let (ship, ship_thread) = start_shipping(&cfg, start_anchor, &ship_stop, &tx, &origin)?;
        let siem_stop = Arc::new(AtomicBool::new(false));
        let (feed, siem, siem_thread) = start_siem(&cfg, &siem_stop, &tx, &origin)?;
        let jt = match feed {
            Some(f) => jt.feed_to(f),
            None => jt,
        };
        let (feed, otlp, otlp_thread) = start_otlp(&cfg, &siem_stop, &tx, &origin)?;
        let jt = match feed {
            Some(f) => jt.feed_to(f),
            None => jt,
        };
        let j = std::thread::Builder::new()
            .name("phigate-journal".into())
            .spawn(move || jt.run(rx))?;
        let wt = std::thread::Builder::new()
            .name("phigate-records".into())
            .spawn(move || w.run(down_rx))?;
        let store = RecordStore {
            tx,
            durability: cfg.durability,
            journal: state,
            writer_failing,
            files,
            state_dir: cfg.state_dir.clone(),
            shutdown,
            threads: Mutex::new(vec![j, wt]),
            origin,
            records_dir: cfg.records_dir.clone(),
            journal_dir,
            space_checked_ms: AtomicU64::new(0),
            space_ok: AtomicBool::new(true),
            t0: Instant::now(),
            ship,
            ship_stop,
            ship_thread: Mutex::new(ship_thread),
            siem,
            otlp,
            siem_stop,
            stream_threads: Mutex::new(siem_thread.into_iter().chain(otlp_thread).collect()),
            _lock: lock,
        };
        Ok((
            store,
            Replay {
                replayed,
                torn_tails: tails.len(),
            },
        ))
    }

    /// What the start found against the off-host anchor (with shipping).
    pub fn start_anchor(&self) -> Option<StartAnchor> {
        self.ship.as_ref().and_then(|(s, _)| s.anchor())
    }

    /// Records an agent event and waits until it is durable.
    pub async fn event(&self, ev: EventRecord) -> Result<(), RecordError> {
        self.submit_with(Record::Event(ev), true).await
    }

    /// Stops accepting records, syncs the journal and writes every buffered row to
    /// Parquet. Blocking: call from a blocking context.
    pub fn close(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        // After the writer's last file: the shipper's last pass ships it too.
        self.ship_stop.store(true, Ordering::Relaxed);
        let shipper = self
            .ship_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = shipper {
            let _ = t.join();
        }
        // After the journal's last commit (the agent's stop event included).
        self.siem_stop.store(true, Ordering::Relaxed);
        let streamers = std::mem::take(
            &mut *self
                .stream_threads
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for t in streamers {
            let _ = t.join();
        }
    }

    fn submit_with(&self, rec: Record, wait: bool) -> Durable {
        let table = rec.table();
        let json = match rec.to_json() {
            Ok(j) => j,
            Err(e) => {
                return Durable::ready(Err(RecordError {
                    table,
                    reason: format!("cannot encode: {e}"),
                }))
            }
        };
        let closed = || RecordError {
            table,
            reason: "the record store is closed".into(),
        };
        if self.shutdown.load(Ordering::Relaxed) {
            return Durable::ready(Err(closed()));
        }
        let (done, ticket) = if wait {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let sent = self.tx.send(Submission {
            table,
            time_us: micros::of(SystemTime::now()),
            json,
            done,
        });
        match (sent, ticket) {
            (Err(_), _) => Durable::ready(Err(closed())),
            (Ok(()), Some(rx)) => Durable::waiting(rx, table),
            (Ok(()), None) => Durable::ready(Ok(())),
        }
    }

    /// Verifies the records as `phigate audit verify` does, with this host's public
    /// key, while the writer holds off changing files (rows wait in the journal).
    /// Blocking: call from a blocking context.
    pub fn verify(&self) -> anyhow::Result<super::verify::Report> {
        let key =
            super::seal::PublicKey::read(&super::verify::default_public_key(&self.state_dir))?;
        let _files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        super::verify::verify(&self.records_dir, &key)
    }

    /// How far records have got: committed to the journal, written to Parquet.
    pub fn progress(&self) -> Progress {
        let j = &self.journal;
        let committed = j.committed_entries.load(Ordering::Relaxed);
        let parquet = j.parquet_rows.load(Ordering::Relaxed);
        Progress {
            journal_entries: committed,
            journal_bytes: j.committed_bytes.load(Ordering::Relaxed),
            parquet_rows: parquet,
            lag_entries: committed.saturating_sub(parquet),
            held_entries: j.held_entries.load(Ordering::Relaxed),
            durability: match self.durability {
                Durability::Strict => "strict",
                Durability::Batched { .. } => "batched",
            }
            .to_owned(),
            journal_failing: j.failing.load(Ordering::Relaxed),
            parquet_failing: self.parquet_failing(),
            shipping: self.ship.as_ref().map(|(s, dest)| s.progress(dest)),
            siem: self.siem.as_ref().map(|(s, dest)| s.progress(dest)),
            otlp: self.otlp.as_ref().map(|(s, dest)| s.progress(dest)),
        }
    }

    /// True while Parquet files cannot be written (rows wait in the journal).
    pub fn parquet_failing(&self) -> bool {
        self.writer_failing.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        nix::sys::statvfs::statvfs(&self.records_dir)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()) >= MIN_FREE_BYTES)
            .unwrap_or(false)
    }

    /// The cached free-space verdict, refreshed every SPACE_CHECK_MS.
    fn room_cached(&self) -> bool {
        let now = self.t0.elapsed().as_millis() as u64 + SPACE_CHECK_MS;
        let last = self.space_checked_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SPACE_CHECK_MS
            && self
                .space_checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.space_ok.store(self.has_room(), Ordering::Relaxed);
        }
        self.space_ok.load(Ordering::Relaxed)
    }

    /// After a failure: writable again once the journal directory accepts files and
    /// has room (the journal thread clears its flag on the next good write).
    fn probe(&self) -> bool {
        let probe = self.journal_dir.join(".probe");
        let ok = self.has_room()
            && OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&probe)
                .is_ok();
        let _ = std::fs::remove_file(&probe);
        ok
    }
}

impl Drop for RecordStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl RecordSink for RecordStore {
    fn submit(&self, rec: Record) -> Durable {
        let wait = self.durability == Durability::Strict;
        self.submit_with(rec, wait)
    }

    fn writable(&self) -> bool {
        if self.shutdown.load(Ordering::Relaxed) {
            return false;
        }
        // Sealed records waiting too long to leave the host count as unwritable.
        if self
            .ship
            .as_ref()
            .is_some_and(|(s, _)| s.too_far_behind.load(Ordering::Relaxed))
        {
            return false;
        }
        // The Parquet writer failing alone does not stop requests: rows are durable in
        // the journal and written when it recovers.
        if !self.journal.failing.load(Ordering::Relaxed) {
            return self.room_cached();
        }
        self.probe()
    }

    fn origin(&self) -> &Origin {
        &self.origin
    }
}

/// A stream's parts: the journal's feed, the progress and receiver for `status`,
/// the sender's thread.
type StreamParts = (
    Option<Arc<Feed>>,
    Option<(Arc<StreamState>, String)>,
    Option<JoinHandle<()>>,
);

/// A stream's shared parts, its counters and the feed the journal fills.
fn stream_deps(
    buffer: usize,
    sockets: &crate::sockets::SocketFactory,
    stop: &Arc<AtomicBool>,
    events: &Sender<Submission>,
    origin: &Origin,
) -> StreamDeps {
    let state = Arc::new(StreamState::default());
    StreamDeps {
        feed: Arc::new(Feed::new(buffer, state.clone())),
        state,
        sockets: sockets.clone(),
        shutdown: stop.clone(),
        events: events.clone(),
        origin: origin.clone(),
    }
}

/// The shipper's state and destination, and its thread (none when refused).
type ShipParts = (Option<(Arc<ShipState>, String)>, Option<JoinHandle<()>>);

/// Starts the shipper, when `[records.shipping]` is configured and the start's
/// anchor check lets it (records behind the anchor with `refuse`: the agent stops,
/// and nothing is shipped over the anchor).
fn start_shipping(
    cfg: &StoreConfig,
    start_anchor: Option<StartAnchor>,
    stop: &Arc<AtomicBool>,
    events: &Sender<Submission>,
    origin: &Origin,
) -> anyhow::Result<ShipParts> {
    let Some(sc) = &cfg.shipping else {
        return Ok((None, None));
    };
    let state = Arc::new(ShipState::default());
    let refused = sc.anchor_at_start == AnchorAtStart::Refuse
        && matches!(start_anchor, Some(StartAnchor::Behind(_)));
    *state.anchor.lock().unwrap_or_else(|p| p.into_inner()) = start_anchor;
    if refused {
        return Ok((Some((state, ship::destination(sc))), None));
    }
    let shipper = Shipper::new(
        sc,
        ShipDeps {
            records_dir: cfg.records_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            host: writer::file_host(&origin.host),
            state: state.clone(),
            shutdown: stop.clone(),
            events: events.clone(),
            origin: origin.clone(),
            sockets: cfg
                .ship_sockets
                .clone()
                .unwrap_or_else(|| crate::sockets::SocketFactory::new(0, None)),
        },
    )?;
    let t = std::thread::Builder::new()
        .name("phigate-ship".into())
        .spawn(move || shipper.run())?;
    Ok((Some((state, ship::destination(sc))), Some(t)))
}

/// Starts the SIEM stream's sender, when `[records.siem]` is configured.
fn start_siem(
    cfg: &StoreConfig,
    stop: &Arc<AtomicBool>,
    events: &Sender<Submission>,
    origin: &Origin,
) -> anyhow::Result<StreamParts> {
    let Some(SiemTarget {
        section: sc,
        sockets,
    }) = &cfg.siem
    else {
        return Ok((None, None, None));
    };
    let deps = stream_deps(sc.buffer_records, sockets, stop, events, origin);
    let (feed, state) = (deps.feed.clone(), deps.state.clone());
    let sender = Siem::new(sc, deps)?;
    let t = std::thread::Builder::new()
        .name("phigate-siem".into())
        .spawn(move || sender.run())?;
    Ok((Some(feed), Some((state, siem::destination(sc))), Some(t)))
}

/// Starts the OTLP stream's sender, when `[records.otlp]` is configured.
fn start_otlp(
    cfg: &StoreConfig,
    stop: &Arc<AtomicBool>,
    events: &Sender<Submission>,
    origin: &Origin,
) -> anyhow::Result<StreamParts> {
    let Some(OtlpTarget {
        section: oc,
        sockets,
    }) = &cfg.otlp
    else {
        return Ok((None, None, None));
    };
    let deps = stream_deps(oc.buffer_records, sockets, stop, events, origin);
    let (feed, state) = (deps.feed.clone(), deps.state.clone());
    let sender = Otlp::new(oc, deps)?;
    let t = std::thread::Builder::new()
        .name("phigate-otlp".into())
        .spawn(move || sender.run())?;
    Ok((Some(feed), Some((state, otlp::destination(oc))), Some(t)))
}

/// One agent per records_dir: two writers would interleave chains and sequence numbers.
fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!(
            "{}: another phigate agent is writing these records (lock held)",
            dir.display()
        );
    }
    Ok(f)
}
