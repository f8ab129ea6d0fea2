-- Transactional outbox: messages that must leave with a result (result events, follow-up tasks
-- of a workflow) are written in the result's transaction and published, confirmed, before the
-- delivery is acked. A crash in between leaves the delivery unacked: its redelivery finds the
-- stored result and publishes whatever is still unpublished here. No polling relay is needed.
CREATE TABLE ml_outbox (
    id            bigserial PRIMARY KEY,
    share_id      text        NOT NULL,
    task_type     text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('event', 'task')),
    exchange      text        NOT NULL,
    routing_key   text        NOT NULL,
    message_id    text        NOT NULL,
    body          jsonb       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX ml_outbox_pending ON ml_outbox (share_id, task_type) WHERE published_at IS NULL;
