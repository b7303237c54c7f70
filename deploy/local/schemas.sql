-- One login role and one schema per service; each role has rights on its own schema only.
-- Idempotent: run by deploy/local/pg.sh on every start, and by the test fixtures for their databases.
-- Passwords are the local development defaults; production sets its own (see README, "Configuration").
DO $$
DECLARE svc text;
BEGIN
  FOREACH svc IN ARRAY ARRAY['collector', 'pricer', 'ledger', 'api'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = svc) THEN
      EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L', svc, svc);
    END IF;
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', svc, svc);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', svc);
    EXECUTE format('ALTER ROLE %I SET search_path = %I', svc, svc);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), svc);
  END LOOP;
END $$;
-- Nobody but the owner creates objects in public.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON DATABASE postgres FROM PUBLIC;
