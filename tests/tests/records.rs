//! Records produced by real traffic through the real redirect: what auditors read
//! with DuckDB, what `phigate audit verify` says of them, and that a SIGKILL under
//! load loses no record of a response a client received.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

const UP: &str = "127.0.0.2:9443";

/// An https destination on 127.0.0.2:9443 backed by the Node test upstream.
fn https_world(tag: &str) -> (World, Background) {
    https_world_with(tag, "")
}

fn https_world_with(tag: &str, records_extra: &str) -> (World, Background) {
    let mut w = World::new(tag);
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    let upstream = node_upstream(&w, "127.0.0.2", 9443, Some(&pki), &[]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_and_records("", records_extra),
        pki.ca.display()
    ));
    w.start_agent(false);
    (w, upstream)
}

/// phigate's CA certificate where any user can read it (state_dir is root's, 0700).
fn public_ca(w: &World) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(unique("phigate-ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::copy(w.path("state/ca.pem"), &ca).unwrap();
    for p in [&dir, &ca] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    ca
}

fn curl(w: &World, place: Place<'_>, url: &str) -> std::process::Output {
    let ca = public_ca(w);
    let out = output(
        place,
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
            url,
        ],
    );
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
    out
}

fn phigate(args: &[&str]) -> std::process::Output {
    Command::new(phigate_bin()).args(args).output().unwrap()
}

/// Runs one query file of docs/queries with the given variables: the rows of each of
/// its statements, as JSON objects.
fn duckdb_query(records: &Path, file: &str, vars: &[(&str, &str)]) -> Vec<Vec<Value>> {
    let queries = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/queries");
    let script = r#"
import duckdb, json, sys, datetime, decimal
records, views, query = sys.argv[1], sys.argv[2], sys.argv[3]
c = duckdb.connect()
c.execute("SET VARIABLE records = ?", [records])
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1)
    c.execute(f"SET VARIABLE {k} = {v}")
def statements(path):
    text = "\n".join(l for l in open(path).read().splitlines() if not l.strip().startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]
for body in statements(views):
    try:
        c.execute(body)
    except duckdb.IOException:
        pass  # a table with no files yet (approvals)
out = []
for body in statements(query):
    cur = c.execute(body)
    cols = [d[0] for d in cur.description]
    out.append([dict(zip(cols, r)) for r in cur.fetchall()])
def enc(o):
    if isinstance(o, (datetime.datetime, datetime.date)):
        return o.isoformat()
    if isinstance(o, decimal.Decimal):
        return float(o)
    return str(o)
