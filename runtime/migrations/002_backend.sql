-- doai schema v2 (backend): idempotent run creation, cancellation, run listing.

-- `POST /v1/runs` with an `Idempotency-Key` header: the key, a digest of the
-- decoded request and the response given, written in the run's transaction.
CREATE TABLE idempotency_keys (
    key             text        PRIMARY KEY,
    request_digest  text        NOT NULL,
    run_id          uuid        NOT NULL REFERENCES runs (run_id) DEFERRABLE INITIALLY DEFERRED,
    response        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE runs ADD COLUMN cancelled_at timestamptz;

-- `GET /v1/runs`: newest first, keyset pagination on (created_at, run_id), filters.
CREATE INDEX runs_page ON runs (created_at DESC, run_id DESC);
CREATE INDEX runs_status_page ON runs (status, created_at DESC, run_id DESC);
CREATE INDEX runs_workflow_page ON runs (workflow_id, created_at DESC, run_id DESC);
CREATE INDEX outbox_run ON outbox (run_id);
