//! Just-in-time approval: a request whose policy decision names an approval rule
//! waits for (hold) or is refused until (retry) reviewers approve that exact request.
//!
//! An approval is bound to a digest of the request (requester, destination, method,
//! authority, path and query, the headers that change its meaning, body hash) and to
//! its requester: a different request cannot ride on it, and the requester cannot
//! approve it under any of their names ([`people`]): self-approval and quorum count
//! persons, not logins. One person may have only so many approvals pending at once. Every state change is a row in the `approvals` table, durable
//! before it takes effect; approvals still open are kept in `state_dir/approvals.json`
//! so they survive a restart (held requests, whose client is gone, are expired and
//! recorded as such).
//!
//! Entry points: [`Approvals::gate`] for the pipeline, [`Approvals::decide`] for
//! reviewers (admin socket, console).
#![forbid(unsafe_code)]

pub mod notify;
pub mod people;
pub mod rules;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::record::{micros, new_id, ApprovalRecord, Record, RecordSink};
pub use people::{Name, People, TokenName};
pub use rules::{ApprovalRule, Mode, RuleSet};

pub const STATE_FILE: &str = "approvals.json";
/// Header naming the approval on a refused or held request.
pub const APPROVAL_ID_HEADER: &str = "x-phigate-approval-id";

/// The exact request an approval is for.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Who asks: the token subject when there is one, else the workload.
    pub requester: Requester,
    /// The destination (configured name) the request goes to.
    pub destination: String,
    pub method: String,
    /// The request's authority (Host or `:authority`), else the original address.
    pub authority: String,
    /// Path and query as the client sent them.
    pub target: String,
    /// The headers of [`MEANING_HEADERS`] the request has, lowercased name and value,
    /// in order.
    pub headers: Vec<(String, String)>,
    /// SHA-256 of the request body (of nothing for a bodiless request).
    pub body_sha256: String,
}

/// Headers that change what a request does or what it answers: an approval for one
/// reading of the request is not an approval for another. (Method-override headers
/// are refused before any decision; they are listed so they could never slip by.)
pub const MEANING_HEADERS: [&str; 14] = [
    "content-type",
    "content-encoding",
    "accept",
    "accept-encoding",
    "prefer",
    "if-match",
    "if-none-match",
    "if-none-exist",
    "if-modified-since",
    "if-unmodified-since",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-fhir-starter",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Requester {
    /// Stable principal bound into the digest (`oidc:<iss>#<sub>` or `uid:<n>@<unit>`).
    pub principal: String,
    /// The workload's login, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<String>,
    /// The validated token's names, when the request carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenName>,
    /// Names kept by an earlier version (login, token subject), each read as a login
    /// and as a console account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

impl Requester {
    /// The person who asks: the token's when there is one, else the workload login's.
    pub fn person(&self, people: &People) -> String {
        match (&self.token, &self.unix) {
            (Some(t), _) => people.person(Name::Token(t)),
            (None, Some(u)) => people.person(Name::Unix(u)),
            (None, None) => self.principal.clone(),
        }
    }

    /// Every person behind this request (token holder and workload login): none of
    /// them may approve it.
    pub fn persons(&self, people: &People) -> Vec<String> {
        let mut v = vec![self.person(people)];
        if let Some(u) = &self.unix {
            v.push(people.person(Name::Unix(u)));
        }
        for n in &self.names {
            v.push(people.person(Name::Unix(n)));
            v.push(people.person(Name::Console(n)));
        }
        v.sort();
        v.dedup();
        v
    }
}

impl Binding {
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut part = |p: &str| {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        };
        part("phigate-approval-v2");
        part(&self.requester.principal);
        part(&self.destination);
        part(&self.method);
        part(&self.authority);
        part(&self.target);
        for (name, value) in &self.headers {
            part(name);
            part(value);
        }
        part(&self.body_sha256);
        hex::encode(h.finalize())
    }
}

/// What reviewers see of the request: no raw PHI (paths pseudonymized, query values
/// redacted, previews masked).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestSummary {
    pub request_id: String,
    pub destination: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub workload: String,
    pub policy_ids: Vec<String>,
    pub preview: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    Expired,
    /// Every use of the grant was spent, or its window closed.
    Used,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Used => "used",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vote {
    pub reviewer: String,
    /// The person the reviewer is, when they voted.
    #[serde(default)]
    pub person: String,
    pub reason: String,
    pub time_us: i64,
    /// `cli` or `console`.
    pub via: String,
}