print(json.dumps(out, default=enc))
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script])
        .arg(records)
        .arg(queries.join("views.sql"))
        .arg(queries.join(file));
    for (k, v) in vars {
        cmd.arg(format!("{k}={v}"));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{file}: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Policies of the auditor-query world: patient reads masked with `safe_harbor`,
/// Coverage forbidden (denials to find), everything else allowed.
const QUERY_POLICIES: &str = r#"
@id("test.allow-other")
permit (principal, action, resource)
unless { context.path like "/fhir/Patient*" };

@id("test.patients-masked")
@mask("safe_harbor")
permit (principal, action, resource)
when { context.path like "/fhir/Patient*" };

@id("test.no-coverage")
forbid (principal, action, resource)
when { context.path like "/fhir/Coverage*" };
"#;

#[test]
fn auditor_queries_answer_from_records_of_real_traffic() {
    let mut w = World::new("queries");
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    // FHIR the upstream serves (--files: /fhir/Patient/123 -> Patient-123.json).
    let files = w.path("fhir");
    std::fs::create_dir_all(&files).unwrap();
    for (i, name) in [
        (123, "Patient-123.json"),
        (123, "Patient-123-_history-2.json"),
        (456, "Patient-456.json"),
    ] {
        let p = fhir::patient(7, i);
        std::fs::write(files.join(name), fhir::to_vec(&p.resources[0])).unwrap();
    }
    let (bundle, _) = fhir::bundle(7, 3);
    std::fs::write(files.join("Observation.json"), fhir::to_vec(&bundle)).unwrap();
    let mut ndjson = Vec::new();
    for i in 0..5 {
        ndjson.extend(fhir::to_vec(&fhir::patient(7, 900 + i).resources[0]));
        ndjson.push(b'\n');
    }
    std::fs::write(files.join("Patient-export.ndjson"), ndjson).unwrap();
    let _up = node_upstream(
        &w,
        "127.0.0.2",
        9443,
        Some(&pki),
        &["--files", files.to_str().unwrap()],
    );
    w.write_policies(&[("queries.cedar", QUERY_POLICIES)]);
    w.write_config(&format!(
        "{}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\n",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    let urls = [
        "/fhir/Patient/123",
        "/fhir/Patient/123/_history/2",
        "/fhir/Patient/456",
        "/fhir/Observation?patient=123&_count=500",
        "/fhir/Patient/$export",
        "/json?bytes=2000",
        // Denied by test.no-coverage.
        "/fhir/Coverage/9",
    ];
    for u in urls {
        let out = curl(&w, w.inside(), &format!("https://{UP}{u}"));
        assert!(out.status.success(), "{u}: {}", stderr(&out));
    }
    // The same API called by another user.
    let nobody = Place {
        uid: Some(65534),
        ..w.inside()
    };
    assert!(curl(&w, nobody, &format!("https://{UP}/fhir/Patient/456"))
        .status
        .success());
    w.wait_records("requests", urls.len() + 1);
    // SIGTERM writes every buffered row: the auditor reads a settled copy.
    assert!(w.sigterm(Duration::from_secs(20)).success());
    let records = w.records_dir();
    let config = w.config_path();
    let config = config.to_str().unwrap();

    let pseudo = |id: &str| {
        let out = phigate(&["audit", "pseudonym", "--config", config, id]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_owned()
    };
    let (p123, p456) = (pseudo("123"), pseudo("456"));
    assert!(p123.starts_with("p:") && p123 != p456);
    let today = time_today();
    let range = [
        ("date_from", format!("DATE '{today}' - 1")),
        ("date_to", format!("DATE '{today}' + 1")),
    ];
    let vars = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        range.iter().cloned().chain(extra.iter().cloned()).collect()
    };
    let run_all = |file: &str, v: Vec<(&'static str, String)>| {
        let borrowed: Vec<(&str, &str)> = v.iter().map(|(k, v)| (*k, v.as_str())).collect();
        duckdb_query(&records, file, &borrowed)
    };
    // The single-statement queries.
    let run = |file: &str, v: Vec<(&'static str, String)>| {
        let mut all = run_all(file, v);
        assert_eq!(all.len(), 1, "{file} has one statement");
        all.remove(0)
    };

    // Who accessed patient 123: the two path reads and the search naming it.
    let rows = run("patient_access.sql", vars(&[("patient", sql_text(&p123))]));
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert!(paths.contains(&format!("/fhir/Patient/{p123}").as_str()));
    assert!(paths.contains(&"/fhir/Observation"));
    for r in &rows {
        assert_eq!(r["user"], "root");
        assert_eq!(r["destination"], "patients-api");
        assert!(r["exe_path"].as_str().unwrap().ends_with("curl"));
        // The raw id is no path segment (ids and pseudonyms may contain its digits).
        assert!(
            !r["path"]
                .as_str()
                .unwrap()
                .split('/')
                .any(|seg| seg == "123"),
            "raw id in a record: {r}"
        );
    }
    // Patient 456: root and nobody.
    let rows = run("patient_access.sql", vars(&[("patient", sql_text(&p456))]));
    let users: HashSet<&str> = rows.iter().map(|r| r["user"].as_str().unwrap()).collect();
    assert_eq!(users, HashSet::from(["root", "nobody"]), "{rows:#?}");
    // Outside the date range: nothing.
    let rows = run(
        "patient_access.sql",
        vec![
            ("patient", sql_text(&p123)),
            ("date_from", "DATE '2001-01-01'".into()),
            ("date_to", "DATE '2001-12-31'".into()),
        ],
    );
    assert!(rows.is_empty(), "{rows:#?}");

    // Everything nobody did.
    let rows = run(
        "identity_activity.sql",
        vars(&[("who", sql_text("nobody"))]),
    );
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["patients"], 1);

    // Bulk reads: the export and the _count=500 search, not the small reads.
    let rows = run(
        "bulk_reads.sql",
        vec![
            ("min_count", "100".into()),
            ("min_bytes", "100000000".into()),
        ],
    );
    let paths: HashSet<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        HashSet::from(["/fhir/Patient/$export", "/fhir/Observation"]),
        "{rows:#?}"
    );

    // Masking coverage folds patient pseudonyms into one endpoint per route; the
    // patient reads went out masked, the other endpoints did not.
    let coverage = run_all("masking_coverage.sql", vec![]);
    assert_eq!(coverage.len(), 2, "both statements of masking_coverage.sql");
    let rows = &coverage[0];
    let patient = rows
        .iter()
        .find(|r| r["endpoint"] == "/fhir/Patient/{patient}")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(patient["responses"], 3);
    assert_eq!(patient["masked_responses"], 3, "{patient}");
    assert_eq!(
        patient["profiles"],
        serde_json::json!(["safe_harbor"]),
        "{patient}"
    );
    let json = rows
        .iter()
        .find(|r| r["endpoint"] == "/json")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(json["masked_responses"], 0, "{json}");
    let masked_total: f64 = rows
        .iter()
        .map(|r| r["values_masked"].as_f64().unwrap())
        .sum();
    assert!(masked_total > 0.0, "{rows:#?}");
    // By entity type: the same values, split by what they were.
    let by_entity = &coverage[1];
    assert!(
        by_entity.iter().any(|r| r["entity"] == "NAME"),
        "{by_entity:#?}"
    );
    let entity_total: f64 = by_entity
        .iter()
        .map(|r| r["values_masked"].as_f64().unwrap())
        .sum();
    assert!(
        entity_total >= masked_total,
        "{by_entity:#?} vs {masked_total}"
    );

    // Denials and approvals: every row the query returns is one, and it misses none.
    let all = w.records("requests");
    let expected = all
        .iter()
        .filter(|r| r["decision"] != "allow" || !r["approval_id"].is_null())
        .count();
    assert!(expected >= 1, "the world made a denial: {all:#?}");
    let rows = run("decisions.sql", vars(&[]));
    assert_eq!(rows.len(), expected, "{rows:#?}");
    let denied = rows
        .iter()
        .find(|r| r["path"] == "/fhir/Coverage/9")
        .unwrap_or_else(|| panic!("the Coverage denial: {rows:#?}"));
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["status"], 403);
    assert!(
        denied["policy_ids"]
            .to_string()
            .contains("test.no-coverage"),
        "{denied}"
    );

    // Off hours, in a zone where it is now 03:00 (every request is off hours) and in
    // one where it is noon (only weekends are), computed independently from the
    // records' timestamps.
    for hour in [3u8, 12] {
        let tz = timezone_at(hour);
        let rows = run("off_hours.sql", vec![("tz", sql_text(&tz))]);
        let offset = time::UtcOffset::from_hms(utc_offset_hours(&tz), 0, 0).unwrap();
        let off = all
            .iter()
            .filter(|r| {
                let t = r["start_time"].as_str().unwrap();
                let local = time::OffsetDateTime::parse(t, &Rfc3339)
                    .unwrap()
                    .to_offset(offset);
                let weekend = matches!(
                    local.weekday(),
                    time::Weekday::Saturday | time::Weekday::Sunday
                );
                !(7..=18).contains(&local.hour()) || weekend
            })
            .count();
        if hour == 3 {
            assert_eq!(off, all.len(), "at 03:00 every request is off hours");
        }
        assert_eq!(rows.len(), off, "{tz}: {rows:#?}");
    }
}

