//! Masking as a whole: the streaming transform on FHIR-shaped documents, its
//! agreement with the DOM reference, chunking, idempotence, fail-closed parsing.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

const PROFILE: &str = r#"
[[rule]]
path = "$..keep"
op = "keep"
[[rule]]
path = "$..name"
op = "redact"
[[rule]]
path = "$..id"
op = "pseudonymize"
[[rule]]
path = "$..reference"
op = "pseudonymize"
split_last = "/"
[[rule]]
path = "$..birthDate"
op = "generalize_date"
max_age = 89
[[rule]]
path = "$..postalCode"
op = "zip3"
[[rule]]
path = "$..age"
op = "age_cap"
[[rule]]
path = "$..photo"
op = "drop"
[[rule]]
path = "$.a[1]"
op = "drop"
[[rule]]
path = "$..b.*"
op = "partial"
keep_last = 2
[[rule]]
detector = "ssn"
op = "redact"
[[rule]]
detector = "phone"
op = "redact"
[[rule]]
detector = "email"
op = "redact"
[[rule]]
detector = "date"
op = "generalize_date"
[[header]]
name = "x-patient-name"
op = "redact"
entity = "NAME"
"#;

fn profile() -> Arc<Profile> {
    Arc::new(Profile::parse(Path::new("/p/profiles/test.toml"), PROFILE).unwrap())
}

fn ctx() -> Arc<MaskContext> {
    Arc::new(MaskContext {
        pseudonyms: Arc::new(Pseudonymizer::with_key([9; 32])),
        year: 2026,
    })
}

fn stream(p: &Arc<Profile>, kind: BodyKind, input: &[u8]) -> Result<Vec<u8>, MaskError> {
    mask_body(p, &ctx(), kind, None, input).map(|(o, _)| o)
}

fn stream_chunked(
    p: &Arc<Profile>,
    kind: BodyKind,
    input: &[u8],
    cuts: &[usize],
) -> Result<Vec<u8>, MaskError> {
    let mut m = BodyMasker::new(p.clone(), ctx(), kind, None)?;
    let mut out = Vec::new();
    let mut last = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.sort();
    for c in cuts {
        m.push(&input[last..c], &mut out)?;
        last = c;
    }
    m.push(&input[last..], &mut out)?;
    m.finish(&mut out)?;
    Ok(out)
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "pat-12345",
        "name": [{"family": "Doe", "given": ["Jane", "Q"]}],
        "birthDate": "1970-05-12",
        "address": [{"line": ["1 Main St"], "postalCode": "02139-4307"}],
        "photo": [{"data": "aGVsbG8="}],
        "text": {"div": "<div>Jane Doe, SSN 123-45-6789, call (617) 555-0123 or jane@example.org; seen 2020-03-05</div>"},
        "age": 95,
        "managingOrganization": {"reference": "Organization/org-1"},
        "keep": {"note": "123-45-6789"},
        "active": true,
        "deceasedBoolean": false,
        "multipleBirthInteger": 1
    })
}

#[test]
fn a_patient_is_masked() {
    let p = profile();
    let input = serde_json::to_vec_pretty(&patient()).unwrap();
    let (out, counts) = mask_body(&p, &ctx(), BodyKind::Json, None, &input).unwrap();
    let v: Value = serde_json::from_slice(&out).expect("valid JSON");
    let ps = Pseudonymizer::with_key([9; 32]);
    assert_eq!(v["id"], ps.pseudonym("pat-12345"));
    assert_eq!(
        v["name"],
        json!([{"family": "[REDACTED:NAME]", "given": ["[REDACTED:NAME]", "[REDACTED:NAME]"]}])
    );
    assert_eq!(v["birthDate"], "1970");
    assert_eq!(v["address"][0]["postalCode"], "021");
    assert!(v.get("photo").is_none(), "dropped");
    assert_eq!(
        v["text"]["div"],
        "<div>Jane Doe, SSN [REDACTED:SSN], call [REDACTED:PHONE] or [REDACTED:EMAIL]; seen 2020</div>"
    );
    assert_eq!(v["age"], 90);
    assert_eq!(
        v["managingOrganization"]["reference"],
        format!("Organization/{}", ps.pseudonym("org-1"))
    );
    assert_eq!(
        v["keep"]["note"], "123-45-6789",
        "keep exempts from detectors"
    );
    assert_eq!(v["active"], true);
    assert_eq!(v["multipleBirthInteger"], 1);
    let c = counts.by_entity(&p);
    assert_eq!(c["NAME"], 3);
    assert_eq!(c["SSN"], 1);
    assert_eq!(c["PHOTO"], 1);
    assert_eq!(c["DATE"], 1);
    assert!(!String::from_utf8_lossy(&out).contains("Doe\""));
}

