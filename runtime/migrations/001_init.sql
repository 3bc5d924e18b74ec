-- doai schema v1: workflows and runs (written by the backend), run state
-- (folded by the aggregator from node events), fleet inventory.

CREATE TABLE workflows (
    workflow_id  text        NOT NULL,
    version      integer     NOT NULL CHECK (version >= 1),
    recipe       jsonb       NOT NULL,
    digest       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, version)
);

CREATE TABLE runs (
    run_id            uuid        PRIMARY KEY,
    workflow_id       text        NOT NULL,
    workflow_version  integer     NOT NULL,
    params            jsonb       NOT NULL,
    step_timeouts_ms  jsonb       NOT NULL,
    status            text        NOT NULL DEFAULT 'pending',
    created_at        timestamptz NOT NULL DEFAULT now(),
    dispatched_at     timestamptz,
    finished_at       timestamptz,
    FOREIGN KEY (workflow_id, workflow_version) REFERENCES workflows (workflow_id, version)
);
CREATE INDEX runs_created_at ON runs (created_at DESC);

-- One row per (run, device): created `queued` by the backend, then advanced by
-- node events. `seq` is the highest per-(run, device) event sequence applied.
CREATE TABLE run_tasks (
    run_id         uuid        NOT NULL REFERENCES runs (run_id),
    node_id        text        NOT NULL,
    device_serial  text        NOT NULL,
    state          text        NOT NULL DEFAULT 'queued',
    attempt        integer     NOT NULL DEFAULT 0,
    seq            bigint      NOT NULL DEFAULT 0,
    started_at     timestamptz,
    finished_at    timestamptz,
    error          text,
    failed_step    text,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, node_id, device_serial)
);
CREATE INDEX run_tasks_device ON run_tasks (node_id, device_serial);

CREATE TABLE step_results (
    run_id         uuid        NOT NULL,
    node_id        text        NOT NULL,
    device_serial  text        NOT NULL,
    step_id        text        NOT NULL,
    idx            integer     NOT NULL,
    action         text        NOT NULL,
    state          text        NOT NULL,
    seq            bigint      NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    output         text,
    error          text,
    PRIMARY KEY (run_id, node_id, device_serial, step_id)
);

CREATE TABLE artifacts (
    run_id         uuid        NOT NULL,
    node_id        text        NOT NULL,
    device_serial  text        NOT NULL,
    step_id        text        NOT NULL,
    store          text        NOT NULL,
    key            text        NOT NULL,
    uri            text        NOT NULL,
    bytes          bigint      NOT NULL,
    sha256         text        NOT NULL,
    content_type   text        NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (store, key)
);
CREATE INDEX artifacts_task ON artifacts (run_id, node_id, device_serial);

CREATE TABLE nodes (
    node_id           text        PRIMARY KEY,
    slots             integer     NOT NULL,
    running           integer     NOT NULL,
    queued            integer     NOT NULL,
    vendor_connected  boolean     NOT NULL,
    version           text        NOT NULL,
    last_seen         timestamptz NOT NULL
);

CREATE TABLE devices (
    node_id     text        NOT NULL,
    serial      text        NOT NULL,
    status      text        NOT NULL,
    model       text        NOT NULL DEFAULT '',
    name        text        NOT NULL DEFAULT '',
    last_seen   timestamptz NOT NULL,
    PRIMARY KEY (node_id, serial)
);

-- Broadcasts written in the same transaction as their run; a relay publishes
-- them and stamps `sent_at` only after the JetStream ack.
CREATE TABLE outbox (
    id          bigserial   PRIMARY KEY,
    run_id      uuid        NOT NULL REFERENCES runs (run_id),
    node_id     text        NOT NULL,
    subject     text        NOT NULL,
    msg_id      text        NOT NULL UNIQUE,
    payload     bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

-- Messages from the event stream that could not be folded, kept with their bytes.
CREATE TABLE dead_letters (
    id           bigserial   PRIMARY KEY,
    subject      text        NOT NULL,
    stream_seq   bigint,
    raw          bytea       NOT NULL,
    error        text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
