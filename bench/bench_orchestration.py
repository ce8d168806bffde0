"""Orchestration overhead: a Prefect flow over N shards of no-op work against a plain Python loop.

    python bench/bench_orchestration.py [--shards 100 1000 10000] [--shards-per-task 16]
                                        [--unbatched 100 1000 10000] [--max-parallel-tasks 2]

The default run takes about 6 minutes on 2 cores, 4.5 of them in the unbatched 10,000-shard row (a
70 s flow, then the server's recording of its task runs); ``--unbatched 100 1000`` takes 1.5.

What the data stages do with a shard list (unclip/flows/data.py, ``_run_batches``), with the work
taken out: the list is cut into batches of ``shards_per_task`` (``unclip.tasks.common.batched``),
one task run per batch is submitted to a ``ThreadPoolTaskRunner(max_parallel_tasks)``, the flow
follows them with ``as_completed`` (where the stages advance their progress) and collects one result
string per batch. The task is decorated like the stages' (``cache_policy=NO_CACHE``, retries) and
takes the same kind of arguments (the batch number and a list of shard-index dicts).

The work per shard is genuinely the same in both arms: 64 rounds of sha256 over the shard's record
(about 30 us here); a batch returns a digest of its shards' digests, as a stage's batch returns one URI.

- loop: ``noop_batch.fn`` over the same batches in a plain ``for`` loop, in a fresh process that
  does not import Prefect (its peak RSS is the reference for the flow process's);
- flow: the flow, in a fresh process whose environment (``PrefectServer.client_env()``) points
  ``PREFECT_API_URL`` at a real ``prefect server start`` (SQLite) that this script starts in a
  temporary folder. After each flow the parent reads back, through the server's REST API, the flow
  run (so the run really went to that server) and the number of its task runs in state COMPLETED,
  waiting until the server has recorded them all (Prefect 3 records task runs from events, after the
  fact: the wait is reported as "catch-up"), or until the count has not moved for 30 s. A count short
  of the task runs made is real: ``prefect server start``'s in-memory message broker drops events when
  a subscriber's queue (10,000 messages) is full, and the server logs each drop; the table counts them.

Times are each process's own measured section after its imports (the flow call; the loop), so
overhead per shard = (flow s - loop s) / N. The server's memory is the RSS of its whole process tree,
sampled every 0.2 s by the parent: before the flow process starts, its peak until the task runs are
all recorded, and after that. The table goes to stdout and to bench/results/orchestration.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUNDS = 64  # sha256 rounds per shard: a fixed, tiny, identical amount of work in both arms


def shard_list(n: int) -> list[dict]:
    """Shard-index records shaped like the ingest index's rows (what the stages pass to their tasks)."""
    return [{"shard": f"{i:06d}", "source": "bench", "tar": f"file:///data/shards/{i:06d}.tar",
             "rows": 10_000, "content_sha256": f"{i:064x}"} for i in range(n)]


def work(shard: dict) -> bytes:
    h = json.dumps(shard, sort_keys=True).encode()
    for _ in range(ROUNDS):
        h = hashlib.sha256(h).digest()
    return h


def work_batch(batch: int, shards: list[dict]) -> str:
    """A batch's work: every shard's, then one result URI for the batch (as a stage's task returns)."""
    digest = hashlib.sha256(b"".join(work(s) for s in shards)).hexdigest()
    return f"file:///data/work/batch={batch}/{digest[:16]}.parquet"


def batched(items: list, size: int) -> list[list]:
    # unclip.tasks.common.batched's slicing, without importing unclip (and so Prefect) in the loop arm
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- the two arms, each in its own process ---------------------------------------------------------
def child_loop(n: int, spt: int, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        shards = shard_list(n)  # the flow builds its list inside the measured section too
        results = [work_batch(i, b) for i, b in enumerate(batched(shards, spt))]
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "all_seconds": times, "results": len(results)}


def child_flow(n: int, spt: int, parallel: int) -> dict:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import get_run_context
    from prefect.futures import as_completed
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.settings import PREFECT_API_URL

    from unclip.tasks.common import batched as stage_batched

    noop_batch = task(name="noop-batch", task_run_name="noop: batch {batch}", cache_policy=NO_CACHE,
                      retries=2, retry_delay_seconds=5)(work_batch)

    # parameters are small (a stage's are its config and workdir); the shard list is made inside,
    # as a stage reads its shard index inside
    @flow(name="bench-orchestration", flow_run_name=f"n{n}-spt{spt}",
          task_runner=ThreadPoolTaskRunner(max_workers=parallel))
    def shard_stage(n: int, shards_per_task: int) -> dict:
        shards = shard_list(n)
        futures = [noop_batch.submit(i, list(b)) for i, b in enumerate(stage_batched(shards, shards_per_task))]
        done = sum(1 for _ in as_completed(futures))  # the stages count progress as batches finish
        results = [f.result() for f in futures]
        assert done == len(results)
        return {"flow_run_id": str(get_run_context().flow_run.id), "results": len(results)}

    api = PREFECT_API_URL.value()
    if not api:
        raise SystemExit("PREFECT_API_URL is not set: the flow would run against an ephemeral server")
    t = time.perf_counter()
    out = shard_stage(n, spt)
    out["seconds"] = time.perf_counter() - t
    out["api_url"] = api
    return out


