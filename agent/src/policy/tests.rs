use super::*;

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn shipped_schema() -> String {
    std::fs::read_to_string(shipped_dir().join(SCHEMA_FILE)).unwrap()
}

/// A policy directory holding the shipped schema and `files`.
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SCHEMA_FILE), shipped_schema()).unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

fn workload(user: &str, unit: &str) -> Workload {
    Workload {
        pid: 4242,
        uid: 1000,
        user: Some(user.into()),
        systemd_unit: (!unit.is_empty()).then(|| unit.to_owned()),
        comm: "curl".into(),
        ..Workload::default()
    }
}

fn token(groups: &[&str]) -> TokenIdentity {
    TokenIdentity {
        issuer: "https://idp.test".into(),
        subject: "dr-alice".into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        expires_at: 2_000_000_000,
        claims: [("client_id".to_owned(), "ehr".to_owned())].into(),
        person: None,
    }
}

const NOON_MON: Clock = Clock {
    hour: 12,
    minute: 0,
    weekday: 1,
};

struct Case<'a> {
    workload: Workload,
    token: Option<TokenIdentity>,
    token_error: Option<TokenError>,
    method: &'a str,
    path: &'a str,
    query: Vec<(String, String)>,
    clock: Clock,
}

impl Case<'_> {
    fn decide(&self, set: &PolicySet) -> Decision {
        set.decide(&AccessRequest {
            workload: &self.workload,
            token: self.token.as_ref(),
            token_error: self.token_error,
            destination: "patients-api",
            method: self.method,
            path: self.path,
            query: &self.query,
            headers: &[],
            clock: self.clock,
            host: None,
            sni: None,
            has_approval: false,
        })
    }
}

fn case<'a>(w: Workload, t: Option<TokenIdentity>, method: &'a str, path: &'a str) -> Case<'a> {
    Case {
        workload: w,
        token: t,
        token_error: None,
        method,
        path,
        query: Vec::new(),
        clock: NOON_MON,
    }
}

#[test]
fn clinicians_reading_off_hours_need_an_approval() {
    let set = PolicySet::load(&shipped_dir()).unwrap_or_else(|e| panic!("{e}"));
    let mut c = case(
        workload("ehr", "ehr.service"),
        Some(token(&["clinicians"])),
        "GET",
        "/fhir/Patient/123",
    );
    c.clock = Clock {
        hour: 22,
        minute: 30,
        weekday: 3,
    };
    let d = c.decide(&set);
    assert!(d.allowed, "{d:?}");
    assert_eq!(
        d.policy_ids,
        ["clinicians.off-hours", "clinicians.read-clinical"]
    );
    assert_eq!(d.mask_profile.as_deref(), Some("clinical"));
    assert_eq!(d.approval_rule.as_deref(), Some("off_hours"));
    // Off hours does not widen what clinicians may read.
    c.path = "/fhir/Coverage/9";
    assert!(!c.decide(&set).allowed);
}

