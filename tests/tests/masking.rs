//! PHI masking through the real redirect: synthetic FHIR patients whose identifiers
//! are all known go through phigate under `safe_harbor`; none of those strings may
//! reach the client, nor any record (the Parquet files, read with DuckDB).

use std::process::Command;
use std::time::Duration;

use phigate_e2e::*;
use serde_json::Value;

const UP: &str = "127.0.0.2:9443";

struct Masked {
    w: World,
    _upstream: Background,
    identifiers: Vec<String>,
}

/// The masking world with this test file's small buffer.
fn start(tag: &str) -> Masked {
    start_with(
        tag,
        "[masking]\nbuffer_bytes = 16384\nrecord_body_bytes = 1000000\n",
    )
}

fn start_with(tag: &str, masking_section: &str) -> Masked {
    start_full(tag, masking_section, "")
}

fn start_full(tag: &str, masking_section: &str, destination_extra: &str) -> Masked {
    start_profile(tag, masking_section, destination_extra, None)
}

/// `profile`: the destination's masking profile, written as `notes.toml` (else the
/// shipped `safe_harbor`).
fn start_profile(
    tag: &str,
    masking_section: &str,
    destination_extra: &str,
    profile: Option<&str>,
) -> Masked {
    let mut w = World::new(tag);
    let profile_name = match profile {
        Some(text) => {
            std::fs::write(w.policies_dir().join("profiles/notes.toml"), text).unwrap();
            "notes"
        }
        None => "safe_harbor",
    };
    let pki = TestPki::new(w.dir.path(), "upstream", "IP:127.0.0.2");
    // The data: a Bundle, a bulk export, one Patient, a text file.
    let files = w.path("files");
    std::fs::create_dir_all(&files).unwrap();
    let (bundle, mut identifiers) = fhir::bundle(42, 12);
    std::fs::write(files.join("bundle.json"), fhir::to_vec_pretty(&bundle)).unwrap();
    let mut ndjson = Vec::new();
    for i in 100..130 {
        let p = fhir::patient(42, i);
        for r in &p.resources {
            ndjson.extend(fhir::to_vec(r));
            ndjson.push(b'\n');
        }
        identifiers.extend(p.identifiers);
    }
    std::fs::write(files.join("export.ndjson"), ndjson).unwrap();
    let one = fhir::patient(42, 200);
    std::fs::write(files.join("patient.json"), fhir::to_vec(&one.resources[0])).unwrap();
    identifiers.extend(one.identifiers);
    std::fs::write(files.join("note.txt"), "plain text").unwrap();
    let upstream = node_upstream(
        &w,
        "127.0.0.2",
        9443,
        Some(&pki),
        &["--files", files.to_str().unwrap()],
    );
    // With the small buffer: the Bundle and the export stream, the Patient is buffered.
    w.write_config(&format!(
        "{}\n{masking_section}\n[[destinations]]\nname = \"patients-api\"\naddresses = [\"{UP}\"]\nprotocol = \"https\"\nupstream_ca = \"{}\"\nmask_profile = \"{profile_name}\"\n{destination_extra}",
        w.agent_section(""),
        pki.ca.display()
    ));
    w.start_agent(false);
    Masked {
        w,
        _upstream: upstream,
        identifiers,
    }
}

fn curl(m: &Masked, args: &[&str]) -> (String, String) {
    let ca = m.w.path("state/ca.pem").display().to_string();
    let mut argv = vec![
        "curl",
        "-sS",
        "--max-time",
        "30",
        "--cacert",
        ca.as_str(),
        "-D",
        "/dev/stderr",
    ];
    argv.extend_from_slice(args);
    let out = output(m.w.inside(), &argv);
    (stdout(&out), stderr(&out))
}

fn assert_no_identifier(m: &Masked, what: &str, text: &str) {
    for id in &m.identifiers {
        assert!(
            !text.contains(id.as_str()),
            "{what}: identifier {id:?} leaked"
        );
    }
}

