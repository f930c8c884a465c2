"""The clients people already use, against a live server on the tiny model (issue 26, items 3 and 6): LangChain's
ChatOpenAI, litellm and LlamaIndex's OpenAILike, each as a user would point it at `megamem serve`, and every
snippet of docs/integrations.md (the openai SDK's among them), run as written.

The doc's snippets. Rule: a ```python block right after a `<!-- snippet: NAME -->` line is run here; every other
python block outside the doc's "## MCP" section is an error (tests/test_mcp.py runs the MCP section's own snippet).
Each "## " section's snippets run in order in one namespace, which starts as the "shared" snippet left it, with
KEY set to a key and http://127.0.0.1:8000 replaced by the live server's address; then CHECKS[NAME] looks at
what the snippet made (and at the prompts it sent the engine), so a snippet that runs but no longer does what the
doc says fails. The doc's table of refused fields is sent row by row as written.

The tiny model's free text is gibberish and its strings and numbers never end on their own, so every schema here
bounds them (maxLength, minimum/maximum, enums), and forced tool calls use tool_choice "required" (LangChain's
"any") or the tool's name: under "auto" the tiny model writes text. Nothing may reach past loopback: a guard on
name lookups records (and refuses) any other host, litellm's import included (LITELLM_LOCAL_MODEL_COST_MAP keeps
it from fetching its price map from GitHub).
"""

from __future__ import annotations

