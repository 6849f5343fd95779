//! Synthetic FHIR R4 data whose identifiers are all known: for each patient a
//! Patient, a Practitioner, an Encounter, an Observation, a Condition and a Coverage,
//! with every HIPAA Safe Harbor identifier a FHIR API carries (names, addresses, ZIP,
//! dates, phone, fax, e-mail, SSN, MRN, plan and account numbers, license, NPI, MBI,
//! card, VIN, URLs, IPs, photos, narrative), in fields and inside free text.
//!
//! Deterministic (seeded); identifiers are made so they cannot occur by chance in
//! masked output (letters outside hex in names, separators in numbers; the only
//! all-digit short values, ZIP codes, are listed quoted).

use serde_json::{json, Value};

/// splitmix64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.range(0, 10) as u8))
            .collect()
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.range(0, items.len() as u64) as usize]
    }
}

const SYLLABLES: &[&str] = &[
    "zor", "qua", "vex", "lix", "tum", "rak", "yol", "quin", "zeb", "mox", "pry", "kov", "sul",
    "wix", "grum", "tov",
];

fn name(r: &mut Rng) -> String {
    let n = r.range(2, 4);
    let mut s: String = (0..n).map(|_| r.pick(SYLLABLES)).collect();
    s[..1].make_ascii_uppercase();
    s
}

fn date(r: &mut Rng, from: u64, to: u64) -> String {
    format!(
        "{}-{:02}-{:02}",
        r.range(from, to),
        r.range(1, 13),
        r.range(1, 29)
    )
}

fn luhn_digit(body: &str) -> u8 {
    // The check digit that makes body + digit Luhn-valid.
    let mut sum = 0;
    for (i, c) in body.bytes().rev().enumerate() {
        let mut d = u32::from(c - b'0');
        if i % 2 == 0 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    ((10 - sum % 10) % 10) as u8
}

fn npi(r: &mut Rng) -> String {
    let body = format!("1{}", r.digits(8));
    let d = luhn_digit(&format!("80840{body}"));
    format!("{body}{d}")
}

fn card(r: &mut Rng) -> String {
    let body = format!("4{}", r.digits(14));
    let full = format!("{body}{}", luhn_digit(&body));
    format!(
        "{} {} {} {}",
        &full[..4],
        &full[4..8],
        &full[8..12],
        &full[12..]
    )
}

fn mbi(r: &mut Rng) -> String {
    const L: &[u8] = b"ACDEFGHJKMNPQRTUVWXY";
    let l = |r: &mut Rng| char::from(L[r.range(0, L.len() as u64) as usize]);
    let d = |r: &mut Rng, lo: u64| char::from(b'0' + r.range(lo, 10) as u8);
    format!(
        "{}{}{}{}{}{}{}{}{}{}{}",
        d(r, 1),
        l(r),
        l(r),
        d(r, 0),
        l(r),
        l(r),
        d(r, 0),
        l(r),
        l(r),
        d(r, 0),
        d(r, 0)
    )
}

fn vin(r: &mut Rng) -> String {
    const C: &[u8] = b"ABCDEFGHJKLMNPRSTUVWXYZ0123456789";
    loop {
        let mut v: Vec<u8> = (0..17)
            .map(|_| C[r.range(0, C.len() as u64) as usize])
            .collect();
        let value = |c: u8| -> u32 {
            match c {
                b'0'..=b'9' => u32::from(c - b'0'),
                b'A'..=b'H' => u32::from(c - b'A') + 1,
                b'J'..=b'N' => u32::from(c - b'J') + 1,
                b'P' => 7,
                b'R'..=b'Z' => u32::from(c - b'R') + 9,
                _ => 0,
            }
        };
        const W: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];
        let sum: u32 = v.iter().zip(W).map(|(c, w)| value(*c) * w).sum();
        v[8] = match sum % 11 {
            10 => b'X',
            x => b'0' + x as u8,
        };
        let s = String::from_utf8(v).unwrap();
        if s.bytes().any(|b| b.is_ascii_digit()) && s.bytes().any(|b| b.is_ascii_alphabetic()) {
            return s;
        }
    }
}

/// One patient's resources and the identifier strings in them.
pub struct PatientRecords {
    pub id: String,
    pub resources: Vec<Value>,
    /// Strings that must never reach a client or a record under `safe_harbor`.
    pub identifiers: Vec<String>,
}

