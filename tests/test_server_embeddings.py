"""/v1/embeddings: the store's key embedder in OpenAI's shape, through the real openai client (issue 26, item 4)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from serverlib import LiveServer, make_server_store

from megamem.keys import embedder_keys


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store, keys = make_server_store(tmp_path_factory.mktemp("emb"))
    server = LiveServer(store, worker=False)
    url = server.__enter__()
    try:
        yield url, keys
    finally:
        server.__exit__(None, None, None)


def test_the_openai_client_embeds_with_the_key_embedder(live):
    url, keys = live
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys["acme"])
    texts = ["Where does Zorblatt the heron live?", "The Skarvik ferry crosses Lake Tessin."]
    got = client.embeddings.create(model="megamem", input=texts)  # base64 on the wire, as the client asks
    vectors = torch.tensor([d.embedding for d in got.data])
    assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens > len(texts)
    assert torch.allclose(vectors, embedder_keys(texts), atol=1e-6)  # exactly what the gate keys questions with
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    assert torch.allclose(torch.tensor(floats.data[0].embedding), vectors[0], atol=1e-6)


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"model": "megamem", "input": [[1, 2, 3]]}, 400, "input"),
        ({"model": "megamem", "input": []}, 400, "input"),
        ({"model": "megamem", "input": "  "}, 400, "input"),
        ({"model": "megamem", "input": "x", "dimensions": 64}, 400, "dimensions"),
        ({"model": "megamem", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
    ],
)
def test_what_cannot_be_honoured_is_an_error_naming_the_field(live, payload, status, param):
    url, keys = live
    r = httpx.post(url + "/v1/embeddings", json=payload, headers={"Authorization": f"Bearer {keys['acme']}"})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_embeddings_need_a_key(live):
    url, _ = live
    assert httpx.post(url + "/v1/embeddings", json={"model": "megamem", "input": "x"}).status_code == 401