#[test]
fn no_known_identifier_reaches_the_client_or_the_records() {
    let m = start("mask-leak");
    let cases = [
        ("/files/bundle.json", false),
        ("/files/bundle.json?gzip=1", false),
        ("/files/bundle.json?br=1&chunked=1", false),
        ("/files/export.ndjson?chunked=1", true),
        ("/files/export.ndjson?gzip=1", true),
        ("/files/patient.json", false),
    ];
    for (path, ndjson) in cases {
        let (body, head) = curl(&m, &["--compressed", &format!("https://{UP}{path}")]);
        assert!(head.starts_with("HTTP/2 200"), "{path}: {head}\n{body}");
        assert!(
            !head.to_lowercase().contains("content-encoding"),
            "{path}: sent decoded: {head}"
        );
        assert!(head.contains("etag: W/\"v1\""), "{path}: weak etag: {head}");
        assert_no_identifier(&m, path, &body);
        if ndjson {
            for line in body.lines() {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("{path}: {e}: {line}"));
            }
        } else {
            serde_json::from_str::<Value>(&body).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        assert!(body.contains("[REDACTED:NAME]"), "{path}: masked");
    }
    // The buffered Patient has an exact length.
    let (_, head) = curl(&m, &[&format!("https://{UP}/files/patient.json")]);
    assert!(head.contains("content-length:"), "{head}");

    // A content type the profile does not know: refused, never raw.
    let (body, head) = curl(&m, &[&format!("https://{UP}/files/note.txt")]);
    assert!(head.starts_with("HTTP/2 502"), "{head}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "masking_failed", "{v}");
    assert!(!body.contains("plain text"));

    let recs = m.w.wait_records("requests", cases.len() + 2);
    for r in &recs {
        assert_eq!(r["masking_profile"], "safe_harbor", "{r}");
        assert_eq!(r["masking_set_hash"].as_str().unwrap().len(), 64, "{r}");
    }
    let ok: Vec<&Value> = recs.iter().filter(|r| r["status"] == 200).collect();
    assert_eq!(ok.len(), cases.len() + 1);
    for r in &ok {
        assert_eq!(r["outcome"], "complete", "{r}");
        assert!(
            r["response_body"]
                .as_str()
                .unwrap()
                .contains("[REDACTED:NAME]"),
            "{r}"
        );
        assert!(r["masking_counts"].to_string().contains("NAME"), "{r}");
    }
    let refused = recs.iter().find(|r| r["status"] == 502).unwrap();
    assert_eq!(refused["outcome"], "masking_failed", "{refused}");

    // Every row of every table, as DuckDB reads the Parquet files.
    let mut m = m;
    assert!(m.w.sigterm(Duration::from_secs(20)).success());
    let rows = all_record_rows(&m);

    assert!(
        rows.contains("REDACTED:NAME"),
        "the masked bodies are in the records"
    );
    assert!(rows.lines().count() >= cases.len() + 2);
    assert_no_identifier(&m, "records", &rows);
}

/// Every row of every table, as DuckDB reads the Parquet files.
fn all_record_rows(m: &Masked) -> String {
    let script = r#"
import duckdb, sys, glob
records = sys.argv[1]
c = duckdb.connect()
for table in ["requests", "connections", "events"]:
    files = glob.glob(f"{records}/{table}/*/*.parquet")
    if not files:
        continue
    cur = c.execute(f"SELECT * FROM read_parquet('{records}/{table}/*/*.parquet', union_by_name = true)")
    for row in cur.fetchall():
        print(repr(row))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(m.w.records_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
}

/// At default settings, a masked body of unknown length (chunked) is held only for
/// its first 64 KiB of masked output, as docs/masking.md says: the client has the
/// head while the upstream is still pausing, and the agent's memory stays bounded
/// over a 48 MiB NDJSON stream.
#[test]
fn a_masked_stream_without_a_length_is_held_only_for_its_head() {
    require_root();
    let m = start_with("mask-hold", "");
    let big = m.w.path("files/big.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(big).unwrap());
    fhir::ndjson_of_size(43, 48 << 20, &mut f).unwrap();
    drop(f);
    let pid = m.w.agent_pid();
    let before = peak_rss_kib(pid);
    let url = format!("https://{UP}/files/big.ndjson?chunked=1&pause_after=1048576&pause_ms=3000");
    let (out, headers) = curl(
        &m,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_starttransfer} %{time_total} %{size_download}",
            &url,
        ],
    );
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"200"), "{out} {headers}");
    let first: f64 = f[1].parse().unwrap();
    let total: f64 = f[2].parse().unwrap();
    let size: u64 = f[3].parse().unwrap();
    assert!(total >= 3.0, "the upstream paused 3 s: {out}");
    assert!(
        first < 2.0,
        "the first byte waited for more than the head (held {first} s of a {total} s transfer)"
    );
    assert!(size > 40 << 20, "{out}");
    let grown = peak_rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 32 << 10,
        "the agent's peak memory grew by {grown} KiB streaming 48 MiB"
    );
}

