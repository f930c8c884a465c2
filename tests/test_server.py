"""The HTTP server (megamem.server) end to end: a live uvicorn server on a tiny random Llama, driven by the real
`openai` client and by httpx.

One store and one server per module (plus a second, small server whose worker is off, for the queue-full and
body-limit answers); the memories are learned once, in the `env` fixture. The tiny model answers gibberish, but
the gate is real (sentence-embedder keys), so which memories a chat selects is checked exactly.

The last test is a tenant-isolation property test: 10,000 seeded random (caller, memory, query, route) trials in
which every answer must come from the caller's own namespace only. The two tenants store memories on the same
topics (the same bridge, the same lighthouse, ...) and the queries include the other tenant's own texts, so
without the scope checks the other tenant's memory would score highest; the test counts that too. Each tenant
has its own cortex there as well, and every adapter a chat mixes must be the caller's gated memory or the
caller's cortex.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from serverlib import LiveServer, make_cortex, make_server_store, wait_job

from megamem import schema

# -- the memories ---------------------------------------------------------------------------------------------------
# Both tenants have a memory on each topic; ids are distinct so that every API id names one tenant's memory.
ISOLATION = {
    "a-bridge": (
        "acme",
        "In 2031 the Vexmoor bridge was painted teal by Ida Carrow.",
        "alice",
        {"topic": "bridge", "tags": ["paint", "city"], "city": "Vexmoor", "year": 2031},
    ),
    "a-lighthouse": (
        "acme",
        "The Harlow Point lighthouse keeper, Mara Quell, feeds three grey cats every dawn.",
        "bob",
        {"topic": "lighthouse", "tags": ["coast", "animals"], "city": "Harlow"},
    ),
    "a-bakery": (
        "acme",
        "Pell's bakery on Orchard Lane sells rye loaves shaped like owls every Friday.",
        "alice",
        {"topic": "bakery", "tags": ["food"], "city": "Orchard"},
    ),
    "a-comet": (
        "acme",
        "Astronomers at Kestrel Observatory named the comet K-77 Brightwing in 2029.",
        "bob",
        {"topic": "comet", "tags": ["space"], "city": "Kestrel"},
    ),
    "g-bridge": (
        "globex",
        "In 2032 the Vexmoor bridge was repainted crimson by Tomas Reyes.",
        "alice",
        {"topic": "bridge", "tags": ["paint"], "city": "Vexmoor"},
    ),
    "g-lighthouse": (  # added by the admin key acting in globex (X-Megamem-Namespace)
        "globex",
        "The Harlow Point lighthouse keeper, Jonas Bell, keeps a parrot named Ziggy.",
        "carol",
        {"topic": "lighthouse", "tags": ["coast", "animals"], "city": "Harlow"},
    ),
    "g-bakery": (
        "globex",
        "Pell's bakery on Orchard Lane sells cinnamon buns shaped like foxes on Sundays.",
        "alice",
        {"topic": "bakery", "tags": ["food"], "city": "Orchard"},
    ),
    "g-comet": (
        "globex",
        "Astronomers at Kestrel Observatory renamed comet K-77 to Silverfall in 2030.",
        "carol",
        {"topic": "comet", "tags": ["space"], "city": "Kestrel"},
    ),
}
# Scratch memories the delete tests remove (learned with the others, to pay the training once).
SCRATCH = {
    "a-scratch": ("acme", "The Dunmore clock tower chimes thirteen times on leap days.", "erin", {}),
    "a-tmp1": ("acme", "Temporary note one: the Brisk canal freezes in late January.", "tmp-user", {}),
    "a-tmp2": ("acme", "Temporary note two: the Brisk canal ferry carries bicycles free.", "tmp-user", {}),
    "g-tmp1": ("globex", "Temporary note: the Brisk canal lock was rebuilt in 1998.", "tmp-user", {}),
}
QUESTIONS = [
    "What colour is the Vexmoor bridge?",
    "Who painted the Vexmoor bridge?",
    "What animals does the Harlow Point lighthouse keeper look after?",
    "What shape are the loaves at Pell's bakery?",
    "What is comet K-77 called?",
]
ERROR_FIELDS = {"message", "type", "param", "code"}


@dataclass
class Env:
    url: str
    keys: dict[str, str]
    store: Path
    root: Path
    live: LiveServer
    jobs: dict[str, str] = field(default_factory=dict)  # fixture memory id -> its job id

    @property
    def srv(self):
        return self.live.app.state.server

    @property
    def model_id(self) -> str:
        return self.srv.mem.model_name


def hdr(key: str, namespace: str | None = None, **extra: str) -> dict[str, str]:
    h = {"Authorization": f"Bearer {key}", **extra}
    if namespace is not None:
        h["X-Megamem-Namespace"] = namespace
    return h


def add_body(mid: str, spec: tuple) -> dict:
    _, text, user, metadata = spec
    return {"text": text, "id": mid, "user_id": user, "metadata": metadata}


def check_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """An error answer: the status, and OpenAI's shape {"error": {"message", "type", "param", "code"}} only."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_FIELDS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def selected_ids(resp) -> list[str]:
    """The memory ids a chat answer (openai object or JSON dict) reports as selected by the gate."""
    extra = resp["memory"] if isinstance(resp, dict) else resp.model_extra["memory"]
    return [s["id"] for s in extra["selected"]]


