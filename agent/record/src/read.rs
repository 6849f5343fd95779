//! Reading records back (tests, `phigate audit` tools): every row of a table, in
//! chain order, as JSON objects.

use std::fs::File;
use std::path::Path;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::seal::{self, list_manifests, Manifest};
use crate::Table;

/// The rows of `table` under `records_dir`, oldest first. Timestamps come out as
/// RFC 3339 text, maps as objects, lists as arrays.
pub fn rows(records_dir: &Path, table: Table) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut manifests: Vec<Manifest> = list_manifests(records_dir, table)?
        .iter()
        .map(|p| seal::read_json(p))
        .collect::<anyhow::Result<_>>()?;
    manifests.sort_by_key(|m| m.file_seq);
    let mut out = Vec::new();
    for m in manifests {
        let path = records_dir.join(&m.file);
        // The manifest lands just before its file is renamed into place.
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        let mut w = arrow_json::ArrayWriter::new(Vec::new());
        for b in &batches {
            w.write(b)?;
        }
        w.finish()?;
        let bytes = w.into_inner();
        if bytes.is_empty() {
            continue;
        }
        let v: Vec<serde_json::Value> = serde_json::from_slice(&bytes)?;
        out.extend(v);
    }
    Ok(out)
}
