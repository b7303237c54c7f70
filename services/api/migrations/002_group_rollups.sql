-- Hourly and daily rollups per customer and group, like usage_month: hour- and day-granularity usage
-- grouped by org, space, meter or kind read a handful of rows per period instead of adding up every
-- charge (10,000 an hour) or every resource's day (the load test measured 0.4–1.0 s for 48 hours by
-- meter before this). Grouping by resource keeps reading charge and usage_day, which are per resource.
-- dim: org (key = org_id), space (space_id), meter (meter), kind (meter, key2 = kind).

CREATE TABLE usage_hour_group (
    customer_id uuid NOT NULL,
    dim text NOT NULL CHECK (dim IN ('org', 'space', 'meter', 'kind')),
    hour timestamptz NOT NULL CHECK (hour = date_trunc('hour', hour)),
    key text NOT NULL,
    key2 text NOT NULL,
    unit text NOT NULL,
    value bigint NOT NULL,
    amount_num numeric NOT NULL,
    amount_den numeric NOT NULL CHECK (amount_den >= 1),
    PRIMARY KEY (customer_id, dim, hour, key, key2, unit)
);

-- Days in America/New_York, as in usage_day.
CREATE TABLE usage_day_group (
    customer_id uuid NOT NULL,
    dim text NOT NULL CHECK (dim IN ('org', 'space', 'meter', 'kind')),
    day date NOT NULL,
    key text NOT NULL,
    key2 text NOT NULL,
    unit text NOT NULL,
    value bigint NOT NULL,
    amount_num numeric NOT NULL,
    amount_den numeric NOT NULL CHECK (amount_den >= 1),
    PRIMARY KEY (customer_id, dim, day, key, key2, unit)
);

-- Fill both from what the read model already holds, exactly: per group, the amounts over the least
-- common multiple of their denominators.
CREATE AGGREGATE lcm_agg(numeric) (SFUNC = lcm, STYPE = numeric, INITCOND = '1');

WITH d AS (
    SELECT customer_id, day, unit, value, amount_num, amount_den, x.dim, x.key, x.key2
      FROM usage_day,
           LATERAL (VALUES ('org', org_id, ''), ('space', space_id, ''), ('meter', meter, ''),
                           ('kind', meter, resource_kind)) AS x(dim, key, key2)
), l AS (
    SELECT customer_id, dim, day, key, key2, unit, lcm_agg(amount_den) AS den FROM d GROUP BY 1, 2, 3, 4, 5, 6
)
INSERT INTO usage_day_group (customer_id, dim, day, key, key2, unit, value, amount_num, amount_den)
SELECT d.customer_id, d.dim, d.day, d.key, d.key2, d.unit, sum(d.value), sum(d.amount_num * div(l.den, d.amount_den)), l.den
  FROM d JOIN l USING (customer_id, dim, day, key, key2, unit)
 GROUP BY d.customer_id, d.dim, d.day, d.key, d.key2, d.unit, l.den;

WITH c AS (
    SELECT m.customer_id, c.hour, c.unit, c.value, c.amount_num::numeric AS amount_num,
           c.amount_den::numeric AS amount_den, x.dim, x.key, x.key2
      FROM org_customer_hour m
      JOIN charge c ON c.org_id = m.org_id AND c.hour = m.hour,
           LATERAL (VALUES ('org', c.org_id, ''), ('space', c.space_id, ''), ('meter', c.meter, ''),
                           ('kind', c.meter, c.resource_kind)) AS x(dim, key, key2)
), l AS (
    SELECT customer_id, dim, hour, key, key2, unit, lcm_agg(amount_den) AS den FROM c GROUP BY 1, 2, 3, 4, 5, 6
)
INSERT INTO usage_hour_group (customer_id, dim, hour, key, key2, unit, value, amount_num, amount_den)
SELECT c.customer_id, c.dim, c.hour, c.key, c.key2, c.unit, sum(c.value), sum(c.amount_num * div(l.den, c.amount_den)), l.den
  FROM c JOIN l USING (customer_id, dim, hour, key, key2, unit)
 GROUP BY c.customer_id, c.dim, c.hour, c.key, c.key2, c.unit, l.den;