#[test]
fn shipped_policies_load_and_decide() {
    let set = PolicySet::load(&shipped_dir()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.len(), 9);
    assert_eq!(set.hash().len(), 64);
    let app = || workload("ehr", "ehr.service");
    let job = || workload("fhir-export", "fhir-export.service");
    let clin = || Some(token(&["clinicians"]));
    let bill = || Some(token(&["billing"]));
    // (case, allowed, reason, policy ids, mask, approval)
    type Row<'a> = (
        Case<'a>,
        bool,
        Reason,
        &'a [&'a str],
        Option<&'a str>,
        Option<&'a str>,
    );
    let table: Vec<Row> = vec![
        (
            case(app(), clin(), "GET", "/fhir/Patient/123"),
            true,
            Reason::Permitted,
            &["clinicians.read-clinical"],
            Some("clinical"),
            None,
        ),
        (
            case(app(), clin(), "HEAD", "/fhir/Observation"),
            true,
            Reason::Permitted,
            &["clinicians.read-clinical"],
            Some("clinical"),
            None,
        ),
        (
            case(app(), clin(), "GET", "/fhir/Coverage/9"),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        // A wildcard cannot be widened: a longer type name, an operation.
        (
            case(app(), clin(), "GET", "/fhir/PatientSecrets"),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        (
            case(app(), clin(), "GET", "/fhir/Patient/$export"),
            false,
            Reason::Forbidden,
            &["patients-api.no-unnamed-operations"],
            None,
            None,
        ),
        (
            case(app(), clin(), "GET", "/fhir/Patient/1/$everything"),
            false,
            Reason::Forbidden,
            &["patients-api.no-unnamed-operations"],
            None,
            None,
        ),
        (
            case(app(), clin(), "POST", "/fhir/Patient"),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        (
            case(app(), clin(), "DELETE", "/fhir/Patient/1"),
            false,
            Reason::Forbidden,
            &["patients-api.no-delete"],
            None,
            None,
        ),
        (
            case(app(), bill(), "GET", "/fhir/Coverage/9"),
            true,
            Reason::Permitted,
            &["billing.read-coverage"],
            Some("minimum_necessary_billing"),
            None,
        ),
        (
            case(app(), bill(), "GET", "/fhir/Patient/123"),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        (
            case(app(), None, "GET", "/fhir/Patient/123"),
            false,
            Reason::TokenRequired(TokenError::Missing),
            &["patients-api.token-required"],
            None,
            None,
        ),
        (
            case(job(), None, "GET", "/fhir/Patient/$export"),
            true,
            Reason::Permitted,
            &["export-job.bulk-export"],
            Some("safe_harbor"),
            Some("bulk_export"),
        ),
        (
            case(job(), None, "GET", "/fhir/Patient/123"),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        (
            // The right unit under the wrong user is not the job.
            case(
                workload("mallory", "fhir-export.service"),
                None,
                "GET",
                "/fhir/Patient/$export",
            ),
            false,
            Reason::NoPermit,
            &[],
            None,
            None,
        ),
        (
            case(app(), clin(), "TRACE", "/fhir/Patient"),
            false,
            Reason::Forbidden,
            &["all.no-other-methods"],
            None,
            None,
        ),
    ];
    for (i, (c, allowed, reason, ids, mask, approval)) in table.iter().enumerate() {
        let d = c.decide(&set);
        let what = format!("case {i}: {} {} -> {d:?}", c.method, c.path);
        assert_eq!(d.allowed, *allowed, "{what}");
        assert_eq!(&d.reason, reason, "{what}");
        assert_eq!(d.policy_ids, ids.to_vec(), "{what}");
        assert_eq!(d.mask_profile.as_deref(), *mask, "{what}");
        assert_eq!(d.approval_rule.as_deref(), *approval, "{what}");
        assert!(d.errors.is_empty(), "{what}");
    }
}

#[test]
fn token_required_carries_the_validation_failure() {
    let set = PolicySet::load(&shipped_dir()).unwrap();
    let mut c = case(workload("ehr", ""), None, "GET", "/fhir/Patient/1");
    c.token_error = Some(TokenError::Expired);
    let d = c.decide(&set);
    assert_eq!(d.reason, Reason::TokenRequired(TokenError::Expired));
    assert_eq!(d.policy_ids, ["patients-api.token-required"]);
}

#[test]
fn context_query_headers_time_and_claims() {
    let d = dir_with(&[(
        "p.cedar",
        r#"
@id("search-by-type")
permit (principal, action == Phigate::Action::"GET", resource)
when {
  context.query.hasTag("_type") && context.query.getTag("_type") == ["Patient"] &&
  context.headers.hasTag("x-purpose") && context.headers.getTag("x-purpose").contains("treatment") &&
  context.hour >= 8 && context.hour < 18 && context.weekday != "Sun" &&
  context has token && context.token.hasTag("client_id") && context.token.getTag("client_id") == "ehr"
};
"#,
    )]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let w = workload("ehr", "");
    let t = token(&[]);
    let q = vec![("_type".to_owned(), "Patient".to_owned())];
    let h = vec![("x-purpose".to_owned(), "treatment".to_owned())];
    let req = |query: &[(String, String)], clock: Clock| {
        set.decide(&AccessRequest {
            workload: &w,
            token: Some(&t),
            token_error: None,
            destination: "x",
            method: "GET",
            path: "/",
            query,
            headers: &h,
            clock,
            host: None,
            sni: None,
            has_approval: false,
        })
    };
    assert!(req(&q, NOON_MON).allowed);
    // A second value makes the set differ: not exactly ["Patient"].
    let q2 = vec![q[0].clone(), ("_type".to_owned(), "Coverage".to_owned())];
    assert!(!req(&q2, NOON_MON).allowed);
    assert!(!req(&[], NOON_MON).allowed);
    let night = Clock {
        hour: 23,
        ..NOON_MON
    };
    assert!(!req(&q, night).allowed);
    let sunday = Clock {
        weekday: 7,
        ..NOON_MON
    };
    assert!(!req(&q, sunday).allowed);
}

#[test]
fn obligations_combine_or_conflict() {
    let p = |id: &str, ann: &str| {
        format!("@id(\"{id}\")\n{ann}\npermit (principal, action, resource) when {{ context.path like \"/a*\" }};\n")
    };
    let decide = |files: &[(&str, &str)], path: &str| {
        let d = dir_with(files);
        let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
        let w = workload("u", "");
        set.decide(&AccessRequest {
            workload: &w,
            token: None,
            token_error: None,
            destination: "x",
            method: "GET",
            path,
            query: &[],
            headers: &[],
            clock: NOON_MON,
            host: None,
            sni: None,
            has_approval: false,
        })
    };
    // Masked and unmasked permits: masking applies.
    let a = p("masked", "@mask(\"safe_harbor\")");
    let b = p("plain", "");
    let d = decide(&[("a.cedar", &a), ("b.cedar", &b)], "/a");
    assert!(d.allowed);
    assert_eq!(d.policy_ids, ["masked", "plain"]);
    assert_eq!(d.mask_profile.as_deref(), Some("safe_harbor"));
    // Two profiles: denied, naming both.
    let c = p("other-mask", "@mask(\"billing\")");
    let d = decide(&[("a.cedar", &a), ("c.cedar", &c)], "/a");
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::ConflictingObligations);
    assert_eq!(d.policy_ids, ["masked", "other-mask"]);
    // Same approval twice is one obligation; two different ones conflict.
    let x = p("x", "@approval(\"bulk\")");
    let y = p("y", "@approval(\"bulk\")");
    let z = p("z", "@approval(\"other\")");
    let d = decide(&[("x.cedar", &x), ("y.cedar", &y)], "/a");
    assert_eq!(d.approval_rule.as_deref(), Some("bulk"));
    let d = decide(&[("x.cedar", &x), ("z.cedar", &z)], "/a");
    assert_eq!(d.reason, Reason::ConflictingObligations);
    // Nothing matches: deny by default, no ids.
    let d = decide(&[("x.cedar", &x)], "/b");
    assert_eq!(
        (d.allowed, d.reason, d.policy_ids.len()),
        (false, Reason::NoPermit, 0)
    );
    // An empty set denies everything.
    let d = decide(&[], "/a");
    assert_eq!(d.reason, Reason::NoPermit);
}

fn load_err(files: &[(&str, &str)]) -> (tempfile::TempDir, Vec<PolicyError>) {
    let d = dir_with(files);
    let e = PolicySet::load(d.path()).expect_err("must be rejected").0;
    (d, e)
}

#[test]
fn parse_error_names_file_and_line() {
    let (d, e) = load_err(&[
        ("a.cedar", "@id(\"ok\")\npermit (principal, action, resource);\n"),
        (
            "b.cedar",
            "// comment\n\n@id(\"broken\")\npermit (principal, action, resource)\nwhen { context.path == };\n",
        ),
    ]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].file, d.path().join("b.cedar"));
    assert_eq!(e[0].line, Some(5), "{}", e[0]);
    assert!(e[0].to_string().contains("b.cedar:5: "), "{}", e[0]);
}

#[test]
fn validation_error_names_file_line_and_policy() {
    let (d, e) = load_err(&[
        ("a.cedar", "@id(\"ok\")\npermit (principal, action, resource);\n"),
        (
            "b.cedar",
            "@id(\"first\")\npermit (principal, action, resource);\n\n@id(\"typo\")\npermit (principal, action, resource)\nwhen {\n  principal.usr == \"alice\"\n};\n",
        ),
    ]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].file, d.path().join("b.cedar"));
    assert_eq!(e[0].line, Some(7), "{}", e[0]);
    assert!(e[0].message.contains("`typo`"), "{}", e[0]);
    assert!(e[0].message.contains("usr"), "{}", e[0]);
}

#[test]
fn ids_are_required_and_unique_across_files() {
    let (d, e) = load_err(&[
        ("a.cedar", "@id(\"same\")\npermit (principal, action, resource);\n"),
        (
            "b.cedar",
            "\n\n@id(\"same\")\nforbid (principal, action, resource);\npermit (principal, action, resource);\n",
        ),
    ]);
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(
        (e[0].file.clone(), e[0].line),
        (d.path().join("b.cedar"), Some(3))
    );
    assert!(e[0].message.contains("a.cedar:1"), "{}", e[0]);
    assert_eq!(e[1].line, Some(5), "{}", e[1]);
    assert!(e[1].message.contains("no @id"), "{}", e[1]);
}

#[test]
fn annotations_are_checked() {
    let (_d, e) = load_err(&[(
        "a.cedar",
        "@id(\"a\")\n@aproval(\"x\")\npermit (principal, action, resource);\n@id(\"b\")\n@mask(\"m\")\nforbid (principal, action, resource);\n@id(\"c\")\n@require_token\npermit (principal, action, resource);\n@id(\"d\")\n@mask(\"\")\npermit (principal, action, resource);\n",
    )]);
    let msgs: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(e.len(), 4, "{msgs:?}");
    assert!(
        msgs[0].contains(":1: unknown annotation @aproval"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains(":4: @mask is an obligation of a permit"),
        "{msgs:?}"
    );
    assert!(
        msgs[2].contains(":7: @require_token belongs on a forbid"),
        "{msgs:?}"
    );
    assert!(msgs[3].contains(":10: @mask needs a name"), "{msgs:?}");
}

#[test]
fn schema_problems() {
    let d = tempfile::tempdir().unwrap();
    let e = PolicySet::load(d.path()).unwrap_err().0;
    assert!(e[0].to_string().contains("schema.cedarschema"), "{e:?}");
    std::fs::write(
        d.path().join(SCHEMA_FILE),
        "namespace Phigate {\n  entity Workload = {\n    user: Strin,\n  };\n}\n",
    )
    .unwrap();
    let e = PolicySet::load(d.path()).unwrap_err().0;
    assert_eq!(e[0].file, d.path().join(SCHEMA_FILE));
    assert!(e[0].message.contains("Strin"), "{e:?}");
    // Valid Cedar, but not what phigate supplies.
    std::fs::write(
        d.path().join(SCHEMA_FILE),
        "namespace Phigate {\n entity Workload; entity Destination;\n action \"GET\", \"OTHER\" appliesTo { principal: [Workload], resource: [Destination] };\n}\n",
    )
    .unwrap();
    let e = PolicySet::load(d.path()).unwrap_err().0;
    assert!(
        e[0].message
            .contains("does not describe the requests phigate makes"),
        "{e:?}"
    );
    let e = PolicySet::load(&d.path().join("missing")).unwrap_err().0;
    assert!(
        e[0].message.contains("cannot read the policy directory"),
        "{e:?}"
    );
}

#[test]
fn hash_covers_every_file() {
    let a = dir_with(&[(
        "a.cedar",
        "@id(\"a\")\npermit (principal, action, resource);\n",
    )]);
    let h1 = PolicySet::load(a.path()).unwrap().hash().to_owned();
    assert_eq!(PolicySet::load(a.path()).unwrap().hash(), h1);
    std::fs::write(a.path().join("b.cedar"), "// nothing\n").unwrap();
    let h2 = PolicySet::load(a.path()).unwrap().hash().to_owned();
    assert_ne!(h1, h2);
    // Files other than *.cedar and the schema are not part of the set.
    std::fs::write(a.path().join("notes.txt"), "x").unwrap();
    assert_eq!(PolicySet::load(a.path()).unwrap().hash(), h2);
}

#[test]
fn unknown_methods_map_to_other() {
    let d = dir_with(&[(
        "a.cedar",
        "@id(\"other\")\npermit (principal, action == Phigate::Action::\"OTHER\", resource);\n",
    )]);
    let set = PolicySet::load(d.path()).unwrap();
    for (m, allowed) in [("PROPFIND", true), ("get", true), ("OTHER", true)] {
        let c = Case {
            method: m,
            ..case(workload("u", ""), None, "GET", "/")
        };
        assert_eq!(c.decide(&set).allowed, allowed, "{m}");
    }
}

/// The prefilter (policy/index.rs) must never change a decision: for random requests
/// against a set using every condition form it understands (and some it does not),
/// deciding among the candidates equals deciding with the whole set.
mod prefilter {
    use super::*;
    use proptest::prelude::*;

    const POLICIES: &str = r#"
@id("team") @mask("m1")
permit (principal, action in Phigate::Action::"read", resource == Phigate::Destination::"patients-api")
when { context has token && context.token.groups.contains("team-a") && context.path like "/fhir/*/Patient*" };
@id("unit") permit (principal, action == Phigate::Action::"GET", resource)
when { principal.unit == "export.service" && principal.user == "svc" && context.path == "/export" };
@id("night") forbid (principal, action, resource == Phigate::Destination::"patients-api")
when { context.hour < 6 && !(context has token && context.token.groups.contains("oncall")) };
@id("query") permit (principal, action == Phigate::Action::"GET", resource)
when { context.query.hasTag("_type") && context.query.getTag("_type").contains("Coverage") && context has token && context.token.hasTag("client_id") };
@id("uid") permit (principal, action in [Phigate::Action::"write", Phigate::Action::"HEAD"], resource in Phigate::Destination::"other-api")
when { principal.uid == 1000 && context.minute >= 30 && context.weekday != "Sun" && !context.has_approval };
@id("either") permit (principal, action, resource)
when { principal.comm == "curl" || context.path like "*\*literal*" };
@id("unless") permit (principal, action == Phigate::Action::"DELETE", resource)
when { principal.uid > 10 } unless { context.hour >= 20 };
@id("needs-token") @require_token forbid (principal, action, resource == Phigate::Destination::"patients-api")
unless { context has token };
@id("approved") permit (principal, action, resource)
when { context.has_approval && context.method == "POST" };
"#;

    fn set() -> PolicySet {
        let d = dir_with(&[("p.cedar", POLICIES)]);
        PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    prop_compose! {
        fn request()(
            user in prop::sample::select(vec!["svc", "alice", ""]),
            unit in prop::sample::select(vec!["export.service", "ehr.service", ""]),
            comm in prop::sample::select(vec!["curl", "python3"]),
            uid in prop::sample::select(vec![0u32, 1000, 5]),
            groups in prop::sample::subsequence(vec!["team-a", "oncall", "billing"], 0..=3),
            has_token in any::<bool>(),
            method in prop::sample::select(vec!["GET", "HEAD", "POST", "DELETE", "get", "BREW"]),
            path in prop::sample::select(vec!["/export", "/fhir/R4/Patient/1", "/fhir/R4/Patients", "/fhir/Coverage", "/x*literal", "/"]),
            dest in prop::sample::select(vec!["patients-api", "other-api"]),
            query in prop::sample::subsequence(vec![("_type", "Coverage"), ("_type", "Patient"), ("_count", "5")], 0..=3),
            hour in 0u8..24,
            minute in 0u8..60,
            weekday in 1u8..=7,
            has_approval in any::<bool>(),
        ) -> (Workload, Option<TokenIdentity>, &'static str, &'static str, &'static str, Vec<(String, String)>, Clock, bool) {
            let mut w = workload(user, unit);
            w.comm = comm.into();
            w.uid = uid;
            let t = has_token.then(|| token(&groups));
            let q = query.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            (w, t, method, path, dest, q, Clock { hour, minute, weekday }, has_approval)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]
        #[test]
        fn deciding_among_candidates_equals_deciding_with_all((w, t, method, path, dest, q, clock, has_approval) in request()) {
            let set = set();
            let req = AccessRequest {
                workload: &w,
                token: t.as_ref(),
                token_error: t.is_none().then_some(TokenError::Missing),
                destination: dest,
                method,
                path,
                query: &q,
                headers: &[],
                host: Some("api.test"),
                sni: Some("api.test"),
                clock,
                has_approval,
            };
            let fast = set.decide(&req);
            let full = set.decide_among(&req, set.action_for(method), &set.policies, index::ContextReads::ALL);
            prop_assert_eq!(fast, full);
        }
    }

    #[test]
    fn requests_evaluate_only_the_policies_that_may_apply() {
        let set = set();
        let w = workload("alice", "ehr.service");
        let t = token(&["team-a"]);
        let req = AccessRequest {
            workload: &w,
            token: Some(&t),
            token_error: None,
            destination: "patients-api",
            method: "GET",
            path: "/fhir/R4/Patient/1",
            query: &[],
            headers: &[],
            clock: NOON_MON,
            host: None,
            sni: None,
            has_approval: false,
        };
        let candidates = set.index.candidates(&req, "GET");
        let mut ids: Vec<String> = candidates
            .set
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        // unit (wrong unit), night (noon), query (no _type), uid (wrong action and
        // destination), unless (wrong action), approved (no approval) are skipped;
        // `either` (a `||`) and `needs-token` (an `unless`) cannot be prefiltered.
        assert_eq!(ids, ["either", "needs-token", "team"]);
        assert!(set.decide(&req).allowed);
    }
}

#[test]
fn the_authority_is_in_the_context_and_older_schemas_still_load() {
    const POLICY: &str = r#"
@id("by-host")
permit (principal, action == Phigate::Action::"GET", resource)
when { context has host && context.host == "api.test" && context has sni && context.sni == "api.test" };
"#;
    let d = dir_with(&[("p.cedar", POLICY)]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let w = workload("ehr", "");
    let decide = |set: &PolicySet, host: Option<&str>, sni: Option<&str>| {
        set.decide(&AccessRequest {
            workload: &w,
            token: None,
            token_error: Some(TokenError::Missing),
            destination: "x",
            method: "GET",
            path: "/",
            query: &[],
            headers: &[],
            host,
            sni,
            clock: NOON_MON,
            has_approval: false,
        })
        .allowed
    };
    assert!(decide(&set, Some("api.test"), Some("api.test")));
    assert!(!decide(&set, Some("other.test"), Some("api.test")));
    assert!(!decide(&set, Some("api.test"), None));
    assert!(!decide(&set, None, None));

    // A schema written before host/sni (and Workload.unknown): its policies load and
    // decide; the context leaves out what the schema does not declare.
    let old = shipped_schema()
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("host?") || t.starts_with("sni?") || t.starts_with("unknown:"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(old, shipped_schema());
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SCHEMA_FILE), &old).unwrap();
    std::fs::write(
        d.path().join("p.cedar"),
        "@id(\"all-gets\")\npermit (principal, action == Phigate::Action::\"GET\", resource);\n",
    )
    .unwrap();
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(decide(&set, Some("api.test"), Some("api.test")));
    // A policy that asks for the host under that schema loads (`has` is false for
    // an attribute the schema does not declare) and never permits.
    std::fs::write(d.path().join("p.cedar"), POLICY).unwrap();
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(!decide(&set, Some("api.test"), Some("api.test")));
}

#[test]
fn passages_are_actions_of_their_own_that_a_set_must_name() {
    let conn = |set: &PolicySet, passage: Passage, sni: Option<&str>| {
        let w = workload("svc", "db-client.service");
        set.decide_passage(
            &AccessRequest {
                workload: &w,
                token: None,
                token_error: Some(TokenError::Missing),
                destination: "db",
                method: "",
                path: "",
                query: &[],
                headers: &[],
                host: None,
                sni,
                clock: NOON_MON,
                has_approval: false,
            },
            passage,
        )
    };
    // Reads and writes of everything: no passage.
    let d = dir_with(&[(
        "p.cedar",
        "@id(\"rw\")\npermit (principal, action in [Phigate::Action::\"read\", Phigate::Action::\"write\"], resource);\n",
    )]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    for p in Passage::ALL {
        let d = conn(&set, p, Some("pinned.test"));
        assert!(!d.allowed, "{p:?}: {d:?}");
        assert_eq!(d.reason, Reason::NoPermit);
    }
    // A method spelled like a passage is no passage.
    assert_eq!(set.action_for("TCP"), OTHER_ACTION);
    assert_eq!(set.action_for("UPGRADE"), OTHER_ACTION);

    // Each permit opens its own passage only.
    let d = dir_with(&[(
        "p.cedar",
        r#"@id("db")
permit (principal, action == Phigate::Action::"TCP", resource == Phigate::Destination::"db")
when { principal.unit == "db-client.service" };
@id("pinned")
permit (principal, action == Phigate::Action::"TUNNEL", resource)
when { context has sni && context.sni == "pinned.test" };
"#,
    )]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let d = conn(&set, Passage::Tcp, None);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policy_ids, ["db"]);
    assert!(conn(&set, Passage::Tunnel, Some("pinned.test")).allowed);
    assert!(!conn(&set, Passage::Tunnel, Some("other.test")).allowed);
    assert!(!conn(&set, Passage::Upgrade, None).allowed);

    // A schema without the passage actions: every passage is refused, saying why.
    let old = shipped_schema().replace(
        "action \"TCP\", \"TUNNEL\", \"UPGRADE\" appliesTo {\n    principal: [Workload], resource: [Destination], context: Http\n  };",
        "",
    );
    assert_ne!(old, shipped_schema());
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SCHEMA_FILE), &old).unwrap();
    std::fs::write(
        d.path().join("p.cedar"),
        "@id(\"all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let d = conn(&set, Passage::Tcp, None);
    assert!(!d.allowed);
    assert!(d.errors[0].contains("declares no action \"TCP\""), "{d:?}");
}

#[test]
fn a_policy_can_permit_one_container_and_older_schemas_still_load() {
    const POLICY: &str = r#"
@id("only-billing-container")
permit (principal, action == Phigate::Action::"GET", resource)
when { principal.container == "4f1c8a0f6a2b" && principal.container_runtime == "podman" && principal.pod_uid == "" };
"#;
    let d = dir_with(&[("p.cedar", POLICY)]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let in_container = |id: Option<&str>| Workload {
        container_id: id.map(str::to_owned),
        container_runtime: id.map(|_| "podman".to_owned()),
        ..workload("svc", "")
    };
    let get = |set: &PolicySet, w: Workload| case(w, None, "GET", "/Patient/1").decide(set).allowed;
    assert!(get(&set, in_container(Some("4f1c8a0f6a2b"))));
    assert!(!get(&set, in_container(Some("0000000000aa"))));
    assert!(!get(&set, in_container(None)), "outside any container");

    // A schema from before container identity: it loads, policies decide, and one
    // asking for the container does not load (the schema does not declare it).
    let old = shipped_schema()
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("container")
                || t.starts_with("pod_uid")
                || t.starts_with("// \"systemd-nspawn\""))
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(old, shipped_schema());
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SCHEMA_FILE), &old).unwrap();
    std::fs::write(
        d.path().join("p.cedar"),
        "@id(\"all-gets\")\npermit (principal, action == Phigate::Action::\"GET\", resource);\n",
    )
    .unwrap();
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(get(&set, in_container(Some("4f1c8a0f6a2b"))));
    std::fs::write(d.path().join("p.cedar"), POLICY).unwrap();
    assert!(PolicySet::load(d.path()).is_err());
}

#[test]
fn a_policy_can_name_a_pod_and_an_image_and_older_schemas_still_load() {
    const POLICY: &str = r#"
@id("billing-exporter")
permit (principal, action == Phigate::Action::"GET", resource)
when { principal.pod_namespace == "billing" && principal.pod_name like "export-*" && principal.image == "registry.local/export:1.4" };
"#;
    let d = dir_with(&[("p.cedar", POLICY)]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let pod = |ns: &str, image: Option<&str>| Workload {
        container_id: Some("4f1c8a0f6a2b".into()),
        container_runtime: Some("containerd".into()),
        pod_namespace: Some(ns.into()),
        pod_name: Some("export-7d9f".into()),
        container_image: image.map(str::to_owned),
        ..workload("svc", "")
    };
    let get = |set: &PolicySet, w: Workload| case(w, None, "GET", "/Patient/1").decide(set).allowed;
    assert!(get(&set, pod("billing", Some("registry.local/export:1.4"))));
    assert!(!get(&set, pod("lab", Some("registry.local/export:1.4"))));
    assert!(!get(
        &set,
        pod("billing", Some("registry.local/export:1.5"))
    ));
    assert!(
        !get(&set, pod("billing", None)),
        "an image the runtime does not name"
    );

    // A schema from before the runtime's facts: it loads, and a policy naming them
    // does not.
    let old = shipped_schema()
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("pod_namespace")
                || t.starts_with("pod_name")
                || t.starts_with("image:"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(old, shipped_schema());
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(SCHEMA_FILE), &old).unwrap();
    std::fs::write(
        d.path().join("p.cedar"),
        "@id(\"all-gets\")\npermit (principal, action == Phigate::Action::\"GET\", resource);\n",
    )
    .unwrap();
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(get(&set, pod("billing", None)));
    std::fs::write(d.path().join("p.cedar"), POLICY).unwrap();
    assert!(PolicySet::load(d.path()).is_err());
}

/// The entity caches key on the whole workload and token: two callers with the same
/// pid (a recycled pid, or a setuid exec) and tokens with the same subject but
/// different groups are decided each on their own facts, however often they repeat.
#[test]
fn cached_entities_never_stand_in_for_another_caller() {
    let d = dir_with(&[(
        "p.cedar",
        "@id(\"ehr-clinicians\")\npermit (principal, action, resource) when { principal.groups.contains(7) && context has token && context.token.groups.contains(\"clinicians\") };\n",
    )]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    // Supplementary groups: a condition the prefilter does not index, so Cedar
    // itself decides, on the cached entity.
    let ehr = Workload {
        groups: vec![7],
        ..workload("ehr", "ehr.service")
    };
    let other = Workload {
        groups: vec![8],
        ..workload("ehr", "ehr.service")
    };
    assert_eq!(ehr.pid, other.pid);
    for _ in 0..3 {
        let allowed = |w: &Workload, groups: &[&str]| {
            case(w.clone(), Some(token(groups)), "GET", "/fhir/Patient/1")
                .decide(&set)
                .allowed
        };
        assert!(allowed(&ehr, &["clinicians"]));
        assert!(!allowed(&other, &["clinicians"]));
        assert!(!allowed(&ehr, &["billing"]));
    }
    assert_eq!(set.principals.len(), 2, "one entity per workload");
    assert_eq!(set.tokens.len(), 2, "one entity per token");
}

/// A request is decided without the `query` and `headers` entities only when none
/// of the candidate policies can observe them; any other use of `context` keeps them.
#[test]
fn the_context_holds_query_and_headers_only_where_a_policy_reads_them() {
    use index::ContextReads;
    let reads = |text: &str| {
        let p = cedar_policy::Policy::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        ContextReads::of(&p.to_json().unwrap_or_default())
    };
    let none = ContextReads {
        query: false,
        headers: false,
    };
    assert_eq!(reads("permit (principal, action, resource);"), none);
    assert_eq!(
        reads(r#"permit (principal, action, resource) when { context.path like "/a*" };"#),
        none
    );
    assert_eq!(
        reads(r#"permit (principal, action, resource) when { context.headers.hasTag("x") };"#),
        ContextReads {
            query: false,
            headers: true
        }
    );
    assert_eq!(
        reads(r#"forbid (principal, action, resource) when { context has query };"#),
        ContextReads {
            query: true,
            headers: false
        }
    );
    assert_eq!(
        reads(r#"permit (principal, action, resource) when { context["headers"].hasTag("x") };"#),
        ContextReads {
            query: false,
            headers: true
        }
    );
    // `context` compared or passed whole: everything.
    assert_eq!(
        reads(r#"permit (principal, action, resource) when { context == {"path": "/"} };"#),
        ContextReads::ALL
    );
    // And the decision sees the headers when a candidate reads them.
    const POLICY: &str = r#"
@id("by-header")
permit (principal, action == Phigate::Action::"GET", resource)
when { context.headers.hasTag("x-purpose") };
"#;
    let d = dir_with(&[("p.cedar", POLICY)]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let w = workload("alice", "ehr.service");
    let with = [("x-purpose".to_owned(), "treatment".to_owned())];
    let req = |headers: &[(String, String)]| {
        set.decide(&AccessRequest {
            workload: &w,
            token: None,
            token_error: Some(TokenError::Missing),
            destination: "patients-api",
            method: "GET",
            path: "/",
            query: &[],
            headers,
            host: None,
            sni: None,
            clock: NOON_MON,
            has_approval: false,
        })
        .allowed
    };
    assert!(req(&with));
    assert!(!req(&[]));
}

/// A remembered decision is answered only to a request identical in every part
/// Cedar sees: each variant below differs from the base in one part, and its
/// decision (asked right after the base's was remembered) is the one Cedar gives it.
/// The condition sits under an `||` the prefilter does not index, so every variant
/// has the same candidates and only the memo's key tells them apart.
#[test]
fn a_remembered_decision_is_never_handed_to_a_request_that_differs() {
    let d = dir_with(&[(
        "p.cedar",
        r#"@id("exact")
permit (principal, action == Phigate::Action::"GET", resource == Phigate::Destination::"patients-api")
when { principal.uid == 99999 || (
  principal.user == "ehr" && context.path == "/fhir/Patient/1" && context.hour == 12 &&
  context.minute == 0 && context.weekday == "Mon" && !context.has_approval &&
  context has host && context.host == "api.test" && context has sni && context.sni == "api.test" &&
  context.headers.hasTag("x-purpose") && context.headers.getTag("x-purpose").contains("treatment") &&
  context.query.hasTag("_count") && context has token && context.token.subject == "dr-alice")
};
@id("tokens") @require_token
forbid (principal, action == Phigate::Action::"POST", resource) unless { context has token };
"#,
    )]);
    let set = PolicySet::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    let ehr = workload("ehr", "ehr.service");
    let billing = workload("billing", "ehr.service");
    let alice = token(&[]);
    let bob = TokenIdentity {
        subject: "dr-bob".into(),
        ..token(&[])
    };
    let headers = vec![("x-purpose".to_owned(), "treatment".to_owned())];
    let marketing = vec![("x-purpose".to_owned(), "marketing".to_owned())];
    let count = vec![("_count".to_owned(), "10".to_owned())];
    let base = AccessRequest {
        workload: &ehr,
        token: Some(&alice),
        token_error: None,
        destination: "patients-api",
        method: "GET",
        path: "/fhir/Patient/1",
        query: &count,
        headers: &headers,
        host: Some("api.test"),
        sni: Some("api.test"),
        clock: NOON_MON,
        has_approval: false,
    };
    let variants: Vec<(&str, AccessRequest<'_>)> = vec![
        (
            "workload",
            AccessRequest {
                workload: &billing,
                ..base
            },
        ),
        (
            "token",
            AccessRequest {
                token: Some(&bob),
                ..base
            },
        ),
        (
            "no token",
            AccessRequest {
                token: None,
                ..base
            },
        ),
        (
            "destination",
            AccessRequest {
                destination: "other-api",
                ..base
            },
        ),
        (
            "method",
            AccessRequest {
                method: "HEAD",
                ..base
            },
        ),
        (
            "path",
            AccessRequest {
                path: "/fhir/Patient/2",
                ..base
            },
        ),
        ("query", AccessRequest { query: &[], ..base }),
        (
            "headers",
            AccessRequest {
                headers: &marketing,
                ..base
            },
        ),
        (
            "host",
            AccessRequest {
                host: Some("other.test"),
                ..base
            },
        ),
        ("sni", AccessRequest { sni: None, ..base }),
        (
            "hour",
            AccessRequest {
                clock: Clock {
                    hour: 13,
                    ..NOON_MON
                },
                ..base
            },
        ),
        (
            "minute",
            AccessRequest {
                clock: Clock {
                    minute: 1,
                    ..NOON_MON
                },
                ..base
            },
        ),
        (
            "weekday",
            AccessRequest {
                clock: Clock {
                    weekday: 2,
                    ..NOON_MON
                },
                ..base
            },
        ),
        (
            "approval",
            AccessRequest {
                has_approval: true,
                ..base
            },
        ),
    ];
    for (what, v) in &variants {
        let remembered = set.decide(&base);
        assert!(remembered.allowed, "{remembered:?}");
        assert_eq!(set.decide(&base), remembered, "a repeat gets the same");
        let got = set.decide(v);
        assert!(!got.allowed, "{what}: {got:?}");
        assert_eq!(got.reason, Reason::NoPermit, "{what}: {got:?}");
    }
    // Why a token is missing is part of the answer (the 401's reason).
    let post = AccessRequest {
        method: "POST",
        token: None,
        token_error: Some(TokenError::Missing),
        ..base
    };
    assert_eq!(
        set.decide(&post).reason,
        Reason::TokenRequired(TokenError::Missing)
    );
    let expired = AccessRequest {
        token_error: Some(TokenError::Expired),
        ..post
    };
    assert_eq!(
        set.decide(&expired).reason,
        Reason::TokenRequired(TokenError::Expired)
    );
    // One entry per distinct request, none for a repeat.
    assert_eq!(set.decisions.len(), 1 + variants.len() + 2);
}
