"""Fuzzing the HTTP server in-process (no socket): schemathesis against its OpenAPI schema, then hand-made
hostile requests sent as raw ASGI messages (so bytes a client library would refuse or normalize reach the app
as they are: `../` and `%2F` in paths, NUL and non-UTF-8 bytes in bodies and header values).

The properties, for every request:
- no 5xx (a server error is a bug: every bad input has a 4xx);
- every error body has OpenAI's shape {"error": {"message", "type", "param", "code"}};
- the server still answers /healthz afterwards;
- (hand cases) nothing stored changed: the memories (ids, texts, metadata, checksums), their folders, the jobs
  and the API keys are exactly what they were before the request.

Both parts run on the tests' tiny random model (tests/serverlib.py), each on its own store.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serverlib import make_server_store, quick_recipe

from megamem.server.app import ServerConfig, create_app
from megamem.server.runtime import LOOPBACK_HOSTS

try:
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode
except ImportError:  # the hand cases need no schemathesis
    schemathesis = None

READY_S = 120
CHAT = "/v1/chat/completions"


def wait_ready(app) -> None:
    """Poll /healthz until 200. A TestClient used outside `with` does not run the lifespan, so this only
    watches the load that is already under way."""
    from fastapi.testclient import TestClient

    client = TestClient(app)
    deadline = time.time() + READY_S
    while time.time() < deadline:
        r = client.get("/healthz")
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text  # loading
        time.sleep(0.1)
    raise AssertionError(f"the app did not become ready in {READY_S} s")


def check_error_shape(status: int, headers: dict, body: bytes, what: str) -> None:
    """An error response is JSON {"error": {"message": str, "type": str, "param": str|None, "code": str|None}}."""
    assert status >= 400
    ctype = headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"{what}: error {status} is not JSON ({ctype!r}): {body[:300]!r}"
    data = json.loads(body)
    assert isinstance(data, dict) and set(data) == {"error"}, f"{what}: not OpenAI's error shape: {data!r}"
    err = data["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, f"{what}: {data!r}"
    assert isinstance(err["message"], str) and err["message"], f"{what}: {data!r}"
    assert isinstance(err["type"], str) and err["type"], f"{what}: {data!r}"
    assert err["param"] is None or isinstance(err["param"], str), f"{what}: {data!r}"
    assert err["code"] is None or isinstance(err["code"], str), f"{what}: {data!r}"


# the in-process clients (TestClient, schemathesis, the raw ASGI messages) name the host "testserver"
TEST_HOSTS = (*LOOPBACK_HOSTS, "testserver")


# -- (a) schemathesis ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """An app on its own store, its lifespan started by schemathesis (from_asgi enters its own ASGI client,
    which runs the lifespan once and keeps it running; entering a TestClient too would start a second model
    load and a second worker on the same store)."""
    store, keys = make_server_store(tmp_path_factory.mktemp("fuzz"))
    app = create_app(ServerConfig(allowed_hosts=TEST_HOSTS, store=store, recipe=quick_recipe()))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    wait_ready(app)
    yield schema, keys
    app.state.server.close()


def _operations() -> list[tuple[str, str]]:
    """The schema's operations, read at collection from an app that is never started (create_app touches no
    store and loads no model until its lifespan runs)."""
    app = create_app(ServerConfig(allowed_hosts=TEST_HOSTS, store=Path("never-opened")))
    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item]


OPERATIONS = _operations()
MAX_EXAMPLES = 60  # per operation and generation mode


@pytest.mark.skipif(schemathesis is None, reason="needs schemathesis (pip install schemathesis)")
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis(fuzz_server, method: str, path: str):
    """Schema-conforming (positive) and schema-breaking (negative) cases of every operation, with an admin key
    (so the key routes and X-Megamem-Namespace are reached too); chat bodies get the served model's name half
    the time, or nearly every one would stop at 404. (Driven through `as_strategy` and Hypothesis rather than
    `schemathesis.pytest.from_fixture`: schemathesis 4.32's lazy loader sets `Node._nodeid`, which pytest 9.2
    no longer has.)"""
    schema, keys = fuzz_server
    operation = schema[path][method]
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    try:
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
    except Exception:  # an operation with nothing to break (no parameters, no body)
        pass
    auth = {"Authorization": f"Bearer {keys['admin']}"}

    @settings(
        max_examples=MAX_EXAMPLES * len(strategies),
        deadline=timedelta(seconds=20),
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def fuzz(case):
        if case.path == CHAT and isinstance(case.body, dict) and zlib.crc32(repr(case.body).encode()) % 2 == 0:
            case.body["model"] = "megamem"
            for name in ("max_tokens", "max_completion_tokens"):  # short completions: the fuzz is not a benchmark
                value = case.body.get(name)
                if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 8):
                    case.body[name] = 8
        response = case.call_and_validate(headers=auth, checks=[not_a_server_error], timeout=60)
        event(f"status {response.status_code}")
        if response.status_code >= 400:
            headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
            check_error_shape(response.status_code, headers, response.content, case.as_curl_command())

    fuzz()


@pytest.mark.skipif(schemathesis is None, reason="needs schemathesis (pip install schemathesis)")
def test_schemathesis_left_it_healthy(fuzz_server):
    schema, _ = fuzz_server
    wait_ready(schema.app)


# -- (b) hand cases -----------------------------------------------------------------------------------------------


@dataclass
class Raw:
    """One hand-made request. path: the raw request target (percent-encoding kept); headers as bytes;
    chunks: the body in pieces, sent without a Content-Length unless one is given in headers."""

    name: str
    method: str
    path: str
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    key: str | None = "acme"  # whose key goes in Authorization (None: no Authorization header)
    chunks: list[bytes] | None = None
    json_type: bool = True  # send Content-Type: application/json


async def _call_asgi(app, req: Raw, auth: bytes | None) -> tuple[int, dict, bytes]:
    target, _, query = req.path.partition("?")
    headers = [(b"host", b"testserver")]
    if req.json_type:
        headers.append((b"content-type", b"application/json"))
    if auth is not None:
        headers.append((b"authorization", auth))
    headers += req.headers
    pieces = list(req.chunks) if req.chunks is not None else [req.body]
    if req.chunks is None and not any(k == b"content-length" for k, _ in req.headers):
        headers.append((b"content-length", str(len(req.body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": unquote(target),  # what uvicorn puts there
        "raw_path": target.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    status, out_headers, body = None, {}, bytearray()
    done = anyio.Event()

    async def receive():
        if pieces:
            chunk = pieces.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers.update({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message["headers"]})
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    with anyio.fail_after(120):
        await app(scope, receive, send)
    assert status is not None, f"{req.name}: the app sent no response"
    return status, out_headers, bytes(body)


def call_raw(app, req: Raw, keys: dict) -> tuple[int, dict, bytes]:
    auth = None if req.key is None else f"Bearer {keys[req.key]}".encode() if req.key in keys else req.key.encode()
    return anyio.run(_call_asgi, app, req, auth)


def snapshot(store: Path) -> dict:
    """Everything a hostile request must not change: memory rows (with checksums), memory folders, jobs, keys."""
    db = sqlite3.connect(f"file:{store / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        memories = db.execute("SELECT * FROM memories ORDER BY id").fetchall()
        pending = db.execute("SELECT * FROM pending ORDER BY id").fetchall()
        jobs = db.execute("SELECT id, state, memory_id FROM jobs ORDER BY id").fetchall()
        keys = db.execute("SELECT hash, namespace, admin FROM api_keys ORDER BY hash").fetchall()
    finally:
        db.close()
    folders = sorted(p.name for p in (store / "memories").iterdir())
    return {"memories": memories, "pending": pending, "jobs": jobs, "keys": keys, "folders": folders}


@pytest.fixture(scope="module")
def hand_server(tmp_path_factory):
    """An app on its own store with one memory in each of acme and globex; the lifespan run by a TestClient."""
    from fastapi.testclient import TestClient

    store, keys = make_server_store(tmp_path_factory.mktemp("hand"))
    app = create_app(ServerConfig(allowed_hosts=TEST_HOSTS, store=store, recipe=quick_recipe()))
    with TestClient(app) as client:
        wait_ready(app)
        for ns, mid in (("acme", "m1"), ("globex", "g1")):
            h = {"Authorization": f"Bearer {keys[ns]}"}
            r = client.post(
                "/v1/memories", json={"text": f"In 2031 {ns} painted the bridge teal.", "id": mid}, headers=h
            )
            assert r.status_code == 202, r.text
            job = r.json()["job_id"]
            deadline = time.time() + 120
            while (state := client.get(f"/v1/jobs/{job}", headers=h).json()["status"]) not in ("succeeded", "failed"):
                assert time.time() < deadline, "the set-up job did not finish"
                time.sleep(0.1)
            assert state == "succeeded"
        before = snapshot(store)
        assert len(before["memories"]) == 2
        yield app, client, store, keys, before


def J(obj) -> bytes:
    return json.dumps(obj).encode()


HI = b'"messages": [{"role": "user", "content": "hi"}]'


def chat_bytes(*fields: bytes) -> bytes:
    """A chat body written by hand (for what json.dumps cannot write: NaN, lone surrogates, raw bytes)."""
    return b'{"model": "megamem", "max_tokens": 2, ' + b", ".join(fields) + b"}"


def add_bytes(*fields: bytes) -> bytes:
    return b'{"text": "x y z", "id": "new3", ' + b", ".join(fields) + b"}"


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MEMS = "/v1/memories"
CHAT_OK = {"model": "megamem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ADD_OK = {"text": "In 2040 the lighthouse was painted green.", "id": "new1"}
# the JSON kinds a field's declared type admits (everything else is a wrong type)
KINDS = {
    "null": None,
    "bool": True,
    "int": 7,
    "float": 1.5,
    "str": "x",
    "list": ["x"],
    "object": {"a": "x"},
}
CHAT_FIELDS = {
    "model": {"str"},
    "messages": {"list"},
    "stream": {"bool"},
    "stream_options": {"object", "null"},
    "max_tokens": {"int", "null"},
    "max_completion_tokens": {"int", "null"},
    "temperature": {"int", "float", "null"},
    "top_p": {"float", "int", "null"},
    "seed": {"int", "null"},
    "stop": {"str", "list", "null"},
    "n": {"int", "null"},
    "memory": {"object", "null"},
}
MEMORY_OPTION_FIELDS = {
    "user_id": {"str", "null"},
    "agent_id": {"str", "null"},
    "top_k": {"int", "null"},
    "threshold": {"int", "float", "null"},
    "mode": {"str"},
    "ids": {"list", "null"},
    "filters": {"object", "null"},
    "disable": {"bool"},
}
MESSAGE_FIELDS = {"role": {"str"}, "content": {"str", "list", "null"}}
ADD_FIELDS = {
    "text": {"str", "null"},
    "messages": {"list", "null"},
    "paraphrases": {"list"},
    "metadata": {"object"},
    "user_id": {"str", "null"},
    "agent_id": {"str", "null"},
    "id": {"str", "null"},
    "replaces": {"list"},
}
SEARCH_FIELDS = {
    "query": {"str"},
    "user_id": {"str", "null"},
    "agent_id": {"str", "null"},
    "limit": {"int"},
    "filters": {"object", "null"},
}


def wrong_type_cases() -> list[Raw]:
    out = []
    for name, ok in CHAT_FIELDS.items():
        for kind, value in KINDS.items():
            if kind not in ok:
                out.append(Raw(f"chat.{name}={kind}", "POST", CHAT, J(CHAT_OK | {name: value})))
    for name, ok in MEMORY_OPTION_FIELDS.items():
        for kind, value in KINDS.items():
            if kind not in ok:
                out.append(Raw(f"chat.memory.{name}={kind}", "POST", CHAT, J(CHAT_OK | {"memory": {name: value}})))
    for name, ok in MESSAGE_FIELDS.items():
        for kind, value in KINDS.items():
            if kind not in ok:
                msg = {"role": "user", "content": "hi"} | {name: value}
                out.append(Raw(f"chat.messages[0].{name}={kind}", "POST", CHAT, J(CHAT_OK | {"messages": [msg]})))
    for kind, value in KINDS.items():
        if kind != "object":
            out.append(Raw(f"chat.messages[0]={kind}", "POST", CHAT, J(CHAT_OK | {"messages": [value]})))
            out.append(
                Raw(
                    f"chat.messages[0].content[0]={kind}",
                    "POST",
                    CHAT,
                    J(CHAT_OK | {"messages": [{"role": "user", "content": [value]}]}),
                )
            )
        if kind not in ("str",):
            part = {"type": "text", "text": value} if kind != "null" else {"type": value, "text": "hi"}
            out.append(
                Raw(
                    f"chat.content_part.{'text' if kind != 'null' else 'type'}={kind}",
                    "POST",
                    CHAT,
                    J(CHAT_OK | {"messages": [{"role": "user", "content": [part]}]}),
                )
            )
        if kind != "bool":
            out.append(
                Raw(
                    f"chat.stream_options.include_usage={kind}",
                    "POST",
                    CHAT,
                    J(CHAT_OK | {"stream_options": {"include_usage": value}}),
                )
            )
        if kind != "str":
            out.append(Raw(f"chat.stop[0]={kind}", "POST", CHAT, J(CHAT_OK | {"stop": [value]})))
            out.append(Raw(f"chat.memory.ids[0]={kind}", "POST", CHAT, J(CHAT_OK | {"memory": {"ids": [value]}})))
    for name, ok in ADD_FIELDS.items():
        for kind, value in KINDS.items():
            if kind not in ok:
                out.append(Raw(f"add.{name}={kind}", "POST", MEMS, J(ADD_OK | {name: value})))
    for kind, value in KINDS.items():
        if kind != "str":
            for name in ("paraphrases", "replaces"):
                out.append(Raw(f"add.{name}[0]={kind}", "POST", MEMS, J(ADD_OK | {name: [value]})))
        if kind != "object":
            out.append(Raw(f"add.messages[0]={kind}", "POST", MEMS, J({"messages": [value], "id": "new1"})))
    for name, ok in SEARCH_FIELDS.items():
        for kind, value in KINDS.items():
            if kind not in ok:
                out.append(
                    Raw(f"search.{name}={kind}", "POST", MEMS + "/search", J({"query": "bridge"} | {name: value}))
                )
    for kind, value in KINDS.items():
        if kind != "object":
            for path, key in ((CHAT, "acme"), (MEMS, "acme"), (MEMS + "/search", "acme"), ("/v1/keys", "admin")):
                out.append(Raw(f"body={kind} {path}", "POST", path, J(value), key=key))
    return out


# "wrong" kinds that pydantic's lax mode converts (JSON true is the number 1 for an int or float field): such a
# request is valid and may succeed; it must still never be a 5xx
COERCIBLE = {
    f"{body}.{name}=bool"
    for body, names in (
        ("chat", ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n")),
        ("chat.memory", ("top_k", "threshold")),
        ("search", ("limit",)),
    )
    for name in names
}

KEY_CASES = []
for _route in (
    ("GET", "/v1/models"),
    ("GET", MEMS),
    ("GET", MEMS + "/m1"),
    ("DELETE", MEMS + "/m1"),
    ("DELETE", MEMS + "?user_id=u"),
    ("GET", "/v1/jobs/x"),
    ("GET", "/v1/keys"),
    ("POST", CHAT),
    ("POST", MEMS),
    ("POST", MEMS + "/search"),
    ("POST", "/v1/keys"),
):
    _body = {CHAT: J(CHAT_OK), MEMS: J(ADD_OK), MEMS + "/search": J({"query": "bridge"})}.get(
        _route[1], J({"namespace": "evil"}) if _route[1] == "/v1/keys" else b""
    )
    for _label, _key in (
        ("no key", None),
        ("wrong key", "Bearer mm-not-a-key"),
        ("empty bearer", "Bearer "),
        ("basic auth", "Basic YWRtaW46YWRtaW4="),
        ("lower-case bearer", "bearer mm-x"),
        ("key with NUL", "Bearer mm-\x00"),
    ):
        KEY_CASES.append(Raw(f"{_label} {_route[0]} {_route[1]}", _route[0], _route[1], _body, key=_key))
    KEY_CASES.append(
        Raw(
            f"non-UTF-8 key {_route[0]} {_route[1]}",
            _route[0],
            _route[1],
            _body,
            key=None,
            headers=[(b"authorization", b"Bearer mm-\xff\xfe\x80")],
        )
    )

NON_ADMIN_KEY_CASES = [
    Raw("acme key on GET /v1/keys", "GET", "/v1/keys"),
    Raw("acme key on POST /v1/keys", "POST", "/v1/keys", J({"namespace": "acme", "admin": True})),
    Raw("acme key naming another namespace", "GET", MEMS, headers=[(b"x-megamem-namespace", b"globex")]),
    Raw("globex deletes acme's memory", "DELETE", MEMS + "/m1", key="globex"),
    Raw("globex deletes acme's memory by stored id", "DELETE", MEMS + "/acme--m1", key="globex"),
    Raw("globex reads acme's memory by stored id", "GET", MEMS + "/acme--m1", key="globex"),
    Raw("acme deletes by stored id", "DELETE", MEMS + "/acme--m1"),
    Raw("globex bulk-deletes acme's", "DELETE", MEMS + "?user_id=", key="globex"),
]

PATH_CASES = [
    Raw(f"{method} {path}", method, path)
    for path in (
        MEMS + "/../m1",
        MEMS + "/..%2Fm1",
        MEMS + "/..%2F..%2Fmanifest.sqlite",
        MEMS + "/%2e%2e%2fmemories%2fm1",
        MEMS + "/x%2F..%2Fm1",
        MEMS + "/..",
        MEMS + "/%2E%2E",
        MEMS + "/m1%00",
        MEMS + "/%00",
        MEMS + "/m1%2F",
        MEMS + "/..%5Cm1",
        MEMS + "/%ff%fe",
        MEMS + "/%ED%A0%80",
        MEMS + "/" + "a" * 5000,
        "/v1/jobs/..%2F..%2Fmanifest.sqlite",
        "/v1/jobs/%00",
        "/v1/memories/..%2Fsearch",
        "/v1/%2E%2E/v1/memories/m1",
    )
    for method in ("GET", "DELETE")
] + [
    Raw("query user_id NUL", "GET", MEMS + "?user_id=%00"),
    Raw("query user_id non-UTF-8", "GET", MEMS + "?user_id=%ff%fe"),
    Raw("query limit not a number", "GET", MEMS + "?limit=abc"),
    Raw("query limit huge", "GET", MEMS + "?limit=" + "9" * 400),
    Raw("query cursor traversal", "GET", MEMS + "?cursor=..%2F..%2F"),
    Raw("query cursor NUL", "GET", MEMS + "?cursor=%00"),
    Raw("bulk delete NUL user", "DELETE", MEMS + "?user_id=%00"),
    Raw("bulk delete no filter", "DELETE", MEMS),
    Raw("PUT a memory", "PUT", MEMS + "/m1", J({"text": "x"})),
    Raw("PATCH chat", "PATCH", CHAT, J(CHAT_OK)),
    Raw("unknown route", "GET", "/v1/nothing"),
    Raw("add id ../m1", "POST", MEMS, J({"text": "x y z", "id": "../m1"})),
    Raw("add id a/b", "POST", MEMS, J({"text": "x y z", "id": "a/b"})),
    Raw("add id ..%2Fm1", "POST", MEMS, J({"text": "x y z", "id": "..%2Fm1"})),
    Raw("add id NUL", "POST", MEMS, J({"text": "x y z", "id": "m\u0000"})),
    Raw("add id with namespace separator", "POST", MEMS, J({"text": "x y z", "id": "globex--g2"})),
    Raw("add id of an existing memory", "POST", MEMS, J({"text": "x y z", "id": "m1"})),
    Raw("add replaces ../m1", "POST", MEMS, J({"text": "x y z", "replaces": ["../m1"]})),
    Raw("add replaces another namespace's", "POST", MEMS, J({"text": "x y z", "replaces": ["g1"]})),
    Raw("add replaces stored id", "POST", MEMS, J({"text": "x y z", "replaces": ["globex--g1"]})),
    Raw("chat memory.ids ../m1", "POST", CHAT, J(CHAT_OK | {"memory": {"ids": ["../m1"]}})),
    Raw("chat memory.ids stored id", "POST", CHAT, J(CHAT_OK | {"memory": {"ids": ["globex--g1"]}})),
]

BAD_JSON = [
    b"",
    b"{",
    b'{"model": ',
    b"not json",
    b"{'model': 'megamem'}",
    b'{"a": 1,}',
    b"\x00",
    b"[" * 5000,
    b'{"text": "x"} trailing',
    b"\xef\xbb\xbf{}",
    b'{"a": NaN}',
    b"1e999999",
]
BAD_JSON_CASES = [
    Raw(f"invalid JSON {body[:20]!r} {path}", "POST", path, body, key="admin" if path == "/v1/keys" else "acme")
    for path in (CHAT, MEMS, MEMS + "/search", "/v1/keys")
    for body in BAD_JSON
] + [
    Raw("JSON as text/plain", "POST", MEMS, J(ADD_OK | {"id": "new2"}) + b"x", json_type=False),
    Raw("deep nesting in metadata", "POST", MEMS, add_bytes(b'"metadata": {"a": ' + nested(100_000) + b"}")),
    Raw("deep nesting in chat", "POST", CHAT, chat_bytes(b'"messages": ' + nested(100_000))),
]

NUL_AND_BYTES = [
    # NUL and other control characters, escaped in valid JSON: refused by the checks
    Raw("add text NUL", "POST", MEMS, J({"text": "a\u0000b", "id": "new3"})),
    Raw("add text ESC", "POST", MEMS, J({"text": "a\u001b[31mb", "id": "new3"})),
    Raw("add paraphrase NUL", "POST", MEMS, J(ADD_OK | {"paraphrases": ["a\u0000"]})),
    Raw("add metadata megamem key", "POST", MEMS, J(ADD_OK | {"metadata": {"megamem.namespace": "globex"}})),
    Raw("add message NUL", "POST", MEMS, J({"messages": [{"role": "user", "content": "a\u0000"}], "id": "new3"})),
    Raw("add empty text", "POST", MEMS, J({"text": "", "id": "new3"})),
    Raw("add whitespace text", "POST", MEMS, J({"text": "   \n", "id": "new3"})),
    Raw("add no text", "POST", MEMS, J({"id": "new3"})),
    Raw("add unknown field", "POST", MEMS, J(ADD_OK | {"bogus": 1})),
    Raw("add text too long for the model", "POST", MEMS, J({"text": "word " * 5000, "id": "new3"})),
    Raw("add metadata NaN", "POST", MEMS, add_bytes(b'"metadata": {"a": NaN}')),
    Raw("add metadata Infinity", "POST", MEMS, add_bytes(b'"metadata": {"a": Infinity}')),
    Raw("add metadata huge", "POST", MEMS, J({"text": "x y z", "id": "new3", "metadata": {"a": "b" * 70_000}})),
    # lone surrogates, escaped in valid JSON (no UTF-8 can carry them)
    Raw("add text lone surrogate", "POST", MEMS, b'{"text": "a \\ud800 b", "id": "new3"}'),
    Raw("add user_id lone surrogate", "POST", MEMS, add_bytes(b'"user_id": "\\ud800"')),
    Raw("add agent_id lone surrogate", "POST", MEMS, add_bytes(b'"agent_id": "\\udfff"')),
    Raw("add metadata key lone surrogate", "POST", MEMS, add_bytes(b'"metadata": {"\\ud800": 1}')),
    Raw("add metadata value lone surrogate", "POST", MEMS, add_bytes(b'"metadata": {"a": "\\ud800"}')),
    Raw("add unknown field lone surrogate", "POST", MEMS, add_bytes(b'"\\ud800": 1')),
    Raw("add id lone surrogate", "POST", MEMS, b'{"text": "x y z", "id": "\\ud800"}'),
    Raw(
        "chat message lone surrogate", "POST", CHAT, chat_bytes(b'"messages": [{"role": "user", "content": "\\ud800"}]')
    ),
    Raw(
        "chat system lone surrogate",
        "POST",
        CHAT,
        chat_bytes(b'"messages": [{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]'),
    ),
    Raw("chat model lone surrogate", "POST", CHAT, b'{"model": "\\ud800", ' + HI + b"}"),
    Raw("chat stop lone surrogate", "POST", CHAT, chat_bytes(b'"stop": "\\ud800"', HI)),
    Raw("chat filters lone surrogate", "POST", CHAT, chat_bytes(b'"memory": {"filters": {"\\ud800": 1}}', HI)),
    Raw("chat unknown field lone surrogate", "POST", CHAT, chat_bytes(b'"\\ud800": 1', HI)),
    Raw("search query lone surrogate", "POST", MEMS + "/search", b'{"query": "\\ud800"}'),
    Raw("search unknown field lone surrogate", "POST", MEMS + "/search", b'{"query": "bridge", "\\ud800": 1}'),
    Raw(
        "search filters lone surrogate",
        "POST",
        MEMS + "/search",
        b'{"query": "bridge", "filters": {"\\ud800": {"eq": 1}}}',
    ),
    Raw("key name lone surrogate", "POST", "/v1/keys", b'{"namespace": "acme", "name": "\\ud800"}', key="admin"),
    # raw NUL and non-UTF-8 bytes in the body
    Raw("add raw NUL in a string", "POST", MEMS, b'{"text": "a\x00b", "id": "new3"}'),
    Raw("add raw non-UTF-8", "POST", MEMS, b'{"text": "a\xff\xfeb", "id": "new3"}'),
    Raw("add raw latin-1", "POST", MEMS, '{"text": "caf\xe9 au lait", "id": "new3"}'.encode("latin-1")),
    Raw("add UTF-16", "POST", MEMS, json.dumps({"text": "x", "id": "new3", "user_id": 1}).encode("utf-16")),
    Raw("chat raw non-UTF-8", "POST", CHAT, chat_bytes(b'"messages": [{"role": "user", "content": "\xc3\x28"}]')),
    Raw("chat raw NUL", "POST", CHAT, chat_bytes(b'"messages": [{"role": "user", "content": "\x00"}]')),
    Raw("search raw non-UTF-8", "POST", MEMS + "/search", b'{"query": "\xff"}'),
    Raw("keys raw NUL", "POST", "/v1/keys", b'{"namespace": "a\x00"}', key="admin"),
    # NUL and non-UTF-8 bytes in header values
    Raw("namespace header NUL (admin)", "GET", MEMS, key="admin", headers=[(b"x-megamem-namespace", b"acme\x00")]),
    Raw(
        "namespace header non-UTF-8 (admin)", "GET", MEMS, key="admin", headers=[(b"x-megamem-namespace", b"\xff\xfe")]
    ),
    Raw("namespace header traversal (admin)", "GET", MEMS, key="admin", headers=[(b"x-megamem-namespace", b"../acme")]),
    Raw("namespace header NUL (acme)", "GET", MEMS, headers=[(b"x-megamem-namespace", b"\x00")]),
    Raw(
        "namespace header on delete (admin)",
        "DELETE",
        MEMS + "/m1",
        key="admin",
        headers=[(b"x-megamem-namespace", b"acme\xff")],
    ),
    Raw(
        "idempotency key NUL, bad body",
        "POST",
        MEMS,
        J({"text": "a\u0000", "id": "new3"}),
        headers=[(b"idempotency-key", b"k\x00")],
    ),
    Raw(
        "idempotency key non-UTF-8, bad body",
        "POST",
        MEMS,
        J({"text": "", "id": "new3"}),
        headers=[(b"idempotency-key", b"\xff\xfe")],
    ),
    Raw("idempotency key too long", "POST", MEMS, J(ADD_OK), headers=[(b"idempotency-key", b"k" * 300)]),
    Raw(
        "content-type non-UTF-8",
        "POST",
        MEMS,
        J({"text": ""}),
        json_type=False,
        headers=[(b"content-type", b"application/json; charset=\xff")],
    ),
    Raw(
        "content-type NUL",
        "POST",
        CHAT,
        J({"model": 1}),
        json_type=False,
        headers=[(b"content-type", b"application/json\x00")],
    ),
    Raw("content-length not a number", "POST", MEMS, J({"text": ""}), headers=[(b"content-length", b"12\x00")]),
    Raw("content-length negative", "POST", MEMS, J({"text": ""}), headers=[(b"content-length", b"-1")]),
    Raw("user-agent NUL", "GET", "/v1/models", headers=[(b"user-agent", b"\x00\xff")]),
    # huge bodies: 413 whether the size is declared or only seen while reading
    Raw("huge body declared", "POST", MEMS, J({"text": "a " * 600_000, "id": "new3"})),
    Raw("huge body chunked", "POST", MEMS, b"", chunks=[b'{"text": "'] + [b"a " * 100_000] * 6 + [b'", "id": "new3"}']),
    Raw("huge chat body", "POST", CHAT, J(CHAT_OK | {"messages": [{"role": "user", "content": "b" * 1_100_000}]})),
    Raw("huge search body", "POST", MEMS + "/search", J({"query": "c" * 1_100_000})),
    Raw("huge invalid body", "POST", MEMS, b"x" * 2_000_000),
    # numbers at the edges
    Raw("chat temperature tiny", "POST", CHAT, J(CHAT_OK | {"temperature": 1e-300})),
    Raw("chat temperature denormal", "POST", CHAT, J(CHAT_OK | {"temperature": 1e-40})),
    Raw("chat top_p tiny", "POST", CHAT, J(CHAT_OK | {"temperature": 1.0, "top_p": 1e-300})),
    Raw("chat temperature NaN", "POST", CHAT, chat_bytes(b'"temperature": NaN', HI)),
    Raw("chat threshold NaN", "POST", CHAT, chat_bytes(b'"memory": {"threshold": NaN}', HI)),
    Raw("chat seed huge", "POST", CHAT, J(CHAT_OK | {"seed": 2**64})),
    Raw("chat max_tokens over context", "POST", CHAT, J(CHAT_OK | {"max_tokens": 4096})),
    Raw("chat only tool messages", "POST", CHAT, J(CHAT_OK | {"messages": [{"role": "tool", "content": "x"}]})),
    Raw("chat assistant first", "POST", CHAT, J(CHAT_OK | {"messages": [{"role": "assistant", "content": "x"}]})),
    Raw("chat unknown role", "POST", CHAT, J(CHAT_OK | {"messages": [{"role": "root", "content": "x"}]})),
    Raw("chat empty messages", "POST", CHAT, J(CHAT_OK | {"messages": []})),
    Raw("chat unknown mode", "POST", CHAT, J(CHAT_OK | {"memory": {"mode": "all"}})),
    Raw("chat bad filter", "POST", CHAT, J(CHAT_OK | {"memory": {"filters": {"a": {"in": 5}}}})),
    Raw("chat unknown model", "POST", CHAT, J(CHAT_OK | {"model": "gpt-4"})),
    Raw("chat n=2", "POST", CHAT, J(CHAT_OK | {"n": 2})),
    Raw("search limit 0", "POST", MEMS + "/search", J({"query": "bridge", "limit": 0})),
    Raw("search empty query", "POST", MEMS + "/search", J({"query": ""})),
    Raw("search bad filter", "POST", MEMS + "/search", J({"query": "bridge", "filters": {"a": {"gt": 1}}})),
    Raw("keys bad namespace", "POST", "/v1/keys", J({"namespace": "../acme"}), key="admin"),
    Raw("keys unknown field", "POST", "/v1/keys", J({"namespace": "acme", "admin": True, "x": 1}), key="admin"),
]

# every case must be answered 4xx (in OpenAI's shape), except these:
ALL_CASES = wrong_type_cases() + KEY_CASES + NON_ADMIN_KEY_CASES + PATH_CASES + BAD_JSON_CASES + NUL_AND_BYTES
# ... which may succeed (valid after a lax conversion, reads and deletes that match nothing, valid edge numbers)
MAY_SUCCEED = COERCIBLE | {
    "chat temperature tiny",
    "chat temperature denormal",
    "chat top_p tiny",
    "chat assistant first",
    "chat stop lone surrogate",
    "chat filters lone surrogate",
    "search filters lone surrogate",
    "query user_id NUL",
    "query user_id non-UTF-8",
    "query cursor traversal",
    "query cursor NUL",
    "user-agent NUL",
    "globex bulk-deletes acme's",  # deletes globex's memories with user_id "" (there are none)
    "bulk delete NUL user",  # deletes acme's memories with user_id "\0" (there are none)
}
# a trailing slash is redirected to the route without it (Starlette's redirect_slashes)
MAY_REDIRECT = {"GET /v1/memories/m1%2F", "DELETE /v1/memories/m1%2F"}
# ... and these, valid requests, which must (temperature and top_p are within the schema's bounds)
MUST_SUCCEED = {"chat temperature tiny", "chat temperature denormal", "chat top_p tiny", "user-agent NUL"}


@pytest.mark.parametrize("req", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_hand_case(hand_server, req: Raw):
    app, client, store, keys, before = hand_server
    status, headers, body = call_raw(app, req, keys)
    what = f"{req.name}: {req.method} {req.path} -> {status} {body[:300]!r}"
    assert status < 500, what
    if req.name in MUST_SUCCEED:
        assert status == 200, what
    elif req.name in MAY_REDIRECT:
        assert status in (307, 404), what
    elif req.name not in MAY_SUCCEED:
        assert 400 <= status < 500, what
    if status >= 400:
        check_error_shape(status, headers, body, what)
    if req.name.startswith("huge"):
        assert status == 413, what
    assert client.get("/healthz").status_code == 200, f"{what}; /healthz fails afterwards"
    assert snapshot(store) == before, f"{what}; the store changed"


def test_hand_cases_changed_nothing(hand_server):
    """After every hand case (and time for the worker to have picked up anything queued by mistake)."""
    app, client, store, keys, before = hand_server
    time.sleep(1.5)
    assert snapshot(store) == before
    for ns, mid in (("acme", "m1"), ("globex", "g1")):
        r = client.get(f"/v1/memories/{mid}", headers={"Authorization": f"Bearer {keys[ns]}"})
        assert r.status_code == 200 and r.json()["id"] == mid


def test_sampling_edge_fails_no_other_request(tmp_path):
    """A chat request at a valid but tiny temperature, decoded in one batch with another client's request (a
    0.3 s batching window makes them meet): both are answered 200; neither is failed by the other."""
    import threading

    import httpx
    from serverlib import LiveServer

    store, keys = make_server_store(tmp_path)
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    got: dict[str, tuple[int, str]] = {}

    def ask(name: str, extra: dict, url: str) -> None:
        body = CHAT_OK | {"max_tokens": 4} | extra
        r = httpx.post(url + CHAT, json=body, headers=headers, timeout=60)
        got[name] = (r.status_code, r.text[:300])

    with LiveServer(store, window_s=0.3) as url:
        threads = [
            threading.Thread(target=ask, args=("plain", {}, url)),
            threading.Thread(target=ask, args=("tiny temperature", {"temperature": 1e-300}, url)),
        ]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert httpx.get(url + "/healthz").status_code == 200
    assert got["plain"][0] == 200, got
    assert got["tiny temperature"][0] == 200, got
