//! Records shipped off the host to a real S3-compatible object store (s3rver, from
//! npm, which keeps objects as files in its directory), through phigate's real
//! client: every sealed file arrives with its signed manifest and the signed heads;
//! while the store is down files wait and requests are refused past
//! `max_unshipped_secs`; when it is back they ship and nothing is missing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";
const S3: &str = "127.0.0.1:9568";
const BUCKET: &str = "phigate-records";

/// s3rver in the world's netns, storing under `dir` (kept across restarts).
fn s3rver(w: &World, dir: &Path) -> Background {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/node_modules/.bin/s3rver");
    let (host, port) = S3.split_once(':').unwrap();
    let bg = Background::spawn(
        w.outside(),
        &[
            bin.to_str().unwrap(),
            "-d",
            dir.to_str().unwrap(),
            "-a",
            host,
            "-p",
            port,
            "--configure-bucket",
            BUCKET,
        ],
        w.path(&unique("s3rver.log")),
    );
    assert!(
        w.netns
            .wait_port(S3.parse().unwrap(), Duration::from_secs(20)),
        "s3rver did not start: {}",
        bg.log_text()
    );
    bg
}

/// What s3rver holds for a key: it keeps each object's bytes in
/// `<dir>/<bucket>/<key>._S3rver_object`.
fn remote(dir: &Path, key: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(BUCKET).join(format!("{key}._S3rver_object"))).ok()
}

fn curl_status(w: &World, ca: &Path, path: &str) -> String {
    let out = output(
        w.inside(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://{UP}{path}"),
        ],
    );
    stdout(&out)
}

