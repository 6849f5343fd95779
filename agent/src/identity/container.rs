//! Which container a process runs in, read from its cgroup path: the container
//! runtimes (and Kubernetes) name the cgroups they make after the container and the
//! pod. The path is the kernel's (the cgroup of the connecting task, attested at
//! connect time), not anything the container can set, so the id is as trustworthy as
//! the runtime that made the cgroup.
//!
//! Recognised, innermost component first:
//!
//! | runtime | cgroup component |
//! |---|---|
//! | `docker` | `docker-<id>.scope` (systemd driver), `docker/<id>` (cgroupfs) |
//! | `containerd` | `cri-containerd-<id>.scope` |
//! | `podman` | `libpod-<id>.scope`, `libpod-<id>` (cgroupfs) |
//! | `crio` | `crio-<id>.scope` |
//! | `systemd-nspawn` | `systemd-nspawn@<name>.service`, `machine-<name>.scope` |
//! | `cri` | `<id>` directly under a `pod<uid>` cgroup (Kubernetes, cgroupfs driver) |
//!
//! Monitors the runtimes run beside the container (`libpod-conmon-…`,
//! `crio-conmon-…`) are not the container. The Kubernetes pod UID comes from
//! `kubepods-…-pod<uid>.slice` (systemd driver, `_` for `-`) or `pod<uid>` (cgroupfs).

use serde::Serialize;

/// The container a cgroup path belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Container {
    /// The runtime's id for the container (64 hex digits for OCI runtimes; the
    /// machine name for systemd-nspawn).
    pub id: String,
    /// `docker`, `containerd`, `podman`, `crio`, `systemd-nspawn`, `cri`.
    pub runtime: &'static str,
    /// The Kubernetes pod's UID, when the path is under `kubepods`.
    pub pod_uid: Option<String>,
}

/// The container of `cgroup_path` (relative to the cgroup2 root), if any.
pub fn from_cgroup_path(cgroup_path: &str) -> Option<Container> {
    let parts: Vec<&str> = cgroup_path.split('/').filter(|c| !c.is_empty()).collect();
    let pod_uid = parts.iter().rev().find_map(|c| pod_uid(c));
    let (runtime, id) = parts.iter().enumerate().rev().find_map(|(i, c)| {
        let parent = i.checked_sub(1).map(|p| parts[p]);
        container_of(c, parent)
    })?;
    Some(Container {
        id,
        runtime,
        pod_uid,
    })
}

/// (runtime, id) of one path component, given the component above it.
fn container_of(c: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    const SCOPES: [(&str, &str); 4] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("libpod-", "podman"),
        ("crio-", "crio"),
    ];
    for (prefix, runtime) in SCOPES {
        if let Some(rest) = c.strip_prefix(prefix) {
            let id = rest.strip_suffix(".scope").unwrap_or(rest);
            if is_hex_id(id) {
                return Some((runtime, id.to_owned()));
            }
        }
    }
    if let Some(name) = c
        .strip_prefix("systemd-nspawn@")
        .and_then(|r| r.strip_suffix(".service"))
        .or_else(|| {
            c.strip_prefix("machine-")
                .and_then(|r| r.strip_suffix(".scope"))
        })
    {
        return (!name.is_empty()).then(|| ("systemd-nspawn", unescape_systemd(name)));
    }
    if is_hex_id(c) {
        match parent {
            Some("docker") => return Some(("docker", c.to_owned())),
            Some(p) if pod_uid(p).is_some() => return Some(("cri", c.to_owned())),
            _ => {}
        }
    }
    None
}

/// The pod UID a `kubepods` component names.
fn pod_uid(c: &str) -> Option<String> {
    // systemd driver: kubepods-besteffort-pod<uid with _>.slice, kubepods-pod<uid>.slice
    if let Some(rest) = c.strip_prefix("kubepods") {
        let slice = rest.strip_suffix(".slice")?;
        let uid = slice.rsplit_once("-pod")?.1;
        return is_uid(&uid.replace('_', "-")).then(|| uid.replace('_', "-"));
    }
    // cgroupfs driver: pod<uid>
    let uid = c.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_owned())
}

fn is_hex_id(s: &str) -> bool {
    s.len() >= 12 && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        })
}

/// systemd unit-name escapes (`\x2d` for `-`) undone.
fn unescape_systemd(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        let hex = rest.get(i + 2..i + 4);
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if b.is_ascii() => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            _ => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c8a0f6a2b9c3d5e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";
    const UID: &str = "8d3e6f2a-1b4c-4d5e-9f60-718293a4b5c6";

    fn c(path: &str) -> Option<(String, &'static str, Option<String>)> {
        from_cgroup_path(path).map(|c| (c.id, c.runtime, c.pod_uid))
    }

    #[test]
    fn runtimes_from_real_cgroup_paths() {
        let cases: Vec<(String, &str)> = vec![
            // Docker, systemd cgroup driver (the default on systemd hosts).
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            // Docker, cgroupfs driver.
            (format!("/docker/{ID}"), "docker"),
            // containerd's CRI plugin under Kubernetes, systemd driver.
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope", UID.replace('-', "_")),
                "containerd",
            ),
            // Podman, systemd manager; rootless; and a cgroupfs manager under a parent.
            (format!("/machine.slice/libpod-{ID}.scope"), "podman"),
            (
                format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
                "podman",
            ),
            (format!("/phigate-test-x/libpod-{ID}"), "podman"),
            // CRI-O under Kubernetes.
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope", UID.replace('-', "_")),
                "crio",
            ),
        ];
        for (path, runtime) in cases {
            let (id, rt, _) = c(&path).unwrap_or_else(|| panic!("no container in {path}"));
            assert_eq!((id.as_str(), rt), (ID, runtime), "{path}");
        }
    }

    #[test]
    fn kubernetes_pod_uid_both_drivers() {
        let systemd = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(c(&systemd).unwrap().2.as_deref(), Some(UID));
        let cgroupfs = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(
            c(&cgroupfs),
            Some((ID.to_owned(), "cri", Some(UID.to_owned())))
        );
        // The pod's own cgroup (sandbox level) has a pod but no container.
        assert_eq!(c(&format!("/kubepods/burstable/pod{UID}")), None);
    }

    #[test]
    fn nspawn_machines() {
        assert_eq!(
            c("/machine.slice/systemd-nspawn@billing.service/payload/system.slice/app.service"),
            Some(("billing".into(), "systemd-nspawn", None))
        );
        assert_eq!(
            c("/machine.slice/machine-web\\x2d1.scope"),
            Some(("web-1".into(), "systemd-nspawn", None))
        );
    }

    #[test]
    fn not_containers() {
        for p in [
            "/system.slice/billing-export.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/phigate-test-abc",
            // The runtimes' monitors run beside the container, not in it.
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            &format!("/system.slice/crio-conmon-{ID}.scope"),
            // Not hex, too short.
            "/system.slice/docker-notanid.scope",
            "/docker/abc",
            "/",
            "",
        ] {
            assert_eq!(c(p), None, "{p}");
        }
    }
}
