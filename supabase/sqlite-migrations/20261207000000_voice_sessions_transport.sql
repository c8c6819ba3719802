-- Purpose: record how each session was reached (SQLite edition of the Postgres migration of
-- the same version): `transport` (`websocket` or `twilio`), and for a phone call Twilio's
-- call sid and the caller's number (masked unless the operator records it in full).

alter table voice_sessions add column transport text not null default 'websocket';
alter table voice_sessions add column call_sid text;
alter table voice_sessions add column caller text;
