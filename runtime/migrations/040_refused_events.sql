-- doai schema v40: how many events each node set aside as too large for NATS.
-- A node moves an event NATS will never take (over max_payload or DOAI_EVT's
-- max_msg_size) out of its outbox into its journal's `outbox_refused`, and
-- each heartbeat reports how many are there (0 from nodes older than this).
-- Not zero means events of that node are missing here until an operator puts
-- them back (`doai node-refused --requeue` on the node, docs/node.md).
ALTER TABLE nodes ADD COLUMN refused_events integer NOT NULL DEFAULT 0;

-- The liveness view gains the count as its last column (its earlier columns stay).
CREATE OR REPLACE VIEW node_liveness AS
SELECT n.node_id, n.slots, n.running, n.queued,
       (n.vendor_connected AND n.last_seen >= now() - liveness_window()) AS vendor_connected,
       n.version, n.last_seen,
       extract(epoch FROM now() - n.last_seen)::double precision AS age_s,
       (n.last_seen >= now() - liveness_window()) AS online,
       CASE WHEN n.last_seen >= now() - liveness_window() THEN n.running ELSE 0 END AS busy_slots,
       COALESCE(d.devices_online, 0) AS devices_online,
       COALESCE(d.devices_listed, 0) AS devices_listed,
       n.refused_events
FROM nodes n
LEFT JOIN (
    SELECT node_id, count(*) FILTER (WHERE online) AS devices_online,
           count(*) FILTER (WHERE status <> 'gone') AS devices_listed
    FROM device_liveness GROUP BY node_id
) d USING (node_id);
