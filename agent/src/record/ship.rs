//! Shipping: sealed Parquet files, their signed manifests and the signed heads go to
//! S3-compatible object storage, under `<prefix>/<host>/<table>/date=YYYY-MM-DD/`,
//! so something off the host remembers what existed.
//!
//! One thread owns it. Each pass takes a snapshot of the signed list of heads
//! (`_heads.json`), uploads every file that list covers and the remote has not got
//! (in file order, table by table), and only then the snapshot itself and each
//! table's head: remote heads never name a file the remote lacks. What has shipped
//! is a cursor per table in `state_dir/shipped.json`; while the store is unreachable
//! files simply wait in records_dir and ship, in order, when it is back. How long the
//! oldest sealed file has waited is the lag; past `max_unshipped` the store stops
//! accepting exchanges (fail closed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use tracing::{info, warn};

use super::config::{ShippingSection, Sse};
use super::journal::Submission;
use super::seal::{self, Heads, Manifest};
use super::{micros, EventRecord, Origin, Record, Table};

const CURSOR_FILE: &str = "shipped.json";
const POLL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Shipping's progress, shared with the store (`status`, metrics, fail closed).
#[derive(Default)]
pub struct ShipState {
    pub shipped_files: AtomicU64,
    pub unshipped_files: AtomicU64,
    pub failures: AtomicU64,
    /// Seconds the oldest sealed, unshipped file has waited.
    pub lag_secs: AtomicU64,
    /// Set while the lag is past `max_unshipped`.
    pub too_far_behind: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// What the start found against the off-host anchor.
    pub anchor: Mutex<Option<StartAnchor>>,
}

/// What the start found comparing the records here with the shipped anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAnchor {
    /// The records here hold everything shipped (and maybe more, not yet shipped).
    Matches,
    /// The store holds nothing for this host yet.
    NothingShipped,
    /// The store could not be read: not a rollback; the start goes on.
    Unreachable(String),
    /// The records here are behind (or beside) what was shipped: each problem.
    Behind(Vec<String>),
}

impl StartAnchor {
    /// One line for `status` and the `events` row.
    pub fn summary(&self) -> String {
        match self {
            StartAnchor::Matches => "ok: the records here hold everything shipped".into(),
            StartAnchor::NothingShipped => "ok: nothing shipped for this host yet".into(),
            StartAnchor::Unreachable(e) => {
                format!("unchecked: the off-host anchor could not be read at start: {e}")
            }
            StartAnchor::Behind(p) => format!("behind the off-host anchor: {}", p.join("; ")),
        }
    }
}

/// Compares the records in `records_dir` with what was shipped for `host` (run on
/// a thread of its own: the store client has its own runtime).
pub(crate) fn check_start_anchor(
    cfg: &ShippingSection,
    records_dir: &Path,
    host: &str,
    key: &seal::PublicKey,
) -> StartAnchor {
    std::thread::scope(|s| {
        s.spawn(|| match Remote::new(cfg).and_then(|r| r.shipped(host)) {
            Err(e) => StartAnchor::Unreachable(format!("{e:#}")),
            Ok(sh) if sh.heads.is_none() => StartAnchor::NothingShipped,
            Ok(sh) => {
                let r = super::anchor::compare(records_dir, key, &sh);
                if r.ok() {
                    StartAnchor::Matches
                } else {
                    StartAnchor::Behind(r.problems.iter().map(ToString::to_string).collect())
                }
            }
        })
        .join()
        .unwrap_or_else(|_| StartAnchor::Unreachable("the check panicked".into()))
    })
}

/// `phigate status` view of shipping.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ShipProgress {
    pub destination: String,
    pub shipped_files: u64,
    pub unshipped_files: u64,
    pub failures: u64,
    pub lag_secs: u64,
    pub failing_closed: bool,
    pub last_error: Option<String>,
    /// The start's check against the off-host anchor, one line.
    #[serde(default)]
    pub anchor: Option<String>,
    /// Set when the start found the records here behind what was shipped.
    #[serde(default)]
    pub anchor_behind: bool,
}

