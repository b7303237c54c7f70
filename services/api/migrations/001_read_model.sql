-- The api's read model: tables shaped for its queries, filled by its consumers (group "api") of
-- usage.charges.v1 and ledger.transactions.v1. Nothing here is a copy of another service's tables.

-- Exact sums of rationals. A charge is exactly numerator/denominator microcredits (e.g. x/730); numeric
-- cannot hold 1/730, so a sum is kept as a {numerator, denominator} pair over the least common multiple
-- of the denominators seen (bounded by the lcm of the price units, so it stays small).
CREATE FUNCTION rat_add(state numeric[], num numeric, den numeric) RETURNS numeric[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN state[2] = den THEN ARRAY[state[1] + num, den]
                ELSE ARRAY[state[1] * div(lcm(state[2], den), state[2]) + num * div(lcm(state[2], den), den),
                           lcm(state[2], den)]
           END
$$;

CREATE FUNCTION rat_merge(a numeric[], b numeric[]) RETURNS numeric[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN a[2] = b[2] THEN ARRAY[a[1] + b[1], a[2]]
                ELSE ARRAY[a[1] * div(lcm(a[2], b[2]), a[2]) + b[1] * div(lcm(a[2], b[2]), b[2]), lcm(a[2], b[2])]
           END
$$;

CREATE AGGREGATE rat_sum(numeric, numeric) (
    SFUNC = rat_add, STYPE = numeric[], INITCOND = '{0,1}', COMBINEFUNC = rat_merge, PARALLEL = SAFE
);

-- The latest revision of every charge (one row per measurement = the hourly rollup per resource).
-- Kept so that a newer revision can take the older one's amount back out of the rollups, and so that
-- charges that arrive before the ledger tells which customer their org belongs to can be attributed later.
CREATE TABLE charge (
    measurement_id uuid PRIMARY KEY,
    revision integer NOT NULL CHECK (revision >= 1),
    charge_id uuid NOT NULL,
    hour timestamptz NOT NULL,
    org_id text NOT NULL,
    space_id text NOT NULL,
    resource_id text NOT NULL,
    meter text NOT NULL,
    resource_kind text NOT NULL,
    unit text NOT NULL,
    value bigint NOT NULL CHECK (value >= 0),
    amount_num numeric NOT NULL CHECK (amount_num >= 0),
    amount_den numeric NOT NULL CHECK (amount_den >= 1),
    priced boolean NOT NULL,
    estimated boolean NOT NULL
);
CREATE INDEX charge_by_org_hour ON charge (org_id, hour);

-- Which customer an org belonged to in an hour, as the ledger's usage postings say (usage lines carry
-- org_id, the transaction its customer and reading hour).
CREATE TABLE org_customer_hour (
    org_id text NOT NULL,
    hour timestamptz NOT NULL,
    customer_id uuid NOT NULL,
    PRIMARY KEY (org_id, hour)
);
CREATE INDEX org_customer_hour_by_customer ON org_customer_hour (customer_id, hour);

-- Daily rollup per customer and resource (days in America/New_York): day-granularity queries.
CREATE TABLE usage_day (
    customer_id uuid NOT NULL,
    day date NOT NULL,
    resource_id text NOT NULL,
    meter text NOT NULL,
    resource_kind text NOT NULL,
    org_id text NOT NULL,
    space_id text NOT NULL,
    unit text NOT NULL,
    value bigint NOT NULL,
    amount_num numeric NOT NULL,
    amount_den numeric NOT NULL CHECK (amount_den >= 1),
    PRIMARY KEY (customer_id, day, resource_id, meter, resource_kind, org_id, space_id, unit)
);

-- Monthly rollup per customer and group (months in America/New_York), one row per grouping dimension:
-- the monthly query reads a handful of rows whatever the number of resources.
-- dim: org (key = org_id), space (space_id), resource (resource_id), meter (meter), kind (meter, key2 = kind).
CREATE TABLE usage_month (
    customer_id uuid NOT NULL,
    dim text NOT NULL CHECK (dim IN ('org', 'space', 'resource', 'meter', 'kind')),
    month date NOT NULL CHECK (extract(day FROM month) = 1),
    key text NOT NULL,
    key2 text NOT NULL,
    unit text NOT NULL,
    value bigint NOT NULL,
    amount_num numeric NOT NULL,
    amount_den numeric NOT NULL CHECK (amount_den >= 1),
    PRIMARY KEY (customer_id, dim, month, key, key2, unit)
);

-- Latest names of the groups, for display only.
CREATE TABLE org_info (
    org_id text PRIMARY KEY,
    org_name text NOT NULL
);
CREATE TABLE space_info (
    space_id text PRIMARY KEY,
    space_name text NOT NULL,
    org_id text NOT NULL
);
CREATE TABLE resource_info (
    resource_id text PRIMARY KEY,
    resource_name text NOT NULL,
    meter text NOT NULL,
    resource_kind text NOT NULL,
    space_id text NOT NULL,
    org_id text NOT NULL
);

-- Customers the read model knows of (from their transactions and statements).
CREATE TABLE customer (
    customer_id uuid PRIMARY KEY,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- Ledger transactions as posted, with their effect on the balance buckets:
-- funding -> funded, usage and late_usage -> used, expiry -> expired, a reversal -> minus its original's.
CREATE TABLE ledger_transaction (
    transaction_id uuid PRIMARY KEY,
    customer_id uuid NOT NULL,
    type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    posted_at timestamptz NOT NULL,
    reading_hour timestamptz,
    description text NOT NULL,
    idempotency_key text NOT NULL,
    amount bigint NOT NULL CHECK (amount >= 0),
    bucket text NOT NULL CHECK (bucket IN ('funded', 'used', 'expired', 'none')),
    signed_amount bigint NOT NULL,
    reverses uuid,
    entries jsonb NOT NULL,
    usage jsonb NOT NULL
);
-- Balances as of a time (index-only sums) and the newest-first transaction list.
CREATE INDEX ledger_transaction_by_customer_time
    ON ledger_transaction (customer_id, occurred_at, transaction_id) INCLUDE (bucket, signed_amount);

CREATE TABLE statement (
    customer_id uuid NOT NULL,
    month date NOT NULL,
    statement_id uuid NOT NULL,
    opening_balance bigint NOT NULL,
    funded bigint NOT NULL,
    used bigint NOT NULL,
    expired bigint NOT NULL,
    closing_balance bigint NOT NULL,
    used_by_kind jsonb NOT NULL,
    issued_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, month)
);

-- Which token subjects may read which customers (managed by admins through /admin/entitlements).
CREATE TABLE entitlement (
    subject text NOT NULL CHECK (length(subject) BETWEEN 1 AND 256),
    customer_id uuid NOT NULL,
    granted_by text NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, customer_id)
);
CREATE INDEX entitlement_by_customer ON entitlement (customer_id);
