"""mem0 compatibility and memory states, against a live server on loopback (tests/serverlib.py, the tiny model).

- The real `mem0ai` MemoryClient (2.2.1, pinned in the dev extra) through every call it makes of a memory:
  the constructor's ping with `Token` auth, add (a text, messages, user / agent / run ids at the top level and
  in filters, metadata), search (filters with AND / OR / operators, top_k), paged get_all, get, update (a new
  version learned under the same id), delete, delete_all with filters, history.
- Bad input to every new route: one clear error in OpenAI's shape, and nothing stored changed.
- Tenant isolation: another key can neither see, search, list, update, delete nor read the history of a memory.
- A memory answers the moment it is added: while its job is held (the `hold` fixture stops the training worker
  before each job), it is listed, searched and used as a chat's context, with its state "learning"; its adapter
  joins the mixture when the job finishes ("ready"). Deleting or updating it meanwhile cancels or supersedes its
  job; a failed job leaves a "failed" memory until it is deleted.
- A restart mid-training: the server (its own process) is killed with SIGKILL while a job trains; after the
  restart the memory is shown once ("learning"), the job is run again, and the memory is stored once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# mem0 reads these when it is imported: no telemetry, and its config file in a scratch folder, not ~/.mem0
os.environ["MEM0_TELEMETRY"] = "False"
os.environ.setdefault("MEM0_DIR", tempfile.mkdtemp(prefix="mem0-"))

import httpx  # noqa: E402
import pytest  # noqa: E402
from mem0 import MemoryClient  # noqa: E402
from mem0.exceptions import MemoryNotFoundError  # noqa: E402
from serverlib import LiveServer, free_port, make_server_store, wait_job  # noqa: E402

from megamem import schema  # noqa: E402
from megamem.errors import MegamemError  # noqa: E402

ERROR_FIELDS = {"message", "type", "param", "code"}
BRIDGE = "In 2031 the Quillon bridge was painted teal by Ida Carrow."
BRIDGE_2 = "In 2032 the Quillon bridge was repainted crimson by Tomas Reyes."
CAT = "My cat Ziggy sleeps on the Harlow Point lighthouse stairs."
BAKERY = "Pell's bakery on Orchard Lane sells rye loaves shaped like owls every Friday."
HERON = "The Ostrava night market sells amber-glass lanterns shaped like herons."


@dataclass
class Env:
    url: str
    keys: dict[str, str]
    store: Path
    live: LiveServer

    @property
    def srv(self):
        return self.live.app.state.server


class Hold:
    """Holds the training worker before each job it takes (held()), or fails the next jobs (failing()): memories
    stay "learning", or fail, for as long as a test needs."""

    def __init__(self, srv) -> None:
        self.go = threading.Event()
        self.go.set()
        self.fail = False
        real = srv.worker.train

        def train(job, progress):
            self.go.wait(120)
            if self.fail:
                raise MegamemError("the test failed this job on purpose")
            return real(job, progress)

        srv.worker.train = train  # the worker calls self.train for each job it claims

    @contextmanager
    def held(self):
        self.go.clear()
        try:
            yield
        finally:
            self.go.set()

    @contextmanager
    def failing(self):
        self.fail = True
        try:
            yield
        finally:
            self.fail = False


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    store, keys = make_server_store(tmp_path_factory.mktemp("mem0"))
    live = LiveServer(store)
    url = live.__enter__()
    try:
        yield Env(url, keys, store, live)
    finally:
        live.__exit__(None, None, None)


@pytest.fixture(scope="module")
def hold(env):
    return Hold(env.srv)


def client(env: Env, ns: str = "acme") -> MemoryClient:
    return MemoryClient(api_key=env.keys[ns], host=env.url)


def token(key: str) -> dict[str, str]:
    return {"Authorization": f"Token {key}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def check_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """An error answer: the status, and OpenAI's shape {"error": {"message", "type", "param", "code"}} only."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def snapshot(store: Path) -> dict:
    """What bad input must not change: the memory rows, the jobs and their states, the history."""
    db = sqlite3.connect(f"file:{store / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        return {
            "memories": db.execute("SELECT id, text, adapter_sha256, metadata FROM memories ORDER BY id").fetchall(),
            "jobs": db.execute("SELECT id, state, memory_id FROM jobs ORDER BY id").fetchall(),
            "events": db.execute("SELECT id FROM memory_events ORDER BY id").fetchall(),
        }
    finally:
        db.close()


def stored_rows(store: Path, namespace: str, api_id: str) -> list[tuple[str, str]]:
    """The manifest's rows of a memory (id, text), read directly."""
    db = sqlite3.connect(f"file:{store / 'manifest.sqlite'}?mode=ro", uri=True)
    try:
        sid = schema.stored_id(namespace, api_id)
        return db.execute("SELECT id, text FROM memories WHERE id = ?", (sid,)).fetchall()
    finally:
        db.close()


def job_status(env: Env, job_id: str, ns: str = "acme") -> str:
    return httpx.get(f"{env.url}/v1/jobs/{job_id}", headers=bearer(env.keys[ns]), timeout=10).json()["status"]


