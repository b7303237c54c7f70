-- Price models (docs/price-models.md): a price is flat (today's: microcredits_per_unit per unit), or
-- graduated or volume, its bands in shared.price_models' JSON form (to_document(...)["bands"]: edges as exact
-- strings "n" or "n/d"). JSONB rather than a table of bands: a price's bands are immutable, few, always read
-- whole with the price, and nothing queries them by band. Their content is validated by
-- shared.price_models.from_document before insert (services/pricer/service.py is the only writer) and the
-- catalog is loaded through it. For graduated and volume, microcredits_per_unit is 0: the bands say it all.
ALTER TABLE prices
    ADD COLUMN model text NOT NULL DEFAULT 'flat' CHECK (model IN ('flat', 'graduated', 'volume')),
    ADD COLUMN bands jsonb,
    ADD CONSTRAINT prices_bands_fit_model CHECK (
        (model = 'flat') = (bands IS NULL)
        AND (model = 'flat' OR (microcredits_per_unit = 0 AND jsonb_typeof(bands) = 'array'))
    );
