"""Model loading: safe beside another load in the same process, and a stopped server leaves no load running."""

import threading

import torch

from megamem.model import load_model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_loads_in_two_threads_at_once_give_the_same_model(smol_dir):
    """transformers swaps process-wide functions while it loads (tie_weights, torch.nn.init); without one lock
    two loads at once came out with an untied lm_head (meta logits or garbage) on every try."""
    ref, tok = load_model(str(smol_dir))
    ids = torch.tensor([tok("The lighthouse on Vexmoor island is kept by a heron.")["input_ids"]])
    want = _logits(ref, ids)
    errors: list[str] = []

    def load_and_check() -> None:
        for _ in range(2):
            model, _ = load_model(str(smol_dir))
            got = _logits(model, ids)
            if got.device.type != "cpu" or not torch.allclose(got, want, atol=1e-4):
                errors.append(f"{threading.current_thread().name}: logits differ from a lone load")

    threads = [threading.Thread(target=load_and_check, name=f"loader-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.allclose(_logits(load_model(str(smol_dir))[0], ids), want, atol=1e-4)  # nothing left patched


def test_a_stopped_server_leaves_no_thread_behind(tmp_path):
    """The app's shutdown waits for its loader, engine and worker, so nothing of it still loads or decodes."""
    from fastapi.testclient import TestClient
    from serverlib import make_server_store

    from megamem.server.app import ServerConfig, create_app

    store, _ = make_server_store(tmp_path)
    before = set(threading.enumerate())
    app = create_app(ServerConfig(store=store, open_access=True))
    with TestClient(app):  # the lifespan starts the load; leaving at once stops the app mid-load
        pass
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and t.name.startswith("megamem")]
    assert left == []
    assert app.state.server.ready.is_set() or app.state.server.failed
