-- doai schema v10 (operator surface): an artifact says what it is. `screenshot` is
-- what an upload step stored; `failure` is the screen a node captured when a step
-- failed (issue 11 item 4). Rows from before v10 are upload screenshots.
ALTER TABLE artifacts ADD COLUMN kind text NOT NULL DEFAULT 'screenshot';
CREATE INDEX artifacts_kind ON artifacts (kind, created_at DESC);

-- Download links Grafana can put in an image cell (issue 11 item 7). The backend
-- serves `/v1/artifacts/{store}/{key}?expires=&sig=`: the local store's file, or a
-- redirect to a fresh Supabase signed URL. `sig` is the HMAC-SHA256, under the
-- key the backend keeps in fleet_settings('artifact_url_key'), of
-- "<store>\n<key>\n<expires>". Whoever can read this database can make such a
-- link, as they can read everything else the fleet recorded.
CREATE FUNCTION doai_hmac_sha256(k bytea, m bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    kp bytea := k;
    ip bytea;
    op bytea;
BEGIN
    IF length(kp) > 64 THEN
        kp := sha256(kp);
    END IF;
    kp := kp || decode(repeat('00', 64 - length(kp)), 'hex');
    ip := kp;
    op := kp;
    FOR i IN 0..63 LOOP
        ip := set_byte(ip, i, get_byte(kp, i) # 54);
        op := set_byte(op, i, get_byte(kp, i) # 92);
    END LOOP;
    RETURN sha256(op || sha256(ip || m));
END $$;

-- The link for one artifact, valid for fleet_settings('artifact_url_ttl_s') seconds from now; NULL until a
-- backend has started (it writes its address and the key).
CREATE FUNCTION artifact_url(p_store text, p_key text) RETURNS text LANGUAGE sql STABLE AS $$
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
$$;