def wait(env: Env, job_id: str, ns: str = "acme", timeout: float = 120) -> dict:
    """Poll a job until it ends: succeeded, failed or cancelled (serverlib.wait_job knows the first two)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{env.url}/v1/jobs/{job_id}", headers=bearer(env.keys[ns]), timeout=10).json()
        if job.get("status") in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not end in {timeout} s")


def ids_of(results: list[dict]) -> list[str]:
    return [m["id"] for m in results]


# -- the client, call by call ----------------------------------------------------------------------------------------
def test_memory_client_every_call(env, hold):
    c = client(env)  # the constructor pings /v1/ping/ with `Token KEY`
    assert c.org_id == "megamem" and c.project_id == "acme"

    # add: a text, with user and metadata; messages, with the ids in filters and at the top level
    a = c.add(BRIDGE, user_id="alice", metadata={"topic": "bridge", "year": 2031})
    assert a["status"] == "PENDING" and len(a["results"]) == 1
    ra = a["results"][0]
    assert ra["memory"] == BRIDGE and ra["event"] == "ADD" and ra["state"] in ("learning", "ready")
    assert a["event_id"] == ra["job_id"]
    messages = [{"role": "user", "content": CAT}, {"role": "assistant", "content": "Noted: Ziggy."}]
    b = c.add(messages, filters={"user_id": "bob", "run_id": "run-1"}, agent_id="helper", metadata={"topic": "pets"})
    rb = b["results"][0]
    cc = c.add(BAKERY, user_id="alice", metadata={"topic": "bakery", "tags": ["Food", "Owls"]}, infer=False)
    rc = cc["results"][0]
    for r in (ra, rb, rc):
        assert wait(env, r["job_id"])["status"] == "succeeded"
    A, B, C = ra["id"], rb["id"], rc["id"]

    # get
    got = c.get(A)
    assert (got["id"], got["memory"], got["user_id"], got["state"]) == (A, BRIDGE, "alice", "ready")
    assert got["metadata"] == {"topic": "bridge", "year": 2031} and got["run_id"] is None
    assert got["hash"] == hashlib.md5(BRIDGE.encode()).hexdigest() and got["categories"] == []
    got = c.get(B)
    assert got["memory"] == CAT + "\nNoted: Ziggy."  # the user and assistant turns, joined
    assert (got["user_id"], got["agent_id"], got["run_id"]) == ("bob", "helper", "run-1")

    # search: filters and top_k
    res = c.search("What colour is the Quillon bridge?", filters={"user_id": "alice"}, top_k=2)["results"]
    assert ids_of(res)[0] == A and len(res) == 2 and all(m["user_id"] == "alice" for m in res)
    assert [m["score"] for m in res] == sorted((m["score"] for m in res), reverse=True)
    assert ids_of(c.search("bridge", filters={"user_id": "alice"}, top_k=1)["results"]) == [A]
    q = "anything at all"
    assert ids_of(
        c.search(q, filters={"AND": [{"user_id": "alice"}, {"metadata": {"topic": "bakery"}}]})["results"]
    ) == [C]
    assert set(ids_of(c.search(q, filters={"OR": [{"run_id": "run-1"}, {"topic": "bakery"}]})["results"])) == {B, C}
    assert ids_of(c.search(q, filters={"year": {"gte": 2030, "lt": 2040}})["results"]) == [A]
    assert ids_of(c.search(q, filters={"tags": {"icontains": "owls"}})["results"]) == [C]
    assert set(
        ids_of(c.search(q, filters={"user_id": {"in": ["alice", "bob"]}, "NOT": {"topic": "pets"}})["results"])
    ) == {
        A,
        C,
    }
    assert c.search(q, filters={"user_id": "nobody"})["results"] == []

    # get_all: paged
    page = c.get_all(filters={"user_id": "alice"})
    assert page["count"] == 2 and page["next"] is None and page["previous"] is None
    assert set(ids_of(page["results"])) == {A, C}
    first = c.get_all(filters={"user_id": "alice"}, page=1, page_size=1)
    second = c.get_all(filters={"user_id": "alice"}, page=2, page_size=1)
    assert first["count"] == second["count"] == 2
    assert "page=2" in first["next"] and first["previous"] is None
    assert second["next"] is None and "page=1" in second["previous"]
    assert (ids_of(first["results"]), ids_of(second["results"])) == ([A], [C])  # oldest first
    assert c.get_all(filters={"user_id": "alice"}, page_size=1000)["count"] == 2
    assert c.get_all(filters={"agent_id": "helper"})["count"] == 1

    # update: a new version learned under the same id; the old one is gone, its metadata kept
    with hold.held():
        u = c.update(A, text=BRIDGE_2)
        assert (u["id"], u["text"], u["memory"], u["state"]) == (A, BRIDGE_2, BRIDGE_2, "learning")
        assert c.get(A)["memory"] == BRIDGE_2  # the new text is the memory at once
        found = c.search("Quillon bridge", filters={"user_id": "alice"})["results"]
        assert [m["memory"] for m in found if m["id"] == A] == [BRIDGE_2]  # once, the new text
    assert wait(env, u["job_id"])["status"] == "succeeded"
    got = c.get(A)
    assert (got["memory"], got["state"], got["metadata"]) == (BRIDGE_2, "ready", {"topic": "bridge", "year": 2031})
    assert stored_rows(env.store, "acme", A) == [(schema.stored_id("acme", A), BRIDGE_2)]
    u2 = c.update(A, metadata={"topic": "bridge", "year": 2032})
    assert wait(env, u2["job_id"])["status"] == "succeeded"
    got = c.get(A)
    assert got["memory"] == BRIDGE_2 and got["metadata"] == {"topic": "bridge", "year": 2032}

    # history: ADD, then the two updates, with old and new texts and times
    h = c.history(A)
    assert [e["event"] for e in h] == ["ADD", "UPDATE", "UPDATE"]
    assert (h[0]["old_memory"], h[0]["new_memory"]) == (None, BRIDGE)
    assert (h[1]["old_memory"], h[1]["new_memory"]) == (BRIDGE, BRIDGE_2)
    assert (h[2]["old_memory"], h[2]["new_memory"]) == (BRIDGE_2, BRIDGE_2)
    assert all(e["memory_id"] == A for e in h) and h[2]["metadata"] == {"topic": "bridge", "year": 2032}
    assert [e["created_at"] for e in h] == sorted(e["created_at"] for e in h)
    assert h[0]["input"] == [{"role": "user", "content": BRIDGE}]
    got = c.get(A)  # a version's time: the last update's commit, after its request
    assert got["created_at"] == got["updated_at"] > h[2]["created_at"]

    # delete
    assert "deleted" in c.delete(B, delete_linked=True)["message"]  # (nothing is linked: B alone goes)
    with pytest.raises(MemoryNotFoundError):
        c.get(B)
    hb = c.history(B)
    assert [e["event"] for e in hb] == ["ADD", "DELETE"]
    assert (hb[1]["old_memory"], hb[1]["new_memory"]) == (CAT + "\nNoted: Ziggy.", None)
    assert stored_rows(env.store, "acme", B) == []

    # delete_all with filters (MemoryClient sends the dict as a query parameter)
    keep = c.add(HERON, user_id="carol")["results"][0]
    gone = c.delete_all(filters={"user_id": "alice"})
    assert set(gone["deleted"]) == {A, C}
    assert c.get_all(filters={"user_id": "alice"})["count"] == 0
    assert c.get(keep["id"])["memory"] == HERON  # another user's memory stays
    assert [e["event"] for e in c.history(C)] == ["ADD", "DELETE"]
    assert c.delete_all(user_id="carol")["deleted"] == [keep["id"]]
    assert stored_rows(env.store, "acme", A) == stored_rows(env.store, "acme", C) == []


def test_token_and_bearer_on_every_route(env):
    """The `Token KEY` scheme works on megamem's own routes too, and a wrong key is refused either way."""
    r = httpx.get(f"{env.url}/v1/memories", headers=token(env.keys["acme"]))
    assert r.status_code == 200
    assert httpx.get(f"{env.url}/v1/ping/", headers=bearer(env.keys["acme"])).json()["project_id"] == "acme"
    for h in (token("mm-wrong"), bearer("mm-wrong")):
        check_error(httpx.get(f"{env.url}/v1/ping/", headers=h), 401)
    check_error(httpx.get(f"{env.url}/v1/ping/"), 401)
    check_error(httpx.get(f"{env.url}/v1/ping/", headers={"Authorization": f"Basic {env.keys['acme']}"}), 401)
    with pytest.raises(ValueError, match="401|API key"):
        MemoryClient(api_key="mm-wrong", host=env.url)
    for path in ("/v1/entities/", "/api/v1/orgs/megamem/projects/acme/"):  # only the memory calls are served
        check_error(httpx.get(env.url + path, headers=token(env.keys["acme"])), 404)
    paths = httpx.get(f"{env.url}/openapi.json").json()["paths"]
    for path in ("/v1/ping/", "/v3/memories/add/", "/v3/memories/search/", "/v3/memories/", "/v1/memories/"):
        assert path in paths, path
    assert {"get", "put", "delete"} <= set(paths["/v1/memories/{memory_id}/"])
    assert "/v1/memories/{memory_id}/history/" in paths


