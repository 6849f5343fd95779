//! Off-host anchors: the records as shipped to object storage (the signed list of
//! table heads and every file's signed manifest) compared with the records here.
//!
//! Local verification trusts the host's own heads, and whoever is root on the host
//! holds the signing key: a deleted table, the newest files deleted, an older head
//! restored or a file rewritten and re-signed can all be made to verify there. What
//! already left the host cannot be taken back, so a local copy behind or beside the
//! shipped one is named here. Fetching the shipped bytes is the caller's (the agent's
//! object-store client); this compares what it is handed, with the trusted key.

use std::collections::BTreeMap;
use std::path::Path;

use crate::schema::Table;
use crate::seal::{self, file_sha256, Head, Heads, Manifest, PublicKey};
use crate::verify::Problem;

/// What the store holds for one host.
#[derive(Debug, Default, Clone)]
pub struct Shipped {
    /// Where it was read, for messages (`s3://bucket/prefix/host`).
    pub location: String,
    /// The shipped `_heads.json`; None when the store has nothing for the host.
    pub heads: Option<Vec<u8>>,
    /// Every shipped manifest: its path relative to the host's root (as in a records
    /// directory) and its bytes.
    pub manifests: Vec<(String, Vec<u8>)>,
}

/// Per table: files the shipped head names, and files here beyond it (not yet shipped).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableAnchor {
    pub shipped_files: u64,
    pub unshipped_files: u64,
}

#[derive(Debug, Default)]
pub struct AnchorReport {
    /// When the shipped list of heads was written (its `updated`).
    pub anchored_at: Option<String>,
    pub tables: BTreeMap<String, TableAnchor>,
    pub problems: Vec<Problem>,
}

impl AnchorReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn add(&mut self, table: &str, file: Option<&str>, what: String) {
        self.problems.push(Problem {
            table: table.into(),
            file: file.map(str::to_owned),
            what,
        });
    }
}

/// Compares the records in `dir` with what was shipped for them; `key` is the
/// host's trusted public key (shipped documents signed otherwise are not an anchor).
pub fn compare(dir: &Path, key: &PublicKey, shipped: &Shipped) -> AnchorReport {
    let mut report = AnchorReport::default();
    let loc = &shipped.location;
    let Some(bytes) = &shipped.heads else {
        report.add(
            "host",
            None,
            format!("missing host: the store holds no signed heads at {loc} (never shipped, or deleted from the store)"),
        );
        return report;
    };
    let heads: Heads = match serde_json::from_slice(bytes) {
        Ok(h) => h,
        Err(e) => {
            report.add(
                "host",
                Some(seal::HEADS_FILE),
                format!("the shipped list of heads at {loc} is unreadable: {e}"),
            );
            return report;
        }
    };
    if let Err(e) = key.check(&heads) {
        report.add(
            "host",
            Some(seal::HEADS_FILE),
            format!("the shipped list of heads at {loc} is not signed by the trusted key: {e}"),
        );
        return report;
    }
    report.anchored_at = Some(heads.updated.clone());
    let remote = shipped_manifests(key, shipped, &mut report);
    for t in Table::ALL {
        let Some(rhead) = heads.tables.get(t.name()) else {
            continue;
        };
        let empty = BTreeMap::new();
        let rfiles = remote.get(t.name()).unwrap_or(&empty);
        compare_table(dir, t, rhead, rfiles, loc, &mut report);
    }
    report
}

/// The shipped manifests that carry the trusted signature, by table and file number.
fn shipped_manifests(
    key: &PublicKey,
    shipped: &Shipped,
    report: &mut AnchorReport,
) -> BTreeMap<String, BTreeMap<u64, Manifest>> {
    let mut out: BTreeMap<String, BTreeMap<u64, Manifest>> = BTreeMap::new();
    for (rel, bytes) in &shipped.manifests {
        let table = rel.split('/').next().unwrap_or("");
        match serde_json::from_slice::<Manifest>(bytes) {
            Ok(m) => match key.check(&m) {
                Ok(()) if format!("{}{}", m.file, seal::MANIFEST_SUFFIX) == *rel => {
                    out.entry(m.table.clone())
                        .or_default()
                        .insert(m.file_seq, m);
                }
                Ok(()) => report.add(
                    table,
                    Some(rel),
                    format!(
                        "the shipped manifest describes {} (moved in the store)",
                        m.file
                    ),
                ),
                Err(e) => report.add(
                    table,
                    Some(rel),
                    format!("the shipped manifest is not signed by the trusted key: {e}"),
                ),
            },
            Err(e) => report.add(
                table,
                Some(rel),
                format!("the shipped manifest is unreadable: {e}"),
            ),
        }
    }
    out
}

