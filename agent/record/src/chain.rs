//! The hash chain over each table's rows.
//!
//! `hash(n) = SHA-256("phigate-chain-v1" || hash(n-1) || n as u64 BE || canonical(row n))`
//! with `hash(-1)` = 32 zero bytes. `canonical` is defined here over the typed column
//! values (not over any file encoding), so the writer and `audit verify` compute it
//! from the same Arrow data, and a Parquet re-encoding does not change it:
//!
//! for each record column in schema order: name (u16 BE length + UTF-8), then the
//! value: `0x00` for null, else `0x01` and: strings u32 BE length + bytes; booleans
//! one byte; integers and timestamps as 8-byte big-endian; floats as their IEEE bits;
//! lists u32 BE count + values; maps u32 BE count + (key, value) pairs.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float64Type, Int64Type, TimestampMicrosecondType, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub const GENESIS: Hash = [0u8; 32];

const DOMAIN: &[u8] = b"phigate-chain-v1";

/// The canonical bytes of row `row` over the columns named in `columns` order.
pub(crate) fn canonical_row(batch: &RecordBatch, columns: &[usize], row: usize, out: &mut Vec<u8>) {
    let schema = batch.schema();
    for &c in columns {
        let name = schema.field(c).name().as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        value(batch.column(c).as_ref(), row, out);
    }
}

fn value(a: &dyn Array, i: usize, out: &mut Vec<u8>) {
    if a.is_null(i) {
        out.push(0);
        return;
    }
    out.push(1);
    match a.data_type() {
        DataType::Utf8 => {
            let s = a.as_string::<i32>().value(i).as_bytes();
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s);
        }
        DataType::Boolean => out.push(a.as_boolean().value(i) as u8),
        DataType::UInt16 => {
            out.extend_from_slice(&(a.as_primitive::<UInt16Type>().value(i) as u64).to_be_bytes())
        }
        DataType::UInt32 => {
            out.extend_from_slice(&(a.as_primitive::<UInt32Type>().value(i) as u64).to_be_bytes())
        }
        DataType::UInt64 => {
            out.extend_from_slice(&a.as_primitive::<UInt64Type>().value(i).to_be_bytes())
        }
        DataType::Int64 => {
            out.extend_from_slice(&a.as_primitive::<Int64Type>().value(i).to_be_bytes())
        }
        DataType::Float64 => out.extend_from_slice(
            &a.as_primitive::<Float64Type>()
                .value(i)
                .to_bits()
                .to_be_bytes(),
        ),
        DataType::Timestamp(TimeUnit::Microsecond, _) => out.extend_from_slice(
            &a.as_primitive::<TimestampMicrosecondType>()
                .value(i)
                .to_be_bytes(),
        ),
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(i);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            for j in 0..items.len() {
                value(items.as_ref(), j, out);
            }
        }
        DataType::Map(_, _) => {
            let entries = a.as_map().value(i);
            out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            for j in 0..entries.len() {
                value(entries.column(0).as_ref(), j, out);
                value(entries.column(1).as_ref(), j, out);
            }
        }
        // The schemas use only the types above; a new one must be given an encoding
        // here before it can be written (the schema test catches the change).
        other => panic!("no canonical encoding for {other}"),
    }
}

/// The hash of row `seq` given the previous hash and the row's canonical bytes.
pub fn link(prev: &Hash, seq: u64, canonical: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(canonical);
    h.finalize().into()
}

pub fn to_hex(h: &Hash) -> String {
    hex::encode(h)
}

/// Only the lowercase spelling phigate writes: hex decoding ignores case, and a hash
/// rewritten in capitals must not read as the one that was written.
pub fn from_hex(s: &str) -> Option<Hash> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

/// Hashes every row of `batch` (record columns `columns`), continuing from `prev` at
/// sequence `first_seq`; returns each row's hash.
pub fn hash_rows(batch: &RecordBatch, columns: &[usize], prev: Hash, first_seq: u64) -> Vec<Hash> {
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut prev = prev;
    let mut buf = Vec::with_capacity(1024);
    for row in 0..batch.num_rows() {
        buf.clear();
        canonical_row(batch, columns, row, &mut buf);
        prev = link(&prev, first_seq + row as u64, &buf);
        out.push(prev);
    }
    out
}
