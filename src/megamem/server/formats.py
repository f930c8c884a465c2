"""What a chat asks its answer to look like, and the answer read back in that shape.

OpenAI's `response_format` (json_object, json_schema) and `tools` (with `tool_choice`) become two things: an
instruction the model reads (a system turn: the schema, or the tools and how to call one) and a grammar the
engine decodes under (megamem.grammar), so the reply is valid whatever the model's skill. A reply under tools is
read back as `tool_calls` (OpenAI's shape, arguments a JSON string) when it is a call, as content when it is text.

Limits: one tool call per reply (OpenAI's parallel_tool_calls allows one as well); the legacy `functions` /
`function_call` fields are refused (a 400 that says to send `tools`); a tool's `strict` changes nothing, since
every call is decoded under its schema anyway. The model sees the tools as JSON in a system turn (megamem's
models have no tool-aware chat template to pass them to).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..answer import Turn
from ..grammar import GrammarError, Grammars
from .errors import ApiError

NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's function and schema names


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    name: str = Field(pattern=NAME)


class NamedTool(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedTool


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME)
    description: str | None = Field(None, max_length=10_000)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


@dataclass
class Format:
    """What a chat's answer must be: an instruction for the model, the grammar it is decoded under, and whether
    it is read back as a tool call (tools: the request's functions by name)."""

    instruction: str | None = None
    grammar: str | None = None
    tools: dict[str, Function] | None = None

    def turns(self, turns: list[Turn]) -> list[Turn]:
        """The conversation with the instruction in its system turn (added to the first if it has one)."""
        if not self.instruction:
            return turns
        if turns and turns[0][0] == "system":
            return [("system", f"{turns[0][1]}\n\n{self.instruction}".strip()), *turns[1:]]
        return [("system", self.instruction), *turns]


def requested(
    grammars: Grammars,
    response_format: ResponseFormat | None,
    tools: list[Tool] | None,
    tool_choice: ToolChoice | None,
) -> Format:
    """The Format a request asks for; 400 naming the field for a schema that cannot be compiled, a tool_choice
    naming no given tool, or both tools and a JSON response_format (an answer cannot be both)."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise ApiError(400, "tool_choice needs tools: send the tools it may call", param="tool_choice")
    json_format = response_format is not None and response_format.type != "text"
    if tools and choice != "none":
        if json_format:
            raise ApiError(400, "send either tools or a JSON response_format, not both", param="response_format")
        return _tool_format(grammars, tools, choice)
    if not json_format:
        return Format()
    if response_format.type == "json_object":
        return Format("Reply with only a JSON object.", _compiled(grammars.json_object, "response_format"))
    if response_format.json_schema is None:
        raise ApiError(400, "response_format json_schema needs its json_schema", param="response_format")
    spec = response_format.json_schema
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    schema = closed(schema) if spec.strict else schema
    grammar = _compiled(lambda: grammars.json_schema(schema), "response_format")
    about = f" ({spec.description})" if spec.description else ""
    instruction = f"Reply with only a JSON value named {spec.name}{about} matching this JSON schema:\n"
    return Format(instruction + json.dumps(schema), grammar)


def _tool_format(grammars: Grammars, tools: list[Tool], choice: ToolChoice) -> Format:
    """tools with tool_choice auto (a call or text), required (a call of any) or named (a call of that one)."""
    by_name = {t.function.name: t.function for t in tools}
    if len(by_name) < len(tools):
        raise ApiError(400, "tools: two tools have the same name", param="tools")
    callable_ = list(by_name.values())
    if isinstance(choice, NamedTool):
        if choice.function.name not in by_name:
            raise ApiError(
                400, f"tool_choice names {choice.function.name!r}, which is not among the tools", param="tool_choice"
            )
        callable_ = [by_name[choice.function.name]]
    specs = [{"name": f.name, "parameters": closed(f.parameters) if f.strict else f.parameters} for f in callable_]
    grammar = _compiled(lambda: grammars.tool_call(specs, text_allowed=choice == "auto"), "tools")
    listed = json.dumps(
        [{"name": f.name, "description": f.description or "", "parameters": f.parameters or {}} for f in callable_]
    )
    how = 'To call a tool, reply with only a JSON object: {"name": <the tool\'s name>, "arguments": <its arguments>}.'
    if choice == "auto":
        how += " Call a tool only if it helps; otherwise answer in plain text."
    else:
        how = how.replace("To call a tool, reply", "Reply")
    return Format(f"You can call these tools:\n{listed}\n{how}", grammar, by_name)


MAPS = ("properties", "patternProperties", "$defs", "definitions")  # keywords holding name -> schema
LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")  # keywords holding [schema, ...]
ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")  # keywords holding a schema


def closed(schema: Any) -> Any:
    """A strict schema as OpenAI's strict mode reads it: an object that does not say whether it takes other
    properties takes none (plain JSON Schema would allow any, and a small model wanders into them).

    >>> closed({"type": "object", "properties": {"a": {"type": "object"}}})["properties"]["a"]
    {'type': 'object', 'additionalProperties': False}
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: closed(sub) for name, sub in out[k].items()}
    for k in LISTS:
        if isinstance(out.get(k), list):
            out[k] = [closed(sub) for sub in out[k]]
    for k in ONE:
        if isinstance(out.get(k), dict):
            out[k] = closed(out[k])
    kind = out.get("type")
    if (kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out) and (
        "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _compiled(compile_: Any, param: str) -> str:
    try:
        return compile_()
    except GrammarError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def reply(text: str, fmt: Format, finish_reason: str) -> tuple[dict, str]:
    """The assistant message and finish_reason of a reply: a tool call (finish_reason "tool_calls") when the
    request had tools and the reply is a whole call, else the text as content."""
    call = tool_call(text, fmt)
    if call is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


def tool_call(text: str, fmt: Format) -> dict | None:
    """The OpenAI tool call a reply under tools is, or None (text, or a call cut short by max_tokens)."""
    if fmt.tools is None or not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in fmt.tools:
        return None
    arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }


def call_text(tool_calls: list[dict]) -> str:
    """An assistant turn's tool calls as the model was told to write them (so history reads as it decodes)."""
    calls = []
    for c in tool_calls:
        fn = c.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = fn.get("arguments")
        calls.append(json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False))
    return "\n".join(calls)
