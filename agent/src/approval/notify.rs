//! Webhook notifications: a Slack-compatible JSON message per requested approval,
//! retried with backoff; delivery and failure are recorded. Never carries PHI: the
//! message names the rule, the destination, the method, the pseudonymized path and
//! the approval id, and links to the console.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tracing::{info, warn};

use super::{Approval, ApprovalRule};
use crate::outbound::Outbound;
use crate::record::{ApprovalRecord, Record, RecordSink};

const ATTEMPTS: u32 = 4;

#[derive(Clone)]
pub struct Notifier {
    pub client: Option<Outbound>,
    /// Base URL of the reviewer console, for links (e.g. `https://host:15443`).
    pub console_url: Option<String>,
}

impl Notifier {
    /// Sends the rule's webhook (if any) in the background.
    pub fn requested(&self, a: &Approval, rule: &ApprovalRule, records: Arc<dyn RecordSink>) {
        let (Some(url), Some(client)) = (rule.webhook.clone(), self.client.clone()) else {
            return;
        };
        let link = self
            .console_url
            .as_ref()
            .map(|base| format!("{}/approvals/{}", base.trim_end_matches('/'), a.id));
        let text = format!(
            "phigate: approval needed ({rule}) for {method} {path} on {dest} by {who}. Approval {id}{link}",
            rule = a.rule,
            method = a.summary.method,
            path = a.summary.path,
            dest = a.summary.destination,
            who = a.requester.principal,
            id = a.id,
            link = link.as_deref().map(|l| format!(": {l}")).unwrap_or_default(),
        );
        let body = json!({
            "text": text,
            "approval_id": a.id,
            "rule": a.rule,
            "destination": a.summary.destination,
            "method": a.summary.method,
            "path": a.summary.path,
            "requester": a.requester.principal,
            "link": link,
        })
        .to_string()
        .into_bytes();
        let a = a.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                match client.post_json(&url, body.clone()).await {
                    Ok(s) if (200..300).contains(&s) => {
                        info!(approval = %a.id, "approval webhook delivered");
                        let _ = record(&records, &a, None).await;
                        return;
                    }
                    Ok(s) => last = format!("webhook answered {s}"),
                    Err(e) => last = e,
                }
            }
            warn!(approval = %a.id, error = %last, "approval webhook failed");
            let _ = record(
                &records,
                &a,
                Some(format!("webhook failed after {ATTEMPTS} attempts: {last}")),
            )
            .await;
        });
    }
}

async fn record(
    records: &Arc<dyn RecordSink>,
    a: &Approval,
    error: Option<String>,
) -> Result<(), String> {
    let rec = ApprovalRecord {
        approval_id: a.id.clone(),
        time: SystemTime::now(),
        origin: records.origin().clone(),
        state: if error.is_none() {
            "notified"
        } else {
            "notify_failed"
        },
        rule: a.rule.clone(),
        request_id: Some(a.summary.request_id.clone()),
        request_digest: a.digest.clone(),
        requester: a.requester.principal.clone(),
        requester_person: Some(a.requester_person.clone()),
        reviewer: None,
        reviewer_person: None,
        reason: None,
        error,
    };
    records
        .submit(Record::Approval(rec))
        .await
        .map_err(|e| e.to_string())
}