impl ShipState {
    pub fn progress(&self, destination: &str) -> ShipProgress {
        ShipProgress {
            destination: destination.to_owned(),
            shipped_files: self.shipped_files.load(Ordering::Relaxed),
            unshipped_files: self.unshipped_files.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            lag_secs: self.lag_secs.load(Ordering::Relaxed),
            failing_closed: self.too_far_behind.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            anchor: self.anchor().map(|a| a.summary()),
            anchor_behind: matches!(self.anchor(), Some(StartAnchor::Behind(_))),
        }
    }

    pub fn anchor(&self) -> Option<StartAnchor> {
        self.anchor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Where shipping writes, as `status` shows it (no credentials).
pub fn destination(cfg: &ShippingSection) -> String {
    format!("{}/{}/{}", cfg.endpoint, cfg.bucket, cfg.prefix)
}

pub struct Shipper {
    store: Arc<dyn ObjectStore>,
    records_dir: PathBuf,
    cursor_path: PathBuf,
    /// `<prefix>/<host>`: every object of this host lies under it.
    root: String,
    /// Per table: the next file number to ship.
    cursor: BTreeMap<String, u64>,
    /// The heads snapshot last shipped, so an idle pass uploads nothing.
    shipped_heads: Option<Vec<u8>>,
    max_unshipped: Option<Duration>,
    state: Arc<ShipState>,
    shutdown: Arc<AtomicBool>,
    events: std::sync::mpsc::Sender<Submission>,
    origin: Origin,
    /// Set with `object_lock_days`: every object goes through it, never unlocked.
    locked: Option<super::lock::LockedPut>,
}

/// Shared parts the store hands the shipper.
pub struct ShipDeps {
    pub records_dir: PathBuf,
    pub state_dir: PathBuf,
    pub host: String,
    pub state: Arc<ShipState>,
    pub shutdown: Arc<AtomicBool>,
    pub events: std::sync::mpsc::Sender<Submission>,
    pub origin: Origin,
    pub sockets: crate::sockets::SocketFactory,
}

impl Shipper {
    pub fn new(cfg: &ShippingSection, deps: ShipDeps) -> anyhow::Result<Shipper> {
        let cursor_path = deps.state_dir.join(CURSOR_FILE);
        let cursor = match std::fs::read(&cursor_path) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("{}: not a shipping cursor", cursor_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| cursor_path.display().to_string()),
        };
        let root = host_root(&cfg.prefix, &deps.host);
        let store = object_store(cfg)?;
        let locked = super::lock::LockedPut::new(cfg, store.credentials().clone(), deps.sockets)?;
        Ok(Shipper {
            store: Arc::new(store),
            records_dir: deps.records_dir,
            cursor_path,
            root,
            cursor,
            shipped_heads: None,
            max_unshipped: cfg.max_unshipped,
            state: deps.state,
            shutdown: deps.shutdown,
            events: deps.events,
            origin: deps.origin,
            locked,
        })
    }

    /// Runs until the store closes; one last pass ships what the close sealed.
    pub fn run(mut self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "records shipping: cannot start its runtime");
                return;
            }
        };
        let mut backoff = POLL;
        let mut failing = false;
        loop {
            let last = self.shutdown.load(Ordering::Relaxed);
            match rt.block_on(self.pass()) {
                Ok(_) => {
                    backoff = POLL;
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                    if std::mem::take(&mut failing) {
                        info!("records shipping: the object store accepts files again");
                        self.event("ok", "shipping resumed".into());
                    }
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    self.state.failures.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut failing, true) {
                        warn!(error = %text, "records shipping: the object store did not take a file; sealed files wait locally and ship in order once it does");
                        self.event("failed", format!("shipping failed: {text}"));
                    }
                    *self
                        .state
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(text);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            self.update_lag();
            if last {
                break;
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until && !self.shutdown.load(Ordering::Relaxed) {
                std::thread::sleep(POLL.min(until - Instant::now()));
            }
        }
    }

    /// Ships everything the current signed list of heads covers, then the list.
    async fn pass(&mut self) -> anyhow::Result<usize> {
        let heads_path = seal::heads_path(&self.records_dir);
        let heads_bytes =
            std::fs::read(&heads_path).with_context(|| heads_path.display().to_string())?;
        if self.shipped_heads.as_ref() == Some(&heads_bytes) {
            self.state.unshipped_files.store(0, Ordering::Relaxed);
            return Ok(0);
        }
        let heads: Heads = serde_json::from_slice(&heads_bytes)
            .with_context(|| heads_path.display().to_string())?;
        let pending = self.pending(&heads)?;
        self.state
            .unshipped_files
            .store(pending.len() as u64, Ordering::Relaxed);
        let mut shipped = 0;
        for (m, mpath) in &pending {
            self.put(&m.file, self.records_dir.join(&m.file)).await?;
            let rel = format!("{}{}", m.file, seal::MANIFEST_SUFFIX);
            self.put(&rel, mpath.clone()).await?;
            self.cursor.insert(m.table.clone(), m.file_seq + 1);
            super::writer::write_atomically(&self.cursor_path, &serde_json::to_vec(&self.cursor)?)?;
            shipped += 1;
            self.state.shipped_files.fetch_add(1, Ordering::Relaxed);
            self.state.unshipped_files.fetch_sub(1, Ordering::Relaxed);
        }
        // Each table's head as the snapshot holds it (signed), not the file as it is
        // now: that may already name a file this pass did not ship. A table without
        // files has no head of its own yet.
        for (name, head) in heads.tables.iter().filter(|(_, h)| h.next_file_seq > 0) {
            let rel = format!("{name}/{}", seal::HEAD_FILE);
            self.put_bytes(&rel, serde_json::to_vec_pretty(head)?)
                .await?;
        }
        self.put_bytes(seal::HEADS_FILE, heads_bytes.clone())
            .await?;
        self.shipped_heads = Some(heads_bytes);
        Ok(shipped)
    }

    /// Sealed files the list covers and the remote lacks, table by table in file order.
    fn pending(&self, heads: &Heads) -> anyhow::Result<Vec<(Manifest, PathBuf)>> {
        let mut out = Vec::new();
        for t in Table::ALL {
            let Some(listed) = heads.tables.get(t.name()) else {
                continue;
            };
            let from = self.cursor.get(t.name()).copied().unwrap_or(0);
            let mut ms = Vec::new();
            for mpath in seal::list_manifests(&self.records_dir, t)? {
                let m: Manifest = seal::read_json(&mpath)?;
                if m.file_seq >= from && m.file_seq < listed.next_file_seq {
                    ms.push((m, mpath));
                }
            }
            ms.sort_by_key(|(m, _)| m.file_seq);
            out.extend(ms);
        }
        Ok(out)
    }

    async fn put(&self, rel: &str, local: PathBuf) -> anyhow::Result<()> {
        let bytes = std::fs::read(&local).with_context(|| local.display().to_string())?;
        self.put_bytes(rel, bytes).await
    }

    async fn put_bytes(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let key = ObjectPath::from(format!("{}/{rel}", self.root));
        if let Some(locked) = &self.locked {
            return locked
                .put(key.as_ref(), bytes)
                .await
                .with_context(|| format!("uploading {key}"));
        }
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .with_context(|| format!("uploading {key}"))?;
        Ok(())
    }

    /// The lag: how long the oldest sealed, unshipped file has waited.
    fn update_lag(&self) {
        let unshipped =
            self.state.unshipped_files.load(Ordering::Relaxed) > 0 || self.shipped_heads.is_none();
        let lag = if unshipped {
            self.oldest_unshipped_age().unwrap_or_default()
        } else {
            Duration::ZERO
        };
        self.state.lag_secs.store(lag.as_secs(), Ordering::Relaxed);
        let behind = self.max_unshipped.is_some_and(|max| lag > max);
        if self.state.too_far_behind.swap(behind, Ordering::Relaxed) != behind {
            if behind {
                warn!(lag_secs = lag.as_secs(), "records shipping: sealed records wait longer than max_unshipped_secs; refusing new requests until they ship");
            } else {
                info!("records shipping: caught up; accepting requests again");
            }
        }
    }

    fn oldest_unshipped_age(&self) -> Option<Duration> {
        let mut oldest: Option<SystemTime> = None;
        for t in Table::ALL {
            let from = self.cursor.get(t.name()).copied().unwrap_or(0);
            for mpath in seal::list_manifests(&self.records_dir, t).ok()? {
                let Ok(m) = seal::read_json::<Manifest>(&mpath) else {
                    continue;
                };
                if m.file_seq < from {
                    continue;
                }
                if let Ok(at) = std::fs::metadata(&mpath).and_then(|md| md.modified()) {
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
            }
        }
        oldest.and_then(|o| o.elapsed().ok())
    }

    /// A `shipping` row in `events` (not awaited: it ships with the rest).
    fn event(&self, outcome: &'static str, message: String) {
        let mut ev = EventRecord::new(&self.origin, "shipping", outcome);
        ev.message = Some(message);
        if let Ok(json) = Record::Event(ev).to_json() {
            let _ = self.events.send(Submission {
                table: Table::Events,
                time_us: micros::of(SystemTime::now()),
                json,
                done: None,
            });
        }
    }
}

/// `<prefix>/<host>`: every object of one host lies under it.
pub(crate) fn host_root(prefix: &str, host: &str) -> String {
    [prefix, host]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/")
}

/// A store named on the command line, `s3://bucket/prefix` at `endpoint`
/// (credentials from the environment, as `AmazonS3Builder::from_env` reads them).
pub(crate) fn remote_section(
    url: &str,
    endpoint: &str,
    region: &str,
) -> anyhow::Result<ShippingSection> {
    let Some(rest) = url.strip_prefix("s3://") else {
        anyhow::bail!("{url}: expected s3://bucket/prefix");
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "{url}: no bucket in s3://bucket/prefix");
    let endpoint = endpoint.trim_end_matches('/');
    if let Some(what) = super::config::endpoint_problem(endpoint) {
        anyhow::bail!("--endpoint {endpoint}: {what}");
    }
    Ok(ShippingSection {
        endpoint: endpoint.to_owned(),
        bucket: bucket.to_owned(),
        prefix: prefix.trim_matches('/').to_owned(),
        region: region.to_owned(),
        access_key_file: None,
        secret_key_file: None,
        max_unshipped: None,
        sse: None,
        object_lock_days: None,
        anchor_at_start: Default::default(),
    })
}

/// `s3://bucket/prefix/host`, as messages name a host's place in the store.
pub(crate) fn location(cfg: &ShippingSection, host: &str) -> String {
    format!("s3://{}/{}", cfg.bucket, host_root(&cfg.prefix, host))
}

/// Reads from the store for `audit verify`: one host's anchor, or a whole fleet.
pub(crate) struct Remote {
    cfg: ShippingSection,
    store: object_store::aws::AmazonS3,
    rt: tokio::runtime::Runtime,
}

impl Remote {
    pub(crate) fn new(cfg: &ShippingSection) -> anyhow::Result<Remote> {
        Ok(Remote {
            cfg: cfg.clone(),
            store: object_store(cfg)?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// What the store holds for `host`: its signed heads and every manifest.
    pub(crate) fn shipped(&self, host: &str) -> anyhow::Result<super::anchor::Shipped> {
        let root = host_root(&self.cfg.prefix, host);
        let location = location(&self.cfg, host);
        self.rt.block_on(async {
            let heads = self.get(&format!("{root}/{}", seal::HEADS_FILE)).await?;
            let mut manifests = Vec::new();
            for key in self.keys(&root).await? {
                if key.ends_with(seal::MANIFEST_SUFFIX) {
                    let bytes = self
                        .get(&key)
                        .await?
                        .with_context(|| format!("{key}: listed but gone"))?;
                    let rel = key[root.len() + 1..].to_owned();
                    manifests.push((rel, bytes));
                }
            }
            Ok(super::anchor::Shipped {
                location,
                heads,
                manifests,
            })
        })
    }

    /// The hosts with anything under the prefix.
    pub(crate) fn hosts(&self) -> anyhow::Result<Vec<String>> {
        let prefix =
            (!self.cfg.prefix.is_empty()).then(|| ObjectPath::from(self.cfg.prefix.as_str()));
        let listed = self
            .rt
            .block_on(self.store.list_with_delimiter(prefix.as_ref()))
            .with_context(|| format!("listing s3://{}/{}", self.cfg.bucket, self.cfg.prefix))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Copies every object of `host` into `dir` (as a records directory); returns
    /// how many.
    pub(crate) fn pull(&self, host: &str, dir: &Path) -> anyhow::Result<usize> {
        let root = host_root(&self.cfg.prefix, host);
        self.rt.block_on(async {
            let keys = self.keys(&root).await?;
            for key in &keys {
                let rel = &key[root.len() + 1..];
                anyhow::ensure!(
                    !rel.split('/').any(|c| c == ".." || c.is_empty()),
                    "{key}: not a records path"
                );
                let bytes = self
                    .get(key)
                    .await?
                    .with_context(|| format!("{key}: listed but gone"))?;
                let p = dir.join(rel);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| parent.display().to_string())?;
                }
                std::fs::write(&p, bytes).with_context(|| p.display().to_string())?;
            }
            Ok(keys.len())
        })
    }

    async fn keys(&self, root: &str) -> anyhow::Result<Vec<String>> {
        use futures_util::TryStreamExt as _;
        let prefix = ObjectPath::from(root);
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .with_context(|| format!("listing s3://{}/{root}", self.cfg.bucket))?;
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        Ok(keys)
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = ObjectPath::from(key);
        match self.store.get(&path).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .with_context(|| format!("reading s3://{}/{key}", self.cfg.bucket))?
                    .to_vec(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => {
                Err(anyhow::Error::new(e)
                    .context(format!("reading s3://{}/{key}", self.cfg.bucket)))
            }
        }
    }
}

/// The S3 client: path-style requests, credentials from 0600 files or the environment.
fn object_store(cfg: &ShippingSection) -> anyhow::Result<object_store::aws::AmazonS3> {
    let mut b = AmazonS3Builder::from_env()
        .with_endpoint(&cfg.endpoint)
        .with_bucket_name(&cfg.bucket)
        .with_region(&cfg.region)
        .with_virtual_hosted_style_request(false)
        // A pass that fails returns soon: the files wait locally and the next pass
        // retries, so the client's own long retries would only delay the report.
        .with_retry(object_store::RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .with_client_options(
            object_store::ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(2))
                .with_timeout(Duration::from_secs(20))
                // Config allows plain http only to loopback.
                .with_allow_http(cfg.endpoint.starts_with("http://")),
        );
    if let (Some(id), Some(secret)) = (&cfg.access_key_file, &cfg.secret_key_file) {
        b = b
            .with_access_key_id(secret_file(id)?)
            .with_secret_access_key(secret_file(secret)?);
    }
    // object_store does not export the encryption key enum; its config name does.
    let sse_key: AmazonS3ConfigKey = "aws_server_side_encryption"
        .parse()
        .context("object_store's encryption setting")?;
    b = match &cfg.sse {
        None => b,
        Some(Sse::Kms { key_id: Some(k) }) => b.with_sse_kms_encryption(k),
        Some(sse) => b.with_config(sse_key, sse.header()),
    };
    b.build()
        .context("records shipping: the object store client")
}

/// A credential file: 0600 (refused otherwise), its content trimmed.
fn secret_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{}: a shipping credential readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_named_on_the_command_line_is_parsed_and_plain_http_kept_to_loopback() {
        let c = remote_section("s3://records/prod/", "http://127.0.0.1:9000/", "eu").unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("records", "prod"));
        assert_eq!(location(&c, "ward-a"), "s3://records/prod/ward-a");
        let e = remote_section("s3://records", "http://10.0.0.5:9000", "eu")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain http only to a loopback address"), "{e}");
        let e = remote_section("records/prod", "https://s3.example", "eu")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected s3://bucket/prefix"), "{e}");
    }

    #[test]
    fn a_credential_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        std::fs::write(&p, "S3CRET\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = secret_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(secret_file(&p).unwrap(), "S3CRET");
    }
}
