-- doai schema v10 (operator surface): an artifact says what it is. `screenshot` is
-- what an upload step stored; `failure` is the screen a node captured when a step
-- failed (issue 11 item 4). Rows from before v10 are upload screenshots.
ALTER TABLE artifacts ADD COLUMN kind text NOT NULL DEFAULT 'screenshot';
CREATE INDEX artifacts_kind ON artifacts (kind, created_at DESC);
