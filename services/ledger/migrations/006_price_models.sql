-- Price models (graduated and volume prices: docs/price-models.md, section 4).
--
-- A price's function as the charges named it (prices are immutable at the pricer). Filled from the charges
-- batches' price terms in the posting's transaction; a batch naming a known price with another model or
-- other bands is refused as a conflict. Flat prices are not stored: no row is a flat price.
CREATE TABLE price_models (
    price_id uuid PRIMARY KEY,
    model    text NOT NULL CHECK (model IN ('graduated', 'volume')),
    bands    jsonb NOT NULL  -- shared.price_models.to_document(...)["bands"]
);

-- For a group (customer, month, price) of a graduated or volume price: its exact total units (the sum of
-- value / unit of its charges at their latest revision). sum_num / sum_den then hold the exact amount
-- f(units), so the CHECK posted = floor(sum) keeps verifying every row. Null for a flat price's group.
ALTER TABLE month_usage
    ADD COLUMN units_num numeric CHECK (units_num >= 0),
    ADD COLUMN units_den numeric CHECK (units_den > 0),
    ADD CONSTRAINT month_usage_units CHECK ((units_num IS NULL) = (units_den IS NULL));
