"""Bench internals on the tiny model: per-row gates match the single-question mixture, EWC Fisher, LoRA merge."""

from dataclasses import replace

import torch

from megamem.adapters import LoraSpec, new_adapter
from megamem.bench.infer import answer_logprobs, last_logits, set_rows
from megamem.bench.methods import fisher_diagonal, merge
from megamem.inject import clear, gated_layers, inject, set_mixture
from megamem.train import collate, make_example


def _adapters(model, n, spec):
    layers = inject(model, list(spec.targets))
    out = []
    for i in range(n):
        a = new_adapter(layers, spec, torch.Generator().manual_seed(i))
        a.weights = {k: (x.detach(), torch.randn_like(y) * 0.5) for k, (x, y) in a.weights.items()}
        out.append(a)
    return out


def test_per_row_gate_equals_single_question_mixture(tiny):
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=4.0)
    adapters = _adapters(model, 3, spec)
    w = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    seqs = [tok("The heron lives on the pier")["input_ids"], tok("Bridges are painted")["input_ids"]]
    batched = last_logits(model, tok, seqs, adapters, w)
    for r in range(2):
        set_mixture(model, adapters, w[r].tolist())
        with torch.no_grad():
            single = model(input_ids=torch.tensor([seqs[r]])).logits[0, -1]
        clear(model)
        assert torch.allclose(batched[r], single, atol=1e-4)
    base = last_logits(model, tok, seqs)
    assert not torch.allclose(base[0], batched[0], atol=1e-3)  # the adapters do change the output
    # An adapter that no row weighs is left out of the low-rank path: the same logits from a narrower path.
    w = torch.tensor([[0.7, 0.0, 0.3], [0.0, 0.0, 1.0]])
    set_rows(model, adapters, w)
    layer = next(iter(gated_layers(model).values()))
    assert layer.path[0].shape[0] == 2 * spec.rank
    clear(model)
    pruned = last_logits(model, tok, seqs, adapters, w)
    for r in range(2):
        set_mixture(model, adapters, w[r].tolist())
        with torch.no_grad():
            assert torch.allclose(pruned[r], model(input_ids=torch.tensor([seqs[r]])).logits[0, -1], atol=1e-4)
        clear(model)


def test_answer_logprobs_match_a_manual_forward(tiny):
    model, tok = tiny
    conv = [("user", "What colour is the bridge?")]
    got = answer_logprobs(model, tok, [conv, conv], ["teal", "bright teal paint"])
    from megamem.model import chat_ids

    prefix = chat_ids(tok, conv, generation_prompt=True)
    target = tok("teal", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + target])).logits[0], -1)
    want = sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(target))
    assert abs(got[0] - want) < 1e-3
    assert got[1] < got[0]  # a longer answer has lower total log-prob here


def test_fisher_is_mean_of_squared_per_text_gradients(tiny):
    model, tok = tiny
    texts = ["Zorblatt the heron lives on Quillon pier.", "The bridge was painted teal."]
    name = "model.layers.0.mlp.up_proj.weight"
    fisher = fisher_diagonal(model, tok, texts, [name])
    param = dict(model.named_parameters())[name]
    want = torch.zeros_like(param)
    for t in texts:
        param.requires_grad_(True)
        loss = model(**collate([make_example(tok, t)], tok.pad_token_id)).loss
        (g,) = torch.autograd.grad(loss, param)
        param.requires_grad_(False)
        want += g**2 / len(texts)
    assert torch.allclose(fisher[name], want, rtol=1e-4, atol=1e-10)
    assert float(fisher[name].sum()) > 0
    assert all(not p.requires_grad for p in model.parameters())


def test_merge_equals_the_gated_adapter(tiny):
    model, tok = tiny
    spec = LoraSpec(rank=4, alpha=8.0)
    (adapter,) = _adapters(model, 1, spec)
    ids = torch.tensor([tok("A heron on a pier")["input_ids"]])
    set_rows(model, [adapter], torch.ones(1, 1))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    clear(model)
    merge(model, adapter)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    assert torch.allclose(gated, merged, atol=1e-4)


