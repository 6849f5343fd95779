//! What the container runtime knows about a container beyond its id: the Kubernetes
//! pod's namespace and name, and the image it runs. Read from the state the runtime
//! keeps on the host, once per container (these facts are fixed at creation):
//!
//! | source | pod namespace / name | image |
//! |---|---|---|
//! | the OCI `config.json` the container was started from (CRI-O, containerd's CRI plugin, Podman) | `io.kubernetes.pod.namespace` / `.name` (CRI-O, Podman), `io.kubernetes.cri.sandbox-namespace` / `-name` (containerd) | `io.kubernetes.cri-o.ImageName`, `io.kubernetes.cri.image-name` |
//! | containers/storage's `containers.json` (Podman, CRI-O) | | `metadata.image-name` |
//! | Docker's `containers/<id>/config.v2.json` | `Config.Labels` `io.kubernetes.pod.*` | `Config.Image` |
//!
//! The `config.json` is found where each runtime puts it, or through the low-level
//! runtime's state (runc's `state.json` names the bundle, crun's `status` too).
//!
//! Only root-owned files that no one else can write are read: the workload in the
//! container cannot write them, so it cannot name its own pod or image. A rootless
//! runtime's state lives in its user's home, which that user can edit: rootless
//! containers get no pod or image facts (their id and runtime still come from the
//! kernel's cgroup path).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lru::LruCache;
use serde_json::Value;

use super::container::Container;

/// What the runtime's state says of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeFacts {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub image: Option<String>,
}

/// State files larger than this are not read (a `containers.json` holds every
/// container of the store: generous, but bounded).
const MAX_STATE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads runtime facts, once per container id.
pub struct RuntimeState {
    /// `/` on a host; a directory laid out like one in tests.
    root: PathBuf,
    facts: Mutex<LruCache<String, RuntimeFacts>>,
}

const POD_NAMESPACE: [&str; 2] = [
    "io.kubernetes.pod.namespace",
    "io.kubernetes.cri.sandbox-namespace",
];
const POD_NAME: [&str; 2] = ["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"];
const IMAGE: [&str; 2] = [
    "io.kubernetes.cri-o.ImageName",
    "io.kubernetes.cri.image-name",
];

/// containers/storage stores: the system one, and CRI-O's and Podman's run-time one.
const STORAGE: [&str; 2] = ["var/lib/containers/storage", "run/containers/storage"];

