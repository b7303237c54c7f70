-- Measurements are kept as the batches the collector publishes on usage.readings.v2 (one row per reading
-- hour, meter, shard of resources and part), byte for byte, instead of a row per measurement; re-publishing
-- one is exact. What the relay still owes is a narrow row of reading_outbox, deleted once published (the
-- batch itself is never rewritten). The
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
    message      bytea NOT NULL,   -- the MeasurementsTaken JSON as it is published, compressed (shared/blobs.py)
    PRIMARY KEY (hour, meter, shard, part)
);
ALTER TABLE reading_batches ALTER COLUMN message SET STORAGE EXTERNAL;  -- compressed already

-- The batches the relay still owes (stored, not yet acknowledged by the broker), oldest hour first.
CREATE TABLE reading_outbox (
    hour  timestamptz NOT NULL,
    meter text NOT NULL,
    shard smallint NOT NULL,
    part  smallint NOT NULL,
    PRIMARY KEY (hour, meter, shard, part),
    FOREIGN KEY (hour, meter, shard, part) REFERENCES reading_batches
);

-- The outbox is per batch now; a reading's published_at is set when its hour's last batch is published.
DROP INDEX readings_unpublished;
