use std::sync::Mutex as StdMutex;

use super::*;
use crate::record::{Durable, Origin};

/// Keeps every approvals row in memory; can be made to fail.
struct Rows {
    rows: StdMutex<Vec<(String, String, Option<String>)>>,
    origin: Origin,
}

impl RecordSink for Rows {
    fn submit(&self, rec: Record) -> Durable {
        if let Record::Approval(a) = rec {
            self.rows
                .lock()
                .unwrap()
                .push((a.approval_id, a.state.to_owned(), a.reviewer));
        }
        Durable::ready(Ok(()))
    }
    fn origin(&self) -> &Origin {
        &self.origin
    }
}

impl Rows {
    fn states(&self, id: &str) -> Vec<String> {
        self.rows
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == id)
            .map(|r| r.1.clone())
            .collect()
    }
}

fn rows() -> Arc<Rows> {
    Arc::new(Rows {
        rows: StdMutex::new(Vec::new()),
        origin: Origin {
            host: "test".into(),
            agent_version: "test",
        },
    })
}

async fn service(dir: &Path, rows: &Arc<Rows>) -> Arc<Approvals> {
    Arc::new(
        Approvals::open(
            dir,
            rows.clone(),
            notify::Notifier {
                client: None,
                console_url: None,
            },
            Default::default(),
        )
        .await
        .unwrap(),
    )
}

fn rule(mode: Mode, quorum: usize, timeout_ms: u64) -> ApprovalRule {
    ApprovalRule {
        name: "bulk_export".into(),
        reviewers: vec!["privacy".into()],
        quorum,
        mode,
        timeout: Duration::from_millis(timeout_ms),
        grant: Duration::from_secs(60),
        uses: 2,
        webhook: None,
    }
}

/// A request by `who` (their token's person claim) for `target` on `api`.
fn binding(who: &str, target: &str) -> Binding {
    Binding {
        requester: Requester {
            principal: format!("oidc:issuer#{who}"),
            unix: None,
            token: Some(TokenName {
                issuer: "issuer".into(),
                subject: who.into(),
                person: Some(who.into()),
            }),
            names: Vec::new(),
        },
        destination: "patients-api".into(),
        method: "GET".into(),
        authority: "api".into(),
        target: target.into(),
        headers: Vec::new(),
        body_sha256: hex::encode(Sha256::digest(b"")),
    }
}

fn summary() -> RequestSummary {
    RequestSummary {
        request_id: new_id(),
        destination: "patients-api".into(),
        method: "GET".into(),
        path: "/fhir/Patient/$export".into(),
        ..Default::default()
    }
}

fn reviewer(name: &str, group: &str) -> Reviewer {
    Reviewer {
        name: name.into(),
        groups: vec![group.into()],
        via: Via::Cli,
    }
}

