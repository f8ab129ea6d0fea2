-- Per-share workflow state (video pipeline): current state plus an append-only history of
-- {state, at, detail} entries.
CREATE TABLE ml_workflows (
    share_id    text PRIMARY KEY,
    state       text        NOT NULL,
    history     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ml_workflows_state_updated ON ml_workflows (state, updated_at);
