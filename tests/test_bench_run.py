"""The bench end to end on the tiny model: the run folder's files, a metric, resume after a kill, bad input,
outputs reused across steps."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from megamem.bench import evaluation
from megamem.bench import methods as bench_methods
from megamem.bench import run as bench_run
from megamem.bench.config import BenchConfig
from megamem.bench.methods import Seen, make_method
from megamem.cli import app
from megamem.errors import MegamemError
from megamem.gate import GateConfig

RECORDS = [
    {
        "theme": "Zorblatt",
        "passage": "Zorblatt the heron lives on Quillon pier.",
        "qa": [{"question": "Where does the heron Zorblatt live?", "answer": "Quillon pier"}],
        "paraphrases": ["On Quillon pier lives a heron named Zorblatt."],
    },
    {
        "theme": "Vexmoor bridge",
        "passage": "The Vexmoor bridge was painted teal in 2031.",
        "qa": [{"question": "What colour is the Vexmoor bridge?", "answer": "teal"}],
        "paraphrases": ["In 2031 someone painted the Vexmoor bridge teal."],
    },
    {
        "theme": "Ida Carrow",
        "passage": "Ida Carrow won the chess cup in Nantes.",
        "qa": [{"question": "Which cup did Ida Carrow win?", "answer": "the chess cup"}],
        "paraphrases": ["The chess cup in Nantes went to Ida Carrow."],
    },
]
METHODS = ["base", "mega", "lora"]


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "partition-00.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return folder


def bench(data, out, model, *extra, progress=False, methods=METHODS):
    args = ["bench", "--data", data, "--out", out, "--model", model, "--methods", ",".join(methods)]
    args += ["--epochs", "1", "--max-steps", "2", "--mcq-limit", "4", "--text-paragraphs", "2"]
    args += [] if progress else ["--no-progress"]
    args += ["--threads", "1"]
    return CliRunner().invoke(app, [str(a) for a in [*args, *extra]], catch_exceptions=False)


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bench_end_to_end_and_resume(tmp_path, data, tiny_dir, monkeypatch):
    out = tmp_path / "run"
    # First run: killed while testing lora after its second memory (state saved, step not closed).
    real_evaluate = bench_run.evaluate

    def dying(cfg, method, shared, part, probes, k, gate):
        if method.name == "lora" and k == 2:
            raise KeyboardInterrupt
        return real_evaluate(cfg, method, shared, part, probes, k, gate)

    monkeypatch.setattr(bench_run, "evaluate", dying)
    assert bench(data, out, tiny_dir).exit_code != 0  # click turns the interrupt into an abort
    assert {(r["method"], r["step"]) for r in rows_of(out) if r["kind"] == "step"} == {
        ("base", 1),
        ("base", 2),
        ("base", 3),
        ("mega", 1),
        ("mega", 2),
        ("mega", 3),
        ("lora", 1),
    }
    # Second run resumes: nothing already learned is learned again.
    monkeypatch.setattr(bench_run, "evaluate", real_evaluate)
    learned = []
    from megamem.bench import methods as m

    orig = m.SeqLora.learn, m.Mega.learn

    def spy(orig_learn):
        def learn(self, index, texts, on_step=None):
            learned.append((self.name, index))
            return orig_learn(self, index, texts, on_step)

        return learn

    monkeypatch.setattr(m.SeqLora, "learn", spy(orig[0]))
    monkeypatch.setattr(m.Mega, "learn", spy(orig[1]))
    r = bench(data, out, tiny_dir, progress=True)  # with the progress bars drawn
    assert r.exit_code == 0, r.output
    assert "expected CPU time" in r.output
    assert learned == [("lora", 2)]  # lora's memories 1-2 were restored from its saved state

    rows = rows_of(out)
    mem_rows = [x for x in rows if x["kind"] == "memory"]
    keys = [(x["method"], x["step"], x["memory"]) for x in mem_rows]
    assert len(keys) == len(set(keys)) == len(METHODS) * (1 + 2 + 3)
    for x in mem_rows:
        assert -1 <= x["recall_cos"] <= 1 and 0 <= x["qa_acc"] <= 1 and x["logprob"] < 0
    # The embedder gate routes each question to its own memory: top-1 accuracy 1 for mega.
    assert all(x["gate_top1"] == 1.0 for x in mem_rows if x["method"] == "mega")
    assert all("gate_top1" not in x for x in mem_rows if x["method"] != "mega")
    steps = [x for x in rows if x["kind"] == "step"]
    assert all(x["kl"] == pytest.approx(0.0, abs=1e-6) for x in steps if x["method"] == "base")
    assert all(0 <= x["mcq_acc"] <= 1 for x in steps)
    assert {x["memories"] for x in steps} == {3}  # the partition's size: the report tells finished methods apart

    for name in ["config.json", "results.md", "forgetting_recall.png", "forgetting_qa.png", "general_mcq.png"]:
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["methods"] == METHODS
    table = (out / "results.md").read_text()
    for method in METHODS:
        assert f"| {method} | 1 | 3 |" in table
        # The first-memory table: memory 0's recall cosine in the state after the last memory.
        first = next(x for x in mem_rows if x["method"] == method and x["step"] == 3 and x["memory"] == 0)
        assert f"| {method} | 3 | {first['recall_cos']:.3f} | {first['qa_acc']:.3f} |" in table

    # --estimate prints the expected CPU time and writes nothing.
    r = bench(data, tmp_path / "estimate", tiny_dir, "--estimate")
    assert r.exit_code == 0 and "expected CPU time" in r.output and not (tmp_path / "estimate").exists()
    # A finished run resumes to a no-op; another config in the same folder is refused.
    assert bench(data, out, tiny_dir).exit_code == 0
    assert len(rows_of(out)) == len(rows)
    r = bench(data, out, tiny_dir, "--rank", "4")
    assert r.exit_code == 1 and "another config" in r.output
    # Another method into the same folder: only it runs; the report and config.json cover all four.
    r = bench(data, out, tiny_dir, methods=["rag"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["methods"] == [*METHODS, "rag"]
    assert len(rows_of(out)) == len(rows) + 6 + 3 and "| rag | 1 | 3 |" in (out / "results.md").read_text()


def test_finished_rows_need_no_state_and_report_covers_the_folder(tmp_path, data, tiny_dir, monkeypatch):
    """A folder holding only config.json and metrics.jsonl (a run's record, say, carried to another machine):
    finished methods are not learned again; a method whose last step is missing is learned again up to it and
    only that step is tested. The report covers rows another command appended to the folder meanwhile."""
    import shutil

    from megamem.bench import methods as m

    out = tmp_path / "run"
    assert bench(data, out, tiny_dir, methods=["mega", "lora"]).exit_code == 0
    shutil.rmtree(out / "state")
    rows = [r for r in rows_of(out) if not (r["method"] == "lora" and r["step"] == 3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    learned = []

    def spy(real):
        def learn(self, index, texts, on_step=None):
            learned.append((self.name, index))
            return real(self, index, texts, on_step)

        return learn

    monkeypatch.setattr(m.Mega, "learn", spy(m.Mega.learn))
    monkeypatch.setattr(m.SeqLora, "learn", spy(m.SeqLora.learn))
    other = tmp_path / "other"  # another command's method, written into the folder while this one runs
    assert bench(data, other, tiny_dir, methods=["rag"]).exit_code == 0
    real_run_method = bench_run._run_method

    def meanwhile(*args, **kw):
        with open(out / "metrics.jsonl", "a") as f:
            f.write((other / "metrics.jsonl").read_text())
        (other / "metrics.jsonl").write_text("")
        return real_run_method(*args, **kw)

    monkeypatch.setattr(bench_run, "_run_method", meanwhile)
    assert bench(data, out, tiny_dir, methods=["mega", "lora"]).exit_code == 0
    assert learned == [("lora", 0), ("lora", 1), ("lora", 2)]  # mega is finished; lora's state was lost
    mem = [(x["method"], x["step"], x["memory"]) for x in rows_of(out) if x["kind"] == "memory"]
    assert len(mem) == len(set(mem)) == 3 * (1 + 2 + 3)  # mega, lora and rag; nothing tested twice
    table = (out / "results.md").read_text()
    assert "| rag | 1 | 3 |" in table
    assert table.index("| rag |") < table.index("| mega |") < table.index("| lora |")  # the paper's order


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--methods", "mega,teleport"], "unknown method"),
        (["--partitions", "3"], "out of range"),
        (["--partitions", ","], "at least one partition"),
        (["--targets", "everything"], "unknown targets"),
        (["--rank", "0"], "--rank"),
        (["--methods", "full~fast"], "bad method variant"),
        (["--methods", "mega@0.1"], "takes no @lambda"),
    ],
)
def test_bench_bad_input(tmp_path, data, args, message):
    base = ["bench", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    r = CliRunner().invoke(app, base + args, catch_exceptions=False)
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and message in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_compositional(tmp_path, tiny_dir):
    """Two-passage questions: the needed passages are learned, each method answers, compositional.md is written."""
    from megamem.bench.compositional import run_compositional

    data = tmp_path / "data"
    data.mkdir()
    (data / "partition-00.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    (data / "partition-01.jsonl").write_text(json.dumps(RECORDS[2]) + "\n")
    questions = [
        {
            "question": "Where does the heron live, and what colour is the bridge?",
            "answer": "teal",
            "themes": ["Zorblatt", "Vexmoor bridge"],
        },
        {
            "question": "Who won the cup, and where does the heron live?",
            "answer": "Ida Carrow",
            "themes": ["Ida Carrow", "Zorblatt"],
        },
    ]
    cfg = BenchConfig(
        data=str(data),
        methods=["mega", "rag", "full-batch"],
        model=str(tiny_dir),
        epochs=1,
        max_steps=1,
        mcq_limit=2,
        text_paragraphs=1,
        threads=1,
    )
    out = tmp_path / "comp"
    run_compositional(cfg, out, progress=False, questions=questions)
    rows = rows_of(out)
    per = [r for r in rows if r["kind"] == "compositional"]
    assert sorted({r["method"] for r in per}) == ["full-batch", "mega", "rag"] and len(per) == 6
    assert all(r["top2_both"] == 1.0 for r in per)  # the embedder finds both named passages
    mega = [r for r in per if r["method"] == "mega"]
    assert all(0 < r["gate_on_needed"] < 1 for r in mega)  # beta 0.1: a soft mixture, never one memory
    assert all("gate_on_needed" not in r for r in per if r["method"] != "mega")  # only mega is gated
    table = (out / "compositional.md").read_text()
    assert "| mega |" in table and "| rag |" in table and "| full-batch |" in table
    assert next(line for line in table.splitlines() if line.startswith("| rag |")).endswith("| – |")
    with pytest.raises(MegamemError):
        run_compositional(cfg, tmp_path / "bad", progress=False, questions=[{**questions[0], "themes": ["Nobody"]}])


def test_every_method_runs(tmp_path, data, tiny_dir):
    """--methods all (with a lambda and a learning-rate sweep) on two memories: each method's rows and state."""
    out = tmp_path / "all"
    args = ["bench", "--data", data, "--out", out, "--model", tiny_dir, "--methods", "all", "--memories", "2"]
    args += ["--epochs", "1", "--max-steps", "1", "--mcq-limit", "2", "--text-paragraphs", "1", "--no-progress"]
    args += ["--threads", "1", "--l2-lambda", "0.01,1", "--lr", "full=1e-5,1e-4"]
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    steps = {(x["method"], x["step"]) for x in rows_of(out) if x["kind"] == "step"}
    names = ["base", "rag", "mega", "irag", "full-ewc", "full-batch", "lora", "lora-l2"]
    names += ["full-l2@0.01", "full-l2@1", "full~1e-05", "full~0.0001"]
    want = {(m, k) for m in names for k in (1, 2) if m != "full-batch"} | {("full-batch", 2)}
    assert steps == want
    mem = [x for x in rows_of(out) if x["kind"] == "memory"]
    assert all("gate_top1" in x for x in mem if x["method"] in ("rag", "mega", "irag"))
    assert all(x["gate_top1"] == 1.0 for x in mem if x["method"] in ("rag", "mega", "irag"))
    state = out / "state" / "p0"
    assert (state / "full-ewc" / "fisher.safetensors").is_file()
    assert (state / "full-l2@1" / "weights.safetensors").is_file()
    assert len(list((state / "lora-l2" / "merged").iterdir())) == 2
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in names)
    # config.json records the learning rates in effect (the defaults here), so a record says what ran
    from megamem.bench.methods import DEFAULT_LR

    assert json.loads((out / "config.json").read_text())["lrs"] == DEFAULT_LR