impl RuntimeState {
    pub fn new(root: PathBuf) -> RuntimeState {
        let cap = std::num::NonZeroUsize::new(1024).expect("non-zero");
        RuntimeState {
            root,
            facts: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The facts of `c`, from the cache or the runtime's state (blocking).
    pub fn facts(&self, c: &Container) -> RuntimeFacts {
        let key = format!("{}/{}", c.runtime, c.id);
        if let Some(f) = lock(&self.facts).get(&key) {
            return f.clone();
        }
        let f = self.read(c);
        lock(&self.facts).put(key, f.clone());
        f
    }

    fn read(&self, c: &Container) -> RuntimeFacts {
        let mut f = RuntimeFacts::default();
        if !is_safe_id(&c.id) {
            return f;
        }
        if let Some(spec) = self.oci_config(&c.id) {
            fill(&mut f, spec.get("annotations"));
        }
        if c.runtime == "docker" {
            let v = self.json(&format!(
                "var/lib/docker/containers/{}/config.v2.json",
                c.id
            ));
            if let Some(config) = v.as_ref().and_then(|v| v.get("Config")) {
                fill(&mut f, config.get("Labels"));
                if f.image.is_none() {
                    f.image = text(config.get("Image"));
                }
            }
        }
        if f.image.is_none() {
            f.image = self.storage_image_name(&c.id);
        }
        f
    }

    /// The OCI runtime spec the container was created from.
    fn oci_config(&self, id: &str) -> Option<Value> {
        let mut candidates: Vec<PathBuf> = STORAGE
            .iter()
            .map(|s| PathBuf::from(format!("{s}/overlay-containers/{id}/userdata/config.json")))
            .collect();
        // containerd's v2 shims: one directory per containerd namespace (k8s.io, moby, …).
        let tasks = self
            .root
            .join("run/containerd/io.containerd.runtime.v2.task");
        if let Ok(dir) = std::fs::read_dir(&tasks) {
            for ns in dir.flatten() {
                candidates.push(ns.path().join(id).join("config.json"));
            }
        }
        for p in &candidates {
            if let Some(v) = self.json_at(&self.root.join(p)) {
                return Some(v);
            }
        }
        // Anywhere else: the low-level runtime's own state names the bundle.
        let bundle = self.runc_bundle(id).or_else(|| self.crun_bundle(id))?;
        let bundle = bundle.strip_prefix("/").unwrap_or(&bundle);
        self.json_at(&self.root.join(bundle).join("config.json"))
    }

    /// The bundle runc was given, from its `state.json` (`config.labels`: `bundle=…`)
    /// under the roots Podman, Docker and containerd run it with.
    fn runc_bundle(&self, id: &str) -> Option<PathBuf> {
        let mut states = vec![
            self.root.join(format!("run/runc/{id}/state.json")),
            self.root
                .join(format!("run/docker/runtime-runc/moby/{id}/state.json")),
        ];
        if let Ok(dir) = std::fs::read_dir(self.root.join("run/containerd/runc")) {
            for ns in dir.flatten() {
                states.push(ns.path().join(id).join("state.json"));
            }
        }
        states.iter().find_map(|s| {
            let v = self.json_at(s)?;
            v.pointer("/config/labels")?
                .as_array()?
                .iter()
                .find_map(|l| l.as_str()?.strip_prefix("bundle="))
                .map(PathBuf::from)
        })
    }

    fn crun_bundle(&self, id: &str) -> Option<PathBuf> {
        let v = self.json_at(&self.root.join(format!("run/crun/{id}/status")))?;
        v.get("bundle")?.as_str().map(PathBuf::from)
    }

    /// The image name Podman and CRI-O record with the container in containers/storage.
    fn storage_image_name(&self, id: &str) -> Option<String> {
        STORAGE.iter().find_map(|s| {
            let all = self.json(&format!("{s}/overlay-containers/containers.json"))?;
            let c = all
                .as_array()?
                .iter()
                .find(|c| c.get("id").and_then(Value::as_str) == Some(id))?;
            // `metadata` is itself JSON, in a string.
            let meta: Value = serde_json::from_str(c.get("metadata")?.as_str()?).ok()?;
            text(meta.get("image-name"))
        })
    }

    fn json(&self, rel: &str) -> Option<Value> {
        self.json_at(&self.root.join(rel))
    }

    /// A JSON state file, if it is root's and only root can write it.
    fn json_at(&self, path: &Path) -> Option<Value> {
        let mut f = File::open(path).ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() || m.uid() != 0 || m.mode() & 0o022 != 0 || m.size() > MAX_STATE_BYTES {
            return None;
        }
        let mut text = Vec::with_capacity(m.size() as usize);
        f.read_to_end(&mut text).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// Pod and image from an annotation or label map; the first key that has a value wins.
fn fill(f: &mut RuntimeFacts, map: Option<&Value>) {
    let Some(map) = map.and_then(Value::as_object) else {
        return;
    };
    let first = |keys: &[&str]| keys.iter().find_map(|k| text(map.get(*k)));
    f.pod_namespace = f.pod_namespace.take().or_else(|| first(&POD_NAMESPACE));
    f.pod_name = f.pod_name.take().or_else(|| first(&POD_NAME));
    f.image = f.image.take().or_else(|| first(&IMAGE));
}

/// A non-empty string of printable ASCII, bounded: what goes to records and
/// policies, never a control character or a megabyte.
fn text(v: Option<&Value>) -> Option<String> {
    let s = v?.as_str()?;
    (!s.is_empty() && s.len() <= 512 && s.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| s.to_owned())
}

/// Ids become path components: no separators, no `..`.
fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ID: &str = "4f1c8a0f6a2b9c3d5e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    fn put(root: &Path, rel: &str, body: &str) -> PathBuf {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn container(runtime: &'static str) -> Container {
        Container {
            id: ID.into(),
            runtime,
            pod_uid: None,
        }
    }

    fn facts(ns: &str, name: &str, image: &str) -> RuntimeFacts {
        RuntimeFacts {
            pod_namespace: Some(ns.into()),
            pod_name: Some(name.into()),
            image: Some(image.into()),
        }
    }

    #[test]
    fn containerd_cri_annotations() {
        let root = tempfile::tempdir().unwrap();
        put(
            root.path(),
            &format!("run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-type":"container",
                "io.kubernetes.cri.sandbox-namespace":"billing",
                "io.kubernetes.cri.sandbox-name":"export-7d9f",
                "io.kubernetes.cri.image-name":"registry.local/export:1.4"}}"#,
        );
        let s = RuntimeState::new(root.path().into());
        assert_eq!(
            s.facts(&container("containerd")),
            facts("billing", "export-7d9f", "registry.local/export:1.4")
        );
    }

    #[test]
    fn crio_annotations_and_podman_storage_image() {
        let root = tempfile::tempdir().unwrap();
        put(
            root.path(),
            &format!("run/containers/storage/overlay-containers/{ID}/userdata/config.json"),
            r#"{"annotations":{"io.kubernetes.pod.namespace":"claims",
                "io.kubernetes.pod.name":"loader-0"}}"#,
        );
        put(
            root.path(),
            "run/containers/storage/overlay-containers/containers.json",
            &format!(
                r#"[{{"id":"other","metadata":"{{\"image-name\":\"x\"}}"}},
                   {{"id":"{ID}","metadata":"{{\"image-name\":\"localhost/loader:2\",\"name\":\"l\"}}"}}]"#
            ),
        );
        let s = RuntimeState::new(root.path().into());
        assert_eq!(
            s.facts(&container("crio")),
            facts("claims", "loader-0", "localhost/loader:2")
        );
    }

    #[test]
    fn a_runc_bundle_anywhere_and_docker_labels() {
        let root = tempfile::tempdir().unwrap();
        put(
            root.path(),
            &format!("run/runc/{ID}/state.json"),
            r#"{"config":{"labels":["x=y","bundle=/srv/bundles/one"]}}"#,
        );
        put(
            root.path(),
            "srv/bundles/one/config.json",
            r#"{"annotations":{"io.kubernetes.pod.namespace":"lab"}}"#,
        );
        put(
            root.path(),
            &format!("var/lib/docker/containers/{ID}/config.v2.json"),
            r#"{"Config":{"Image":"fhir-client:3","Labels":{"io.kubernetes.pod.name":"p"}}}"#,
        );
        let s = RuntimeState::new(root.path().into());
        assert_eq!(
            s.facts(&container("docker")),
            facts("lab", "p", "fhir-client:3")
        );
    }

    #[test]
    fn files_others_can_write_and_odd_values_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        let p = put(
            root.path(),
            &format!("var/lib/containers/storage/overlay-containers/{ID}/userdata/config.json"),
            r#"{"annotations":{"io.kubernetes.pod.namespace":"forged"}}"#,
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        put(
            root.path(),
            &format!("run/containers/storage/overlay-containers/{ID}/userdata/config.json"),
            "{\"annotations\":{\"io.kubernetes.pod.name\":\"a\\nb\",\"io.kubernetes.pod.namespace\":\"\"}}",
        );
        // A rootless runtime's state: its user's, so its user could forge it.
        let p = put(
            root.path(),
            "run/containers/storage/overlay-containers/containers.json",
            &format!(r#"[{{"id":"{ID}","metadata":"{{\"image-name\":\"forged:1\"}}"}}]"#),
        );
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        let s = RuntimeState::new(root.path().into());
        assert_eq!(s.facts(&container("podman")), RuntimeFacts::default());
        let odd = Container {
            id: "../../etc".into(),
            ..container("podman")
        };
        assert_eq!(s.facts(&odd), RuntimeFacts::default());
    }
}
