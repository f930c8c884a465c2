"""MemoryLLM's mechanism: the pool reads as a prefix, writes K tokens, drops at random, saves bit-exact.

Most tests run on the tiny random Llama (2 layers, 4 query heads, 2 KV heads: grouped-query attention), with a
small pool (K = 4, N = 16) so that everything fits its 96-token context; one runs on the default model itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from megamem.errors import MegamemError
from megamem.memoryllm import MemoryConfig, MemoryLLM, Pool
from megamem.memoryllm.pool import drop_order

SMALL = MemoryConfig(new_tokens=4, blocks=4, rank=4, alpha=8.0)


@pytest.fixture()
def mllm(tiny) -> MemoryLLM:
    model, tok = tiny
    return MemoryLLM(model, tok, SMALL)


def base_logits(mllm: MemoryLLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mllm.model(input_ids=ids).logits


def ids_of(mllm: MemoryLLM, text: str) -> torch.Tensor:
    return torch.tensor([mllm.tok(text, add_special_tokens=False)["input_ids"]])


def test_empty_pool_is_the_base_model(mllm):
    q = ids_of(mllm, "Who wrote the first program?")
    with torch.no_grad():
        logits = mllm.forward_read(None, q, torch.ones_like(q))
    assert torch.equal(logits, base_logits(mllm, q))
    conv = [("user", "Who wrote the first program?")]
    from megamem.model import chat_ids

    prompt = torch.tensor([chat_ids(mllm.tok, conv, generation_prompt=True)])
    with torch.no_grad():
        ref = mllm.model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=mllm.tok.pad_token_id)
    want = mllm.tok.decode(ref[0, prompt.shape[1] :], skip_special_tokens=True).strip()
    assert mllm.answer(Pool.empty(), [conv], 6) == [want]


def test_writing_leaves_the_base_model_untouched(mllm):
    q = ids_of(mllm, "Who wrote the first program?")
    before = base_logits(mllm, q)
    with torch.no_grad():
        torch.nn.init.normal_(mllm.lora_params()[1])  # a trained-looking write LoRA (B no longer zero)
    mllm.inject(Pool.empty(), "Ada Lovelace wrote the first program in 1843.")
    assert torch.equal(base_logits(mllm, q), before)  # the LoRA is on only while writing


@pytest.mark.parametrize("padded", [False, True])
def test_oracle_pool_matches_the_text_in_the_prompt(mllm, padded):
    """Layer inputs stored as the pool (no drop) read exactly like the text in the prompt: masks, positions, GQA."""
    text = torch.cat(
        [torch.tensor([[mllm.tok.bos_token_id]]), ids_of(mllm, "Ada Lovelace wrote the first program.")], 1
    )
    q = ids_of(mllm, "Who wrote it? Ada")
    with torch.no_grad():
        li = mllm.layer_inputs(text)  # (L, 1, T, d)
        kv = mllm.prefix_kv(li[:, :, 1:], start=li[:, :, :1])
        if padded:  # a batch of two: the question left-padded in one row, as generate() batches
            pad = torch.full((1, 3), mllm.filler)
            ids = torch.cat([torch.cat([pad, q], 1), torch.cat([q[:, :3], q], 1)])
            mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones_like(q)], 1), torch.ones(1, q.shape[1] + 3)])
            kv = [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in kv]
            logits = mllm.forward_read(kv, ids, mask.long())
            logits = logits[:1, 3:]
        else:
            logits = mllm.forward_read(kv, q, torch.ones_like(q))
    ref = base_logits(mllm, torch.cat([text, q], 1))[:, text.shape[1] :]
    assert torch.allclose(logits, ref, atol=1e-4), (logits - ref).abs().max()


def test_oracle_on_the_default_model(smol_dir):
    """The same on SmolLM2-135M itself (9 query heads, 3 KV heads, 30 layers)."""
    from megamem.model import load_model

    model, tok = load_model()
    mllm = MemoryLLM(model, tok)
    text = torch.tensor([[tok.bos_token_id] + tok.encode("Ada Lovelace wrote the first computer program in 1843.")])
    q = torch.tensor([tok.encode("Who wrote the first computer program? Answer:")])
    with torch.no_grad():
        li = mllm.layer_inputs(text)
        logits = mllm.forward_read(mllm.prefix_kv(li[:, :, 1:], start=li[:, :, :1]), q, torch.ones_like(q))
        ref = model(input_ids=torch.cat([text, q], 1)).logits[:, text.shape[1] :]
    assert torch.allclose(logits, ref, atol=1e-3), (logits - ref).abs().max()


def test_untrained_write_of_a_short_text_is_the_oracle(mllm):
    """With the trained parts at their start (LoRA B = 0, new-memory 0), a write stores the text's layer inputs."""
    ids = torch.tensor([mllm.pad_ids(mllm.tok("Ada wrote", add_special_tokens=False)["input_ids"])])
    assert ids.shape[1] == SMALL.new_tokens
    with torch.no_grad():
        new = mllm.write(None, ids)  # (L, 1, K, d)
        # the oracle: the layer inputs of [start, text] as the base model computes them
        h = torch.cat([mllm.start[0].view(1, 1, -1), mllm.model.model.embed_tokens(ids)], 1)
        want = []
        for li, layer in enumerate(mllm.layers):
            h = torch.cat([mllm.start[li].view(1, 1, -1), h[:, 1:]], 1)
            want.append(h[:, 1:])
            h = mllm.run_layer(layer, h)
    assert torch.allclose(new, torch.stack(want), atol=1e-5)


