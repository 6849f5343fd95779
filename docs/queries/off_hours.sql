-- Access outside working hours (UTC; shift with `AT TIME ZONE` for local time):
-- before 07:00, from 19:00, or on a weekend.
--   SET VARIABLE tz = 'UTC';                  -- e.g. 'America/Chicago'
SELECT
    start_time AT TIME ZONE getvariable('tz') AS local_time,
    dayname(start_time AT TIME ZONE getvariable('tz')) AS weekday,
    coalesce(oidc_subject, user, CAST(uid AS VARCHAR)) AS who,
    systemd_unit,
    destination,
    method,
    path,
    status,
    decision,
    request_id
FROM requests
WHERE hour(start_time AT TIME ZONE getvariable('tz')) NOT BETWEEN 7 AND 18
   OR isodow(start_time AT TIME ZONE getvariable('tz')) IN (6, 7)
ORDER BY start_time;
