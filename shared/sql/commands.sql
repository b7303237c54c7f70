CREATE TABLE audit_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at     timestamptz NOT NULL,
    actor           text NOT NULL,
    kind            text NOT NULL,
    method          text NOT NULL,
    path            text NOT NULL,
    body_digest     text,
    body            jsonb,
    status          smallint NOT NULL,
    problem_type    text,
    problem_title   text,
    idempotency_key text,
    replay          boolean NOT NULL
);
CREATE INDEX audit_log_recent ON audit_log (recorded_at DESC, id DESC);
CREATE INDEX audit_log_actor ON audit_log (actor, recorded_at DESC, id DESC);

-- Append-only: the service's role (which runs these migrations and owns the table) loses UPDATE, DELETE
-- and TRUNCATE, and a trigger refuses them to anyone else too (a superuser bypasses privileges, not triggers).
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC, CURRENT_USER;

-- The Idempotency-Keys in use, per actor (two actors' equal keys are two keys). A row is inserted and
-- committed before the command runs (status null: running), and completed with the answer after it; a
-- retry while it runs, or after a crash left it running, answers 409. request_digest: SHA-256 of the
-- method, path and canonical JSON body, which a retry must match. Rows older than the retention (24 hours)
-- are deleted by the next command (shared/commands.py, "Retention").
CREATE TABLE idempotency_keys (
    actor          text NOT NULL,
    key            text NOT NULL,
    request_digest text NOT NULL,
    kind           text NOT NULL,
    created_at     timestamptz NOT NULL,
    completed_at   timestamptz,
    status         smallint,
    content_type   text,
    location       text,
    body           bytea,
    PRIMARY KEY (actor, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