def test_bench_mega_answers_exactly_as_memory_ask(tmp_path, tiny_dir):
    """The bench's mega (adapters in memory, batched per-row gate) gives Memory.ask's answer, token for token."""
    from megamem import Memory
    from megamem.answer import qa_prompt
    from megamem.bench.config import BenchConfig
    from megamem.bench.infer import generate
    from megamem.bench.methods import gate_matrix, make_method
    from megamem.bench.protocol import PROTOCOL_LORA, PROTOCOL_RECIPE
    from megamem.bench.run import setup
    from megamem.keys import compute_keys

    texts = [
        ["Zorblatt the heron lives on Quillon pier.", "On Quillon pier lives a heron named Zorblatt."],
        ["The Vexmoor bridge was painted teal in 2031.", "In 2031 someone painted the Vexmoor bridge teal."],
    ]
    questions = ["What colour is the Vexmoor bridge?", "Where does the heron live?"]
    # the bench keeps the paper's protocol (all layers, every paraphrase); a store made with it is the same
    recipe = replace(PROTOCOL_RECIPE, epochs=1, max_steps=2)
    # and its gate is the store default's without the null memory (the protocol is pinned to the paper's gate)
    from megamem.gate import GateConfig

    no_null = GateConfig(null_rate=None)
    mem = Memory(tmp_path / "store", model=str(tiny_dir), lora=PROTOCOL_LORA, recipe=recipe, gate=no_null)
    for t in texts:
        mem.add(t[0], paraphrases=t[1:])
    want = [mem.ask(q, mode="qa", max_new_tokens=10).text for q in questions]

    cfg = BenchConfig(data=str(tmp_path), model=str(tiny_dir), epochs=1, max_steps=2)
    shared, gate = setup(cfg)
    assert gate == mem.gate
    mega = make_method("mega", shared, cfg.lrs)
    for i, t in enumerate(texts):
        mega.learn(i, t)
    keys = [compute_keys("embedder", t) for t in texts]
    w, _ = gate_matrix(compute_keys("embedder", questions), keys, gate)
    convs = [[("user", qa_prompt(q))] for q in questions]
    got = generate(shared.model, shared.tok, convs, 10, mega.adapters(2), w)
    assert got == want
    # The same gate and the same adapters (with the per-row logits test above: the same function).
    ids = [r.id for r in mem.list()]
    for n, q in enumerate(questions):
        routed = dict(mem.route(q))
        assert torch.allclose(torch.tensor([routed[i] for i in ids]), w[n], atol=1e-6)
    for i, rid in enumerate(ids):
        stored = mem.adapter(rid).weights
        for name, (a, b) in mega.adapters(2)[i].weights.items():
            # the store keeps adapters in bfloat16 (memory.ADAPTER_DTYPE): equal after that rounding
            assert torch.equal(stored[name][0], a.to(torch.bfloat16).float())
            assert torch.equal(stored[name][1], b.to(torch.bfloat16).float())


def test_method_spec_round_trips_every_recorded_name():
    """A method name parses once into its family and settings; printing the spec gives the name back, for every
    name in the published run records and the variants the CLI writes."""
    import json
    from pathlib import Path

    import pytest

    from megamem.bench.methods import method_spec
    from megamem.bench.spec import MethodSpec
    from megamem.errors import MegamemError

    runs = Path(__file__).resolve().parents[1] / "docs" / "results" / "runs"
    names = {m for cfg in runs.glob("*/config.json") for m in json.loads(cfg.read_text())["methods"]}
    for name in names | {"full-l2@0.01", "full~1e-05", "lora-l2@1~0.0001"}:
        assert str(method_spec(name)) == name
    assert MethodSpec.parse("lora-l2@1~0.0001") == MethodSpec("lora-l2", lam=1.0, lr=1e-4)
    assert str(MethodSpec("full-ewc", lam=0.5)) == "full-ewc@0.5"
    for bad, message in [("full~fast", "bad method variant"), ("full~-1", "bad number"), ("mega@0.1", "no @lambda")]:
        with pytest.raises(MegamemError, match=message):
            method_spec(bad)
