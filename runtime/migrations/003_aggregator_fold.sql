-- doai schema v3 (aggregator): idempotence by event_id, order-independent
-- inventory, and the views that the REST API and Grafana share.

-- Every event the fold has applied, claimed in the same transaction as its
-- effects: a redelivered, replayed or duplicated event is skipped whole.
-- Rows older than the stream's retention (7 days) can never come back and are
-- pruned by the aggregator.
CREATE TABLE processed_events (
    event_id      text        PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_age ON processed_events (processed_at);

-- A dead letter is stored once: by event_id when the message decoded, else by
-- its place in the stream and its bytes.
ALTER TABLE dead_letters ADD COLUMN event_id text;
CREATE UNIQUE INDEX dead_letters_event ON dead_letters (event_id) WHERE event_id IS NOT NULL;
CREATE UNIQUE INDEX dead_letters_message ON dead_letters (subject, stream_seq, md5(raw))
    WHERE event_id IS NULL AND stream_seq IS NOT NULL;

-- Two uploads under the same key: the one with the higher per-device seq wins.
ALTER TABLE artifacts ADD COLUMN seq bigint NOT NULL DEFAULT 0;
CREATE INDEX artifacts_created_at ON artifacts (created_at DESC);

-- The newest usable inventory of each node. A device its node's newest
-- inventory does not list is `gone`, whatever order the inventories came in.
CREATE TABLE node_inventories (
    node_id   text        PRIMARY KEY,
    taken_at  timestamptz NOT NULL,
    devices   integer     NOT NULL
);

CREATE INDEX run_tasks_finished_at ON run_tasks (finished_at);
CREATE INDEX step_results_finished_at ON step_results (finished_at);

-- Settings shared by everything that reads liveness (aggregator writes
-- `liveness_window_s` from DOAI_LIVENESS_WINDOW_S at start-up when it is set).
CREATE TABLE fleet_settings (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
INSERT INTO fleet_settings (name, value) VALUES ('liveness_window_s', '60');

CREATE FUNCTION liveness_window() RETURNS interval LANGUAGE sql STABLE AS $$
    SELECT make_interval(secs => COALESCE(
        (SELECT value::double precision FROM fleet_settings WHERE name = 'liveness_window_s'), 60))
$$;

-- Devices with their liveness: `online` only when the node listed them online
-- within the window; `liveness` is online | stale | the listed status (offline, gone, ...).
CREATE VIEW device_liveness AS
SELECT d.node_id, d.serial, d.status, d.model, d.name, d.last_seen,
       extract(epoch FROM now() - d.last_seen)::double precision AS age_s,
       (d.status = 'online' AND d.last_seen >= now() - liveness_window()) AS online,
       CASE WHEN d.status <> 'online' THEN d.status
            WHEN d.last_seen < now() - liveness_window() THEN 'stale'
            ELSE 'online' END AS liveness
FROM devices d;

-- Nodes with their liveness (from heartbeats) and device counts (from inventories).
CREATE VIEW node_liveness AS
SELECT n.node_id, n.slots, n.running, n.queued, n.vendor_connected, n.version, n.last_seen,
       extract(epoch FROM now() - n.last_seen)::double precision AS age_s,
       (n.last_seen >= now() - liveness_window()) AS online,
       CASE WHEN n.last_seen >= now() - liveness_window() THEN n.running ELSE 0 END AS busy_slots,
       COALESCE(d.devices_online, 0) AS devices_online,
       COALESCE(d.devices_listed, 0) AS devices_listed
FROM nodes n
LEFT JOIN (
    SELECT node_id, count(*) FILTER (WHERE online) AS devices_online,
           count(*) FILTER (WHERE status <> 'gone') AS devices_listed
    FROM device_liveness GROUP BY node_id
) d USING (node_id);

-- A run with its per-state task counts, derived from run_tasks (never counted up by hand).
CREATE VIEW run_summary AS
SELECT r.run_id, r.workflow_id, r.workflow_version, r.status, r.created_at, r.dispatched_at, r.finished_at,
       count(t.run_id) AS tasks,
       count(*) FILTER (WHERE t.state = 'queued') AS queued,
       count(*) FILTER (WHERE t.state = 'running') AS running,
       count(*) FILTER (WHERE t.state = 'interrupted') AS interrupted,
       count(*) FILTER (WHERE t.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE t.state = 'failed') AS failed,
       count(*) FILTER (WHERE t.state = 'timed_out') AS timed_out,
       count(*) FILTER (WHERE t.state = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE t.state = 'skipped') AS skipped,
       count(*) FILTER (WHERE t.state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')) AS done,
       (count(*) FILTER (WHERE t.state = 'succeeded'))::double precision
           / NULLIF(count(*) FILTER (WHERE t.state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')), 0)
           AS success_rate
FROM runs r
LEFT JOIN run_tasks t USING (run_id)
GROUP BY r.run_id;

-- One row per device task that has started, with its node-observed duration when finished.
CREATE VIEW task_outcomes AS
SELECT t.run_id, r.workflow_id, r.workflow_version, t.node_id, t.device_serial, t.state, t.attempt,
       t.started_at, t.finished_at,
       extract(epoch FROM t.finished_at - t.started_at)::double precision AS duration_s,
       t.failed_step, t.error,
       CASE WHEN t.state IN ('failed', 'timed_out') THEN
           COALESCE(NULLIF(split_part(t.error, ':', 1), ''), t.state) END AS error_code
FROM run_tasks t
JOIN runs r USING (run_id)
WHERE t.state <> 'queued';

-- One row per step result, with its duration and error code.
CREATE VIEW step_outcomes AS
SELECT s.run_id, r.workflow_id, r.workflow_version, s.node_id, s.device_serial, s.step_id, s.idx, s.action,
       s.state, s.started_at, s.finished_at,
       extract(epoch FROM s.finished_at - s.started_at)::double precision AS duration_s,
       s.error,
       CASE WHEN s.state IN ('failed', 'timed_out') THEN
           COALESCE(NULLIF(split_part(s.error, ':', 1), ''), s.state) END AS error_code
FROM step_results s
JOIN runs r USING (run_id);
