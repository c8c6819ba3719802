-- Purpose: records of tool calls (issue 15). One row per call the model made in a turn: the
-- tool's name, its kind, the size of the arguments, how long it took and how it ended; the
-- arguments and the result themselves only when the operator keeps tool content. Written with
-- the session row and its turns, under the same rule (a row is replaced only by a newer
-- snapshot of the session), keyed by the provider's call id. The checks mirror the bounds the
-- server keeps (call id at most 128 bytes, name at most 64 characters, the outcomes and kinds
-- it knows), so a row outside them is refused instead of stored. A user's calls are found by
-- the (user_id, created_at) index, a session's by the primary key. voice_turns gains the time
-- each turn waited for its tools. Row-level security as for the other voice tables: an
-- authenticated user reads only their own rows, anon nothing, only the server writes.

create table if not exists public.voice_tool_calls (
  session_id uuid not null references public.voice_sessions (id) on delete cascade,
  turn_index integer not null check (turn_index >= 0),
  call_id text not null check (octet_length(call_id) between 1 and 128),
  user_id text not null,
  name text not null check (char_length(name) <= 64),
  kind text check (kind is null or kind in ('server', 'client')),
  arguments_bytes integer not null check (arguments_bytes >= 0),
  duration_ms integer not null check (duration_ms >= 0),
  outcome text not null
    check (outcome in ('ok', 'failed', 'timed_out', 'invalid', 'over_limit', 'cancelled')),
  arguments text,
  result text,
  created_at timestamptz not null default now(),
  primary key (session_id, call_id)
);

create index if not exists voice_tool_calls_user_created_idx
  on public.voice_tool_calls (user_id, created_at desc);

alter table public.voice_turns add column if not exists tools_ms integer check (tools_ms >= 0);

alter table public.voice_tool_calls enable row level security;

drop policy if exists "voice_tool_calls: owners read" on public.voice_tool_calls;
create policy "voice_tool_calls: owners read" on public.voice_tool_calls
  for select to authenticated
  using (user_id = (select auth.uid())::text);

revoke all on public.voice_tool_calls from anon, authenticated;
grant select on public.voice_tool_calls to authenticated;
grant all on public.voice_tool_calls to service_role;