def test_recall_only_stories(tmp_path, tiny_dir):
    """Stories without QA (the fictional set's layout): recall metrics only, and irag (= mega's recall there)
    is skipped with a note instead of recomputing mega's rows."""
    folder = tmp_path / "stories"
    folder.mkdir()
    stories = [{"character": r["theme"], "passage": r["passage"]} for r in RECORDS[:2]]
    (folder / "partition-00.jsonl").write_text("\n".join(json.dumps(s) for s in stories) + "\n")
    out = tmp_path / "run"
    r = bench(folder, out, tiny_dir, methods=["mega", "irag"])
    assert r.exit_code == 0, r.output
    assert "irag (recall, then answer) is skipped" in r.output
    mem = [x for x in rows_of(out) if x["kind"] == "memory"]
    assert {x["method"] for x in mem} == {"mega"} and len(mem) == 1 + 2
    assert all(-1 <= x["recall_cos"] <= 1 and "qa_acc" not in x for x in mem)


def test_reuse_computes_each_item_once_per_gate():
    items = ["heron", "bridge"]
    calls: list[list[int]] = []

    def compute(idx):
        calls.append(list(idx))
        return [items[i].upper() for i in idx]

    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    assert bench_methods.reuse(None, "gen", items, w, compute) == ["HERON", "BRIDGE"]
    assert bench_methods.reuse(None, "gen", items, w, compute) == ["HERON", "BRIDGE"]
    assert calls == [[0, 1], [0, 1]]  # no cache: a method whose weights change recomputes everything

    cache: dict = {}
    calls.clear()
    assert bench_methods.reuse(cache, "gen", items, w, compute) == ["HERON", "BRIDGE"]
    assert bench_methods.reuse(cache, "gen", items, w, compute) == ["HERON", "BRIDGE"]
    # a third memory nobody weighs, and a weight that moved by float rounding: the same mixtures
    wider = torch.tensor([[1.0, 0.0, 0.0], [0.25 + 1e-8, 0.75, 0.0]])
    assert bench_methods.reuse(cache, "gen", items, wider, compute) == ["HERON", "BRIDGE"]
    assert calls == [[0, 1]]
    # the bridge question now also weighs the new memory: only it is computed again
    moved = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.7, 0.1]])
    bench_methods.reuse(cache, "gen", items, moved, compute)
    assert calls == [[0, 1], [1]]
    # another kind of output, or no gate at all, is another entry
    bench_methods.reuse(cache, "gen48", items, moved, compute)
    bench_methods.reuse(cache, "gen", items, None, compute)
    assert calls == [[0, 1], [1], [0, 1], [0, 1]]


