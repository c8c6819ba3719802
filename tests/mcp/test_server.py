"""MCP server used by the voice server's MCP integration tests.

    python test_server.py stdio        serve over stdin/stdout
    python test_server.py http PORT    serve Streamable HTTP at http://127.0.0.1:PORT/mcp
                                       (PORT 0 picks a free port; the real one is announced)

In http mode the line `listening on 127.0.0.1:PORT` is printed to stdout and
to stderr once the server is started and accepting connections.

Environment:
    MCP_TEST_LOG    file that gets one line per event: `call NAME` for every
                    tools/call of a known tool (written before the tool runs),
                    `cancelled hang` when a hang call is cancelled.
    MCP_TEST_TIMES  file that gets each tools/call's time in the server, in ms.
    MCP_TEST_TOKEN  http mode only: every request must carry
                    `Authorization: Bearer <token>`, otherwise 401.

Both protocol eras are served (the SDK decides per connection / per request):
  * 2025-11-25 and older: `initialize` handshake. Tool-list changes are sent as
    `notifications/tools/list_changed` on the connection's standalone channel
    (the stdout pipe; over HTTP the GET SSE stream, so a client has to open it).
  * 2026-07-28: `server/discover` + per-request `_meta` envelope, no session.
    Tool-list changes reach only clients holding a `subscriptions/listen`
    stream that asked for `toolsListChanged`.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.session import ServerSession
from mcp.types.version import MODERN_PROTOCOL_VERSIONS
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel

# A 1x1 transparent PNG, for the test that the client refuses image content.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000b49444154789c6360000200000500017a5eab3f0000000049454e44ae426082"
)


def log_event(line: str) -> None:
    """Append one line to $MCP_TEST_LOG (if set); the tests count these lines."""
    path = os.environ.get("MCP_TEST_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Forecast(BaseModel):
    city: str
    forecast: str
    celsius: int


server = MCPServer("atlas-voice-test-server", version="1.0.0", log_level="WARNING")

# Handshake-era connections, by HTTP session id ("stdio" for the single stdio
# peer). 2026-07-28 clients are not kept here: they are reached through the
# SDK's subscription bus (`ctx.notify_tools_changed()`).
legacy_sessions: dict[str, ServerSession] = {}


async def bookkeeping(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Call log, legacy-connection bookkeeping and the legacy listChanged flag."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        headers = getattr(ctx.request, "headers", None)
        key = "stdio" if ctx.request is None else (headers or {}).get("mcp-session-id")
        if key:  # the HTTP `initialize` POST has no session id yet; the next message has
            legacy_sessions[key] = ctx.session
    started = time.perf_counter()
    if ctx.method == "tools/call" and ctx.params:
        name = ctx.params.get("name")
        if name in {t.name for t in await server.list_tools()}:
            log_event(f"call {name}")
    result = await call_next(ctx)
    if ctx.method == "tools/call" and (times := os.environ.get("MCP_TEST_TIMES")):
        # The server's own time per call, for the load measurement (scripts/mcp-load.sh).
        with open(times, "a", encoding="utf-8") as f:
            f.write(f"{(time.perf_counter() - started) * 1000:.2f}\n")
    if ctx.method == "initialize" and isinstance(result, dict):
        # MCPServer advertises tools.listChanged=false in the handshake era
        # (it only derives it for 2026-07-28, from subscriptions/listen), but
        # add_tool does notify, so advertise it.
        result.setdefault("capabilities", {}).setdefault("tools", {})["listChanged"] = True
    return result


server.middleware.append(bookkeeping)


# Only `lookup` returns structured output; the text tools opt out so their
# results are a plain text block without structuredContent / outputSchema.
@server.tool(structured_output=False)
def echo(text: str) -> str:
    """Return the given text unchanged."""
    return text


@server.tool()
def lookup(city: str) -> Forecast:
    """Weather for a city; the result carries structuredContent."""
    return Forecast(city=city, forecast="sunny", celsius=21)


@server.tool(structured_output=False)
async def hang(seconds: float = 30) -> str:
    """Sleep; a cancelled call is logged as `cancelled hang`."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        # The SDK cancels the handler's anyio scope on `notifications/cancelled`
        # (and, for 2026-07-28 over HTTP, when the client drops the response).
        log_event("cancelled hang")
        raise
    return f"slept {seconds}"


@server.tool(structured_output=False)
def fail(reason: str) -> CallToolResult:
    """Always fails: an isError result whose text is exactly the reason."""
    # Not `raise ToolError(reason)`: MCPServer would prefix the text with
    # "Error executing tool fail: ". A returned CallToolResult is sent as is.
    return CallToolResult(content=[TextContent(type="text", text=reason)], is_error=True)


@server.tool()
def picture() -> Image:
    """An image content block (a 1x1 PNG)."""
    return Image(data=TINY_PNG, format="png")


@server.tool(structured_output=False)
def big(size: int) -> str:
    """A text of exactly `size` bytes."""
    return "x" * size


@server.tool(structured_output=False)
def crash() -> str:
    """Kill the server process at once (exit status 3)."""
    os._exit(3)


@server.tool(structured_output=False)
def secret_tool() -> str:
    """A tool the tests hide with an allow/deny list."""
    return "secret"


@server.tool(structured_output=False)
async def add_tool(name: str, ctx: Context) -> str:
    """Register a new tool `name` (returns "added") and announce the list change."""

    def added() -> str:
        return "added"

    server.add_tool(added, name=name, description=f"Added at runtime: {name}", structured_output=False)
    # 2026-07-28: published to every open subscriptions/listen stream.
    await ctx.notify_tools_changed()
    # Handshake era: notifications/tools/list_changed to every known connection.
    for key, session in list(legacy_sessions.items()):
        try:
            await session.send_tool_list_changed()
        except Exception:  # a connection that has gone away
            legacy_sessions.pop(key, None)
    return "added"


class RequireBearer:
    """ASGI middleware: 401 unless `Authorization: Bearer <token>` is present."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != self.expected:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b"unauthorized"})
            return
        await self.app(scope, receive, send)


async def serve_http(port: int) -> None:
    import uvicorn

    app: Any = server.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    if token := os.environ.get("MCP_TEST_TOKEN"):
        app = RequireBearer(app, token)
    # Bind first so PORT 0 works and the announced port is the real one.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(uv.serve, [sock])
        while not uv.started:  # set after the lifespan (session manager) is up and the socket listens
            if uv.should_exit:
                return
            await anyio.sleep(0.01)
        for stream in (sys.stdout, sys.stderr):
            print(f"listening on 127.0.0.1:{port}", file=stream, flush=True)


def main() -> None:
    args = sys.argv[1:]
    if args == ["stdio"]:
        server.run("stdio")
    elif len(args) == 2 and args[0] == "http" and args[1].isdigit():
        anyio.run(serve_http, int(args[1]))
    else:
        sys.exit("usage: test_server.py stdio | http PORT")


if __name__ == "__main__":
    main()
