"""Crash-safety of the server's injection jobs: `kill -9` of a live server at random moments, restart, check.

The server runs as its own process on a store on the tests' tiny random model (tests/serverlib.py), with the
product's default recipe (17 training steps, about 1 s a memory on that model) and a short job lease (3 s) so a
job that a killed process held is claimed again soon after a restart. Each trial submits 1-3 add jobs (random
namespace, half with an Idempotency-Key, half with an explicit id), kills the server (SIGKILL) at a moment drawn
from one of these modes, then restarts it and waits for /healthz:

    queued    0-0.15 s after the submissions returned (the job is queued or just claimed)
    training  when a job reaches a random training step (progress from GET /v1/jobs)
    commit    when a job's memory folder appears in memories/ (renamed into place), 0-2.2 widen s later: before
              its manifest commit, between the commit and the job's update, or just after (with --widen 0:
              0-0.6 s after the job's last training step)
    random    0-4 s after the submissions
    submit    0-60 ms after the POSTs started, in flight (a lost response is retried with its Idempotency-Key)
    startup   (on top of another mode, one trial in ten) a second kill while the restarted server loads

Checked after every kill (server down), after every restart (server up) and at the end (every job finished):
- every accepted job (202) is queued, running or succeeded, never failed, and once succeeded stays so; at the
  end every one has succeeded; a succeeded job's memory is present exactly once (one row with its id, one
  row with its text, its job id in metadata `megamem.job`); no request made two jobs or two memories;
- 0 half memories: `megamem verify --store` exits 0 (the command while the server is down, after each kill
  and at the end; the same check in-process while it runs), and no memory folder lacks a manifest row (after
  a kill a dead writer's folder with its pending row is a leftover that the restart must clear; after a
  restart none may remain);
- 0 committed memories lost: every memory row seen at any check is still there with the same adapter;
- replaying an Idempotency-Key (same body) returns the same job, across restarts; no traceback in the log.
A job that a kill hit twice is let finish before the next kill (the queue gives up after 3 claims, by design).

Those two commit windows last milliseconds, so random kills almost never land in them: the launcher widens each
by --widen seconds (default 0.25) by wrapping two functions of the server process it starts (never the source):
megamem.store.fsync_path sleeps after syncing memories/ (the rename is durable, the manifest row not yet
written) and JobQueue.finish sleeps before marking a job succeeded (the memory committed, the job still
running). Everything else runs as shipped; --widen 0 runs it untouched.

    python benchmarks/serve_crash.py                       # 100 trials, bench-runs/serve_crash.json
    python benchmarks/serve_crash.py --trials 5 --seed 3 --out /tmp/crash.json --work /tmp/crash
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serverlib  # noqa: E402

from megamem import schema  # noqa: E402

MODES = ("queued", "training", "commit", "random", "submit")
LAUNCHER = """
import sys
from pathlib import Path

import uvicorn

from megamem.server.app import ServerConfig, create_app

store, port, lease, widen = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
if widen > 0:  # hold the two commit windows open (see the module's docstring)
    import time

    import megamem.store.manifest as st
    from megamem.server.jobs import JobQueue

    fsync_path, finish = st.fsync_path, JobQueue.finish

    def slow_fsync(path):
        fsync_path(path)
        if Path(path).name == "memories":
            time.sleep(widen)

    def slow_finish(self, job, error=None, retry=False):
        if error is None and not retry:
            time.sleep(widen)
        return finish(self, job, error, retry)

    st.fsync_path, JobQueue.finish = slow_fsync, slow_finish