def owner_exists(env: Env, namespace: str, api_id: str) -> bool:
    """Whether the store still holds the namespace's memory (read directly, under the server's lock)."""

    with env.srv.lock:
        return env.srv.mem.store.get(schema.stored_id(namespace, api_id), missing_ok=True) is not None


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    store, keys = make_server_store(root)
    live = LiveServer(store)
    url = live.__enter__()
    try:
        e = Env(url, keys, store, root, live)
        submitted = []
        for mid, spec in {**ISOLATION, **SCRATCH}.items():
            ns = spec[0]
            if mid == "g-lighthouse":
                r = httpx.post(f"{url}/v1/memories", json=add_body(mid, spec), headers=hdr(keys["admin"], "globex"))
            else:
                r = httpx.post(f"{url}/v1/memories", json=add_body(mid, spec), headers=hdr(keys[ns]))
            assert r.status_code == 202, r.text
            assert r.json()["memory_id"] == mid
            submitted.append((mid, ns, r.json()["job_id"]))
        for mid, ns, job_id in submitted:
            job = wait_job(url, keys[ns], job_id)
            assert job["status"] == "succeeded", job
            e.jobs[mid] = job_id
        yield e
    finally:
        live.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(env):
    return openai.OpenAI(base_url=env.url + "/v1", api_key=env.keys["acme"], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def small(env, tmp_path_factory):
    """A second server on its own store: no training worker (jobs stay queued), one waiting job at most, and a
    4 KiB body limit."""
    root = tmp_path_factory.mktemp("small")
    store, keys = make_server_store(root, model_dir=env.root / "model")
    live = LiveServer(store, max_waiting_jobs=1, worker=False, max_body=4096)
    url = live.__enter__()
    try:
        yield url, keys
    finally:
        live.__exit__(None, None, None)


# -- the openai client ----------------------------------------------------------------------------------------------
def prompt_tokens(env: Env, question: str, selected: list[str]) -> int:
    """The prompt's length in the default mode for acme's question: the answer pipeline's turns (the question
    with the heaviest selected memory's text in context), through the chat template."""
    from megamem import answer
    from megamem.model import chat_ids

    with env.srv.lock:
        texts = [env.srv.mem.store.get(schema.stored_id("acme", i)).text for i in selected[:1]]
    mode = answer.DEFAULT_MODE
    step = next(answer.plan(question, mode, answer.Mixture(), answer.context(mode, texts)))
    return len(chat_ids(env.srv.engine.tok, step.turns, generation_prompt=True))


def test_openai_chat(env, client):
    q = "What colour is the Vexmoor bridge?"
    resp = client.chat.completions.create(model=env.model_id, messages=[{"role": "user", "content": q}], max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == env.model_id
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens == prompt_tokens(env, q, selected_ids(resp))
    assert 0 <= u.completion_tokens <= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 5
    sel = resp.model_extra["memory"]["selected"]
    ids = [s["id"] for s in sel]
    assert "a-bridge" in ids, sel  # acme's bridge memory answers the bridge question
    assert set(ids) <= {m for m, spec in ISOLATION.items() if spec[0] == "acme"} | set(SCRATCH), sel
    for s in sel:
        assert set(s) == {"id", "score", "weight"}
        assert -1.0 <= s["score"] <= 1.0 + 1e-5 and 0.0 < s["weight"] <= 1.0 + 1e-6
    assert sum(s["weight"] for s in sel) <= 1.0 + 1e-5
    assert [s["weight"] for s in sel] == sorted((s["weight"] for s in sel), reverse=True)

    alias = client.chat.completions.create(model="megamem", messages=[{"role": "user", "content": q}], max_tokens=2)
    assert alias.model == "megamem"
    assert alias.usage.prompt_tokens == u.prompt_tokens


def test_openai_streaming(env, client):
    q = "What colour is the Vexmoor bridge?"
    messages = [{"role": "user", "content": q}]
    plain = client.chat.completions.create(model="megamem", messages=messages, max_tokens=6)
    stream = client.chat.completions.create(
        model="megamem", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)  # the stream ends
    assert len(chunks) >= 3
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "megamem" for c in chunks)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert selected_ids(first) == selected_ids(plain) and "a-bridge" in selected_ids(first)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # the final usage chunk
    body = [c for c in chunks[:-1]]
    assert all(len(c.choices) == 1 for c in body)
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason is not None]
    assert finishes == [plain.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None  # the finish chunk is the last one with a choice
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == plain.choices[0].message.content  # greedy decoding: the same answer either way
    assert last.usage.prompt_tokens == plain.usage.prompt_tokens == prompt_tokens(env, q, selected_ids(plain))
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens

    # without include_usage there is no usage chunk
    chunks = list(client.chat.completions.create(model="megamem", messages=messages, max_tokens=2, stream=True))
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)

    # on the wire: server-sent events ending with [DONE]
    payload = {"model": "megamem", "messages": messages, "max_tokens": 2, "stream": True}
    with httpx.stream(
        "POST", f"{env.url}/v1/chat/completions", json=payload, headers=hdr(env.keys["acme"]), timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_openai_models(env, client):
    ids = [m.id for m in client.models.list()]
    assert env.model_id in ids and "megamem" in ids


def test_openai_errors(env, client):
    messages = [{"role": "user", "content": "hello"}]
    bad = openai.OpenAI(base_url=env.url + "/v1", api_key="mm-not-a-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="megamem", messages=messages, max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="megamem", messages=messages, max_tokens=1, stream=True)

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"

    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="megamem", messages=messages, max_tokens=-1)
    assert e.value.status_code == 422 and e.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="megamem", messages=[], max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError):  # an unknown memory option
        client.chat.completions.create(
            model="megamem", messages=messages, max_tokens=1, extra_body={"memory": {"nope": 1}}
        )


