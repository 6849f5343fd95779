//! Secret key files in state_dir: created once (0600, atomically), refused when
//! group or others can read them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The key at `path`, created from `generate` on first use. A concurrent creator
/// cannot make two keys: whichever lands first wins.
pub fn load_or_create(
    path: &Path,
    generate: impl FnOnce() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    if !path.exists() {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let key = generate()?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!("{name}.tmp.{}", std::process::id()));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        if fs::hard_link(&tmp, path).is_err() && !path.exists() {
            let _ = fs::remove_file(&tmp);
            anyhow::bail!("cannot create {}", path.display());
        }
        let _ = fs::remove_file(&tmp);
    }
    let meta = fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "{}: the key is readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok(fs::read(path)?)
}

/// 32 random bytes from the kernel.
pub fn random32() -> anyhow::Result<Vec<u8>> {
    let mut key = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(key)
}
