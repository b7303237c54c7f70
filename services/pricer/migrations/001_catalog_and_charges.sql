-- The pricer's own schema: the time-ranged price catalog, the charges (one row per measurement and
-- revision), the charges still waiting for a price, and the outbox of re-priced revisions.

-- One row per (meter, resource kind) that has ever had a price. Its integer id lets the exclusion
-- constraint below compare keys with plain GiST: equality on text or bigint in GiST needs the
-- btree_gist extension, which only a superuser (or a role with CREATE on the database) may install,
-- whereas a one-point int8range with && is equality and has a built-in GiST operator class.
CREATE TABLE price_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    meter         text NOT NULL CHECK (meter <> '' AND length(meter) <= 64),
    resource_kind text NOT NULL DEFAULT '' CHECK (length(resource_kind) <= 128),
    UNIQUE (meter, resource_kind)
);

CREATE TABLE prices (
    id                    uuid PRIMARY KEY,                    -- uuid7: time-ordered
    key_id                bigint NOT NULL REFERENCES price_keys (id),
    meter                 text NOT NULL,
    resource_kind         text NOT NULL DEFAULT '',
    unit_of_measure       text NOT NULL CHECK (unit_of_measure <> '' AND length(unit_of_measure) <= 32),
    microcredits_per_unit bigint NOT NULL CHECK (microcredits_per_unit >= 0),
    unit                  bigint NOT NULL CHECK (unit > 0),
    -- [valid_from, valid_until): a finite start, an open end (upper infinite while the price has no end).
    valid_during          tstzrange NOT NULL CHECK (
                              NOT isempty(valid_during) AND NOT lower_inf(valid_during)
                              AND lower_inc(valid_during) AND NOT upper_inc(valid_during)),
    created_at            timestamptz NOT NULL DEFAULT now(),
    -- No two prices of one (meter, kind) are valid at the same instant.
    CONSTRAINT prices_no_overlap EXCLUDE USING gist (
        int8range(key_id, key_id, '[]') WITH &&,
        valid_during WITH &&
    )
);
CREATE INDEX prices_by_meter ON prices (meter, resource_kind, lower(valid_during));

-- Bumped in the transaction of every catalog change: pricers reload their in-memory catalog when it
-- differs from the version they hold, so a change takes effect without a restart.
CREATE TABLE catalog_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO catalog_state (singleton, version) VALUES (true, 1);

-- Every revision of every charge: revision 1 when the measurement is first priced, +1 per re-pricing.
-- Narrow on purpose (a row per measurement is the pricer's main cost); the descriptive fields of the
-- measurement travel on the topics. The key starts with the reading hour so that inserts land in the
-- few index pages of the current hours instead of all over a uuid-ordered index; the measurement id
-- already implies its hour (shared.ids.measurement_id), so the key is as unique as the id alone.
-- No foreign key to prices: it would cost an index probe per row, and prices are never deleted.
CREATE TABLE charges (
    reading_hour       timestamptz NOT NULL,
    measurement_id     uuid NOT NULL,
    revision           integer NOT NULL CHECK (revision >= 1),
    meter              text NOT NULL,
    resource_kind      text NOT NULL,
    value              bigint NOT NULL CHECK (value >= 0),
    price_id           uuid,                                   -- null: unpriced
    amount_numerator   bigint NOT NULL CHECK (amount_numerator >= 0),
    amount_denominator bigint NOT NULL CHECK (amount_denominator >= 1),
    priced_at          timestamptz NOT NULL,
    PRIMARY KEY (reading_hour, measurement_id, revision),
    CHECK (price_id IS NOT NULL OR (amount_numerator = 0 AND amount_denominator = 1))
);

-- The charges whose latest revision is unpriced, with that revision as published (a ChargeComputed
-- document): what admins list, and what a new covering price re-prices.
CREATE TABLE unpriced_charges (
    measurement_id uuid PRIMARY KEY,
    reading_hour   timestamptz NOT NULL,
    meter          text NOT NULL,
    resource_kind  text NOT NULL,
    revision       integer NOT NULL,
    charge         jsonb NOT NULL
);
CREATE INDEX unpriced_by_key ON unpriced_charges (meter, resource_kind, reading_hour);
CREATE UNIQUE INDEX unpriced_by_hour ON unpriced_charges (reading_hour, measurement_id);

-- Re-priced revisions committed but not yet acknowledged by the broker (transactional outbox): the
-- rows are deleted once published; whatever a crash leaves here is published on the next start.
-- Charges priced from the readings topic need no outbox: their input offsets are committed only after
-- the publish, so a crash re-delivers the input, and the stored revision is published again.
CREATE TABLE charge_outbox (
    measurement_id uuid NOT NULL,
    revision       integer NOT NULL,
    org_id         text NOT NULL,
    payload        bytea NOT NULL,                           -- the ChargeComputed JSON, as sent
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (measurement_id, revision)
);