/// One approval and everything decided about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Approval {
    pub id: String,
    pub rule: String,
    pub hold: bool,
    pub digest: String,
    pub requester: Requester,
    /// The person who asked, as the mapping said when they asked.
    #[serde(default)]
    pub requester_person: String,
    pub summary: RequestSummary,
    /// The rule's terms as they were when requested (a reload does not change them).
    pub reviewers: Vec<String>,
    pub quorum: usize,
    /// Retry mode: how long an approval may be used once granted.
    pub grant_us: i64,
    pub created_us: i64,
    pub deadline_us: i64,
    pub state: State,
    pub approvals: Vec<Vote>,
    pub denial: Option<Vote>,
    pub grant_until_us: Option<i64>,
    pub uses_left: u32,
}

impl Approval {
    /// The requester as reviewers read it (console and CLI): the person, and the
    /// principal they asked as.
    pub fn requester_label(&self) -> String {
        if self.requester_person.is_empty() || self.requester_person == self.requester.principal {
            self.requester.principal.clone()
        } else {
            format!(
                "{} (as {})",
                self.requester_person, self.requester.principal
            )
        }
    }
}

/// A reviewer, as the admin socket (peer credentials) or the console (login) knows them.
#[derive(Debug, Clone)]
pub struct Reviewer {
    pub name: String,
    pub groups: Vec<String>,
    pub via: Via,
}

