-- The applied charges are kept per shard of resources (reading hour, meter, shard), one row each holding
-- the applied revision and amount of every measurement of the shard, instead of a row per measurement:
-- a charges batch of usage.charges.v2 costs the ledger one state row, not a few hundred (README, "Batched
-- topics"). Held charges likewise, per shard and org. The per-measurement tables of the usage.charges.v1
-- pipeline are kept, unread, under *_v1 names for whoever needs their history.

ALTER TABLE charge_state RENAME TO charge_state_v1;
ALTER TABLE held_charges RENAME TO held_charges_v1;

-- Documents (items) are stored compressed against a frame of their meter, shard and month (shared/blobs.py),
-- kept in blob_frames: written once per scope, never changed.
CREATE TABLE blob_frames (
    id    bigint PRIMARY KEY,
    scope text NOT NULL UNIQUE,
    frame bytea NOT NULL
);

-- items: the JSON {"r": [resource ids], "v": [applied revisions], "g": [month_usage ids], "n": [numerators],
-- "d": [denominators]}, one entry per measurement applied to a customer's month. A new revision posts only
-- its difference; an older or equal one is a no-op. posted and revisions count them (completeness report).
CREATE TABLE shard_state (
    reading_hour timestamptz NOT NULL,
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    posted       integer NOT NULL CHECK (posted >= 0),
    revisions    bigint NOT NULL CHECK (revisions >= 0),
    items        bytea NOT NULL,
    PRIMARY KEY (reading_hour, meter, shard)
);
ALTER TABLE shard_state ALTER COLUMN items SET STORAGE EXTERNAL;  -- compressed already

-- Charges whose org had no customer at their hour, per shard and org: listed for admins, posted once the
-- org is assigned (by the assignment itself, the periodic sweep, or a month close). items: {"r": [...],
-- "v": [revisions], "k": [kinds], "p": [price ids, "" = unpriced], "n": [...], "d": [...]}. held and
-- revisions count the items not applied meanwhile (a newer revision can be held while an older one stays
-- posted, when the org lost its customer in between).
CREATE TABLE held_shards (
    reading_hour timestamptz NOT NULL,
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    org_id       text NOT NULL,
    held         integer NOT NULL CHECK (held >= 0),
    revisions    bigint NOT NULL CHECK (revisions >= 0),
    held_at      timestamptz NOT NULL DEFAULT now(),
    items        bytea NOT NULL,
    PRIMARY KEY (reading_hour, meter, shard, org_id)
);
ALTER TABLE held_shards ALTER COLUMN items SET STORAGE EXTERNAL;
CREATE INDEX held_shards_org ON held_shards (org_id, reading_hour);
