//! Keyed pseudonyms for patient identifiers, so records never hold a raw patient id
//! yet an auditor can still find every access to one patient.
//!
//! pseudonym = "p:" + the first 32 hex digits of HMAC-SHA256(key, id). The key is 32
//! random bytes in `state_dir/pseudonym.key` (0600), created once. Without the key a
//! pseudonym cannot be turned back into the id, nor computed from a guessed id;
//! `phigate audit pseudonym ID` computes it for an auditor on the host.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const KEY_FILE: &str = "pseudonym.key";

pub struct Pseudonymizer {
    key: [u8; 32],
    /// Path segments after which the next segment is a patient id (FHIR: `Patient`).
    segments: Vec<String>,
}

impl Pseudonymizer {
    /// Loads the key from `state_dir`, creating it (0600, atomically) on first use.
    pub fn load_or_create(state_dir: &Path, segments: Vec<String>) -> anyhow::Result<Self> {
        let path = state_dir.join(KEY_FILE);
        if !path.exists() {
            fs::create_dir_all(state_dir)?;
            let mut key = [0u8; 32];
            fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let tmp = state_dir.join(format!("{KEY_FILE}.tmp.{}", std::process::id()));
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            // Another process may have won the race: keep whichever key landed first.
            if fs::hard_link(&tmp, &path).is_err() && !path.exists() {
                anyhow::bail!("cannot create {}", path.display());
            }
            let _ = fs::remove_file(&tmp);
        }
        let meta = fs::metadata(&path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "{}: the pseudonym key is readable by group or others; run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        let bytes = fs::read(&path)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: not a 32-byte key", path.display()))?;
        Ok(Pseudonymizer { key, segments })
    }

    pub fn pseudonym(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(id.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("p:{}", &hex::encode(digest)[..32])
    }

    /// The path with every patient id replaced by its pseudonym, and those pseudonyms.
    /// `/Patient/123/_history/2` -> (`/Patient/p:…/_history/2`, [`p:…`]).
    pub fn redact_path(&self, path: &str) -> (String, Vec<String>) {
        let mut refs = Vec::new();
        let mut out = String::with_capacity(path.len() + 32);
        let mut after_marker = false;
        for (i, seg) in path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            if after_marker && !seg.is_empty() && !seg.starts_with('$') && !seg.starts_with('_') {
                let id = percent_decode(seg);
                let p = self.pseudonym(&id);
                out.push_str(&p);
                if !refs.contains(&p) {
                    refs.push(p);
                }
                after_marker = false;
                continue;
            }
            out.push_str(seg);
            after_marker = self.segments.iter().any(|m| m == seg);
        }
        (out, refs)
    }
}

/// %XX decoding, so `/Patient/12%33` and `/Patient/123` get the same pseudonym.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(dir: &Path) -> Pseudonymizer {
        Pseudonymizer::load_or_create(dir, vec!["Patient".into()]).unwrap()
    }

    #[test]
    fn stable_keyed_and_private() {
        let d = tempfile::tempdir().unwrap();
        let a = p(d.path());
        let b = p(d.path());
        assert_eq!(a.pseudonym("123"), b.pseudonym("123"));
        assert_ne!(a.pseudonym("123"), a.pseudonym("124"));
        assert!(a.pseudonym("123").starts_with("p:"));
        assert_eq!(a.pseudonym("123").len(), 34);
        let mode = fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            p(other.path()).pseudonym("123"),
            a.pseudonym("123"),
            "keyed per host"
        );
    }

    #[test]
    fn patient_ids_leave_the_path() {
        let d = tempfile::tempdir().unwrap();
        let ps = p(d.path());
        let (path, refs) = ps.redact_path("/fhir/Patient/12345/_history/2");
        assert!(!path.contains("12345"), "{path}");
        assert_eq!(refs, vec![ps.pseudonym("12345")]);
        assert_eq!(
            path,
            format!("/fhir/Patient/{}/_history/2", ps.pseudonym("12345"))
        );
        // Encoded the same id: the same pseudonym.
        assert_eq!(ps.redact_path("/Patient/1234%35").1, refs);
        // Operations and searches are not ids.
        assert_eq!(ps.redact_path("/Patient/$export").1.len(), 0);
        assert_eq!(ps.redact_path("/Patient/_search").1.len(), 0);
        assert_eq!(ps.redact_path("/Patient").0, "/Patient");
        assert_eq!(ps.redact_path("/Observation/9").1.len(), 0);
    }

    #[test]
    fn a_readable_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        p(d.path());
        fs::set_permissions(d.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let e = Pseudonymizer::load_or_create(d.path(), vec![])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
