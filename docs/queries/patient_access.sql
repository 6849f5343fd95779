-- Who accessed patient X between two dates (accounting of disclosures).
-- Records never hold the raw patient id: get its pseudonym on the host first,
--   phigate audit pseudonym 123          ->  p:4f1c...
--   SET VARIABLE patient = 'p:4f1c...';
--   SET VARIABLE date_from = DATE '2026-01-01';
--   SET VARIABLE date_to = DATE '2026-12-31';     -- inclusive
SELECT
    start_time,
    coalesce(oidc_subject, user, CAST(uid AS VARCHAR)) AS who,
    oidc_subject,
    user,
    systemd_unit,
    exe_path,
    destination,
    method,
    path,
    status,
    decision,
    policy_ids,
    masking_profile,
    approval_id,
    request_id
FROM requests
WHERE list_contains(patient_refs, getvariable('patient'))
  AND date BETWEEN getvariable('date_from') AND getvariable('date_to')
ORDER BY start_time;
