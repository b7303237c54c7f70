-- Readings, measurements and the resource hierarchy. Everything read from Cloud Foundry is stored here,
-- even partial readings, before it is published (the readings table is the outbox: published_at).

CREATE TABLE readings (
    id            uuid PRIMARY KEY,                 -- shared.ids.reading_id(hour): deterministic
    hour          timestamptz NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('periodic', 'manual', 'estimated')),
    taken_at      timestamptz NOT NULL,
    measurements  integer NOT NULL DEFAULT 0,
    estimated     integer NOT NULL DEFAULT 0,
    errors        jsonb NOT NULL DEFAULT '[]',
    published_at  timestamptz,                      -- NULL: the relay still owes this reading's measurements
    CONSTRAINT one_reading_per_hour UNIQUE (hour),  -- at most one reading (periodic or manual) per hour
    CONSTRAINT whole_hour CHECK (hour = date_trunc('hour', hour))
);
CREATE INDEX readings_unpublished ON readings (hour) WHERE published_at IS NULL;

-- One row per meter per reading: whether the meter succeeded (gap detection works per meter).
CREATE TABLE meter_runs (
    reading_id  uuid NOT NULL REFERENCES readings (id),
    meter       text NOT NULL,
    hour        timestamptz NOT NULL,
    ok          boolean NOT NULL,
    error       text,
    PRIMARY KEY (reading_id, meter)
);
CREATE INDEX meter_runs_ok ON meter_runs (meter, hour) WHERE ok;

CREATE TABLE measurements (
    id             uuid PRIMARY KEY,                -- shared.ids.measurement_id(hour, meter, resource)
    reading_id     uuid NOT NULL REFERENCES readings (id),
    hour           timestamptz NOT NULL,
    meter          text NOT NULL,
    resource_id    text NOT NULL,
    resource_kind  text NOT NULL DEFAULT '',
    org_id         text NOT NULL DEFAULT '',
    space_id       text NOT NULL DEFAULT '',
    value          bigint NOT NULL CHECK (value >= 0),
    unit           text NOT NULL,
    estimated      boolean NOT NULL DEFAULT false,
    errors         text                             -- bad input from CF that affected this measurement
);
CREATE INDEX measurements_by_reading ON measurements (reading_id);
CREATE INDEX measurements_by_meter_hour ON measurements (meter, hour);

-- The customer-independent hierarchy, latest names.
CREATE TABLE orgs (
    guid        text PRIMARY KEY,
    name        text NOT NULL,
    seen_at     timestamptz NOT NULL
);
CREATE TABLE spaces (
    guid        text PRIMARY KEY,
    org_guid    text NOT NULL,                      -- no foreign key: a space whose org is unknown is kept
    name        text NOT NULL,
    seen_at     timestamptz NOT NULL
);
CREATE TABLE resources (
    meter       text NOT NULL,
    guid        text NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL DEFAULT '',
    space_guid  text NOT NULL DEFAULT '',
    seen_at     timestamptz NOT NULL,
    PRIMARY KEY (meter, guid)
);