/// Writes a corpus from carebundle (a third-party synthetic FHIR R4 generator from
/// PyPI, installed by `cargo xtask setup`): transaction Bundles of patient histories
/// of every clinical profile it has, and the same as a bulk-export NDJSON stream.
const CAREBUNDLE: &str = r#"
import sys, pathlib
from carebundle import generate_history, to_json, to_ndjson, PROFILES
out = pathlib.Path(sys.argv[1])
bundles = []
for i, profile in enumerate(sorted(PROFILES)):
    for sex in ("F", "M"):
        b = generate_history(profile=profile, seed=1000 + i, sex=sex, index=i, visits=3)
        bundles.append(b)
        (out / f"cb-{profile}-{sex}.json").write_text(to_json(b))
(out / "cb-export.ndjson").write_text("".join(to_ndjson(bundles).values()))
"#;

/// The identifying strings of a FHIR document nobody here wrote: names, dates
/// (to the day), identifier values, ids, full URLs and references, narratives.
fn identifiers_in(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m.iter().for_each(|(k, c)| identifiers_in(c, k, out)),
        Value::Array(a) => a.iter().for_each(|c| identifiers_in(c, key, out)),
        Value::String(s) => {
            let day = s
                .get(..10)
                .filter(|d| d.as_bytes()[4] == b'-' && d[..4].parse::<u32>().is_ok());
            match key {
                _ if day.is_some() => out.push(day.unwrap_or_default().to_owned()),
                "family" | "given" | "div" | "value" => out.push(s.clone()),
                "fullUrl" | "reference" | "id" => {
                    out.push(s.rsplit([':', '/']).next().unwrap_or(s).to_owned())
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// Whether `text` holds `id`: as a word when it is a short word (a given name
/// "Ann" is not in "Annual"), else anywhere.
fn holds(text: &str, id: &str) -> bool {
    if id.len() >= 6 || !id.bytes().all(|b| b.is_ascii_alphabetic()) {
        return text.contains(id);
    }
    text.match_indices(id).any(|(i, _)| {
        let before = text[..i].bytes().next_back();
        let after = text[i + id.len()..].bytes().next();
        !before.is_some_and(|b| b.is_ascii_alphanumeric())
            && !after.is_some_and(|b| b.is_ascii_alphanumeric())
    })
}

/// Writes the real-world-shaped corpus into `files/`: carebundle's generated
/// histories (third party) and complete Synthea-style histories with extensions
/// (mothersMaidenName, birthPlace, birth time, geolocation), narratives and
/// attachments (a base64 note, a PDF, a photo), as Bundles and as NDJSON
/// (`cb-export.ndjson`, `history-export.ndjson`). Returns every raw identifier of
/// the input and the Bundles' file names.
fn real_world_corpus(m: &Masked) -> (Vec<String>, Vec<String>) {
    let files = m.w.path("files");
    let out = Command::new("python3")
        .args(["-c", CAREBUNDLE])
        .arg(&files)
        .output()
        .unwrap();
    assert!(out.status.success(), "carebundle: {}", stderr(&out));
    let mut identifiers: Vec<String> = Vec::new();
    let mut bundles = Vec::new();
    for e in std::fs::read_dir(&files).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("cb-") && name.ends_with(".json") {
            let v: Value =
                serde_json::from_slice(&std::fs::read(files.join(&name)).unwrap()).unwrap();
            identifiers_in(&v, "", &mut identifiers);
            bundles.push(name);
        }
    }
    assert!(bundles.len() >= 10, "{bundles:?}");
    bundles.sort();
    let mut ndjson = Vec::new();
    for i in 0..6 {
        let (b, ids) = fhir::history_bundle(21, i);
        let name = format!("history-{i}.json");
        std::fs::write(files.join(&name), fhir::to_vec_pretty(&b)).unwrap();
        bundles.push(name);
        for e in b["entry"].as_array().unwrap() {
            ndjson.extend(fhir::to_vec(&e["resource"]));
            ndjson.push(b'\n');
        }
        identifiers.extend(ids);
    }
    std::fs::write(files.join("history-export.ndjson"), ndjson).unwrap();
    identifiers.sort();
    identifiers.dedup();
    identifiers.retain(|s| s.len() >= 3);
    assert!(identifiers.len() > 250, "{}", identifiers.len());
    (identifiers, bundles)
}

/// Fails naming every identifier of `identifiers` that `text` holds.
fn scan(identifiers: &[String], what: &str, text: &str) {
    let leaked: Vec<&String> = identifiers.iter().filter(|id| holds(text, id)).collect();
    assert!(
        leaked.is_empty(),
        "{what}: {} identifiers leaked: {leaked:?}",
        leaked.len()
    );
}

/// A real-world-shaped corpus through the real redirect under `safe_harbor`, as
/// Bundles and NDJSON. The scanner knows every raw identifier of the input and
/// finds none in the client's bytes nor in any column of the records.
#[test]
fn a_real_world_corpus_leaks_nothing() {
    require_root();
    let m = start("mask-corpus");
    let (identifiers, bundles) = real_world_corpus(&m);
    let mut paths: Vec<String> = bundles.iter().map(|b| format!("/files/{b}")).collect();
    paths.push("/files/cb-export.ndjson?chunked=1".into());
    paths.push("/files/history-export.ndjson?gzip=1&chunked=1".into());
    for path in &paths {
        let (body, head) = curl(&m, &["--compressed", &format!("https://{UP}{path}")]);
        assert!(head.starts_with("HTTP/2 200"), "{path}: {head}\n{body}");
        scan(&identifiers, path, &body);
        assert!(body.contains("[REDACTED:NAME]"), "{path}: masked");
        assert!(body.contains("\"code\":"), "{path}: codes stay");
    }
    let (body, _) = curl(&m, &[&format!("https://{UP}/files/history-0.json")]);
    let v: Value = serde_json::from_str(&body).unwrap();
    let pt = &v["entry"][0]["resource"];
    assert_eq!(
        pt["extension"][2]["valueString"], "[REDACTED:EXTENSION]",
        "{pt}"
    );
    assert_eq!(
        pt["extension"][0]["extension"][0]["valueCoding"]["code"],
        "2106-3"
    );
    // References still join: the Patient's full URL is the documents' subject.
    assert_eq!(
        v["entry"][0]["fullUrl"],
        v["entry"][2]["resource"]["subject"]["reference"]
    );

    let mut m = m;
    m.w.wait_records("requests", paths.len() + 1);
    assert!(m.w.sigterm(Duration::from_secs(20)).success());
    let rows = all_record_rows(&m);
    assert!(
        rows.contains("REDACTED:EXTENSION"),
        "the masked bodies are in the records"
    );
    scan(&identifiers, "records", &rows);
}

/// `text` with every run that reads as base64 (16 characters or more) decoded and
/// appended: an identifier inside an attachment is found too.
fn with_base64_decoded(text: &str) -> String {
    use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
    use base64::Engine as _;
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    let mut out = text.to_owned();
    for run in text.split(|c| !b64(c)).filter(|r| r.len() >= 16) {
        // Padding ends a run; one cut short is decoded as far as it aligns.
        let b = B64
            .decode(run)
            .or_else(|_| B64.decode(&run[..run.len() - run.len() % 4]));
        if let Ok(b) = b {
            out.push('\n');
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    out
}

/// `safe_harbor` with text attachments decoded and masked, and the detectors the
/// notes need (names have no detector: a pattern for capitalized words, labelled
/// patterns for MRNs and phone numbers).
fn notes_profile() -> String {
    let base =
        std::fs::read_to_string(shipped_policies().join("profiles/safe_harbor.toml")).unwrap();
    let rule = "fhir = \"base64Binary\"\nop = \"drop\"\nentity = \"ATTACHMENT\"\n";
    assert!(base.contains(rule));
    base.replace(rule, &format!("{rule}text_attachments = \"mask\"\n"))
        + r#"
[[rule]]
detector = "date"
op = "generalize_date"
max_age = 89
[[rule]]
detector = "ssn"
op = "redact"
[[rule]]
detector = "phone"
op = "redact"
[[rule]]
detector = "phone_labelled"
op = "redact"
entity = "PHONE"
[[rule]]
detector = "mrn"
op = "pseudonymize"
[[rule]]
detector = "email"
op = "redact"
[[rule]]
detector = "capitalized"
op = "redact"
entity = "NAME"
[[pattern]]
name = "phone_labelled"
regex = '(?i:phone|tel|fax)[:. ]*\+?[0-9][0-9 ().-]{5,}[0-9]'
[[pattern]]
name = "mrn"
regex = '(?i:mrn)[-:# ]*[0-9]{6,10}'
[[pattern]]
name = "capitalized"
regex = '(?-u:\b)[A-Z][a-z0-9][A-Za-z0-9]*(?:[- ][A-Z][a-z0-9][A-Za-z0-9]*)*'
requires_digit = false
"#
}

/// The real-world corpus under a profile that decodes text attachments and masks
/// them with detectors: the clinical notes come back (decoded, masked), and no raw
/// identifier is in the client's bytes, in the base64 of any attachment, nor in the
/// records.
#[test]
fn a_real_world_corpus_with_text_attachments_leaks_nothing() {
    require_root();
    let m = start_profile(
        "mask-notes",
        "[masking]\nbuffer_bytes = 16384\nrecord_body_bytes = 1000000\n",
        "",
        Some(&notes_profile()),
    );
    let (identifiers, bundles) = real_world_corpus(&m);
    let mut paths: Vec<String> = bundles.iter().map(|b| format!("/files/{b}")).collect();
    paths.push("/files/history-export.ndjson?gzip=1&chunked=1".into());
    let mut notes = 0;
    for path in &paths {
        let (body, head) = curl(&m, &["--compressed", &format!("https://{UP}{path}")]);
        assert!(head.starts_with("HTTP/2 200"), "{path}: {head}\n{body}");
        let decoded = with_base64_decoded(&body);
        scan(&identifiers, path, &decoded);
        notes += decoded.matches(" was seen on ").count();
    }
    // Each history's note, masked: 6 Bundles and the same 6 in the export.
    assert_eq!(notes, 12);
    let (body, _) = curl(&m, &[&format!("https://{UP}/files/history-0.json")]);
    let v: Value = serde_json::from_str(&body).unwrap();
    let doc = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == "DocumentReference")
        .unwrap();
    let att = &doc["resource"]["content"][0]["attachment"];
    use base64::Engine as _;
    let note = base64::engine::general_purpose::STANDARD
        .decode(att["data"].as_str().unwrap())
        .unwrap();
    let note = String::from_utf8(note).unwrap();
    assert!(note.contains("[REDACTED:NAME]"), "{note}");
    assert!(note.contains("was seen on 20"), "{note}");
    // Not text: the PDFs and the photo are still dropped.
    assert!(!body.contains("JVBERi0x"), "{body}");

    let mut m = m;
    m.w.wait_records("requests", paths.len() + 1);
    assert!(m.w.sigterm(Duration::from_secs(20)).success());
    let rows = all_record_rows(&m);
    assert!(
        rows.contains("TEXT_ATTACHMENT"),
        "the counts are in the records"
    );
    scan(&identifiers, "records", &with_base64_decoded(&rows));
}

/// Turns each JSON Bundle named on the command line into FHIR XML with
/// fhir.resources (a third-party FHIR model library from PyPI, `cargo xtask setup`
/// installs it with lxml): validated by its R4B models (R4's resources, the
/// version it ships closest to R4), serialized by its own XML writer.
const TO_XML: &str = r#"
import sys, pathlib
from fhir.resources.R4B.bundle import Bundle
for p in map(pathlib.Path, sys.argv[1:]):
    x = Bundle.model_validate_json(p.read_text()).model_dump_xml()
    p.with_suffix(".xml").write_bytes(x.encode() if isinstance(x, str) else x)
"#;

/// Reads masked FHIR XML (the file in argv[1]) with lxml, so it must be well formed,
/// and prints what the test checks: the first entry's fullUrl, the third's subject,
/// the Patient's race code and mothersMaidenName value.
const READ_XML: &str = r#"
import sys, json
from lxml import etree
ns = {"f": "http://hl7.org/fhir"}
doc = etree.parse(sys.argv[1])
one = lambda xp: (doc.xpath(xp, namespaces=ns) or [None])[0]
print(json.dumps({
    "fullUrl": one("/f:Bundle/f:entry[1]/f:fullUrl/@value"),
    "subject": one("/f:Bundle/f:entry[3]/f:resource/*/f:subject/f:reference/@value"),
    "race": one("//f:Patient/f:extension[1]/f:extension[1]/f:valueCoding/f:code/@value"),
    "maiden": one("//f:Patient/f:extension[3]/f:valueString/@value"),
}))
"#;

/// XML's five predefined entities and character references, resolved: a leak
/// escaped by the serializer is still a leak.
fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..end];
        let c = match name {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => name
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The same real-world corpus as FHIR XML (`application/fhir+xml`, written by a
/// third-party library) through the real redirect under `safe_harbor`: no raw
/// identifier in the client's bytes (escaped or not) nor in any column of the
/// records; the masked XML is well formed, codes and safe extensions stay and
/// references still join. `phigate mask` masks the same files the same way.
#[test]
fn a_real_world_corpus_as_fhir_xml_leaks_nothing() {
    require_root();
    let m = start("mask-corpus-xml");
    let (identifiers, bundles) = real_world_corpus(&m);
    let files = m.w.path("files");
    let out = Command::new("python3")
        .args(["-c", TO_XML])
        .args(bundles.iter().map(|b| files.join(b)))
        .output()
        .unwrap();
    assert!(out.status.success(), "fhir.resources: {}", stderr(&out));
    let xml: Vec<String> = bundles.iter().map(|b| b.replace(".json", ".xml")).collect();
    // The input holds what the scanner looks for: the conversion kept the PHI.
    let raw = std::fs::read_to_string(files.join("history-0.xml")).unwrap();
    assert!(raw.starts_with("<?xml"), "{raw}");
    let in_raw = identifiers.iter().filter(|id| holds(&raw, id)).count();
    assert!(in_raw > 20, "history-0.xml holds {in_raw} identifiers");

    let mut paths: Vec<String> = xml.iter().map(|x| format!("/files/{x}")).collect();
    paths.push("/files/history-1.xml?gzip=1&chunked=1".into());
    paths.push("/files/cb-healthy-F.xml?br=1".into());
    let saved = m.w.path("masked.xml");
    for path in &paths {
        let (body, head) = curl(&m, &["--compressed", &format!("https://{UP}{path}")]);
        assert!(head.starts_with("HTTP/2 200"), "{path}: {head}\n{body}");
        assert!(
            head.contains("content-type: application/fhir+xml"),
            "{path}: {head}"
        );
        scan(&identifiers, path, &body);
        scan(&identifiers, path, &xml_unescape(&body));
        assert!(body.contains("[REDACTED:NAME]"), "{path}: masked");
        assert!(body.contains("<code value=\""), "{path}: codes stay");
        std::fs::write(&saved, &body).unwrap();
        let out = Command::new("python3")
            .args(["-c", READ_XML])
            .arg(&saved)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: not well formed: {}",
            stderr(&out)
        );
        if path == "/files/history-0.xml" {
            let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
            assert_eq!(v["maiden"], "[REDACTED:EXTENSION]", "{v}");
            assert_eq!(v["race"], "2106-3", "{v}");
            // References still join: the Patient's full URL is the documents' subject.
            assert!(v["fullUrl"].is_string(), "{v}");
            assert_eq!(v["fullUrl"], v["subject"], "{v}");
        }
    }

    // The CLI on the same files: `phigate mask` takes .xml as FHIR XML.
    for x in ["history-2.xml", "cb-anaemia-M.xml"] {
        let out = Command::new(phigate_bin())
            .args(["mask", "--profile", "safe_harbor", "--policies-dir"])
            .arg(m.w.policies_dir())
            .arg(files.join(x))
            .output()
            .unwrap();
        assert!(out.status.success(), "phigate mask {x}: {}", stderr(&out));
        let body = stdout(&out);
        assert!(body.starts_with("<?xml"), "{x}: {body}");
        assert!(body.contains("[REDACTED:NAME]"), "{x}: masked");
        scan(&identifiers, &format!("phigate mask {x}"), &body);
        scan(
            &identifiers,
            &format!("phigate mask {x}"),
            &xml_unescape(&body),
        );
    }

    let mut m = m;
    let recs = m.w.wait_records("requests", paths.len());
    let xml_rows = recs
        .iter()
        .filter(|r| {
            r["response_body"]
                .as_str()
                .is_some_and(|b| b.contains("[REDACTED:EXTENSION]") && b.starts_with("<?xml"))
        })
        .count();
    assert!(xml_rows >= 6, "the masked XML bodies are in the records");
    assert!(m.w.sigterm(Duration::from_secs(20)).success());
    let rows = all_record_rows(&m);
    scan(&identifiers, "records", &rows);
    scan(&identifiers, "records", &xml_unescape(&rows));
}

/// Sealed originals: the client and every column of the records see only the masked
/// body, while `phigate audit unseal` with the reviewer's private key (made by
/// `audit keygen`, never given to the agent) returns the upstream's exact bytes; a
/// blob moved to another row, or another key, does not open.
#[test]
fn sealed_originals_open_only_with_the_review_key_and_only_in_their_row() {
    require_root();
    let review = tempfile::tempdir().unwrap();
    let phigate = |args: &[&str]| Command::new(phigate_bin()).args(args).output().unwrap();
    let out = phigate(&["audit", "keygen", "--out", review.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = review.path().join("review.key");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The agent gets the public key only (the private one stays in `review`).
    let public = tempfile::tempdir().unwrap();
    std::fs::copy(
        review.path().join("review.pub"),
        public.path().join("review.pub"),
    )
    .unwrap();
    let mut m = start_full(
        "mask-sealed",
        "[masking]\nbuffer_bytes = 16384\nrecord_body_bytes = 1000000\n",
        &format!(
            "seal_originals_to = \"{}\"\n",
            public.path().join("review.pub").display()
        ),
    );
    // One buffered (masked whole), one streamed (larger than buffer_bytes).
    let files = ["patient.json", "bundle.json"];
    let mut ids = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let (body, head) = curl(&m, &[&format!("https://{UP}/files/{f}")]);
        assert!(head.starts_with("HTTP/2 200"), "{head}\n{body}");
        assert!(body.contains("[REDACTED:NAME]"), "{f}");
        assert_no_identifier(&m, "client", &body);
        let recs = m.w.wait_records("requests", i + 1);
        let r = &recs[i];
        let original = std::fs::read(m.w.path(&format!("files/{f}"))).unwrap();
        assert!(r["response_original_sealed"].as_str().unwrap().len() > original.len());
        assert_eq!(
            r["response_original_key_id"].as_str().unwrap().len(),
            16,
            "{r}"
        );
        ids.push((r["request_id"].as_str().unwrap().to_owned(), original));
    }
    assert!(
        std::fs::metadata(m.w.path("files/bundle.json"))
            .unwrap()
            .len()
            > 16384
    );
    assert!(m.w.sigterm(Duration::from_secs(20)).success());
    let rows = all_record_rows(&m);
    assert!(rows.contains("REDACTED:NAME"));
    assert_no_identifier(&m, "records", &rows);

    let records = m.w.records_dir();
    let unseal = |key: &std::path::Path, id: &str| {
        phigate(&[
            "audit",
            "unseal",
            "--key",
            key.to_str().unwrap(),
            "--records",
            records.to_str().unwrap(),
            "--request-id",
            id,
        ])
    };
    for (id, original) in &ids {
        let out = unseal(&key, id);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(out.stdout == *original, "{id}: not the exact upstream body");
    }
    let id = &ids[0].0;

    // Another reviewer's key does not open it, and says so.
    let other = tempfile::tempdir().unwrap();
    assert!(
        phigate(&["audit", "keygen", "--out", other.path().to_str().unwrap()])
            .status
            .success()
    );
    let out = unseal(&other.path().join("review.key"), id);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not open"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}