/// The resources of patient `i` of a data set seeded by `seed`.
pub fn patient(seed: u64, i: u64) -> PatientRecords {
    let r = &mut Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let id = format!("pat-{i}-{}", name(r).to_lowercase());
    let family = name(r);
    let given = name(r);
    let middle = name(r);
    let contact_family = name(r);
    let contact_given = name(r);
    let pract_family = name(r);
    let pract_given = name(r);
    let ssn = format!(
        "{:03}-{:02}-{:04}",
        r.range(100, 665),
        r.range(10, 99),
        r.range(1000, 9999)
    );
    let mrn = format!("MRN-{}", r.digits(7));
    let phone = format!("({}) 555-{}", r.range(201, 989), r.digits(4));
    let fax = format!("{}-555-{}", r.range(201, 989), r.digits(4));
    let contact_phone = format!("{}.555.{}", r.range(201, 989), r.digits(4));
    let email = format!(
        "{}.{}{i}@mail{}.example",
        given.to_lowercase(),
        family.to_lowercase(),
        r.digits(3)
    );
    let street = format!("{} {} Street", r.range(10, 9999), name(r));
    let city = format!("{}ville", name(r));
    let zip = loop {
        let z = r.digits(5);
        if !z.starts_with("00") {
            break z;
        }
    };
    let birth = date(r, 1925, 2006);
    let death_free_date = date(r, 2015, 2025);
    let enc_start = format!(
        "{}T{:02}:{:02}:00Z",
        date(r, 2018, 2025),
        r.range(0, 24),
        r.range(0, 60)
    );
    let enc_end = format!(
        "{}T{:02}:{:02}:00Z",
        date(r, 2018, 2025),
        r.range(0, 24),
        r.range(0, 60)
    );
    let onset = date(r, 2010, 2025);
    let recorded = date(r, 2010, 2025);
    let portal = format!("https://portal.example.org/~{}{i}", family.to_lowercase());
    let ip = format!(
        "10.{}.{}.{}",
        r.range(0, 256),
        r.range(0, 256),
        r.range(1, 255)
    );
    let npi = npi(r);
    let license = format!("LIC-{}", r.digits(6));
    let subscriber = format!("SUB-{}", r.digits(8));
    let group = format!("GRP-{}", r.digits(5));
    let mbi = mbi(r);
    let card = card(r);
    let vin = vin(r);
    let account = format!("{}", r.range(10_000_000, 99_999_999));
    let pre_admission = format!("PRE-{}", r.digits(6));
    let photo = format!("iVBORw0KGgoPHOTO{}", r.digits(12));
    let prac_id = format!("prac-{i}-{}", name(r).to_lowercase());
    let enc_id = format!("enc-{i}-{}", name(r).to_lowercase());
    let cov_id = format!("cov-{i}-{}", name(r).to_lowercase());
    let age = r.range(91, 104);

    let patient = json!({
        "resourceType": "Patient",
        "id": id,
        "meta": {"lastUpdated": format!("{death_free_date}T01:02:03Z"), "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{given} {family}, born {birth}, {street}</div>")},
        "identifier": [
            {"use": "usual", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "http://hospital.example.org/mrn", "value": mrn},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}, "system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn},
            {"system": "http://hl7.org/fhir/sid/us-mbi", "value": mbi}
        ],
        "active": true,
        "name": [{"use": "official", "family": family, "given": [given, middle], "prefix": ["Mx."]}],
        "telecom": [
            {"system": "phone", "value": phone, "use": "home"},
            {"system": "fax", "value": fax},
            {"system": "email", "value": email},
            {"system": "url", "value": portal}
        ],
        "gender": "female",
        "birthDate": birth,
        "address": [{"use": "home", "line": [street], "city": city, "district": format!("{} County", name(r)), "state": "MA", "postalCode": zip, "country": "US"}],
        "photo": [{"contentType": "image/png", "data": photo}],
        "contact": [{
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
            "name": {"family": contact_family, "given": [contact_given]},
            "telecom": [{"system": "phone", "value": contact_phone}]
        }],
        "generalPractitioner": [{"reference": format!("Practitioner/{prac_id}"), "display": format!("Dr. {pract_given} {pract_family}")}]
    });
    let practitioner = json!({
        "resourceType": "Practitioner",
        "id": prac_id,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": npi}],
        "name": [{"family": pract_family, "given": [pract_given]}],
        "telecom": [{"system": "phone", "value": fax}],
        "qualification": [{"identifier": [{"system": "http://example.org/license", "value": license}], "code": {"text": "MD"}}]
    });
    let subject =
        json!({"reference": format!("Patient/{id}"), "display": format!("{given} {family}")});
    let encounter = json!({
        "resourceType": "Encounter",
        "id": enc_id,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": subject,
        "participant": [{"individual": {"reference": format!("Practitioner/{prac_id}"), "display": format!("{pract_given} {pract_family}")}}],
        "period": {"start": enc_start, "end": enc_end},
        "hospitalization": {"preAdmissionIdentifier": {"value": pre_admission}}
    });
    let observation = json!({
        "resourceType": "Observation",
        "id": format!("obs-{i}-{}", name(r).to_lowercase()),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4", "display": "Blood pressure systolic and diastolic"}], "text": "Blood pressure"},
        "subject": subject,
        "encounter": {"reference": format!("Encounter/{enc_id}")},
        "effectiveDateTime": enc_start,
        "issued": enc_end,
        "performer": [{"reference": format!("Practitioner/{prac_id}"), "display": format!("{pract_given} {pract_family}")}],
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}, "valueQuantity": {"value": r.range(100, 160), "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]}, "valueQuantity": {"value": r.range(60, 100), "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
        ],
        "note": [{"text": format!("Reached patient at {phone}; SSN {ssn}, MRN: {}, NPI {npi}. Portal login from {ip}, card {card}, vehicle VIN {vin}, acct # {account}, member id {subscriber}.", &mrn[4..])}]
    });
    let condition = json!({
        "resourceType": "Condition",
        "id": format!("cond-{i}-{}", name(r).to_lowercase()),
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder"}]},
        "subject": {"reference": format!("Patient/{id}")},
        "onsetDateTime": onset,
        "onsetAge": {"value": age, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"},
        "recordedDate": recorded,
        "note": [{"text": format!("Family contact {contact_given} {contact_family} ({email}), seen {onset}.")}]
    });
    let coverage = json!({
        "resourceType": "Coverage",
        "id": cov_id,
        "status": "active",
        "subscriberId": subscriber,
        "beneficiary": {"reference": format!("Patient/{id}")},
        "dependent": "01",
        "period": {"start": recorded, "end": onset},
        "payor": [{"display": "Example Health Plan"}],
        "class": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "group"}]}, "value": group, "name": format!("{family} family plan")}]
    });
    let identifiers = vec![
        id.clone(),
        family,
        given,
        middle,
        contact_family,
        contact_given,
        pract_family,
        pract_given,
        ssn,
        mrn.clone(),
        mrn[4..].to_owned(),
        phone,
        fax,
        contact_phone,
        email,
        street,
        city,
        format!("\"{zip}\""),
        birth.clone(),
        death_free_date,
        enc_start.clone(),
        enc_start[..10].to_owned(),
        enc_end[..10].to_owned(),
        onset,
        recorded,
        portal,
        ip,
        npi,
        license,
        subscriber,
        group,
        mbi,
        card,
        vin,
        account,
        pre_admission,
        photo,
        prac_id,
        enc_id,
        cov_id,
    ];
    PatientRecords {
        id,
        resources: vec![
            patient,
            practitioner,
            encounter,
            observation,
            condition,
            coverage,
        ],
        identifiers,
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(A[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn uuid(r: &mut Rng) -> String {
    let h = format!("{:016x}{:016x}", r.next_u64(), r.next_u64());
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A complete patient history as Synthea writes it (a transaction Bundle of
/// `urn:uuid:` entries): US Core race and ethnicity, the HL7 `patient-mothersMaidenName`
/// and `patient-birthPlace` extensions, a birth time on `_birthDate`, a geolocated
/// address, a relative as contact, narratives, a base64 clinical note
/// (DocumentReference), a report's presented form, a Binary, a Media photo, a Claim
/// and an ExplanationOfBenefit. The MRN is reused as the Patient's id.
pub fn history(seed: u64, i: u64) -> PatientRecords {
    let r = &mut Rng::new(seed.wrapping_mul(7_000_003).wrapping_add(i));
    let mrn = format!("mrn{}", r.digits(8));
    let (family, given, maiden) = (name(r), name(r), name(r));
    let (relative_family, relative_given, doctor) = (name(r), name(r), name(r));
    let (birth_city, city) = (format!("{}burg", name(r)), format!("{}field", name(r)));
    let street = format!("{} {} Way", r.range(10, 9999), name(r));
    let zip = format!("{}{}", r.range(1, 9), r.digits(4));
    let ssn = format!("999-{:02}-{:04}", r.range(10, 99), r.range(1000, 9999));
    let license = format!("S{}", r.digits(8));
    let passport = format!("X{}X", r.digits(8));
    let phone = format!("555-{}-{}", r.digits(3), r.digits(4));
    let birth = date(r, 1940, 2000);
    let birth_time = format!(
        "{birth}T{:02}:{:02}:00-05:00",
        r.range(0, 24),
        r.range(0, 60)
    );
    let visit = date(r, 2015, 2025);
    let visit_time = format!(
        "{visit}T{:02}:{:02}:00-04:00",
        r.range(8, 18),
        r.range(0, 60)
    );
    let (lat, lon) = (
        format!("42.{}", r.digits(6)),
        format!("-71.{}", r.digits(6)),
    );
    let (pid, eid, did, bid, mid, cid, xid) = (
        mrn.clone(),
        uuid(r),
        uuid(r),
        uuid(r),
        uuid(r),
        uuid(r),
        uuid(r),
    );
    let dalys = format!("{}.{}", r.range(1, 30), r.digits(6));
    let note = format!("{given} {family} (MRN {mrn}, born {birth}) was seen on {visit} by Dr. {doctor}. Mother: {maiden}. Phone {phone}.");
    let note64 = base64(note.as_bytes());
    let pdf64 = base64(format!("%PDF-1.4 report for {given} {family} {ssn}").as_bytes());
    let photo64 = base64(format!("JFIF photo of {given} {family}").as_bytes());
    let narrative = |s: &str| json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{s}</div>")});
    let subject =
        json!({"reference": format!("urn:uuid:{pid}"), "display": format!("{given} {family}")});
    let patient = json!({
        "resourceType": "Patient", "id": pid,
        "meta": {"profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "text": narrative(&format!("Generated by Synthea. {given} {family}, born {birth} in {birth_city}")),
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
                {"url": "text", "valueString": "White"}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5", "display": "Not Hispanic or Latino"}},
                {"url": "text", "valueString": "Not Hispanic or Latino"}]},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName", "valueString": format!("{maiden} {relative_family}")},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": birth_city, "state": "Massachusetts", "country": "US"}},
            {"url": "http://synthetichealth.github.io/synthea/disability-adjusted-life-years", "valueDecimal": dalys.parse::<f64>().unwrap()}
        ],
        "identifier": [
            {"system": "https://github.com/synthetichealth/synthea", "value": pid},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "http://hospital.smarthealthit.org", "value": mrn},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]}, "system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "DL"}]}, "system": "urn:oid:2.16.840.1.113883.4.3.25", "value": license},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PPN"}]}, "system": "http://hl7.org/fhir/sid/passport-USA", "value": passport}
        ],
        "name": [{"use": "official", "family": family, "given": [given], "prefix": ["Mrs."]},
                 {"use": "maiden", "family": maiden, "given": [given]}],
        "telecom": [{"system": "phone", "value": phone, "use": "home"}],
        "gender": "female",
        "birthDate": birth,
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": birth_time}]},
        "address": [{"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
                        {"url": "latitude", "valueDecimal": lat.parse::<f64>().unwrap()},
                        {"url": "longitude", "valueDecimal": lon.parse::<f64>().unwrap()}]}],
                     "line": [street], "city": city, "state": "MA", "postalCode": zip, "country": "US"}],
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M", "display": "Married"}], "text": "Married"},
        "multipleBirthBoolean": false,
        "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
                     "name": {"family": relative_family, "given": [relative_given]},
                     "telecom": [{"system": "phone", "value": phone}]}],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en-US", "display": "English"}], "text": "English"}}]
    });
    let encounter = json!({
        "resourceType": "Encounter", "id": eid, "status": "finished",
        "text": narrative(&format!("Visit of {given} {family} on {visit}")),
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185345009", "display": "Encounter for symptom"}], "text": "Encounter for symptom"}],
        "subject": subject,
        "participant": [{"individual": {"reference": format!("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|{}", npi(r)), "display": format!("Dr. {doctor}")}}],
        "period": {"start": visit_time, "end": visit_time},
        "serviceProvider": {"reference": "Organization?identifier=https://github.com/synthetichealth/synthea|ef58ea08", "display": format!("{city} Medical Center")}
    });
    let document = json!({
        "resourceType": "DocumentReference", "id": did, "status": "superseded",
        "type": {"coding": [{"system": "http://loinc.org", "code": "34117-2", "display": "History and physical note"}]},
        "subject": {"reference": format!("urn:uuid:{pid}")},
        "date": visit_time,
        "author": [{"reference": format!("urn:uuid:{eid}"), "display": format!("Dr. {doctor}")}],
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8", "data": note64, "title": format!("Note for {family}")}}],
        "context": {"encounter": [{"reference": format!("urn:uuid:{eid}")}], "period": {"start": visit_time, "end": visit_time}}
    });
    let report = json!({
        "resourceType": "DiagnosticReport", "id": uuid(r), "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]},
        "subject": {"reference": format!("urn:uuid:{pid}")},
        "effectiveDateTime": visit_time, "issued": visit_time,
        "presentedForm": [{"contentType": "application/pdf", "data": pdf64}]
    });
    let binary = json!({"resourceType": "Binary", "id": bid, "contentType": "application/pdf", "data": pdf64});
    let media = json!({
        "resourceType": "Media", "id": mid, "status": "completed",
        "subject": {"reference": format!("urn:uuid:{pid}")},
        "createdDateTime": visit_time,
        "content": {"contentType": "image/jpeg", "data": photo64, "url": format!("https://pacs.example.org/{mrn}.jpg")}
    });
    let claim = json!({
        "resourceType": "Claim", "id": cid, "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim",
        "patient": subject,
        "billablePeriod": {"start": visit_time, "end": visit_time},
        "created": visit_time,
        "provider": {"reference": "Organization?identifier=x|ef58ea08", "display": format!("{city} Medical Center")},
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": true, "coverage": {"display": format!("Policy of {family}")}}],
        "item": [{"sequence": 1, "productOrService": {"coding": [{"system": "http://snomed.info/sct", "code": "185345009"}]}, "net": {"value": 129.16, "currency": "USD"}}],
        "total": {"value": 129.16, "currency": "USD"}
    });
    let eob = json!({
        "resourceType": "ExplanationOfBenefit", "id": xid, "status": "active",
        "identifier": [{"system": "https://bluebutton.cms.gov/resources/variables/clm_id", "value": format!("clm{}", r.digits(9))}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim",
        "patient": {"reference": format!("urn:uuid:{pid}")},
        "billablePeriod": {"start": visit_time},
        "created": visit_time,
        "insurer": {"display": "Medicare"},
        "provider": {"reference": format!("urn:uuid:{eid}")},
        "claim": {"reference": format!("urn:uuid:{cid}")},
        "outcome": "complete",
        "insurance": [{"focal": true, "coverage": {"reference": "Coverage/cov1", "display": format!("Plan of {given} {family}")}}],
        "payment": {"date": visit, "amount": {"value": 103.33, "currency": "USD"}}
    });
    let mut identifiers = vec![
        mrn,
        family,
        given,
        maiden,
        relative_family,
        relative_given,
        doctor,
        birth_city,
        city,
        street,
        format!("\"{zip}\""),
        ssn,
        license,
        passport,
        phone,
        birth,
        birth_time,
        visit,
        visit_time,
        lat,
        lon,
        dalys,
        note64,
        pdf64,
        photo64,
        eid,
        did,
        bid,
        mid,
        cid,
        xid,
    ];
    identifiers.retain(|s| !s.is_empty());
    PatientRecords {
        id: pid,
        resources: vec![
            patient, encounter, document, report, binary, media, claim, eob,
        ],
        identifiers,
    }
}

