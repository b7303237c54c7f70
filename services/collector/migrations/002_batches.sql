-- Measurements are kept as the batches the collector publishes on usage.readings.v2 (one row per reading
-- hour, meter, shard of resources and part), byte for byte, instead of a row per measurement: the row is
-- both the record of what was read and the outbox (published_at), and re-publishing it is exact. The
-- per-measurement table of the usage.readings.v1 pipeline is kept, unread, as measurements_v1.

ALTER TABLE measurements RENAME TO measurements_v1;

-- Messages are stored compressed against a frame of their meter, shard and month (shared/blobs.py), kept in
-- blob_frames: written once per scope, never changed.
CREATE TABLE blob_frames (
    id    bigint PRIMARY KEY,
    scope text NOT NULL UNIQUE,
    frame bytea NOT NULL
);

CREATE TABLE reading_batches (
    hour         timestamptz NOT NULL CHECK (hour = date_trunc('hour', hour)),
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    part         smallint NOT NULL CHECK (part >= 0),
    reading_id   uuid NOT NULL REFERENCES readings (id),
    measurements integer NOT NULL CHECK (measurements >= 1),
    estimated    integer NOT NULL CHECK (estimated >= 0 AND estimated <= measurements),
    published_at timestamptz,                      -- NULL: the relay still owes this batch
    message      bytea NOT NULL,   -- the MeasurementsTaken JSON as it is published, compressed (shared/blobs.py)
    PRIMARY KEY (hour, meter, shard, part)
);
-- Compressed already; kept out of line even when small, so that marking a batch published rewrites a
-- narrow row, not the message.
ALTER TABLE reading_batches ALTER COLUMN message SET STORAGE EXTERNAL;
ALTER TABLE reading_batches SET (toast_tuple_target = 128);
CREATE INDEX reading_batches_unpublished ON reading_batches (hour) WHERE published_at IS NULL;

-- The readings' own outbox flag is replaced by the batches'; readings published before stay as they were.
DROP INDEX readings_unpublished;
