-- Measurements are kept as the batches the collector publishes on usage.readings.v2 (one row per reading
-- hour, meter, shard of resources and part), byte for byte, instead of a row per measurement: the row is
-- both the record of what was read and the outbox (published_at), and re-publishing it is exact. The
-- per-measurement table of the usage.readings.v1 pipeline is kept, unread, as measurements_v1.

ALTER TABLE measurements RENAME TO measurements_v1;

CREATE TABLE reading_batches (
    hour         timestamptz NOT NULL CHECK (hour = date_trunc('hour', hour)),
    meter        text NOT NULL,
    shard        smallint NOT NULL CHECK (shard >= 0),
    part         smallint NOT NULL CHECK (part >= 0),
    reading_id   uuid NOT NULL REFERENCES readings (id),
    measurements integer NOT NULL CHECK (measurements >= 1),
    estimated    integer NOT NULL CHECK (estimated >= 0 AND estimated <= measurements),
    published_at timestamptz,                      -- NULL: the relay still owes this batch
    message      bytea COMPRESSION lz4 NOT NULL,   -- the MeasurementsTaken JSON, as it is published
    PRIMARY KEY (hour, meter, shard, part)
);
CREATE INDEX reading_batches_unpublished ON reading_batches (hour) WHERE published_at IS NULL;

-- The readings' own outbox flag is replaced by the batches'; readings published before stay as they were.
DROP INDEX readings_unpublished;