/// Hours east of UTC of a `timezone_at` zone (`Etc/GMT-5` is UTC+5).
fn utc_offset_hours(tz: &str) -> i8 {
    match tz.strip_prefix("Etc/GMT") {
        Some("") => 0,
        Some(n) => -n.parse::<i8>().unwrap(),
        None => panic!("not an Etc/GMT zone: {tz}"),
    }
}

fn time_today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn audit_verify_passes_on_real_records_and_names_a_deleted_row() {
    let (mut w, _up) = https_world("verify");
    for i in 0..5 {
        let out = curl(&w, w.inside(), &format!("https://{UP}/fhir/Patient/{i}"));
        assert_eq!(stdout(&out), "404", "{}", stderr(&out));
    }
    w.wait_records("requests", 5);
    assert!(w.sigterm(Duration::from_secs(20)).success());
    let config = w.config_path();
    let config = config.to_str().unwrap();

    let out = phigate(&["audit", "verify", "--config", config]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("requests"), "{}", stdout(&out));

    // On another machine: a copy of the records and only the public key.
    let pubkey = phigate(&["audit", "pubkey", "--config", config]);
    assert!(pubkey.status.success(), "{}", stderr(&pubkey));
    let elsewhere = tempfile::tempdir().unwrap();
    let key = elsewhere.path().join("records.pub");
    std::fs::write(&key, &pubkey.stdout).unwrap();
    let copy = elsewhere.path().join("records");
    let st = Command::new("cp")
        .arg("-a")
        .arg(w.records_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let verify_copy = || {
        phigate(&[
            "audit",
            "verify",
            copy.to_str().unwrap(),
            "--pubkey",
            key.to_str().unwrap(),
        ])
    };
    let out = verify_copy();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));

    // Found in review: a table directory deleted as a whole verified as OK.
    let gutted = elsewhere.path().join("gutted");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&copy)
        .arg(&gutted)
        .status()
        .unwrap();
    assert!(st.success());
    for t in ["requests", "connections"] {
        std::fs::remove_dir_all(gutted.join(t)).unwrap();
    }
    let out = phigate(&[
        "audit",
        "verify",
        gutted.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    let report = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL requests: table directory requests/ is missing (deleted); the signed list of tables names"),
        "{report}"
    );
    assert!(
        report.contains("FAIL connections: table directory connections/ is missing"),
        "{report}"
    );

    // An auditor-side edit with DuckDB itself: rewrite a requests file without one row.
    let file = first_parquet(&copy.join("requests"));
    let script = "import duckdb, sys; f = sys.argv[1]; c = duckdb.connect(); \
                  c.execute(f\"COPY (SELECT * FROM read_parquet('{f}') WHERE chain_seq <> 2) TO '{f}.new' (FORMAT parquet)\"); \
                  import os; os.replace(f + '.new', f)";
    let st = Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .status()
        .unwrap();
    assert!(st.success());
    let out = verify_copy();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let report = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        report.contains(file.file_name().unwrap().to_str().unwrap()),
        "{report}"
    );
    assert!(report.contains("file altered"), "{report}");
    assert!(report.contains("columns differ"), "{report}");
}