import functools
import json
import operator
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field
from serverlib import TIME, WEATHER, LiveServer, make_server_store

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: its local price map

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
SNIPPET = re.compile(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", re.S)
LOOPBACK = {"127.0.0.1", "localhost", "::1", "None"}
DOC_URL = "http://127.0.0.1:8000"
TOOL_RESULT = "-41 °C, blizzard"
QUESTION = "Where does Zorblatt live?"
ASK = "What is the weather in Oslo?"
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


class Reading(BaseModel):
    """A reading of the weather."""

    city: Literal["Oslo", "Paris"]
    temp: int = Field(ge=-50, le=50)


@dataclass
class Live:
    url: str
    key: str
    srv: Any  # megamem.server.runtime.Server


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Every host name looked up during the module that is not loopback (each refused with an OSError)."""
    reached: list[str] = []
    real = socket.getaddrinfo

    def guarded(host, *args, **kw):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in LOOPBACK:
            reached.append(name)
            raise OSError(f"tests/test_clients.py allows no network beyond loopback (asked for {name})")
        return real(host, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", guarded)
        yield reached
    assert reached == [], f"a client looked up {reached}"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store, keys = make_server_store(tmp_path_factory.mktemp("clients"))
    server = LiveServer(store, worker=False)
    url = server.__enter__()
    try:
        yield Live(url, keys["acme"], server.app.state.server)
    finally:
        server.__exit__(None, None, None)


@pytest.fixture()
def prompts(live, monkeypatch) -> list[str]:
    """The decoded prompt of every engine request the server makes during the test, in order."""
    engine = live.srv.engine
    assert engine.idle.wait(30)
    seen: list[str] = []
    real = engine.submit

    def submit(*args, **kw):
        req = real(*args, **kw)
        seen.append(engine.tok.decode(req.prompt))
        return req

    monkeypatch.setattr(engine, "submit", submit)
    return seen


def test_litellm_is_imported_without_the_network(offline):
    """litellm fetches its model price map from GitHub at import unless LITELLM_LOCAL_MODEL_COST_MAP is set."""
    if "litellm" in sys.modules:
        pytest.skip("litellm was imported before this module's network guard")
    with pytest.raises(OSError):  # the guard works: refused and recorded
        socket.getaddrinfo("example.com", 443)
    assert offline.pop(0) == "example.com"
    import litellm

    assert litellm.model_cost and offline == []


# -- LangChain --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_openai(live):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=live.url + "/v1", api_key=live.key, model="megamem", max_tokens=48, max_retries=0)


def test_langchain_invoke_and_stream_give_the_same_answer(chat_openai):
    short = chat_openai.bind(max_tokens=12)
    answer = short.invoke(QUESTION)
    chunks = list(short.stream(QUESTION))
    assert answer.response_metadata["finish_reason"] == "length" and answer.usage_metadata["output_tokens"] == 12
    assert len([c for c in chunks if c.content]) > 1  # streamed piece by piece, not in one go
    assert "".join(c.content for c in chunks) == answer.content  # greedy: the same text


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_a_valid_object(chat_openai, method):
    structured = chat_openai.with_structured_output(Reading, method=method, strict=True, include_raw=True)
    out = structured.invoke(ASK)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Reading), out
    raw = out["raw"]
    if method == "function_calling":  # a tool call of the schema's name, not text that happens to parse
        assert [c["name"] for c in raw.tool_calls] == ["Reading"] and raw.response_metadata["finish_reason"] == (
            "tool_calls"
        )
    else:
        jsonschema.validate(json.loads(raw.content), Reading.model_json_schema())


@pytest.mark.parametrize("choice", ["any", "required", "get_time"])
def test_langchain_bind_tools_gives_a_call_matching_the_tools_schema(chat_openai, choice):
    ai = chat_openai.bind_tools([WEATHER, TIME], tool_choice=choice).invoke(ASK)
    (call,) = ai.tool_calls
    assert not ai.invalid_tool_calls and ai.response_metadata["finish_reason"] == "tool_calls"
    jsonschema.validate(call["args"], PARAMETERS[call["name"]])
    if choice == "get_time":
        assert call["name"] == "get_time"


def test_langchain_streams_a_whole_tool_call(chat_openai):
    chunks = list(chat_openai.bind_tools([WEATHER], tool_choice="any").stream(ASK))
    whole = functools.reduce(operator.add, chunks)
    (call,) = whole.tool_calls
    assert call["name"] == "get_weather" and not whole.invalid_tool_calls
    jsonschema.validate(call["args"], PARAMETERS["get_weather"])
    assert not whole.content  # no half call streamed as text


def test_a_langchain_tool_message_reaches_the_model(chat_openai, prompts):
    """The round trip: a forced call, the tool's result as a ToolMessage, and the answer, whose prompt holds the
    question, the call as the model wrote it and the result, in that order."""
    from langchain_core.messages import HumanMessage, ToolMessage

    ask = [HumanMessage(ASK)]
    ai = chat_openai.bind_tools([WEATHER], tool_choice="get_weather").invoke(ask)
    (call,) = ai.tool_calls
    reply = chat_openai.bind(max_tokens=8).invoke([*ask, ai, ToolMessage(TOOL_RESULT, tool_call_id=call["id"])])
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] == 8
    prompt = prompts[-1]
    written = json.dumps({"name": "get_weather", "arguments": call["args"]}, ensure_ascii=False)
    assert prompt.index(ASK) < prompt.index(written) < prompt.index(TOOL_RESULT), prompt


def test_langchain_logprobs(chat_openai):
    scored = chat_openai.bind(logprobs=True, top_logprobs=2, max_tokens=5).invoke(QUESTION)
    content = scored.response_metadata["logprobs"]["content"]
    assert len(content) == scored.usage_metadata["output_tokens"] == 5
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the most likely token
    assert "".join(e["token"] for e in content) == scored.content


def test_langchain_embeddings_are_the_key_embedders(live):
    from langchain_openai import OpenAIEmbeddings

    from megamem.keys import embedder_keys

    embedder = OpenAIEmbeddings(
        base_url=live.url + "/v1", api_key=live.key, model="megamem", check_embedding_ctx_length=False, max_retries=0
    )
    texts = [QUESTION, "A teal lighthouse."]
    got = embedder.embed_documents(texts)
    assert len(got) == 2 and len(got[0]) == 384
    expected = embedder_keys(texts)
    for vector, want in zip(got, expected.tolist(), strict=True):
        assert vector == pytest.approx(want, abs=1e-5)


# -- litellm ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litellm_kw(live) -> dict:
    return {"model": "openai/megamem", "api_base": live.url + "/v1", "api_key": live.key}


def test_litellm_completion_plain_and_streamed(litellm_kw):
    import litellm

    messages = [{"role": "user", "content": QUESTION}]
    reply = litellm.completion(**litellm_kw, messages=messages, max_tokens=10)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 10
    chunks = list(litellm.completion(**litellm_kw, messages=messages, max_tokens=10, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == reply.choices[0].message.content


@pytest.mark.parametrize("as_model", [False, True], ids=["dict", "pydantic"])
def test_litellm_json_schema_reply_is_valid(litellm_kw, as_model):
    import litellm

    schema = Reading.model_json_schema() | {"additionalProperties": False}
    fmt = Reading if as_model else {"type": "json_schema", "json_schema": {"name": "reading", "schema": schema}}
    r = litellm.completion(
        **litellm_kw, messages=[{"role": "user", "content": ASK}], max_tokens=40, response_format=fmt
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("extra", [{"logit_bias": {"50": 10}}, {"temperature": 3}], ids=["400", "422"])
def test_litellm_surfaces_a_refusal_naming_the_field(litellm_kw, extra):
    import litellm

    (field,) = extra
    with pytest.raises(litellm.BadRequestError, match=field):
        litellm.completion(**litellm_kw, messages=[{"role": "user", "content": QUESTION}], max_tokens=4, **extra)


# -- LlamaIndex -------------------------------------------------------------------------------------------------------
def openai_like(live: Live, **kw):
    from llama_index.llms.openai_like import OpenAILike

    kw = {"temperature": 0, "max_tokens": 40, "max_retries": 0} | kw
    return OpenAILike(model="megamem", api_base=live.url + "/v1", api_key=live.key, is_chat_model=True, **kw)


def test_llamaindex_chat_and_stream_chat_give_the_same_answer(live):
    from llama_index.core.llms import ChatMessage

    llm = openai_like(live, max_tokens=10)
    question = [ChatMessage(role="user", content=QUESTION)]
    reply = llm.chat(question)
    assert reply.raw.choices[0].finish_reason == "length" and reply.raw.usage.completion_tokens == 10
    deltas = [r.delta for r in llm.stream_chat(question) if r.delta]
    assert len(deltas) > 1 and "".join(deltas) == reply.message.content


def test_llamaindex_structured_predict_through_tools(live):
    """With is_function_calling_model=True a valid object; without it LlamaIndex sends tool_choice "required" and
    no tools, which the server refuses naming tool_choice (as docs/integrations.md says)."""
    import openai
    from llama_index.core.prompts import PromptTemplate

    prompt = PromptTemplate("What is the weather in {city}?")
    assert isinstance(
        openai_like(live, is_function_calling_model=True).structured_predict(Reading, prompt, city="Oslo"), Reading
    )
    with pytest.raises(openai.BadRequestError) as err:
        openai_like(live).structured_predict(Reading, prompt, city="Oslo")
    assert err.value.body["param"] == "tool_choice"


# -- docs/integrations.md ---------------------------------------------------------------------------------------------
def doc_sections() -> dict[str, list[tuple[str, str]]]:
    """The doc's marked snippets by the "## " section they are in, in order: {section: [(name, code)]}."""
    text = DOCS.read_text()
    out: dict[str, list[tuple[str, str]]] = {}
    for m in SNIPPET.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: m.start()], re.M)
        out.setdefault(headings[-1] if headings else "", []).append((m.group(1), m.group(2)))
    return out