#[test]
fn drops_keep_commas_right() {
    let p = profile();
    for (input, want) in [
        (r#"{"a":[0,1,2]}"#, r#"{"a":[0,2]}"#),
        (r#"{"a":[0,1]}"#, r#"{"a":[0]}"#),
        (r#"{"photo":1,"x":2}"#, r#"{"x":2}"#),
        (r#"{"x":2,"photo":{"a":[1,{"b":2}]}}"#, r#"{"x":2}"#),
        (r#"{"photo":1}"#, r#"{}"#),
        (r#"[{"photo":1},{"photo":[]}]"#, r#"[{},{}]"#),
        (r#"{"a":[[1],[2,3]]}"#, r#"{"a":[[1]]}"#),
    ] {
        let out = stream(&p, BodyKind::Json, input.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), want, "{input}");
    }
}

#[test]
fn ndjson_is_masked_line_by_line() {
    let p = profile();
    let input = b"{\"name\":\"A\",\"x\":1}\n\n{\"photo\":2,\"y\":\"call 617-555-0123\"}\r\n[1]\n";
    let out = stream(&p, BodyKind::Ndjson, input).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"name\":\"[REDACTED:NAME]\",\"x\":1}\n{\"y\":\"call [REDACTED:PHONE]\"}\n[1]\n"
    );
    assert!(stream(&p, BodyKind::Ndjson, b"").unwrap().is_empty());
    assert!(stream(&p, BodyKind::Ndjson, b"{\"a\":1}\n{\"a\":").is_err());
}

#[test]
fn invalid_json_fails_closed() {
    let p = profile();
    for bad in [
        &b""[..],
        b"   ",
        b"{",
        b"{\"a\":}",
        b"{\"a\" 1}",
        b"[1,]x",
        b"[1 2]",
        b"{\"a\":1}{}",
        b"{\"a\":01}",
        b"{\"a\":tru}",
        b"{\"a\":\"\x01\"}",
        b"{\"a\":\"\\x\"}",
        b"{\"a\":\"\\ud800\"}",
        b"{\"a\":\"\xff\"}",
        b"{a:1}",
        b"\"unterminated",
        b"nul",
    ] {
        let r = stream(&p, BodyKind::Json, bad);
        assert!(
            r.is_err(),
            "{:?} passed: {:?}",
            String::from_utf8_lossy(bad),
            r
        );
        // The reason never quotes the body.
        if let Err(e) = r {
            assert!(!e.to_string().contains('\u{1}'));
        }
    }
}

#[test]
fn a_value_longer_than_the_limit_is_refused_when_cut() {
    let p = profile();
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(5000));
    let mut m = BodyMasker::new(p.clone(), ctx(), BodyKind::Json, None)
        .unwrap()
        .max_value_bytes(1000);
    let mut out = Vec::new();
    let r = big
        .as_bytes()
        .chunks(100)
        .try_for_each(|c| m.push(c, &mut out));
    assert!(r.unwrap_err().to_string().contains("longer than 1000"));
    // Redacted or dropped strings are skipped, not held: no limit applies.
    let big = format!("{{\"name\":\"{}\",\"photo\":\"{0}\"}}", "a".repeat(5000));
    let mut m = BodyMasker::new(p, ctx(), BodyKind::Json, None)
        .unwrap()
        .max_value_bytes(1000);
    let mut out = Vec::new();
    for c in big.as_bytes().chunks(100) {
        m.push(c, &mut out).unwrap();
    }
    m.finish(&mut out).unwrap();
    assert_eq!(out, br#"{"name":"[REDACTED:NAME]"}"#);
}

#[test]
fn gzip_bodies_are_decoded_then_masked() {
    use std::io::Write;
    let p = profile();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"{"name":"Jane","n":1}"#).unwrap();
    let enc = gz.finish().unwrap();
    let (out, _) = mask_body(&p, &ctx(), BodyKind::Json, Some("gzip"), &enc).unwrap();
    assert_eq!(out, br#"{"name":"[REDACTED:NAME]","n":1}"#);
    assert!(mask_body(&p, &ctx(), BodyKind::Json, Some("gzip"), b"{\"name\":1}").is_err());
}

#[test]
fn headers_are_masked() {
    let p = profile();
    let mut h = http::HeaderMap::new();
    h.insert("x-patient-name", "Jane Doe".parse().unwrap());
    h.insert("x-other", "stays".parse().unwrap());
    let mut counts = Counts::new(&p);
    mask_headers(&p, &ctx(), &mut h, &mut counts);
    assert_eq!(h["x-patient-name"], "[REDACTED:NAME]");
    assert_eq!(h["x-other"], "stays");
    assert_eq!(counts.by_entity(&p)["NAME"], 1);
}

#[test]
fn content_types() {
    for (ct, want) in [
        ("application/json", Some(BodyKind::Json)),
        (
            "application/fhir+json; fhirVersion=4.0",
            Some(BodyKind::Json),
        ),
        ("Application/JSON;charset=utf-8", Some(BodyKind::Json)),
        ("application/fhir+ndjson", Some(BodyKind::Ndjson)),
        ("application/x-ndjson", Some(BodyKind::Ndjson)),
        ("text/json", None),
        ("text/plain", None),
        ("application/jsonx", None),
    ] {
        assert_eq!(body_kind(Some(ct)), want, "{ct}");
    }
    assert_eq!(body_kind(None), None);
}

#[test]
fn escaped_keys_and_values() {
    let p = profile();
    let input = br#"{"n\u0061me":"J\u00e9\"ne","s":"\ud83d\ude00 123-45-6789","k\"q":"x"}"#;
    let out = stream(&p, BodyKind::Json, input).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["name"], "[REDACTED:NAME]");
    assert_eq!(v["s"], "\u{1f600} [REDACTED:SSN]");
    assert_eq!(v["k\"q"], "x");
}

/// Found by the `mask_json` fuzz target: the email detector stopped inside a word, so
/// the ZIP after it only became visible once the email was replaced.
#[test]
fn identifiers_uncovered_by_a_replacement_are_masked_too() {
    let p = shipped("safe_harbor");
    let input = br#""escr 5155=-0100 e@x.orela01005 xe.@5-010t'ionrg""#;
    let once = stream(&p, BodyKind::Json, input).unwrap();
    let twice = stream(&p, BodyKind::Json, &once).unwrap();
    assert_eq!(once, twice, "{}", String::from_utf8_lossy(&once));
    assert!(!String::from_utf8_lossy(&once).contains("01005"));
}

#[test]
fn nesting_is_bounded_and_invalid_utf8_fails_closed() {
    let p = profile();
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let ok = nested(super::json::MAX_DEPTH);
    assert_eq!(
        stream(&p, BodyKind::Json, ok.as_bytes()).unwrap(),
        ok.as_bytes()
    );
    // A hostile body of brackets is refused at the limit, not held in memory.
    let deep = "[".repeat(50_000_000);
    match stream(&p, BodyKind::Json, deep.as_bytes()) {
        Err(MaskError::Syntax { offset, message }) => {
            assert_eq!(offset, super::json::MAX_DEPTH as u64);
            assert!(message.contains("nested deeper"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let e = stream(&p, BodyKind::Json, b"{\"note\":\"caf\xe9 123-45-6789\"}").unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
    // Also where nothing would be masked: invalid text is never passed on.
    let e = stream(&p, BodyKind::Json, b"{\"x\":\"caf\xe9\"}").unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
}

// ---- properties over random documents ------------------------------------------------

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        (100u32..665, 10u32..99, 1000u32..9999)
            .prop_map(|(a, g, s)| format!("{a:03}-{g:02}-{s:04}")),
        ("[a-z]{3,8}", "[a-z]{3,8}").prop_map(|(u, d)| format!("{u}@{d}.org")),
        (200u32..999, 200u32..999, 1000u32..9999).prop_map(|(a, e, n)| format!("({a}) {e}-{n}")),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z ]{0,12}",
        2 => secret().prop_map(|s| format!("note {s} end")),
        1 => secret(),
        1 => "\\PC{0,8}",
        1 => "[0-9\\-/:T]{0,12}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("name"),
        Just("id"),
        Just("birthDate"),
        Just("postalCode"),
        Just("age"),
        Just("photo"),
        Just("reference"),
        Just("a"),
        Just("b"),
        Just("text"),
        Just("value"),
        Just("k\"\\q\u{e9}"),
    ]
    .prop_map(str::to_owned)
}

fn doc() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        // Short binary fractions: serde_json's default float parsing (the DOM side)
        // is not exact for every long decimal.
        any::<i32>().prop_map(|n| json!(f64::from(n) / 64.0)),
        (0u32..130).prop_map(|n| json!(n)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 80, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn secrets_in(v: &Value, out: &mut Vec<String>) {
    let re = regex::Regex::new(
        r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[a-z]+@[a-z]+\.org|\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
    )
    .unwrap();
    match v {
        Value::String(s) => out.extend(re.find_iter(s).map(|m| m.as_str().to_owned())),
        Value::Array(a) => a.iter().for_each(|x| secrets_in(x, out)),
        Value::Object(m) => m.values().for_each(|x| secrets_in(x, out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// The stream and the DOM reference agree; the output is valid JSON.
    #[test]
    fn stream_agrees_with_the_dom_reference(v in doc()) {
        let p = profile();
        let input = serde_json::to_vec(&v).unwrap();
        let out = stream(&p, BodyKind::Json, &input).unwrap();
        let got: Value = serde_json::from_slice(&out).expect("valid JSON out");
        let (dom, _) = dom::mask_document(&p, &ctx(), BodyKind::Json, &input).unwrap();
        let want: Value = serde_json::from_slice(&dom).unwrap();
        prop_assert_eq!(got, want);
    }

    /// Chunk boundaries anywhere, and whitespace, change nothing.
    #[test]
    fn chunking_and_whitespace_change_nothing(v in doc(), cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let p = profile();
        let compact = serde_json::to_vec(&v).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        let whole = stream(&p, BodyKind::Json, &compact).unwrap();
        prop_assert_eq!(&stream_chunked(&p, BodyKind::Json, &compact, &cuts).unwrap(), &whole);
        prop_assert_eq!(&stream_chunked(&p, BodyKind::Json, &pretty, &cuts).unwrap(), &whole);
    }

    /// Masking masked output changes nothing (rules that drop by array index are
    /// not idempotent by nature: the next element moves into the index).
    #[test]
    fn masking_is_idempotent(v in doc()) {
        let text = PROFILE.replace("path = \"$.a[1]\"\nop = \"drop\"", "path = \"$.a[1]\"\nop = \"redact\"");
        assert_ne!(text, PROFILE);
        let p = Arc::new(Profile::parse(Path::new("/p/profiles/test.toml"), &text).unwrap());
        let once = stream(&p, BodyKind::Json, &serde_json::to_vec(&v).unwrap()).unwrap();
        let twice = stream(&p, BodyKind::Json, &once).unwrap();
        prop_assert_eq!(String::from_utf8(twice).unwrap(), String::from_utf8(once).unwrap());
    }

    /// No identifier a detector or rule selected appears in the output.
    #[test]
    fn selected_values_never_come_out(v in doc()) {
        let p = profile();
        let mut secrets = Vec::new();
        secrets_in(&v, &mut secrets);
        let out = String::from_utf8(stream(&p, BodyKind::Json, &serde_json::to_vec(&v).unwrap()).unwrap()).unwrap();
        for s in secrets {
            prop_assert!(!out.contains(&s), "{} leaked in {}", s, out);
        }
    }

    /// NDJSON of random documents: one masked document per line, same as each alone.
    #[test]
    fn ndjson_equals_documents_alone(docs in prop::collection::vec(doc(), 0..5)) {
        let p = profile();
        let mut input = Vec::new();
        let mut want = Vec::new();
        for d in &docs {
            let line = serde_json::to_vec(d).unwrap();
            input.extend_from_slice(&line);
            input.push(b'\n');
            want.extend(stream(&p, BodyKind::Json, &line).unwrap());
            want.push(b'\n');
        }
        prop_assert_eq!(stream(&p, BodyKind::Ndjson, &input).unwrap(), want);
    }

    /// Arbitrary bytes never panic; whatever passes is valid JSON.
    #[test]
    fn arbitrary_bytes_fail_or_give_json(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let p = profile();
        if let Ok(out) = stream(&p, BodyKind::Json, &bytes) {
            prop_assert!(serde_json::from_slice::<Value>(&out).is_ok());
        }
    }
}

fn shipped(name: &str) -> Arc<Profile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    ProfileSet::load(&dir).unwrap().get(name).unwrap().clone()
}

#[test]
fn safe_harbor_on_fhir_resources() {
    let p = shipped("safe_harbor");
    let bundle = json!({
        "resourceType": "Bundle", "type": "searchset",
        "link": [{"relation": "self", "url": "https://fhir.example.org/Patient?name=Quimby"}],
        "entry": [
            {"fullUrl": "https://fhir.example.org/Patient/pt-778899",
             "resource": {
                "resourceType": "Patient", "id": "pt-778899",
                "meta": {"lastUpdated": "2024-02-03T04:05:06Z", "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
                "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Zebulon Quimby</div>"},
                "identifier": [{"use": "usual", "system": "http://hospital.example.org/mrn", "value": "MRN-4455667",
                                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}},
                               {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "321-54-9876"}],
                "name": [{"use": "official", "family": "Quimby", "given": ["Zebulon"]}],
                "telecom": [{"system": "phone", "value": "(617) 555-0142", "use": "home"},
                            {"system": "email", "value": "zq@example.net"}],
                "gender": "male",
                "birthDate": "1931-07-04",
                "address": [{"use": "home", "line": ["77 Elm Street"], "city": "Springfield", "state": "MA", "postalCode": "01103", "country": "US"}],
                "photo": [{"contentType": "image/jpeg", "data": "/9j/4AAQ"}],
                "contact": [{"name": {"family": "Quimby", "given": ["Abigail"]}, "telecom": [{"system": "phone", "value": "617-555-0199"}]}]
             }},
            {"resource": {
                "resourceType": "Observation", "id": "obs-1", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4", "display": "Blood pressure"}], "text": "BP"},
                "subject": {"reference": "Patient/pt-778899", "display": "Zebulon Quimby"},
                "effectiveDateTime": "2023-11-09T08:30:00-05:00",
                "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
                "valueString": "Called 617-555-0142; SSN 321-54-9876 on file; portal https://portal.example.org/u/zq from 10.2.3.4"
            }},
            {"resource": {
                "resourceType": "Coverage", "id": "cov-1", "status": "active",
                "subscriberId": "SUB-99887766",
                "beneficiary": {"reference": "Patient/pt-778899"},
                "payor": [{"display": "Acme Health"}],
                "class": [{"type": {"coding": [{"code": "group"}]}, "value": "GRP-5566", "name": "Acme Gold"}]
            }}
        ]
    });
    let input = serde_json::to_vec(&bundle).unwrap();
    let (out, counts) = mask_body(&p, &ctx(), BodyKind::Json, None, &input).unwrap();
    let text = String::from_utf8(out.clone()).unwrap();
    for secret in [
        "pt-778899",
        "Quimby",
        "Zebulon",
        "Abigail",
        "MRN-4455667",
        "321-54-9876",
        "555-0142",
        "555-0199",
        "zq@example.net",
        "1931",
        "07-04",
        "77 Elm",
        "Springfield",
        "01103",
        "/9j/4AAQ",
        "SUB-99887766",
        "GRP-5566",
        "portal.example.org",
        "10.2.3.4",
        "11-09",
        "08:30",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let v: Value = serde_json::from_slice(&out).unwrap();
    let pt = &v["entry"][0]["resource"];
    assert_eq!(pt["birthDate"], "[REDACTED:AGE_OVER_89]");
    assert_eq!(pt["address"][0]["postalCode"], "011");
    assert_eq!(pt["address"][0]["state"], "MA");
    assert_eq!(pt["gender"], "male");
    assert_eq!(
        pt["identifier"][0]["system"],
        "http://hospital.example.org/mrn"
    );
    assert!(pt.get("photo").is_none());
    let obs = &v["entry"][1]["resource"];
    assert_eq!(obs["code"]["coding"][0]["code"], "55284-4");
    assert_eq!(obs["code"]["coding"][0]["display"], "Blood pressure");
    assert_eq!(obs["effectiveDateTime"], "2023");
    assert_eq!(obs["valueQuantity"]["value"], 120);
    assert_eq!(obs["valueQuantity"]["code"], "mm[Hg]");
    // The patient's id and the reference to it are the same pseudonym: joins work.
    let ps = Pseudonymizer::with_key([9; 32]);
    assert_eq!(pt["id"], ps.pseudonym("pt-778899"));
    assert_eq!(
        obs["subject"]["reference"],
        format!("Patient/{}", ps.pseudonym("pt-778899"))
    );
    let c = counts.by_entity(&p);
    for e in [
        "NAME",
        "TELECOM",
        "PHOTO",
        "NARRATIVE",
        "SSN",
        "PHONE",
        "URL",
        "IP",
        "ZIP",
        "BIRTHDATE",
    ] {
        assert!(c.get(e).copied().unwrap_or(0) > 0, "{e}: {c:?}");
    }

    let billing = shipped("minimum_necessary_billing");
    let (out, _) = mask_body(&billing, &ctx(), BodyKind::Json, None, &input).unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    let pt = &v["entry"][0]["resource"];
    assert!(pt.get("name").is_none() && pt.get("telecom").is_none());
    assert_eq!(
        pt["address"][0],
        json!({"use": "home", "state": "MA", "postalCode": "011", "country": "US"})
    );
    assert_eq!(
        v["entry"][1]["resource"]["effectiveDateTime"],
        "2023-11-09T08:30:00-05:00"
    );
    assert_eq!(v["entry"][2]["resource"]["class"][0]["value"], "GRP-5566");
}
