-- The meter of every applied charge, so that the completeness report (GET /internal/completeness) can
-- count the charges posted per reading hour and meter from the ledger's own data: a charge's group names
-- its price, and an unpriced charge (the nil price) names no meter at all. Rows applied before this
-- migration keep '' (the report shows them under an empty meter). Adding a column with a constant default
-- rewrites nothing.
ALTER TABLE charge_state ADD COLUMN meter text NOT NULL DEFAULT '';