def shared_snippet() -> tuple[str, str]:
    """The doc's "shared" snippet: (name, code)."""
    (shared,) = [s for found in doc_sections().values() for s in found if s[0] == "shared"]
    return shared


def run_snippet(name: str, code: str, ns: dict, live: Live | None = None) -> None:
    """Run a snippet in ns, against the live server."""
    code = code.replace(DOC_URL, live.url) if live else code
    exec(compile(code, f"{DOCS}:{name}", "exec", dont_inherit=True), ns)  # not this module's __future__


def valid_args(arguments: str | dict, tool: dict) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, tool["function"]["parameters"])


def check_shared(ns: dict, prompts: list[str]) -> None:
    jsonschema.Draft202012Validator.check_schema(ns["weather_tool"]["function"]["parameters"])
    assert issubclass(ns["Weather"], BaseModel) and ns["get_weather"]("Oslo") == TOOL_RESULT


def check_openai_chat(ns: dict, prompts: list[str]) -> None:
    reply = ns["reply"]
    assert reply.model_extra["memory"] == {"selected": []}  # the store is empty: nothing was selected
    assert "".join(ns["pieces"]) == reply.choices[0].message.content
    assert ns["usage"].completion_tokens == reply.usage.completion_tokens == 32


def check_openai_parse(ns: dict, prompts: list[str]) -> None:
    assert isinstance(ns["weather"], ns["Weather"]) and ns["parsed"].choices[0].finish_reason == "stop"
    assert isinstance(json.loads(ns["anything"].choices[0].message.content), dict)