/// Where a reviewer decided, which is also the namespace of their name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The admin socket: a Unix login.
    Cli,
    /// The web console: a console account.
    Console,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Console => "console",
        }
    }

    fn name(self, name: &str) -> Name<'_> {
        match self {
            Via::Cli => Name::Unix(name),
            Via::Console => Name::Console(name),
        }
    }

    fn parse(via: &str) -> Via {
        if via == "console" {
            Via::Console
        } else {
            Via::Cli
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Approve,
    Deny,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecideError {
    #[error("no approval {0}")]
    NotFound(String),
    #[error("approval {id} is already {state}")]
    Closed { id: String, state: &'static str },
    #[error("{reviewer} is not in a reviewer group of rule `{rule}` ({groups})")]
    NotAReviewer {
        reviewer: String,
        rule: String,
        groups: String,
    },
    #[error("{reviewer} is {person}, who asked for this request, and cannot approve it")]
    SelfApproval { reviewer: String, person: String },
    #[error("{reviewer} is {person}, who already approved this request (as {earlier})")]
    AlreadyVoted {
        reviewer: String,
        person: String,
        earlier: String,
    },
    #[error("a reason is required")]
    ReasonRequired,
    #[error("the decision could not be recorded: {0}")]
    NotRecorded(String),
}

/// What the pipeline does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Approved: the request proceeds; its record names the approval.
    Proceed {
        approval_id: String,
        approvers: Vec<String>,
        reason: String,
    },
    /// Not (yet) approved: 403 with the approval id; `outcome` is pending, denied or
    /// expired.
    Refuse { approval_id: String, outcome: State },
    /// The requester has `max` approvals pending already: 429, nothing is created.
    TooMany { max: usize },
    /// The approval could not be recorded: fail closed.
    Unavailable(String),
}

struct Inner {
    open: HashMap<String, Approval>,
    waiters: HashMap<String, watch::Sender<State>>,
    /// The most recently closed approvals, newest last (the console's history; the
    /// `approvals` table is the complete one).
    closed: std::collections::VecDeque<Approval>,
}

const HISTORY: usize = 500;

impl Inner {
    fn close(&mut self, id: &str, state: State) {
        self.waiters.remove(id);
        if let Some(mut a) = self.open.remove(id) {
            a.state = state;
            if self.closed.len() == HISTORY {
                self.closed.pop_front();
            }
            self.closed.push_back(a);
        }
    }
}

pub struct Approvals {
    inner: Mutex<Inner>,
    /// Who is who, and the pending bound: from approvals.toml, replaced on reload.
    directory: ArcSwap<RuleSet>,
    records: Arc<dyn RecordSink>,
    path: PathBuf,
    notifier: notify::Notifier,
    metrics: Arc<crate::metrics::Metrics>,
}

fn now_us() -> i64 {
    micros::of(SystemTime::now())
}

impl Approvals {
    /// Loads the approvals still open from `state_dir`. Held requests lost their client
    /// with the previous agent: they are expired, and that is recorded.
    pub async fn open(
        state_dir: &Path,
        records: Arc<dyn RecordSink>,
        notifier: notify::Notifier,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Approvals> {
        let path = state_dir.join(STATE_FILE);
        let open: HashMap<String, Approval> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let this = Approvals {
            inner: Mutex::new(Inner {
                open,
                waiters: HashMap::new(),
                closed: Default::default(),
            }),
            directory: ArcSwap::from_pointee(RuleSet::default()),
            records,
            path,
            notifier,
            metrics,
        };
        let held: Vec<Approval> = this
            .lock()
            .open
            .values()
            .filter(|a| a.hold && a.state == State::Pending)
            .cloned()
            .collect();
        for a in held {
            this.record(
                &a,
                "expired",
                None,
                Some("the agent restarted while the request was held"),
            )
            .await
            .map_err(|e| anyhow::anyhow!("recording an expired approval: {e}"))?;
            this.lock().open.remove(&a.id);
        }
        let kept = this.lock().open.len();
        if kept > 0 {
            info!(open = kept, "approvals: kept from before the restart");
        }
        this.persist()?;
        Ok(this)
    }

    /// Takes the people and the pending bound of a rule set in force (at start and on
    /// each reload that is accepted). Pending approvals are judged by the new mapping.
    pub fn configure(&self, rules: Arc<RuleSet>) {
        self.directory.store(rules);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The approvals still open (pending, or approved with uses left), oldest first.
    pub fn list(&self) -> Vec<Approval> {
        let mut v: Vec<Approval> = self.lock().open.values().cloned().collect();
        v.sort_by_key(|a| a.created_us);
        v
    }

    pub fn get(&self, id: &str) -> Option<Approval> {
        let inner = self.lock();
        inner
            .open
            .get(id)
            .or_else(|| inner.closed.iter().rev().find(|a| a.id == id))
            .cloned()
    }

    /// Recently closed approvals, newest first.
    pub fn history(&self) -> Vec<Approval> {
        self.lock().closed.iter().rev().cloned().collect()
    }

    /// Decides whether a request that needs approval under `rule` may proceed.
    pub async fn gate(
        &self,
        rule: &ApprovalRule,
        binding: &Binding,
        summary: RequestSummary,
    ) -> Gate {
        let digest = binding.digest();
        let now = now_us();
        if rule.mode == Mode::Retry {
            // An approved grant for this exact request and requester, with uses left.
            let found = {
                let mut inner = self.lock();
                let hit = inner
                    .open
                    .values_mut()
                    .find(|a| a.digest == digest && a.requester == binding.requester && !a.hold);
                match hit {
                    Some(a)
                        if a.state == State::Approved
                            && a.grant_until_us.is_some_and(|t| t > now)
                            && a.uses_left > 0 =>
                    {
                        a.uses_left -= 1;
                        Some(Ok(a.clone()))
                    }
                    Some(a) if a.state == State::Pending => Some(Err(a.id.clone())),
                    _ => None,
                }
            };
            match found {
                Some(Ok(a)) => return self.used(a, &summary.request_id).await,
                Some(Err(id)) => {
                    return Gate::Refuse {
                        approval_id: id,
                        outcome: State::Pending,
                    }
                }
                None => {}
            }
        }
        // One person's pending approvals are bounded (each is a durable row, a rewrite
        // of the approvals file and a notification).
        let directory = self.directory.load();
        let who = binding.requester.person(&directory.people);
        let max = directory.max_pending_per_requester;
        let pending = self
            .lock()
            .open
            .values()
            .filter(|a| a.state == State::Pending && a.requester.person(&directory.people) == who)
            .count();
        if pending >= max {
            return Gate::TooMany { max };
        }
        let a = Approval {
            id: new_id(),
            rule: rule.name.clone(),
            hold: rule.mode == Mode::Hold,
            digest,
            requester: binding.requester.clone(),
            requester_person: who,
            summary,
            reviewers: rule.reviewers.clone(),
            quorum: rule.quorum,
            grant_us: rule.grant.as_micros() as i64,
            created_us: now,
            deadline_us: now + rule.timeout.as_micros() as i64,
            state: State::Pending,
            approvals: Vec::new(),
            denial: None,
            grant_until_us: None,
            uses_left: rule.uses,
        };
        let (tx, mut rx) = watch::channel(State::Pending);
        {
            let mut inner = self.lock();
            inner.open.insert(a.id.clone(), a.clone());
            inner.waiters.insert(a.id.clone(), tx);
        }
        if let Err(e) = self.record(&a, "requested", None, None).await {
            self.lock().open.remove(&a.id);
            return Gate::Unavailable(e);
        }
        if let Err(e) = self.persist() {
            warn!(error = %format!("{e:#}"), "approvals: cannot save open approvals");
        }
        info!(approval = %a.id, rule = %a.rule, "approval requested");
        self.notifier.requested(&a, rule, self.records.clone());

        if rule.mode == Mode::Retry {
            return Gate::Refuse {
                approval_id: a.id,
                outcome: State::Pending,
            };
        }
        // Hold: wait for a decision or the deadline.
        let decided = tokio::time::timeout(rule.timeout, async {
            rx.wait_for(|s| *s != State::Pending).await.map(|s| *s)
        })
        .await;
        let state = match decided {
            Ok(Ok(s)) => s,
            _ => self.expire(&a.id).await,
        };
        match state {
            State::Approved => {
                let approved = self.lock().open.get(&a.id).cloned();
                match approved {
                    Some(mut ap) => {
                        ap.uses_left = ap.uses_left.saturating_sub(1);
                        self.used(ap, &a.summary.request_id).await
                    }
                    None => Gate::Refuse {
                        approval_id: a.id,
                        outcome: State::Expired,
                    },
                }
            }
            other => Gate::Refuse {
                approval_id: a.id,
                outcome: other,
            },
        }
    }

    /// A grant is spent on this request: recorded before the request proceeds.
    async fn used(&self, a: Approval, request_id: &str) -> Gate {
        let note = format!("request {request_id}; {} use(s) left", a.uses_left);
        if let Err(e) = self.record(&a, "used", None, Some(&note)).await {
            return Gate::Unavailable(e);
        }
        {
            let mut inner = self.lock();
            if a.uses_left == 0 || a.hold {
                inner.close(&a.id, State::Used);
            } else if let Some(x) = inner.open.get_mut(&a.id) {
                x.uses_left = a.uses_left;
            }
        }
        if let Err(e) = self.persist() {
            warn!(error = %format!("{e:#}"), "approvals: cannot save open approvals");
        }
        Gate::Proceed {
            approvers: a.approvals.iter().map(|v| v.reviewer.clone()).collect(),
            reason: a
                .approvals
                .iter()
                .map(|v| v.reason.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            approval_id: a.id,
        }
    }

    /// Expires a pending approval (if still pending); returns its final state.
    async fn expire(&self, id: &str) -> State {
        let a = {
            let mut inner = self.lock();
            match inner.open.get_mut(id) {
                Some(a) if a.state == State::Pending => {
                    a.state = State::Expired;
                    a.clone()
                }
                Some(a) => return a.state,
                None => return State::Expired,
            }
        };
        if let Err(e) = self.record(&a, "expired", None, None).await {
            warn!(approval = %id, error = %e, "approvals: cannot record an expiry");
        }
        self.finish(id, State::Expired);
        info!(approval = %id, "approval expired");
        State::Expired
    }

    /// Drops what is over: pending approvals past their deadline, grants past their
    /// window. Run periodically.
    pub async fn sweep(&self) {
        let now = now_us();
        let (overdue, stale): (Vec<String>, Vec<Approval>) = {
            let inner = self.lock();
            let overdue = inner
                .open
                .values()
                .filter(|a| a.state == State::Pending && a.deadline_us <= now)
                .map(|a| a.id.clone())
                .collect();
            let stale = inner
                .open
                .values()
                .filter(|a| {
                    a.state == State::Approved && a.grant_until_us.is_some_and(|t| t <= now)
                })
                .cloned()
                .collect();
            (overdue, stale)
        };
        for id in overdue {
            self.expire(&id).await;
        }
        for a in stale {
            let _ = self
                .record(&a, "used", None, Some("grant window closed with uses left"))
                .await;
            self.finish(&a.id, State::Used);
        }
    }

    /// A reviewer's decision. The vote is recorded (durably) before it counts.
    pub async fn decide(
        &self,
        id: &str,
        reviewer: &Reviewer,
        verdict: Verdict,
        reason: &str,
    ) -> Result<Approval, DecideError> {
        let reason = reason.trim();
        let (a, person) = {
            let inner = self.lock();
            let a = inner
                .open
                .get(id)
                .ok_or_else(|| DecideError::NotFound(id.to_owned()))?;
            if a.state != State::Pending {
                return Err(DecideError::Closed {
                    id: id.to_owned(),
                    state: a.state.as_str(),
                });
            }
            if !a.reviewers.iter().any(|g| reviewer.groups.contains(g)) {
                return Err(DecideError::NotAReviewer {
                    reviewer: reviewer.name.clone(),
                    rule: a.rule.clone(),
                    groups: a.reviewers.join(", "),
                });
            }
            // Persons, not names: the requester under any name they have, and each
            // person once toward the quorum.
            let directory = self.directory.load();
            let people = &directory.people;
            let person = people.person(reviewer.via.name(&reviewer.name));
            if a.requester.persons(people).contains(&person) {
                return Err(DecideError::SelfApproval {
                    reviewer: reviewer.name.clone(),
                    person,
                });
            }
            if reason.is_empty() {
                return Err(DecideError::ReasonRequired);
            }
            if let Some(v) = a
                .approvals
                .iter()
                .find(|v| people.person(Via::parse(&v.via).name(&v.reviewer)) == person)
            {
                return Err(DecideError::AlreadyVoted {
                    reviewer: reviewer.name.clone(),
                    person,
                    earlier: format!("{} via {}", v.reviewer, v.via),
                });
            }
            (a.clone(), person)
        };
        let vote = Vote {
            reviewer: reviewer.name.clone(),
            person,
            reason: reason.to_owned(),
            time_us: now_us(),
            via: reviewer.via.as_str().to_owned(),
        };
        let state_row = match verdict {
            Verdict::Approve => "approved",
            Verdict::Deny => "denied",
        };
        self.record(&a, state_row, Some(&vote), None)
            .await
            .map_err(DecideError::NotRecorded)?;
        let (after, final_state) = {
            let mut inner = self.lock();
            let Some(x) = inner.open.get_mut(id) else {
                return Err(DecideError::NotFound(id.to_owned()));
            };
            if x.state != State::Pending {
                // Expired while the vote was being recorded.
                return Err(DecideError::Closed {
                    id: id.to_owned(),
                    state: x.state.as_str(),
                });
            }
            match verdict {
                Verdict::Deny => {
                    x.denial = Some(vote);
                    x.state = State::Denied;
                }
                Verdict::Approve => {
                    x.approvals.push(vote);
                    if x.approvals.len() >= x.quorum {
                        x.state = State::Approved;
                        x.grant_until_us = Some(now_us() + x.grant_us);
                    }
                }
            }
            (x.clone(), x.state)
        };
        info!(approval = %id, reviewer = %reviewer.name, state = final_state.as_str(), "approval decided");
        match final_state {
            State::Denied => self.finish(id, State::Denied),
            State::Approved => {
                if let Some(tx) = self.lock().waiters.get(id) {
                    let _ = tx.send(State::Approved);
                }
                if let Err(e) = self.persist() {
                    warn!(error = %format!("{e:#}"), "approvals: cannot save open approvals");
                }
            }
            _ => {
                if let Err(e) = self.persist() {
                    warn!(error = %format!("{e:#}"), "approvals: cannot save open approvals");
                }
            }
        }
        Ok(after)
    }

    /// Closes an approval: waiters learn the outcome, it leaves the open set.
    fn finish(&self, id: &str, state: State) {
        {
            let mut inner = self.lock();
            if let Some(tx) = inner.waiters.get(id) {
                let _ = tx.send(state);
            }
            inner.close(id, state);
        }
        if let Err(e) = self.persist() {
            warn!(error = %format!("{e:#}"), "approvals: cannot save open approvals");
        }
    }

    /// Writes the open approvals (atomically, fsynced) so they survive a restart.
    fn persist(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&self.lock().open)?;
        crate::record::writer::write_atomically(&self.path, &bytes)
    }

    /// One `approvals` row, durable before the change it records takes effect.
    async fn record(
        &self,
        a: &Approval,
        state: &'static str,
        vote: Option<&Vote>,
        note: Option<&str>,
    ) -> Result<(), String> {
        self.metrics
            .approval_transitions
            .get_or_create(&crate::metrics::StateLabels {
                state: state.to_owned(),
            })
            .inc();
        let rec = ApprovalRecord {
            approval_id: a.id.clone(),
            time: SystemTime::now(),
            origin: self.records.origin().clone(),
            state,
            rule: a.rule.clone(),
            request_id: Some(a.summary.request_id.clone()),
            request_digest: a.digest.clone(),
            requester: a.requester.principal.clone(),
            requester_person: Some(a.requester_person.clone()),
            reviewer: vote.map(|v| v.reviewer.clone()),
            reviewer_person: vote.map(|v| v.person.clone()),
            reason: vote.map(|v| v.reason.clone()),
            error: note.map(str::to_owned),
        };
        self.records
            .submit(Record::Approval(rec))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Runs [`Approvals::sweep`] every second until the approvals are dropped.
pub fn spawn_sweeper(approvals: &Arc<Approvals>) {
    let weak = Arc::downgrade(approvals);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(a) = weak.upgrade() else { return };
            a.sweep().await;
        }
    });
}

#[cfg(test)]
mod tests;