/// Every sealed file and manifest under records_dir, relative.
fn sealed(records: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for t in ["connections", "requests", "approvals", "events"] {
        let mut stack = vec![records.join(t)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(records)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    if rel.ends_with(".parquet") || rel.ends_with(".manifest.json") {
                        out.push(rel);
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// The records files (and the signed heads) not yet in the store, or different there.
fn missing(records: &Path, store: &Path, root: &str) -> Vec<String> {
    let mut files = sealed(records);
    files.push("_heads.json".into());
    files
        .into_iter()
        .filter(|rel| {
            remote(store, &format!("{root}/{rel}")) != std::fs::read(records.join(rel)).ok()
        })
        .collect()
}

fn secret(w: &World, name: &str, text: &str) -> PathBuf {
    let p = w.path(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn sealed_records_ship_in_order_wait_while_the_store_is_down_and_fail_closed_past_the_limit() {
    let mut w = World::new("ship");
    let store_dir = w.path("s3");
    std::fs::create_dir_all(&store_dir).unwrap();
    let mut s3 = Some(s3rver(&w, &store_dir));
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    // s3rver's fixed credentials, kept as an operator would: 0600 files.
    let id = secret(&w, "s3-id", "S3RVER\n");
    let key = secret(&w, "s3-secret", "S3RVER\n");
    let shipping = format!(
        "[records.shipping]\nendpoint = \"http://{S3}\"\nbucket = \"{BUCKET}\"\nprefix = \"fleet\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\nmax_unshipped_secs = 3\n",
        id.display(),
        key.display()
    );
    w.write_config(&format!(
        "{}\n{shipping}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_and_records("", ""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    let host = w.status()["records"]["shipping"].clone();
    assert!(host.is_object(), "status has shipping: {}", w.status());
    let records = w.records_dir();
    let heads: Value =
        serde_json::from_slice(&std::fs::read(records.join("_heads.json")).unwrap()).unwrap();
    let root = format!("fleet/{}", heads["host"].as_str().unwrap());

    for i in 0..3 {
        assert_eq!(curl_status(&w, &ca, &format!("/fhir/Patient/{i}")), "404");
    }
    w.wait_records("requests", 3);
    wait_until("every sealed file shipped", Duration::from_secs(20), || {
        missing(&records, &store_dir, &root).is_empty()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:?}\n{}",
            missing(&records, &store_dir, &root),
            w.agent_log()
        )
    });
    let requests: Vec<_> = sealed(&records)
        .into_iter()
        .filter(|f| f.starts_with("requests/date="))
        .collect();
    assert!(requests.len() >= 2, "a file and its manifest: {requests:?}");
    assert!(remote(&store_dir, &format!("{root}/requests/_head.json")).is_some());

    // The store goes away: exchanges still pass (records are durable locally) and
    // their files wait; past max_unshipped_secs new requests are refused.
    drop(s3.take());
    let shipped_before = sealed(&records).len();
    for i in 3..5 {
        assert_eq!(curl_status(&w, &ca, &format!("/fhir/Patient/{i}")), "404");
    }
    w.wait_records("requests", 5);
    wait_until("shipping to fail closed", Duration::from_secs(30), || {
        w.status()["records"]["shipping"]["failing_closed"] == true
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = w.status();
    let sh = &st["records"]["shipping"];
    assert!(sh["unshipped_files"].as_u64().unwrap() >= 1, "{st}");
    assert!(sh["failures"].as_u64().unwrap() >= 1, "{st}");
    assert!(sh["last_error"].is_string(), "{st}");
    assert_eq!(st["records_writable"], false, "{st}");
    assert_eq!(curl_status(&w, &ca, "/fhir/Patient/9"), "503");
    assert!(sealed(&records).len() > shipped_before);
    assert!(!missing(&records, &store_dir, &root).is_empty());

    // Back: everything waiting ships, and requests pass again.
    let _s3 = s3rver(&w, &store_dir);
    wait_until("the backlog shipped", Duration::from_secs(30), || {
        w.status()["records"]["shipping"]["failing_closed"] == false
            && missing(&records, &store_dir, &root).is_empty()
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:?} {}",
            missing(&records, &store_dir, &root),
            w.status()
        )
    });
    assert_eq!(curl_status(&w, &ca, "/fhir/Patient/10"), "404");
    assert!(w.sigterm(Duration::from_secs(30)).success());
    // The copy in the store verifies on its own, with only the public key: nothing
    // lost, nothing out of order.
    let mirror = w.path("mirror");
    for rel in sealed(&records).into_iter().chain(
        ["connections", "requests", "approvals", "events"]
            .iter()
            .map(|t| format!("{t}/_head.json"))
            .filter(|rel| records.join(rel).exists()),
    ) {
        let p = mirror.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let bytes = remote(&store_dir, &format!("{root}/{rel}"))
            .unwrap_or_else(|| panic!("{rel} not shipped by the last pass at stop"));
        std::fs::write(&p, bytes).unwrap();
    }
    // Object storage has no empty directories: a table without files is a directory
    // the mirror makes itself.
    for t in ["connections", "requests", "approvals", "events"] {
        std::fs::create_dir_all(mirror.join(t)).unwrap();
    }
    std::fs::write(
        mirror.join("_heads.json"),
        remote(&store_dir, &format!("{root}/_heads.json")).unwrap(),
    )
    .unwrap();
    let out = Command::new(phigate_bin())
        .args(["audit", "verify"])
        .arg(&mirror)
        .arg("--pubkey")
        .arg(w.path("state/records-signing.pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let events = w.all_records("events");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "shipping" && e["outcome"] == "failed"),
        "a shipping failure event"
    );
}

/// `phigate audit verify` against the off-host anchor, run where the store is (the
/// world's netns), credentials from the environment.
fn verify_remote(w: &World, dir: &Path, pubkey: &Path, extra: &[&str]) -> (bool, String) {
    let endpoint = format!("http://{S3}");
    let remote = format!("s3://{BUCKET}/fleet");
    let bin = phigate_bin();
    let mut argv = vec![
        "env",
        "AWS_ACCESS_KEY_ID=S3RVER",
        "AWS_SECRET_ACCESS_KEY=S3RVER",
        bin.to_str().unwrap(),
        "audit",
        "verify",
        dir.to_str().unwrap(),
        "--pubkey",
        pubkey.to_str().unwrap(),
        "--config",
        "/nonexistent/phigate.toml",
    ];
    if !extra.contains(&"--local-only") {
        argv.extend(["--remote", &remote, "--endpoint", &endpoint]);
    }
    argv.extend(extra);
    let out = output(w.outside(), &argv);
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// The requests table's manifests in `records`: (file_seq, data file relative).
fn request_files(records: &Path) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = sealed(records)
        .into_iter()
        .filter(|f| f.starts_with("requests/") && f.ends_with(".manifest.json"))
        .map(|f| {
            let m: Value =
                serde_json::from_slice(&std::fs::read(records.join(&f)).unwrap()).unwrap();
            (
                m["file_seq"].as_u64().unwrap(),
                m["file"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A scratch copy of the records to tamper with, as root on the host could.
fn tamper_copy(w: &World, records: &Path, name: &str) -> PathBuf {
    let to = w.path(name);
    let st = Command::new("cp")
        .arg("-a")
        .arg(records)
        .arg(&to)
        .status()
        .unwrap();
    assert!(st.success());
    to
}

fn remove_file_and_manifest(dir: &Path, rel: &str) {
    std::fs::remove_file(dir.join(rel)).unwrap();
    std::fs::remove_file(dir.join(format!("{rel}.manifest.json"))).unwrap();
}

#[test]
fn audit_verify_names_each_undoing_of_records_against_the_shipped_anchor() {
    let mut w = World::new("anchor");
    let store_dir = w.path("s3");
    std::fs::create_dir_all(&store_dir).unwrap();
    let _s3 = s3rver(&w, &store_dir);
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    let id = secret(&w, "s3-id", "S3RVER\n");
    let key = secret(&w, "s3-secret", "S3RVER\n");
    w.write_config(&format!(
        "{}\n[records.shipping]\nendpoint = \"http://{S3}\"\nbucket = \"{BUCKET}\"\nprefix = \"fleet\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_and_records("", ""),
        id.display(),
        key.display(),
        pki.ca.display()
    ));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    let records = w.records_dir();
    let heads: Value =
        serde_json::from_slice(&std::fs::read(records.join("_heads.json")).unwrap()).unwrap();
    let root = format!("fleet/{}", heads["host"].as_str().unwrap());

    // One request per file: each is sealed before the next is sent.
    let request = |i: usize| {
        assert_eq!(curl_status(&w, &ca, &format!("/fhir/Patient/{i}")), "404");
        w.wait_records("requests", i + 1);
    };
    for i in 0..2 {
        request(i);
    }
    // An older state of the head and the list of heads: what a rollback restores.
    let old = w.path("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::copy(records.join("requests/_head.json"), old.join("_head.json")).unwrap();
    std::fs::copy(records.join("_heads.json"), old.join("_heads.json")).unwrap();
    let old_head: Value =
        serde_json::from_slice(&std::fs::read(old.join("_head.json")).unwrap()).unwrap();
    let old_next = old_head["next_file_seq"].as_u64().unwrap();
    for i in 2..4 {
        request(i);
    }
    assert!(w.sigterm(Duration::from_secs(30)).success());
    assert!(
        missing(&records, &store_dir, &root).is_empty(),
        "the last pass ships everything: {:?}",
        missing(&records, &store_dir, &root)
    );
    let files = request_files(&records);
    assert!(
        files.len() as u64 > old_next,
        "newer files than the old head: {files:?} {old_next}"
    );
    let pubkey = w.path("state/records-signing.pub");

    // Untampered: the config's [records.shipping] is the anchor by default.
    let out = output(
        w.outside(),
        &[
            phigate_bin().to_str().unwrap(),
            "audit",
            "verify",
            "--config",
            w.config_path().to_str().unwrap(),
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("remote anchor: heads shipped"), "{text}");
    let (ok, text) = verify_remote(&w, &records, &pubkey, &[]);
    assert!(ok, "{text}");

    // A table directory deleted.
    let d = tamper_copy(&w, &records, "deleted-table");
    std::fs::remove_dir_all(d.join("requests")).unwrap();
    let (ok, text) = verify_remote(&w, &d, &pubkey, &[]);
    assert!(
        !ok && text.contains("table deleted: the directory requests/ is gone"),
        "{text}"
    );

    // The newest file deleted (truncation), the head left as it was.
    let d = tamper_copy(&w, &records, "truncated");
    remove_file_and_manifest(&d, &files.last().unwrap().1);
    let (ok, text) = verify_remote(&w, &d, &pubkey, &[]);
    assert!(!ok && text.contains("truncated: files"), "{text}");

    // Rolled back: the newer files deleted and the older signed head and list of
    // heads restored. That verifies on the host alone; the anchor names it.
    let d = tamper_copy(&w, &records, "rolled-back");
    for (seq, rel) in &files {
        if *seq >= old_next {
            remove_file_and_manifest(&d, rel);
        }
    }
    std::fs::copy(old.join("_head.json"), d.join("requests/_head.json")).unwrap();
    std::fs::copy(old.join("_heads.json"), d.join("_heads.json")).unwrap();
    let (ok, text) = verify_remote(&w, &d, &pubkey, &["--local-only"]);
    assert!(ok, "a rollback verifies on the host alone: {text}");
    let (ok, text) = verify_remote(&w, &d, &pubkey, &[]);
    assert!(
        !ok && text.contains("rolled back: the head here names"),
        "{text}"
    );

    // A file replaced by other bytes.
    let d = tamper_copy(&w, &records, "replaced");
    let (first, newest) = (&files[0].1, &files.last().unwrap().1);
    std::fs::copy(d.join(first), d.join(newest)).unwrap();
    let (ok, text) = verify_remote(&w, &d, &pubkey, &[]);
    assert!(
        !ok && text.contains(&format!(
            "requests: {newest}: replaced: differs from the copy shipped"
        )),
        "{text}"
    );

    // A host the store has never heard of.
    let (ok, text) = verify_remote(&w, &records, &pubkey, &["--host", "no-such-host"]);
    assert!(!ok && text.contains("missing host"), "{text}");

    // The store unreachable: an error, never a pass.
    let out = output(
        w.outside(),
        &[
            "env",
            "AWS_ACCESS_KEY_ID=S3RVER",
            "AWS_SECRET_ACCESS_KEY=S3RVER",
            phigate_bin().to_str().unwrap(),
            "audit",
            "verify",
            records.to_str().unwrap(),
            "--pubkey",
            pubkey.to_str().unwrap(),
            "--remote",
            &format!("s3://{BUCKET}/fleet"),
            "--endpoint",
            "http://127.0.0.1:1",
        ],
    );
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        !out.status.success() && text.contains("off-host anchor could not be read"),
        "{text}"
    );
}

/// One host of a fleet: its own netns, host name and agent, shipping to the one
/// store (an s3rver in each netns, over one shared directory). Returns the world
/// (its s3rver still up), after one served request and a clean stop.
fn fleet_host(tag: &str, host: &str, store_dir: &Path, keys: &Path) -> (World, Background) {
    let mut w = World::new(tag);
    let s3 = s3rver(&w, store_dir);
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    let id = secret(&w, "s3-id", "S3RVER\n");
    let key = secret(&w, "s3-secret", "S3RVER\n");
    w.write_config(&format!(
        "{}\n[records.shipping]\nendpoint = \"http://{S3}\"\nbucket = \"{BUCKET}\"\nprefix = \"fleet\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_and_records("", ""),
        id.display(),
        key.display(),
        pki.ca.display()
    ));
    w.agent_hostname = Some(host.into());
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    assert_eq!(curl_status(&w, &ca, "/fhir/Patient/1"), "404");
    w.wait_records("requests", 1);
    assert!(w.sigterm(Duration::from_secs(30)).success());
    let heads: Value =
        serde_json::from_slice(&std::fs::read(w.records_dir().join("_heads.json")).unwrap())
            .unwrap();
    assert_eq!(heads["host"], host, "the agent's own host name");
    std::fs::copy(
        w.path("state/records-signing.pub"),
        keys.join(format!("{host}.pub")),
    )
    .unwrap();
    (w, s3)
}

fn fleet_verify(w: &World, keys: &Path) -> (bool, String) {
    let out = output(
        w.outside(),
        &[
            "env",
            "AWS_ACCESS_KEY_ID=S3RVER",
            "AWS_SECRET_ACCESS_KEY=S3RVER",
            phigate_bin().to_str().unwrap(),
            "audit",
            "verify",
            &format!("s3://{BUCKET}/fleet"),
            "--endpoint",
            &format!("http://{S3}"),
            "--keys",
            keys.to_str().unwrap(),
        ],
    );
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn a_two_host_fleet_is_verified_from_the_store_with_each_hosts_key() {
    let shared = tempfile::tempdir().unwrap();
    let store_dir = shared.path().join("s3");
    let keys = shared.path().join("keys");
    std::fs::create_dir_all(&store_dir).unwrap();
    std::fs::create_dir_all(&keys).unwrap();
    let (a, _s3a) = fleet_host("fleet-a", "ward-a", &store_dir, &keys);
    let (_b, _s3b) = fleet_host("fleet-b", "ward-b", &store_dir, &keys);

    let (ok, text) = fleet_verify(&a, &keys);
    assert!(ok, "{text}");
    assert!(
        text.contains("ward-a: ") && text.contains("ward-b: "),
        "{text}"
    );
    assert!(text.contains("OK: 2 host(s)"), "{text}");

    // A key for a host the store does not hold: the host is missing.
    std::fs::copy(keys.join("ward-a.pub"), keys.join("ward-c.pub")).unwrap();
    let (ok, text) = fleet_verify(&a, &keys);
    assert!(!ok && text.contains("FAIL ward-c: missing host"), "{text}");
    std::fs::remove_file(keys.join("ward-c.pub")).unwrap();

    // Another host's key for ward-b: its records do not verify.
    std::fs::copy(keys.join("ward-a.pub"), keys.join("ward-b.pub")).unwrap();
    let (ok, text) = fleet_verify(&a, &keys);
    assert!(!ok && text.contains("FAIL ward-b: "), "{text}");
    assert!(!text.contains("FAIL ward-a"), "{text}");
}

const MOTO: &str = "127.0.0.1:9569";
const METRICS: &str = "127.0.0.1:9465";

/// moto (PyPI) in server mode in the world's netns: an S3 that implements Object
/// Lock (versioned buckets, per-object retention, deletes refused while locked).
fn moto(w: &World) -> Background {
    let (host, port) = MOTO.split_once(':').unwrap();
    let bg = Background::spawn(
        w.outside(),
        &["python3", "-m", "moto.server", "-H", host, "-p", port],
        w.path(&unique("moto.log")),
    );
    assert!(
        w.netns
            .wait_port(MOTO.parse().unwrap(), Duration::from_secs(30)),
        "moto did not start: {}",
        bg.log_text()
    );
    bg
}

/// Runs boto3 against moto in the world's netns: `s3` is the client, `args` in
/// `sys.argv[1:]`; the script prints JSON, returned parsed.
fn boto(w: &World, script: &str, args: &[&str]) -> Value {
    let full = format!(
        "import boto3, datetime, json, sys\ns3 = boto3.client('s3', endpoint_url='http://{MOTO}', region_name='us-east-1', aws_access_key_id='moto', aws_secret_access_key='moto')\n{script}"
    );
    let mut argv = vec!["python3", "-c", &full];
    argv.extend(args);
    let out = output(w.outside(), &argv);
    assert!(out.status.success(), "boto3: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// Every version of every object under a prefix, with its lock and encryption,
/// and whether deleting the version (what would really remove it) is refused.
const INSPECT: &str = r#"
bucket, prefix = sys.argv[1], sys.argv[2]
out = []
for page in s3.get_paginator('list_object_versions').paginate(Bucket=bucket, Prefix=prefix):
    for v in page.get('Versions', []):
        h = s3.head_object(Bucket=bucket, Key=v['Key'], VersionId=v['VersionId'])
        until = h.get('ObjectLockRetainUntilDate')
        out.append({'key': v['Key'], 'version': v['VersionId'], 'mode': h.get('ObjectLockMode'),
                    'until': until.timestamp() if until else None, 'sse': h.get('ServerSideEncryption')})
if len(sys.argv) > 3:
    v = [o for o in out if o['key'] == sys.argv[3]][0]
    try:
        s3.delete_object(Bucket=bucket, Key=v['key'], VersionId=v['version'])
        v['delete'] = 'deleted'
    except Exception as e:
        v['delete'] = str(e)
print(json.dumps(out))
"#;

#[test]
fn shipped_objects_are_locked_in_compliance_mode_and_a_store_without_object_lock_is_a_failure() {
    let mut w = World::new("objlock");
    let _moto = moto(&w);
    boto(
        &w,
        "s3.create_bucket(Bucket='locked', ObjectLockEnabledForBucket=True)\ns3.create_bucket(Bucket='unlocked')\nprint('{}')",
        &[],
    );
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    let id = secret(&w, "s3-id", "moto\n");
    let key = secret(&w, "s3-secret", "moto\n");
    let base = w.agent_and_records("", "").replace(
        "[admin]\n",
        &format!("[admin]\nmetrics_listen = \"{METRICS}\"\n"),
    );
    let config = |bucket: &str| {
        format!(
            "{}\n[records.shipping]\nendpoint = \"http://{MOTO}\"\nbucket = \"{bucket}\"\nprefix = \"fleet\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\nobject_lock_days = 3\nsse = \"AES256\"\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
            base,
            id.display(),
            key.display(),
            pki.ca.display()
        )
    };
    w.write_config(&config("locked"));
    w.start_agent(false);
    let ca = w.public_copy(&w.path("state/ca.pem"));
    let records = w.records_dir();
    let heads: Value =
        serde_json::from_slice(&std::fs::read(records.join("_heads.json")).unwrap()).unwrap();
    let root = format!("fleet/{}", heads["host"].as_str().unwrap());
    for i in 0..2 {
        assert_eq!(curl_status(&w, &ca, &format!("/fhir/Patient/{i}")), "404");
    }
    w.wait_records("requests", 2);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // The last pass at stop ships everything sealed.
    assert!(w.sigterm(Duration::from_secs(30)).success());
    let mut want = sealed(&records);
    want.push("_heads.json".into());
    want.push("requests/_head.json".into());
    let data = want
        .iter()
        .find(|f| f.starts_with("requests/date=") && f.ends_with(".parquet"))
        .unwrap()
        .clone();
    let objects = boto(&w, INSPECT, &["locked", &root, &format!("{root}/{data}")]);
    let objects = objects.as_array().unwrap();
    let keys: std::collections::BTreeSet<String> = objects
        .iter()
        .map(|o| o["key"].as_str().unwrap().to_owned())
        .collect();
    for rel in &want {
        assert!(
            keys.contains(&format!("{root}/{rel}")),
            "{rel} not shipped: {keys:?}"
        );
    }
    let three_days = 3.0 * 86_400.0;
    for o in objects {
        assert_eq!(o["mode"], "COMPLIANCE", "{o}");
        assert_eq!(o["sse"], "AES256", "{o}");
        let until = o["until"]
            .as_f64()
            .unwrap_or_else(|| panic!("no retain-until: {o}"));
        assert!(
            until > started + three_days - 600.0 && until < started + three_days + 60.0,
            "retain-until {until} not about now + 3 days ({started}): {o}"
        );
    }
    let deleted = objects.iter().find(|o| o.get("delete").is_some()).unwrap();
    assert!(
        deleted["delete"].as_str().unwrap().contains("AccessDenied"),
        "a locked version cannot be deleted: {deleted}"
    );

    // A bucket without Object Lock: the store refuses the lock headers, and that is
    // a shipping failure (status, metric, event), never an unlocked upload.
    w.write_config(&config("unlocked"));
    w.start_agent(false);
    assert_eq!(curl_status(&w, &ca, "/fhir/Patient/7"), "404");
    w.wait_records("requests", 3);
    wait_until("the refusal reported", Duration::from_secs(30), || {
        let st = w.status();
        let sh = &st["records"]["shipping"];
        sh["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Object Lock"))
            && sh["unshipped_files"].as_u64() >= Some(1)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", w.status()));
    let st = w.status();
    let sh = &st["records"]["shipping"];
    assert!(sh["failures"].as_u64().unwrap() >= 1, "{st}");
    assert!(
        sh["unshipped_files"].as_u64().unwrap() >= 1,
        "files wait: {st}"
    );
    assert!(
        sh["last_error"]
            .as_str()
            .unwrap()
            .contains("ObjectLockConfiguration"),
        "the store's reason: {st}"
    );
    let metrics = scrape_metrics(&w, METRICS);
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("phigate_records_ship_failures"))
        .unwrap_or_else(|| panic!("no failures metric: {metrics}"));
    assert!(!failures.ends_with(" 0"), "{failures}");
    let unlocked = boto(
        &w,
        "print(json.dumps(s3.list_object_versions(Bucket='unlocked').get('Versions', [])))",
        &[],
    );
    assert_eq!(unlocked, serde_json::json!([]), "nothing shipped unlocked");
    assert!(w.sigterm(Duration::from_secs(30)).success());
    let events = w.all_records("events");
    assert!(
        events.iter().any(|e| e["kind"] == "shipping"
            && e["outcome"] == "failed"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("Object Lock"))),
        "a shipping failure event naming the refusal"
    );
}

/// `phigate run` expected to refuse to start: its exit code and output (bounded: a
/// start that does not refuse is ended by `timeout`, exit 124).
fn run_expecting_refusal(w: &World) -> (Option<i32>, String) {
    let bin = phigate_bin();
    let out = output(
        w.outside(),
        &[
            "timeout",
            "60",
            bin.to_str().unwrap(),
            "run",
            "--config",
            w.config_path().to_str().unwrap(),
        ],
    );
    (
        out.status.code(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn a_start_behind_the_shipped_anchor_is_refused_unless_told_to_warn() {
    let mut w = World::new("startanchor");
    let store_dir = w.path("s3");
    std::fs::create_dir_all(&store_dir).unwrap();
    let mut s3 = Some(s3rver(&w, &store_dir));
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let _up = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    let id = secret(&w, "s3-id", "S3RVER\n");
    let key = secret(&w, "s3-secret", "S3RVER\n");
    let base = w.agent_and_records("", "").replace(
        "[admin]\n",
        &format!("[admin]\nmetrics_listen = \"{METRICS}\"\n"),
    );
    let config = |extra: &str| {
        format!(
            "{}\n[records.shipping]\nendpoint = \"http://{S3}\"\nbucket = \"{BUCKET}\"\nprefix = \"fleet\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\n{extra}\n\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
            base,
            id.display(),
            key.display(),
            pki.ca.display()
        )
    };
    let anchor = |w: &World| w.status()["records"]["shipping"].clone();
    w.write_config(&config(""));
    w.start_agent(false);
    let sh = anchor(&w);
    assert!(
        sh["anchor"].as_str().unwrap().contains("nothing shipped"),
        "{sh}"
    );
    let ca = w.public_copy(&w.path("state/ca.pem"));
    let records = w.records_dir();
    for i in 0..2 {
        assert_eq!(curl_status(&w, &ca, &format!("/fhir/Patient/{i}")), "404");
        w.wait_records("requests", i + 1);
    }
    assert!(w.sigterm(Duration::from_secs(30)).success());
    let heads: Value =
        serde_json::from_slice(&std::fs::read(records.join("_heads.json")).unwrap()).unwrap();
    let root = format!("fleet/{}", heads["host"].as_str().unwrap());
    assert!(missing(&records, &store_dir, &root).is_empty());

    // Untampered, the start checks and goes on.
    w.start_agent(false);
    let sh = anchor(&w);
    assert!(
        sh["anchor"]
            .as_str()
            .unwrap()
            .starts_with("ok: the records here hold"),
        "{sh}"
    );
    assert_eq!(sh["anchor_behind"], false, "{sh}");
    assert!(w.sigterm(Duration::from_secs(30)).success());

    // The newest requests file and its manifest deleted while the agent was down:
    // the start is refused, naming it, and the refusal is an `events` row.
    let files = request_files(&records);
    let newest = files.last().unwrap().1.clone();
    remove_file_and_manifest(&records, &newest);
    let (code, text) = run_expecting_refusal(&w);
    assert!(
        code.is_some_and(|c| c != 0 && c != 124),
        "refused, not started: {code:?}\n{text}"
    );
    assert!(
        text.contains("behind the off-host anchor")
            && text.contains("truncated")
            && text.contains("anchor_at_start"),
        "{text}"
    );
    let events = w.all_records("events");
    assert!(
        events.iter().any(|e| e["kind"] == "anchor"
            && e["outcome"] == "failed"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("truncated"))),
        "an anchor failure event: {events:?}"
    );

    // Told to warn: it starts and says so (status, metric).
    w.write_config(&config("anchor_at_start = \"warn\""));
    w.start_agent(false);
    let sh = anchor(&w);
    assert_eq!(sh["anchor_behind"], true, "{sh}");
    assert!(sh["anchor"].as_str().unwrap().contains("truncated"), "{sh}");
    let metrics = scrape_metrics(&w, METRICS);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("phigate_records_anchor_behind") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(w.sigterm(Duration::from_secs(30)).success());

    // The store unreachable at start is no rollback: the default (refuse) starts,
    // the check reported as not done.
    w.write_config(&config(""));
    drop(s3.take());
    w.start_agent(false);
    let sh = anchor(&w);
    assert!(
        sh["anchor"].as_str().unwrap().starts_with("unchecked"),
        "{sh}"
    );
    assert_eq!(sh["anchor_behind"], false, "{sh}");
    assert!(w.sigterm(Duration::from_secs(30)).success());
}