def main_child(a: argparse.Namespace) -> None:
    out = child_loop(a.n, a.spt, a.repeats) if a.child == "loop" else child_flow(a.n, a.spt, a.parallel)
    # VmHWM, not getrusage's ru_maxrss: the latter survives exec and so counts the parent's pages at fork
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")][0]
    out["peak_rss"] = int(hwm.split()[1]) * 1024
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent: server, processes, sampling, read-back ---------------------------------------------
class Sampler:
    """The server's process-tree RSS every ``period`` seconds, in a thread; ``peak`` over the ``with`` block."""

    def __init__(self, server, period: float = 0.2) -> None:
        self.server, self.period = server, period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_bytes())
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self.peak = self.server.rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.server.rss_bytes())


def run_child(args: list[str], env: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                           f"{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def completed_task_runs(server, flow_run_id: str, expected: int, stall_s: float = 30.0,
                        timeout_s: float = 900.0) -> tuple[int, float]:
    """Task runs of the flow run that the server holds in state COMPLETED, polled until ``expected``
    are there (or the count stops moving for ``stall_s``, or ``timeout_s``); returns the count and the
    wait. The server's recorder pauses for seconds at a time under load, hence the long stall limit."""
    t0 = time.monotonic()
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
    last, last_change = -1, t0
    while True:
        n = server.post("/task_runs/count", body)
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        if n >= expected or now - last_change > stall_s or now - t0 > timeout_s:
            return n, now - t0
        time.sleep(0.2)


