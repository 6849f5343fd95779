-- Everything one identity did: a login name, a systemd unit or an OIDC subject.
--   SET VARIABLE who = 'billing-sync.service';   -- or 'alice', or a token subject
--   SET VARIABLE date_from = DATE '2026-01-01';
--   SET VARIABLE date_to = DATE '2026-12-31';
SELECT
    start_time,
    user,
    systemd_unit,
    oidc_subject,
    destination,
    method,
    path,
    query,
    status,
    decision,
    policy_ids,
    len(patient_refs) AS patients,
    response_bytes,
    request_id
FROM requests
WHERE getvariable('who') IN (user, systemd_unit, oidc_subject)
  AND date BETWEEN getvariable('date_from') AND getvariable('date_to')
ORDER BY start_time;
