//! The local certificate authority whose certificate the host trusts.
//!
//! Created once (ECDSA P-256, 10 years) in `state_dir`; the key is written 0600 under
//! a temporary name and renamed, so it is never readable by others, not even briefly.
//! An operator may supply their own CA instead.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::TlsError;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// The CA as rcgen needs it to sign leaves (same subject and key as the file).
    issuer: rcgen::Certificate,
    key: KeyPair,
    not_after: OffsetDateTime,
}

impl CertAuthority {
    /// Loads the CA from `supplied` (operator's files) or from `state_dir`, creating
    /// it there on first use.
    pub fn load_or_create(
        state_dir: &Path,
        supplied: Option<(&Path, &Path)>,
    ) -> Result<Self, TlsError> {
        if let Some((cert, key)) = supplied {
            return Self::load(cert, key);
        }
        let cert = state_dir.join(CA_CERT_FILE);
        let key = state_dir.join(CA_KEY_FILE);
        if cert.exists() || key.exists() {
            return Self::load(&cert, &key);
        }
        Self::create(state_dir)
    }

    fn create(state_dir: &Path) -> Result<Self, TlsError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| TlsError::io(state_dir, e))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TlsError::rcgen)?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("phigate local CA ({host})"));
        dn.push(DnType::OrganizationName, "phigate");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(2);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key).map_err(TlsError::rcgen)?;

        let cert_path = state_dir.join(CA_CERT_FILE);
        let key_path = state_dir.join(CA_KEY_FILE);
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(cert = %cert_path.display(), "created the local CA");
        Self::load(&cert_path, &key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let meta = fs::metadata(key_path).map_err(|e| TlsError::io(key_path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::File {
                path: key_path.to_owned(),
                message: format!(
                    "the CA key is readable by group or others (mode {:o}); run `chmod 600 {}`",
                    meta.permissions().mode() & 0o777,
                    key_path.display()
                ),
            });
        }
        let cert_pem = fs::read_to_string(cert_path).map_err(|e| TlsError::io(cert_path, e))?;
        let key_pem = fs::read_to_string(key_path).map_err(|e| TlsError::io(key_path, e))?;
        let bad = |path: &Path, what: &str| TlsError::File {
            path: path.to_owned(),
            message: what.to_owned(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|_| {
            bad(
                key_path,
                "not a PEM private key rcgen can use (ECDSA P-256/P-384, Ed25519 or RSA)",
            )
        })?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| bad(cert_path, "not a PEM certificate"))?;
        let cert_der: CertificateDer<'static> = cert_der;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|_| bad(cert_path, "the certificate does not parse as X.509"))?;
        if !parsed.is_ca() {
            return Err(bad(
                cert_path,
                "the certificate is not a CA (basicConstraints CA:TRUE missing)",
            ));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(bad(
                key_path,
                "this key does not belong to the CA certificate",
            ));
        }
        let not_after = parsed.validity().not_after.to_datetime();
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|_| bad(cert_path, "the CA certificate cannot be used for signing"))?;
        let issuer = params.self_signed(&key).map_err(TlsError::rcgen)?;
        Ok(CertAuthority {
            cert_pem,
            cert_der,
            issuer,
            key,
            not_after,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub(crate) fn issuer(&self) -> (&rcgen::Certificate, &KeyPair) {
        (&self.issuer, &self.key)
    }
}

/// Adds the CA to the Debian trust store, the one host change clients need.
/// `name` is the file name in the store (`phigate-ca` → `phigate-ca.crt`).
pub fn install_into_trust_store(ca_pem: &str, name: &str) -> Result<PathBuf, TlsError> {
    let dir = Path::new("/usr/local/share/ca-certificates");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(TlsError::Config(format!(
            "`{name}` is not a plain file name (letters, digits, - and _)"
        )));
    }
    fs::create_dir_all(dir).map_err(|e| TlsError::io(dir, e))?;
    let path = dir.join(format!("{name}.crt"));
    write_atomic(&path, ca_pem.as_bytes(), 0o644)?;
    let out = std::process::Command::new("update-ca-certificates")
        .output()
        .map_err(|e| TlsError::File {
            path: path.clone(),
            message: format!("wrote the CA, but running update-ca-certificates failed: {e} (install the ca-certificates package)"),
        })?;
    if !out.status.success() {
        return Err(TlsError::File {
            path,
            message: format!(
                "update-ca-certificates failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(path)
}

/// Writes `bytes` to a temporary file created with `mode`, fsyncs, renames.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| TlsError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| TlsError::io(&tmp, e))?;
    f.sync_all().map_err(|e| TlsError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| TlsError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_reused_and_key_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = CertAuthority::load_or_create(&state, None).unwrap();
        let mode = fs::metadata(state.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
        let b = CertAuthority::load_or_create(&state, None).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert!(a.not_after() > OffsetDateTime::now_utc() + Duration::days(3000));
    }

    #[test]
    fn readable_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(dir.path(), None).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = CertAuthority::load_or_create(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(e.contains(CA_KEY_FILE), "{e}");
    }

    #[test]
    fn corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(dir.path(), None).unwrap();
        fs::write(dir.path().join(CA_CERT_FILE), "garbage").unwrap();
        let e = CertAuthority::load_or_create(dir.path(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(CA_CERT_FILE) && e.contains("not a PEM certificate"),
            "{e}"
        );
    }

    #[test]
    fn mismatched_supplied_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(a.path(), None).unwrap();
        CertAuthority::load_or_create(b.path(), None).unwrap();
        let e = CertAuthority::load_or_create(
            Path::new("/nonexistent"),
            Some((&a.path().join(CA_CERT_FILE), &b.path().join(CA_KEY_FILE))),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("does not belong"), "{e}");
    }
}
