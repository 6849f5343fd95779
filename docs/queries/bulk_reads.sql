-- Bulk reads: FHIR bulk export, searches asking for many results, and responses
-- larger than a threshold.
--   SET VARIABLE min_count = 100;             -- _count at or above this
--   SET VARIABLE min_bytes = 1000000;         -- responses at or above this size
SELECT
    start_time,
    coalesce(oidc_subject, user, CAST(uid AS VARCHAR)) AS who,
    systemd_unit,
    destination,
    method,
    path,
    query,
    response_bytes,
    len(patient_refs) AS patients_named,
    decision,
    approval_id,
    request_id
FROM requests
WHERE path LIKE '%$export%'
   OR TRY_CAST(regexp_extract(query, '(^|&)_count=([0-9]+)', 2) AS BIGINT) >= getvariable('min_count')
   OR response_bytes >= getvariable('min_bytes')
ORDER BY start_time;
