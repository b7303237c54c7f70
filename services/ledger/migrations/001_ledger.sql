-- The ledger's schema: customers and tiers, the time-ranged assignment of CF orgs to customers,
-- agreements that fund a credit pool, double-entry accounts / transactions / entries, the exact per-month
-- usage state behind continuous posting, held charges, month closes and statements, alerts, outbox.
--
-- Invariants PostgreSQL enforces itself (not only the Python code):
--   * every transaction has >= 2 entries whose signed amounts sum to zero, checked at commit;
--   * transactions, entries and usage lines are append-only (UPDATE / DELETE / TRUNCATE raise);
--   * entry amounts are positive integers of microcredits; idempotency keys are unique;
--   * a transaction is reversed at most once;
--   * the posted microcredits of a (customer, month, price) equal floor(its exact running sum).

-- ---------------------------------------------------------------- helpers

-- First day of the America/New_York month containing `at` (billing months are New York months).
CREATE FUNCTION billing_month(at timestamptz) RETURNS date
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT date_trunc('month', at AT TIME ZONE 'America/New_York')::date $$;

-- floor(a / b) for integral numerics and b > 0, exactly (numeric `/` rounds; `div` truncates to zero).
CREATE FUNCTION floor_div(a numeric, b numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT CASE WHEN a >= 0 THEN div(a, b) ELSE -div(-a + b - 1, b) END $$;

-- Least common multiple of a set of denominators: exact sums of fractions with a common denominator.
CREATE AGGREGATE lcm_agg(numeric) (SFUNC = lcm, STYPE = numeric, INITCOND = '1');

-- ---------------------------------------------------------------- reference data

CREATE TABLE tiers (
    name               text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$'),
    credits_per_period bigint NOT NULL CHECK (credits_per_period > 0),  -- microcredits per agreement
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE customers (
    id         uuid PRIMARY KEY,  -- UUIDv7
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    tier       text NOT NULL REFERENCES tiers (name),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The org's customer at time t is the assignment with the greatest starts_at <= t.
CREATE TABLE org_assignments (
    org_id      text NOT NULL CHECK (length(org_id) BETWEEN 1 AND 64),
    starts_at   timestamptz NOT NULL,
    customer_id uuid NOT NULL REFERENCES customers (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, starts_at)
);
CREATE INDEX org_assignments_customer ON org_assignments (customer_id);

CREATE TABLE agreements (
    id                    uuid PRIMARY KEY,  -- UUIDv7
    customer_id           uuid NOT NULL REFERENCES customers (id),
    starts_at             timestamptz NOT NULL,
    ends_at               timestamptz NOT NULL,
    credits               bigint NOT NULL CHECK (credits > 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    expired_at            timestamptz,  -- when the expiry ran; usage no longer draws from it
    expiry_transaction_id uuid,         -- null when nothing was left to expire
    CHECK (ends_at > starts_at)
);
CREATE INDEX agreements_customer ON agreements (customer_id, ends_at);
CREATE INDEX agreements_unexpired ON agreements (ends_at) WHERE expired_at IS NULL;

-- ---------------------------------------------------------------- double entry

CREATE TABLE account_types (
    name        text PRIMARY KEY,
    normal_side text NOT NULL CHECK (normal_side IN ('debit', 'credit')),
    description text NOT NULL
);
-- Funding: Dr funding / Cr credit_pool. Usage: Dr credit_pool (or overage) / Cr usage.
-- Expiry: Dr credit_pool / Cr expired. So, in normal-side balances,
--   credit_pools - overage = funding - usage - expired = remaining credits.
INSERT INTO account_types (name, normal_side, description) VALUES
    ('funding', 'debit', 'Credits funded by the customer''s agreements'),
    ('credit_pool', 'credit', 'One per agreement: funded credits not yet used or expired'),
    ('usage', 'credit', 'Credits used'),
    ('expired', 'credit', 'Unused credits expired at the end of agreements'),
    ('overage', 'debit', 'Usage beyond the funded credits (remaining < 0)');

CREATE TABLE accounts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  uuid NOT NULL REFERENCES customers (id),
    type         text NOT NULL REFERENCES account_types (name),
    agreement_id uuid REFERENCES agreements (id),
    name         text NOT NULL,  -- 'usage', 'credit_pool:<agreement id>', ...
    -- Signed (debits minus credits) sum of this account's entries, kept by the entries trigger.
    balance      bigint NOT NULL DEFAULT 0,
    UNIQUE (customer_id, name),
    CHECK ((type = 'credit_pool') = (agreement_id IS NOT NULL))
);

CREATE TABLE transactions (
    id              uuid PRIMARY KEY,  -- UUIDv7
    customer_id     uuid NOT NULL REFERENCES customers (id),
    type            text NOT NULL CHECK (type IN ('funding', 'usage', 'late_usage', 'expiry', 'reversal')),
    occurred_at     timestamptz NOT NULL,
    reading_hour    timestamptz,  -- usage: the hour it measured (late usage: the original hour)
    description     text NOT NULL DEFAULT '',
    idempotency_key text NOT NULL UNIQUE,
    reverses        uuid UNIQUE REFERENCES transactions (id),  -- a transaction is reversed at most once
    agreement_id    uuid REFERENCES agreements (id),
    posted_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((type = 'reversal') = (reverses IS NOT NULL))
);
CREATE INDEX transactions_customer_time ON transactions (customer_id, occurred_at);
CREATE INDEX transactions_time ON transactions (occurred_at);

CREATE TABLE entries (
    transaction_id uuid NOT NULL REFERENCES transactions (id),
    account_id     bigint NOT NULL REFERENCES accounts (id),
    side           text NOT NULL CHECK (side IN ('debit', 'credit')),
    amount         bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (transaction_id, account_id, side)
);
CREATE INDEX entries_account ON entries (account_id);

-- What a usage (or late usage, or reversal of one) transaction posted, per org, meter, kind and price;
-- the lines of a transaction sum to its usage-account movement (credits minus debits).
CREATE TABLE usage_lines (
    transaction_id uuid NOT NULL REFERENCES transactions (id),
    org_id         text NOT NULL,
    meter          text NOT NULL,
    resource_kind  text NOT NULL,
    price_id       uuid,  -- null: unpriced
    month          date NOT NULL,  -- billing month of the charges (not of the posting)
    microcredits   bigint NOT NULL CHECK (microcredits <> 0)
);
CREATE INDEX usage_lines_transaction ON usage_lines (transaction_id);

-- ---------------------------------------------------------------- invariants

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % refused (post a reversing transaction instead)',
        TG_TABLE_NAME, TG_OP USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER entries_append_only BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transactions_append_only BEFORE UPDATE OR DELETE ON transactions
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transactions_no_truncate BEFORE TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER usage_lines_append_only BEFORE UPDATE OR DELETE ON usage_lines
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER usage_lines_no_truncate BEFORE TRUNCATE ON usage_lines
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

CREATE FUNCTION assert_balanced(txn uuid) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    n     bigint;
    total numeric;
BEGIN
    SELECT count(*), coalesce(sum(CASE WHEN side = 'debit' THEN amount ELSE -amount END), 0)
      INTO n, total FROM entries WHERE transaction_id = txn;
    IF n < 2 THEN
        RAISE EXCEPTION 'transaction % has % entries; a transaction needs at least two', txn, n
            USING ERRCODE = 'check_violation';
    END IF;
    IF total <> 0 THEN
        RAISE EXCEPTION 'transaction % is unbalanced: debits - credits = %', txn, total
            USING ERRCODE = 'check_violation';
    END IF;
END $$;

CREATE FUNCTION check_new_transaction() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM assert_balanced(NEW.id);
    RETURN NULL;
END $$;

-- An entry added to a transaction made by an earlier database transaction is checked here; entries of a
-- transaction inserted by this database transaction are checked once by check_new_transaction.
CREATE FUNCTION check_new_entry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM transactions t
                   WHERE t.id = NEW.transaction_id AND t.xmin = pg_current_xact_id()::xid) THEN
        PERFORM assert_balanced(NEW.transaction_id);
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER transaction_balanced AFTER INSERT ON transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_new_transaction();
CREATE CONSTRAINT TRIGGER entry_balanced AFTER INSERT ON entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION check_new_entry();

CREATE FUNCTION apply_entries_to_balances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts a SET balance = a.balance + d.delta
      FROM (SELECT account_id, sum(CASE WHEN side = 'debit' THEN amount ELSE -amount END) AS delta
              FROM new_entries GROUP BY account_id) d
     WHERE a.id = d.account_id;
    RETURN NULL;
END $$;

CREATE TRIGGER entries_update_balances AFTER INSERT ON entries
    REFERENCING NEW TABLE AS new_entries FOR EACH STATEMENT EXECUTE FUNCTION apply_entries_to_balances();

-- ---------------------------------------------------------------- exact usage posting

-- Per (customer, billing month, price): the exact sum of the latest revisions of its charges, as a
-- fraction, and the whole microcredits posted for it, always floor(sum). The nil uuid is "unpriced".
CREATE TABLE month_usage (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id uuid NOT NULL REFERENCES customers (id),
    month       date NOT NULL,
    price_id    uuid NOT NULL,
    sum_num     numeric NOT NULL DEFAULT 0 CHECK (sum_num >= 0),
    sum_den     numeric NOT NULL DEFAULT 1 CHECK (sum_den > 0),
    posted      bigint NOT NULL DEFAULT 0,
    UNIQUE (customer_id, month, price_id),
    CHECK (posted = floor_div(sum_num, sum_den))
);

-- The applied revision of every charge: a new revision posts only its difference; an older or equal one
-- is a no-op. Keyed by (hour, measurement) so that inserts land at the right end of the index.
-- No foreign key to month_usage: this is the one row written per charge, kept narrow on purpose.
CREATE TABLE charge_state (
    reading_hour   timestamptz NOT NULL,
    measurement_id uuid NOT NULL,
    revision       integer NOT NULL CHECK (revision >= 1),
    group_id       bigint NOT NULL,  -- month_usage.id it is counted in
    num            bigint NOT NULL CHECK (num >= 0),
    den            bigint NOT NULL CHECK (den >= 1),
    PRIMARY KEY (reading_hour, measurement_id)
);

-- Charges whose org had no customer at their hour: listed for admins, posted once the org is assigned.
CREATE TABLE held_charges (
    measurement_id uuid PRIMARY KEY,
    revision       integer NOT NULL,
    reading_hour   timestamptz NOT NULL,
    org_id         text NOT NULL,
    meter          text NOT NULL,
    resource_kind  text NOT NULL,
    resource_id    text NOT NULL,
    price_id       uuid NOT NULL,  -- nil uuid: unpriced
    num            bigint NOT NULL,
    den            bigint NOT NULL,
    held_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX held_charges_org ON held_charges (org_id, reading_hour);

-- ---------------------------------------------------------------- months, statements, alerts, outbox

CREATE TABLE month_closes (
    month     date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    closed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE statements (
    customer_id     uuid NOT NULL REFERENCES customers (id),
    month           date NOT NULL REFERENCES month_closes (month),
    id              uuid NOT NULL UNIQUE,
    opening_balance bigint NOT NULL,
    funded          bigint NOT NULL,
    used            bigint NOT NULL,
    expired         bigint NOT NULL,
    closing_balance bigint NOT NULL,
    used_by_kind    jsonb NOT NULL,
    issued_at       timestamptz NOT NULL,
    PRIMARY KEY (customer_id, month),
    CHECK (closing_balance = opening_balance + funded - used - expired)
);

-- One row per threshold an agreement's usage crossed: each is raised once.
CREATE TABLE alerts (
    agreement_id      uuid NOT NULL REFERENCES agreements (id),
    threshold_percent integer NOT NULL CHECK (threshold_percent IN (50, 75, 90, 100)),
    customer_id       uuid NOT NULL REFERENCES customers (id),
    funded            bigint NOT NULL,
    used              bigint NOT NULL,
    raised_at         timestamptz NOT NULL,
    PRIMARY KEY (agreement_id, threshold_percent)
);

-- Messages committed with their facts and not yet acknowledged by the broker (transactional outbox).
CREATE TABLE outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic      text NOT NULL,  -- unprefixed topic constant
    key        bytea,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
