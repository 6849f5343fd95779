//! The host's pseudonym key (`state_dir/pseudonym.key`, 32 random bytes, 0600,
//! created once): what turns patient ids into the pseudonyms records hold (see
//! [`phigate_mask::pseudonym`]).

use std::path::Path;

pub use phigate_mask::pseudonym::Pseudonymizer;

pub const KEY_FILE: &str = "pseudonym.key";

/// The pseudonymizer keyed by `state_dir`'s key, created (0600) on first use.
pub fn load_or_create(state_dir: &Path, segments: Vec<String>) -> anyhow::Result<Pseudonymizer> {
    let path = state_dir.join(KEY_FILE);
    let bytes = super::keyfile::load_or_create(&path, super::keyfile::random32)?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: not a 32-byte key", path.display()))?;
    Ok(Pseudonymizer::new(key, segments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_created_once_0600_and_keys_per_host() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path(), vec![]).unwrap();
        let b = load_or_create(d.path(), vec![]).unwrap();
        assert_eq!(a.pseudonym("123"), b.pseudonym("123"));
        let mode = fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        let c = load_or_create(other.path(), vec![]).unwrap();
        assert_ne!(c.pseudonym("123"), a.pseudonym("123"), "keyed per host");
    }

    #[test]
    fn a_readable_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        load_or_create(d.path(), vec![]).unwrap();
        fs::set_permissions(d.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(d.path(), vec![]).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