/// Patient `i`'s history as a Synthea transaction Bundle (`urn:uuid:` full URLs).
pub fn history_bundle(seed: u64, i: u64) -> (Value, Vec<String>) {
    let h = history(seed, i);
    let entries: Vec<Value> = h
        .resources
        .iter()
        .map(|res| {
            let t = res["resourceType"].as_str().unwrap();
            json!({"fullUrl": format!("urn:uuid:{}", res["id"].as_str().unwrap()), "resource": res,
                   "request": {"method": "POST", "url": t}})
        })
        .collect();
    (
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        h.identifiers,
    )
}

/// A searchset Bundle of `patients` patients' resources.
pub fn bundle(seed: u64, patients: u64) -> (Value, Vec<String>) {
    let mut entries = Vec::new();
    let mut ids = Vec::new();
    for i in 0..patients {
        let p = patient(seed, i);
        for res in p.resources {
            let url = format!(
                "https://fhir.example.test/fhir/{}/{}",
                res["resourceType"].as_str().unwrap(),
                res["id"].as_str().unwrap()
            );
            entries.push(json!({"fullUrl": url, "resource": res, "search": {"mode": "match"}}));
        }
        ids.extend(p.identifiers);
    }
    let b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "link": [{"relation": "self", "url": "https://fhir.example.test/fhir/Patient?_count=1000"}],
        "entry": entries
    });
    (b, ids)
}

