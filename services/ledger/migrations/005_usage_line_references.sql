-- A usage line's transaction is checked once per INSERT statement instead of once per row. A usage
-- transaction has a line per org, meter, kind and price (about 80 in a customer's hour), and the foreign
-- key's per-row check (a lookup and a row lock on transactions for each line) was two thirds of the cost of
-- writing them: the largest single database cost of posting usage (README, "Benchmarks").
--
-- The check below is the whole of what the foreign key guaranteed here: transactions can be neither
-- deleted nor changed (transactions_append_only, transactions_no_truncate), so a line whose transaction
-- existed when it was inserted keeps it forever, and nothing needs to lock the transaction's row. Lines
-- are only ever inserted in the transaction that inserts their transaction.

ALTER TABLE usage_lines DROP CONSTRAINT usage_lines_transaction_id_fkey;

CREATE FUNCTION usage_lines_have_transactions() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    SELECT n.transaction_id INTO missing
      FROM new_lines n
     WHERE NOT EXISTS (SELECT 1 FROM transactions t WHERE t.id = n.transaction_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'usage_lines: transaction % does not exist', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER usage_lines_reference AFTER INSERT ON usage_lines
    REFERENCING NEW TABLE AS new_lines
    FOR EACH STATEMENT EXECUTE FUNCTION usage_lines_have_transactions();
