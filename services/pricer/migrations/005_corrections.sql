-- Corrections of closed months (issue 18, item 3): a price correction is a price row (a new id) that applies
-- to [from, to) of one (meter, kind) in place of the prices that priced those hours. Prices never overlap for
-- ordinary use; a correction is the one sanctioned overlap: ordinary prices keep their exclusion constraint
-- among themselves, corrections get their own (no two corrections of one (meter, kind) overlap), and the
-- catalog resolves an hour covered by a correction to the correction (services/pricer/pricing.py, Catalog).
ALTER TABLE prices ADD COLUMN correction boolean NOT NULL DEFAULT false;
ALTER TABLE prices DROP CONSTRAINT prices_no_overlap;
ALTER TABLE prices ADD CONSTRAINT prices_no_overlap EXCLUDE USING gist (
    int8range(key_id, key_id, '[]') WITH &&,
    valid_during WITH &&
) WHERE (NOT correction);
ALTER TABLE prices ADD CONSTRAINT prices_corrections_no_overlap EXCLUDE USING gist (
    int8range(key_id, key_id, '[]') WITH &&,
    valid_during WITH &&
) WHERE (correction);
-- A correction has a finite range (whole hours; a graduated or volume one on billing-month boundaries,
-- checked by the service like their prices).
ALTER TABLE prices ADD CONSTRAINT prices_correction_is_bounded CHECK (NOT correction OR NOT upper_inf(valid_during));

-- Re-rating jobs (POST /internal/rerates): one per correction. The runner works them one at a time, oldest
-- first, a chunk of shards (reading hour, shard) per transaction; the chunk's new revisions are stored
-- unpublished (the outbox of charge_batches) and the job's position moves in the same transaction, so a
-- restart continues after the last chunk committed and publishes what was stored, never pricing it again.
CREATE TABLE rerate_jobs (
    id            uuid PRIMARY KEY,                          -- uuid7: time-ordered
    price_id      uuid NOT NULL UNIQUE REFERENCES prices (id),  -- the correction
    meter         text NOT NULL,
    resource_kind text NOT NULL,
    valid_from    timestamptz NOT NULL,
    valid_until   timestamptz NOT NULL CHECK (valid_until > valid_from),
    reason        text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    state         text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed')),
    failure       text,
    total         bigint NOT NULL CHECK (total >= 0),        -- measurements of the meter in the range
    done          bigint NOT NULL DEFAULT 0 CHECK (done >= 0),  -- of them, looked at
    repriced      bigint NOT NULL DEFAULT 0 CHECK (repriced >= 0),  -- charges given a new revision
    refused       bigint NOT NULL DEFAULT 0 CHECK (refused >= 0),   -- amounts beyond 2**62, left as they were
    -- the last (reading hour, shard) done; null: none yet
    after_hour    timestamptz,
    after_shard   smallint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    CHECK ((state = 'failed') = (failure IS NOT NULL)),
    CHECK ((after_hour IS NULL) = (after_shard IS NULL))
);
CREATE INDEX rerate_jobs_running ON rerate_jobs (created_at, id) WHERE state = 'running';
CREATE INDEX charge_batches_by_meter ON charge_batches (meter, reading_hour, shard);