/// The id of the one pending approval, once it shows up.
async fn pending(svc: &Approvals) -> String {
    for _ in 0..200 {
        if let Some(a) = svc.list().into_iter().find(|a| a.state == State::Pending) {
            return a.id;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no pending approval");
}

#[tokio::test]
async fn a_held_request_proceeds_once_approved_and_names_the_approver() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let svc = service(dir.path(), &rows).await;
    let r = rule(Mode::Hold, 1, 10_000);
    let held = {
        let svc = svc.clone();
        let r = r.clone();
        tokio::spawn(async move { svc.gate(&r, &binding("alice", "/x"), summary()).await })
    };
    let id = pending(&svc).await;
    // Not a reviewer, the requester herself, no reason: each refused.
    let e = svc
        .decide(&id, &reviewer("mallory", "billing"), Verdict::Approve, "ok")
        .await;
    assert!(matches!(e, Err(DecideError::NotAReviewer { .. })), "{e:?}");
    let e = svc
        .decide(&id, &reviewer("alice", "privacy"), Verdict::Approve, "mine")
        .await;
    assert_eq!(
        e,
        Err(DecideError::SelfApproval {
            reviewer: "alice".into(),
            person: "alice".into()
        })
    );
    let e = svc
        .decide(&id, &reviewer("bob", "privacy"), Verdict::Approve, "  ")
        .await;
    assert_eq!(e, Err(DecideError::ReasonRequired));
    svc.decide(
        &id,
        &reviewer("bob", "privacy"),
        Verdict::Approve,
        "ticket 42",
    )
    .await
    .unwrap();
    let gate = held.await.unwrap();
    assert_eq!(
        gate,
        Gate::Proceed {
            approval_id: id.clone(),
            approvers: vec!["bob".into()],
            reason: "ticket 42".into()
        }
    );
    assert_eq!(rows.states(&id), ["requested", "approved", "used"]);
    assert!(svc.list().is_empty(), "a used hold approval is closed");
}

#[tokio::test]
async fn denied_and_expired_holds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let svc = service(dir.path(), &rows).await;
    let r = rule(Mode::Hold, 1, 10_000);
    let held = {
        let (svc, r) = (svc.clone(), r.clone());
        tokio::spawn(async move { svc.gate(&r, &binding("alice", "/x"), summary()).await })
    };
    let id = pending(&svc).await;
    svc.decide(
        &id,
        &reviewer("bob", "privacy"),
        Verdict::Deny,
        "not needed",
    )
    .await
    .unwrap();
    assert_eq!(
        held.await.unwrap(),
        Gate::Refuse {
            approval_id: id.clone(),
            outcome: State::Denied
        }
    );
    assert_eq!(rows.states(&id), ["requested", "denied"]);

    let gate = svc
        .gate(&rule(Mode::Hold, 1, 50), &binding("alice", "/y"), summary())
        .await;
    let Gate::Refuse {
        approval_id,
        outcome: State::Expired,
    } = gate
    else {
        panic!("{gate:?}")
    };
    assert_eq!(rows.states(&approval_id), ["requested", "expired"]);
    let e = svc
        .decide(
            &approval_id,
            &reviewer("bob", "privacy"),
            Verdict::Approve,
            "late",
        )
        .await;
    assert!(matches!(e, Err(DecideError::NotFound(_))), "{e:?}");
}

#[tokio::test]
async fn retry_grants_only_the_same_request_of_the_same_requester_within_its_uses() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let svc = service(dir.path(), &rows).await;
    let r = rule(Mode::Retry, 2, 10_000);
    let b = binding("alice", "/fhir/Patient/$export");
    let Gate::Refuse {
        approval_id: id,
        outcome: State::Pending,
    } = svc.gate(&r, &b, summary()).await
    else {
        panic!()
    };
    // Asking again while pending names the same approval.
    assert_eq!(
        svc.gate(&r, &b, summary()).await,
        Gate::Refuse {
            approval_id: id.clone(),
            outcome: State::Pending
        }
    );
    // Quorum of two: one approval is not enough.
    svc.decide(&id, &reviewer("bob", "privacy"), Verdict::Approve, "ok")
        .await
        .unwrap();
    let e = svc
        .decide(&id, &reviewer("bob", "privacy"), Verdict::Approve, "again")
        .await;
    assert!(
        matches!(&e, Err(DecideError::AlreadyVoted { person, .. }) if person == "bob"),
        "{e:?}"
    );
    assert!(matches!(
        svc.gate(&r, &b, summary()).await,
        Gate::Refuse { .. }
    ));
    svc.decide(
        &id,
        &reviewer("carol", "privacy"),
        Verdict::Approve,
        "ok too",
    )
    .await
    .unwrap();
    // Another URL, or another requester, does not ride on it.
    let other_url = binding("alice", "/fhir/Patient/$export?_type=Observation");
    let Gate::Refuse {
        approval_id: other, ..
    } = svc.gate(&r, &other_url, summary()).await
    else {
        panic!()
    };
    assert_ne!(other, id);
    let mallory = binding("mallory", "/fhir/Patient/$export");
    assert!(matches!(
        svc.gate(&r, &mallory, summary()).await,
        Gate::Refuse { .. }
    ));
    // The same request passes, twice (uses = 2), then no more.
    for _ in 0..2 {
        let g = svc.gate(&r, &b, summary()).await;
        let Gate::Proceed {
            approval_id,
            approvers,
            ..
        } = g
        else {
            panic!("{g:?}")
        };
        assert_eq!(approval_id, id);
        assert_eq!(approvers, ["bob", "carol"]);
    }
    let g = svc.gate(&r, &b, summary()).await;
    assert!(
        matches!(&g, Gate::Refuse { approval_id, .. } if *approval_id != id),
        "{g:?}"
    );
    assert_eq!(
        rows.states(&id),
        ["requested", "approved", "approved", "used", "used"]
    );
}

