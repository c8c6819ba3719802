-- Purpose: order the snapshots of a session (SQLite edition of the Postgres migration of the
-- same version). A row is only replaced by a snapshot with a higher number. SQLite has no
-- ADD COLUMN IF NOT EXISTS; the server applies each SQLite migration once, in a transaction,
-- recorded in its ledger.

alter table voice_sessions add column record_seq integer;
