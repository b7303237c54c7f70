-- Price models (docs/price-models.md §5) and corrections of closed months (issue 18, item 3).

-- Usage of a graduated or volume price has no amount of its own (0/1 in usage.charges.v3): its money
-- depends on the customer's month total, which the ledger posts. Its rollup cells are kept apart from
-- exactly priced ones, so that they are answered with units and never as costing 0.
ALTER TABLE usage_hour_group
    ADD COLUMN priced text NOT NULL DEFAULT 'exact' CHECK (priced IN ('exact', 'monthly')),
    DROP CONSTRAINT usage_hour_group_pkey,
    ADD PRIMARY KEY (customer_id, dim, hour, key, key2, unit, priced);
ALTER TABLE usage_day_group
    ADD COLUMN priced text NOT NULL DEFAULT 'exact' CHECK (priced IN ('exact', 'monthly')),
    DROP CONSTRAINT usage_day_group_pkey,
    ADD PRIMARY KEY (customer_id, dim, day, key, key2, unit, priced);
ALTER TABLE usage_month
    ADD COLUMN priced text NOT NULL DEFAULT 'exact' CHECK (priced IN ('exact', 'monthly')),
    DROP CONSTRAINT usage_month_pkey,
    ADD PRIMARY KEY (customer_id, dim, month, key, key2, unit, priced);

-- The graduated and volume prices the charges named (prices are immutable at the pricer): which of the
-- ledger's usage lines (they name their price) post the money of usage priced on the month's total.
CREATE TABLE price_model (
    price_id uuid PRIMARY KEY,
    model    text NOT NULL CHECK (model IN ('graduated', 'volume'))
);

-- Corrections: a transaction of type correction restates a closed month.
ALTER TABLE ledger_transaction ADD COLUMN corrects_month date CHECK (extract(day FROM corrects_month) = 1);

-- Statements: every version is kept (1 = the month's close, 2, 3, ... = amended by corrections).
ALTER TABLE statement
    ADD COLUMN version integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    ADD COLUMN original_used bigint,
    ADD COLUMN correction bigint,
    ADD COLUMN reasons jsonb NOT NULL DEFAULT '[]',
    DROP CONSTRAINT statement_pkey,
    ADD PRIMARY KEY (customer_id, month, version);