# -- a memory answers the moment it is added --------------------------------------------------------------------------
@pytest.fixture()
def prompts(env, monkeypatch):
    """Every prompt the engine is asked to decode, as text, with the number of adapters in its mixture."""
    srv = env.srv
    seen: list[tuple[str, int]] = []
    real = srv.engine.submit

    def submit(prompt, adapters, weights, *args, **kw):
        seen.append((srv.engine.tok.decode(prompt), len(adapters)))
        return real(prompt, adapters, weights, *args, **kw)

    monkeypatch.setattr(srv.engine, "submit", submit)
    return seen


def chat(env: Env, question: str, user: str) -> dict:
    body = {
        "model": "megamem",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 1,
        "memory": {"user_id": user},
    }
    r = httpx.post(f"{env.url}/v1/chat/completions", json=body, headers=bearer(env.keys["acme"]), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_learning_memory_answers_at_once(env, hold, prompts):
    acme = bearer(env.keys["acme"])
    with hold.held():
        r = httpx.post(f"{env.url}/v1/memories", json={"text": HERON, "id": "l-heron", "user_id": "hedy"}, headers=acme)
        assert r.status_code == 202 and r.json()["memory_state"] == "learning"
        job = r.json()["job_id"]
        got = httpx.get(f"{env.url}/v1/memories/l-heron", headers=acme).json()
        assert (got["memory"], got["state"], got["user_id"]) == (HERON, "learning", "hedy")
        assert httpx.get(f"{env.url}/v1/jobs/{job}", headers=acme).json()["memory_state"] == "learning"
        listed = httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()["results"]
        assert [(m["id"], m["state"]) for m in listed if m["id"] == "l-heron"] == [("l-heron", "learning")]
        found = httpx.post(f"{env.url}/v1/memories/search", json={"query": HERON}, headers=acme).json()["results"]
        assert found[0]["id"] == "l-heron" and found[0]["score"] > 0.99 and found[0]["state"] == "learning"
        assert ids_of(found).count("l-heron") == 1
        assert client(env).get("l-heron")["state"] == "learning"
        # a chat: the memory's text is the context at once, reported at weight 0 (no adapter yet)
        answer = chat(env, "Where can I buy lanterns shaped like herons?", "hedy")
        sel = answer["memory"]["selected"]
        assert sel[0]["id"] == "l-heron" and sel[0]["weight"] == 0.0
        text, n_adapters = prompts[-1]
        assert HERON in text and n_adapters == 0
        # the job has not run: nothing is stored
        assert stored_rows(env.store, "acme", "l-heron") == []
    assert wait(env, job)["status"] == "succeeded"
    assert httpx.get(f"{env.url}/v1/jobs/{job}", headers=acme).json()["memory_state"] == "ready"
    assert httpx.get(f"{env.url}/v1/memories/l-heron", headers=acme).json()["state"] == "ready"
    listed = httpx.get(f"{env.url}/v1/memories", params={"limit": 1000}, headers=acme).json()["results"]
    assert [(m["id"], m["state"]) for m in listed if m["id"] == "l-heron"] == [("l-heron", "ready")]
    # ... and now its adapter joins the mixture, its text still in context
    answer = chat(env, "Where can I buy lanterns shaped like herons?", "hedy")
    sel = answer["memory"]["selected"]
    assert sel[0]["id"] == "l-heron" and sel[0]["weight"] > 0
    text, n_adapters = prompts[-1]
    assert HERON in text and n_adapters == 1
    httpx.delete(f"{env.url}/v1/memories/l-heron", headers=acme)


def test_delete_and_update_while_learning(env, hold, monkeypatch):
    """A delete cancels the job (the memory never appears, not even after the job would have run); an update of
    a memory still being learned supersedes its job (only the newest text is learned, once). The worker looks
    for a cancel only when it commits here (not between training steps too), so that check is the one tested."""
    import megamem.server.runtime as runtime

    monkeypatch.setattr(runtime, "CANCEL_CHECK_S", 1e9)
    c = client(env)
    with hold.held():
        x = c.add("Temporary: the Brisk canal freezes in late January.", user_id="dora")["results"][0]
        c.delete(x["id"])
        assert c.get_all(filters={"user_id": "dora"})["count"] == 0
        assert c.search("Brisk canal", filters={"user_id": "dora"})["results"] == []
        y = c.add("The Tarn ferry has a green funnel.", user_id="dora")["results"][0]
        y2 = c.update(y["id"], text="The Tarn ferry has a red funnel.")
        assert y2["id"] == y["id"] and y2["job_id"] != y["job_id"]
        page = c.get_all(filters={"user_id": "dora"})
        assert page["count"] == 1 and page["results"][0]["memory"] == "The Tarn ferry has a red funnel."
    done = wait(env, x["job_id"])
    assert (done["status"], done["memory_state"]) == ("cancelled", "deleted")
    assert wait(env, y["job_id"])["status"] == "cancelled"
    # the worker took x's job before y2's (it had claimed it, held): so it is done with it, and stored nothing
    assert wait(env, y2["job_id"])["status"] == "succeeded"
    assert stored_rows(env.store, "acme", x["id"]) == []
    assert stored_rows(env.store, "acme", y["id"]) == [
        (schema.stored_id("acme", y["id"]), "The Tarn ferry has a red funnel.")
    ]
    with pytest.raises(MemoryNotFoundError):
        c.get(x["id"])
    assert [e["event"] for e in c.history(x["id"])] == ["ADD", "DELETE"]
    assert [e["event"] for e in c.history(y["id"])] == ["ADD", "UPDATE"]
    c.delete_all(user_id="dora")


def test_failed_memory_is_shown_until_deleted(env, hold):
    acme = bearer(env.keys["acme"])
    with hold.failing():
        r = httpx.post(f"{env.url}/v1/memories", json={"text": CAT, "id": "f-cat", "user_id": "fay"}, headers=acme)
        job = wait(env, r.json()["job_id"])
    assert (job["status"], job["memory_state"]) == ("failed", "failed")
    got = httpx.get(f"{env.url}/v1/memories/f-cat", headers=acme).json()
    assert got["state"] == "failed" and "on purpose" in got["error"] and got["memory"] == CAT
    listed = httpx.get(f"{env.url}/v1/memories", params={"user_id": "fay"}, headers=acme).json()["results"]
    assert [(m["id"], m["state"]) for m in listed] == [("f-cat", "failed")]
    found = httpx.post(f"{env.url}/v1/memories/search", json={"query": CAT, "user_id": "fay"}, headers=acme)
    assert found.json()["results"] == []  # a failed memory is never searched
    assert httpx.delete(f"{env.url}/v1/memories/f-cat", headers=acme).json() == {"id": "f-cat", "deleted": True}
    check_error(httpx.get(f"{env.url}/v1/memories/f-cat", headers=acme), 404)
    assert httpx.get(f"{env.url}/v1/memories", params={"user_id": "fay"}, headers=acme).json()["results"] == []


def test_history_of_megamem_routes(env):
    """megamem's own routes record history too; a replayed Idempotency-Key records nothing twice."""
    acme = bearer(env.keys["acme"]) | {"Idempotency-Key": "hist-1"}
    body = {"text": "The Lindqvist archive opens at nine.", "id": "h-archive"}
    first = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    again = httpx.post(f"{env.url}/v1/memories", json=body, headers=acme)
    assert first.json()["job_id"] == again.json()["job_id"]
    assert wait(env, first.json()["job_id"])["status"] == "succeeded"
    assert httpx.delete(f"{env.url}/v1/memories/h-archive", headers=acme).status_code == 200
    h = httpx.get(f"{env.url}/v1/memories/h-archive/history/", headers=token(env.keys["acme"])).json()
    assert [(e["event"], e["old_memory"], e["new_memory"]) for e in h] == [
        ("ADD", None, body["text"]),
        ("DELETE", body["text"], None),
    ]


# -- bad input, and other tenants ------------------------------------------------------------------------------------
def test_bad_input_one_clear_error_nothing_lost(env):
    c = client(env)
    keep = c.add(BRIDGE, user_id="kim", metadata={"topic": "bridge"})["results"][0]
    assert wait(env, keep["job_id"])["status"] == "succeeded"
    K = keep["id"]
    before = snapshot(env.store)
    h = token(env.keys["acme"])
    msgs = [{"role": "user", "content": "x y z"}]
    cases = [
        ("POST", "/v3/memories/add/", {}, 422, "messages"),
        ("POST", "/v3/memories/add/", {"messages": []}, 422, "messages"),
        ("POST", "/v3/memories/add/", {"messages": [{"role": "system", "content": "x"}]}, 422, None),
        ("POST", "/v3/memories/add/", {"messages": msgs, "infer": True}, 422, "infer"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "app_id": "a"}, 422, "app_id"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "custom_categories": [{"a": "b"}]}, 422, "custom_categories"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "custom_instructions": "x"}, 422, "custom_instructions"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "foo": 1}, 422, "foo"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "filters": {"topic": "x"}}, 422, "filters"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "filters": {"user_id": 5}}, 422, "filters"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "user_id": "a", "filters": {"user_id": "b"}}, 422, "user_id"),
        ("POST", "/v3/memories/add/", {"messages": msgs, "metadata": {"megamem.namespace": "globex"}}, 422, None),
        ("POST", "/v3/memories/add/", {"messages": msgs, "metadata": {"paraphrases": "x"}}, 422, None),
        ("POST", "/v3/memories/add/", {"messages": [{"role": "user", "content": "x" * 5000}]}, 422, None),
        ("POST", "/v3/memories/search/", {"query": ""}, 422, None),
        ("POST", "/v3/memories/search/", {"query": "x", "top_k": 0}, 422, "top_k"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"topic": {"regex": "x"}}}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"topic": {"in": "x"}}}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"year": {"gt": [1]}}}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"AND": {"a": 1}}}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"OR": []}}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": {"app_id": "a"}}, 422, "filters.app_id"),
        ("POST", "/v3/memories/search/", {"query": "x", "filters": nested(9)}, 422, "filters"),
        ("POST", "/v3/memories/search/", {"query": "x", "rerank": True}, 422, "rerank"),
        ("POST", "/v3/memories/search/", {"query": "x", "keyword_search": True}, 422, "keyword_search"),
        ("POST", "/v3/memories/search/", {"query": "x", "top_k": 101}, 422, "top_k"),
        ("POST", "/v3/memories/search/", {"query": "x", "categories": ["a"]}, 422, "categories"),
        ("POST", "/v3/memories/?page=0", {}, 422, "query.page"),
        ("POST", "/v3/memories/?page_size=1001", {}, 422, "query.page_size"),
        ("POST", "/v3/memories/", {"end_date": "2026-12-31"}, 422, "end_date"),
        ("POST", "/v3/memories/", {"filters": {"user_id": {"gte": {}}}}, 422, "filters"),
        ("POST", "/v3/memories/", {"start_date": "2026-01-01"}, 422, "start_date"),
        ("POST", "/v3/memories/", {"latest_only": False}, 422, "latest_only"),
        ("GET", "/v1/memories/no-such-memory/", None, 404, None),
        ("GET", "/v1/memories/acme--" + K + "/", None, 404, None),
        ("GET", f"/v1/memories/{K}%2F", None, 404, None),  # decoded: mem0's get of K; refused
        ("PUT", f"/v1/memories/{K}/", {}, 422, "text"),
        ("PUT", f"/v1/memories/{K}/", {"text": ""}, 422, None),
        ("PUT", f"/v1/memories/{K}/", {"text": "x", "timestamp": 5}, 422, "timestamp"),
        ("PUT", f"/v1/memories/{K}/", {"text": "x", "expiration_date": "2030-01-01"}, 422, "expiration_date"),
        ("PUT", f"/v1/memories/{K}/", {"metadata": "x"}, 422, "metadata"),
        ("PUT", f"/v1/memories/{K}/", {"metadata": {"megamem.user_id": "eve"}}, 422, None),
        ("PUT", "/v1/memories/no-such-memory/", {"text": "x"}, 404, None),
        ("DELETE", "/v1/memories/no-such-memory/", None, 404, None),
        ("DELETE", f"/v1/memories/{K}%2F", None, 404, None),
        ("DELETE", "/v1/memories/", None, 422, "filters"),
        ("DELETE", "/v1/memories/?filters=not-a-dict", None, 422, "filters"),
        ("DELETE", "/v1/memories/?filters=" + "[" * 5000, None, 422, "filters"),
        ("DELETE", "/v1/memories/?filters=__import__('os')", None, 422, "filters"),
        ("DELETE", "/v1/memories/?org_id=o&user_id=kim", None, 422, "org_id"),
        ("DELETE", '/v1/memories/?filters={"user_id": {"bad": 1}}', None, 422, "filters"),
        ("GET", "/v1/memories/no-such-memory/history/", None, 404, None),
        ("GET", "/v1/memories/../history/", None, 404, None),
    ]
    for method, path, body, status, param in cases:
        r = httpx.request(method, env.url + path, json=body, headers=h, timeout=30)
        assert r.status_code == status, (method, path, r.status_code, r.text[:300])
        check_error(r, status, param)
    not_json = h | {"Content-Type": "application/json"}
    check_error(httpx.post(env.url + "/v3/memories/add/", content=b"{not json", headers=not_json), 400)
    assert snapshot(env.store) == before  # no memory, job or history event changed
    assert c.get(K)["memory"] == BRIDGE
    assert ids_of(c.search("bridge", filters=nested(8))["results"]) == [K]  # 8 levels deep are fine
    c.delete(K)


