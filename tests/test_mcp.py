"""megamem's MCP server, driven by the official `mcp` SDK's own client over both transports: stdio (`megamem mcp`
spawned as a subprocess, with the arguments docs/integrations.md gives a desktop assistant) and streamable HTTP
(`/mcp` on a live `megamem serve`, with API keys).

One store for the module, on the tests' tiny model with its own output head (it answers gibberish that depends on
every prompt token and mixture weight, so equal answers are not equal by accident), holding two tenants' memories
on the same topics. Checked: the tools and their schemas; that each tool works and answers as the REST API, chat
and Memory.ask do; that bad input is a tool error and nothing stored is lost; that a key of one namespace cannot
see, route to or forget another's memories; that a missing or invalid key is refused; the docs' snippets.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import httpx2
import pytest
from faultlib import make_tiny_model
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from serverlib import LiveServer, make_server_store, quick_recipe, wait_job
from typer.testing import CliRunner

from megamem import Item, Memory, schema
from megamem.answer import MODES

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
MEMORIES = {  # id -> (namespace, text, user)
    "a-bridge": ("acme", "In 2031 the Vexmoor bridge was painted teal by Ida Carrow.", "alice"),
    "a-comet": ("acme", "Astronomers at Kestrel Observatory named the comet K-77 Brightwing in 2029.", "bob"),
    "g-bridge": ("globex", "In 2032 the Vexmoor bridge was repainted crimson by Tomas Reyes.", "alice"),
    "g-bakery": ("globex", "Pell's bakery on Orchard Lane sells cinnamon buns shaped like foxes on Sundays.", "carol"),
}
OWN = {ns: {m for m, spec in MEMORIES.items() if spec[0] == ns} for ns in ("acme", "globex")}
TOOLS = {"add_memory", "search_memories", "ask", "list_memories", "forget_memory"}
REQUIRED = {"add_memory": ["text"], "search_memories": ["query"], "ask": ["question"], "forget_memory": ["id"]}
QUESTION = "What colour is the Vexmoor bridge?"
TOKENS = 12  # the same answer cap on every side


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The store with both tenants' memories learned, and its API keys (acme, globex, admin of namespace 'ops')."""
    root = tmp_path_factory.mktemp("mcp")
    store, keys = make_server_store(root, make_tiny_model(root / "model", context=512, tied=False))
    mem = Memory(store, recipe=quick_recipe())
    items = [
        Item(text, id=schema.stored_id(ns, mid), reserved={schema.NAMESPACE: ns, schema.USER: user})
        for mid, (ns, text, user) in MEMORIES.items()
    ]
    mem.add_many(items)
    mem.store.close()
    return store, keys


@pytest.fixture(scope="module")
def live(store):
    """(the server's base URL, the keys, the Server) of a live server on the store."""
    path, keys = store
    server = LiveServer(path)
    with server as url:
        yield url, keys, server.app.state.server


def stored_ids(path: Path, namespace: str) -> set[str]:
    """A namespace's memories in the store (their stored ids), read by a Memory of the test's own."""
    mem = Memory(path)
    try:
        return {r.id for r in mem.list() if schema.owns(namespace, r)}
    finally:
        mem.store.close()


