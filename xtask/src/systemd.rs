//! The Debian tree that tests/tests/systemd.rs boots with `systemd-nspawn --boot`, to
//! run the packaged unit under a real systemd (PID 1 of these machines is not
//! systemd). Made once with debootstrap from the Debian mirror apt uses and kept in
//! target/systemd-root; the test boots it with a volatile overlay, so it never
//! changes and is rebuilt only when missing or when the package list below changes.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{exec, root_dir};

const SUITE: &str = "bookworm";

/// What the container needs beyond minbase: systemd as init (and dbus for
/// systemd-run), the phigate package's dependencies (ca-certificates, procps; the
/// test installs the .deb with dpkg, which fetches nothing), curl as the protected
/// client, python3 for the upstream API and the sandbox probe.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "ca-certificates",
    "procps",
    "curl",
    "python3",
];

pub fn root() -> PathBuf {
    root_dir().join("target/systemd-root")
}

/// The tree, made when missing (about 2 minutes on these machines); returns its path.
pub fn prepare() -> anyhow::Result<PathBuf> {
    let dir = root();
    // Written last: a tree without it is an interrupted debootstrap.
    let stamp = dir.join(".phigate-systemd-root");
    let want = format!("{SUITE} {}\n", PACKAGES.join(","));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        println!("[systemd-root] {}: already made", dir.display());
        return Ok(dir);
    }
    let tmp = dir.with_extension("tmp");
    for d in [&tmp, &dir] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    println!("[systemd-root] debootstrap {SUITE} into {}", dir.display());
    let mut cmd = Command::new("debootstrap");
    cmd.args([
        "--variant=minbase",
        &format!("--include={}", PACKAGES.join(",")),
    ])
    .arg(SUITE)
    .arg(&tmp);
    if let Some(mirror) = apt_mirror() {
        cmd.arg(mirror);
    }
    exec(&mut cmd)?;
    std::fs::write(tmp.join(".phigate-systemd-root"), want)?;
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// The first Debian mirror in the host's apt sources (deb822 or one-line style), so
/// the tree comes from where this machine's packages come from.
fn apt_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("URIs:")
                        .map(|u| u.split_whitespace().next().unwrap_or("").to_owned())
                        .or_else(|| {
                            // deb [options] URI suite ...
                            let mut w = l.strip_prefix("deb ")?.split_whitespace();
                            let mut uri = w.next()?;
                            if uri.starts_with('[') {
                                if !uri.ends_with(']') {
                                    w.find(|x| x.ends_with(']'))?;
                                }
                                uri = w.next()?;
                            }
                            Some(uri.to_owned())
                        })
                })
                .collect::<Vec<_>>()
        })
        .find(|u| u.starts_with("http") && u.trim_end_matches('/').ends_with("/debian"))
}
