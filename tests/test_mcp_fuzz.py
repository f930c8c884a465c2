"""Fuzzing the MCP tools over /mcp (issue 26: the fuzz suite covers the MCP tools): seeded random and hostile
arguments for every tool, sent as raw JSON-RPC (stateless streamable HTTP takes a tools/call without a session),
so values a client library would refuse to send reach the server as they are.

The properties, for every call: the HTTP answer is 200 with a JSON-RPC result (never a 5xx, never a JSON-RPC
error for a well-formed call; a body with a lone surrogate's escape is not JSON to the server's parser: 400); a
refused call is a tool error (isError) with one message; the server still answers /healthz; and nothing stored
changed: the memories (ids, texts, checksums), their folders and the jobs are what they were (no fuzzed add is
well-formed enough to queue, and no fuzzed forget names a memory of the caller's).
"""

from __future__ import annotations

import json
import random

import httpx
import pytest
from faultlib import make_tiny_model
from serverlib import LiveServer, make_server_store, quick_recipe

from megamem import Item, Memory, schema

CASES = 150  # per tool
OWN = {"a-bridge": "In 2031 the Vexmoor bridge was painted teal by Ida Carrow."}
OTHERS = {"g-bridge": "In 2032 the Vexmoor bridge was repainted crimson by Tomas Reyes."}
HOSTILE = [
    None,
    "",
    " ",
    "\x00",
    "\ud800",
    "x" * 200_000,
    "../../etc/passwd",
    "a%2Fb",
    "g-bridge",  # another tenant's memory
    "globex--g-bridge",  # its stored id
    -1,
    0,
    2**70,
    1.5,
    float("inf"),
    True,
    [],
    [None],
    ["x"] * 100,
    {},
    {"$where": 1},
    {"nested": {"deep": [1, {"x": None}]}},
]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcpfuzz")
    store, keys = make_server_store(root, make_tiny_model(root / "model", context=512))
    mem = Memory(store, recipe=quick_recipe())
    mem.add_many(
        [Item(t, id=schema.stored_id("acme", i), reserved={schema.NAMESPACE: "acme"}) for i, t in OWN.items()]
        + [Item(t, id=schema.stored_id("globex", i), reserved={schema.NAMESPACE: "globex"}) for i, t in OTHERS.items()]
    )
    mem.store.close()
    with LiveServer(store, worker=False) as url:
        yield url, keys, store


def snapshot(store) -> tuple:
    """What must not change: every memory (id, text, checksum), the store's folders, the jobs."""
    from megamem.server import db

    mem = Memory(store)
    try:
        recs = sorted((r.id, r.text, r.adapter_sha256) for r in mem.list())
    finally:
        mem.store.close()
    conn = db.connect(store)
    try:
        jobs = conn.execute("SELECT id, state FROM jobs ORDER BY id").fetchall()
    finally:
        conn.close()
    folders = sorted(p.name for p in (store / "memories").iterdir()) if (store / "memories").is_dir() else []
    return recs, jobs, folders


def hostile_args(rng: random.Random, props: list[str]) -> dict:
    """Arguments with the tool's own names (some missing) and some unknown ones, each a hostile value or a
    plausible one, so that both the checks and the paths behind them are reached."""
    args = {}
    for name in props:
        if rng.random() < 0.7:
            args[name] = rng.choice(HOSTILE) if rng.random() < 0.7 else rng.choice(["Vexmoor", "bridge?", 3, 1])
    if rng.random() < 0.3:
        args[rng.choice(["foo", "", "id ", "__proto__"])] = rng.choice(HOSTILE)
    return args


def safe(tool: str, args: dict) -> dict:
    """Keep fuzzing from changing the store by design: an add always carries one bad field (so it is refused
    before any job is queued), a forget never names the caller's own memory, an ask decodes at most 4 tokens."""
    if tool == "add_memory" and isinstance(args.get("text"), str) and args["text"].strip():
        args["paraphrases"] = [None]
    if tool == "forget_memory" and isinstance(args.get("id"), str) and args["id"] in OWN:
        args["id"] = "g-bridge"
    if tool == "ask" and (not isinstance(args.get("max_tokens"), int) or args.get("max_tokens", 0) > 4):
        args["max_tokens"] = 4
    return args


def rpc(url: str, key: str, n: int, method: str, params: dict) -> dict:
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    body = json.dumps({"jsonrpc": "2.0", "id": n, "method": method, "params": params}, allow_nan=True)
    r = httpx.post(url + "/mcp", content=body, headers=headers | {"Content-Type": "application/json"}, timeout=120)
    data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
    answer = json.loads(data[-1] if data else r.text)
    # 200 with the result; 400 only for a body that is not JSON to a strict parser (a lone surrogate's escape)
    assert r.status_code == 200 or (r.status_code == 400 and answer["error"]["code"] == -32700), (params, r.text[:300])
    return answer


def test_fuzzed_tool_calls_are_results_or_tool_errors_and_change_nothing(live):
    url, keys, store = live
    tools = rpc(url, keys["acme"], 0, "tools/list", {})["result"]["tools"]
    assert {t["name"] for t in tools} == {"add_memory", "search_memories", "ask", "list_memories", "forget_memory"}
    before = snapshot(store)
    rng = random.Random(20261203)
    outcomes = {"result": 0, "tool error": 0}
    for tool in tools:
        props = list(tool["inputSchema"].get("properties", {}))
        for n in range(CASES):
            args = safe(tool["name"], hostile_args(rng, props))
            answer = rpc(url, keys["acme"], n + 1, "tools/call", {"name": tool["name"], "arguments": args})
            if "error" in answer:  # not JSON to the server's parser (see rpc)
                outcomes["parse error"] = outcomes.get("parse error", 0) + 1
                continue
            result = answer["result"]
            if result.get("isError"):
                (content,) = result["content"]
                assert content["type"] == "text" and content["text"].strip()
                outcomes["tool error"] += 1
            else:
                assert "structuredContent" in result, (tool["name"], args, result)
                outcomes["result"] += 1
        assert httpx.get(url + "/healthz").status_code == 200
    assert snapshot(store) == before
    assert outcomes["result"] > 0 and outcomes["tool error"] > 0  # both sides were reached


def test_malformed_json_rpc_is_answered_without_a_server_error(live):
    url, keys, store = live
    before = snapshot(store)
    headers = {"Authorization": f"Bearer {keys['acme']}", "Accept": "application/json, text/event-stream"}
    bodies = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'{"jsonrpc": "2.0"}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "nope", "arguments": {}}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "ask", "arguments": []}}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "no/such", "params": {}}',
        b"\xff\xfe",
    ]
    for body in bodies:
        r = httpx.post(url + "/mcp", content=body, headers=headers | {"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text[:200])
    assert httpx.get(url + "/healthz").status_code == 200 and snapshot(store) == before
