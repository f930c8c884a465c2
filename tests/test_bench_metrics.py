"""The bench's metric functions: cosine and its floor, the QA judge as the bench applies it, KL, MCQ, MMLU files."""

import math

import pytest
import torch

from megamem.bench import general
from megamem.bench.metrics import cosine_matrix, qa_scores, random_pair_floor
from megamem.errors import MegamemError


def test_cosine_matrix_and_floor():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sims = cosine_matrix(a, b)
    assert sims[0, 0] == pytest.approx(1.0) and sims[0, 1] == pytest.approx(0.0)
    assert sims[1, 2] == pytest.approx(1 / math.sqrt(2))
    # floor: every (i, j != i) pair: (0,1)=0, (0,2)=.707, (1,0)=0, (1,2)=.707
    assert random_pair_floor(a, b) == pytest.approx(2 * (1 / math.sqrt(2)) / 4)
    assert math.isnan(random_pair_floor(a[:1], b[:1]))


def test_qa_scores_one_sentence_rule_and_f1():
    assert qa_scores("He was born on January 15, 1993.", "15 January 1993")["qa_acc"] == 1.0
    two = qa_scores("He plays rugby. He was born in 1993.", "rugby")
    assert two["qa_acc"] == 0.0 and 0 < two["qa_f1"] < 1
    assert qa_scores("The Wheelchair Rugby team.", "wheelchair rugby")["qa_acc"] == 1.0
    assert qa_scores("tennis", "wheelchair rugby") == {"qa_acc": 0.0, "qa_f1": 0.0}


def test_bucketed_kl_zero_for_same_model_and_exact_with_full_topk():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 10), dim=-1)
    q = torch.log_softmax(torch.randn(5, 10), dim=-1)
    assert general.bucketed_kl(general.make_reference([p], k=4), [p]) == pytest.approx(0.0, abs=1e-6)
    exact = float((p.exp() * (p - q)).sum(-1).mean())
    assert general.bucketed_kl(general.make_reference([p], k=10), [q]) == pytest.approx(exact, rel=1e-4)
    lower = general.bucketed_kl(general.make_reference([p], k=3), [q])
    assert 0 < lower <= exact + 1e-6


def test_mcq_accuracy_and_shipped_probe():
    qs = [general.MCQ("q1", list("wxyz"), 2), general.MCQ("q2", list("wxyz"), 0)]
    logits = torch.zeros(2, 10)
    letters = [4, 5, 6, 7]
    logits[0, 6] = 1.0  # picks C: right
    logits[1, 7] = 1.0  # picks D: wrong
    assert general.mcq_accuracy(logits, letters, qs) == 0.5
    shipped = general.shipped_mcq()
    assert len(shipped) >= 100 and all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in shipped)
    assert len(general.shipped_text()) >= 2


def test_load_mmlu_csv_release(tmp_path):
    test = tmp_path / "data" / "test"
    test.mkdir(parents=True)
    (test / "anatomy_test.csv").write_text('"What is 1+1?",1,2,3,4,B\nQ2,a,b,c,d,D\n')
    (test / "virology_test.csv").write_text("Q3,a,b,c,d,A\n")
    qs = general.load_mmlu(tmp_path)
    assert [(q.subject, q.answer) for q in qs] == [("anatomy", 1), ("anatomy", 3), ("virology", 0)]
    assert qs[0].choices == ["1", "2", "3", "4"]
    assert len(general.load_mmlu(tmp_path, subjects=["virology"])) == 1
    assert len(general.load_mmlu(tmp_path, limit=1)) == 2
    with pytest.raises(MegamemError):
        general.load_mmlu(tmp_path / "missing")
    with pytest.raises(MegamemError):
        general.load_mmlu(tmp_path, subjects=["law"])


def test_llm_judge_through_an_openai_compatible_endpoint():
    """The optional LLM judge posts one chat request and reads YES / NO; a dead endpoint is a one-line error."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from megamem.bench.metrics import llm_judge

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            verdict = "YES" if "teal" in body["messages"][0]["content"].split("Model answer:")[1] else "NO"
            data = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        assert llm_judge(url, "judge", "What colour?", "teal", "It is teal.") == 1.0
        assert llm_judge(url, "judge", "What colour?", "teal", "It is red.") == 0.0
        assert seen[0][0] == "/v1/chat/completions" and seen[0][1]["model"] == "judge"
    finally:
        server.shutdown()
    with pytest.raises(MegamemError, match="LLM judge"):
        llm_judge(url, "judge", "q", "a", "p", timeout=2)
