//! Sealed originals: a response body as the upstream sent it, encrypted to a
//! reviewer's X25519 public key with HPKE (RFC 9180, base mode,
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20Poly1305).
//!
//! The host holds only the public key, so nothing on it can read an original; the
//! reviewer opens it elsewhere with `phigate audit unseal`. The request id is the
//! AEAD's associated data: a blob copied into another row does not open there.
//!
//! Blob (base64 in the `response_original_sealed` column): `0x01 || enc (32) ||
//! ciphertext`; plaintext: `truncated (0|1) || body`.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::Digest as _;

const VERSION: u8 = 1;
/// Domain separation: these keys and blobs serve this one purpose.
const INFO: &[u8] = b"phigate sealed original v1";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("sealing failed: {0}")]
    Seal(String),
    #[error("the sealed original is malformed: {0}")]
    Malformed(&'static str),
    #[error(
        "the sealed original does not open: the key is not the one it was sealed to \
         (key id {expected}, this key {got}), or the blob was altered or moved from another request"
    )]
    Open { expected: String, got: String },
}

/// A reviewer's public key, as loaded from `review.pub`.
#[derive(Clone, PartialEq, Eq)]
pub struct ReviewKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for ReviewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReviewKey({})", self.key_id())
    }
}

/// A short, stable name for a public key (recorded beside each blob).
fn key_id_of(public: &[u8]) -> String {
    hex::encode(&sha2::Sha256::digest(public)[..8])
}

fn read_key(path: &Path) -> Result<[u8; 32], SealError> {
    let err = |reason: String| SealError::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let raw = B64
        .decode(text.trim())
        .map_err(|e| err(format!("not a base64 key: {e}")))?;
    raw.try_into()
        .map_err(|_| err("not a 32-byte X25519 key".into()))
}

impl ReviewKey {
    pub fn load(path: &Path) -> Result<ReviewKey, SealError> {
        let bytes = read_key(path)?;
        <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&bytes).map_err(|e| {
            SealError::KeyFile {
                path: path.to_owned(),
                reason: format!("not an X25519 public key: {e}"),
            }
        })?;
        Ok(ReviewKey { bytes })
    }

    pub fn key_id(&self) -> String {
        key_id_of(&self.bytes)
    }

    /// Seals `body` for the row of `request_id`; returns the base64 blob.
    pub fn seal(
        &self,
        request_id: &str,
        body: &[u8],
        truncated: bool,
    ) -> Result<String, SealError> {
        let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&self.bytes)
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let mut plain = Vec::with_capacity(body.len() + 1);
        plain.push(u8::from(truncated));
        plain.extend_from_slice(body);
        let mut rng = rand_core::OsRng;
        let (enc, ct) =
            hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256, _>(
                &OpModeS::Base,
                &pk,
                INFO,
                &plain,
                request_id.as_bytes(),
                &mut rand_core::UnwrapMut(&mut rng),
            )
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let mut blob = Vec::with_capacity(1 + 32 + ct.len());
        blob.push(VERSION);
        blob.extend_from_slice(&enc.to_bytes());
        blob.extend_from_slice(&ct);
        Ok(B64.encode(blob))
    }
}

/// A reviewer's private key (`review.key`): only on the reviewer's machine.
pub struct ReviewSecret {
    sk: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: [u8; 32],
}

/// The original a blob held.
#[derive(Debug, PartialEq, Eq)]
pub struct Original {
    pub body: Vec<u8>,
    pub truncated: bool,
}

impl ReviewSecret {
    pub fn load(path: &Path) -> Result<ReviewSecret, SealError> {
        let bytes = read_key(path)?;
        let sk = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(&bytes).map_err(|e| {
            SealError::KeyFile {
                path: path.to_owned(),
                reason: format!("not an X25519 private key: {e}"),
            }
        })?;
        let public = X25519HkdfSha256::sk_to_pk(&sk).to_bytes().into();
        Ok(ReviewSecret { sk, public })
    }

    pub fn key_id(&self) -> String {
        key_id_of(&self.public)
    }

    /// Opens the blob of the row `request_id` (`key_id`: the one recorded beside it).
    pub fn open(&self, request_id: &str, blob: &str, key_id: &str) -> Result<Original, SealError> {
        let raw = B64
            .decode(blob.trim())
            .map_err(|_| SealError::Malformed("not base64"))?;
        if raw.len() < 1 + 32 + 16 + 1 || raw[0] != VERSION {
            return Err(SealError::Malformed("unknown version or too short"));
        }
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&raw[1..33])
            .map_err(|_| SealError::Malformed("bad encapsulated key"))?;
        let plain = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.sk,
            &enc,
            INFO,
            &raw[33..],
            request_id.as_bytes(),
        )
        .map_err(|_| SealError::Open {
            expected: key_id.to_owned(),
            got: self.key_id(),
        })?;
        let (flag, body) = plain.split_first().ok_or(SealError::Malformed("empty"))?;
        Ok(Original {
            body: body.to_vec(),
            truncated: *flag == 1,
        })
    }
}

/// A new key pair: `(review.key, review.pub)` contents, base64 lines.
pub fn generate() -> (String, String) {
    let mut rng = rand_core::OsRng;
    let (sk, pk) = X25519HkdfSha256::gen_keypair(&mut rand_core::UnwrapMut(&mut rng));
    (
        format!("{}\n", B64.encode(sk.to_bytes())),
        format!("{}\n", B64.encode(pk.to_bytes())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (tempfile::TempDir, ReviewKey, ReviewSecret) {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = generate();
        std::fs::write(dir.path().join("k"), sk).unwrap();
        std::fs::write(dir.path().join("p"), pk).unwrap();
        let p = ReviewKey::load(&dir.path().join("p")).unwrap();
        let s = ReviewSecret::load(&dir.path().join("k")).unwrap();
        (dir, p, s)
    }

    #[test]
    fn roundtrip() {
        let (_d, p, s) = pair();
        assert_eq!(p.key_id(), s.key_id());
        let body = br#"{"name":[{"family":"Doe"}],"ssn":"123-45-6789"}"#;
        let blob = p.seal("req-1", body, true).unwrap();
        assert!(!blob.contains("Doe"));
        let o = s.open("req-1", &blob, &p.key_id()).unwrap();
        assert_eq!(o.body, body);
        assert!(o.truncated);
    }

    #[test]
    fn wrong_key_is_refused() {
        let (_d, p, _s) = pair();
        let (_d2, _p2, other) = pair();
        let blob = p.seal("req-1", b"secret", false).unwrap();
        let e = other.open("req-1", &blob, &p.key_id()).unwrap_err();
        assert!(matches!(e, SealError::Open { .. }), "{e}");
    }

    #[test]
    fn moved_blob_is_detected() {
        let (_d, p, s) = pair();
        let blob = p.seal("req-1", b"secret", false).unwrap();
        let e = s.open("req-2", &blob, &p.key_id()).unwrap_err();
        assert!(matches!(e, SealError::Open { .. }), "{e}");
    }

    #[test]
    fn a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("review.pub");
        std::fs::write(&f, "not a key").unwrap();
        let e = ReviewKey::load(&f).unwrap_err().to_string();
        assert!(e.contains("review.pub"), "{e}");
        assert!(ReviewKey::load(&dir.path().join("missing")).is_err());
    }
}