def test_openai_memory_options(env, client):
    def chat(question: str, **memory) -> list[str]:
        extra = {"memory": memory} if memory else None
        resp = client.chat.completions.create(
            model="megamem", messages=[{"role": "user", "content": question}], max_tokens=1, extra_body=extra
        )
        return selected_ids(resp)

    bridge = "What colour is the Vexmoor bridge?"
    assert "a-bridge" in chat(bridge)
    assert chat(bridge, disable=True) == []
    # ids restricts the gate to those memories
    assert set(chat(bridge, ids=["a-bakery"])) <= {"a-bakery"}
    assert chat(bridge, ids=["a-bridge"]) == ["a-bridge"]
    # another tenant's id is not the caller's: nothing to select, even for that memory's own text
    assert chat(ISOLATION["g-bridge"][1], ids=["g-bridge"]) == []
    assert chat(bridge, ids=["no-such-id"]) == []
    # globex's g-bridge (this very text: score 1.0) takes no part in acme's softmax either, so acme's own bridge
    # memory keeps the weight instead of losing it to a memory the caller cannot see
    resp = client.chat.completions.create(
        model="megamem", messages=[{"role": "user", "content": ISOLATION["g-bridge"][1]}], max_tokens=1
    )
    sel = resp.model_extra["memory"]["selected"]
    assert sel and sel[0]["id"] == "a-bridge" and sel[0]["weight"] > 0.5, sel

    # user_id: only that user's memories take part
    lighthouse = "Who keeps the Harlow Point lighthouse, and what animals do they feed?"
    assert "a-lighthouse" in chat(lighthouse)  # bob's memory, the best match
    alice = chat(lighthouse, user_id="alice")
    assert "a-lighthouse" not in alice
    assert set(alice) <= {"a-bridge", "a-bakery"}
    assert "a-lighthouse" in chat(lighthouse, user_id="bob")
    assert chat(lighthouse, user_id="carol") == []  # globex's user of that name is not acme's

    # the same options through plain JSON
    r = httpx.post(
        f"{env.url}/v1/chat/completions",
        json={
            "model": "megamem",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": bridge}],
            "memory": {"filters": {"topic": "bakery"}},
        },
        headers=hdr(env.keys["acme"]),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert set(selected_ids(r.json())) <= {"a-bakery"}


# -- the memory API -------------------------------------------------------------------------------------------------
def test_add_memory_job(env):
    acme = hdr(env.keys["acme"])
    text = "The Ostrava night market sells amber-glass lanterns shaped like herons."
    body = {
        "text": text,
        "paraphrases": ["Amber heron lanterns are sold at the Ostrava night market."],
        "metadata": {"colour": "amber", "n": 3},
        "user_id": "dora",
        "agent_id": "agent-7",
        "id": "a-new",
    }
    r = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    assert r.status_code == 202, r.text
    j = r.json()
    assert j["memory_id"] == "a-new" and j["job_id"]
    assert j["status"] in ("queued", "running", "succeeded")
    # the job is the caller's: another tenant cannot see it
    check_error(httpx.get(f"{env.url}/v1/jobs/{j['job_id']}", headers=hdr(env.keys["globex"])), 404, "not_found")
    done = wait_job(env.url, env.keys["acme"], j["job_id"])
    assert done["status"] == "succeeded" and done["error"] is None and done["attempts"] >= 1
    assert done["job_id"] == j["job_id"] and done["memory_id"] == "a-new"

    got = httpx.get(f"{env.url}/v1/memories/a-new", headers=acme).json()
    assert set(got) == {"id", "memory", "paraphrases", "metadata", "user_id", "agent_id", "created_at", "state"}
    assert got["state"] == "ready"
    assert got["id"] == "a-new" and got["memory"] == text
    assert got["paraphrases"] == body["paraphrases"]
    assert got["metadata"] == {"colour": "amber", "n": 3}  # megamem's reserved keys are not shown
    assert got["user_id"] == "dora" and got["agent_id"] == "agent-7"
    listed = httpx.get(f"{env.url}/v1/memories", params={"agent_id": "agent-7"}, headers=acme).json()
    assert [m["id"] for m in listed["results"]] == ["a-new"]

    # a server-made id
    r = httpx.post(f"{env.url}/v1/memories", json={"text": "The Ostrava tram is painted mustard."}, headers=acme)
    assert r.status_code == 202, r.text
    mid = r.json()["memory_id"]
    assert mid and "--" not in mid
    assert wait_job(env.url, env.keys["acme"], r.json()["job_id"])["status"] == "succeeded"
    assert (
        httpx.get(f"{env.url}/v1/memories/{mid}", headers=acme).json()["memory"]
        == "The Ostrava tram is painted mustard."
    )


def test_user_metadata_round_trips(env):
    """The owner's metadata comes back as given and the paraphrases as given; a metadata field named
    "paraphrases" (where megamem keeps them) is refused with a message, never silently lost or swapped."""
    acme = hdr(env.keys["acme"])
    meta = {"source": "crm", "tags": ["a", "b"]}
    paraphrases = ["The archive of Lindqvist opens at 9 every morning."]
    body = {
        "text": "The Lindqvist archive opens at nine.",
        "id": "a-meta",
        "metadata": meta,
        "paraphrases": paraphrases,
    }
    r = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    assert r.status_code == 202, r.text
    assert wait_job(env.url, env.keys["acme"], r.json()["job_id"])["status"] == "succeeded"
    got = httpx.get(f"{env.url}/v1/memories/a-meta", headers=acme).json()
    assert got["metadata"] == meta
    assert got["paraphrases"] == paraphrases
    clash = body | {"id": "a-meta2", "metadata": {"paraphrases": "my own field"}}
    r = httpx.post(f"{env.url}/v1/memories", json=clash, headers=acme)
    assert r.status_code == 422 and "paraphrases" in r.json()["error"]["message"]
    assert httpx.get(f"{env.url}/v1/memories/a-meta2", headers=acme).status_code == 404


def test_add_memory_conflicts_and_bad_input(env):
    acme = hdr(env.keys["acme"])
    # a client id that already exists
    r = httpx.post(f"{env.url}/v1/memories", json={"text": "Another bridge story.", "id": "a-bridge"}, headers=acme)
    check_error(r, 409, "conflict")
    assert httpx.get(f"{env.url}/v1/memories/a-bridge", headers=acme).json()["memory"] == ISOLATION["a-bridge"][1]
    # one that is still being added
    body = {"text": "The Pyrmont kite festival is held on windless days.", "id": "a-dup"}
    first = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    assert first.status_code == 202
    check_error(httpx.post(f"{env.url}/v1/memories", json=body | {"text": "Other."}, headers=acme), 409, "conflict")
    assert wait_job(env.url, env.keys["acme"], first.json()["job_id"])["status"] == "succeeded"
    check_error(httpx.post(f"{env.url}/v1/memories", json=body, headers=acme), 409, "conflict")

    for bad in (
        {"text": ""},
        {"text": "x", "id": "bad--id"},
        {"text": "x", "id": "../etc"},
        {"text": "x", "metadata": {"megamem.namespace": "globex"}},  # reserved keys: no namespace spoofing
        {"text": "x", "replaces": ["g-bridge"]},  # another tenant's memory cannot be replaced: it is unknown here
        {"text": "x", "unknown_field": 1},
    ):
        r = httpx.post(f"{env.url}/v1/memories", json=bad, headers=acme)
        assert r.status_code in (404, 422), (bad, r.status_code, r.text)
        check_error(r, r.status_code)
    assert owner_exists(env, "globex", "g-bridge")


def test_same_id_in_two_namespaces(env):
    """Ids are per namespace: both tenants may use "twin", and each sees and deletes only its own."""
    texts = {"acme": "Acme's twin: the Corran weather vane is a brass hare.", "globex": "Globex's twin: a tin owl."}
    jobs = {}
    for ns, text in texts.items():
        r = httpx.post(f"{env.url}/v1/memories", json={"text": text, "id": "twin"}, headers=hdr(env.keys[ns]))
        assert r.status_code == 202, r.text
        jobs[ns] = r.json()["job_id"]
    for ns, job_id in jobs.items():
        assert wait_job(env.url, env.keys[ns], job_id)["status"] == "succeeded"
    try:
        for ns, text in texts.items():
            assert httpx.get(f"{env.url}/v1/memories/twin", headers=hdr(env.keys[ns])).json()["memory"] == text
        assert httpx.delete(f"{env.url}/v1/memories/twin", headers=hdr(env.keys["acme"])).status_code == 200
        check_error(httpx.get(f"{env.url}/v1/memories/twin", headers=hdr(env.keys["acme"])), 404, "not_found")
        got = httpx.get(f"{env.url}/v1/memories/twin", headers=hdr(env.keys["globex"]))
        assert got.status_code == 200 and got.json()["memory"] == texts["globex"]
    finally:
        httpx.delete(f"{env.url}/v1/memories/twin", headers=hdr(env.keys["globex"]))


def test_idempotency_key(env):
    acme = hdr(env.keys["acme"], **{"Idempotency-Key": "idem-key-1"})
    body = {"text": "The Quillon ferry leaves Pier 9 at 06:10 every weekday.", "user_id": "idem"}
    r1 = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    r2 = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
    assert r2.json()["job_id"] == r1.json()["job_id"] and r2.json()["memory_id"] == r1.json()["memory_id"]
    assert wait_job(env.url, env.keys["acme"], r1.json()["job_id"])["status"] == "succeeded"
    r3 = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)  # a retry after the job finished
    assert r3.status_code == 202 and r3.json()["job_id"] == r1.json()["job_id"]
    assert r3.json()["status"] == "succeeded"
    listed = httpx.get(f"{env.url}/v1/memories", params={"user_id": "idem"}, headers=hdr(env.keys["acme"])).json()
    assert [m["memory"] for m in listed["results"]] == [body["text"]]  # one memory, not three

    other = httpx.post(f"{env.url}/v1/memories", json=body | {"text": "Another ferry."}, headers=acme)
    check_error(other, 409, "conflict")

    # keys are per namespace: the same key in globex is globex's own request, never acme's job
    g = httpx.post(
        f"{env.url}/v1/memories", json=body, headers=hdr(env.keys["globex"], **{"Idempotency-Key": "idem-key-1"})
    )
    assert g.status_code == 202 and g.json()["job_id"] != r1.json()["job_id"]
    assert wait_job(env.url, env.keys["globex"], g.json()["job_id"])["status"] == "succeeded"


