//! Host facts the agent, its end-to-end tests and its project tasks all read, from
//! one parser so they agree: where the cgroup2 hierarchy is mounted (the programs
//! attach to a cgroup under it), and what /proc/self/mountinfo lists.

extern crate std;

use std::ffi::OsString;
use std::format;
use std::io;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

/// Every mount of this mount namespace: (mount point, filesystem type).
pub fn mounts() -> io::Result<Vec<(PathBuf, String)>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<(PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fs_type = right.split(' ').next()?;
            Some((PathBuf::from(unescape(mount_point)), fs_type.to_string()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// The mount point of the cgroup2 hierarchy (e.g. /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on hybrid systems).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    cgroup2_root_of(&mounts()?).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo): mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        )
    })
}

fn cgroup2_root_of(all: &[(PathBuf, String)]) -> Option<PathBuf> {
    let cgroup2: Vec<&PathBuf> = all
        .iter()
        .filter(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
        .collect();
    // Prefer the conventional locations when several are mounted.
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(p) = cgroup2.iter().find(|p| p.as_path() == Path::new(preferred)) {
            return Some((*p).clone());
        }
    }
    cgroup2.first().map(|p| (*p).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conventional_cgroup2_mount_wins_and_escapes_are_undone() {
        let text = "\
30 1 0:26 / /run/other\\040cg rw - cgroup2 cgroup2 rw
31 1 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
32 1 0:28 / /sys/fs/bpf rw - bpf bpf rw
";
        let all = parse_mountinfo(text);
        assert_eq!(all[0].0, PathBuf::from("/run/other cg"));
        assert_eq!(cgroup2_root_of(&all), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            cgroup2_root_of(&all[..1]),
            Some(PathBuf::from("/run/other cg"))
        );
        assert_eq!(cgroup2_root_of(&all[2..]), None);
    }
}