/// One table: nothing shipped may be missing, older or different here.
fn compare_table(
    dir: &Path,
    t: Table,
    rhead: &Head,
    rfiles: &BTreeMap<u64, Manifest>,
    loc: &str,
    report: &mut AnchorReport,
) {
    let name = t.name();
    let shipped_last = rhead.last_file.as_deref().unwrap_or("-");
    if !dir.join(name).is_dir() {
        if rhead.next_file_seq > 0 {
            report.add(
                name,
                None,
                format!(
                    "table deleted: the directory {name}/ is gone here; the store at {loc} holds {} file(s) of it ending in {shipped_last}",
                    rhead.next_file_seq
                ),
            );
        }
        return;
    }
    // Local manifests by file number; what they say is checked by `verify`, here
    // only against the shipped ones.
    let mut local: BTreeMap<u64, (Manifest, String)> = BTreeMap::new();
    for mpath in seal::list_manifests(dir, t).unwrap_or_default() {
        if let Ok(m) = seal::read_json::<Manifest>(&mpath) {
            let rel = m.file.clone();
            local.insert(m.file_seq, (m, rel));
        }
    }
    let local_next = local.keys().next_back().map_or(0, |s| s + 1);
    let local_head = seal::read_json::<Head>(&seal::head_path(dir, name)).ok();
    report.tables.insert(
        name.into(),
        TableAnchor {
            shipped_files: rhead.next_file_seq,
            unshipped_files: local_next.saturating_sub(rhead.next_file_seq),
        },
    );
    let head_names = local_head.as_ref().map_or(0, |h| h.next_file_seq);
    if local_next < rhead.next_file_seq {
        if head_names >= rhead.next_file_seq {
            report.add(
                name,
                Some(shipped_last),
                format!(
                    "truncated: files {}..={} (the newest, up to {shipped_last}) were shipped to {loc} and are deleted here",
                    local_next,
                    rhead.next_file_seq - 1
                ),
            );
        } else {
            report.add(
                name,
                local_head.as_ref().and_then(|h| h.last_file.as_deref()),
                format!(
                    "rolled back: the head here names {head_names} file(s) ending in {}, the head shipped to {loc} ({}) names {} ending in {shipped_last} (newer files deleted and an older head restored)",
                    local_head.as_ref().and_then(|h| h.last_file.as_deref()).unwrap_or("-"),
                    rhead.updated,
                    rhead.next_file_seq
                ),
            );
        }
    } else if head_names < rhead.next_file_seq {
        report.add(
            name,
            None,
            format!(
                "rolled back: the head here names {head_names} file(s), the head shipped to {loc} names {} ending in {shipped_last}",
                rhead.next_file_seq
            ),
        );
    } else if rhead.next_file_seq > 0 {
        // The chain here must pass through the shipped head.
        if let Some((m, rel)) = local.get(&(rhead.next_file_seq - 1)) {
            if m.last_hash != rhead.last_hash {
                report.add(
                    name,
                    Some(rel),
                    format!("replaced: the chain here ends this file in another hash than the head shipped to {loc} (files rewritten and re-signed)"),
                );
            }
        }
    }
    let first_local = local.keys().next().copied().unwrap_or(u64::MAX);
    for (seq, rm) in rfiles {
        match local.get(seq) {
            Some((lm, rel)) => compare_file(dir, name, lm, rel, rm, loc, report),
            // Before the first file here: retention's (verify checks it is documented);
            // at or past the last: the truncation or rollback above.
            None if *seq < first_local || *seq >= local_next => {}
            None => report.add(
                name,
                Some(&rm.file),
                format!("file deleted: shipped to {loc}, missing here"),
            ),
        }
    }
}

