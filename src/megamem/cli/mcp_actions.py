"""The memory tools over stdio (`megamem mcp`, cli/mcp.py), as the library does them: the Actions of
megamem.server.mcp_tools on one namespace of a local store through its Memory, the way the other commands act
(context.Scope): add learns the memory here and now and returns once it is stored, ask is Memory.ask, search is
Memory.search over the namespace's memories. One call runs at a time (a Memory is not thread-safe), in a worker
thread, so the connection keeps answering while an adapter trains.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context

from .. import schema
from ..checks import check_text
from ..errors import MegamemError
from ..items import Answer, Item
from ..server.mcp_tools import AddResult, AskResult, ForgetResult, ListResult, SearchResult, tool_error
from ..server.views import memory_json
from ..store import Record
from .context import Scope, warn
from .memories import _into_namespace

T = TypeVar("T")


class LibraryActions:
    """The tools as the library does them, on the namespace of `scope` (megamem.server.mcp_tools.Actions)."""

    add_note = (
        "This server learns it here and now, in its own process: training the memory's adapter takes from seconds "
        "to minutes on a CPU, and the call returns once the memory is stored (with progress notifications when the "
        "client asks for them)."
    )

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.mem = scope.mem
        self.lock = threading.Lock()

    async def call(self, fn: Callable[[], T]) -> T:
        """fn() in a worker thread, one call at a time; a library error becomes the tool error, and the store's
        warnings left over (a damaged memory skipped, ...) go to stderr as every command prints them."""

        def locked() -> T:
            with self.lock:
                try:
                    return fn()
                finally:
                    warn(self.mem)

        try:
            return await anyio.to_thread.run_sync(locked)
        except MegamemError as exc:
            raise tool_error(exc) from None

    def records(self, user_id: str | None, agent_id: str | None) -> list[Record]:
        """The namespace's memories, narrowed to a user's and an agent's as the server's scope narrows them."""
        return [
            r
            for r in self.scope.records()
            if (user_id is None or r.metadata.get(schema.USER) == user_id)
            and (agent_id is None or r.metadata.get(schema.AGENT) == agent_id)
        ]

    async def add(
        self,
        ctx: Context,
        text: str,
        paraphrases: list[str],
        metadata: dict[str, Any],
        user_id: str | None,
        agent_id: str | None,
        id: str | None,
        replaces: list[str],
    ) -> AddResult:
        """Learn and store the memory (every field checked before training: Memory.add_many validates first)."""
        reserved = {k: v for k, v in ((schema.USER, user_id), (schema.AGENT, agent_id)) if v}
        item = Item(text, paraphrases, metadata, id, replaces=replaces, reserved=reserved)
        on_step = progress_of(ctx)

        def learn() -> tuple[dict, list[str]]:
            """The item in the namespace (its id and replaces there), learned; the warnings it raised."""
            [one] = _into_namespace(self.scope, [item], keep_going=False, bad_lines=[])
            rec = self.mem.add_many([one], on_step=on_step)[0]
            noticed = list(self.mem.warnings)  # e.g. that it may update a stored memory: the caller's to act on
            self.mem.warnings.clear()
            return memory_json(rec), noticed

        shown, noticed = await self.call(learn)
        note = f"stored memory {shown['id']!r}: its adapter is learned, and questions can use it from now on"
        return AddResult(id=shown["id"], status="stored", note=note, memory=shown, warnings=noticed)

    async def search(
        self, ctx: Context, query: str, user_id: str | None, agent_id: str | None, limit: int
    ) -> SearchResult:
        """Memory.search over the namespace's memories (narrowed by user and agent)."""

        def find() -> list[dict]:
            q = check_text(query, "query")
            recs = {r.id: r for r in self.records(user_id, agent_id)}
            ranked = self.mem.search(q, frozenset(recs), limit) if recs else []
            return [memory_json(recs[i]) | {"score": round(s, 6)} for i, s in ranked]

        return SearchResult(results=await self.call(find))

    async def ask(self, ctx: Context, question: str, mode: str, max_tokens: int | None) -> AskResult:
        """Memory.ask in the namespace (its memories and its cortex only), as `megamem ask --namespace` asks."""

        def answer() -> Answer:
            return self.mem.ask(question, mode=mode, max_new_tokens=max_tokens, namespace=self.scope.namespace)

        ans = await self.call(answer)
        selected = [{"id": self.scope.shown_id(i), "weight": round(w, 6)} for i, w in ans.gate]
        return AskResult(answer=ans.text, mode=ans.mode, recall=ans.recall, selected=selected)

    async def list(
        self, ctx: Context, user_id: str | None, agent_id: str | None, limit: int, cursor: str | None
    ) -> ListResult:
        """The namespace's memories, oldest first, a page at a time (GET /v1/memories's paging)."""

        def page() -> dict:
            recs = sorted(self.records(user_id, agent_id), key=lambda r: (r.created, r.id))
            keys = [f"{r.created}|{r.id}" for r in recs]
            start = 0
            if cursor:  # after the cursor's memory, or after its place if it is gone (as the server pages)
                start = next((i + 1 for i, k in enumerate(keys) if k == cursor), sum(1 for k in keys if k <= cursor))
            shown = recs[start : start + limit]
            more = start + limit < len(recs)
            return {
                "results": [memory_json(r) for r in shown],
                "next_cursor": keys[start + limit - 1] if more else None,
            }

        return ListResult.model_validate(await self.call(page))

    async def forget(self, ctx: Context, id: str) -> ForgetResult:
        """Forget one of the namespace's memories; any other id is "no memory", as the server answers it."""

        def drop() -> ForgetResult:
            try:
                rec = self.scope.find(schema.check_api_id(id))
            except MegamemError:  # an id no memory of the namespace can have ('--' in it, ...)
                rec = None
            if rec is None:
                raise MegamemError(f"no memory {id[:200]!r}")
            self.mem.forget(rec.id)
            return ForgetResult(id=schema.api_id(rec), deleted=True)

        return await self.call(drop)


def progress_of(ctx: Context) -> Callable[[int, int, float], None]:
    """An on_step callback (run in the worker thread) that sends the client MCP progress notifications (sent only
    if the call asked for them with a progress token)."""

    def on_step(step: int, total: int, loss: float) -> None:
        """Report one training step; a notification that cannot be sent never stops the learning."""
        try:
            anyio.from_thread.run(ctx.report_progress, step, total, f"learning: step {step} of {total}")
        except Exception:  # the client went away, or the loop is closing: the memory is still learned and stored
            pass

    return on_step
