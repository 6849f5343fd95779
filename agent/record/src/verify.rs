//! `phigate audit verify`: checks a records directory against its signed manifests,
//! heads and hash chains, needing only the public key. Every problem is reported with
//! the table, the file and, for rows, the chain sequence number.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::UInt64Type;
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::chain::{self, Hash, GENESIS};
use crate::schema::{Table, CHAIN_HASH, CHAIN_SEQ};
use crate::seal::{self, file_sha256, walk, Head, Heads, Manifest, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub table: String,
    pub file: Option<String>,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{}: {file}: {}", self.table, self.what),
            None => write!(f, "{}: {}", self.table, self.what),
        }
    }
}

#[derive(Debug, Default)]
pub struct TableSummary {
    pub files: usize,
    pub rows: u64,
    /// Rows before the first remaining file, deleted by documented retention.
    pub retired_rows: u64,
}

#[derive(Debug, Default)]
pub struct Report {
    pub tables: BTreeMap<String, TableSummary>,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A retention deletion as the events table documents it.
#[derive(Debug, Clone)]
struct Retired {
    last_chain_seq: u64,
    last_hash: String,
}

/// Verifies every table under `dir` with `key`.
pub fn verify(dir: &Path, key: &PublicKey) -> anyhow::Result<Report> {
    if !dir.is_dir() {
        anyhow::bail!("{}: not a directory", dir.display());
    }
    let mut report = Report::default();
    // Retention deletions documented in `events` explain gaps at the start of any
    // table, `events` included. Rows read here are trusted only as far as their own
    // files verify below.
    let mut retired: HashMap<String, Vec<Retired>> = HashMap::new();
    for mpath in seal::list_manifests(dir, Table::Events)? {
        let Some(data) = relative(dir, &mpath)
            .strip_suffix(seal::MANIFEST_SUFFIX)
            .map(|d| dir.join(d))
        else {
            continue;
        };
        let Ok(reader) = File::open(&data)
            .map_err(anyhow::Error::from)
            .and_then(|f| Ok(ParquetRecordBatchReaderBuilder::try_new(f)?.build()?))
        else {
            continue;
        };
        // Stop at the first error: a damaged file can make the reader fail on every
        // call without ever ending (verify_table reports the file).
        for b in reader.map_while(Result::ok) {
            collect_retired(&b, &mut retired);
        }
    }
    let listed = read_heads(dir, key, &mut report);
    for t in Table::ALL {
        verify_table(dir, t, key, &retired, listed.as_ref(), &mut report)?;
    }
    Ok(report)
}

/// The signed list of tables (`_heads.json`), if it is there and genuine; a problem
/// otherwise, since then a table deleted as a whole cannot be told.
fn read_heads(dir: &Path, key: &PublicKey, report: &mut Report) -> Option<Heads> {
    let mut problem = |what: String| {
        report.problems.push(Problem {
            table: "records".into(),
            file: Some(seal::HEADS_FILE.into()),
            what,
        })
    };
    match seal::read_json::<Heads>(&seal::heads_path(dir)) {
        Ok(h) => match key.check(&h) {
            Ok(()) => Some(h),
            Err(e) => {
                problem(format!("signature of the list of tables invalid: {e}"));
                None
            }
        },
        Err(e) => {
            problem(format!(
                "the signed list of tables is missing or unreadable ({e:#}): a deleted table could not be told"
            ));
            None
        }
    }
}

fn collect_retired(b: &RecordBatch, out: &mut HashMap<String, Vec<Retired>>) {
    let col = |n: &str| b.column_by_name(n);
    let (Some(kind), Some(table), Some(last), Some(hash)) = (
        col("kind"),
        col("table_name"),
        col("last_chain_seq"),
        col("last_hash"),
    ) else {
        return;
    };
    let (kind, table, hash) = (
        kind.as_string::<i32>(),
        table.as_string::<i32>(),
        hash.as_string::<i32>(),
    );
    let last = last.as_primitive::<UInt64Type>();
    for i in 0..b.num_rows() {
        if kind.value(i) != "retention_delete" || table.is_null(i) || last.is_null(i) {
            continue;
        }
        out.entry(table.value(i).to_owned())
            .or_default()
            .push(Retired {
                last_chain_seq: last.value(i),
                last_hash: hash.value(i).to_owned(),
            });
    }
}

/// What is wrong in one table, in the order it was found.
struct Findings {
    table: Table,
    problems: Vec<Problem>,
}

impl Findings {
    fn add(&mut self, file: Option<&str>, what: String) {
        self.problems.push(Problem {
            table: self.table.name().into(),
            file: file.map(str::to_owned),
            what,
        })
    }
}

/// Verifies one table: every file is accounted for, whole and chained to the one
/// before, and the signed head names the newest.
fn verify_table(
    dir: &Path,
    t: Table,
    key: &PublicKey,
    retired: &HashMap<String, Vec<Retired>>,
    listed: Option<&Heads>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let table_dir = dir.join(t.name());
    let summary = report.tables.entry(t.name().into()).or_default();
    let mut found = Findings {
        table: t,
        problems: Vec::new(),
    };
    if !table_dir.is_dir() {
        let names = listed
            .and_then(|l| l.tables.get(t.name()))
            .map(|h| {
                format!(
                    "; the signed list of tables names {} file(s)",
                    h.next_file_seq
                )
            })
            .unwrap_or_default();
        found.add(
            None,
            format!("table directory {}/ is missing (deleted){names}", t.name()),
        );
        report.problems.append(&mut found.problems);
        return Ok(());
    }
    let head_path = seal::head_path(dir, t.name());
    let manifests = inventory(dir, &table_dir, &head_path, key, &mut found)?;
    check_files(dir, &manifests, summary, &mut found);
    check_links(&manifests, retired, summary, &mut found);
    let head = check_head(&head_path, key, &manifests, &mut found);
    if let Some(l) = listed {
        check_listed(l.tables.get(t.name()), head.as_ref(), &mut found);
    }
    report.problems.append(&mut found.problems);
    Ok(())
}

/// The table's head against the signed list of tables: never behind it.
fn check_listed(listed: Option<&Head>, head: Option<&Head>, found: &mut Findings) {
    let Some(l) = listed else {
        found.add(None, "not in the signed list of tables".into());
        return;
    };
    let ending = l.last_file.as_deref().unwrap_or("-");
    let have = head.map_or(0, |h| h.next_file_seq);
    if have < l.next_file_seq {
        found.add(
            head.and_then(|h| h.last_file.as_deref()),
            format!(
                "the table's head names {have} file(s), the signed list of tables {} ending in {ending} (table emptied, or newest files deleted and an older head restored)",
                l.next_file_seq
            ),
        );
    } else if have == l.next_file_seq && head.is_some_and(|h| h.last_hash != l.last_hash) {
        found.add(
            None,
            "the table's head differs from the signed list of tables (replaced)".into(),
        );
    }
}

/// Everything in the table directory must be accounted for: the signed manifests
/// (with the data file each lies beside), in file order.
fn inventory(
    dir: &Path,
    table_dir: &Path,
    head_path: &Path,
    key: &PublicKey,
    found: &mut Findings,
) -> anyhow::Result<Vec<(Manifest, String)>> {
    let t = found.table;
    let mut manifests: Vec<(Manifest, String)> = Vec::new();
    let mut data_files: Vec<String> = Vec::new();
    for p in walk(table_dir)? {
        let rel = relative(dir, &p);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p == head_path || name.ends_with(".tmp") {
            continue; // .tmp: a write in progress, or interrupted (removed at start)
        } else if let Some(data) = rel.strip_suffix(seal::MANIFEST_SUFFIX) {
            match seal::read_json::<Manifest>(&p) {
                Ok(m) => {
                    if let Err(e) = key.check(&m) {
                        found.add(Some(&rel), format!("manifest signature invalid: {e}"));
                    }
                    if m.table != t.name() {
                        found.add(Some(&rel), format!("manifest belongs to table {}", m.table));
                    }
                    if m.file != data {
                        found.add(
                            Some(&rel),
                            format!("manifest describes {} but lies beside {data} (files moved or swapped)", m.file),
                        );
                    }
                    manifests.push((m, data.to_owned()));
                }
                Err(e) => found.add(Some(&rel), format!("unreadable manifest: {e:#}")),
            }
        } else if name.ends_with(".parquet") {
            data_files.push(rel);
        } else {
            found.add(Some(&rel), "unexpected file in the records".into());
        }
    }
    for f in &data_files {
        if !manifests.iter().any(|(_, d)| d == f) {
            found.add(
                Some(f),
                "Parquet file without a signed manifest (inserted or renamed)".into(),
            );
        }
    }
    manifests.sort_by_key(|(m, _)| m.file_seq);
    Ok(manifests)
}

/// Each file: present, whole, and its rows chained.
fn check_files(
    dir: &Path,
    manifests: &[(Manifest, String)],
    summary: &mut TableSummary,
    found: &mut Findings,
) {
    for (m, data) in manifests {
        let path = dir.join(data);
        match file_sha256(&path) {
            Err(_) => {
                found.add(
                    Some(data),
                    format!(
                        "file deleted (manifest says {} rows, chain {}..={})",
                        m.rows, m.first_chain_seq, m.last_chain_seq
                    ),
                );
                continue;
            }
            Ok((sha, len)) => {
                if len != m.bytes {
                    found.add(
                        Some(data),
                        format!(
                            "file altered: {len} bytes where the signed manifest says {} (truncated, extended or rewritten)",
                            m.bytes
                        ),
                    );
                } else if hex::encode(sha) != m.sha256 {
                    found.add(
                        Some(data),
                        "file altered or replaced: its SHA-256 differs from the signed manifest"
                            .into(),
                    );
                }
            }
        }
        match check_rows(&path, m, found.table) {
            Ok((rows, problems)) => {
                summary.files += 1;
                summary.rows += rows;
                for w in problems {
                    found.add(Some(data), w);
                }
            }
            Err(e) => found.add(Some(data), format!("unreadable: {e:#}")),
        }
    }
}

/// Files chain to each other, the first to genesis or to a documented deletion.
fn check_links(
    manifests: &[(Manifest, String)],
    retired: &HashMap<String, Vec<Retired>>,
    summary: &mut TableSummary,
    found: &mut Findings,
) {
    let t = found.table;
    if let Some((first, data)) = manifests.first() {
        if first.first_chain_seq != 0 || first.prev_hash != chain::to_hex(&GENESIS) {
            let documented = retired.get(t.name()).is_some_and(|rs| {
                rs.iter().any(|r| {
                    r.last_chain_seq + 1 == first.first_chain_seq && r.last_hash == first.prev_hash
                })
            });
            if documented {
                summary.retired_rows = first.first_chain_seq;
            } else {
                found.add(
                    Some(data),
                    format!(
                        "the chain starts at row {}: earlier files were deleted without a retention record",
                        first.first_chain_seq
                    ),
                );
            }
        }
    }
    for w in manifests.windows(2) {
        let ((a, _), (b, bdata)) = (&w[0], &w[1]);
        if b.file_seq <= a.file_seq {
            // Two manifests with one number (a copy), or numbers going back.
            found.add(
                Some(bdata),
                format!(
                    "file number {} does not follow {} (files copied or replaced)",
                    b.file_seq, a.file_seq
                ),
            );
        } else if b.file_seq != a.file_seq + 1 {
            found.add(
                Some(bdata),
                format!(
                    "files {}..{} are missing (deleted)",
                    a.file_seq + 1,
                    b.file_seq - 1
                ),
            );
        }
        if b.prev_hash != a.last_hash || b.first_chain_seq != a.last_chain_seq + 1 {
            found.add(
                Some(bdata),
                format!(
                    "does not continue the chain of {} (rows deleted, files replaced or reordered)",
                    a.file
                ),
            );
        }
    }
}

/// The signed head names the newest file: deleting files from the end shows.
fn check_head(
    head_path: &Path,
    key: &PublicKey,
    manifests: &[(Manifest, String)],
    found: &mut Findings,
) -> Option<Head> {
    match seal::read_json::<Head>(head_path) {
        Ok(h) => {
            if let Err(e) = key.check(&h) {
                found.add(
                    None,
                    format!("{}: head signature invalid: {e}", seal::HEAD_FILE),
                );
            }
            let last = manifests.last().map(|(m, _)| m);
            let matches = match last {
                Some(m) => h.next_file_seq == m.file_seq + 1 && h.last_hash == m.last_hash,
                None => h.next_file_seq == 0,
            };
            if !matches {
                found.add(
                    h.last_file.as_deref(),
                    format!(
                        "the head names {} file(s) ending in {}, but the newest present is {} (files deleted from the end)",
                        h.next_file_seq,
                        h.last_file.as_deref().unwrap_or("-"),
                        last.map(|m| m.file.as_str()).unwrap_or("none")
                    ),
                );
            }
            Some(h)
        }
        Err(_) if manifests.is_empty() => None,
        Err(e) => {
            found.add(None, format!("head missing or unreadable: {e:#}"));
            None
        }
    }
}

/// Recomputes one file's chain; returns its row count and what is wrong.
fn check_rows(path: &Path, m: &Manifest, t: Table) -> anyhow::Result<(u64, Vec<String>)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    // A file rewritten by another tool may carry other columns or types; its rows
    // cannot be chained, and saying which columns differ is the precise report.
    let expected = t.file_schema();
    let differs: Vec<String> = expected
        .fields()
        .iter()
        .zip(
            builder
                .schema()
                .fields()
                .iter()
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .filter_map(|(want, got)| match got {
            Some(got) if got.name() == want.name() && got.data_type() == want.data_type() => None,
            Some(got) => Some(format!(
                "{} {} where {} {} was expected",
                got.name(),
                got.data_type(),
                want.name(),
                want.data_type()
            )),
            None => Some(format!("{} missing", want.name())),
        })
        .chain(
            builder
                .schema()
                .fields()
                .iter()
                .skip(expected.fields().len())
                .map(|f| format!("unexpected column {}", f.name())),
        )
        .collect();
    if !differs.is_empty() {
        let shown = differs
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        return Ok((
            0,
            vec![format!(
                "columns differ from the {t} schema ({shown}{}): the file was rewritten",
                if differs.len() > 3 { "; ..." } else { "" }
            )],
        ));
    }
    let reader = builder.build()?;
    let mut prev: Hash = chain::from_hex(&m.prev_hash).unwrap_or(GENESIS);
    let mut expect_seq = m.first_chain_seq;
    let mut rows = 0u64;
    let mut found = Vec::new();
    let mut buf = Vec::with_capacity(1024);
    let mut reported = 0;
    for batch in reader {
        let batch = batch?;
        let seqs = batch
            .column_by_name(CHAIN_SEQ)
            .ok_or_else(|| anyhow::anyhow!("no {CHAIN_SEQ} column"))?
            .as_primitive::<UInt64Type>()
            .clone();
        let hashes = batch
            .column_by_name(CHAIN_HASH)
            .ok_or_else(|| anyhow::anyhow!("no {CHAIN_HASH} column"))?
            .as_string::<i32>()
            .clone();
        let schema = batch.schema();
        let columns: Vec<usize> = (0..batch.num_columns())
            .filter(|&i| {
                let n = schema.field(i).name();
                n != CHAIN_SEQ && n != CHAIN_HASH
            })
            .collect();
        for row in 0..batch.num_rows() {
            rows += 1;
            let seq = seqs.value(row);
            let stored = chain::from_hex(hashes.value(row)).unwrap_or_default();
            buf.clear();
            chain::canonical_row(&batch, &columns, row, &mut buf);
            let computed = chain::link(&prev, seq, &buf);
            let problem = if seq != expect_seq {
                Some(format!(
                    "row {rows}: chain_seq {seq} where {expect_seq} was expected (rows deleted, inserted or reordered)"
                ))
            } else if computed != stored {
                Some(format!(
                    "row {rows} (chain_seq {seq}): content does not match its chain hash (row altered)"
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                if reported < 10 {
                    found.push(p);
                }
                reported += 1;
            }
            // Continue from the stored hash so one altered row is one finding.
            prev = stored;
            expect_seq = seq + 1;
        }
    }
    if reported > 10 {
        found.push(format!("... and {} more row problems", reported - 10));
    }
    if rows != m.rows {
        found.push(format!(
            "{rows} rows, the signed manifest says {} (rows deleted or inserted)",
            m.rows
        ));
    }
    if chain::to_hex(&prev) != m.last_hash && reported == 0 && rows == m.rows {
        found.push("the last row's hash differs from the signed manifest".into());
    }
    Ok((rows, found))
}

fn relative(base: &Path, p: &Path) -> String {
    p.strip_prefix(base)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

/// The default public key location for a config's state directory.
pub fn default_public_key(state_dir: &Path) -> PathBuf {
    state_dir.join(seal::PUBLIC_KEY_FILE)
}
