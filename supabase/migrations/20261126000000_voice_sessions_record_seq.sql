-- Purpose: order the snapshots of a session. The server numbers each snapshot it writes
-- (checkpoints while the session runs, then the final record); a row is only replaced by a
-- snapshot with a higher number, so a late checkpoint (from the spool, or written out of
-- order under load) can never overwrite a session's final record. Null in rows written before
-- this column existed.

alter table public.voice_sessions add column if not exists record_seq bigint;
