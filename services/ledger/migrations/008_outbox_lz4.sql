-- The outbox's payloads (a usage transaction's message is ~12 kB: a line per org, meter, kind and price)
-- are compressed with lz4 instead of PostgreSQL's default pglz: writing one cost ~150 µs of the database's
-- time with pglz and ~60 µs with lz4 (measured on this project's benchmark machine), on every usage
-- transaction, inside the posting's transaction. A server built without lz4 keeps them uncompressed
-- (EXTERNAL: still cheaper to write than pglz); the rows live for seconds, so their size hardly matters.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
END $$;