def nested(depth: int) -> dict:
    f: dict = {"user_id": "kim"}
    for _ in range(depth):
        f = {"AND": [f]}
    return f


def test_tenant_isolation(env, hold):
    acme, globex = client(env, "acme"), client(env, "globex")
    mine = acme.add(BAKERY, user_id="ivy", metadata={"topic": "bakery"})["results"][0]
    assert wait(env, mine["job_id"])["status"] == "succeeded"
    M = mine["id"]
    with hold.held():
        learning = acme.add(HERON, user_id="ivy")["results"][0]
        L = learning["id"]
        while job_status(env, learning["job_id"]) == "queued":  # claimed and held first: its state then stays
            time.sleep(0.05)
        before = snapshot(env.store)
        for mid in (M, L):
            for call, kw in (
                (globex.get, {}),
                (globex.update, {"text": "Globex was here."}),
                (globex.delete, {}),
                (globex.history, {}),
            ):
                with pytest.raises(MemoryNotFoundError):
                    call(mid, **kw)
            r = httpx.get(f"{env.url}/v1/memories/{mid}", headers=bearer(env.keys["globex"]))
            check_error(r, 404)
        for q in (BAKERY, HERON):
            assert globex.search(q, filters={"user_id": "ivy"})["results"] == []
            assert not {M, L} & set(ids_of(globex.search(q)["results"]))
        assert globex.get_all(filters={"user_id": "ivy"})["count"] == 0
        assert globex.delete_all(filters={"user_id": "ivy"})["deleted"] == []
        listed = httpx.get(f"{env.url}/v1/memories", headers=bearer(env.keys["globex"])).json()["results"]
        assert not {M, L} & set(ids_of(listed))
        assert snapshot(env.store) == before
        # the owner still sees both, as they were
        assert acme.get(M)["memory"] == BAKERY and acme.get(L)["memory"] == HERON
        assert set(ids_of(acme.get_all(filters={"user_id": "ivy"})["results"])) == {M, L}
    assert wait(env, learning["job_id"])["status"] == "succeeded"
    assert [e["event"] for e in acme.history(M)] == ["ADD"]
    acme.delete_all(user_id="ivy")


