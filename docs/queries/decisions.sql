-- Requests that were not simply allowed, or that needed a person: denials, holds,
-- approvals and expiries, with the deciding policies and the reviewers.
--   SET VARIABLE date_from = DATE '2026-01-01';
--   SET VARIABLE date_to = DATE '2026-12-31';
SELECT
    start_time,
    decision,
    policy_ids,
    coalesce(oidc_subject, user, CAST(uid AS VARCHAR)) AS requester,
    systemd_unit,
    destination,
    method,
    path,
    status,
    approval_id,
    approvers,
    approval_reason,
    error,
    request_id
FROM requests
WHERE (decision <> 'allow' OR approval_id IS NOT NULL OR status IN (401, 403))
  AND date BETWEEN getvariable('date_from') AND getvariable('date_to')
ORDER BY start_time;
