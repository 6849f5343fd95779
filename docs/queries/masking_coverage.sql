-- Masking coverage per endpoint: how many responses went out under a masking
-- profile, and how many values of each entity type were masked. Patient ids in
-- paths are already pseudonyms, so they are folded into `{patient}` here.
SELECT
    destination,
    method,
    regexp_replace(path, 'p:[0-9a-f]{32}', '{patient}', 'g') AS endpoint,
    count(*) AS responses,
    count(masking_profile) AS masked_responses,
    round(100.0 * count(masking_profile) / count(*), 1) AS masked_pct,
    list_distinct(list(masking_profile) FILTER (WHERE masking_profile IS NOT NULL)) AS profiles,
    sum(coalesce(list_sum(map_values(masking_counts)), 0)) AS values_masked
FROM requests
WHERE outcome = 'complete'
GROUP BY ALL
ORDER BY responses DESC;

-- The same by entity type.
SELECT
    destination,
    e.key AS entity,
    sum(e.value) AS values_masked
FROM requests, unnest(map_entries(masking_counts)) AS t(e)
GROUP BY ALL
ORDER BY values_masked DESC;
