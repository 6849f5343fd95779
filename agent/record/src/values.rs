//! The closed sets of values some text columns hold: how a connection and an HTTP
//! exchange ended, and what was decided about a request. The columns hold their
//! `snake_case` names (the schema is a contract: a name never changes).

use serde::Serialize;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides finished normally.
    Closed,
    /// Accepted on the listener but not redirected by our programs: refused.
    NotRedirected,
    /// The original destination refused or could not be reached.
    UpstreamUnreachable,
    UpstreamTimeout,
    /// No bytes either way for longer than the idle timeout.
    IdleTimeout,
    /// The maximum connection lifetime (automatic logoff) was reached.
    LifetimeExceeded,
    /// The agent was shutting down and the drain bound elapsed.
    Drained,
    /// An I/O error on either side.
    Error,
    /// An `https` destination received bytes that are not a TLS ClientHello.
    NotTls,
    /// The TLS handshake with the client failed or timed out.
    TlsHandshakeFailed,
    /// Inside TLS (or on an `http` destination), the bytes were not HTTP.
    NotHttp,
    /// A passthrough host: relayed as TCP without inspection.
    Uninspected,
    /// Records could not be written: the connection was refused (fail closed).
    RecordsUnavailable,
    /// A new policy set no longer allowed what the connection was doing: closed.
    Revoked,
    /// The policies do not allow the connection (a `TCP` or `TUNNEL` passage).
    Denied,
}

/// What the policies (and reviewers) decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestDecision {
    Allow,
    Deny,
    /// Waiting for an approval (or refused at once in retry mode).
    Held,
    /// Allowed because reviewers approved this request.
    Approved,
    /// No reviewer decided in time.
    Expired,
}

impl RequestDecision {
    /// As the `decision` column and the metrics label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestDecision::Allow => "allow",
            RequestDecision::Deny => "deny",
            RequestDecision::Held => "held",
            RequestDecision::Approved => "approved",
            RequestDecision::Expired => "expired",
        }
    }
}

/// How an HTTP exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestOutcome {
    /// The response went to the client whole.
    Complete,
    /// The client went away before the response ended.
    ClientAborted,
    /// phigate answered itself: a policy denial or a stage's refusal.
    Refused,
    UpstreamError,
    UpstreamTimeout,
    /// A body the profile applies to could not be masked: not passed.
    MaskingFailed,
    /// An upgraded tunnel failed on either side.
    UpgradeFailed,
    /// An upgraded tunnel closed by a new policy set.
    Revoked,
    IdleTimeout,
    LifetimeExceeded,
    Drained,
}

impl RequestOutcome {
    /// As the `outcome` column and the metrics label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Complete => "complete",
            RequestOutcome::ClientAborted => "client_aborted",
            RequestOutcome::Refused => "refused",
            RequestOutcome::UpstreamError => "upstream_error",
            RequestOutcome::UpstreamTimeout => "upstream_timeout",
            RequestOutcome::MaskingFailed => "masking_failed",
            RequestOutcome::UpgradeFailed => "upgrade_failed",
            RequestOutcome::Revoked => "revoked",
            RequestOutcome::IdleTimeout => "idle_timeout",
            RequestOutcome::LifetimeExceeded => "lifetime_exceeded",
            RequestOutcome::Drained => "drained",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns hold the same strings as every earlier version (the schema is a
    /// contract), and metrics label them alike.
    #[test]
    fn typed_decisions_and_outcomes_are_written_as_their_names() {
        use RequestDecision as D;
        use RequestOutcome as O;
        for d in [D::Allow, D::Deny, D::Held, D::Approved, D::Expired] {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        for o in [
            O::Complete,
            O::ClientAborted,
            O::Refused,
            O::UpstreamError,
            O::UpstreamTimeout,
            O::MaskingFailed,
            O::UpgradeFailed,
            O::Revoked,
            O::IdleTimeout,
            O::LifetimeExceeded,
            O::Drained,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }
}