uvicorn.run(create_app(ServerConfig(store=store, lease_s=lease)), host="127.0.0.1", port=port, log_level="warning")
"""
COLORS = ("teal", "red", "ochre", "violet", "amber", "slate", "green", "coral")
THINGS = ("bridge", "tower", "ferry", "lighthouse", "archive", "observatory", "mill", "tram")
NAMES = ("Ida Carrow", "Otto Venn", "Mara Quill", "Ivo Stenn", "Lena Brisk", "Tomas Reel")


class Server:
    """`megamem serve` (or the python launcher with a short lease) as a child process on a fresh port."""

    def __init__(self, store: Path, log: Path, lease_s: float, cli: bool, widen: float = 0.0) -> None:
        self.store, self.log, self.lease_s, self.cli, self.widen = store, log, lease_s, cli, widen
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def spawn(self) -> None:
        port = serverlib.free_port()
        self.url = f"http://127.0.0.1:{port}"
        if self.cli:
            megamem = Path(sys.executable).with_name("megamem")
            cmd = [str(megamem), "serve", "--store", str(self.store), "--port", str(port)]
        else:
            cmd = [sys.executable, "-c", LAUNCHER, str(self.store), str(port), str(self.lease_s), str(self.widen)]
        with open(self.log, "a") as f:
            f.write(f"\n=== start {self.starts} {' '.join(cmd[:2])} port {port} ===\n")
        self.logf = open(self.log, "a")  # noqa: SIM115  (the child writes to it until it dies)
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=os.environ.copy())
        self.starts += 1

    def wait_healthy(self, timeout: float = 180) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting (see {self.log})")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.time() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the server was not healthy {timeout} s after its start (see {self.log})")

    def start(self) -> float:
        self.spawn()
        return self.wait_healthy()

    def kill(self) -> None:
        """SIGKILL our own child by its pid, and reap it (a zombie would still look alive to the store)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
            self.logf.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def read_store(store: Path) -> dict:
    """The manifest's memories, pending rows and jobs, and the memory folders (folders listed first: a folder
    renamed into place always has its pending row or its memory row by the time the manifest is read)."""
    folders = sorted(p.name for p in (store / "memories").iterdir()) if (store / "memories").is_dir() else []
    db = sqlite3.connect(f"file:{store / 'manifest.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        db.execute("BEGIN")
        memories = {
            i: {"text": t, "metadata": json.loads(m), "adapter": a}
            for i, t, m, a in db.execute("SELECT id, text, metadata, adapter_sha256 FROM memories")
        }
        pending = {i: w for i, w in db.execute("SELECT id, writer FROM pending")}
        jobs = {
            r[0]: {"memory_id": r[1], "state": r[2], "attempts": r[3], "key": r[4], "error": r[5], "request": r[6]}
            for r in db.execute("SELECT id, memory_id, state, attempts, idempotency_key, error, request FROM jobs")
        }
        db.execute("COMMIT")
    finally:
        db.close()
    return {"memories": memories, "pending": pending, "jobs": jobs, "folders": folders}


def code_digest() -> str:
    """A digest of megamem's source (src/megamem/**/*.py): a run whose code changed midway says so."""
    import hashlib

    import megamem

    h = hashlib.sha256()
    for f in sorted(Path(megamem.__file__).parent.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_verify(store: Path, cli: bool = True) -> tuple[int, str]:
    """`megamem verify --store` (its exit status and output), or the same check in-process (cli False: what the
    command runs, megamem.store.health.verify; it exits 1 exactly when a problem is serious), which saves the
    command's start-up (torch's import: seconds) at the checks in between."""
    if not cli:
        from megamem.store.health import verify

        serious = [p for p in verify(store) if p.serious]
        return (1 if serious else 0), "; ".join(f"{p.kind} {p.path}: {p.message}" for p in serious)
    megamem = Path(sys.executable).with_name("megamem")
    p = subprocess.run([str(megamem), "verify", "--store", str(store)], capture_output=True, text=True, timeout=300)
    return p.returncode, (p.stdout + p.stderr).strip()


class Harness:
    """The trials' state and every check; violations are collected (never raised) and counted."""

    def __init__(
        self,
        work: Path,
        seed: int,
        lease_s: float = 3.0,
        cli: bool = False,
        say=print,
        verify_cli: bool = True,
        widen: float = 0.25,
    ) -> None:
        self.widen = 0.0 if cli else widen
        self.verify_cli = verify_cli
        self.work = work
        self.rng = random.Random(seed)
        self.seed = seed
        self.say = say
        self.store, self.keys = serverlib.make_server_store(work)
        self.log = work / "server.log"
        self.server = Server(self.store, self.log, lease_s, cli, self.widen)
        self.n = 0
        self.accepted: dict[str, dict] = {}  # job id -> what we asked for
        self.lost: list[dict] = []  # requests whose response a kill cut off
        self.seen_rows: dict[str, str] = {}  # every memory row seen at a check -> its adapter checksum
        self.succeeded_seen: set[str] = set()
        self.committed_unmarked: set[str] = set()  # jobs a kill caught between their memory's commit and update
        self.violations: list[str] = []
        self.counts: Counter = Counter()
        self.restart_s: list[float] = []
        self.log_offset = 0

    # -- requests ---------------------------------------------------------------------------------------------
    def new_request(self) -> dict:
        self.n += 1
        r = self.rng
        ns = r.choice(serverlib.NAMESPACES)
        text = (
            f"In {2030 + self.n} the {r.choice(THINGS)} number {self.n} of run {self.seed} was painted "
            f"{r.choice(COLORS)} by {r.choice(NAMES)}."
        )
        body = {"text": text, "metadata": {"n": self.n}}
        if r.random() < 0.5:
            body["id"] = f"s{self.seed}-m{self.n}"
        if r.random() < 0.3:
            body["paraphrases"] = [f"{r.choice(NAMES)} painted the structure number {self.n} in {2030 + self.n}."]
        key = f"k{self.seed}-{self.n}" if r.random() < 0.5 else None
        return {"ns": ns, "body": body, "key": key, "n": self.n}

    def post(self, req: dict, timeout: float = 30) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[req['ns']]}"}
        if req["key"]:
            headers["Idempotency-Key"] = req["key"]
        return httpx.post(self.server.url + "/v1/memories", json=req["body"], headers=headers, timeout=timeout)

    def submit(self, req: dict) -> None:
        try:
            resp = self.post(req)
        except httpx.HTTPError:
            self.lost.append(req)
            self.counts["responses_lost"] += 1
            return
        self.accept(req, resp, "submit")

    def accept(self, req: dict, resp: httpx.Response, when: str) -> None:
        if resp.status_code != 202:
            self.violate(f"{when} of request {req['n']}: {resp.status_code} {resp.text[:300]}")
            return
        job = resp.json()["job_id"]
        if job in self.accepted:
            if self.accepted[job]["n"] != req["n"]:
                self.violate(f"request {req['n']} got job {job} of request {self.accepted[job]['n']}")
            return
        self.accepted[job] = req | {"job": job}
        self.counts["jobs_accepted"] += 1

    def retry_lost(self) -> None:
        """After a restart: a lost request with an Idempotency-Key is sent again (it must give one job, whether
        or not the first attempt reached the queue); one without is looked up in the jobs table by its text."""
        lost, self.lost = self.lost, []
        jobs = read_store(self.store)["jobs"]
        for req in lost:
            if req["key"]:
                self.counts["idempotent_retries"] += 1
                try:
                    self.accept(req, self.post(req), "retry")
                except httpx.HTTPError as exc:
                    self.violate(f"retry of request {req['n']} failed: {exc}")
            else:
                found = [j for j, row in jobs.items() if json.loads(row["request"])["text"] == req["body"]["text"]]
                if len(found) > 1:
                    self.violate(f"lost request {req['n']} made {len(found)} jobs")
                if found:
                    self.accepted[found[0]] = req | {"job": found[0]}
                    self.counts["lost_but_queued"] += 1
                else:
                    self.counts["lost_never_queued"] += 1

    def replay(self) -> None:
        """An accepted request with an Idempotency-Key sent again: the same job, no new one."""
        keyed = [a for a in self.accepted.values() if a["key"]]
        if not keyed:
            return
        a = self.rng.choice(keyed)
        try:
            resp = self.post(a)
        except httpx.HTTPError as exc:
            self.violate(f"replay of request {a['n']} failed: {exc}")
            return
        self.counts["replays"] += 1
        if resp.status_code != 202 or resp.json().get("job_id") != a["job"]:
            self.violate(f"replay of request {a['n']} (job {a['job']}): {resp.status_code} {resp.text[:300]}")

    def violate(self, message: str) -> None:
        self.violations.append(message)
        self.say(f"  VIOLATION: {message}")

    # -- checks ---------------------------------------------------------------------------------------------
    def check(self, when: str, final: bool = False) -> None:
        s = read_store(self.store)
        rows, pending, jobs = s["memories"], s["pending"], s["jobs"]
        up = self.server.up
        # half memories: a folder with no manifest row
        for folder in s["folders"]:
            if folder in rows:
                continue
            writer = pending.get(folder)
            if writer is None:
                self.violate(f"{when}: memories/{folder} has no manifest row and no pending row (a half memory)")
            elif not up:
                self.counts["leftovers_after_kill"] += 1  # a dead writer's; the restart must clear it
            elif writer.split("-")[0] != str(self.server.proc.pid):
                self.violate(f"{when}: memories/{folder} is a dead writer's leftover the restart did not clear")
        # committed memories never lost nor changed
        for mid, adapter in self.seen_rows.items():
            if mid not in rows:
                self.violate(f"{when}: committed memory {mid} is gone")
            elif rows[mid]["adapter"] != adapter:
                self.violate(f"{when}: committed memory {mid} changed its adapter")
        for mid, row in rows.items():
            self.seen_rows.setdefault(mid, row["adapter"])
        # jobs
        by_job = Counter(r["metadata"].get(schema.JOB) for r in rows.values())
        by_text = Counter(r["text"] for r in rows.values())
        texts = Counter(json.loads(j["request"])["text"] for j in jobs.values())
        for text, n in texts.items():
            if n > 1:
                self.violate(f"{when}: {n} jobs for one request ({text[:60]!r})")
        for job_id, row in jobs.items():
            text = json.loads(row["request"])["text"]
            if final and job_id not in self.accepted:
                self.violate(f"{when}: job {job_id} is in the table but no client was told of it")
            if row["state"] == "failed":
                self.violate(f"{when}: job {job_id} failed: {row['error']}")
            if by_job[job_id] > 1 or by_text[text] > 1:
                self.violate(f"{when}: job {job_id} has {by_job[job_id]} memories ({by_text[text]} with its text)")
            if row["state"] == "succeeded":
                self.succeeded_seen.add(job_id)
                mem = rows.get(row["memory_id"])
                if mem is None:
                    self.violate(f"{when}: job {job_id} succeeded but memory {row['memory_id']} is not stored")
                elif mem["metadata"].get(schema.JOB) != job_id or mem["text"] != text:
                    self.violate(f"{when}: memory {row['memory_id']} is not job {job_id}'s: {mem['metadata']}")
            elif job_id in self.succeeded_seen:
                self.violate(f"{when}: job {job_id} went from succeeded back to {row['state']}")
            elif row["state"] == "running" and by_job[job_id] == 1 and not up:
                self.committed_unmarked.add(job_id)  # the restart must mark it succeeded without training
            if final and row["state"] != "succeeded":
                self.violate(f"{when}: job {job_id} ended {row['state']} ({row['error']})")
        for job_id, a in self.accepted.items():
            if job_id not in jobs:
                self.violate(f"{when}: accepted job {job_id} (request {a['n']}) is not in the jobs table")
        rc, out = run_verify(self.store, cli=(self.verify_cli or final) and not up)
        self.counts["verify_runs"] += 1
        if rc != 0:
            self.counts["verify_failures"] += 1
            self.violate(f"{when}: megamem verify exited {rc}: {out[-600:]}")
        self.scan_log(when)

    def scan_log(self, when: str) -> None:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        new, self.log_offset = text[self.log_offset :], len(text)
        if "Traceback" in new:
            self.counts["tracebacks"] += new.count("Traceback")
            at = new.index("Traceback")
            self.violate(f"{when}: a traceback in the server log: {new[at : at + 1500]}")

    def api_statuses(self) -> None:
        """The client's view at the end: GET /v1/jobs/{id} says succeeded for every accepted job."""
        for job_id, a in self.accepted.items():
            r = httpx.get(
                f"{self.server.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {self.keys[a['ns']]}"}
            )
            if r.status_code != 200 or r.json().get("status") != "succeeded":
                self.violate(f"GET /v1/jobs/{job_id}: {r.status_code} {r.text[:300]}")

    # -- waiting --------------------------------------------------------------------------------------------------
    def unfinished(self) -> list[dict]:
        return [j for j in read_store(self.store)["jobs"].values() if j["state"] in ("queued", "running")]

    def drain(self, timeout: float = 180) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.unfinished():
                return True
            time.sleep(0.1)
        self.violate(f"jobs still unfinished {timeout} s after a restart: {self.unfinished()}")
        return False

    def job_progress(self) -> list[tuple[int, int]]:
        out = []
        for job_id, a in list(self.accepted.items()):
            if job_id in self.succeeded_seen:
                continue
            try:
                r = httpx.get(
                    f"{self.server.url}/v1/jobs/{job_id}",
                    headers={"Authorization": f"Bearer {self.keys[a['ns']]}"},
                    timeout=5,
                )
            except httpx.HTTPError:
                continue
            p = r.json().get("progress") if r.status_code == 200 else None
            if p and p["total"]:
                out.append((p["step"], p["total"]))
        return out

    def wait_progress(self, pred, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.server.up:
            if any(pred(step, total) for step, total in self.job_progress()):
                return True
            time.sleep(0.01)
        return False

    def wait_folder(self, timeout: float) -> bool:
        """Until an unfinished job's memory folder is renamed into memories/ (its commit is under way)."""
        folders = self.store / "memories"
        todo = [j["memory_id"] for j in self.unfinished() if not (folders / j["memory_id"]).exists()]
        deadline = time.time() + timeout
        while todo and time.time() < deadline and self.server.up:
            if any((folders / m).exists() for m in todo):
                return True
            time.sleep(0.005)
        return False

    # -- one trial --------------------------------------------------------------------------------------------
    def restart(self, when: str) -> None:
        for attempt in range(3):
            try:
                self.restart_s.append(self.server.start())
                break
            except RuntimeError as exc:  # counted and shown; a failure that repeats ends the run
                self.server.kill()
                self.counts["start_failures"] += 1
                tail = self.log.read_text(errors="replace")[-1500:]
                self.say(f"  start failure {attempt + 1} ({when}): {exc}\n{tail}")
                if attempt == 2:
                    raise
                time.sleep(5)
        self.counts["restarts"] += 1
        self.check(f"{when}, after restart")
        self.retry_lost()

    def trial(self, t: int, planned: str | None = None) -> str:
        """One trial; planned: its mode (with "+startup" for the second kill), else drawn."""
        r = self.rng
        if not self.server.up:
            self.restart(f"trial {t}")
        if any(j["attempts"] >= 2 for j in self.unfinished()):
            self.drain()  # a third kill of one job would make the queue give up on it (by design)
            self.counts["drains"] += 1
        if r.random() < 0.3:
            self.replay()
        mode = r.choice(MODES)
        startup = r.random() < 0.1
        if planned is not None:
            mode, startup = planned.split("+")[0], planned.endswith("+startup")
        reqs = [self.new_request() for _ in range(r.randint(1, 3))]
        if mode == "submit":
            threads = [threading.Thread(target=self.submit, args=(q,)) for q in reqs]
            for th in threads:
                th.start()
            time.sleep(r.uniform(0, 0.06))
        else:
            for q in reqs:
                self.submit(q)
            if mode == "queued":
                time.sleep(r.uniform(0, 0.15))
            elif mode == "training":
                k = r.random()
                self.wait_progress(lambda s, n: s >= max(1, int(k * n)) and s < n, 20)
            elif mode == "commit":
                if self.widen > 0:
                    if self.wait_folder(30):
                        time.sleep(r.uniform(0, 2.2 * self.widen))
                elif self.wait_progress(lambda s, n: s == n, 20):
                    time.sleep(r.uniform(0, 0.6))
            else:
                time.sleep(r.uniform(0, 4))
        self.server.kill()
        self.counts[f"kills_{mode}"] += 1
        self.counts["kills"] += 1
        if mode == "submit":
            for th in threads:
                th.join()
        self.check(f"trial {t} ({mode}), after the kill")
        if startup:  # a second kill while the restarted server loads
            self.server.spawn()
            time.sleep(r.uniform(0, 7))
            self.server.kill()
            self.counts["kills_startup"] += 1
            self.counts["kills"] += 1
            self.check(f"trial {t}, after a kill at start-up")
            mode += "+startup"
        self.restart(f"trial {t} ({mode})")
        if r.random() < 0.25:
            self.drain()
            self.counts["drains"] += 1
        return mode

    def finish(self) -> None:
        if not self.server.up:
            self.restart("end")
        self.drain()
        self.replay()
        keyed = [a for a in self.accepted.values() if a["key"]]
        if keyed:  # the same key with another body: refused, nothing queued
            a = keyed[0]
            other = a | {"body": a["body"] | {"text": a["body"]["text"] + " (changed)"}}
            resp = self.post(other)
            if resp.status_code != 409:
                self.violate(f"a reused Idempotency-Key with another body: {resp.status_code} {resp.text[:200]}")
        self.api_statuses()
        self.check("end", final=True)
        self.server.stop()
        self.check("end, server stopped", final=True)

    def summary(self, trials: int, seconds: float) -> dict:
        s = read_store(self.store)
        jobs = s["jobs"]
        return {
            "trials": trials,
            "seed": self.seed,
            "widen_s": self.widen,
            "seconds": round(seconds, 1),
            "kills": self.counts["kills"],
            "kills_by_mode": {m: self.counts[f"kills_{m}"] for m in (*MODES, "startup")},
            "restarts": self.counts["restarts"],
            "restart_s_mean": round(sum(self.restart_s) / max(1, len(self.restart_s)), 2),
            "jobs_accepted": len(self.accepted),
            "jobs_in_table": len(jobs),
            "jobs_succeeded": sum(j["state"] == "succeeded" for j in jobs.values()),
            "jobs_failed": sum(j["state"] == "failed" for j in jobs.values()),
            "jobs_claimed_again": sum(j["attempts"] > 1 for j in jobs.values()),
            "attempts_histogram": dict(sorted(Counter(j["attempts"] for j in jobs.values()).items())),
            "killed_after_commit_before_finish": len(self.committed_unmarked),
            "memories": len(s["memories"]),
            "memories_with_job_id": sum(r["metadata"].get(schema.JOB) in jobs for r in s["memories"].values()),
            "responses_lost": self.counts["responses_lost"],
            "idempotent_retries": self.counts["idempotent_retries"],
            "lost_but_queued": self.counts["lost_but_queued"],
            "lost_never_queued": self.counts["lost_never_queued"],
            "replays_same_job": self.counts["replays"],
            "leftovers_after_kill": self.counts["leftovers_after_kill"],
            "half_memories": sum("half memory" in v or "leftover the restart" in v for v in self.violations),
            "committed_lost": sum("is gone" in v or "changed its adapter" in v for v in self.violations),
            "doubled": sum("memories (" in v or "jobs for one request" in v for v in self.violations),
            "verify_runs": self.counts["verify_runs"],
            "verify_failures": self.counts["verify_failures"],
            "tracebacks": self.counts["tracebacks"],
            "start_failures": self.counts["start_failures"],
            "violations": len(self.violations),
            "violation_list": self.violations,
        }


def run(
    trials: int,
    seed: int = 0,
    work: Path | None = None,
    lease_s: float = 3.0,
    cli: bool = False,
    say=print,
    verify_cli: bool = True,
    plan: list[str] | None = None,
    widen: float = 0.25,
) -> dict:
    """Run `trials` kill trials; returns the summary dict (see main). verify_cli False: the checks between
    trials verify in-process (the final ones always run `megamem verify`). plan: the trials' modes in turn
    (e.g. ["queued", "commit+startup"]) instead of random ones."""
    t0 = time.time()
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="serve-crash-")) if own else work
    h = Harness(work, seed, lease_s, cli, say, verify_cli, widen)
    digest = code_digest()
    try:
        say(f"store {h.store}; log {h.log}")
        h.restart("start")
        for t in range(trials):
            t1 = time.time()
            mode = h.trial(t, plan[t % len(plan)] if plan else None)
            say(
                f"  trial {t:>3} {mode:<16} {time.time() - t1:5.1f} s  jobs {len(h.accepted):>3}  "
                f"violations {len(h.violations)}"
            )
        h.finish()
    finally:
        h.server.kill()
    out = h.summary(trials, time.time() - t0)
    out["work"] = str(work)
    out["code_digest"] = digest
    if code_digest() != digest:
        out["code_changed_during_run"] = True
        say("warning: megamem's source changed during the run (the restarts after the change ran the new code)")
    if own and not out["violations"]:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100, help="kill trials (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lease", type=float, default=3.0, help="the job lease of the python launcher, seconds")
    ap.add_argument("--cli", action="store_true", help="run `megamem serve` itself (its 60 s lease: slow trials)")
    ap.add_argument("--widen", type=float, default=0.25, help="seconds each commit window is held open (0: none)")
    ap.add_argument("--fast-verify", action="store_true", help="verify in-process between trials (not the CLI)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the store and the server log (kept)")
    ap.add_argument("--out", type=Path, default=HERE.parent / "bench-runs" / "serve_crash.json", help="JSON summary")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `kill PID` still kills the server it runs
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    s = run(args.trials, args.seed, args.work, args.lease, args.cli, verify_cli=not args.fast_verify, widen=args.widen)
    width = max(map(len, s))
    for k, v in s.items():
        if k != "violation_list":
            print(f"{k:<{width}}  {v}")
    for v in s["violation_list"]:
        print(f"violation: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(s, indent=2) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if s["violations"] else 0)


if __name__ == "__main__":
    main()
