-- doai schema v20 (operator surface): a run made by `POST /v1/runs/{id}/retry`
-- points at the run it retries; both runs show the link.

ALTER TABLE runs ADD COLUMN parent_run_id uuid REFERENCES runs (run_id);
CREATE INDEX runs_parent_run_id ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
