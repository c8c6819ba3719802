-- Purpose: record how each session was reached. `transport` is `websocket` (protocol v1) or
-- `twilio` (a phone call through Twilio Media Streams); a call's row also carries Twilio's
-- call sid and the caller's number, masked to its last four digits unless the operator
-- records numbers in full (ATLAS_TWILIO_RECORD_CALLER). Rows written before this column
-- existed were all WebSocket sessions.

alter table public.voice_sessions
  add column if not exists transport text not null default 'websocket';
alter table public.voice_sessions add column if not exists call_sid text;
alter table public.voice_sessions add column if not exists caller text;