fn first_parquet(dir: &Path) -> std::path::PathBuf {
    let mut found: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    found.sort();
    found.into_iter().next().expect("a parquet file")
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Python clients (keep-alive, several threads) run through phigate while the agent
/// is SIGKILLed and restarted. Every response a client received in full carried a
/// request id; each of those ids must be in `requests` afterwards.
#[test]
fn sigkill_under_load_loses_no_record_of_a_received_response() {
    let (mut w, _up) = https_world("kill9");
    let out_file = w.path("client.json");
    let ca = w.path("state/ca.pem");
    let script = r#"
import http.client, json, ssl, sys, threading, time
host, port, ca, secs, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
ctx = ssl.create_default_context(cafile=ca)
ids, errors, lock = [], [0], threading.Lock()
deadline = time.time() + secs
def worker():
    conn = None
    while time.time() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
            conn.request("GET", "/json?bytes=300")
            r = conn.getresponse()
            body = r.read()  # raises IncompleteRead if the body was cut short
            rid = r.getheader("x-phigate-request-id")
            if r.status == 200 and rid and len(body) == int(r.getheader("content-length")):
                with lock:
                    ids.append(rid)
            elif r.status != 200:
                with lock:
                    errors[0] += 1
        except Exception:
            with lock:
                errors[0] += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.02)
ts = [threading.Thread(target=worker) for _ in range(n)]
for t in ts: t.start()
for t in ts: t.join()
json.dump({"ids": ids, "errors": errors[0]}, open(out, "w"))
"#;
    let host = UP.split(':').next().unwrap();
    let port = UP.split(':').nth(1).unwrap();
    let client = Background::spawn(
        w.inside(),
        &[
            "python3",
            "-c",
            script,
            host,
            port,
            ca.to_str().unwrap(),
            "8",
            "8",
            out_file.to_str().unwrap(),
        ],
        w.path("client.log"),
    );
    std::thread::sleep(Duration::from_millis(2500));
    w.kill9();
    std::thread::sleep(Duration::from_millis(700));
    w.start_agent(false);
    // Let the clients finish (8 s in all), then settle the records.
    let t = std::time::Instant::now();
    while !out_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{}",
            client.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(w.sigterm(Duration::from_secs(30)).success());

    let result: Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).expect("client output");
    let received: Vec<&str> = result["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        received.len() > 100,
        "too little load to mean anything: {} responses",
        received.len()
    );
    let recorded: HashSet<String> = w
        .records("requests")
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&&str> = received
        .iter()
        .filter(|id| !recorded.contains(**id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} received responses have no record: {:?}",
        missing.len(),
        received.len(),
        &missing[..missing.len().min(5)]
    );
    // The restart replayed the journal and said so; the chain still verifies.
    let events = w.records("events");
    assert!(events.iter().filter(|e| e["kind"] == "agent_start").count() >= 2);
    let config = w.config_path();
    let out = phigate(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    eprintln!(
        "kill -9 under load: {} responses received, all recorded; {} client errors during the gap",
        received.len(),
        result["errors"]
    );
}

