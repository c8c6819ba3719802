-- Purpose: name the Model Context Protocol server that answered a tool call (SQLite edition
-- of the Postgres migration of the same version): null for webhook and client tools.

alter table voice_tool_calls add column mcp_server text
  check (mcp_server is null or length(mcp_server) between 1 and 24);
