//! Signed manifests: one per Parquet file, and one head per table naming the newest.
//!
//! A manifest binds a file's bytes (SHA-256), row count and chain range; the head
//! binds the newest file, so deleting the newest file (and its manifest) shows too.
//! Both are signed with an Ed25519 key kept 0600 in state_dir; the public key is all
//! `audit verify` needs.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::schema::Table;

pub const SIGNING_KEY_FILE: &str = "records-signing.key";
pub const PUBLIC_KEY_FILE: &str = "records-signing.pub";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
pub const HEAD_FILE: &str = "_head.json";

const PUBLIC_KEY_PREFIX: &str = "phigate-ed25519 ";

/// The private half, for the agent.
pub struct Signer {
    pair: Ed25519KeyPair,
    pub public: PublicKey,
}

impl Signer {
    /// Loads `state_dir/records-signing.key`, creating it (0600) on first use, and
    /// writes the public key beside it (0644) for export.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Signer> {
        let path = state_dir.join(SIGNING_KEY_FILE);
        let pkcs8 = crate::keyfile::load_or_create(&path, || {
            let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
            Ok(doc.as_ref().to_vec())
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key: {e}", path.display()))?;
        let public = PublicKey(pair.public_key().as_ref().try_into()?);
        let pub_path = state_dir.join(PUBLIC_KEY_FILE);
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(&public.to_text()) {
            std::fs::write(&pub_path, public.to_text())?;
        }
        Ok(Signer { pair, public })
    }

    pub fn sign<T: Signed>(&self, item: &mut T) {
        item.set_key_id(self.public.key_id());
        item.set_signature(String::new());
        let bytes = serde_json::to_vec(item).expect("manifests serialize");
        let sig = self.pair.sign(&bytes);
        item.set_signature(hex::encode(sig.as_ref()));
    }
}

/// The public half: what an auditor needs to verify records anywhere.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX}{}\n", hex::encode(self.0))
    }

    pub fn from_text(s: &str) -> Option<PublicKey> {
        let hex_part = s.trim().strip_prefix(PUBLIC_KEY_PREFIX)?;
        Some(PublicKey(
            hex::decode(hex_part.trim()).ok()?.try_into().ok()?,
        ))
    }

    pub fn read(path: &Path) -> anyhow::Result<PublicKey> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        PublicKey::from_text(&text).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: not a phigate public key (expected `{PUBLIC_KEY_PREFIX}<64 hex digits>`)",
                path.display()
            )
        })
    }

    /// Short id written into every manifest: the first 16 hex digits of SHA-256.
    pub fn key_id(&self) -> String {
        hex::encode(Sha256::digest(self.0))[..16].to_owned()
    }

    /// Checks `item`'s signature; the reason when it does not hold.
    pub fn check<T: Signed + Clone>(&self, item: &T) -> Result<(), String> {
        if item.key_id() != self.key_id() {
            return Err(format!(
                "signed by key {} but the trusted key is {}",
                item.key_id(),
                self.key_id()
            ));
        }
        // Only the canonical (lowercase) spelling: hex decoding ignores case, and a
        // signature rewritten in capitals would otherwise pass as unchanged.
        let sig = canonical_hex(item.signature())
            .ok_or_else(|| "signature is not lowercase hex".to_owned())?;
        let mut unsigned = item.clone();
        unsigned.set_signature(String::new());
        let bytes = serde_json::to_vec(&unsigned).expect("manifests serialize");
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(&bytes, &sig)
            .map_err(|_| "signature does not match its content".to_owned())
    }
}

/// Something carrying a key id and a signature over the rest of its fields.
pub trait Signed: Serialize {
    fn key_id(&self) -> &str;
    fn set_key_id(&mut self, id: String);
    fn signature(&self) -> &str;
    fn set_signature(&mut self, sig: String);
}

macro_rules! signed {
    ($t:ty) => {
        impl Signed for $t {
            fn key_id(&self) -> &str {
                &self.key_id
            }
            fn set_key_id(&mut self, id: String) {
                self.key_id = id;
            }
            fn signature(&self) -> &str {
                &self.signature
            }
            fn set_signature(&mut self, sig: String) {
                self.signature = sig;
            }
        }
    };
}

/// What one Parquet file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub table: String,
    /// Path relative to records_dir, e.g. `requests/date=2026-11-22/host-000000000007.parquet`.
    pub file: String,
    pub file_seq: u64,
    pub rows: u64,
    pub first_chain_seq: u64,
    pub last_chain_seq: u64,
    /// Chain hash before the first row (the previous file's last), and after the last.
    pub prev_hash: String,
    pub last_hash: String,
    pub sha256: String,
    pub bytes: u64,
    /// Journal entries up to this one are in Parquet (replay skips them).
    pub journal_seq_last: u64,
    pub schema_version: u32,
    pub created: String,
    pub key_id: String,
    pub signature: String,
}
signed!(Manifest);

