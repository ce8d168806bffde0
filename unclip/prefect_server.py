"""A local Prefect server, work pool, deployments and worker, as child processes.

``unclip server`` runs these in the foreground; the deployment tests and the orchestration benchmark
use the same code. The server listens on 127.0.0.1 only and keeps its SQLite database (and its
logs) under one folder, normally ``<workdir>/prefect``, so that a workdir carries its own run
history. Everything here talks to Prefect through its CLI and REST API, exactly as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "unclip-process"


def free_port(host: str = "127.0.0.1", preferred: int = 0) -> int:
    """``preferred`` if it is free now, else any free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


def flow_run_tree(post, run_id: str) -> list[dict]:
    """The subflow runs below flow run ``run_id``, at any depth, read through the REST API;
    ``post(path, body)`` sends one request."""
    found, frontier = [], [run_id]
    while frontier:
        tasks = post("/task_runs/filter", {"flow_runs": {"id": {"any_": frontier}}, "limit": 200})
        children = post("/flow_runs/filter", {
            "flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}}, "limit": 200}) if tasks else []
        found += children
        frontier = [c["id"] for c in children]
    return found


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment of every Prefect child: no analytics, no update checks, no trackers."""
    env = dict(os.environ)
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PREFECT_UI_ENABLED=env.get("PREFECT_UI_ENABLED", "true"))
    env.update(extra)
    return env


def terminate_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and its process group; SIGKILL the
    group if it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class PrefectServer:
    """``prefect server start`` on ``host:port`` with its database under ``home``.

    ``auth`` ("user:password") turns on Prefect's own basic auth (``PREFECT_SERVER_API_AUTH_STRING``
    on the server, ``PREFECT_API_AUTH_STRING`` for clients, which :meth:`client_env` sets).
    """

    def __init__(self, home: str | Path, host: str = "127.0.0.1", port: int = 0, auth: str | None = None,
                 start_timeout_s: float = 120.0) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.auth = auth
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.children: list[subprocess.Popen] = []

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def database(self) -> Path:
        return self.home / "prefect.db"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that talks to this server (CLI, worker, flow runs)."""
        env = quiet_env(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home), **extra)
        if self.auth:
            env["PREFECT_API_AUTH_STRING"] = self.auth
        return env

    def start(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.client_env(PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.database}",
                              PREFECT_SERVER_API_HOST=self.host, PREFECT_SERVER_API_PORT=str(self.port))
        env.pop("PREFECT_API_URL")
        if self.auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth
        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen([*PREFECT, "server", "start", "--host", self.host, "--port", str(self.port)],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_healthy()
        self._write_state()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.home / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"prefect server exited with code {self.proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError, ValueError):
                if self.get("/health") is True:
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"prefect server on {self.api_url} not healthy after {self.start_timeout_s:.0f} s")

    def _write_state(self) -> None:
        state = {"api_url": self.api_url, "ui_url": self.ui_url, "pid": self.proc.pid if self.proc else None,
                 "database": str(self.database)}
        (self.home / "server.json").write_text(json.dumps(state, indent=2))

    # -- REST --------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0,
                retries: int = 5):
        """One API call. A 503 or 429 is retried with backoff, as Prefect's own client does: the server
        answers 503 for errors a client may retry (a busy SQLite database under load), after rolling back."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            if self.auth:
                req.add_header("Authorization", "Basic " + b64encode(self.auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                if e.code not in (429, 503) or attempt == retries:
                    raise
                time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: dict | None = None):
        return self.request("POST", path, body or {})

    # -- pool, deployments, worker -------------------------------------------------------------------
    def cli(self, *args: str, cwd: str | Path = ROOT, timeout: float = 300.0, **env: str) -> str:
        """Run ``prefect <args>`` against this server; raise with its output when it fails."""
        res = subprocess.run([*PREFECT, "--no-prompt", *args], cwd=cwd, env=self.client_env(**env),
                             capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"`prefect {' '.join(args)}` failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def ensure_pool(self, name: str = POOL, kind: str = "process") -> None:
        try:
            self.get(f"/work_pools/{name}")
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            self.cli("work-pool", "create", name, "--type", kind)

    def set_tag_limit(self, tag: str, limit: int) -> None:
        """A task-run tag concurrency limit (created or updated): at most ``limit`` runs of ``tag`` at once."""
        self.post("/concurrency_limits/", {"tag": tag, "concurrency_limit": limit})

    def deploy_all(self, project: str | Path = ROOT) -> list[dict]:
        """``prefect deploy --all`` from the project root (its prefect.yaml); the deployments back."""
        self.cli("deploy", "--all", cwd=project, UNCLIP_REPO=str(Path(project).resolve()))
        return self.post("/deployments/filter", {"limit": 200})

    def start_worker(self, pool: str = POOL, limit: int | None = None, **env: str) -> subprocess.Popen:
        """A process worker on ``pool``; flow runs it starts inherit ``env`` (and the repo location)."""
        args = [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"]
        if limit:
            args += ["--limit", str(limit)]
        log = open(self.home / f"worker-{pool}.log", "ab")
        worker_env = self.client_env(UNCLIP_REPO=str(ROOT), PYTHONUNBUFFERED="1", **env)
        proc = subprocess.Popen(args, cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.children.append(proc)
        return proc

    def rss_bytes(self) -> int:
        """Resident memory of the server process and its children (uvicorn, services)."""
        if self.proc is None:
            return 0
        return _tree_rss(self.proc.pid)

    def stop(self) -> None:
        for child in reversed(self.children):
            terminate_group(child)
        self.children.clear()
        if self.proc is not None:
            terminate_group(self.proc)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.home / "server.json").unlink()

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def running_server(home: str | Path) -> dict | None:
    """The state of a server started with ``home`` that still answers, else None."""
    state_file = Path(home) / "server.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    try:
        with urllib.request.urlopen(state["api_url"] + "/health", timeout=5) as resp:
            return state if json.loads(resp.read()) is True else None
    except (OSError, ValueError):
        return None


def stop_background(home: str | Path) -> bool:
    """Stop the server a ``--ui`` run left in the background for ``home``; True if one was stopped."""
    state = running_server(home)
    if state is None or not state.get("pid"):
        print(f"no running server recorded in {Path(home) / 'server.json'}", file=sys.stderr)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state["pid"], signal.SIGTERM)
    (Path(home) / "server.json").unlink(missing_ok=True)
    return True


def _tree_rss(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(p.name))
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        todo += children.get(q, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
