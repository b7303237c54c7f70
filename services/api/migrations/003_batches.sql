-- Charges arrive in batches (usage.charges.v2) and are kept per shard of resources (reading hour, meter,
-- shard), one row each, instead of a row per measurement; so are the per-resource rollups, per (customer,
-- day or month, meter). The group rollups (org, space, meter, kind) stay rows: a handful per hour.
-- The per-measurement tables of the usage.charges.v1 read model are kept, unread, under *_v1 names.

ALTER TABLE charge RENAME TO charge_v1;
ALTER TABLE usage_day RENAME TO usage_day_v1;
-- Per-resource months are now documents (usage_resource_month); the rows stay for history, unread.
ALTER TABLE usage_month DROP CONSTRAINT usage_month_dim_check;
UPDATE usage_month SET dim = 'resource_v1' WHERE dim = 'resource';
ALTER TABLE usage_month ADD CONSTRAINT usage_month_dim_check CHECK (dim IN ('org', 'space', 'meter', 'kind', 'resource_v1'));

-- Shard documents are stored compressed against a frame of their meter, shard and month (shared/blobs.py),
-- kept in blob_frames: written once per scope, never changed.
CREATE TABLE blob_frames (
    id    bigint PRIMARY KEY,
    scope text NOT NULL UNIQUE,
    frame bytea NOT NULL
);

-- The latest charge of every measurement of a shard (services/api/charges.py, ShardDoc): what a newer
-- revision is compared with, what charges waiting for their org's customer are attributed from, and what
-- hourly usage by resource reads.
CREATE TABLE charge_shard (
    reading_hour timestamptz NOT NULL,
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    items        bytea NOT NULL,  -- compressed (shared/blobs.py)
    PRIMARY KEY (reading_hour, meter, shard)
);
ALTER TABLE charge_shard ALTER COLUMN items SET STORAGE EXTERNAL;

-- Usage per resource of one customer, day (America/New_York) and meter (ResourceDoc): one document each,
-- rewritten as each hour is attributed; a month is read as its days (a month document rewritten every
-- hour cost more than the rest of the schema).
CREATE TABLE usage_resource_day (
    customer_id uuid NOT NULL,
    day         date NOT NULL,
    meter       text NOT NULL,
    items       bytea COMPRESSION lz4 NOT NULL,
    PRIMARY KEY (customer_id, day, meter)
);

-- The rollups are rewritten in place as hours are attributed: room on each page for the new version of a
-- row (an update that changes no key stays on its page and is pruned without a vacuum), and a vacuum once
-- 2% of a table changed rather than the default 20%.
ALTER TABLE usage_resource_day SET (
    autovacuum_vacuum_scale_factor = 0.02, toast.autovacuum_vacuum_scale_factor = 0.02,
    toast.autovacuum_vacuum_threshold = 1000  -- a document is a few TOAST chunks; a rewrite leaves them dead
);
ALTER TABLE usage_hour_group SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE usage_day_group SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE usage_month SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02);
