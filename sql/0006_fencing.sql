-- Fencing tokens: the lock lease a result was computed under. Every lease gets a token higher
-- than any handed out before it (idempotency/lock.py), and the result upsert replaces a row
-- only when its own token is higher than the stored one, so a worker whose lease was lost
-- (expired unrenewed, taken over) cannot overwrite the result of the newer holder.
-- Rows stored before this migration count as token 0: any leased write replaces them.
-- A constant default makes this a catalogue-only change (no table rewrite).
ALTER TABLE ml_results ADD COLUMN fence bigint NOT NULL DEFAULT 0;