#[tokio::test]
async fn a_restart_keeps_retry_approvals_and_expires_held_ones_on_record() {
    let dir = tempfile::tempdir().unwrap();
    let rows1 = rows();
    let svc = service(dir.path(), &rows1).await;
    let Gate::Refuse {
        approval_id: kept, ..
    } = svc
        .gate(
            &rule(Mode::Retry, 1, 60_000),
            &binding("alice", "/a"),
            summary(),
        )
        .await
    else {
        panic!()
    };
    let held = {
        let svc = svc.clone();
        tokio::spawn(async move {
            svc.gate(
                &rule(Mode::Hold, 1, 60_000),
                &binding("alice", "/b"),
                summary(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held_id = svc
        .list()
        .into_iter()
        .find(|a| a.hold)
        .expect("held approval")
        .id;
    held.abort();
    drop(svc);

    let rows2 = rows();
    let svc = service(dir.path(), &rows2).await;
    assert_eq!(rows2.states(&held_id), ["expired"]);
    let open: Vec<String> = svc.list().into_iter().map(|a| a.id).collect();
    assert_eq!(open, std::slice::from_ref(&kept));
    svc.decide(
        &kept,
        &reviewer("bob", "privacy"),
        Verdict::Approve,
        "after restart",
    )
    .await
    .unwrap();
    assert!(matches!(
        svc.gate(
            &rule(Mode::Retry, 1, 60_000),
            &binding("alice", "/a"),
            summary()
        )
        .await,
        Gate::Proceed { .. }
    ));
}

/// Dana asks with a token whose subject is opaque; she has a console account and a
/// Unix login under other names. Under none of them may she approve her own request,
/// and toward a quorum she counts once.
#[tokio::test]
async fn persons_not_names_decide_self_approval_and_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let svc = service(dir.path(), &rows).await;
    let rules = RuleSet::parse(
        Path::new("approvals.toml"),
        r#"
[[person]]
name = "dana"
unix = ["dsmith"]
console = ["dana.r"]
oidc = ["https://idp.test#00u1x9"]
"#,
    )
    .unwrap();
    svc.configure(Arc::new(rules));
    let r = rule(Mode::Retry, 2, 10_000);
    let mut mine = binding("x", "/fhir/Patient/$export");
    mine.requester = Requester {
        principal: "oidc:https://idp.test#00u1x9".into(),
        unix: Some("svc-ehr".into()),
        token: Some(TokenName {
            issuer: "https://idp.test".into(),
            subject: "00u1x9".into(),
            person: None,
        }),
        names: Vec::new(),
    };
    let Gate::Refuse {
        approval_id: id, ..
    } = svc.gate(&r, &mine, summary()).await
    else {
        panic!()
    };
    assert_eq!(svc.get(&id).unwrap().requester_person, "dana");
    for (name, via) in [
        ("dana.r", Via::Console),
        ("dsmith", Via::Cli),
        ("svc-ehr", Via::Cli),
    ] {
        let who = Reviewer {
            name: name.into(),
            groups: vec!["privacy".into()],
            via,
        };
        let e = svc.decide(&id, &who, Verdict::Approve, "mine").await;
        assert!(
            matches!(&e, Err(DecideError::SelfApproval { .. })),
            "{name} via {via:?}: {e:?}"
        );
    }

    // Someone else's request: Dana votes once, as any of her names.
    let theirs = binding("erin", "/fhir/Patient/$export");
    let Gate::Refuse {
        approval_id: id, ..
    } = svc.gate(&r, &theirs, summary()).await
    else {
        panic!()
    };
    let console = Reviewer {
        name: "dana.r".into(),
        groups: vec!["privacy".into()],
        via: Via::Console,
    };
    svc.decide(&id, &console, Verdict::Approve, "ok")
        .await
        .unwrap();
    let e = svc
        .decide(
            &id,
            &reviewer("dsmith", "privacy"),
            Verdict::Approve,
            "ok again",
        )
        .await;
    assert!(
        matches!(&e, Err(DecideError::AlreadyVoted { person, earlier, .. })
            if person == "dana" && earlier == "dana.r via console"),
        "{e:?}"
    );
    assert_eq!(
        svc.get(&id).unwrap().state,
        State::Pending,
        "one person is not a quorum of two"
    );
    svc.decide(&id, &reviewer("bob", "privacy"), Verdict::Approve, "ok")
        .await
        .unwrap();
    assert_eq!(svc.get(&id).unwrap().state, State::Approved);
}

#[tokio::test]
async fn one_person_has_a_bounded_number_of_approvals_pending() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    let svc = service(dir.path(), &rows).await;
    svc.configure(Arc::new(RuleSet {
        max_pending_per_requester: 3,
        ..RuleSet::default()
    }));
    let r = rule(Mode::Retry, 1, 10_000);
    for i in 0..3 {
        let g = svc
            .gate(&r, &binding("alice", &format!("/x/{i}")), summary())
            .await;
        assert!(
            matches!(
                g,
                Gate::Refuse {
                    outcome: State::Pending,
                    ..
                }
            ),
            "{g:?}"
        );
    }
    let rows_before = rows.rows.lock().unwrap().len();
    assert_eq!(
        svc.gate(&r, &binding("alice", "/x/3"), summary()).await,
        Gate::TooMany { max: 3 }
    );
    assert_eq!(
        rows.rows.lock().unwrap().len(),
        rows_before,
        "nothing is created"
    );
    // Asking again for one already pending is not a new one; others are not limited.
    assert!(matches!(
        svc.gate(&r, &binding("alice", "/x/0"), summary()).await,
        Gate::Refuse { .. }
    ));
    assert!(matches!(
        svc.gate(&r, &binding("bob", "/x/3"), summary()).await,
        Gate::Refuse { .. }
    ));
    // A decision frees a place.
    let id = svc.list()[0].id.clone();
    svc.decide(&id, &reviewer("carol", "privacy"), Verdict::Deny, "no")
        .await
        .unwrap();
    assert!(matches!(
        svc.gate(&r, &binding("alice", "/x/3"), summary()).await,
        Gate::Refuse { .. }
    ));
}

#[test]
fn the_digest_binds_destination_authority_target_meaning_headers_and_body() {
    let b = binding("alice", "/fhir/Patient/1");
    let d = b.digest();
    type Change = Box<dyn Fn(&mut Binding)>;
    let variants: Vec<Change> = vec![
        Box::new(|b| b.destination = "other-api".into()),
        Box::new(|b| b.method = "POST".into()),
        Box::new(|b| b.authority = "api2".into()),
        Box::new(|b| b.target = "/fhir/Patient/1?_elements=name".into()),
        Box::new(|b| {
            b.headers
                .push(("prefer".into(), "return=representation".into()))
        }),
        Box::new(|b| b.body_sha256 = hex::encode(Sha256::digest(b"{}"))),
        Box::new(|b| b.requester.principal = "oidc:issuer#bob".into()),
        // Parts are length-prefixed: moving a byte across a boundary changes it.
        Box::new(|b| {
            b.authority = "api/".into();
            b.target = "fhir/Patient/1".into();
        }),
    ];
    for (i, change) in variants.iter().enumerate() {
        let mut other = b.clone();
        change(&mut other);
        assert_ne!(other.digest(), d, "variant {i}");
    }
    assert_eq!(b.clone().digest(), d);
}