/// The agent verifies its own records on a schedule and records each outcome, so a
/// file altered on the host is noticed without waiting for an auditor.
#[test]
fn the_agent_verifies_its_records_periodically_and_records_a_tampered_file() {
    let (w, _up) = https_world_with("selfverify", "verify_secs = 1");
    let out = curl(&w, w.inside(), &format!("https://{UP}/fhir/Patient/1"));
    assert_eq!(stdout(&out), "404", "{}", stderr(&out));
    w.wait_records("requests", 1);
    let verified = |outcome: &str| {
        w.records("events")
            .into_iter()
            .filter(|e| e["kind"] == "verify" && e["outcome"] == outcome)
            .collect::<Vec<_>>()
    };
    wait_until("a verify event", Duration::from_secs(15), || {
        !verified("ok").is_empty()
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:#?}", w.records("events")));
    // Someone with write access to records_dir appends to a sealed file.
    let file = first_parquet(&w.records_dir().join("requests"));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .unwrap()
        .write_all(b"forged")
        .unwrap();
    wait_until("a failed verify event", Duration::from_secs(15), || {
        !verified("failed").is_empty()
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:#?}", w.records("events")));
    let failed = &verified("failed")[0];
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("file altered"), "{message}");
    assert!(
        message.contains(file.file_name().unwrap().to_str().unwrap()),
        "{message}"
    );
}
