-- Purpose: durable records of voice sessions and their turns, written by the server at the
-- end of each session (and checkpointed during long ones). Money is in integer
-- micro-dollars; a null cost means the price was unknown. Indexes serve the two common
-- queries: a user's sessions by time, and spend per user per day.

create table if not exists public.voice_sessions (
  id uuid primary key,
  user_id text not null,
  conversation_id text,
  started_at timestamptz not null,
  ended_at timestamptz,
  duration_ms bigint not null default 0,
  end_reason text,
  turns integer not null default 0,
  stt_seconds double precision not null default 0,
  llm_input_tokens bigint not null default 0,
  llm_output_tokens bigint not null default 0,
  tts_chars bigint not null default 0,
  stt_cost_micros bigint,
  llm_cost_micros bigint,
  tts_cost_micros bigint,
  total_cost_micros bigint,
  stt_model text,
  llm_model text,
  tts_model text,
  price_catalog_version text,
  client_name text,
  client_version text,
  updated_at timestamptz not null default now()
);

create index if not exists voice_sessions_user_started_idx
  on public.voice_sessions (user_id, started_at desc);
create index if not exists voice_sessions_started_idx
  on public.voice_sessions (started_at);

create table if not exists public.voice_turns (
  session_id uuid not null references public.voice_sessions (id) on delete cascade,
  turn_index integer not null,
  user_id text not null,
  user_text text not null,
  assistant_text text not null,
  interrupted boolean not null,
  eos_to_final_ms integer,
  llm_first_token_ms integer,
  tts_first_audio_ms integer,
  to_first_audio_ms integer,
  created_at timestamptz not null default now(),
  primary key (session_id, turn_index)
);

create index if not exists voice_turns_user_created_idx
  on public.voice_turns (user_id, created_at desc);
