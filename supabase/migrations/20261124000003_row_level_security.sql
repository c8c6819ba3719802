-- Purpose: row-level security on the voice tables. An authenticated user reads only their
-- own rows; anon reads nothing; only the server (service role or the table owner) writes.

alter table public.voice_sessions enable row level security;
alter table public.voice_turns enable row level security;

drop policy if exists "voice_sessions: owners read" on public.voice_sessions;
create policy "voice_sessions: owners read" on public.voice_sessions
  for select to authenticated
  using (user_id = (select auth.uid())::text);

drop policy if exists "voice_turns: owners read" on public.voice_turns;
create policy "voice_turns: owners read" on public.voice_turns
  for select to authenticated
  using (user_id = (select auth.uid())::text);

revoke all on public.voice_sessions, public.voice_turns from anon, authenticated;
grant select on public.voice_sessions, public.voice_turns to authenticated;
grant all on public.voice_sessions, public.voice_turns to service_role;