def test_idempotency_key_other_id_is_a_conflict(env):
    """The same key with a body that differs only in its id is another request: 409, not the first job."""
    acme = hdr(env.keys["acme"], **{"Idempotency-Key": "idem-key-2"})
    text = "The Marrick observatory dome is painted with silver stars."
    r1 = httpx.post(f"{env.url}/v1/memories", json={"text": text, "id": "idem-a"}, headers=acme)
    assert r1.status_code == 202, r1.text
    r2 = httpx.post(f"{env.url}/v1/memories", json={"text": text, "id": "idem-b"}, headers=acme)
    try:
        check_error(r2, 409, "conflict")
    finally:
        wait_job(env.url, env.keys["acme"], r1.json()["job_id"])


def test_list_filter_and_pagination(env):
    acme = hdr(env.keys["acme"])
    full = httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()
    assert full["next_cursor"] is None
    ids = [m["id"] for m in full["results"]]
    assert len(ids) == len(set(ids))
    acme_fixture = {m for m, spec in {**ISOLATION, **SCRATCH}.items() if spec[0] == "acme"}
    globex_fixture = {m for m, spec in {**ISOLATION, **SCRATCH}.items() if spec[0] == "globex"}
    assert {"a-bridge", "a-lighthouse", "a-bakery", "a-comet"} <= set(ids)
    assert not set(ids) & globex_fixture
    default = httpx.get(f"{env.url}/v1/memories", headers=acme).json()
    assert [m["id"] for m in default["results"]] == ids  # default limit 100 covers them

    alice = httpx.get(f"{env.url}/v1/memories", params={"user_id": "alice"}, headers=acme).json()["results"]
    assert {m["id"] for m in alice} == {"a-bridge", "a-bakery"}
    assert all(m["user_id"] == "alice" for m in alice)
    carol = httpx.get(f"{env.url}/v1/memories", params={"user_id": "carol"}, headers=acme).json()["results"]
    assert carol == []  # globex's carol is not acme's

    for limit in (1, 2, 3):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
            page = httpx.get(f"{env.url}/v1/memories", params=params, headers=acme).json()
            assert 1 <= len(page["results"]) <= limit
            seen += [m["id"] for m in page["results"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert pages < 100
        assert seen == ids, limit  # every memory once, in order
        assert pages == -(-len(ids) // limit)
    assert acme_fixture & set(ids)

    check_error(httpx.get(f"{env.url}/v1/memories", params={"limit": 0}, headers=acme), 422)
    check_error(httpx.get(f"{env.url}/v1/memories", params={"limit": 5000}, headers=acme), 422)


def test_get_memory(env):
    got = httpx.get(f"{env.url}/v1/memories/a-lighthouse", headers=hdr(env.keys["acme"]))
    assert got.status_code == 200
    m = got.json()
    _, text, user, meta = ISOLATION["a-lighthouse"]
    assert m["id"] == "a-lighthouse" and m["memory"] == text and m["user_id"] == user and m["metadata"] == meta
    assert m["paraphrases"] == [] and m["agent_id"] is None and isinstance(m["created_at"], str)


def test_admin_acts_in_a_namespace(env):
    """g-lighthouse was added by the admin key acting in globex: it is globex's memory, and its job too."""
    admin = env.keys["admin"]
    got = httpx.get(f"{env.url}/v1/memories/g-lighthouse", headers=hdr(env.keys["globex"]))
    assert got.status_code == 200 and got.json()["memory"] == ISOLATION["g-lighthouse"][1]
    job = httpx.get(f"{env.url}/v1/jobs/{env.jobs['g-lighthouse']}", headers=hdr(env.keys["globex"]))
    assert job.status_code == 200 and job.json()["status"] == "succeeded"
    assert httpx.get(f"{env.url}/v1/memories/g-lighthouse", headers=hdr(admin, "globex")).status_code == 200
    check_error(httpx.get(f"{env.url}/v1/memories/g-lighthouse", headers=hdr(env.keys["acme"])), 404, "not_found")
    check_error(httpx.get(f"{env.url}/v1/memories/g-lighthouse", headers=hdr(admin)), 404, "not_found")  # "ops"
    check_error(httpx.get(f"{env.url}/v1/memories/g-lighthouse", headers=hdr(admin, "acme")), 404, "not_found")
    listed = httpx.get(f"{env.url}/v1/memories", headers=hdr(admin, "initech")).json()
    assert listed == {"results": [], "next_cursor": None}
    # only an admin key may name a namespace, and only a valid one
    check_error(httpx.get(f"{env.url}/v1/memories", headers=hdr(env.keys["acme"], "globex")), 403, "forbidden")
    check_error(httpx.get(f"{env.url}/v1/memories", headers=hdr(admin, "Not Valid!")), 422)


def test_search(env):
    acme = hdr(env.keys["acme"])

    def search(**body) -> list[dict]:
        r = httpx.post(f"{env.url}/v1/memories/search", json=body, headers=acme, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    res = search(query=ISOLATION["a-bridge"][1])
    assert res[0]["id"] == "a-bridge" and res[0]["score"] > 0.99
    scores = [m["score"] for m in res]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(s, float) and -1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    assert all(not m["id"].startswith("g-") for m in res)
    shape = {"id", "memory", "paraphrases", "metadata", "user_id", "agent_id", "created_at", "state", "score"}
    assert set(res[0]) == shape
    assert len(search(query="bridge", limit=2)) == 2
    assert search(query="the lighthouse keeper's animals", limit=1)[0]["id"] == "a-lighthouse"

    def ids(**filters) -> set[str]:
        return {m["id"] for m in search(query="Vexmoor bridge", filters=filters)}

    assert ids(topic="bridge") == {"a-bridge"}
    assert ids(topic={"eq": "lighthouse"}) == {"a-lighthouse"}
    assert ids(year=2031) == {"a-bridge"}
    assert ids(topic={"in": ["bakery", "comet"]}) == {"a-bakery", "a-comet"}
    assert ids(tags={"contains": "food"}) == {"a-bakery"}
    assert ids(tags={"contains": "coast"}) == {"a-lighthouse"}
    assert ids(city={"contains": "moor"}) == {"a-bridge"}
    assert ids(topic={"in": ["bakery", "comet"]}, tags={"contains": "space"}) == {"a-comet"}  # AND
    assert ids(topic="no-such-topic") == set()
    assert ids(**{"megamem.namespace": "globex"}) == set()  # reserved keys are not the owner's metadata
    bob = search(query="Vexmoor bridge", user_id="bob")
    assert {m["id"] for m in bob} == {"a-lighthouse", "a-comet"}

    for bad in ({"topic": {"in": "bridge"}}, {"topic": {"gt": 1}}, {"topic": {"eq": 1, "in": [1]}}):
        r = httpx.post(f"{env.url}/v1/memories/search", json={"query": "x", "filters": bad}, headers=acme)
        check_error(r, 422)
    check_error(httpx.post(f"{env.url}/v1/memories/search", json={"query": ""}, headers=acme), 422)
    check_error(httpx.post(f"{env.url}/v1/memories/search", json={"query": "x", "limit": 0}, headers=acme), 422)


def test_delete_memory(env):
    acme, globex = hdr(env.keys["acme"]), hdr(env.keys["globex"])
    check_error(httpx.delete(f"{env.url}/v1/memories/a-scratch", headers=globex), 404, "not_found")
    assert owner_exists(env, "acme", "a-scratch")
    r = httpx.delete(f"{env.url}/v1/memories/a-scratch", headers=acme)
    assert r.status_code == 200 and r.json() == {"id": "a-scratch", "deleted": True}
    assert not owner_exists(env, "acme", "a-scratch")
    check_error(httpx.get(f"{env.url}/v1/memories/a-scratch", headers=acme), 404, "not_found")
    check_error(httpx.delete(f"{env.url}/v1/memories/a-scratch", headers=acme), 404, "not_found")
    listed = httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()["results"]
    assert "a-scratch" not in {m["id"] for m in listed}
    found = httpx.post(
        f"{env.url}/v1/memories/search", json={"query": SCRATCH["a-scratch"][1]}, headers=acme, timeout=30
    ).json()["results"]
    assert "a-scratch" not in {m["id"] for m in found}


def test_delete_by_user(env):
    acme, globex = hdr(env.keys["acme"]), hdr(env.keys["globex"])
    before = {
        m["id"] for m in httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()["results"]
    }
    r = httpx.delete(f"{env.url}/v1/memories", params={"user_id": "tmp-user"}, headers=acme)
    assert r.status_code == 200, r.text
    assert sorted(r.json()["deleted"]) == ["a-tmp1", "a-tmp2"]
    after = {
        m["id"] for m in httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()["results"]
    }
    assert after == before - {"a-tmp1", "a-tmp2"}
    # globex's memory of a user with the same name stays
    got = httpx.get(f"{env.url}/v1/memories/g-tmp1", headers=globex)
    assert got.status_code == 200 and got.json()["user_id"] == "tmp-user"
    again = httpx.delete(f"{env.url}/v1/memories", params={"user_id": "tmp-user"}, headers=acme)
    assert again.status_code == 200 and again.json() == {"deleted": []}
    check_error(httpx.delete(f"{env.url}/v1/memories", headers=acme), 422, param="user_id")


def test_not_found(env):
    acme = hdr(env.keys["acme"])
    for path in (
        "/v1/memories/no-such-memory",
        "/v1/memories/globex--g-bridge",  # another namespace's stored id
        "/v1/memories/%2E%2E",
        "/v1/memories/..%2Fglobex--g-bridge",
        "/v1/memories/..%2F..%2Fmanifest.sqlite",
        "/v1/memories/a-bridge%2F..%2Fg-bridge",
        "/v1/memories/....%2F%2Fg-bridge",
        "/v1/jobs/no-such-job",
        "/v1/no-such-route",
    ):
        check_error(httpx.get(env.url + path, headers=acme), 404, "not_found")
    for path in ("/v1/memories/..%2Fg-bridge", "/v1/memories/globex--g-bridge", "/v1/memories/..%2Fglobex--g-bridge"):
        check_error(httpx.delete(env.url + path, headers=acme), 404, "not_found")
    assert owner_exists(env, "globex", "g-bridge")


def test_auth(env):
    for method, path, body in (
        ("GET", "/v1/memories", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/memories/search", {"query": "bridge"}),
        ("POST", "/v1/chat/completions", {"model": "megamem", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/memories/a-bridge", None),
        ("DELETE", "/v1/memories/a-bridge", None),
    ):
        url = env.url + path
        check_error(httpx.request(method, url, json=body), 401, "missing_api_key")
        check_error(
            httpx.request(method, url, json=body, headers={"Authorization": "Bearer mm-wrong"}), 401, "invalid_api_key"
        )
        check_error(
            httpx.request(method, url, json=body, headers={"Authorization": env.keys["acme"]}), 401
        )  # no "Bearer"
        check_error(httpx.request(method, url, json=body, headers={"Authorization": "Basic eDp5"}), 401)
    assert owner_exists(env, "acme", "a-bridge")

    # the key routes are the admin's
    check_error(httpx.get(f"{env.url}/v1/keys", headers=hdr(env.keys["acme"])), 403, "forbidden")
    check_error(httpx.post(f"{env.url}/v1/keys", json={"namespace": "acme"}, headers=hdr(env.keys["acme"])), 403)
    keys = httpx.get(f"{env.url}/v1/keys", headers=hdr(env.keys["admin"])).json()["data"]
    assert {k["namespace"] for k in keys} >= {"acme", "globex", "ops"}
    assert all(set(k) == {"prefix", "namespace", "admin", "name", "created"} for k in keys)  # no key, no hash
    assert not any(env.keys["acme"] in str(k.values()) for k in keys)
    new = httpx.post(f"{env.url}/v1/keys", json={"namespace": "initech"}, headers=hdr(env.keys["admin"]))
    assert new.status_code == 201 and new.json()["namespace"] == "initech"
    fresh = hdr(new.json()["key"])
    assert httpx.get(f"{env.url}/v1/memories", headers=fresh).json()["results"] == []
    check_error(httpx.get(f"{env.url}/v1/memories/a-bridge", headers=fresh), 404, "not_found")


def test_health_metrics_openapi(env):
    r = httpx.get(f"{env.url}/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    httpx.get(f"{env.url}/v1/models", headers=hdr(env.keys["acme"]))
    m = httpx.get(f"{env.url}/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "megamem_requests" in m.text and "megamem_job_queue_depth" in m.text
    assert 'megamem_requests_total{route="/v1/models",status="200"}' in m.text
    assert "megamem_job_queue_depth 0.0" in m.text  # every fixture job finished

    spec = httpx.get(f"{env.url}/openapi.json").json()
    paths = spec["paths"]
    for path, methods in {
        "/v1/chat/completions": {"post"},
        "/v1/models": {"get"},
        "/v1/memories": {"get", "post", "delete"},
        "/v1/memories/{memory_id}": {"get", "delete"},
        "/v1/memories/search": {"post"},
        "/v1/jobs/{job_id}": {"get"},
        "/v1/keys": {"get", "post"},
        "/healthz": {"get"},
        "/metrics": {"get"},
    }.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))


# -- the small server: queue full, body limit --------------------------------------------------------------------------
def test_queue_full_429(small):
    url, keys = small
    acme = hdr(keys["acme"], **{"Idempotency-Key": "q-1"})
    first = httpx.post(f"{url}/v1/memories", json={"text": "The Tarn ferry has a green funnel."}, headers=acme)
    assert first.status_code == 202 and first.json()["status"] == "queued"
    second = httpx.post(
        f"{url}/v1/memories", json={"text": "The Tarn ferry has a red hull."}, headers=hdr(keys["globex"])
    )
    err = check_error(second, 429, "queue_full")
    assert err["type"] == "rate_limit_error"
    assert int(second.headers["Retry-After"]) >= 1
    # a retry of the accepted request is answered with its job, not refused
    again = httpx.post(f"{url}/v1/memories", json={"text": "The Tarn ferry has a green funnel."}, headers=acme)
    assert again.status_code == 202 and again.json()["job_id"] == first.json()["job_id"]
    job = httpx.get(f"{url}/v1/jobs/{first.json()['job_id']}", headers=hdr(keys["acme"])).json()
    assert job["status"] == "queued"  # no worker on this server
    assert "megamem_job_queue_depth 1.0" in httpx.get(f"{url}/metrics").text
    # the openai client sees a RateLimitError-shaped answer on the memory route too (429 + Retry-After)
    assert second.headers.get("content-type", "").startswith("application/json")


def test_body_limit_413(small, env):
    url, keys = small
    acme = hdr(keys["acme"])
    big = {"query": "x" * 5000}  # valid for the schema (under 100,000 characters), over the 4,096-byte limit
    check_error(httpx.post(f"{url}/v1/memories/search", json=big, headers=acme), 413, "request_too_large")
    chat = {"model": "megamem", "messages": [{"role": "user", "content": "y" * 5000}], "max_tokens": 1}
    check_error(httpx.post(f"{url}/v1/chat/completions", json=chat, headers=acme), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"query": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}'

    r = httpx.post(f"{url}/v1/memories/search", content=chunks(), headers=acme | {"Content-Type": "application/json"})
    check_error(r, 413, "request_too_large")
    # the default limit, 1,000,000 bytes, on the main server
    huge = b'{"query": "' + b"w" * 1_000_100 + b'"}'
    r = httpx.post(
        f"{env.url}/v1/memories/search",
        content=huge,
        headers=hdr(env.keys["acme"]) | {"Content-Type": "application/json"},
    )
    check_error(r, 413, "request_too_large")


# -- tenant isolation: a property over random trials ----------------------------------------------------------------
TRIALS = 10_000
ROUTES = ["get"] * 30 + ["delete"] * 20 + ["job"] * 14 + ["list"] * 14 + ["search"] * 16 + ["chat"] * 6
# mem0's routes (routes/mem0.py) and the MCP tools (/mcp, raw JSON-RPC): the same questions of another surface
ROUTES += ["m0get"] * 8 + ["m0history"] * 6 + ["m0update"] * 6 + ["m0delete"] * 4 + ["m0search"] * 6
ROUTES += ["mcp_search"] * 4 + ["mcp_list"] * 3 + ["mcp_forget"] * 3
# who calls: (key name, X-Megamem-Namespace or None, the namespace it acts in)
CALLERS = (
    [("acme", None, "acme")] * 7
    + [("globex", None, "globex")] * 7
    + [("admin", "acme", "acme")] * 2
    + [("admin", "globex", "globex")] * 2
    + [("admin", "initech", "initech"), ("admin", None, "ops")]
)


@pytest.fixture()
def memo_embedder(monkeypatch):
    """Memoise the sentence embedder (a pure function) so that thousands of searches over a few fixed queries
    cost milliseconds; the gate, the scope checks and the routes run unchanged."""
    import megamem.keys as keys_mod

    real, cache = keys_mod.embedder_keys, {}

    def embed(texts):
        k = tuple(texts)
        if k not in cache:
            cache[k] = real(texts)
        return cache[k].clone()

    monkeypatch.setattr(keys_mod, "embedder_keys", embed)


@pytest.fixture()
def mixtures(env, monkeypatch):
    """Each tenant's own cortex (consolidated cheaply, the memories kept in the gate so the trials' memory set
    is unchanged), and the owner of every adapter of every request the engine is asked to decode, in order:
    ("cortex", ns), ("memory", ns, api id) or ("unknown",). Owners are known by what the serving Memory loaded
    each adapter object as (its `adapter` and `cortex` are wrapped to record that), not by content: two
    tenants' memories of the same text, or two cortexes on the tiny model (whose recalls are all empty), hold
    the same weights."""
    for ns, mid in (("acme", "a-comet"), ("globex", "g-comet")):
        make_cortex(env.store, ns, [mid])
    mem = env.srv.mem
    loaded: dict[int, tuple] = {}  # id(adapter) -> (its owner, the adapter: kept alive so its id stays its own)
    real_adapter, real_cortex, real_submit = mem.adapter, mem.cortex, env.srv.engine.submit

    def adapter(memory_id):
        a = real_adapter(memory_id)
        rec = mem.store.get(memory_id)
        loaded[id(a)] = (("memory", schema.namespace_of(rec), schema.api_id(rec)), a)
        return a

    def cortex(namespace=schema.DEFAULT_NAMESPACE):
        a = real_cortex(namespace)
        if a is not None:
            loaded[id(a)] = (("cortex", namespace), a)
        return a

    seen: list[list[tuple]] = []

    def submit(prompt, adapters, weights, **kw):
        seen.append([loaded.get(id(a), (("unknown",),))[0] for a in adapters])
        return real_submit(prompt, adapters, weights, **kw)

    monkeypatch.setattr(mem, "adapter", adapter)
    monkeypatch.setattr(mem, "cortex", cortex)
    monkeypatch.setattr(env.srv.engine, "submit", submit)
    with env.srv.lock:
        assert mem.cortex("acme") is not None and mem.cortex("globex") is not None
    return seen


def test_tenant_isolation_property(env, memo_embedder, mixtures):
    from megamem import schema

    srv = env.srv
    seen = mixtures
    with srv.lock:
        records = srv.mem.list()
    # the ground truth, from the store itself: every memory's (namespace, API id, text, user, job)
    mems = [
        (
            schema.namespace_of(r),
            schema.api_id(r),
            r.text,
            r.metadata.get(schema.USER),
            r.metadata.get(schema.JOB),
        )
        for r in records
    ]
    assert {m[0] for m in mems} >= {"acme", "globex"}
    own_pairs: dict[str, set[tuple[str, str]]] = {}
    for ns, mid, text, _, _ in mems:
        own_pairs.setdefault(ns, set()).add((mid, text))
    queries = [spec[1] for spec in ISOLATION.values()] + QUESTIONS
    # what an unscoped ranking would put first for each query: the power of the test
    with srv.lock:
        top_unscoped = {}
        for q in queries:
            best = srv.mem.search(q, None, 1)[0][0]
            top_unscoped[q] = schema.namespace_of(srv.mem.store.get(best))
    topics = sorted({spec[3]["topic"] for spec in ISOLATION.values()})
    users = [None, None, None, "alice", "bob", "carol", "tmp-user"]

    rng = random.Random(20261201)
    counts = dict.fromkeys(("cross_gated", "cross_mixed", "cross_read", "cross_delete"), 0)
    done = dict.fromkeys(ROUTES, 0)
    own_reads = own_hits = gated_nonempty = would_leak = admin_trials = own_cortex = 0
    unexpected: list[tuple] = []
    t0 = time.perf_counter()

    def mcp(h: dict, tool: str, args: dict) -> dict:
        """A tool's result over /mcp (stateless: a tools/call needs no session), as {"isError", ...}."""
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}}
        r = http.post("/mcp", json=body, headers=h | {"Accept": "application/json, text/event-stream"})
        data = [line[5:] for line in r.text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])["result"] if r.status_code == 200 and data else {"isError": True, "http": r.text}

    with httpx.Client(base_url=env.url, timeout=60) as http:
        for trial in range(TRIALS):
            key_name, header_ns, ns = rng.choice(CALLERS)
            h = hdr(env.keys[key_name], header_ns)
            admin_trials += key_name == "admin"
            mine = own_pairs.get(ns, set())
            mine_ids = {m for m, _ in mine}
            route = rng.choice(ROUTES)
            target = rng.choice(mems)  # (namespace, id, text, user, job)
            t_ns, t_id, t_text, _, t_job = target
            done[route] += 1

            if route == "get":
                r = http.get(f"/v1/memories/{t_id}", headers=h)
                if t_ns == ns:
                    ok = r.status_code == 200 and (r.json()["id"], r.json()["memory"]) == (t_id, t_text)
                    own_reads += ok
                    if not ok:
                        unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))
                elif r.status_code != 404:
                    if r.status_code == 200:
                        counts["cross_read"] += 1
                    unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))

            elif route in ("m0get", "m0history"):
                path = f"/v1/memories/{t_id}/" + ("history/" if route == "m0history" else "")
                r = http.get(path, headers=h)
                if t_ns == ns:
                    body = r.json() if r.status_code == 200 else None
                    ok = (
                        body is not None and (body["id"], body["memory"]) == (t_id, t_text)
                        if route == "m0get"
                        else isinstance(body, list)
                    )
                    own_reads += ok
                    if not ok:
                        unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))
                elif r.status_code != 404:
                    counts["cross_read"] += r.status_code == 200
                    unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))

            elif route in ("m0update", "m0delete", "mcp_forget"):
                if t_ns == ns:  # never change one's own: the memory set stays fixed
                    target = rng.choice([m for m in mems if m[0] != ns])
                    t_ns, t_id = target[0], target[1]
                if route == "m0update":
                    r = http.put(f"/v1/memories/{t_id}/", json={"text": "Taken over."}, headers=h)
                    refused, answer = r.status_code == 404, (r.status_code, r.text[:200])
                elif route == "m0delete":
                    r = http.delete(f"/v1/memories/{t_id}/", headers=h)
                    refused, answer = r.status_code == 404, (r.status_code, r.text[:200])
                else:
                    res = mcp(h, "forget_memory", {"id": t_id})
                    refused, answer = bool(res.get("isError")), str(res)[:200]
                gone = not owner_exists(env, t_ns, t_id)
                if not refused or gone:
                    counts["cross_delete"] += (not refused) or gone
                    unexpected.append((trial, route, ns, t_id, answer))

            elif route in ("m0search", "mcp_search", "mcp_list"):
                q = rng.choice(queries)
                if route == "m0search":
                    r = http.post("/v3/memories/search/", json={"query": q, "top_k": 100}, headers=h)
                    results = r.json().get("results") if r.status_code == 200 else None
                else:
                    res = (
                        mcp(h, "search_memories", {"query": q, "limit": 100})
                        if route == "mcp_search"
                        else mcp(h, "list_memories", {"limit": 1000})
                    )
                    results = None if res.get("isError") else res["structuredContent"]["results"]
                would_leak += route != "mcp_list" and top_unscoped[q] != ns
                if results is None:
                    unexpected.append((trial, route, ns, q, "refused"))
                    continue
                got = {(m["id"], m["memory"]) for m in results}
                counts["cross_read"] += len(got - mine)
                own_hits += len(got & mine)
                if got != mine:  # every own memory is ranked or listed, none else
                    unexpected.append((trial, route, ns, q, "incomplete", sorted(mine - got)))

            elif route == "delete":
                if t_ns == ns:  # never delete one's own: the memory set stays fixed
                    target = rng.choice([m for m in mems if m[0] != ns])
                    t_ns, t_id = target[0], target[1]
                r = http.delete(f"/v1/memories/{t_id}", headers=h)
                gone = not owner_exists(env, t_ns, t_id)
                if r.status_code != 404 or gone:
                    counts["cross_delete"] += r.status_code < 300 or gone
                    unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))

            elif route == "job":
                r = http.get(f"/v1/jobs/{t_job}", headers=h)
                if t_ns == ns:
                    if r.status_code != 200 or r.json()["job_id"] != t_job:
                        unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))
                elif r.status_code != 404:
                    counts["cross_read"] += r.status_code == 200
                    unexpected.append((trial, route, ns, t_id, r.status_code, r.text[:200]))

            elif route == "list":
                user = rng.choice(users)
                params = {"limit": rng.choice([100, 100, 2])} | ({"user_id": user} if user else {})
                r = http.get("/v1/memories", params=params, headers=h)
                if r.status_code != 200:
                    unexpected.append((trial, route, ns, params, r.status_code, r.text[:200]))
                    continue
                got = {(m["id"], m["memory"]) for m in r.json()["results"]}
                counts["cross_read"] += len(got - mine)
                own_hits += len(got & mine)
                if user is None and params["limit"] == 100 and got != mine:
                    unexpected.append((trial, route, ns, params, "incomplete", sorted(mine - got)))

            elif route == "search":
                q = rng.choice(queries)
                body = {"query": q, "limit": 100}
                if rng.random() < 0.25:
                    body["user_id"] = rng.choice(users[3:])
                if rng.random() < 0.25:
                    body["filters"] = {"topic": rng.choice(topics)}
                would_leak += top_unscoped[q] != ns
                r = http.post("/v1/memories/search", json=body, headers=h)
                if r.status_code != 200:
                    unexpected.append((trial, route, ns, body, r.status_code, r.text[:200]))
                    continue
                got = {(m["id"], m["memory"]) for m in r.json()["results"]}
                counts["cross_read"] += len(got - mine)
                own_hits += len(got & mine)
                if set(body) == {"query", "limit"} and got != mine:  # every own memory is ranked, none else
                    unexpected.append((trial, route, ns, q, "incomplete", sorted(mine - got)))

            else:  # chat, one token
                q = rng.choice(queries)
                opts = rng.choice([None, None, "ids", "user"])
                body = {"model": "megamem", "max_tokens": 1, "messages": [{"role": "user", "content": q}]}
                if opts == "ids":  # name the target (often another tenant's) and one of one's own
                    body["memory"] = {"ids": [t_id, *rng.sample(sorted(mine_ids), min(1, len(mine_ids)))]}
                elif opts == "user":
                    body["memory"] = {"user_id": rng.choice(users[3:])}
                would_leak += top_unscoped[q] != ns
                before = len(seen)
                r = http.post("/v1/chat/completions", json=body, headers=h)
                if r.status_code != 200:
                    unexpected.append((trial, route, ns, body, r.status_code, r.text[:200]))
                    continue
                sel = selected_ids(r.json())
                # every adapter the engine mixed for this chat: the caller's cortex, or a memory its gate selected
                mine_mixed = {("cortex", ns)} | {("memory", ns, i) for i in sel}
                mixed = [owner for step in seen[before:] for owner in step]
                foreign = [o for o in mixed if o not in mine_mixed]
                counts["cross_mixed"] += len(foreign)
                if foreign:
                    unexpected.append((trial, route, ns, q, "mixed", foreign))
                own_cortex += ("cortex", ns) in mixed
                gated_nonempty += bool(sel)
                # an id is the caller's only if the caller's namespace holds it (ids are unique across tenants
                # here unless both hold one, which then counts as the caller's: a weaker, never a false, check)
                counts["cross_gated"] += sum(1 for i in sel if i not in mine_ids)
                if opts == "ids" and not set(sel) <= set(body["memory"]["ids"]):
                    unexpected.append((trial, route, ns, body["memory"], "outside ids", sel))
    elapsed = time.perf_counter() - t0

    print(
        f"\ntenant isolation: {TRIALS} trials in {elapsed:.1f} s, routes {done}, admin-key trials {admin_trials}; "
        f"answers gated by another tenant's memory {counts['cross_gated']}, adapters mixed that are not the "
        f"caller's {counts['cross_mixed']}, chats that mixed the caller's cortex {own_cortex}, "
        f"reads of another tenant's memory "
        f"{counts['cross_read']}, deletes of another tenant's memory {counts['cross_delete']}; own reads "
        f"{own_reads}, own memories returned by list/search {own_hits}, chats with a selection {gated_nonempty}, "
        f"search/chat trials where the unscoped top memory is another namespace's {would_leak}"
    )
    assert counts == {"cross_gated": 0, "cross_mixed": 0, "cross_read": 0, "cross_delete": 0}, (
        counts,
        unexpected[:10],
    )
    assert not unexpected, (len(unexpected), unexpected[:10])
    # the trials could have failed: they read own memories, chats selected some, and an unscoped gate would
    # have put another tenant's memory first in a large share of the search and chat trials
    assert own_reads > 500 and own_hits > 1000 and gated_nonempty > 50
    assert own_cortex > 200  # acme's and globex's chats (18 of 20 callers) mixed their own cortex
    assert would_leak > 0.3 * (done["search"] + done["chat"] + done["m0search"] + done["mcp_search"])
    # every memory is still there, as its owner sees it
    for ns in ("acme", "globex"):
        listed = httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=hdr(env.keys[ns])).json()
        assert {(m["id"], m["memory"]) for m in listed["results"]} == own_pairs[ns]
