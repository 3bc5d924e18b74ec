-- doai schema v6 (honest fleet state): lost tasks, one source of liveness,
-- bounded growth.
--
-- A task whose node has sent no heartbeat for the grace period is `lost`
-- (written by the aggregator's housekeeping loop, never by a node event; it
-- keeps the task's `seq`, so any later node report outranks it). `lost_at`
-- says when; it is cleared when a node report replaces the state.
ALTER TABLE run_tasks ADD COLUMN lost_at timestamptz;

-- Liveness, one rule for REST, run creation and Grafana: a node is alive when
-- its last heartbeat is within the window; while it is not, it is not
-- `vendor_connected` and none of its devices is `online`.
CREATE OR REPLACE VIEW device_liveness AS
SELECT d.node_id, d.serial, d.status, d.model, d.name, d.last_seen,
       extract(epoch FROM now() - d.last_seen)::double precision AS age_s,
       (d.status = 'online' AND d.last_seen >= now() - liveness_window()
        AND COALESCE(n.last_seen >= now() - liveness_window(), false)) AS online,
       CASE WHEN d.status <> 'online' THEN d.status
            WHEN d.last_seen < now() - liveness_window() THEN 'stale'
            WHEN NOT COALESCE(n.last_seen >= now() - liveness_window(), false) THEN 'stale'
            ELSE 'online' END AS liveness
FROM devices d
LEFT JOIN nodes n USING (node_id);

CREATE OR REPLACE VIEW node_liveness AS
SELECT n.node_id, n.slots, n.running, n.queued,
       (n.vendor_connected AND n.last_seen >= now() - liveness_window()) AS vendor_connected,
       n.version, n.last_seen,
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

-- `lost` is counted (last column, so the view keeps its earlier columns) and is
-- "done for now": a run whose open tasks are all lost reads `completed`.
CREATE OR REPLACE VIEW run_summary AS
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
       count(*) FILTER (WHERE t.state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped', 'lost')) AS done,
       (count(*) FILTER (WHERE t.state = 'succeeded'))::double precision
           / NULLIF(count(*) FILTER (WHERE t.state IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped',
                                                       'lost')), 0)
           AS success_rate,
       count(*) FILTER (WHERE t.state = 'lost') AS lost
FROM runs r
LEFT JOIN run_tasks t USING (run_id)
GROUP BY r.run_id;

-- Open tasks per node, for the lost-task sweep.
CREATE INDEX run_tasks_open ON run_tasks (node_id)
    WHERE state IN ('queued', 'running', 'interrupted');
CREATE INDEX run_tasks_lost ON run_tasks (run_id) WHERE state = 'lost';

-- Retention (pruned by supervised loops; see docs/backend.md and docs/aggregator.md).
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
CREATE INDEX dead_letters_age ON dead_letters (received_at, id);
