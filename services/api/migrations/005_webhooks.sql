-- Webhooks: per customer, the subscriptions an admin made (where to POST, which events, the secret that signs
-- them), one delivery per (subscription, event) — its id is derived from both (shared/webhooks.py), so a
-- message the consumer gets again enqueues nothing twice — and every attempt made for a delivery.

CREATE TABLE webhook_subscription (
    id          uuid PRIMARY KEY,
    customer_id uuid NOT NULL,
    url         text NOT NULL,
    events      text[] NOT NULL CHECK (cardinality(events) > 0),
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL,
    created_by  text NOT NULL,
    active      boolean NOT NULL DEFAULT true
);
CREATE INDEX webhook_subscription_customer ON webhook_subscription (customer_id, id) WHERE active;

-- status: pending (next_attempt_at says when), delivered (a 2xx answer), failed (no 2xx within 24 hours of
-- created_at, or the subscription was deleted).
CREATE TABLE webhook_delivery (
    id              uuid PRIMARY KEY,
    subscription_id uuid NOT NULL REFERENCES webhook_subscription (id),
    event_id        uuid NOT NULL,
    event_type      text NOT NULL,
    payload         bytea NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    finished_at     timestamptz
);
CREATE INDEX webhook_delivery_due ON webhook_delivery (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_delivery_of ON webhook_delivery (subscription_id, created_at DESC, id DESC);

-- One row per POST: its answer's status code, or why there was none (error), and how long it took.
CREATE TABLE webhook_attempt (
    delivery_id uuid NOT NULL REFERENCES webhook_delivery (id),
    n           integer NOT NULL,
    at          timestamptz NOT NULL,
    status_code smallint,
    error       text,
    duration_ms integer NOT NULL,
    PRIMARY KEY (delivery_id, n)
);
