"""The server's fairness and host checks (issue 25): a live server on the tiny model whose forwards are slowed a
little (so a long answer is still decoding when the test acts).

A non-streaming client that gives up frees its row (irag's recall too); a short chat is answered while another
tenant's long one decodes; each key's chats and max_tokens in flight are limited (429 with Retry-After); a
max_tokens over the server's cap is a 400 naming the field; only allowed Host names are served; and `megamem
serve` passes its options through, refusing a store path that holds no store unless --create.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from serverlib import LiveServer, free_port, make_server_store
from typer.testing import CliRunner

from megamem.cli import app
from megamem.cli.serving import served_hosts
from megamem.server.runtime import LOOPBACK_HOSTS

CAP = 450  # the server's max_tokens cap here (the tiny model's context is 512)
KEY_CHATS, KEY_TOKENS = 2, 600
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(url, keys, the Server): small per-key limits, one extra allowed host, each forward 5 ms slower."""
    root = tmp_path_factory.mktemp("fair")
    store, keys = make_server_store(root)
    server = LiveServer(
        store,
        max_tokens_cap=CAP,
        key_chats=KEY_CHATS,
        key_tokens=KEY_TOKENS,
        allowed_hosts=(*LOOPBACK_HOSTS, "mm.example"),
        worker=False,
    )
    url = server.__enter__()
    srv = server.app.state.server
    srv.engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.005))
    try:
        yield url, keys, srv
    finally:
        server.__exit__(None, None, None)


@pytest.fixture()
def submitted(live, monkeypatch):
    """Every engine request the server makes during the test, in order (the engine idle before it starts)."""
    srv = live[2]
    assert srv.engine.idle.wait(30)
    seen, real = [], srv.engine.submit

    def submit(*args, **kw):
        req = real(*args, **kw)
        seen.append(req)
        return req

    monkeypatch.setattr(srv.engine, "submit", submit)
    return seen


