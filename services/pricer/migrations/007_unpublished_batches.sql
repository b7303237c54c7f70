-- The outbox of charge_batches moves out of the batch rows: a re-priced batch was stored unpublished and then
-- rewritten whole (its message inline) to mark it published, which left a dead copy of every re-priced
-- message behind (after `make demo`'s re-rating, 22% of the table's pages). Now a batch row is written once
-- and never changed; the keys of the batches still to publish are kept here, inserted with the batch and
-- deleted once the broker acknowledged it.
CREATE TABLE unpublished_batches (
    reading_hour timestamptz NOT NULL,
    meter        text NOT NULL,
    shard        smallint NOT NULL,
    seq          integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reading_hour, meter, shard, seq),
    FOREIGN KEY (reading_hour, meter, shard, seq) REFERENCES charge_batches ON DELETE CASCADE
);
CREATE INDEX unpublished_batches_by_age ON unpublished_batches (created_at);

INSERT INTO unpublished_batches (reading_hour, meter, shard, seq, created_at)
SELECT reading_hour, meter, shard, seq, created_at FROM charge_batches WHERE NOT published;

DROP INDEX charge_batches_unpublished;
ALTER TABLE charge_batches DROP COLUMN published;
