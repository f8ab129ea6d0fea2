-- One row per (share_id, task_type): the stored result that stops sequential duplicates.
-- input_hash identifies the input the result was computed from; a delivery with the same hash
-- is acked without running its handler again.
CREATE TABLE ml_results (
    id             bigserial PRIMARY KEY,
    share_id       text        NOT NULL,
    task_type      text        NOT NULL,
    input_hash     text,
    result_data    jsonb       NOT NULL,
    model_version  text,
    processing_ms  integer,
    cost_usd       numeric(12, 6) NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ml_results_share_task UNIQUE (share_id, task_type)
);
CREATE INDEX ml_results_task_created ON ml_results (task_type, created_at);
