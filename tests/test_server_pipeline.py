"""The server and the library are one product: for the same store, question and mode, a chat completion from a
live server (the real `openai` client, streamed and not) and `Memory.ask` answer with the same greedy text, in
every mode of the answer pipeline (megamem.answer), with the default mode the same on both sides.

The store is the tests' tiny random model (with an untied output head, so that it talks) with memories in a
tenant's namespace ("acme") and that namespace's cortex (one memory consolidated into it), so the equality
covers the gate scoped to a namespace, the cortex mixed at weight 1, the context modes' passage, irag's two
steps and the min-weight rule. The tiny model answers gibberish, but gibberish that depends on every prompt
token and every mixture weight: the test checks that the memories do change the answers, so equal texts are
not equal by accident.
"""

from __future__ import annotations

import openai
import pytest
from faultlib import make_tiny_model
from serverlib import LiveServer, make_cortex, make_server_store, quick_recipe

from megamem import Item, Memory, schema
from megamem.answer import DEFAULT_MODE, MODES

NAMESPACE = "acme"
MEMORIES = {
    "bridge": "In 2031 the Vexmoor bridge was painted teal by Ida Carrow.",
    "lighthouse": "The Harlow Point lighthouse keeper, Mara Quell, feeds three grey cats every dawn.",
    "bakery": "Pell's bakery on Orchard Lane sells rye loaves shaped like owls every Friday.",
    "comet": "Astronomers at Kestrel Observatory named the comet K-77 Brightwing in 2029.",
}
CONSOLIDATED = ["comet"]  # lives in acme's cortex only: its adapter is retired from the gate
QUESTIONS = [
    "What colour is the Vexmoor bridge?",
    "What animals does the Harlow Point lighthouse keeper feed?",
    "What is comet K-77 called?",
]
TOKENS = 12  # the same cap on both sides: ask's max_new_tokens, chat's max_tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the openai client as acme, a library Memory on the same store): acme's memories learned, one of them
    consolidated into acme's cortex, then a live server on the store."""
    root = tmp_path_factory.mktemp("pipeline")
    # its own output head: the tied tiny model answers "\n" to everything, which would make every text "" on
    # both sides (faultlib.make_tiny_model)
    store, keys = make_server_store(root, make_tiny_model(root / "model", context=512, tied=False))
    mem = Memory(store, recipe=quick_recipe())
    mem.add_many(
        [
            Item(text, id=schema.stored_id(NAMESPACE, mid), reserved={schema.NAMESPACE: NAMESPACE})
            for mid, text in MEMORIES.items()
        ]
    )
    make_cortex(store, NAMESPACE, CONSOLIDATED, keep_adapters=False)
    mem = Memory(store)  # a fresh one: it reads the store as the consolidation left it
    assert mem.cortex(NAMESPACE) is not None and mem.cortex() is None
    # kept (text and keys) with its adapter retired: the gate routes to it and acme's cortex answers for it
    assert sorted(schema.api_id(r) for r in mem.list()) == sorted(MEMORIES)
    assert [schema.api_id(r) for r in mem.list() if schema.is_consolidated(r)] == CONSOLIDATED
    with LiveServer(store) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=keys[NAMESPACE], max_retries=0, timeout=120)
        yield client, mem


def chat(client: openai.OpenAI, question: str, mode: str | None, stream: bool) -> tuple[str, list[str]]:
    """The server's answer to one question (mode None: the server's default) and the memories it selected."""
    extra = {"memory": {"mode": mode}} if mode is not None else None
    messages = [{"role": "user", "content": question}]
    kw = {"model": "megamem", "messages": messages, "max_tokens": TOKENS, "extra_body": extra}
    if not stream:
        resp = client.chat.completions.create(**kw)
        return resp.choices[0].message.content, [s["id"] for s in resp.model_extra["memory"]["selected"]]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    selected = [s["id"] for s in chunks[0].model_extra["memory"]["selected"]]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), selected


@pytest.mark.parametrize("mode", [*MODES, None], ids=[*MODES, "default"])
def test_server_answers_as_memory_ask(served, mode):
    """Every question, streamed and not: the server's text is Memory.ask's (after .strip(), as ask strips), and
    its selected memories are ask's routed ones. mode None: neither side names one, so their defaults meet."""
    client, mem = served
    differs = 0  # answers the memories changed: the equality is not the bare model's on both sides
    for q in QUESTIONS:
        want = mem.ask(q, mode or DEFAULT_MODE, namespace=NAMESPACE, max_new_tokens=TOKENS)
        if mode is None:
            assert want == mem.ask(q, namespace=NAMESPACE, max_new_tokens=TOKENS)
        bare = mem.ask(q, mode or DEFAULT_MODE, namespace=NAMESPACE, max_new_tokens=TOKENS, use_memory=False)
        differs += bare.text != want.text
        routed = [schema.api_id(mem.show(i)) for i, _ in want.gate]
        for stream in (False, True):
            text, selected = chat(client, q, mode, stream)
            assert text.strip() == want.text, (mode, q, stream, text, want.text)
            assert selected == routed, (mode, q, stream)
    assert differs > 0, mode  # the mixture (a gated memory or the cortex) changed at least one answer


def test_the_store_has_what_the_equality_covers(served):
    """Some question routes to a memory, and the consolidated one's question is answered with the cortex (at the
    weight the gate gives the memory it stands in for)."""
    _, mem = served
    assert any(mem.route(q, only=mem.owned_by(NAMESPACE)) for q in QUESTIONS)
    g = mem.gated("What is comet K-77 called?", "qa", only=mem.owned_by(NAMESPACE), namespace=NAMESPACE)
    weights = {i: w for i, _, w in g.routed}
    comet = schema.stored_id(NAMESPACE, "comet")
    cortex = mem.cortex(NAMESPACE)
    assert comet in weights and cortex in g.mixture.adapters
    assert g.mixture.weights[g.mixture.adapters.index(cortex)] == pytest.approx(weights[comet])
