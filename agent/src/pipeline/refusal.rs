//! Why phigate answers a request itself. A stage that refuses returns a [`Refusal`]:
//! its code (the `error` of the JSON answer, one per reason), the status, and the
//! reason in words. One place ([`super::Exchange::refuse`]) turns it into the answer
//! and the record, whose outcome follows from the code, never from a string.

use http::StatusCode;

use crate::record::RequestOutcome;

/// Every reason phigate answers a request itself (policy denials aside, which name
/// their policies: see `Exchange::deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Records cannot be written: nothing passes unrecorded.
    RecordsUnavailable,
    /// The request cannot be read as HTTP phigate decides on.
    BadRequest,
    /// Two readings of the request are possible (a second credential, a method
    /// override, ...).
    AmbiguousRequest,
    /// The request names a host the connection was not made for.
    MisdirectedRequest,
    /// A new policy set took the connection's access back.
    AccessRevoked,
    RequestTooLarge,
    /// A protocol upgrade under a masking obligation.
    UpgradeRefused,
    /// A body the masking profile applies to could not be masked.
    MaskingFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
    /// The destination's upstream credential could not be obtained (a failed token
    /// fetch): the request does not go out, with no credential or the client's.
    UpstreamCredentialUnavailable,
    /// The upstream's response repeated the credential phigate presented (an echo
    /// of the request): not passed to the app.
    CredentialReflected,
    /// A policy names an approval rule that does not exist.
    ApprovalUnavailable,
    ApprovalPending,
    ApprovalDenied,
    ApprovalExpired,
    /// The requester has the most approvals pending already.
    TooManyPendingApprovals,
}

impl Code {
    /// The `error` of the JSON answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::RecordsUnavailable => "records_unavailable",
            Code::BadRequest => "bad_request",
            Code::AmbiguousRequest => "ambiguous_request",
            Code::MisdirectedRequest => "misdirected_request",
            Code::AccessRevoked => "access_revoked",
            Code::RequestTooLarge => "request_too_large",
            Code::UpgradeRefused => "upgrade_refused",
            Code::MaskingFailed => "masking_failed",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::UpstreamUnavailable => "upstream_unavailable",
            Code::UpstreamCredentialUnavailable => "upstream_credential_unavailable",
            Code::CredentialReflected => "credential_reflected",
            Code::ApprovalUnavailable => "approval_unavailable",
            Code::ApprovalPending => "approval_pending",
            Code::ApprovalDenied => "approval_denied",
            Code::ApprovalExpired => "approval_expired",
            Code::TooManyPendingApprovals => "too_many_pending_approvals",
        }
    }

    /// The status it answers with, unless the stage says otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            Code::RecordsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::BadRequest | Code::AmbiguousRequest => StatusCode::BAD_REQUEST,
            Code::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            Code::AccessRevoked
            | Code::UpgradeRefused
            | Code::ApprovalUnavailable
            | Code::ApprovalPending
            | Code::ApprovalDenied
            | Code::ApprovalExpired => StatusCode::FORBIDDEN,
            Code::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::MaskingFailed
            | Code::UpstreamUnavailable
            | Code::UpstreamCredentialUnavailable
            | Code::CredentialReflected => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::TooManyPendingApprovals => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// How the exchange's record ends.
    pub fn outcome(self) -> RequestOutcome {
        match self {
            Code::MaskingFailed => RequestOutcome::MaskingFailed,
            Code::UpstreamTimeout => RequestOutcome::UpstreamTimeout,
            Code::UpstreamUnavailable
            | Code::UpstreamCredentialUnavailable
            | Code::CredentialReflected => RequestOutcome::UpstreamError,
            _ => RequestOutcome::Refused,
        }
    }
}

/// A stage's refusal: what phigate answers instead of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: Code, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            status: code.status(),
            reason: reason.into(),
        }
    }

    /// The same refusal with another status (a request body that cannot be masked
    /// is the client's 400, a response body the upstream's 502).
    pub fn with_status(mut self, status: StatusCode) -> Refusal {
        self.status = status;
        self
    }
}

impl From<crate::http::admit::Refusal> for Refusal {
    fn from(r: crate::http::admit::Refusal) -> Refusal {
        let code = match r {
            crate::http::admit::Refusal::Ambiguous(_) => Code::AmbiguousRequest,
            crate::http::admit::Refusal::Misdirected(_) => Code::MisdirectedRequest,
        };
        Refusal::new(code, r.message()).with_status(r.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_keep_the_answers_and_outcomes_records_had() {
        // The record schema is a contract: the strings are those of every earlier
        // version.
        let cases = [
            (Code::MaskingFailed, "masking_failed", 502, "masking_failed"),
            (
                Code::UpstreamTimeout,
                "upstream_timeout",
                504,
                "upstream_timeout",
            ),
            (
                Code::UpstreamUnavailable,
                "upstream_unavailable",
                502,
                "upstream_error",
            ),
            (
                Code::RecordsUnavailable,
                "records_unavailable",
                503,
                "refused",
            ),
            (
                Code::MisdirectedRequest,
                "misdirected_request",
                421,
                "refused",
            ),
            (
                Code::TooManyPendingApprovals,
                "too_many_pending_approvals",
                429,
                "refused",
            ),
        ];
        for (code, text, status, outcome) in cases {
            assert_eq!(code.as_str(), text);
            assert_eq!(code.status().as_u16(), status);
            assert_eq!(code.outcome().as_str(), outcome);
        }
    }
}
