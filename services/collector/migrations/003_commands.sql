-- Commands: the state-changing POSTs of this service's internal routes (shared/commands.py). Each is
-- recorded in audit_log, append-only; one sent with an Idempotency-Key holds that key in idempotency_keys
-- for at least 24 hours, with the answer it got, which a retry with the same key and body gets again.

-- One row per command request: who (actor: the token subject, or the subject the api forwarded), what
-- (kind, method, path, the body's digest and the body itself as JSON; null when it was not JSON or could not
-- be read), when (recorded_at, UTC) and the outcome (status, and the problem's type and title when it
-- failed); the Idempotency-Key if any and whether the answer was a replay of the key's first one.
-- include: commands.sql
