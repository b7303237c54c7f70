-- The database of the production-shaped development environments (docker-compose.yml, the k8s local-cluster
-- overlay): one login role per service, billing_<service>, owning the schema <service>, with the development
-- passwords those manifests name (production: your own roles and secrets). Idempotent; roles are cluster-wide,
-- the schemas and grants are made in the current database. Not deploy/local/schemas.sql: the local stack's
-- roles have the role name as password, which BILLING_ENV=production refuses.
DO $$
DECLARE svc text;
BEGIN
  FOREACH svc IN ARRAY ARRAY['collector', 'pricer', 'ledger', 'api'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'billing_' || svc) THEN
      EXECUTE format('CREATE ROLE %I LOGIN', 'billing_' || svc);
    END IF;
    EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', 'billing_' || svc, svc || '-dev-password');
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', svc, 'billing_' || svc);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', svc);
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), 'billing_' || svc);
  END LOOP;
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
