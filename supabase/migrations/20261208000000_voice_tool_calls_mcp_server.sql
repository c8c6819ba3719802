-- Purpose: name the Model Context Protocol server that answered a tool call. A call to a tool
-- of a `[[mcp_servers]]` server runs on the server (kind 'server') and its row carries the
-- server's name as the operator declared it (at most 24 characters: letters, digits, '-');
-- webhook and client tools leave it null. Existing rows predate MCP tools.

alter table public.voice_tool_calls add column if not exists mcp_server text
  check (mcp_server is null or char_length(mcp_server) between 1 and 24);
