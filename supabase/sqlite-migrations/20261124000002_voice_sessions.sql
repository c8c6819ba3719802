-- Purpose: durable records of voice sessions and their turns (SQLite edition of the
-- Postgres migration of the same version). Timestamps are RFC 3339 text in UTC; money is in
-- integer micro-dollars, null when the price was unknown.

create table if not exists voice_sessions (
  id text primary key,
  user_id text not null,
  conversation_id text,
  started_at text not null,
  ended_at text,
  duration_ms integer not null default 0,
  end_reason text,
  turns integer not null default 0,
  stt_seconds real not null default 0,
  llm_input_tokens integer not null default 0,
  llm_output_tokens integer not null default 0,
  tts_chars integer not null default 0,
  stt_cost_micros integer,
  llm_cost_micros integer,
  tts_cost_micros integer,
  total_cost_micros integer,
  stt_model text,
  llm_model text,
  tts_model text,
  price_catalog_version text,
  client_name text,
  client_version text,
  updated_at text not null
);

create index if not exists voice_sessions_user_started_idx on voice_sessions (user_id, started_at);
create index if not exists voice_sessions_started_idx on voice_sessions (started_at);

create table if not exists voice_turns (
  session_id text not null references voice_sessions (id) on delete cascade,
  turn_index integer not null,
  user_id text not null,
  user_text text not null,
  assistant_text text not null,
  interrupted integer not null,
  eos_to_final_ms integer,
  llm_first_token_ms integer,
  tts_first_audio_ms integer,
  to_first_audio_ms integer,
  created_at text not null,
  primary key (session_id, turn_index)
);

create index if not exists voice_turns_user_created_idx on voice_turns (user_id, created_at);
