"""Request bodies of the server's routes (pydantic): OpenAI's chat shape with megamem's `memory` extension,
and mem0's memory shapes. Unknown OpenAI fields are accepted and ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..answer import DEFAULT_MODE, MODES
from .formats import ResponseFormat, Tool, ToolChoice

MAX_TEXT = 100_000  # characters of one memory text or message


class Part(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=128)  # an assistant turn's calls

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


Mode = Literal[MODES]  # the answer pipeline's modes (megamem.answer), the library's and the server's alike
Filter = dict[str, Any]  # field -> value (eq) | {"eq": v} | {"in": [...]} | {"contains": v}


class MemoryOptions(BaseModel):
    """megamem's extension of a chat request (the openai client sends it with extra_body={"memory": {...}}).
    mode: how the answer uses the memories (megamem.answer), by default the library's own."""

    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(None, max_length=200)
    agent_id: str | None = Field(None, max_length=200)
    top_k: int | None = Field(None, ge=1, le=64)
    threshold: float | None = Field(None, ge=-1e6, le=1e6)
    mode: Mode = DEFAULT_MODE
    ids: list[str] | None = Field(None, max_length=64)
    filters: Filter | None = None
    disable: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)  # at most the server's cap (ServerConfig.max_tokens_cap): 400 above
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)  # one choice only: more is a 400 naming the field (routes/chat.py)
    memory: MemoryOptions | None = None
    # structured output and tools (server.formats): decoded under a grammar, so the reply is valid
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a reply holds one call, which either setting allows
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class AddMemory(BaseModel):
    """mem0's add, for one memory: its text (or messages, whose user and assistant turns are joined)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=MAX_TEXT)
    messages: list[Message] | None = Field(None, max_length=256)
    paraphrases: list[str] = Field(default_factory=list, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)
    user_id: str | None = Field(None, max_length=200)
    agent_id: str | None = Field(None, max_length=200)
    id: str | None = Field(None, max_length=128)
    replaces: list[str] = Field(default_factory=list, max_length=16)


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(max_length=MAX_TEXT)
    user_id: str | None = Field(None, max_length=200)
    agent_id: str | None = Field(None, max_length=200)
    limit: int = Field(10, ge=1, le=100)
    filters: Filter | None = None


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: str = Field(max_length=40)
    admin: bool = False
    name: str = Field("", max_length=200)


# -- mem0's hosted API (routes/mem0.py): the bodies mem0ai's MemoryClient sends. Extra fields are let through to the
# route, which refuses each one it cannot honour with a 422 naming it (mem0's options for its LLM pipeline).
Entity = Field(None, max_length=200)


class Mem0Add(BaseModel):
    """POST /v3/memories/add/: the conversation to remember; entity ids at the top level or in `filters`."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1, max_length=256)
    user_id: str | None = Entity
    agent_id: str | None = Entity
    run_id: str | None = Entity
    metadata: dict[str, Any] | None = None
    filters: dict[str, Any] | None = None
    infer: bool | None = None


class Mem0Search(BaseModel):
    """POST /v3/memories/search/."""

    model_config = ConfigDict(extra="allow")
    query: str = Field(max_length=MAX_TEXT)
    filters: dict[str, Any] | None = None
    top_k: int = Field(10, ge=1, le=100)
    threshold: float | None = Field(None, ge=-1e6, le=1e6)
    user_id: str | None = Entity
    agent_id: str | None = Entity
    run_id: str | None = Entity
    fields: list[str] | None = Field(None, max_length=64)
    rerank: bool | None = None
    keyword_search: bool | None = None
    latest_only: bool | None = None
    show_expired: bool | None = None


class Mem0List(BaseModel):
    """POST /v3/memories/ (get_all; page and page_size are query parameters)."""

    model_config = ConfigDict(extra="allow")
    filters: dict[str, Any] | None = None
    user_id: str | None = Entity
    agent_id: str | None = Entity
    run_id: str | None = Entity
    fields: list[str] | None = Field(None, max_length=64)
    latest_only: bool | None = None
    show_expired: bool | None = None


class Mem0Update(BaseModel):
    """PUT /v1/memories/{id}/: a new text, new metadata, or both."""

    model_config = ConfigDict(extra="allow")
    text: str | None = Field(None, max_length=MAX_TEXT)
    metadata: dict[str, Any] | None = None
