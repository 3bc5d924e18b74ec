-- doai schema v4 (aggregator trust boundary): dead letters say why in a
-- machine-readable reason, and keep only the head of their payload plus its
-- size and SHA-256 (a flood of large junk cannot fill the disk).

ALTER TABLE dead_letters
    ADD COLUMN reason text NOT NULL DEFAULT 'unclassified',
    ADD COLUMN raw_size bigint,
    ADD COLUMN raw_sha256 text;

-- Rows written before v4 kept their payload whole: describe it the same way.
UPDATE dead_letters SET raw_size = length(raw), raw_sha256 = encode(sha256(raw), 'hex');
ALTER TABLE dead_letters ALTER COLUMN raw_size SET NOT NULL, ALTER COLUMN raw_sha256 SET NOT NULL;
CREATE INDEX dead_letters_reason ON dead_letters (reason, received_at);

-- Before v4 a node timestamp was folded as sent, so an event dated in the future
-- froze its row there. Bring such rows back to now; the next real report applies.
UPDATE nodes SET last_seen = now() WHERE last_seen > now() + interval '30 seconds';
UPDATE devices SET last_seen = now() WHERE last_seen > now() + interval '30 seconds';
UPDATE node_inventories SET taken_at = now() WHERE taken_at > now() + interval '30 seconds';
UPDATE run_tasks SET
    started_at = CASE WHEN started_at > now() THEN now() ELSE started_at END,
    finished_at = CASE WHEN finished_at > now() THEN now() ELSE finished_at END
WHERE started_at > now() + interval '30 seconds' OR finished_at > now() + interval '30 seconds';
UPDATE step_results SET
    started_at = CASE WHEN started_at > now() THEN now() ELSE started_at END,
    finished_at = CASE WHEN finished_at > now() THEN now() ELSE finished_at END
WHERE started_at > now() + interval '30 seconds' OR finished_at > now() + interval '30 seconds';
UPDATE runs SET finished_at = now() WHERE finished_at > now() + interval '30 seconds';
UPDATE artifacts SET created_at = now() WHERE created_at > now() + interval '30 seconds';
