-- Commands: the state-changing requests of this service (shared/commands.py): the api's own are the
-- entitlements granted and revoked (the admin commands it forwards are recorded by their owners). Each is
-- recorded in audit_log, append-only; one sent with an Idempotency-Key holds that key in idempotency_keys
-- for at least 24 hours, with the answer it got, which a retry with the same key and body gets again.

-- One row per command request: who (actor: the subject of the token that sent it), what
-- (kind, method, path, the body's digest and the body itself as JSON; null when it was not JSON or could not
-- be read), when (recorded_at, UTC) and the outcome (status, and the problem's type and title when it
-- failed); the Idempotency-Key if any and whether the answer was a replay of the key's first one.
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