# -- a restart mid-training ------------------------------------------------------------------------------------------
LAUNCHER = """
import sys
import time
from pathlib import Path

import uvicorn

from megamem import Recipe
from megamem.server.app import ServerConfig, create_app
from megamem.server.runtime import Server

store, port, epochs, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
train = Server.train


def held_train(self, job, progress):  # each job waits for the test's go (a file) before it trains
    while not go.exists():
        time.sleep(0.05)
    return train(self, job, progress)


Server.train = held_train
cfg = ServerConfig(store=store, lease_s=3.0, recipe=Recipe(epochs=epochs, min_tokens=0, lr=5e-3))
uvicorn.run(create_app(cfg), host="127.0.0.1", port=port, log_level="warning")
"""


class Child:
    """The server as its own process (the launcher above), so that it can be killed with SIGKILL."""

    def __init__(self, store: Path, go: Path, log: Path) -> None:
        self.store, self.go, self.log = store, go, log
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, epochs: int) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "a") as out:
            cmd = [sys.executable, "-c", LAUNCHER, str(self.store), str(port), str(epochs), str(self.go)]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not start in 180 s")

    def kill(self) -> None:
        """SIGKILL our own child, by its pid, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None


def test_restart_mid_training_nothing_doubled(tmp_path):
    store, keys = make_server_store(tmp_path)
    go = tmp_path / "go"
    child = Child(store, go, tmp_path / "server.log")
    acme = bearer(keys["acme"])
    try:
        go.touch()
        url = child.start(epochs=100_000)  # a long training, killed part way
        r = httpx.post(f"{url}/v1/memories", json={"text": HERON, "id": "k-heron", "user_id": "kai"}, headers=acme)
        job = r.json()["job_id"]
        deadline = time.time() + 120
        while True:
            j = httpx.get(f"{url}/v1/jobs/{job}", headers=acme).json()
            if j["status"] == "running" and j["progress"]["step"] >= 2:
                break
            assert time.time() < deadline and j["status"] in ("queued", "running"), j
            time.sleep(0.05)
        child.kill()  # mid-training
        go.unlink()
        url = child.start(epochs=3)  # the restarted server holds the job until `go` exists again

        def shown() -> list[dict]:
            listed = httpx.get(f"{url}/v1/memories", headers=acme).json()["results"]
            found = httpx.post(f"{url}/v1/memories/search", json={"query": HERON}, headers=acme).json()["results"]
            mem0 = httpx.post(f"{url}/v3/memories/", json={"filters": {"user_id": "kai"}}, headers=token(keys["acme"]))
            assert mem0.json()["count"] == 1
            return [m for m in listed + found if m["id"] == "k-heron"]

        seen = shown()
        assert [(m["memory"], m["state"]) for m in seen] == [(HERON, "learning")] * 2  # once listed, once found
        assert httpx.get(f"{url}/v1/jobs/{job}", headers=acme).json()["memory_state"] == "learning"
        go.touch()
        done = wait_job(url, keys["acme"], job)
        assert done["status"] == "succeeded" and done["attempts"] == 2  # killed once, run again
        seen = shown()
        assert [(m["memory"], m["state"]) for m in seen] == [(HERON, "ready")] * 2
        assert stored_rows(store, "acme", "k-heron") == [(schema.stored_id("acme", "k-heron"), HERON)]
        h = httpx.get(f"{url}/v1/memories/k-heron/history/", headers=acme).json()
        assert [e["event"] for e in h] == ["ADD"]
    finally:
        child.kill()


def test_update_killed_between_forget_and_commit(tmp_path):
    """An update's worker forgets the old version and commits the new one under the serving lock; a process
    killed between the two leaves the job running and nothing stored under the id. After a restart the memory is
    shown once, with its new text ("learning"), and the job, claimed again, stores it once."""
    from serverlib import quick_recipe

    from megamem import Memory
    from megamem.memory import Item
    from megamem.server.jobs import JobQueue

    store, keys = make_server_store(tmp_path)
    sid = schema.stored_id("acme", "u1")
    add = {"text": BRIDGE, "paraphrases": [], "metadata": {}, "user_id": "uma", "agent_id": None, "replaces": []}
    queue = JobQueue(store)
    first, _ = queue.submit("acme", sid, add)
    reserved = {schema.NAMESPACE: "acme", schema.JOB: first.id, schema.USER: "uma"}
    Memory(store, recipe=quick_recipe()).add_many([Item(BRIDGE, [], {}, sid, reserved=reserved)])
    queue.db.execute("UPDATE jobs SET state = 'succeeded' WHERE id = ?", (first.id,))  # the add, learned
    second, _ = queue.submit("acme", sid, add | {"text": BRIDGE_2, "update": True})
    queue.close()
    mem = Memory(store)
    mem.forget(sid)  # what the killed worker had done ...
    mem.store.close()
    db = sqlite3.connect(store / "manifest.sqlite")
    with db:  # ... with the update running under a lease that died with it
        db.execute(
            "UPDATE jobs SET state = 'running', attempts = 1, lease_owner = 'dead-0', lease_until = 0 WHERE id = ?",
            (second.id,),
        )
    db.close()
    acme = bearer(keys["acme"])
    with LiveServer(store, worker=False) as url:  # no worker: the restart as it answers before the job runs again
        listed = httpx.get(f"{url}/v1/memories", headers=acme).json()["results"]
        assert [(m["id"], m["memory"], m["state"]) for m in listed] == [("u1", BRIDGE_2, "learning")]
        found = httpx.post(f"{url}/v1/memories/search", json={"query": BRIDGE}, headers=acme).json()["results"]
        assert [(m["id"], m["memory"]) for m in found] == [("u1", BRIDGE_2)]
    with LiveServer(store, lease_s=3.0) as url:
        done = wait_job(url, keys["acme"], second.id, timeout=60)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        got = httpx.get(f"{url}/v1/memories/u1", headers=acme).json()
        assert (got["memory"], got["state"], got["user_id"]) == (BRIDGE_2, "ready", "uma")
    assert stored_rows(store, "acme", "u1") == [(sid, BRIDGE_2)]


def test_update_keeps_paraphrases_of_the_same_text(env):
    """A metadata-only update keeps the paraphrases (they still paraphrase the text); a new text drops them."""
    acme = bearer(env.keys["acme"])
    body = {"text": HERON, "id": "p-heron", "paraphrases": ["Heron lanterns of amber glass are sold in Ostrava."]}
    assert (
        wait(env, httpx.post(f"{env.url}/v1/memories", json=body, headers=acme).json()["job_id"])["status"]
        == "succeeded"
    )
    c = client(env)
    assert wait(env, c.update("p-heron", metadata={"k": 1})["job_id"])["status"] == "succeeded"
    got = httpx.get(f"{env.url}/v1/memories/p-heron", headers=acme).json()
    assert got["paraphrases"] == body["paraphrases"] and got["metadata"] == {"k": 1}
    assert wait(env, c.update("p-heron", text=CAT)["job_id"])["status"] == "succeeded"
    got = httpx.get(f"{env.url}/v1/memories/p-heron", headers=acme).json()
    assert (got["memory"], got["paraphrases"], got["metadata"]) == (CAT, [], {"k": 1})
    c.delete("p-heron")


def test_replaces_applies_while_learning(env, hold, prompts):
    """An add that replaces an older memory leaves it out of search and of the gate from the moment it is added."""
    acme = bearer(env.keys["acme"])
    old = {"text": BRIDGE, "id": "rp-old", "user_id": "rex"}
    assert (
        wait(env, httpx.post(f"{env.url}/v1/memories", json=old, headers=acme).json()["job_id"])["status"]
        == "succeeded"
    )
    search = {"query": "What colour is the Quillon bridge?", "user_id": "rex"}
    assert ids_of(httpx.post(f"{env.url}/v1/memories/search", json=search, headers=acme).json()["results"]) == [
        "rp-old"
    ]
    with hold.held():
        new = {"text": BRIDGE_2, "id": "rp-new", "user_id": "rex", "replaces": ["rp-old"]}
        job = httpx.post(f"{env.url}/v1/memories", json=new, headers=acme).json()["job_id"]
        found = httpx.post(f"{env.url}/v1/memories/search", json=search, headers=acme).json()["results"]
        assert ids_of(found) == ["rp-new"]
        sel = chat(env, "What colour is the Quillon bridge?", "rex")["memory"]["selected"]
        assert [s["id"] for s in sel] == ["rp-new"]  # the old one neither in context nor mixed
        text, n_adapters = prompts[-1]
        assert BRIDGE_2 in text and BRIDGE not in text and n_adapters == 0
    assert wait(env, job)["status"] == "succeeded"
    httpx.delete(f"{env.url}/v1/memories", params={"user_id": "rex"}, headers=acme)


def test_committed_before_marked_shown_once(tmp_path):
    """A job whose memory is committed but whose process died before marking it (still running, its lease
    expired): after the restart the memory is shown once, stored ("ready"), and the job is marked succeeded."""
    from serverlib import quick_recipe

    from megamem import Memory
    from megamem.memory import Item
    from megamem.server.jobs import JobQueue

    store, keys = make_server_store(tmp_path)
    sid = schema.stored_id("acme", "c1")
    req = {"text": HERON, "paraphrases": [], "metadata": {}, "user_id": None, "agent_id": None, "replaces": []}
    queue = JobQueue(store)
    job, _ = queue.submit("acme", sid, req)
    queue.close()
    Memory(store, recipe=quick_recipe()).add_many(
        [Item(HERON, [], {}, sid, reserved={schema.NAMESPACE: "acme", schema.JOB: job.id})]
    )
    db = sqlite3.connect(store / "manifest.sqlite")
    with db:
        db.execute(
            "UPDATE jobs SET state = 'running', attempts = 1, lease_owner = 'dead-0', lease_until = 0 WHERE id = ?",
            (job.id,),
        )
    db.close()
    acme = bearer(keys["acme"])
    with LiveServer(store, worker=False) as url:  # before the job is claimed again
        listed = httpx.get(f"{url}/v1/memories", headers=acme).json()["results"]
        assert [(m["id"], m["state"]) for m in listed] == [("c1", "ready")]
        found = httpx.post(f"{url}/v1/memories/search", json={"query": HERON}, headers=acme).json()["results"]
        assert ids_of(found) == ["c1"]
    with LiveServer(store, lease_s=3.0) as url:
        assert wait_job(url, keys["acme"], job.id, timeout=60)["status"] == "succeeded"
        listed = httpx.get(f"{url}/v1/memories", headers=acme).json()["results"]
        assert [(m["id"], m["state"]) for m in listed] == [("c1", "ready")]
