-- Purpose: records of tool calls (SQLite edition of the Postgres migration of the same
-- version). One row per call the model made in a turn, keyed by the provider's call id; the
-- arguments and the result only when the operator keeps tool content. The checks mirror the
-- server's bounds (call id at most 128 bytes, name at most 64 characters, the known outcomes
-- and kinds). voice_turns gains the time each turn waited for its tools. SQLite has no
-- ADD COLUMN IF NOT EXISTS; the server applies each SQLite migration once, in a transaction,
-- recorded in its ledger.

create table if not exists voice_tool_calls (
  session_id text not null references voice_sessions (id) on delete cascade,
  turn_index integer not null check (turn_index >= 0),
  call_id text not null check (length(cast(call_id as blob)) between 1 and 128),
  user_id text not null,
  name text not null check (length(name) <= 64),
  kind text check (kind is null or kind in ('server', 'client')),
  arguments_bytes integer not null check (arguments_bytes >= 0),
  duration_ms integer not null check (duration_ms >= 0),
  outcome text not null
    check (outcome in ('ok', 'failed', 'timed_out', 'invalid', 'over_limit', 'cancelled')),
  arguments text,
  result text,
  created_at text not null,
  primary key (session_id, call_id)
);

create index if not exists voice_tool_calls_user_created_idx on voice_tool_calls (user_id, created_at);

alter table voice_turns add column tools_ms integer check (tools_ms >= 0);
