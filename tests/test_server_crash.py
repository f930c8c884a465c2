"""Crash-safety of the server's injection jobs: the kill -9 trials of benchmarks/serve_crash.py, short here.

The server (create_app + uvicorn, from a launcher with a 3 s job lease and the two commit windows held open
0.25 s each: see the benchmark's docstring) runs as its own process on the tiny model's store; each trial
submits add jobs, SIGKILLs the server at a moment of one mode (queued, training, commit, in-flight submit,
random; one with a second kill during the restart), restarts it and checks: every accepted job succeeds
exactly once (its memory present once with its job id), no half memory (`megamem verify` exits 0, no memory
folder lacks a manifest row), no committed memory lost, idempotent replays return the same job.
The long version (40 random trials, `megamem verify` at every check) is marked slow; the full run is
`python benchmarks/serve_crash.py --trials 100`.

test_committed_job_claimed_again covers the one path the random trials do not reach (a job's last allowed
claim dying between its memory's commit and the job's own update) directly, by preparing the store so.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

import pytest
from serverlib import LiveServer, make_server_store, quick_recipe, wait_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serve_crash  # noqa: E402


def assert_clean(s: dict, trials: int) -> None:
    assert s["violation_list"] == [], "\n".join(s["violation_list"])
    assert s["kills"] >= trials
    assert s["jobs_accepted"] > 0
    assert s["jobs_succeeded"] == s["jobs_in_table"] == s["jobs_accepted"]
    assert s["memories"] == s["memories_with_job_id"] == s["jobs_accepted"]
    assert s["jobs_failed"] == s["half_memories"] == s["committed_lost"] == s["doubled"] == 0
    assert s["verify_failures"] == 0 and s["tracebacks"] == 0


def test_kill_trials_short(tmp_path):
    """Five trials, one of each kill mode (the commit trial also killed again while restarting)."""
    plan = ["queued", "training", "commit+startup", "submit", "random"]
    s = serve_crash.run(len(plan), seed=11, work=tmp_path, verify_cli=False, plan=plan, say=print)
    assert_clean(s, len(plan))
    assert s["kills_by_mode"]["startup"] == 1


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("MEGAMEM_LONG"),
    reason="the long kill run (40 trials, ~15 min): MEGAMEM_LONG=1, or benchmarks/serve_crash.py --trials 100",
)
def test_kill_trials_long(tmp_path):
    s = serve_crash.run(40, seed=5, work=tmp_path, say=print)
    assert_clean(s, 40)
    assert s["jobs_claimed_again"] > 0  # some kill hit a claimed job, which a restart then claimed again


@pytest.mark.parametrize("attempts", [1, 3])
def test_committed_job_claimed_again(tmp_path, attempts):
    """A job whose memory is committed but whose process died before marking it (lease expired, state still
    running) is marked succeeded when claimed again, without training, also on its last allowed claim (the
    queue's max_attempts, 3): its memory is stored, so the client must not be told it failed."""
    from megamem import Memory, schema
    from megamem.memory import Item
    from megamem.server.jobs import JobQueue

    store, keys = make_server_store(tmp_path)
    text = "In 2044 the Orrin viaduct was painted saffron by Pell Anders."
    request = {"text": text, "paraphrases": [], "metadata": {}, "user_id": None, "agent_id": None, "replaces": []}
    queue = JobQueue(store)
    job, _ = queue.submit("acme", "acme--v1", request)
    queue.close()
    # what the worker's attempt number `attempts` did before it was killed: the memory, committed ...
    item = Item(
        text, [], {}, "acme--v1", origin=f"job {job.id}", reserved={schema.NAMESPACE: "acme", schema.JOB: job.id}
    )
    Memory(store, recipe=quick_recipe()).add_many([item])
    # ... and the job still running under a lease that expired with its process
    db = sqlite3.connect(store / "manifest.sqlite")
    with db:
        db.execute(
            "UPDATE jobs SET state = 'running', attempts = ?, lease_owner = 'dead-0', lease_until = 0 WHERE id = ?",
            (attempts, job.id),
        )
    db.close()
    with LiveServer(store, lease_s=3.0) as url:
        got = wait_job(url, keys["acme"], job.id, timeout=60)
    assert got["status"] == "succeeded", got
    rows = [r for r in Memory(store).list() if r.metadata.get(schema.JOB) == job.id]
    assert [r.id for r in rows] == ["acme--v1"]
