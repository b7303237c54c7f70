-- Corrections of closed months (issue 18, item 3; docs/corrections.md).
--
-- A re-rating's revision of a closed month posts its difference as a `correction` transaction, dated at the
-- start of the first open month like late usage, naming the month it restates in corrects_month (null for
-- every other type). Adding a nullable column rewrites nothing and fires no row trigger (transactions stay
-- append-only).
ALTER TABLE transactions DROP CONSTRAINT transactions_type_check;
ALTER TABLE transactions
    ADD CONSTRAINT transactions_type_check
        CHECK (type IN ('funding', 'usage', 'late_usage', 'expiry', 'reversal', 'correction')),
    ADD COLUMN corrects_month date CHECK (extract(day FROM corrects_month) = 1),
    ADD CONSTRAINT transactions_corrects_month CHECK ((type = 'correction') = (corrects_month IS NOT NULL));
CREATE INDEX transactions_corrections ON transactions (customer_id, corrects_month) WHERE type = 'correction';

-- Statement versions: version 1 is issued when the month closes (every existing row), version n + 1 once
-- corrections of the month not covered by version n have been posted (and none for the quiet period).
-- An amended version restates `used` (original_used + correction), line by line too; its opening and
-- closing balances, funded and expired are version 1's (a correction's balance effect is settled in the
-- month its transaction is dated in). `corrections` counts the correction transactions of the month it
-- covers (0 for version 1).
ALTER TABLE statements DROP CONSTRAINT statements_pkey;
ALTER TABLE statements DROP CONSTRAINT statements_check;
ALTER TABLE statements
    ADD COLUMN version       integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    ADD COLUMN original_used bigint,
    ADD COLUMN correction    bigint,
    ADD COLUMN reasons       jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN corrections   integer NOT NULL DEFAULT 0 CHECK (corrections >= 0),
    ADD PRIMARY KEY (customer_id, month, version),
    ADD CONSTRAINT statements_amended CHECK (
        (version = 1) = (original_used IS NULL) AND (original_used IS NULL) = (correction IS NULL)
        AND (version = 1 OR used = original_used + correction)
    ),
    ADD CONSTRAINT statements_check
        CHECK (closing_balance = opening_balance + funded - coalesce(original_used, used) - expired);