def test_a_write_needs_k_tokens_and_pads_short_texts(mllm):
    with pytest.raises(MegamemError, match="at least 4 tokens"):
        mllm.write(None, torch.tensor([[5, 6]]))
    assert mllm.pad_ids([5, 6]) == [mllm.filler, mllm.filler, 5, 6]
    assert mllm.pad_ids([1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]


def test_first_update_tiles_then_each_drops_k(mllm):
    pool = mllm.inject(Pool.empty(), "Ada Lovelace wrote the first program.")
    L, N, d = pool.memory.shape
    assert (L, N) == (2, SMALL.size) and pool.updates == 1
    first = pool.memory[:, : SMALL.new_tokens]
    assert torch.equal(pool.memory, first.repeat(1, SMALL.blocks, 1))
    nxt = mllm.inject(pool, "Charles Babbage designed the engine.")
    assert nxt.memory.shape == pool.memory.shape and nxt.updates == 2
    keep = drop_order(pool.seed, 1, N, SMALL.new_tokens)
    assert torch.equal(nxt.memory[:, : N - SMALL.new_tokens], pool.memory[:, keep])  # order kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_survival_after_k_updates_is_binomial(seed):
    """A token survives k updates with probability (1 - K/N)^k: the count of N survivors within 4 sigma."""
    K, N = 8, 400
    pool = Pool(memory=torch.arange(N, dtype=torch.float32).view(1, N, 1), seed=seed)
    for k in range(1, 31):
        pool = pool.updated(torch.full((1, K, 1), -1.0), size=N)
        survivors = int((pool.memory >= 0).sum())
        p = (1 - K / N) ** k
        assert abs(survivors - N * p) <= 4 * math.sqrt(N * p * (1 - p)) + 1, (k, survivors, N * p)


def test_drops_are_seeded(mllm):
    texts = ["Ada Lovelace wrote the first program.", "Babbage built the engine.", "Turing broke codes."]

    def run(seed: int) -> Pool:
        pool = Pool.empty(seed=seed)
        for t in texts:
            pool = mllm.inject(pool, t)
        return pool

    assert torch.equal(run(3).memory, run(3).memory)
    assert not torch.equal(run(3).memory, run(4).memory)


def test_pool_save_load_round_trip_is_bit_exact(mllm, tmp_path):
    pool = mllm.inject(mllm.inject(Pool.empty(seed=7), "Ada wrote the program."), "Babbage built it.")
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    back = Pool.load(path)
    assert back.updates == pool.updates and back.seed == pool.seed
    assert back.memory.dtype == pool.memory.dtype and torch.equal(back.memory, pool.memory)
    # and it goes on exactly as the unsaved pool would: the drops are derived from (seed, update)
    assert torch.equal(mllm.inject(back, "Turing broke codes.").memory, mllm.inject(pool, "Turing broke codes.").memory)
    Pool.empty().save(tmp_path / "empty.safetensors")
    assert Pool.load(tmp_path / "empty.safetensors").is_empty


def test_a_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(MegamemError, match="not a megamem MemoryLLM pool"):
        Pool.load(tmp_path / "x.safetensors")


def test_params_save_load_round_trip(mllm, tiny_dir, tmp_path):
    from megamem.model import load_model

    with torch.no_grad():
        for p in mllm.trainable():
            p.normal_()
    path = tmp_path / "params.safetensors"
    mllm.save_params(path)
    other = MemoryLLM(*load_model(str(tiny_dir)), SMALL)
    other.load_params(path)
    for a, b in zip(mllm.trainable(), other.trainable(), strict=True):
        assert torch.equal(a.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16))
    with pytest.raises(MegamemError, match="trained with"):
        MemoryLLM(*load_model(str(tiny_dir)), MemoryConfig(new_tokens=4, blocks=8, rank=4, alpha=8.0)).load_params(path)


def test_the_pool_changes_the_answer_and_the_prefix_is_cached(mllm):
    pool = mllm.inject(Pool.empty(), "Ada Lovelace wrote the first program.")
    conv = [[("user", "Who wrote the first program?")]]
    a = mllm.answer(pool, conv, 5)
    cached = mllm._prefix_cache
    assert mllm.answer(pool, conv, 5) == a and mllm._prefix_cache is cached  # one prefix per pool version
    q = ids_of(mllm, "Who wrote it?")
    with torch.no_grad():
        with_pool = mllm.forward_read(mllm._pool_kv(pool, 1), q, torch.ones_like(q))
    assert not torch.allclose(with_pool, base_logits(mllm, q))


def test_cached_decoding_matches_recomputing_every_step(mllm):
    """generate() (a static cache holding the pool's prefix) against a full read of the growing text each step."""
    from megamem.model import chat_ids

    pool = mllm.inject(mllm.inject(Pool.empty(), "Ada Lovelace wrote the first program."), "Babbage built it.")
    prompts = [
        chat_ids(mllm.tok, [("user", q)], generation_prompt=True) for q in ("Who wrote it?", "Who built the engine?")
    ]
    got = mllm.generate(pool, prompts, 6)
    kv = mllm._pool_kv(pool, 1)
    for prompt, answer in zip(prompts, got, strict=True):
        ids = list(prompt)
        for _ in range(6):
            t = torch.tensor([ids])
            with torch.no_grad():
                logits = mllm.forward_read(kv, t, torch.ones_like(t))
            nxt = int(logits[0, -1].argmax())
            if nxt in (mllm.tok.eos_token_id, mllm.tok.convert_tokens_to_ids("<|im_end|>")):
                break
            ids.append(nxt)
        assert answer == mllm.tok.decode(ids[len(prompt) :], skip_special_tokens=True).strip()
