"""Helpers for the server's tests: a store on a tiny model with API keys, and a live server on loopback.

store, keys = make_server_store(tmp_path)            # keys: {"acme": ..., "globex": ..., "admin": ...}
with LiveServer(store) as base_url: ...               # uvicorn in a thread on a free 127.0.0.1 port
make_cortex(store, "acme", ["a-bridge"])              # a namespace's cortex, consolidated cheaply
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx

NAMESPACES = ("acme", "globex")


def make_server_store(root: Path, model_dir: Path | None = None) -> tuple[Path, dict[str, str]]:
    """An empty store on the tiny model (made under root unless given) with a key per namespace and an admin key."""
    from faultlib import make_tiny_model

    from megamem import LoraSpec, Memory
    from megamem.server import db, tenants

    model_dir = model_dir or make_tiny_model(root / "model", context=512)
    store = root / "store"
    Memory(store, model=str(model_dir), lora=LoraSpec(rank=4, alpha=4.0)).prepare_store()
    conn = db.connect(store)
    keys = {ns: tenants.create_key(conn, ns) for ns in NAMESPACES}
    keys["admin"] = tenants.create_key(conn, "ops", admin=True)
    conn.close()
    return store, keys


def quick_recipe():
    """A recipe that learns a memory in a few steps on the tiny model."""
    from megamem import Recipe

    return Recipe(epochs=1, min_tokens=0, lr=5e-3)


def make_cortex(store: Path, namespace: str, api_ids: list[str], keep_adapters: bool = True) -> dict:
    """Consolidate a namespace's memories (by API id) into its cortex with a config quick on the tiny model (a
    few seconds), through a Memory of its own; keep_adapters (the default) leaves the memories in the gate, so a
    test's set of memories stays what it was. Returns consolidate's report."""
    from megamem import Memory, schema
    from megamem.ops.consolidate import ConsolidationConfig, consolidate

    quick = ConsolidationConfig(rank=4, epochs=3, batch_size=2, drift_questions=4, recall_tokens=24, lr=1e-2)
    mem = Memory(store)
    try:
        return consolidate(mem, [schema.stored_id(namespace, i) for i in api_ids], quick, keep_adapters)
    finally:
        mem.store.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(cfg) in a background thread on 127.0.0.1; waits until /healthz says ok."""

    def __init__(self, store: Path, **cfg_kw) -> None:
        from megamem.server.app import ServerConfig, create_app

        cfg_kw.setdefault("recipe", quick_recipe())
        self.cfg = ServerConfig(store=store, **cfg_kw)
        self.app = create_app(self.cfg)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_job(url: str, key: str, job_id: str, timeout: float = 120) -> dict:
    """Poll GET /v1/jobs/{id} until it succeeds or fails."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        job = r.json()
        if job.get("status") in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


# tools for chats with tools: bounded arguments (the tiny model's strings never end on their own)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
