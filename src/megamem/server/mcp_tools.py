"""The memory tools of megamem's MCP server (Model Context Protocol, on the official `mcp` SDK's MCPServer): add a
memory, search, ask, list and forget, with their JSON schemas. One definition serves both transports; each
transport acts through its own `Actions`: the library's Memory over stdio (`megamem mcp`, cli/mcp_actions.py), the
serving Server over streamable HTTP (`/mcp` on `megamem serve`, mcp_http).

A call's arguments are checked by the tool's schema first, unknown names included (a misspelt optional
argument such as `user` for `user_id` would otherwise widen a search without a word), then by the same checks
as the REST routes or the library, all before any training or decoding. Whatever fails is an MCP tool error
(isError, its text naming the problem), never a protocol error or a crash; a failed call stores and forgets
nothing.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, Protocol

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..answer import DEFAULT_MODE, MODES
from ..errors import MegamemError
from ..schema import PARAPHRASES, PREFIX
from .schemas import MAX_TEXT

__all__ = ["Actions", "ToolError", "build", "tool_error"]

INSTRUCTIONS = (
    "megamem is a long-term memory stored in a language model's weights, one LoRA adapter per memory. "
    "add_memory stores a fact or a passage; search_memories finds stored memories by meaning; ask answers a "
    "question through the memories a gate selects for it; list_memories pages through them; forget_memory "
    "deletes one for good. Every tool acts in this connection's namespace only."
)

# -- the arguments (the schemas a client sees; limits as the REST routes' bodies, megamem.server.schemas) --------
Text = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_TEXT,
        description="The memory's text: a fact or a passage, as it should be recalled.",
    ),
]
Paraphrases = Annotated[
    tuple[str, ...],
    Field(max_length=32, description="Other wordings of the same memory, learned beside its text (optional)."),
]
Metadata = Annotated[
    dict[str, Any] | None,
    Field(
        description=f"Your own JSON fields to keep with the memory (keys starting with {PREFIX!r} are reserved, and "
        f"{PARAPHRASES!r} when the memory has paraphrases)."
    ),
]
UserId = Annotated[str | None, Field(max_length=200, description="The user the memory is about or for (optional).")]
AgentId = Annotated[str | None, Field(max_length=200, description="The agent the memory is for (optional).")]
NewId = Annotated[
    str | None,
    Field(max_length=128, description="An id for the new memory (default: a fresh one); it must be new."),
]
Replaces = Annotated[
    tuple[str, ...],
    Field(max_length=16, description="Ids of older memories this one corrects: the gate then prefers this one."),
]
Query = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, description="What to look for, in plain words.")]
OnlyUser = Annotated[str | None, Field(max_length=200, description="Only this user's memories (optional).")]
OnlyAgent = Annotated[str | None, Field(max_length=200, description="Only this agent's memories (optional).")]
SearchLimit = Annotated[int, Field(ge=1, le=100, description="How many memories at most, best first.")]
Question = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, description="The question to answer.")]
Mode = Annotated[
    Literal[MODES],
    Field(
        description="How the answer uses the memories: mega+rag (the default and best: the selected adapters and "
        "the top memory's text in context), rag (the text only), qa / recall / irag / mega (the adapters only)."
    ),
]
MaxTokens = Annotated[
    int | None,
    Field(ge=1, le=4096, description="Longest answer in tokens (default: the pipeline's own, 64 for an answer)."),
]
PageLimit = Annotated[int, Field(ge=1, le=1000, description="How many memories at most in this page.")]
Cursor = Annotated[
    str | None, Field(max_length=300, description="next_cursor of the previous page, to get the next one.")
]
MemoryId = Annotated[str, Field(min_length=1, max_length=128, description="The id of the memory to forget.")]


# -- the results (structured content, with the schemas a client sees) -------------------------------------------
class MemoryOut(BaseModel):
    """A stored memory as its namespace sees it (the REST API's shape, megamem.server.views.memory_json)."""

    model_config = ConfigDict(extra="allow")
    id: str
    memory: str = Field(description="Its text.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    user_id: str | None = None
    agent_id: str | None = None
    created_at: str | None = None


class ScoredMemory(MemoryOut):
    score: float = Field(description="The gate's similarity to the query (higher is closer).")


class AddResult(BaseModel):
    id: str = Field(description="The new memory's id.")
    status: str = Field(description="'queued' (a server job learns it) or 'stored' (learned and stored).")
    job_id: str | None = Field(None, description="The server's job that learns it (HTTP only).")
    note: str = Field(description="What happened, in words.")
    memory: MemoryOut | None = Field(None, description="The stored memory, once stored.")
    warnings: list[str] = Field(default_factory=list, description="What the store noticed (a likely update, ...).")


class SearchResult(BaseModel):
    results: list[ScoredMemory]


class Selected(BaseModel):
    id: str
    weight: float = Field(description="Its weight in the answer's mixture of adapters.")


class AskResult(BaseModel):
    answer: str
    mode: str
    recall: str | None = Field(None, description="The reconstruction the answer came from (recall and irag).")
    selected: list[Selected] = Field(description="The memories the gate selected, heaviest first.")


class ListResult(BaseModel):
    results: list[MemoryOut] = Field(description="Oldest first.")
    next_cursor: str | None = Field(None, description="Pass it as cursor for the next page; null on the last.")


class ForgetResult(BaseModel):
    id: str
    deleted: bool


class Actions(Protocol):
    """What a transport does for each tool (arguments already checked against the schema). add_note: how it
    learns, for add_memory's description. A refusal is a ToolError (see tool_error)."""

    add_note: str

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
    ) -> AddResult: ...

    async def search(
        self, ctx: Context, query: str, user_id: str | None, agent_id: str | None, limit: int
    ) -> SearchResult: ...

    async def ask(self, ctx: Context, question: str, mode: str, max_tokens: int | None) -> AskResult: ...

    async def list(
        self, ctx: Context, user_id: str | None, agent_id: str | None, limit: int, cursor: str | None
    ) -> ListResult: ...

    async def forget(self, ctx: Context, id: str) -> ForgetResult: ...


def tool_error(exc: MegamemError) -> ToolError:
    """A library error as the tool error the client reads (its message as the library words it)."""
    return ToolError(str(exc))


def strict(tool: Tool) -> Tool:
    """The tool with unknown argument names refused (pydantic's extra='forbid' on its argument model, which the
    SDK reads at each call) and its published schema saying so (additionalProperties: false)."""
    base = tool.fn_metadata.arg_model

    class Arguments(base):  # type: ignore[valid-type, misc]
        model_config = ConfigDict(extra="forbid")

    Arguments.__name__ = Arguments.__qualname__ = base.__name__
    tool.fn_metadata.arg_model = Arguments
    tool.parameters = Arguments.model_json_schema(by_alias=True)
    return tool


def build(actions: Actions, name: str = "megamem") -> MCPServer:
    """The MCP server with the five tools, acting through `actions`."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return MCPServer(
            name,
            title="megamem",
            instructions=INSTRUCTIONS,
            version=__version__,
            tools=[strict(t) for t in writing_tools(actions) + reading_tools(actions)],
        )
    finally:  # MCPServer sets up the root logger as it is made (logging.basicConfig): the process keeps its own
        root.handlers[:] = handlers
        root.setLevel(level)


def writing_tools(actions: Actions) -> list[Tool]:
    """add_memory and forget_memory."""

    async def add_memory(
        ctx: Context,
        text: Text,
        paraphrases: Paraphrases = (),
        metadata: Metadata = None,
        user_id: UserId = None,
        agent_id: AgentId = None,
        id: NewId = None,
        replaces: Replaces = (),
    ) -> AddResult:
        return await actions.add(ctx, text, list(paraphrases), metadata or {}, user_id, agent_id, id, list(replaces))

    async def forget_memory(ctx: Context, id: MemoryId) -> ForgetResult:
        return await actions.forget(ctx, id)

    add_doc = (
        "Store a new long-term memory (a fact or a passage) so that later questions can use it. Everything is "
        "checked before anything is learned; an id that exists already is refused, never overwritten. "
    )
    return [
        Tool.from_function(
            add_memory,
            title="Add a memory",
            description=add_doc + actions.add_note,
            annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False),
        ),
        Tool.from_function(
            forget_memory,
            title="Forget a memory",
            description="Delete one of your memories for good, by its id (its adapter and its text).",
            annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True),
        ),
    ]


def reading_tools(actions: Actions) -> list[Tool]:
    """search_memories, ask and list_memories."""

    async def search_memories(
        ctx: Context, query: Query, user_id: OnlyUser = None, agent_id: OnlyAgent = None, limit: SearchLimit = 10
    ) -> SearchResult:
        return await actions.search(ctx, query, user_id, agent_id, limit)

    async def ask(
        ctx: Context, question: Question, mode: Mode = DEFAULT_MODE, max_tokens: MaxTokens = None
    ) -> AskResult:
        return await actions.ask(ctx, question, mode, max_tokens)

    async def list_memories(
        ctx: Context,
        user_id: OnlyUser = None,
        agent_id: OnlyAgent = None,
        limit: PageLimit = 100,
        cursor: Cursor = None,
    ) -> ListResult:
        return await actions.list(ctx, user_id, agent_id, limit, cursor)

    reading = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)
    return [
        Tool.from_function(
            search_memories,
            title="Search memories",
            description="Find your stored memories closest in meaning to a query, best first, with their scores.",
            annotations=reading,
        ),
        Tool.from_function(
            ask,
            title="Ask the memory",
            description="Answer a question through your memories: a gate selects the memories the question is "
            "about and the model answers with their adapters (and, by default, the top memory's text in context). "
            "It answers from all of your memories; the answer says which ones it used.",
            annotations=reading,
        ),
        Tool.from_function(
            list_memories,
            title="List memories",
            description="Your stored memories, oldest first, a page at a time.",
            annotations=reading,
        ),
    ]