def check_openai_tools(ns: dict, prompts: list[str]) -> None:
    first = ns["first"].choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    assert ns["call"].function.name == "get_weather"
    valid_args(ns["call"].function.arguments, ns["weather_tool"])
    final = ns["final"].choices[0].message
    assert final.content is not None or final.tool_calls
    assert TOOL_RESULT in prompts[-1] and ns["call"].function.arguments in prompts[-1]  # the call and its result


def check_openai_logprobs(ns: dict, prompts: list[str]) -> None:
    content = ns["scored"].choices[0].logprobs.content
    assert len(content) == ns["scored"].usage.completion_tokens == 8
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert [len(d.embedding) for d in ns["embedded"].data] == [384, 384]


def check_openai_refused(ns: dict, prompts: list[str]) -> None:
    assert ns["refused"]["param"] == "frequency_penalty" and ns["refused"]["code"] == "unsupported_parameter"
    assert prompts == []  # refused before anything was decoded


def check_langchain_chat(ns: dict, prompts: list[str]) -> None:
    assert ns["streamed"] == ns["answer"].content and ns["answer"].usage_metadata["output_tokens"] == 32
    assert len(ns["tokens"]) == 32 and all(len(t["top_logprobs"]) == 3 for t in ns["tokens"])


def check_langchain_structured(ns: dict, prompts: list[str]) -> None:
    assert isinstance(ns["by_schema"], ns["Weather"]) and isinstance(ns["by_tool"], ns["Weather"])


def check_langchain_tools(ns: dict, prompts: list[str]) -> None:
    assert ns["call"]["name"] == "get_weather" and ns["ai"].response_metadata["finish_reason"] == "tool_calls"
    valid_args(ns["call"]["args"], ns["weather_tool"])
    assert isinstance(ns["reply"].content, str) and TOOL_RESULT in prompts[-1]


def check_langchain_embeddings(ns: dict, prompts: list[str]) -> None:
    assert len(ns["vector"]) == 384 and all(isinstance(x, float) for x in ns["vector"])


def check_litellm(ns: dict, prompts: list[str]) -> None:
    assert ns["streamed"] == ns["reply"].choices[0].message.content and ns["reply"].usage.completion_tokens == 32
    assert isinstance(ns["weather"], ns["Weather"])
    assert ns["call"].function.name == "get_weather" and ns["called"].choices[0].finish_reason == "tool_calls"
    valid_args(ns["call"].function.arguments, ns["weather_tool"])
    content = ns["scored"].choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 3 for t in content)
    assert len(ns["embedded"].data[0]["embedding"]) == 384


def check_llamaindex(ns: dict, prompts: list[str]) -> None:
    assert ns["streamed"] == ns["reply"].message.content
    assert isinstance(ns["weather"], ns["Weather"])
    assert ns["selection"].tool_name == "get_weather"
    valid_args(ns["selection"].tool_kwargs, ns["weather_tool"])
    assert len(ns["scored"].logprobs) == 8 and all(len(top) == 3 for top in ns["scored"].logprobs)


