-- The cost ledger: one row per paid call. Budget ceilings are checked against the rolling last
-- hour and day of this table plus open reservations.
CREATE TABLE ml_costs (
    id              bigserial PRIMARY KEY,
    task_type       text          NOT NULL,
    model           text          NOT NULL,
    units           numeric(18, 3) NOT NULL,
    unit_kind       text          NOT NULL CHECK (unit_kind IN ('audio_seconds', 'tokens')),
    usd             numeric(12, 6) NOT NULL CHECK (usd >= 0),
    share_id        text,
    correlation_id  text,
    created_at      timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ml_costs_task_created ON ml_costs (task_type, created_at);

-- Estimated cost of paid calls in flight, reserved before the call under an advisory lock so
-- concurrent workers cannot together overshoot a ceiling; replaced by real ml_costs rows in the
-- result's transaction.
CREATE TABLE ml_cost_reservations (
    id          bigserial PRIMARY KEY,
    task_type   text          NOT NULL,
    share_id    text,
    usd         numeric(12, 6) NOT NULL CHECK (usd >= 0),
    created_at  timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX ml_cost_reservations_task_created ON ml_cost_reservations (task_type, created_at);
