"""Self-check for test_server.py, driven by the MCP Python SDK's own client.

    python check_server.py

Runs every combination of transport (stdio, Streamable HTTP) and protocol era
(2025-11-25 via `initialize`, 2026-07-28 via `server/discover`), plus a few raw
JSON-RPC probes (era negotiation, bearer token, crash exit status).
Prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import httpx2
import mcp_types as types
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

HERE = Path(__file__).resolve().parent
SERVER = str(HERE / "test_server.py")
TOKEN = "test-token"
BASE_TOOLS = {"echo", "lookup", "hang", "fail", "picture", "big", "crash", "secret_tool", "add_tool"}


def ok(label: str, detail: str = "") -> None:
    print(f"ok   {label}{'  ' + detail if detail else ''}", flush=True)


def expect(cond: bool, label: str, detail: Any = "") -> None:
    if not cond:
        print(f"FAIL {label}  {detail}", flush=True)
        sys.exit(1)
    ok(label)


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_for_log(path: Path, line: str, timeout: float = 5) -> bool:
    with anyio.move_on_after(timeout):
        while line not in log_lines(path):
            await anyio.sleep(0.05)
        return True
    return False


@asynccontextmanager
async def http_server(log: Path) -> AsyncIterator[str]:
    """Start `test_server.py http 0`, yield its URL once it announces the port."""
    env = {**os.environ, "MCP_TEST_LOG": str(log), "MCP_TEST_TOKEN": TOKEN}
    proc = await anyio.open_process([sys.executable, SERVER, "http", "0"], env=env, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = (await proc.stdout.receive()).decode().strip()
        expect(line.startswith("listening on 127.0.0.1:"), "http: announces port", line)
        yield f"http://{line.removeprefix('listening on ')}/mcp"
    finally:
        proc.terminate()
        await proc.wait()


def connect(target: str | StdioServerParameters, mode: str, http: httpx2.AsyncClient | None, **kw: Any) -> Client:
    server: Any = streamable_http_client(target, http_client=http) if isinstance(target, str) else target
    return Client(server, mode=mode, read_timeout_seconds=10, **kw)


async def exercise(label: str, target: str | StdioServerParameters, mode: str, log: Path,
                   http: httpx2.AsyncClient | None = None) -> None:
    changed = anyio.Event()

    async def on_message(msg: Any) -> None:  # handshake-era notifications arrive here
        if isinstance(msg, types.ServerNotification) and isinstance(msg, types.ToolListChangedNotification):
            changed.set()

    async with connect(target, mode, http, message_handler=on_message) as client:
        print(f"---- {label}: negotiated protocol {client.protocol_version}")
        modern = client.protocol_version == "2026-07-28"
        expect(modern == (mode != "legacy"), f"{label}: era", client.protocol_version)
        caps = client.session.server_capabilities
        expect(caps is not None and caps.tools is not None and caps.tools.list_changed is True,
               f"{label}: tools.listChanged advertised", caps)

        names = {t.name for t in (await client.list_tools()).tools}
        expect(BASE_TOOLS <= names, f"{label}: tools/list", sorted(names))

        r = await client.call_tool("echo", {"text": "hello"})
        expect(not r.is_error and r.content[0].type == "text" and r.content[0].text == "hello"
               and r.structured_content is None, f"{label}: echo", r)
        r = await client.call_tool("lookup", {"city": "Oslo"})
        expect(r.structured_content == {"city": "Oslo", "forecast": "sunny", "celsius": 21},
               f"{label}: lookup structuredContent", r)
        r = await client.call_tool("fail", {"reason": "boom"})
        expect(r.is_error is True and r.content[0].text == "boom", f"{label}: fail -> isError", r)
        r = await client.call_tool("picture")
        expect(r.content[0].type == "image" and r.content[0].mime_type == "image/png", f"{label}: picture", r)
        r = await client.call_tool("big", {"size": 100_000})
        expect(len(r.content[0].text.encode()) == 100_000, f"{label}: big")
        expect("call echo" in log_lines(log), f"{label}: call logged")

        # Cancel: abandoning the call makes the SDK client send notifications/cancelled
        # (2026-07-28 over HTTP: it drops the response stream instead).
        before = log_lines(log).count("cancelled hang")
        with anyio.move_on_after(1):
            await client.call_tool("hang", {"seconds": 30})
        with anyio.move_on_after(5):
            while log_lines(log).count("cancelled hang") == before:
                await anyio.sleep(0.05)
        expect(log_lines(log).count("cancelled hang") == before + 1, f"{label}: hang cancelled and logged")

        new = f"dyn_{label.replace(' ', '_').replace('/', '_')}"
        if modern:
            async with client.listen(tools_list_changed=True) as sub:
                r = await client.call_tool("add_tool", {"name": new})
                with anyio.fail_after(5):
                    event = await sub.__aiter__().__anext__()
            expect(type(event).__name__ == "ToolsListChanged", f"{label}: list change via subscriptions/listen", event)
        else:
            r = await client.call_tool("add_tool", {"name": new})
            with anyio.move_on_after(5):
                await changed.wait()
            expect(changed.is_set(), f"{label}: notifications/tools/list_changed received")
        names = {t.name for t in (await client.list_tools(cache_mode="refresh")).tools}
        expect(new in names, f"{label}: new tool listed")
        r = await client.call_tool(new)
        expect(r.content[0].text == "added", f"{label}: new tool callable")


def raw_stdio(messages: list[dict[str, Any]], env: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Send raw JSON-RPC lines to a stdio server; return its replies and exit status."""
    proc = subprocess.run([sys.executable, SERVER, "stdio"], input="".join(json.dumps(m) + "\n" for m in messages),
                          capture_output=True, text=True, timeout=20, env=env)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()], proc.returncode


