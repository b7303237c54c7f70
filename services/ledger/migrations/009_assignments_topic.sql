-- Org assignments are published on ledger.assignments.v1 (shared.contracts.OrgAssigned), through the outbox in
-- the transaction of each new assignment (services/ledger/service.py, assign_org): the pricer resolves tier and
-- customer prices with them. The assignments that exist already are put into the outbox here, once, so that
-- they are published too (the start-up flush and the periodic sweep publish the outbox).
--
-- The message id is shared.ids.org_assignment_id: uuid5(NAMESPACE, 'org_assignment|<org>|<starts_at as
-- YYYY-MM-DDTHH:MM:SS.ffffffZ>'). PostgreSQL has no SHA-1 without an extension (which needs rights a
-- service's role may lack), so this migration computes it with a temporary function (FIPS 180-4), written
-- for this one use; tests/integration/test_rate_cards.py compares its ids with Python's uuid5.
CREATE OR REPLACE FUNCTION pg_temp.billing_sha1(msg bytea) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    m constant bigint := 4294967295;
    h bigint[] := ARRAY[x'67452301'::bigint, x'EFCDAB89'::bigint, x'98BADCFE'::bigint, x'10325476'::bigint,
                        x'C3D2E1F0'::bigint];
    padded bytea := msg || '\x80'::bytea;
    w bigint[];
    a bigint; b bigint; c bigint; d bigint; e bigint; f bigint; k bigint; t bigint;
    o int;
    out bytea := '';
BEGIN
    WHILE length(padded) % 64 <> 56 LOOP
        padded := padded || '\x00'::bytea;
    END LOOP;
    padded := padded || int8send(length(msg)::bigint * 8);
    FOR chunk IN 0 .. length(padded) / 64 - 1 LOOP
        w := array_fill(0::bigint, ARRAY[80], ARRAY[0]);
        FOR i IN 0 .. 15 LOOP
            o := chunk * 64 + i * 4;
            w[i] := (get_byte(padded, o)::bigint << 24) | (get_byte(padded, o + 1)::bigint << 16)
                    | (get_byte(padded, o + 2)::bigint << 8) | get_byte(padded, o + 3)::bigint;
        END LOOP;
        FOR i IN 16 .. 79 LOOP
            t := w[i - 3] # w[i - 8] # w[i - 14] # w[i - 16];
            w[i] := ((t << 1) | (t >> 31)) & m;
        END LOOP;
        a := h[1]; b := h[2]; c := h[3]; d := h[4]; e := h[5];
        FOR i IN 0 .. 79 LOOP
            IF i < 20 THEN
                f := (b & c) | ((~b & m) & d); k := x'5A827999'::bigint;
            ELSIF i < 40 THEN
                f := b # c # d; k := x'6ED9EBA1'::bigint;
            ELSIF i < 60 THEN
                f := (b & c) | (b & d) | (c & d); k := x'8F1BBCDC'::bigint;
            ELSE
                f := b # c # d; k := x'CA62C1D6'::bigint;
            END IF;
            t := ((((a << 5) | (a >> 27)) & m) + f + e + k + w[i]) & m;
            e := d; d := c; c := ((b << 30) | (b >> 2)) & m; b := a; a := t;
        END LOOP;
        h[1] := (h[1] + a) & m; h[2] := (h[2] + b) & m; h[3] := (h[3] + c) & m;
        h[4] := (h[4] + d) & m; h[5] := (h[5] + e) & m;
    END LOOP;
    FOR i IN 1 .. 5 LOOP
        out := out || substring(int8send(h[i]) FROM 5 FOR 4);
    END LOOP;
    RETURN out;
END $$;

-- RFC 9562, 5.5: SHA-1 of namespace || name, its first 16 bytes with the version (5) and variant bits set.
CREATE OR REPLACE FUNCTION pg_temp.billing_uuid5(name text) RETURNS uuid LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(
        set_byte(set_byte(d, 6, (get_byte(d, 6) & 15) | 80), 8, (get_byte(d, 8) & 63) | 128), 'hex')::uuid
    FROM (SELECT substring(pg_temp.billing_sha1(
              decode('6f0c1d1e6a525b7e9a4c2f0b9a7c4e11', 'hex') || convert_to(name, 'UTF8')) FROM 1 FOR 16) AS d) s
$$;

INSERT INTO outbox (topic, key, payload)
SELECT 'ledger.assignments.v1', convert_to(a.org_id, 'UTF8'), convert_to(json_build_object(
           'id', pg_temp.billing_uuid5('org_assignment|' || a.org_id || '|'
                 || to_char(a.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
           'schema_name', 'ledger.org_assignment',
           'schema_version', 1,
           'org_id', a.org_id,
           'starts_at', to_char(a.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'customer_id', a.customer_id,
           'tier', c.tier,
           'assigned_at', to_char(a.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
       )::text, 'UTF8')
FROM org_assignments a JOIN customers c ON c.id = a.customer_id
ORDER BY a.created_at, a.org_id, a.starts_at;
