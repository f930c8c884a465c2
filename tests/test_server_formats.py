"""Structured output, tools and logprobs, honoured (issue 26, item 3): through the real openai client against a
live server on the tiny model, and in the engine, where each row of a batch has its own grammar.

The tiny model's free text is never JSON (it writes newlines), so a reply that parses proves the grammar did it.
Its numbers and strings never end on their own either, so the schemas here bound them (maxLength, minimum and
maximum, enums), as a real model does not need.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from faultlib import make_tiny_model
from pydantic import BaseModel, Field
from serverlib import TIME, WEATHER, LiveServer, make_server_store

from megamem.grammar import GrammarError, Grammars
from megamem.model import chat_ids, load_model
from megamem.server.engine import Engine
from megamem.server.formats import Format, tool_call

READING = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "temp": {"type": "integer", "minimum": -50, "maximum": 50},
        "sky": {"enum": ["clear", "cloudy", "snow"]},
    },
    "required": ["city", "temp", "sky"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


class Reading(BaseModel):
    city: Literal["Oslo", "Paris"]
    temp: int = Field(ge=-50, le=50)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store, keys = make_server_store(tmp_path_factory.mktemp("formats"))
    server = LiveServer(store, worker=False)
    url = server.__enter__()
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key=keys["acme"], max_retries=0), url, keys
    finally:
        server.__exit__(None, None, None)


def test_a_json_schema_reply_is_valid_where_the_free_reply_is_not_json(live):
    client, _, _ = live
    fmt = {"type": "json_schema", "json_schema": {"name": "reading", "schema": READING, "strict": True}}
    r = client.chat.completions.create(model="megamem", messages=ASK, max_tokens=60, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), READING)
    free = client.chat.completions.create(model="megamem", messages=ASK, max_tokens=60)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # the constraint, not the model, made the JSON


def test_json_object_and_parse(live):
    client, _, _ = live
    r = client.chat.completions.create(
        model="megamem", messages=ASK, max_tokens=40, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model="megamem", messages=ASK, max_tokens=40, response_format=Reading)
    assert isinstance(parsed.choices[0].message.parsed, Reading)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_required_or_named_tool_choice_is_a_call_matching_the_tools_schema(live, choice):
    client, _, _ = live
    r = client.chat.completions.create(
        model="megamem", messages=ASK, max_tokens=60, tools=[WEATHER, TIME], tool_choice=choice
    )
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(choice, dict):
        assert call.function.name == "get_time"


def test_auto_is_a_whole_call_or_text(live):
    client, _, _ = live
    for question in ["What is the weather in Oslo?", "Say hello.", "What time is it?"]:
        r = client.chat.completions.create(
            model="megamem", messages=[{"role": "user", "content": question}], max_tokens=30, tools=[WEATHER, TIME]
        )
        m = r.choices[0].message
        if m.tool_calls:
            assert m.content is None and r.choices[0].finish_reason == "tool_calls"
            json.loads(m.tool_calls[0].function.arguments)
        else:
            assert not m.content.lstrip().startswith("{")


def test_a_streamed_tool_call_arrives_whole_in_one_delta(live):
    client, _, _ = live
    stream = client.chat.completions.create(
        model="megamem", messages=ASK, max_tokens=60, tools=[WEATHER], tool_choice="required", stream=True
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    assert not any(c.choices[0].delta.content for c in chunks)  # no half call streamed as text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_logprobs_are_each_tokens_with_the_most_likely(live):
    client, _, _ = live
    r = client.chat.completions.create(model="megamem", messages=ASK, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
    stream = client.chat.completions.create(model="megamem", messages=ASK, max_tokens=6, logprobs=True, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # top_logprobs not asked: none


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"store": True}, "store"),
        ({"verbosity": "low"}, "verbosity"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(live, extra, param):
    client, _, _ = live
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="megamem", messages=ASK, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param, err.value.body


def test_an_openai_api_the_server_does_not_serve_says_so(live):
    client, _, _ = live
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="megamem", input="Hi")
    assert "Responses API is not served" in err.value.body["message"] and err.value.body["code"] == "not_served"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="megamem", prompt="Hi")
    assert "/v1/chat/completions" in err.value.body["message"]


def test_a_part_that_is_not_text_is_refused(live):
    client, _, _ = live
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="megamem", messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
        )
    assert err.value.body["param"] == "messages" and "image_url" in err.value.body["message"]


def test_a_strict_schema_closes_its_objects(live):
    """strict: an object that does not say whether it takes other properties takes none (OpenAI's strict mode),
    so the tiny model, which wanders into extra keys under plain JSON Schema, writes only the declared one."""
    client, _, _ = live
    schema = {"type": "object", "properties": {"sky": {"enum": ["clear", "snow"]}}, "required": ["sky"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="megamem", messages=ASK, max_tokens=30, response_format=fmt)
    assert list(json.loads(r.choices[0].message.content)) == ["sky"]
    tool = {"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}
    r = client.chat.completions.create(
        model="megamem", messages=ASK, max_tokens=30, tools=[tool], tool_choice="required"
    )
    assert list(json.loads(r.choices[0].message.tool_calls[0].function.arguments)) == ["sky"]


def test_a_malformed_tool_is_refused_in_openais_shape(live):
    _, url, keys = live
    body = {"model": "megamem", "messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys['acme']}"})
    assert r.status_code in (400, 422) and r.json()["error"]["param"], r.text


# -- the engine: a grammar per row ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(str(make_tiny_model(tmp_path_factory.mktemp("grammar") / "model", context=512)))


def test_each_row_of_a_batch_follows_its_own_grammar(tiny_model):
    """Four rows in one batch: three schemas and none; each constrained row is valid, and the free
    row decodes the same text as alone (a neighbour's grammar never masks it)."""
    model, tok = tiny_model
    grammars = Grammars(tok, model.get_output_embeddings().weight.shape[0], [tok.eos_token_id])
    other = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    word = {"enum": ["yes", "no"]}
    prompt = chat_ids(tok, [("user", "Reply.")], generation_prompt=True)
    engine = Engine(model, tok, window_s=0.5)
    engine.start()
    try:
        alone = engine.submit(prompt, [], [], max_tokens=40)
        assert alone.done.wait(60)
        specs = [READING, other, word, None]
        rows = [
            engine.submit(
                prompt, [], [], max_tokens=60, constraint=grammars.constraint(grammars.json_schema(s)) if s else None
            )
            for s in specs
        ]
        for r in rows:
            assert r.done.wait(120)
    finally:
        engine.stop_flag.set()
        engine.join(10)
    for schema, r in zip(specs[:3], rows[:3], strict=True):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
    assert rows[3].text[:20] == alone.text[:20]  # 40 vs 60 tokens: the same start


def test_a_schema_llguidance_cannot_compile_is_an_error_naming_it(tiny_model):
    model, tok = tiny_model
    grammars = Grammars(tok, model.get_output_embeddings().weight.shape[0], [tok.eos_token_id])
    with pytest.raises(GrammarError, match="foo"):
        grammars.json_schema({"type": "foo"})


def test_a_reply_is_read_back_as_a_call_only_when_it_is_a_whole_one():
    from megamem.server.formats import Function

    fmt = Format(tools={"f": Function(name="f")})
    assert tool_call('{"name": "f", "arguments": {"a": 1}}', fmt)["function"]["arguments"] == '{"a": 1}'
    assert tool_call('{"name": "f", "arguments": {"a": ', fmt) is None  # cut by max_tokens: text
    assert tool_call('{"name": "g", "arguments": {}}', fmt) is None  # not one of the tools
    assert tool_call("plain text", fmt) is None
    assert tool_call('{"name": "f", "arguments": {}}', Format()) is None  # no tools asked: content
