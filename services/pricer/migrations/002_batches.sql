-- Charges are kept per shard of resources (reading hour, meter, shard), a batch at a time, as published on
-- usage.charges.v2, instead of a row per measurement: a row per batch costs the database what a few
-- hundred rows did (see README, "Batched topics"). The per-measurement tables of the usage.charges.v1
-- pipeline are kept, unread, under *_v1 names for whoever needs their history.

ALTER TABLE charges RENAME TO charges_v1;
ALTER TABLE unpriced_charges RENAME TO unpriced_charges_v1;
ALTER TABLE charge_outbox RENAME TO charge_outbox_v1;

-- Messages are stored compressed against a frame of their meter, shard and month (shared/blobs.py), kept in
-- blob_frames: written once per scope, never changed.
CREATE TABLE blob_frames (
    id    bigint PRIMARY KEY,
    scope text NOT NULL UNIQUE,
    frame bytea NOT NULL
);

-- Every charges batch the pricer published for a shard, in order: seq 1 for the first, +1 for each later
-- one (measurements that arrived later, re-priced revisions). A measurement's latest charge is in the last
-- batch that holds its resource. The counts are this batch's change to the shard's totals, so that sums
-- over a shard (or an hour) give the measurements whose latest revision is priced / unpriced and the sum
-- of those revisions (the completeness report).
CREATE TABLE charge_batches (
    reading_hour timestamptz NOT NULL CHECK (reading_hour = date_trunc('hour', reading_hour)),
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    seq          integer NOT NULL CHECK (seq >= 1),
    items        integer NOT NULL CHECK (items >= 1),
    d_priced     integer NOT NULL,
    d_unpriced   integer NOT NULL,
    d_revisions  bigint NOT NULL,
    -- false until the broker acknowledged it (re-priced batches: the outbox); batches priced from the
    -- readings topic are published before their input offsets are committed, so they are stored true
    published    boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    message      bytea NOT NULL,  -- the ChargesComputed JSON as sent, compressed (shared/blobs.py)
    PRIMARY KEY (reading_hour, meter, shard, seq)
);
ALTER TABLE charge_batches ALTER COLUMN message SET STORAGE EXTERNAL;  -- compressed already
CREATE INDEX charge_batches_unpublished ON charge_batches (created_at) WHERE NOT published;

-- The shards holding measurements of a (meter, kind) whose latest charge is unpriced: what a new price
-- re-prices, and what the admin list of unpriced charges walks.
CREATE TABLE unpriced_shards (
    reading_hour  timestamptz NOT NULL,
    meter         text NOT NULL,
    shard         smallint NOT NULL,
    resource_kind text NOT NULL,
    PRIMARY KEY (reading_hour, meter, shard, resource_kind)
);
CREATE INDEX unpriced_shards_by_kind ON unpriced_shards (meter, resource_kind, reading_hour);

-- The hours each price priced something in: a price cannot end before the last of them.
CREATE TABLE priced_hours (
    price_id     uuid NOT NULL,
    reading_hour timestamptz NOT NULL,
    PRIMARY KEY (price_id, reading_hour)
);
