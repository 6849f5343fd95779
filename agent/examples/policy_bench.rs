//! `cargo xtask bench policy` runs this: decide() latency with 200 generated policies,
//! for a request seen for the first time and for a repeat (remembered), beside the
//! peer: the same requests through plain `cedar_policy::Authorizer::
//! is_authorized` on the whole set, with the Cedar request and entities built once
//! beforehand (Cedar's own evaluation cost, without phigate's per-request building,
//! prefilter and obligations).

use std::time::Instant;

use phigate::identity::token::TokenIdentity;
use phigate::identity::Workload;
use phigate::policy::{AccessRequest, Clock, PolicySet, SCHEMA_FILE};

const POLICIES: usize = 200;
const ITERATIONS: usize = 20_000;

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        root.join("policies").join(SCHEMA_FILE),
        dir.path().join(SCHEMA_FILE),
    )
    .expect("schema");
    std::fs::copy(
        root.join("policies/fhir.cedar"),
        dir.path().join("fhir.cedar"),
    )
    .expect("shipped policies");
    // Realistic variety: per-team permits on paths, units, users, groups, claims, hours.
    let mut text = String::new();
    let shipped = PolicySet::load(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .len();
    for i in 0..POLICIES - shipped {
        text.push_str(&match i % 4 {
            0 => format!("@id(\"g{i}\")\n@mask(\"m{i}\")\npermit (principal, action in Phigate::Action::\"read\", resource == Phigate::Destination::\"api-{i}\")\nwhen {{ context has token && context.token.groups.contains(\"team-{i}\") && context.path like \"/fhir/R{i}/*\" }};\n"),
            1 => format!("@id(\"u{i}\")\npermit (principal, action == Phigate::Action::\"GET\", resource)\nwhen {{ principal.unit == \"svc-{i}.service\" && principal.user == \"svc{i}\" && context.path == \"/export/{i}\" }};\n"),
            2 => format!("@id(\"h{i}\")\nforbid (principal, action, resource == Phigate::Destination::\"api-{i}\")\nwhen {{ context.hour < 6 && !(context has token && context.token.groups.contains(\"oncall\")) }};\n"),
            _ => format!("@id(\"q{i}\")\npermit (principal, action == Phigate::Action::\"GET\", resource)\nwhen {{ context.query.hasTag(\"_type\") && context.query.getTag(\"_type\").contains(\"T{i}\") && context has token && context.token.hasTag(\"client_id\") && context.token.getTag(\"client_id\") == \"c{i}\" }};\n"),
        });
    }
    std::fs::write(dir.path().join("generated.cedar"), text).expect("write policies");
    let set = PolicySet::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.len(), POLICIES);

    let workload = Workload {
        pid: 4242,
        uid: 1000,
        user: Some("ehr".into()),
        systemd_unit: Some("ehr.service".into()),
        exe_path: Some("/usr/bin/ehr".into()),
        exe_sha256: Some("ab".repeat(32)),
        comm: "ehr".into(),
        ..Workload::default()
    };
    let token = TokenIdentity {
        issuer: "https://idp.test".into(),
        subject: "dr-alice".into(),
        groups: vec!["clinicians".into(), "staff".into()],
        expires_at: 2_000_000_000,
        claims: [("client_id".to_owned(), "ehr".to_owned())].into(),
        person: None,
    };
    let query = vec![("_count".to_owned(), "10".to_owned())];
    let headers = vec![("x-purpose".to_owned(), "treatment".to_owned())];
    let req = AccessRequest {
        workload: &workload,
        token: Some(&token),
        token_error: None,
        destination: "patients-api",
        method: "GET",
        path: "/fhir/Patient/123",
        query: &query,
        headers: &headers,
        host: Some("patients.example.org"),
        sni: Some("patients.example.org"),
        clock: Clock {
            hour: 14,
            minute: 30,
            weekday: 2,
        },
        has_approval: false,
    };
    assert!(set.decide(&req).allowed, "the benchmark request is allowed");

    // A request seen for the first time (each has its own path, so none is
    // remembered: this is the cost the target is about), and a repeat (answered by
    // the decision memo).
    let paths: Vec<String> = (0..ITERATIONS + 1000)
        .map(|i| format!("/fhir/Patient/{i}"))
        .collect();
    let mut next = paths.iter();
    let first = measure(|| {
        let path = next.next().expect("a path per decision");
        let fresh = AccessRequest { path, ..req };
        std::hint::black_box(set.decide(std::hint::black_box(&fresh)));
    });
    let repeat = measure(|| {
        std::hint::black_box(set.decide(std::hint::black_box(&req)));
    });
    let (pset, cedar_req, entities) = set.cedar_parts(&req).expect("cedar request");
    let authorizer = cedar_policy::Authorizer::new();
    let peer = measure(|| {
        std::hint::black_box(authorizer.is_authorized(&cedar_req, pset, &entities));
    });
    println!("policy decision, {POLICIES} policies, {ITERATIONS} decisions each, one thread");
    println!(
        "  {:<48} {:>9} {:>9} {:>9}",
        "", "p50 us", "p99 us", "max us"
    );
    for (name, f) in [
        ("phigate decide(), first seen (build + evaluate)", first),
        ("phigate decide(), a repeat (remembered)", repeat),
        ("peer: cedar is_authorized (prebuilt request)", peer),
    ] {
        println!("  {name:<48} {:>9.1} {:>9.1} {:>9.1}", f.0, f.1, f.2);
    }
    println!("target: p99 < 20 us for phigate decide() of a request first seen");
}

/// p50, p99, max in microseconds.
fn measure(mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..1000 {
        f();
    }
    let mut samples: Vec<f64> = (0..ITERATIONS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}
