-- Chunk embeddings for similarity search (pgvector). The column has no fixed dimension so one
-- table can hold vectors of several models; every query and index filters on one model, and
-- the HNSW index is a partial expression index per model and dimension (added by the migration
-- that introduces a model). 384 dims: all-MiniLM-L6-v2, the default local model.
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;

CREATE TABLE ml_embeddings (
    id              bigserial PRIMARY KEY,
    share_id        text        NOT NULL,
    embedding_type  text        NOT NULL DEFAULT 'content',
    chunk_index     integer     NOT NULL,
    chunk_text      text        NOT NULL,
    start_s         double precision,
    end_s           double precision,
    content_hash    text        NOT NULL,
    model           text        NOT NULL,
    dims            integer     NOT NULL,
    embedding       vector      NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ml_embeddings_chunk UNIQUE (share_id, embedding_type, chunk_index, model),
    CONSTRAINT ml_embeddings_dims CHECK (vector_dims(embedding) = dims)
);
CREATE INDEX ml_embeddings_share ON ml_embeddings (share_id);
CREATE INDEX ml_embeddings_minilm_hnsw ON ml_embeddings
    USING hnsw ((embedding::vector(384)) vector_cosine_ops)
    WHERE dims = 384;
