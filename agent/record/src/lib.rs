//! phigate's record format and its verifier: what an auditor's tool links to read and
//! check records without the agent (no eBPF, no sockets, no journal).
//!
//! * [`schema`]: the four tables and their typed columns (the column contract).
//! * [`values`]: the closed sets of values the `outcome` and `decision` columns hold.
//! * [`chain`]: the hash chain over each table's rows.
//! * [`seal`]: signed manifests (one per Parquet file) and heads (one per table), the
//!   signing key and the public key, and where they lie in a records directory.
//! * [`read`]: every row of a table, in chain order, as JSON objects.
//! * [`verify`]: `phigate audit verify`, needing only the public key.
//! * [`anchor`]: the records here against the copy shipped off the host.
//! * [`keyfile`]: secret key files (0600, created once).
//!
//! The agent writes records (journal, Parquet writer: `phigate::record`); this crate
//! defines what they are and how they are checked, so both sides compute the same
//! bytes.
//!
//! Entry points: [`verify::verify`] with a [`seal::PublicKey`], [`read::rows`].

#![forbid(unsafe_code)]

pub mod anchor;
pub mod chain;
pub mod keyfile;
pub mod original;
pub mod read;
pub mod schema;
pub mod seal;
pub mod values;
pub mod verify;

pub use schema::Table;
pub use values::{Outcome, RequestDecision, RequestOutcome};