/// Compact JSON as FHIR servers write it: `resourceType` first in a resource, `url`
/// first in an extension (serde_json alone sorts members by name).
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_fhir(v, &mut out);
    out
}

/// [`to_vec`], indented.
pub fn to_vec_pretty(v: &Value) -> Vec<u8> {
    // Re-indenting through serde_json would sort again: indent the ordered text.
    let mut out = Vec::new();
    let text = to_vec(v);
    let mut depth = 0usize;
    let mut in_str = false;
    let mut esc = false;
    for &b in &text {
        if in_str {
            out.push(b);
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                out.push(b);
            }
            b'{' | b'[' => {
                depth += 1;
                out.push(b);
                out.push(b'\n');
                out.extend(std::iter::repeat_n(b' ', depth * 2));
            }
            b'}' | b']' => {
                depth -= 1;
                out.push(b'\n');
                out.extend(std::iter::repeat_n(b' ', depth * 2));
                out.push(b);
            }
            b',' => {
                out.push(b);
                out.push(b'\n');
                out.extend(std::iter::repeat_n(b' ', depth * 2));
            }
            b':' => out.extend_from_slice(b": "),
            _ => out.push(b),
        }
    }
    out
}

fn write_fhir(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            out.push(b'{');
            let first = ["resourceType", "url"];
            let ordered = first
                .iter()
                .filter_map(|k| map.get_key_value(*k))
                .chain(map.iter().filter(|(k, _)| !first.contains(&k.as_str())));
            for (i, (k, c)) in ordered.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).unwrap();
                out.push(b':');
                write_fhir(c, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, c) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_fhir(c, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).unwrap(),
    }
}