def measure(server, n: int, spt: int, parallel: int, loop_repeats: int) -> dict:
    env = server.client_env(PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    loop = run_child(["--child", "loop", "--n", str(n), "--spt", str(spt), "--repeats", str(loop_repeats)],
                     {k: v for k, v in env.items() if not k.startswith("PREFECT_")})
    log = server.home / "server.log"
    log_start = log.stat().st_size
    before = server.rss_bytes()
    with Sampler(server) as sampler:
        t = time.monotonic()
        flow = run_child(["--child", "flow", "--n", str(n), "--spt", str(spt), "--parallel", str(parallel)], env)
        process_s = time.monotonic() - t
        load = os.getloadavg()[0]  # the machine is shared: other work on the 2 cores shows here
        expected = -(-n // spt)
        assert flow["results"] == expected == loop["results"], (flow, loop, expected)
        run = server.get(f"/flow_runs/{flow['flow_run_id']}")  # 404 here: the run went elsewhere
        assert run["state_type"] == "COMPLETED", run["state_type"]
        counted, catch_up = completed_task_runs(server, flow["flow_run_id"], expected)
    after = server.rss_bytes()
    db = sum(f.stat().st_size for f in server.home.glob(server.database.name + "*"))  # with -wal, -shm
    with log.open("rb") as f:
        f.seek(log_start)
        # the server's in-memory message broker drops events when a subscriber's queue (10,000) is full
        dropped = f.read().count(b"Subscription queue is full, dropping message")
    return {"n": n, "spt": spt, "task_runs_expected": expected, "task_runs_counted": counted,
            "loop_s": loop["seconds"], "flow_s": flow["seconds"], "flow_process_s": process_s,
            "catch_up_s": catch_up, "overhead_us": (flow["seconds"] - loop["seconds"]) / n * 1e6,
            "overhead_per_task_ms": (flow["seconds"] - loop["seconds"]) / expected * 1e3,
            "server_before": before, "server_peak": sampler.peak, "server_after": after,
            "flow_peak_rss": flow["peak_rss"], "loop_peak_rss": loop["peak_rss"], "server_dropped": dropped,
            "load_1min": load, "sqlite_bytes": db, "api_url": flow["api_url"]}


MIB = 2**20


def table(rows: list[dict]) -> str:
    head = ("| shards | per task | task runs (counted) | loop s | flow s | ratio | overhead us/shard | "
            "ms/task run | catch-up s | recorded /s | server RSS MiB before / peak / after | "
            "flow proc peak MiB | loop proc peak MiB | events dropped by server | SQLite MiB | load |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['n']:,} | {r['spt']} | {r['task_runs_expected']:,} ({r['task_runs_counted']:,}) | "
                   f"{r['loop_s']:.3f} | {r['flow_s']:.2f} | {r['flow_s'] / r['loop_s']:.0f}x | "
                   f"{r['overhead_us']:,.0f} | {r['overhead_per_task_ms']:.1f} | {r['catch_up_s']:.1f} | "
                   f"{r['task_runs_counted'] / (r['flow_process_s'] + r['catch_up_s']):.0f} | "
                   f"{r['server_before'] / MIB:.0f} / {r['server_peak'] / MIB:.0f} / {r['server_after'] / MIB:.0f} | "
                   f"{r['flow_peak_rss'] / MIB:.0f} | {r['loop_peak_rss'] / MIB:.0f} | {r['server_dropped']:,} | "
                   f"{r['sqlite_bytes'] / MIB:.0f} | {r['load_1min']:.1f} |")
    return "\n".join(out)


def marginal(rows: list[dict]) -> list[str]:
    """Per batch size: the overhead's marginal cost per shard and per task run, and its fixed cost per
    flow, from the two largest shard counts (as the ingest benchmark separates a call's fixed cost)."""
    out = []
    for spt in sorted({r["spt"] for r in rows}, reverse=True):
        mine = sorted((r for r in rows if r["spt"] == spt), key=lambda r: r["n"])
        if len(mine) < 2:
            continue
        lo, hi = mine[-2], mine[-1]
        over = {r["n"]: r["flow_s"] - r["loop_s"] for r in (lo, hi)}
        per_shard = (over[hi["n"]] - over[lo["n"]]) / (hi["n"] - lo["n"])
        per_task = (over[hi["n"]] - over[lo["n"]]) / (hi["task_runs_expected"] - lo["task_runs_expected"])
        fixed = over[hi["n"]] - per_task * hi["task_runs_expected"]
        out.append(f"#   {spt:>3} shards a task ({lo['n']:,} -> {hi['n']:,} shards): {per_shard * 1e6:,.0f} us a "
                   f"shard, {per_task * 1e3:.1f} ms a task run, fixed {fixed:.2f} s a flow")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--shards-per-task", type=int, default=16, help="as configs/demo.yaml's orchestration section")
    ap.add_argument("--unbatched", type=int, nargs="*", default=[100, 1000, 10000],
                    help="shard counts also run with one task run per shard (shards_per_task=1)")
    ap.add_argument("--max-parallel-tasks", type=int, default=2)
    ap.add_argument("--loop-repeats", type=int, default=5, help="the loop is fast: median of this many")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "orchestration.txt"))
    a = ap.parse_args()

    from unclip.prefect_server import PrefectServer

    import prefect

    plan = [(n, a.shards_per_task) for n in a.shards] + [(n, 1) for n in a.unbatched]
    rows = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as home:
        t = time.monotonic()
        server = PrefectServer(home).start()
        try:
            started = time.monotonic() - t
            print(f"prefect {prefect.__version__} server on {server.api_url} (SQLite under {home}), healthy in "
                  f"{started:.1f} s, RSS {server.rss_bytes() / MIB:.0f} MiB", flush=True)
            for n, spt in plan:
                r = measure(server, n, spt, a.max_parallel_tasks, a.loop_repeats)
                assert r["api_url"] == server.api_url, r["api_url"]
                rows.append(r)
                print(f"{n:>6,} shards, {spt:>2} per task: {r['task_runs_counted']:>6,} of "
                      f"{r['task_runs_expected']:,} task runs completed on the server; loop {r['loop_s']:.3f} s, "
                      f"flow {r['flow_s']:.2f} s, "
                      f"{r['overhead_us']:,.0f} us/shard, catch-up {r['catch_up_s']:.1f} s, server peak "
                      f"{r['server_peak'] / MIB:.0f} MiB, {r['server_dropped']:,} events dropped", flush=True)
            db_mib = server.database.stat().st_size / MIB
        finally:
            server.stop()
    total = time.monotonic() - t_all

    lines = [" ".join(["$ .venv/bin/python", f"bench/{Path(__file__).name}", *sys.argv[1:]]),
             f"# prefect {prefect.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
             f"ThreadPoolTaskRunner(max_workers={a.max_parallel_tasks}), {ROUNDS} sha256 rounds a shard, "
             f"SQLite database {db_mib:.1f} MiB at the end, whole run {total:.0f} s",
             "# loop s: median of the plain loop's repeats; flow s: the flow call in its own process (after its",
             "# imports); ratio = flow s / loop s; overhead = (flow s - loop s) / shards, and / task runs;",
             "# catch-up: wait after the flow process exits until the server holds every task run as COMPLETED;",
             "# recorded /s = task runs recorded / (flow process s + catch-up s); events dropped: the server log's",
             "# 'Subscription queue is full, dropping message' lines during the row; load: the 1-minute load",
             "# average when the flow process ended (2 CPUs: above 2, other processes shared the cores); SQLite:",
             "# the server's database (with its WAL) after the row, cumulative over the rows",
             *(["# fixed and marginal cost (flow s - loop s) between the two largest shard counts of a batch size:",
                *fits] if (fits := marginal(rows)) else []), "", table(rows), "", "# raw", *(json.dumps(r) for r in rows)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(f"written to {a.out}")


if __name__ == "__main__":
    if "--child" in sys.argv:
        cp = argparse.ArgumentParser()
        cp.add_argument("--child", choices=["loop", "flow"], required=True)
        cp.add_argument("--n", type=int, required=True)
        cp.add_argument("--spt", type=int, required=True)
        cp.add_argument("--parallel", type=int, default=2)
        cp.add_argument("--repeats", type=int, default=5)
        main_child(cp.parse_args())
    else:
        main()


