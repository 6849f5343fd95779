//! Local console accounts: a TOML file (0600) of names, Argon2id password hashes and
//! reviewer groups. `phigate console hash-password` makes a hash.
//!
//! ```toml
//! [[account]]
//! name = "alice"
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! groups = ["privacy-officers"]
//! ```

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;

use crate::config::{ConfigError, TomlSource};

#[derive(Clone, Default)]
pub struct Accounts {
    by_name: Arc<HashMap<String, Account>>,
}

struct Account {
    hash: String,
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    account: Vec<RawAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: toml::Spanned<String>,
    password: toml::Spanned<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// Verified against when the user is unknown, so both failures take the same time.
const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$9dXnBCbhC1mn3N1D9iKUAnkEZgB0Aq5lQwzsjYCqgWI";

impl Accounts {
    pub fn load(path: &Path) -> Result<Accounts, ConfigError> {
        let e = |line: Option<usize>, key: Option<String>, message: String| ConfigError {
            file: path.to_owned(),
            line,
            key,
            message,
        };
        let meta =
            std::fs::metadata(path).map_err(|x| e(None, None, format!("cannot read: {x}")))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(e(
                None,
                None,
                "password hashes must not be readable by group or others: chmod 600".into(),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|x| e(None, None, format!("cannot read: {x}")))?;
        let src = TomlSource::new(path, &text);
        let raw: RawFile = src.parse()?;
        let mut by_name = HashMap::new();
        for (i, a) in raw.account.into_iter().enumerate() {
            let name = a.name.get_ref().clone();
            if name.trim().is_empty() || by_name.contains_key(&name) {
                return Err(src.err(
                    Some(a.name.span()),
                    Some(format!("account[{i}].name")),
                    "empty or defined twice".into(),
                ));
            }
            if PasswordHash::new(a.password.get_ref()).is_err() {
                return Err(src.err(
                    Some(a.password.span()),
                    Some(format!("account[{i}].password")),
                    "not a password hash (make one with `phigate console hash-password`)".into(),
                ));
            }
            by_name.insert(
                name,
                Account {
                    hash: a.password.into_inner(),
                    groups: a.groups,
                },
            );
        }
        Ok(Accounts {
            by_name: Arc::new(by_name),
        })
    }

    /// The account's groups when the password is right. Slow on purpose (Argon2id).
    pub fn verify(&self, name: &str, password: &str) -> Option<Vec<String>> {
        let (hash, groups) = match self.by_name.get(name) {
            Some(a) => (a.hash.as_str(), Some(&a.groups)),
            None => (DUMMY, None),
        };
        let parsed = PasswordHash::new(hash).ok()?;
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        match (ok, groups) {
            (true, Some(g)) => Some(g.clone()),
            _ => None,
        }
    }
}

/// An Argon2id hash of `password` with a random salt.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_verify_passwords_and_refuse_loose_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.toml");
        let hash = hash_password("correct horse").unwrap();
        std::fs::write(
            &path,
            format!(
                "[[account]]\nname = \"alice\"\npassword = \"{hash}\"\ngroups = [\"privacy\"]\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Accounts::load(&path).err().expect("refused");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = Accounts::load(&path).unwrap();
        assert_eq!(
            a.verify("alice", "correct horse"),
            Some(vec!["privacy".into()])
        );
        assert_eq!(a.verify("alice", "wrong"), None);
        assert_eq!(a.verify("bob", "correct horse"), None);

        std::fs::write(&path, "[[account]]\nname = \"x\"\npassword = \"plain\"\n").unwrap();
        let e = Accounts::load(&path).err().expect("refused");
        assert_eq!(e.line, Some(3), "{e}");
    }
}
