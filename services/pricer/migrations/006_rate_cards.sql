-- Rate cards (issue 18, item 2): a price applies globally (as before), to one tier, or to one customer, and a
-- tier's or customer's price overrides the global price of the same (meter, kind) while it is valid.
--
-- The scope is part of the price's key: price_keys gains (scope_kind, scope_id) and is unique per (meter, kind,
-- scope_kind, scope_id), so the exclusion constraints over key_id (prices_no_overlap among ordinary prices,
-- prices_corrections_no_overlap among corrections) now forbid overlaps within a scope only; a tier or customer
-- price may overlap the global one. The prices table carries the scope too, tied to its key's by a foreign key,
-- so a row cannot claim a scope its key does not have.
ALTER TABLE price_keys
    ADD COLUMN scope_kind text NOT NULL DEFAULT 'global' CHECK (scope_kind IN ('global', 'tier', 'customer')),
    ADD COLUMN scope_id   text NOT NULL DEFAULT '' CHECK (length(scope_id) <= 128),
    ADD CONSTRAINT price_keys_scope_id CHECK ((scope_kind = 'global') = (scope_id = '')),
    DROP CONSTRAINT price_keys_meter_resource_kind_key,
    ADD CONSTRAINT price_keys_scoped UNIQUE (meter, resource_kind, scope_kind, scope_id),
    ADD CONSTRAINT price_keys_whole UNIQUE (id, meter, resource_kind, scope_kind, scope_id);

ALTER TABLE prices
    ADD COLUMN scope_kind text NOT NULL DEFAULT 'global',
    ADD COLUMN scope_id   text NOT NULL DEFAULT '',
    ADD CONSTRAINT prices_key_scope FOREIGN KEY (key_id, meter, resource_kind, scope_kind, scope_id)
        REFERENCES price_keys (id, meter, resource_kind, scope_kind, scope_id),
    -- a price correction re-rates a meter and kind for everyone: it is global
    ADD CONSTRAINT prices_correction_is_global CHECK (NOT correction OR scope_kind = 'global');

-- The org assignments the ledger publishes (ledger.assignments.v1): an org belongs to customer_id (of tier)
-- from starts_at until its next assignment. Written by the assignments consumer only; the pricer holds them
-- in memory and reloads them when assignments_state.version moves (every instance, whichever consumed it).
CREATE TABLE org_assignments (
    org_id      text NOT NULL CHECK (length(org_id) BETWEEN 1 AND 64),
    starts_at   timestamptz NOT NULL,
    id          uuid NOT NULL UNIQUE,                   -- OrgAssigned.id: a redelivery changes nothing
    customer_id uuid NOT NULL,
    tier        text NOT NULL CHECK (length(tier) BETWEEN 1 AND 128),
    assigned_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, starts_at)
);

CREATE TABLE assignments_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL
);
INSERT INTO assignments_state (singleton, version) VALUES (true, 1);