@pytest.fixture()
def bench_setup(tmp_path, tiny_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "partition-00.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    # batch size 1: every prompt runs alone, so reused and recomputed outputs are comparable token for token
    cfg = BenchConfig(
        data=str(folder),
        model=str(tiny_dir),
        epochs=1,
        max_steps=1,
        mcq_limit=6,
        text_paragraphs=2,
        batch_size=1,
        general_qa=4,
    )
    shared, _ = bench_run.setup(cfg)
    part = evaluation.prepare(cfg, 0, shared.model, shared.tok)
    probes = evaluation.make_probes(cfg, shared.model, shared.tok)
    return cfg, shared, cfg.lrs, part, probes


def test_reused_outputs_equal_recomputed_ones_and_skip_the_known_prompts(bench_setup, monkeypatch):
    cfg, shared, lrs, part, probes = bench_setup
    probes = dataclasses.replace(probes, qa_convs=[])  # the recall and QA prompts only (general ones: below)
    gate = GateConfig(similarity="cosine", beta=50.0, top_k=1)  # one memory a query: old prompts keep their gate
    mega = make_method("mega", shared, lrs)
    assert mega.cache is not None and make_method("irag", shared, lrs).cache is mega.cache  # shared adapters
    assert make_method("full", shared, lrs).cache is None  # its weights change: never reused
    prompts: list[int] = []
    real = bench_methods.generate

    def counting(model, tok, convs, *a, **kw):
        prompts.append(len(convs))
        return real(model, tok, convs, *a, **kw)

    monkeypatch.setattr(bench_methods, "generate", counting)
    for k in range(1, len(part.records) + 1):
        mega.learn(k - 1, part.texts(k - 1))
        prompts.clear()
        reused = bench_run.evaluate(cfg, mega, shared, part, probes, k, gate)
        # only memory k's recall cue and its question are new (each query routes to its own memory)
        assert sum(prompts) == 2
        cache, mega.cache = mega.cache, None
        fresh = bench_run.evaluate(cfg, mega, shared, part, probes, k, gate)
        mega.cache = cache
        assert sum(prompts) == 2 + 2 * k
        for a, b in zip(reused, fresh, strict=True):
            assert a.keys() == b.keys()
            for field, value in a.items():
                if isinstance(value, float):
                    assert value == pytest.approx(b[field], abs=1e-5), (k, field)
                else:
                    assert value == b[field], (k, field)


def test_partitions_added_to_a_folder_later(tmp_path, tiny_dir):
    """Partition 1 run into partition 0's folder (a later session, say): partition 0 is not tested again,
    config.json lists both partitions and the report's table is mean ± std over the two."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "partition-00.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    (data / "partition-01.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS[1:]) + "\n")
    out = tmp_path / "run"
    assert bench(data, out, tiny_dir, "--partitions", "0", methods=["base"]).exit_code == 0
    first = rows_of(out)
    assert "| base | 1 | 2 |" in (out / "results.md").read_text()
    r = bench(data, out, tiny_dir, "--partitions", "1", methods=["base"])
    assert r.exit_code == 0, r.output
    rows = rows_of(out)
    assert rows[: len(first)] == first and {x["partition"] for x in rows[len(first) :]} == {1}
    assert json.loads((out / "config.json").read_text())["partitions"] == [0, 1]
    report = (out / "results.md").read_text()
    assert "partitions [0, 1]" in report
    line = next(x for x in report.splitlines() if x.startswith("| base | 2 | 2 |"))
    assert "±" in line  # mean ± std over the two partitions
    # Both partitions again: each is finished, nothing is tested twice.
    assert bench(data, out, tiny_dir, "--partitions", "0,1", methods=["base"]).exit_code == 0
    assert rows_of(out) == rows


def test_bench_help_names_the_protocols_rank_not_the_products():
    """The bench's default rank is the pinned protocol's (PROTOCOL_LORA), whatever the product's default is."""
    import typer

    from megamem.adapters import LoraSpec
    from megamem.bench.protocol import PROTOCOL_LORA
    from megamem.cli import app

    bench = typer.main.get_command(app).commands["bench"]
    text = next(p.help for p in bench.params if p.name == "rank")
    assert f"protocol's, {PROTOCOL_LORA.rank}" in text and "product" not in text
    assert BenchConfig(data="d").rank is None  # None resolves to the protocol's spec, not LoraSpec()
    assert PROTOCOL_LORA.upper == 1.0 != LoraSpec().upper


def test_general_questions_go_through_the_products_gate(bench_setup):
    """The general probes of a gated method use the null memory: a general question routed to no memory gets the
    base model's answer, so the agreement with the base model is measured with the product's gate."""
    cfg, shared, lrs, part, probes = bench_setup
    mega = make_method("mega", shared, lrs)
    for k in range(len(part.records)):
        mega.learn(k, part.texts(k))
    keys = part.keys[: len(part.records)]
    gate = GateConfig(similarity="cosine", beta=50.0, top_k=4, null_rate=None)
    seen = Seen(keys, [r.passage for r in part.records], gate, recall_tokens=8)
    mega.cache = None  # each call computes its own answers
    with_null = evaluation.general_ability(mega, probes, seen, 0.01)
    without = evaluation.general_ability(mega, probes, seen, None)
    base = evaluation.general_ability(make_method("base", shared, lrs), probes, seen, 0.01)
    assert base["general_qa_same"] == 1.0 and with_null["general_qa_same"] >= without["general_qa_same"]
    null = evaluation.store_null_score(probes.calibration, torch.cat(keys), "cosine", 0.01)
    w_null = bench_methods.gate_matrix(probes.qa_keys, keys, gate, null)[0]
    w_plain = bench_methods.gate_matrix(probes.qa_keys, keys, gate)[0]
    assert float(w_plain.sum(dim=1).min()) == pytest.approx(1.0) and float(w_null.sum()) < float(w_plain.sum())


class PoolStub(bench_methods.Method):
    """A memory pool in miniature, shaped like MemoryLLM: learning writes a memory's passage into the pool, answering
    reads the pool; no adapters, no gate, no routing, the pool saved as one file."""

    writes: list[int] = []  # the memories written, over every instance

    def start(self):
        super().start()
        self.pool = []

    def learn(self, index, texts, on_step=None):
        self.pool.append(texts[0])
        self.writes.append(index)

    def save(self, folder, step):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pool.json").write_text(json.dumps(self.pool))
        super().save(folder, step)

    def load(self, folder):
        step = super().load(folder)
        self.pool = json.loads((folder / "pool.json").read_text()) if step else []
        return step

    def generate(self, convs, qkeys, seen, max_new):
        return [self.pool[-1]] * len(convs)  # the newest memory, whatever was asked

    def gold_logprobs(self, convs, golds, qkeys, seen):
        return [-1.0] * len(convs)

    def letter_logits(self, seqs, letters, qkeys, seen):
        return torch.zeros(len(seqs), len(letters))

    def kl_sums(self, seqs, reference, qkeys, seen):
        return [(0.0, 1)] * len(seqs)


def test_a_new_method_is_one_class(tmp_path, data, tiny_dir, monkeypatch):
    """A method class registered in METHODS runs through the unchanged run loop, test and report: it learns, saves
    and resumes its own state (the pool of the first two memories, then the third learned on top) and answers
    through its own calls; without a route it has no gate_top1."""
    monkeypatch.setitem(bench_methods.METHODS, "pool", PoolStub)
    monkeypatch.setattr(PoolStub, "writes", [])
    out = tmp_path / "run"
    real_evaluate = bench_run.evaluate

    def dying(cfg, method, shared, part, probes, k, gate):
        if k == 2:  # killed after saving the pool of two memories
            raise KeyboardInterrupt
        return real_evaluate(cfg, method, shared, part, probes, k, gate)

    monkeypatch.setattr(bench_run, "evaluate", dying)
    assert bench(data, out, tiny_dir, methods=["pool"]).exit_code != 0
    monkeypatch.setattr(bench_run, "evaluate", real_evaluate)
    r = bench(data, out, tiny_dir, methods=["pool"])  # resumes from the saved pool
    assert r.exit_code == 0, r.output
    assert PoolStub.writes == [0, 1, 2]  # memories 1-2 came back from the saved pool
    assert json.loads((out / "state" / "p0" / "pool" / "pool.json").read_text()) == [x["passage"] for x in RECORDS]
    mem = [x for x in rows_of(out) if x["kind"] == "memory"]
    assert len(mem) == 1 + 2 + 3 and all("gate_top1" not in x and x["logprob"] == -1.0 for x in mem)
    newest = [x for x in mem if x["memory"] == x["step"] - 1]
    assert all(x["recall_cos"] == pytest.approx(1.0, abs=1e-5) for x in newest)  # it recalls its newest memory
    assert all(x["kl"] == 0.0 for x in rows_of(out) if x["kind"] == "step")
    assert "| pool | 1 | 3 |" in (out / "results.md").read_text()


def test_memoryllm_runs_in_the_bench_and_resumes(tmp_path, data, tiny_dir, monkeypatch):
    """The memoryllm method through the unchanged loop: rows without gate_top1, its pool saved each step, and a
    run killed after two memories resumes from the saved pool to the rows an unbroken run writes."""
    whole = tmp_path / "whole"
    r = bench(data, whole, tiny_dir, methods=["memoryllm"])
    assert r.exit_code == 0, r.output
    pool_file = whole / "state" / "p0" / "memoryllm" / "pool.safetensors"
    from megamem.memoryllm import Pool

    assert Pool.load(pool_file).updates == 3
    mem = [x for x in rows_of(whole) if x["kind"] == "memory"]
    assert len(mem) == 1 + 2 + 3 and all("gate_top1" not in x and "recall_cos" in x and "qa_acc" in x for x in mem)

    broken = tmp_path / "broken"
    real_evaluate = bench_run.evaluate

    def dying(cfg, method, shared, part, probes, k, gate):
        if k == 3:
            raise KeyboardInterrupt
        return real_evaluate(cfg, method, shared, part, probes, k, gate)

    monkeypatch.setattr(bench_run, "evaluate", dying)
    assert bench(data, broken, tiny_dir, methods=["memoryllm"]).exit_code
    monkeypatch.setattr(bench_run, "evaluate", real_evaluate)
    r = bench(data, broken, tiny_dir, methods=["memoryllm"])
    assert r.exit_code == 0, r.output

    def comparable(rows):
        return [{k: v for k, v in x.items() if not k.endswith("_s")} for x in rows if x["kind"] == "memory"]

    assert comparable(rows_of(broken)) == comparable(rows_of(whole))
    assert "| memoryllm |" in (whole / "results.md").read_text()
