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

fn binding(who: &str, url: &str) -> Binding {
    Binding {
        requester: Requester {
            principal: format!("oidc:issuer#{who}"),
            names: vec![who.to_owned()],
        },
        method: "GET".into(),
        url: url.into(),
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
        via: "cli",
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
        tokio::spawn(async move {
            svc.gate(&r, &binding("alice", "https://api/x"), summary())
                .await
        })
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
    assert_eq!(e, Err(DecideError::SelfApproval("alice".into())));
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
        tokio::spawn(async move {
            svc.gate(&r, &binding("alice", "https://api/x"), summary())
                .await
        })
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
        .gate(
            &rule(Mode::Hold, 1, 50),
            &binding("alice", "https://api/y"),
            summary(),
        )
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
    let b = binding("alice", "https://api/fhir/Patient/$export");
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
    assert_eq!(e, Err(DecideError::AlreadyVoted("bob".into())));
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
    let other_url = binding(
        "alice",
        "https://api/fhir/Patient/$export?_type=Observation",
    );
    let Gate::Refuse {
        approval_id: other, ..
    } = svc.gate(&r, &other_url, summary()).await
    else {
        panic!()
    };
    assert_ne!(other, id);
    let mallory = binding("mallory", "https://api/fhir/Patient/$export");
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
            &binding("alice", "https://api/a"),
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
                &binding("alice", "https://api/b"),
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
            &binding("alice", "https://api/a"),
            summary()
        )
        .await,
        Gate::Proceed { .. }
    ));
}