def raw_checks(log: Path) -> None:
    env = {**os.environ, "MCP_TEST_LOG": str(log)}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2026-07-28", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    replies, _ = raw_stdio([init], env)
    print(f"---- raw stdio: initialize offering 2026-07-28 -> {json.dumps(replies[0]['result'])}")
    expect(replies[0]["result"]["protocolVersion"] == "2025-11-25", "raw: initialize(2026-07-28) -> 2025-11-25")

    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    discover = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
    replies, _ = raw_stdio([discover], env)
    print(f"---- raw stdio: server/discover -> {json.dumps(replies[0]['result'])}")
    expect(replies[0]["result"]["supportedVersions"] == ["2026-07-28"], "raw: server/discover")

    crash = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "crash", "arguments": {}}}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    init["params"]["protocolVersion"] = "2025-11-25"
    # stdin stays open until the server has read it all; the crash then kills it mid-session.
    replies, status = raw_stdio([init, initialized, crash], env)
    expect(status == 3 and len(replies) == 1 and "call crash" in log_lines(log), "raw: crash exits with status 3",
           (status, replies))


async def raw_cancel_check(log: Path) -> None:
    """The exact handshake-era wire sequence for a cancel over stdio: the hang is
    interrupted, no response is sent for it, and the session stays usable."""
    env = {**os.environ, "MCP_TEST_LOG": str(log)}
    proc = await anyio.open_process([sys.executable, SERVER, "stdio"], env=env, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    out = BufferedByteReceiveStream(proc.stdout)

    async def send(msg: dict[str, Any]) -> None:
        await proc.stdin.send((json.dumps(msg) + "\n").encode())

    async def recv() -> dict[str, Any]:
        return json.loads(await out.receive_until(b"\n", 1 << 20))

    try:
        await send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        await recv()
        await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        before = log_lines(log).count("cancelled hang")
        await send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "hang", "arguments": {}}})
        await anyio.sleep(0.5)
        await send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2, "reason": "t"}})
        with anyio.move_on_after(5):
            while log_lines(log).count("cancelled hang") == before:
                await anyio.sleep(0.05)
        await send({"jsonrpc": "2.0", "id": 3, "method": "ping"})
        with anyio.fail_after(5):
            reply = await recv()
        expect(log_lines(log).count("cancelled hang") == before + 1 and reply.get("id") == 3,
               "raw: notifications/cancelled over stdio interrupts hang, no reply for it", reply)
    finally:
        proc.terminate()
        await proc.wait()


async def auth_checks(url: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    hdrs = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx2.AsyncClient() as http:
        r = await http.post(url, json=body, headers=hdrs)
        expect(r.status_code == 401, "http: no token -> 401", r.status_code)
        r = await http.post(url, json=body, headers={**hdrs, "Authorization": "Bearer wrong"})
        expect(r.status_code == 401, "http: wrong token -> 401", r.status_code)
        r = await http.post(url, json=body, headers={**hdrs, "Authorization": f"Bearer {TOKEN}"})
        expect(r.status_code == 200 and "mcp-session-id" in r.headers, "http: right token -> 200 + session")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "calls.log"
        stdio = StdioServerParameters(command=sys.executable, args=[SERVER, "stdio"], env={"MCP_TEST_LOG": str(log)})
        with anyio.fail_after(120):
            for mode in ("legacy", "auto"):
                await exercise(f"stdio/{mode}", stdio, mode, log)
            async with http_server(log) as url:
                await auth_checks(url)
                timeout = httpx2.Timeout(30, read=300)
                async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout) as http:
                    for mode in ("legacy", "auto"):
                        await exercise(f"http/{mode}", url, mode, log, http)
            raw_checks(log)
            await raw_cancel_check(log)
        print(f"---- call log: {len(log_lines(log))} lines, e.g. {log_lines(log)[:3]}")
    print("ALL OK")


if __name__ == "__main__":
    anyio.run(main)