pub const MANIFEST_FORMAT: &str = "phigate-manifest-v1";
pub(crate) const HEAD_FORMAT: &str = "phigate-head-v1";

/// The newest state of one table's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub format: String,
    pub table: String,
    /// Files written so far (the next file's sequence number).
    pub next_file_seq: u64,
    pub next_chain_seq: u64,
    pub last_hash: String,
    /// The newest file, relative to records_dir (None before the first).
    pub last_file: Option<String>,
    pub journal_seq_last: u64,
    pub updated: String,
    pub key_id: String,
    pub signature: String,
}
signed!(Head);

impl Head {
    pub fn empty(table: &str) -> Head {
        Head {
            format: HEAD_FORMAT.into(),
            table: table.into(),
            next_file_seq: 0,
            next_chain_seq: 0,
            last_hash: crate::chain::to_hex(&crate::chain::GENESIS),
            last_file: None,
            journal_seq_last: 0,
            updated: String::new(),
            key_id: String::new(),
            signature: String::new(),
        }
    }
}

pub const HEADS_FILE: &str = "_heads.json";
pub(crate) const HEADS_FORMAT: &str = "phigate-heads-v1";

/// Every table's head in one signed document at the top of the records directory:
/// which tables exist and how far each had got. A table directory deleted (or
/// emptied, or its head rolled back) no longer matches it. Written after each table
/// head, so a table's own head may be one step ahead of it after a crash, never behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heads {
    pub format: String,
    /// The host the records are from (file names carry it too).
    pub host: String,
    pub tables: std::collections::BTreeMap<String, Head>,
    pub updated: String,
    pub key_id: String,
    pub signature: String,
}
signed!(Heads);

impl Heads {
    pub fn new(host: &str, tables: impl IntoIterator<Item = Head>) -> Heads {
        Heads {
            format: HEADS_FORMAT.into(),
            host: host.into(),
            tables: tables.into_iter().map(|h| (h.table.clone(), h)).collect(),
            updated: now_rfc3339(),
            key_id: String::new(),
            signature: String::new(),
        }
    }
}

pub fn heads_path(records_dir: &Path) -> PathBuf {
    records_dir.join(HEADS_FILE)
}

pub fn manifest_path(data_file: &Path) -> PathBuf {
    let mut s = data_file.as_os_str().to_owned();
    s.push(MANIFEST_SUFFIX);
    PathBuf::from(s)
}

pub fn head_path(records_dir: &Path, table: &str) -> PathBuf {
    records_dir.join(table).join(HEAD_FILE)
}

pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Every manifest of table `t`.
pub fn list_manifests(records_dir: &Path, t: Table) -> std::io::Result<Vec<PathBuf>> {
    Ok(walk(&records_dir.join(t.name()))?
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(MANIFEST_SUFFIX))
        })
        .collect())
}

/// Files under `dir`, recursively (the partitions are one level deep).
pub fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A file's SHA-256 and length, as its manifest binds them.
pub fn file_sha256(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((h.finalize().into(), n))
}

/// `s` decoded, if it is lowercase hex (as phigate writes it).
fn canonical_hex(s: &str) -> Option<Vec<u8>> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_every_field() {
        let d = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(d.path()).unwrap();
        let mut h = Head::empty("requests");
        h.next_chain_seq = 10;
        s.sign(&mut h);
        let public = PublicKey::read(&d.path().join(PUBLIC_KEY_FILE)).unwrap();
        assert!(public.check(&h).is_ok());
        let mut forged = h.clone();
        forged.next_chain_seq = 9;
        assert!(public
            .check(&forged)
            .unwrap_err()
            .contains("does not match"));
        // Found by the verify fuzz target: the same signature in capitals decoded
        // to the same bytes and passed as unchanged.
        let mut recased = h.clone();
        recased.set_signature(h.signature().to_uppercase());
        assert!(public.check(&recased).unwrap_err().contains("lowercase"));
        let other = tempfile::tempdir().unwrap();
        let o = Signer::load_or_create(other.path()).unwrap();
        assert!(o.public.check(&h).unwrap_err().contains("trusted key"));
        // Same key on reload.
        assert!(Signer::load_or_create(d.path()).unwrap().public == public);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