/// One file present both here and in the store: the same signed description, and
/// the bytes here are the bytes shipped.
fn compare_file(
    dir: &Path,
    table: &str,
    local: &Manifest,
    rel: &str,
    shipped: &Manifest,
    loc: &str,
    report: &mut AnchorReport,
) {
    let bytes_sha = file_sha256(&dir.join(&shipped.file))
        .ok()
        .map(|(sha, _)| hex::encode(sha));
    if local != shipped || bytes_sha.as_deref() != Some(shipped.sha256.as_str()) {
        let here = bytes_sha.as_deref().map_or("absent", |s| &s[..12]);
        report.add(
            table,
            Some(rel),
            format!(
                "replaced: differs from the copy shipped to {loc} (SHA-256 {here}… here, {}… shipped; {} rows shipped)",
                &shipped.sha256[..shipped.sha256.len().min(12)],
                shipped.rows
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{Signer, MANIFEST_FORMAT};

    /// A records directory with `n` requests files (their bytes stand in for
    /// Parquet: only manifests, heads and digests are compared here) and what a
    /// shipper would have shipped of its first `shipped` files.
    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: std::path::PathBuf,
        signer: Signer,
        files: Vec<Manifest>,
    }

    fn hash(i: u64) -> String {
        hex::encode(sha2::Sha256::digest(i.to_be_bytes()))
    }
    use sha2::Digest as _;

    impl Fixture {
        fn new(n: u64) -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("records");
            let signer = Signer::load_or_create(tmp.path()).unwrap();
            let mut f = Fixture {
                _tmp: tmp,
                dir,
                signer,
                files: Vec::new(),
            };
            for seq in 0..n {
                f.add_file(seq);
            }
            f.write_heads(n);
            f
        }

        fn add_file(&mut self, seq: u64) {
            self.add_file_with(seq, &format!("rows of file {seq}"));
        }

        fn add_file_with(&mut self, seq: u64, bytes: &str) {
            let file = format!("requests/date=2026-12-06/h-{seq:012}.parquet");
            let p = self.dir.join(&file);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
            let (sha, len) = file_sha256(&p).unwrap();
            let mut m = Manifest {
                format: MANIFEST_FORMAT.into(),
                table: "requests".into(),
                file: file.clone(),
                file_seq: seq,
                rows: 1,
                first_chain_seq: seq,
                last_chain_seq: seq,
                prev_hash: if seq == 0 {
                    "0".repeat(64)
                } else {
                    hash(seq - 1)
                },
                last_hash: hash(seq),
                sha256: hex::encode(sha),
                bytes: len,
                journal_seq_last: seq,
                schema_version: 1,
                created: String::new(),
                key_id: String::new(),
                signature: String::new(),
            };
            self.signer.sign(&mut m);
            std::fs::write(seal::manifest_path(&p), serde_json::to_vec(&m).unwrap()).unwrap();
            self.files.push(m);
        }

        fn head(&self, n: u64) -> Head {
            let mut h = Head::empty("requests");
            if n > 0 {
                let m = &self.files[n as usize - 1];
                h.next_file_seq = n;
                h.next_chain_seq = n;
                h.last_hash = m.last_hash.clone();
                h.last_file = Some(m.file.clone());
            }
            self.signer.sign(&mut h);
            h
        }

        /// The local head and list of heads naming the first `n` files.
        fn write_heads(&self, n: u64) {
            std::fs::write(
                seal::head_path(&self.dir, "requests"),
                serde_json::to_vec(&self.head(n)).unwrap(),
            )
            .unwrap();
            std::fs::write(seal::heads_path(&self.dir), self.heads_bytes(n)).unwrap();
        }

        fn heads_bytes(&self, n: u64) -> Vec<u8> {
            let mut heads = Heads::new("h", [self.head(n)]);
            self.signer.sign(&mut heads);
            serde_json::to_vec(&heads).unwrap()
        }

        /// What the store holds after shipping the first `n` files.
        fn shipped(&self, n: u64) -> Shipped {
            Shipped {
                location: "s3://b/fleet/h".into(),
                heads: Some(self.heads_bytes(n)),
                manifests: self.files[..n as usize]
                    .iter()
                    .map(|m| {
                        (
                            format!("{}{}", m.file, seal::MANIFEST_SUFFIX),
                            serde_json::to_vec(m).unwrap(),
                        )
                    })
                    .collect(),
            }
        }

        fn remove(&self, seq: usize) {
            let p = self.dir.join(&self.files[seq].file);
            std::fs::remove_file(seal::manifest_path(&p)).unwrap();
            std::fs::remove_file(p).unwrap();
        }

        fn problems(&self, shipped: &Shipped) -> String {
            let r = compare(&self.dir, &self.signer.public, shipped);
            r.problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    #[test]
    fn records_matching_the_shipped_copy_pass_and_unshipped_files_are_counted() {
        let f = Fixture::new(3);
        let r = compare(&f.dir, &f.signer.public, &f.shipped(3));
        assert!(r.ok(), "{:?}", r.problems);
        // Two shipped, the third not yet: not a problem, a lag.
        let r = compare(&f.dir, &f.signer.public, &f.shipped(2));
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(
            r.tables["requests"],
            TableAnchor {
                shipped_files: 2,
                unshipped_files: 1
            }
        );
    }

    #[test]
    fn a_deleted_table_directory_is_named() {
        let f = Fixture::new(2);
        std::fs::remove_dir_all(f.dir.join("requests")).unwrap();
        let p = f.problems(&f.shipped(2));
        assert!(
            p.contains("requests: table deleted: the directory requests/ is gone here"),
            "{p}"
        );
    }

    #[test]
    fn the_newest_files_deleted_are_a_truncation() {
        let f = Fixture::new(3);
        f.remove(2);
        let p = f.problems(&f.shipped(3));
        assert!(p.contains("truncated: files 2..=2"), "{p}");
    }

    #[test]
    fn an_older_signed_head_restored_is_a_rollback() {
        let f = Fixture::new(3);
        f.remove(2);
        f.remove(1);
        f.write_heads(1);
        let p = f.problems(&f.shipped(3));
        assert!(
            p.contains("rolled back: the head here names 1 file(s)"),
            "{p}"
        );
    }

    #[test]
    fn a_file_rewritten_and_re_signed_is_replaced() {
        let mut f = Fixture::new(2);
        let shipped = f.shipped(2);
        // Root on the host holds the key: the file and its manifest re-signed
        // verify there, but not against what left the host.
        f.files.pop();
        f.add_file_with(1, "other rows");
        f.write_heads(2);
        let local = verify_signatures(&f);
        assert!(local.is_empty(), "{local:?}");
        let p = f.problems(&shipped);
        assert!(
            p.contains(
                "h-000000000001.parquet: replaced: differs from the copy shipped to s3://b/fleet/h"
            ),
            "{p}"
        );
    }

    /// What the host alone can tell: every manifest and head carries the key's signature.
    fn verify_signatures(f: &Fixture) -> Vec<String> {
        let mut bad = Vec::new();
        for m in &f.files {
            if let Err(e) = f.signer.public.check(m) {
                bad.push(format!("{}: {e}", m.file));
            }
        }
        let h: Head = seal::read_json(&seal::head_path(&f.dir, "requests")).unwrap();
        if let Err(e) = f.signer.public.check(&h) {
            bad.push(format!("head: {e}"));
        }
        bad
    }

    #[test]
    fn a_host_missing_from_the_store_and_a_foreign_signature_are_named() {
        let f = Fixture::new(1);
        let mut none = f.shipped(1);
        none.heads = None;
        assert!(f.problems(&none).contains("missing host"));
        let other = Fixture::new(1);
        let p = f.problems(&other.shipped(1));
        assert!(p.contains("not signed by the trusted key"), "{p}");
    }
}
