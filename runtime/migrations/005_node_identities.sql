-- doai schema v5 (backend): node NATS identities (enrollment) and revoked user keys.

-- One row per enrolled node: its NATS user public key (the seed never leaves the node).
-- A node id enrolls once; enrolling it again is refused while it is not revoked.
CREATE TABLE node_identities (
    node_id      text        PRIMARY KEY,
    public_key   text        NOT NULL UNIQUE,
    enrolled_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

-- Every user key ever revoked: the DOAI account JWT pushed to nats-server lists them all, and a
-- revoked key can never enroll again.
CREATE TABLE nats_revocations (
    public_key   text        PRIMARY KEY,
    node_id      text        NOT NULL,
    revoked_at   timestamptz NOT NULL
);