def check_mem0(ns: dict, prompts: list[str]) -> None:
    assert ns["found"][0]["id"] == ns["memory_id"] and "salmon" in ns["found"][0]["memory"]  # searched at once
    assert ns["page"]["count"] == 1 and ns["page"]["results"][0]["user_id"] == "ann"
    assert [e["event"] for e in ns["events"]] == ["ADD", "UPDATE"] and "tuna" in ns["events"][-1]["new_memory"]
    assert ns["client"].get_all(filters={"user_id": "ann"})["count"] == 0  # deleted


CHECKS: dict[str, Callable[[dict, list[str]], None]] = {
    "shared": check_shared,
    "openai-chat": check_openai_chat,
    "openai-parse": check_openai_parse,
    "openai-tools": check_openai_tools,
    "openai-logprobs": check_openai_logprobs,
    "openai-refused": check_openai_refused,
    "langchain-chat": check_langchain_chat,
    "langchain-structured": check_langchain_structured,
    "langchain-tools": check_langchain_tools,
    "langchain-embeddings": check_langchain_embeddings,
    "litellm": check_litellm,
    "llamaindex": check_llamaindex,
    "mem0": check_mem0,
}


def test_every_python_block_of_the_doc_is_run_and_checked():
    """Each python block outside the MCP section is a marked snippet, and each snippet has a check."""
    text = DOCS.read_text()
    outside_mcp = re.sub(r"^## MCP\n.*?(?=^## |\Z)", "", text, flags=re.S | re.M)
    fences = re.findall(r"^```python$", outside_mcp, re.M)
    assert len(fences) == len(SNIPPET.findall(outside_mcp)), "a python block without a marker"
    names = [name for section in doc_sections().values() for name, _ in section]
    assert len(names) == len(set(names)) and set(names) == set(CHECKS)


@pytest.mark.parametrize("section", list(doc_sections()))
def test_the_docs_snippets_run(live, prompts, section):
    snippets = doc_sections()[section]
    if "shared" not in dict(snippets):  # the section starts where the shared snippet leaves off
        snippets = [shared_snippet(), *snippets]
    ns: dict = {"KEY": live.key, "__name__": "docs"}
    for name, code in snippets:
        start = len(prompts)
        run_snippet(name, code, ns, live)
        CHECKS[name](ns, prompts[start:])


def refusal_rows() -> list[tuple[dict, int, str]]:
    """The doc's table of refused requests: (the request's fields, status, param), WEATHER being the shared
    snippet's weather_tool."""
    ns: dict = {}
    run_snippet(*shared_snippet(), ns)
    row = re.compile(r"^\| `(\{.*\})`(?: \(.*?\))? \| (\d{3}) \| `(\w+)` \|$", re.M)
    out = []
    for fields, status, param in row.findall(DOCS.read_text()):
        out.append((json.loads(fields.replace("WEATHER", json.dumps(ns["weather_tool"]))), int(status), param))
    return out


def test_the_docs_refusals_are_what_the_server_answers(live):
    """Each row of the doc's table, sent as written: its status, naming its field; every field the chat route
    refuses as not honoured is a row, with code unsupported_parameter."""
    from megamem.server.routes.chat import NOT_HONOURED

    rows = refusal_rows()
    assert len(rows) == DOCS.read_text().count("\n| `{")  # no row the pattern missed
    assert {param for _, _, param in rows} >= set(NOT_HONOURED)
    base = {"model": "megamem", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    for fields, status, param in rows:
        r = httpx.post(
            live.url + "/v1/chat/completions",
            json=base | fields,
            headers={"Authorization": f"Bearer {live.key}"},
            timeout=60,
        )
        assert (r.status_code, r.json()["error"]["param"]) == (status, param), (fields, r.text)
        if param in NOT_HONOURED:
            assert r.json()["error"]["code"] == "unsupported_parameter", r.text


def test_nothing_reached_past_loopback(offline):
    """Every client above talked to the live server only (this runs last in the module)."""
    assert offline == []
