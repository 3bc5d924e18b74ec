-- doai schema v30: the artifact link key stays with the backend.
-- Until v30 any role that could read the database (Grafana's read-only role
-- included) could read fleet_settings('artifact_url_key') and sign links of its
-- own: for any key, expiring whenever it liked. Now:
--  * row-level security hides that row from every role that cannot write the
--    table (a writer could overwrite the key anyway): Grafana's read-only role
--    and pg_read_all_data no longer see it; the table's owner (the role that ran
--    the migrations) bypasses the policies as before;
--  * artifact_url() runs with its owner's rights (SECURITY DEFINER), so Grafana
--    still gets its image links, but only for artifacts that are recorded, and
--    only expiring after fleet_settings('artifact_url_ttl_s').
ALTER TABLE fleet_settings ENABLE ROW LEVEL SECURITY;
CREATE POLICY fleet_settings_readable ON fleet_settings FOR SELECT
    USING (name <> 'artifact_url_key' OR has_table_privilege('fleet_settings', 'INSERT'));
-- Writes stay governed by privileges alone (a backend role other than the owner keeps working).
CREATE POLICY fleet_settings_insert ON fleet_settings FOR INSERT WITH CHECK (true);
CREATE POLICY fleet_settings_update ON fleet_settings FOR UPDATE USING (true) WITH CHECK (true);
CREATE POLICY fleet_settings_delete ON fleet_settings FOR DELETE USING (true);

CREATE OR REPLACE FUNCTION artifact_url(p_store text, p_key text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT s.base || '/v1/artifacts/' || p_store || '/'
           || replace(replace(replace(p_key, ' ', '%20'), '?', '%3F'), '#', '%23')
           || '?expires=' || s.expires || '&sig='
           || encode(doai_hmac_sha256(convert_to(s.k, 'UTF8'),
                                      convert_to(p_store || E'\n' || p_key || E'\n' || s.expires, 'UTF8')), 'hex')
    FROM (SELECT (SELECT value FROM fleet_settings WHERE name = 'api_public_url') AS base,
                 (SELECT value FROM fleet_settings WHERE name = 'artifact_url_key') AS k,
                 extract(epoch FROM now())::bigint
                 + COALESCE((SELECT value::bigint FROM fleet_settings WHERE name = 'artifact_url_ttl_s'), 3600)
                 AS expires) s
    WHERE s.base IS NOT NULL AND s.k IS NOT NULL
      AND EXISTS (SELECT 1 FROM artifacts a WHERE a.store = p_store AND a.key = p_key)
$$;