def hdr(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def body(max_tokens: int, **extra) -> dict:
    return {"model": "megamem", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": max_tokens} | extra


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def in_background(url: str, key: str, payload: dict) -> tuple[threading.Thread, dict]:
    """A chat posted from a thread; its response lands in the returned dict under "r"."""
    out: dict = {}

    def post() -> None:
        out["r"] = httpx.post(url + CHAT, json=payload, headers=hdr(key), timeout=120)

    t = threading.Thread(target=post)
    t.start()
    return t, out


@pytest.mark.parametrize("mode", ["mega", "irag"])
def test_a_non_streaming_client_that_leaves_frees_its_row(live, submitted, mode):
    """The client times out after 0.5 s of a 400-token answer (irag: of its 400-token recall): its row ends
    'cancelled' well before 400 tokens, nothing more is submitted (irag's answer step never starts), the
    engine goes idle and the key's limits are released (the row decoded to its end: a gone client cost the
    whole answer)."""
    url, keys, srv = live
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + CHAT, json=body(400, memory={"mode": mode}), headers=hdr(keys["acme"]), timeout=0.5)
    wait_for(lambda: submitted and submitted[0].done.is_set(), timeout=10)
    first = submitted[0]
    assert first.finish_reason == "cancelled" and first.completion_tokens < 300, first.completion_tokens
    assert srv.engine.idle.wait(10)
    time.sleep(0.3)
    assert len(submitted) == 1
    assert not srv.limits.held
    r = httpx.post(url + CHAT, json=body(5), headers=hdr(keys["acme"]), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_a_short_chat_is_answered_while_another_tenant_decodes_a_long_one(live, submitted):
    """globex asks for 400 tokens; acme's 5-token chat, sent while it decodes, is answered before it ends."""
    url, keys, srv = live
    t, out = in_background(url, keys["globex"], body(400))
    wait_for(lambda: submitted and submitted[0].completion_tokens >= 5)
    r = httpx.post(url + CHAT, json=body(5), headers=hdr(keys["acme"]), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert not submitted[0].done.is_set()  # the long answer is still decoding
    t.join()
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 400


def check_429(r: httpx.Response, words: str) -> None:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and words in err["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_per_key_limits_answer_429_with_retry_after(live, submitted):
    """acme holds 300 max_tokens in flight: 400 more exceed its 600 (429); 200 more fit, and a third chat
    exceeds its 2 chats (429), through the openai client too (RateLimitError). globex is served meanwhile,
    and once acme's chats end its limits are free again."""
    url, keys, srv = live
    a, out_a = in_background(url, keys["acme"], body(300))
    wait_for(lambda: len(submitted) == 1)
    check_429(httpx.post(url + CHAT, json=body(400), headers=hdr(keys["acme"])), "max_tokens in flight")
    b, out_b = in_background(url, keys["acme"], body(200))
    wait_for(lambda: len(submitted) == 2)
    check_429(httpx.post(url + CHAT, json=body(5), headers=hdr(keys["acme"])), "2 chats in flight")
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys["acme"], max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="megamem", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert e.value.code == "rate_limit_exceeded"
    other = httpx.post(url + CHAT, json=body(5), headers=hdr(keys["globex"]), timeout=60)
    assert other.status_code == 200
    assert not submitted[0].done.is_set()
    a.join()
    b.join()
    assert out_a["r"].status_code == 200 and out_b["r"].status_code == 200
    wait_for(lambda: not srv.limits.held, timeout=5)
    assert httpx.post(url + CHAT, json=body(5), headers=hdr(keys["acme"]), timeout=60).is_success
    assert "megamem_chats_refused_total 3.0" in httpx.get(url + "/metrics").text


def test_max_tokens_over_the_cap_is_400_naming_the_field(live):
    """Above the server's cap (here 450, under the 512-token context): 400 naming max_tokens (or
    max_completion_tokens), through the openai client; at the cap the request is served."""
    url, keys, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys["acme"], max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    for field in ("max_tokens", "max_completion_tokens"):
        for n in (CAP + 1, 100_000):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="megamem", messages=messages, **{field: n})
            assert e.value.param == field and f"at most {CAP}" in e.value.message, e.value.message
    ok = client.chat.completions.create(model="megamem", messages=messages, max_tokens=CAP - 100)
    assert ok.usage.completion_tokens == CAP - 100


def test_only_allowed_host_names_are_served(live):
    """A Host the server was not given (a DNS-rebinding page's own name) is refused with a 400 in OpenAI's shape
    on every route, before the key is even read; the loopback names and the allowed one are served, any port,
    any case."""
    url, keys, _ = live
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "mm.example.evil"):
        for path in ("/v1/models", "/healthz"):
            r = httpx.get(url + path, headers=hdr(keys["acme"]) | {"Host": host})
            assert r.status_code == 400, (host, r.text)
            err = r.json()["error"]
            assert err["code"] == "host_not_allowed" and err["param"] == "Host"
            assert f"host {host!r} is not allowed; serve with --allowed-hosts" in err["message"]
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "mm.example", f"MM.Example:{port}"):
        r = httpx.get(url + "/v1/models", headers=hdr(keys["acme"]) | {"Host": host})
        assert r.status_code == 200, (host, r.text)


# -- megamem serve: its options reach the server ---------------------------------------------------------------------
@pytest.fixture()
def served(monkeypatch):
    """What `megamem serve` would run: uvicorn.run is replaced by a recorder of the app's ServerConfig."""
    got: dict = {}

    def run(asgi, host, port, log_level):
        got["cfg"], got["host"] = asgi.state.server.cfg, host

    monkeypatch.setattr("uvicorn.run", run)
    return got


def test_serve_open_on_a_path_without_a_store_is_one_error_line(tmp_path, served):
    """A mistyped path under --open is refused (it used to be served as a new, empty store); --create makes it
    the caller's choice."""
    missing = tmp_path / "typo"
    r = CliRunner().invoke(app, ["serve", "--store", str(missing), "--open"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: no megamem store at {missing}; serve --create to make one"
    ], r.output
    assert "cfg" not in served and not missing.exists()
    r = CliRunner().invoke(app, ["serve", "--store", str(missing), "--open", "--create"])
    assert r.exit_code == 0, r.output
    assert served["cfg"].store == missing and served["cfg"].open_access


def test_serve_passes_hosts_and_limits(tmp_path, served):
    """--allowed-hosts (repeated, comma-separated) adds to the loopback names, a concrete non-loopback --host
    adds itself, a wildcard one warns; the limits and the cap reach the ServerConfig; bad values are one
    error line."""
    store, _ = make_server_store(tmp_path)
    run = CliRunner()
    args = ["serve", "--store", str(store), "--allowed-hosts", "a.example,b.example", "--allowed-hosts", "c.example"]
    r = run.invoke(app, [*args, "--max-tokens-cap", "100", "--key-chats", "3", "--key-tokens", "900"])
    assert r.exit_code == 0, r.output
    cfg = served["cfg"]
    assert cfg.allowed_hosts == (*LOOPBACK_HOSTS, "a.example", "b.example", "c.example")
    assert (cfg.max_tokens_cap, cfg.key_chats, cfg.key_tokens) == (100, 3, 900)
    r = run.invoke(app, ["serve", "--store", str(store), "--host", "0.0.0.0", "--port", str(free_port())])
    assert r.exit_code == 0, r.output
    assert served["cfg"].allowed_hosts == LOOPBACK_HOSTS and "warning: listening on 0.0.0.0" in r.output
    assert served_hosts("10.1.2.3", ["mm.example"]) == (*LOOPBACK_HOSTS, "mm.example", "10.1.2.3")
    for bad, message in (
        (["--allowed-hosts", "http://x.example"], "--allowed-hosts takes host names"),
        (["--allowed-hosts", "x.example:80"], "--allowed-hosts takes host names"),
        (["--key-chats", "0"], "--key-chats must be at least 1"),
        (["--max-tokens-cap", "0"], "--max-tokens-cap must be at least 1"),
    ):
        r = run.invoke(app, ["serve", "--store", str(store), *bad])
        assert r.exit_code == 1 and r.output.startswith(f"error: {message}") and r.output.count("\n") == 1, r.output


def test_an_app_made_by_create_app_serves_only_loopback_host_names(tmp_path):
    """Secure as it comes: the config's default is the loopback names (a DNS-rebinding page names its own host)."""
    from fastapi.testclient import TestClient

    from megamem.server.app import ServerConfig, create_app

    app = create_app(ServerConfig(store=tmp_path / "never-opened"))
    foreign = TestClient(app, base_url="http://attacker.example").get("/healthz")
    assert foreign.status_code == 400 and foreign.json()["error"]["code"] == "host_not_allowed"
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/healthz").status_code in (200, 503)


def test_a_tool_message_reaches_the_model_through_the_chat_template(live, submitted):
    """A tool's result is part of the prompt (it was dropped: "-41 °C, blizzard" got "about 22 °C")."""
    url, keys, srv = live
    messages = [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "-41 °C, blizzard"},
    ]
    r = httpx.post(
        url + CHAT, json={"model": "megamem", "messages": messages, "max_tokens": 4}, headers=hdr(keys["acme"])
    )
    assert r.status_code == 200, r.text
    prompt = srv.engine.tok.decode(submitted[-1].prompt)
    assert "-41 °C, blizzard" in prompt and prompt.index("blizzard") > prompt.index("What is the weather")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "weather", "parameters": {"type": "object"}}]),
        ("function_call", "auto"),
        ("presence_penalty", 1.0),
        ("modalities", ["text", "audio"]),
        ("reasoning_effort", "high"),
    ],
)
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(live, field, value):
    """Nothing is ignored without a word: the openai client gets BadRequestError naming the field."""
    url, keys, _ = live
    client = openai.OpenAI(base_url=url + "/v1", api_key=keys["acme"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="megamem", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={field: value}
        )
    assert err.value.body["param"] == field and err.value.body["code"] == "unsupported_parameter"
    plain = client.chat.completions.create(
        model="megamem", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, response_format={"type": "text"}
    )
    assert plain.choices[0].message is not None  # the plain text format is what every answer is