# -- the two transports, through the SDK's client ------------------------------------------------------------------
@asynccontextmanager
async def over_http(url: str, key: str | None, namespace: str | None = None) -> AsyncIterator[ClientSession]:
    """An initialized ClientSession on /mcp with a key (and an admin's X-Megamem-Namespace)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if namespace:
        headers["X-Megamem-Namespace"] = namespace
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
        async with streamable_http_client(url + "/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


def desktop_args() -> list[str]:
    """The arguments docs/integrations.md gives a desktop assistant for `megamem` (its mcpServers JSON)."""
    config = json.loads(re.search(r"```json\n(\{.*?\"command\".*?)```", DOCS.read_text(), re.S).group(1))
    server = config["mcpServers"]["megamem"]
    assert server["command"] == "megamem" and server["args"][0] == "mcp"
    return server["args"]


@asynccontextmanager
async def over_stdio(path: Path, namespace: str) -> AsyncIterator[ClientSession]:
    """An initialized ClientSession on `megamem mcp` (the docs' arguments, this store and namespace), spawned
    as `python -m megamem` with this environment (its Hugging Face cache and offline flag)."""
    args = desktop_args()
    args[args.index("--store") + 1] = str(path)
    args[args.index("--namespace") + 1] = namespace
    params = StdioServerParameters(command=sys.executable, args=["-m", "megamem", *args], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=300) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, args: dict, **kw) -> dict:
    """A tool's structured result; the call must succeed, and its text content is the same JSON."""
    result = await session.call_tool(tool, args, **kw)
    assert not result.is_error, (tool, args, result.content)
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


async def refused(session: ClientSession, tool: str, args: dict, *words: str) -> str:
    """A tool error (isError, not a protocol error) whose text names the problem (each of `words` in it)."""
    result = await session.call_tool(tool, args)
    assert result.is_error, (tool, args, result.structured_content)
    text = result.content[0].text
    for w in words:
        assert w.lower() in text.lower(), (tool, args, text)
    return text


async def check_tools(session: ClientSession) -> dict[str, dict]:
    """The five tools, each with an object schema that describes every argument and refuses unknown ones, and an
    output schema; returns their input schemas."""
    tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, t in tools.items():
        s = t.input_schema
        assert s["type"] == "object" and s["additionalProperties"] is False, (name, s)
        assert s.get("required", []) == REQUIRED.get(name, []), (name, s)
        assert all(p.get("description") for p in s["properties"].values()), (name, s)
        assert t.description and t.output_schema and t.output_schema["type"] == "object", name
    assert tools["ask"].input_schema["properties"]["mode"]["enum"] == list(MODES)
    assert tools["search_memories"].annotations.read_only_hint and tools["forget_memory"].annotations.destructive_hint
    return {name: t.input_schema for name, t in tools.items()}


async def check_bad_input(session: ClientSession, own: str, other: str) -> None:
    """Bad input to every tool: a tool error naming the problem (the session goes on working after each)."""
    await refused(session, "add_memory", {}, "text")
    await refused(session, "add_memory", {"text": "   "}, "empty")
    await refused(session, "add_memory", {"text": "A note.", "user": "alice"}, "user")  # unknown: named, not ignored
    await refused(session, "add_memory", {"text": "A note.", "id": own}, "exists")  # never overwritten
    await refused(session, "add_memory", {"text": "A note.", "id": "x--y"}, "--")
    await refused(session, "add_memory", {"text": "A note.", "metadata": {"megamem.namespace": "x"}}, "megamem.")
    await refused(session, "add_memory", {"text": "A note.", "replaces": [other]}, other)  # another tenant's
    await refused(session, "add_memory", {"text": "word " * 3000}, "context")  # too long for the model: no training
    await refused(session, "add_memory", {"text": "Bad \x1b escape."}, "control character")
    await refused(session, "search_memories", {"query": ""}, "query")
    await refused(session, "search_memories", {"query": "bridge", "limit": 0}, "limit")
    await refused(session, "ask", {"question": "Why?", "mode": "loud"}, "mode")
    await refused(session, "ask", {"question": "Why?", "max_tokens": 100_000}, "max_tokens")
    await refused(session, "ask", {"question": " \n "}, "question")
    await refused(session, "list_memories", {"limit": 0}, "limit")
    await refused(session, "list_memories", {"cursor": 7}, "cursor")
    await refused(session, "forget_memory", {"id": "no-such-memory"}, "no memory")
    await refused(session, "forget_memory", {"id": other}, "no memory")  # another tenant's is as absent
    await refused(session, "forget_memory", {}, "id")
    await refused(session, "drop_everything", {}, "drop_everything")  # an unknown tool


# -- streamable HTTP ----------------------------------------------------------------------------------------------
def test_http_tools_and_schemas(live):
    url, keys, _ = live

    async def main() -> None:
        async with over_http(url, keys["acme"]) as session:
            await check_tools(session)
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert "queue" in tools["add_memory"].description  # says how it learns over HTTP
        # the SDK's high-level Client negotiates the newest protocol version (server/discover) where the server has it
        headers = {"Authorization": f"Bearer {keys['acme']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http:
            async with Client(streamable_http_client(url + "/mcp", http_client=http)) as client:
                assert {t.name for t in (await client.list_tools()).tools} == TOOLS
                found = await client.call_tool("search_memories", {"query": QUESTION})
                assert {m["id"] for m in found.structured_content["results"]} == OWN["acme"]

    asyncio.run(main())


def test_http_refuses_a_missing_or_invalid_key(live):
    """401 in OpenAI's shape before any MCP message is read; the SDK's client fails to connect."""
    url, keys, _ = live
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    for headers, status, code in [
        ({}, 401, "missing_api_key"),
        ({"Authorization": "Bearer mm-not-a-key"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer " + keys["acme"], "X-Megamem-Namespace": "globex"}, 403, "forbidden"),
    ]:
        r = httpx.post(url + "/mcp", json=hello, headers=accept | headers, timeout=30)
        assert r.status_code == status and r.json()["error"]["code"] == code, (headers, r.text)

    async def connect(key: str | None) -> None:
        async with over_http(url, key):
            pass

    for key in (None, "mm-not-a-key"):
        with pytest.raises(Exception):  # noqa: B017 (the SDK wraps the HTTP error in its own exception groups)
            asyncio.run(connect(key))


def test_http_tools_answer_as_the_rest_api_and_chat(live):
    """search, list and ask over MCP give what POST /v1/memories/search, GET /v1/memories and a chat give."""
    url, keys, _ = live
    auth = {"Authorization": f"Bearer {keys['acme']}"}

    async def main() -> tuple[dict, dict, dict]:
        async with over_http(url, keys["acme"]) as s:
            found = await call(s, "search_memories", {"query": QUESTION, "limit": 5})
            listed = await call(s, "list_memories", {})
            asked = await call(s, "ask", {"question": QUESTION, "max_tokens": TOKENS})
            return found, listed, asked

    found, listed, asked = asyncio.run(main())
    rest = httpx.post(f"{url}/v1/memories/search", json={"query": QUESTION, "limit": 5}, headers=auth).json()
    assert found == rest and found["results"][0]["id"] == "a-bridge"
    assert {m["id"] for m in found["results"]} == OWN["acme"]
    assert listed == httpx.get(f"{url}/v1/memories", headers=auth).json()
    assert {m["id"] for m in listed["results"]} == OWN["acme"] and listed["next_cursor"] is None
    assert listed["results"][0]["user_id"] in ("alice", "bob") and listed["results"][0]["memory"]
    body = {"model": "megamem", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS}
    chat = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=120).json()
    assert asked["answer"] == chat["choices"][0]["message"]["content"].strip()
    assert [s["id"] for s in asked["selected"]] == [s["id"] for s in chat["memory"]["selected"]]
    assert asked["selected"] and asked["mode"] == "mega+rag" and asked["answer"]


def test_http_add_is_a_job_and_forget_deletes(live):
    url, keys, _ = live

    async def add() -> dict:
        async with over_http(url, keys["acme"]) as s:
            return await call(s, "add_memory", {"text": "Dana keeps bees on the Vexmoor bridge.", "user_id": "dana"})

    added = asyncio.run(add())
    assert added["status"] == "queued" and added["job_id"] and added["job_id"] in added["note"]
    assert wait_job(url, keys["acme"], added["job_id"])["status"] == "succeeded"

    async def use_and_forget() -> tuple[dict, dict, dict]:
        async with over_http(url, keys["acme"]) as s:
            mine = await call(s, "list_memories", {"user_id": "dana"})
            gone = await call(s, "forget_memory", {"id": added["id"]})
            after = await call(s, "list_memories", {"user_id": "dana"})
            return mine, gone, after

    mine, gone, after = asyncio.run(use_and_forget())
    assert [m["id"] for m in mine["results"]] == [added["id"]] and mine["results"][0]["user_id"] == "dana"
    assert gone == {"id": added["id"], "deleted": True} and after["results"] == []
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    assert httpx.get(f"{url}/v1/memories/{added['id']}", headers=auth).status_code == 404


def job_count(path: Path) -> int:
    """How many jobs the server's queue has ever held (an add that was refused queues none)."""
    from megamem.server import db

    conn = db.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        conn.close()


def test_http_bad_input_is_a_tool_error_and_loses_nothing(live, store):
    url, keys, _ = live
    before, jobs = stored_ids(store[0], "acme"), job_count(store[0])

    async def main() -> None:
        async with over_http(url, keys["acme"]) as s:
            await check_bad_input(s, "a-bridge", "g-bridge")
            assert {m["id"] for m in (await call(s, "list_memories", {}))["results"]} == OWN["acme"]

    asyncio.run(main())
    assert stored_ids(store[0], "acme") == before and job_count(store[0]) == jobs  # nothing lost, nothing queued


def test_http_tenants_are_isolated(live, store):
    """globex's key, over MCP: none of acme's memories is listed, searched, selected or forgettable, even for a
    query that is acme's own text; an admin key acts in the namespace it names."""
    url, keys, _ = live
    acme_text = MEMORIES["a-bridge"][1]

    async def main() -> None:
        async with over_http(url, keys["globex"]) as s:
            assert {m["id"] for m in (await call(s, "list_memories", {}))["results"]} == OWN["globex"]
            found = await call(s, "search_memories", {"query": acme_text, "limit": 100})
            assert {m["id"] for m in found["results"]} == OWN["globex"]
            asked = await call(s, "ask", {"question": acme_text, "max_tokens": 2})
            assert {m["id"] for m in asked["selected"]} <= OWN["globex"]
            await refused(s, "forget_memory", {"id": "a-bridge"}, "no memory")
            await refused(s, "add_memory", {"text": "Mine now.", "replaces": ["a-bridge"]}, "a-bridge")
        async with over_http(url, keys["admin"], "acme") as s:
            assert {m["id"] for m in (await call(s, "list_memories", {}))["results"]} == OWN["acme"]

    asyncio.run(main())
    assert schema.stored_id("acme", "a-bridge") in stored_ids(store[0], "acme")


def test_http_open_access(store):
    """--open: no key needed, every caller is the default namespace (which holds none of the tenants')."""
    path, _ = store
    with LiveServer(path, open_access=True, worker=False) as url:

        async def main() -> None:
            async with over_http(url, None) as s:
                assert (await call(s, "list_memories", {}))["results"] == []
                assert (await call(s, "search_memories", {"query": QUESTION}))["results"] == []

        asyncio.run(main())


def test_docs_agent_snippet_runs(live):
    """docs/integrations.md's ClientSession snippet, against the live server (as the admin key's own namespace,
    'ops', so the other tests' namespaces stay as they are)."""
    url, keys, _ = live
    section = DOCS.read_text().split("\n## MCP\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("http://127.0.0.1:8000", url)
    printed: list = []
    exec(compile(code, str(DOCS), "exec"), {"KEY": keys["admin"], "print": printed.append, "__name__": "docs"})
    assert printed[0] in ([], ["Zorblatt lives in a teal lighthouse."])  # found once the server has it
    assert isinstance(printed[1], str) and len(printed) == 2


# -- stdio ----------------------------------------------------------------------------------------------------------
def test_stdio_tools(store, live):
    """`megamem mcp` as the docs start it, for acme: the same tools as over HTTP; search, list, ask (Memory.ask's
    answer), an add learned in the process (with progress) and forgotten; bad input refused, nothing lost."""
    path, _ = store
    url, keys, _ = live
    mem = Memory(path)
    want = mem.ask(QUESTION, namespace="acme", max_new_tokens=TOKENS)
    bare = mem.ask(QUESTION, namespace="acme", max_new_tokens=TOKENS, use_memory=False)
    assert want.text != bare.text  # the memories change this answer: equal answers below are not by accident
    routed = [schema.api_id(mem.show(i)) for i, _ in want.gate]
    mem.store.close()
    before = stored_ids(path, "acme")
    steps: list[float] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        steps.append(done)

    async def main() -> None:
        async with over_http(url, keys["acme"]) as s:
            over_http_schemas = await check_tools(s)
        async with over_stdio(path, "acme") as s:
            assert await check_tools(s) == over_http_schemas
            tools = {t.name: t for t in (await s.list_tools()).tools}
            assert "here and now" in tools["add_memory"].description  # says how it learns over stdio
            found = await call(s, "search_memories", {"query": QUESTION})
            assert found["results"][0]["id"] == "a-bridge" and {m["id"] for m in found["results"]} == OWN["acme"]
            listed = await call(s, "list_memories", {"limit": 1})
            assert len(listed["results"]) == 1 and listed["next_cursor"]
            rest = await call(s, "list_memories", {"limit": 1, "cursor": listed["next_cursor"]})
            assert {m["id"] for m in listed["results"] + rest["results"]} == OWN["acme"] and not rest["next_cursor"]
            asked = await call(s, "ask", {"question": QUESTION, "max_tokens": TOKENS})
            assert asked["answer"] == want.text
            assert [m["id"] for m in asked["selected"]] == routed and routed
            added = await call(
                s,
                "add_memory",
                {"text": "Erin rows across the Brisk canal.", "id": "a-erin"},
                progress_callback=progress,
            )
            assert added["status"] == "stored" and added["memory"]["memory"] == "Erin rows across the Brisk canal."
            assert steps and steps == sorted(steps)  # progress notifications, step by step
            assert "a-erin" in {m["id"] for m in (await call(s, "list_memories", {}))["results"]}
            assert await call(s, "forget_memory", {"id": "a-erin"}) == {"id": "a-erin", "deleted": True}
            await check_bad_input(s, "a-bridge", "g-bridge")

    asyncio.run(main())
    assert stored_ids(path, "acme") == before


def test_stdio_namespaces_are_isolated(store):
    """`megamem mcp --namespace globex` never shows, routes to or forgets acme's memories."""
    path, _ = store
    acme_text = MEMORIES["a-bridge"][1]

    async def main() -> None:
        async with over_stdio(path, "globex") as s:
            assert {m["id"] for m in (await call(s, "list_memories", {}))["results"]} == OWN["globex"]
            found = await call(s, "search_memories", {"query": acme_text, "limit": 100})
            assert {m["id"] for m in found["results"]} == OWN["globex"]
            asked = await call(s, "ask", {"question": acme_text, "max_tokens": 2})
            assert {m["id"] for m in asked["selected"]} <= OWN["globex"]
            await refused(s, "forget_memory", {"id": "a-bridge"}, "no memory")

    asyncio.run(main())
    assert schema.stored_id("acme", "a-bridge") in stored_ids(path, "acme")


def test_mcp_command_refuses_a_bad_store_or_namespace(tmp_path, store):
    """One error line before any MCP traffic: no store at the path (never a new one), a bad namespace."""
    from megamem.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["mcp", "--store", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "no megamem store" in r.output and not (tmp_path / "nowhere").exists()
    r = runner.invoke(app, ["mcp", "--store", str(store[0]), "--namespace", "Bad Name"])
    assert r.exit_code == 1 and "namespace" in r.output