/// A Bundle of about `bytes` bytes (compact JSON).
pub fn bundle_of_size(seed: u64, bytes: usize) -> Vec<u8> {
    let per = serde_json::to_vec(&bundle(seed, 4).0).unwrap().len() / 4;
    let (b, _) = bundle(seed, (bytes / per).max(1) as u64);
    to_vec(&b)
}

/// A bulk-export NDJSON stream of about `bytes` bytes, written to `w`.
pub fn ndjson_of_size(seed: u64, bytes: usize, w: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut written = 0;
    let mut i = 0;
    while written < bytes {
        for res in patient(seed, i).resources {
            let line = to_vec(&res);
            w.write_all(&line)?;
            w.write_all(b"\n")?;
            written += line.len() + 1;
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_in_the_data_and_valid() {
        let (b, ids) = bundle(7, 3);
        let text = serde_json::to_string(&b).unwrap();
        for id in &ids {
            assert!(text.contains(id.as_str()), "{id} not in the data");
        }
        let mut r = Rng::new(1);
        for _ in 0..50 {
            let n = npi(&mut r);
            let digits = format!("80840{n}");
            let mut sum = 0;
            for (i, c) in digits.bytes().rev().enumerate() {
                let mut d = u32::from(c - b'0');
                if i % 2 == 1 {
                    d *= 2;
                    if d > 9 {
                        d -= 9;
                    }
                }
                sum += d;
            }
            assert_eq!(sum % 10, 0, "{n}");
        }
        assert_eq!(
            patient(7, 1).identifiers,
            patient(7, 1).identifiers,
            "deterministic"
        );
    }
}
