"""``unclip server`` as a user starts it, and the local server's basic auth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from unclip.prefect_server import PrefectServer, free_port

pytestmark = pytest.mark.slow


def _get(url: str, auth: str | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_unclip_server_deploys_sets_the_gpu_limit_and_stops_with_everything_it_started(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "server", "--workdir", str(tmp_path), "--port",
                             str(port), "--gpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line.startswith("Ctrl-C") for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        out = "".join(lines)
        assert f"Prefect UI:  http://127.0.0.1:{port}" in out, out
        assert "deployments: data-pipeline, data-refresh, demo, evaluate, retrain" in out
        assert (tmp_path / "prefect" / "prefect.db").exists()
        assert _get(api + "/concurrency_limits/tag/gpu")["concurrency_limit"] == 2
        assert _get(api + "/work_pools/unclip-process")["type"] == "process"
        for _ in range(60):  # the worker registers itself with its pool once it has started
            if _post(api + "/work_pools/unclip-process/workers/filter"):
                break
            time.sleep(1)
        else:
            pytest.fail("no worker registered with unclip-process")
        state = json.loads((tmp_path / "prefect" / "server.json").read_text())
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == proc.pid]
        assert state["pid"] in children
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(90)
    assert proc.returncode == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"child {pid} outlived `unclip server`"
    with pytest.raises(OSError):
        _get(api + "/health")


def _post(url: str, auth: str | None = None):
    return _get(url, auth, body=b"{}")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_basic_auth_through_prefects_own_setting(tmp_path):
    with PrefectServer(tmp_path / "prefect", auth="admin:s3cret") as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(server.api_url + "/flows/filter")
        assert err.value.code == 401
        assert _post(server.api_url + "/flows/filter", auth="admin:s3cret") == []
        # the CLI and workers get PREFECT_API_AUTH_STRING from client_env
        server.ensure_pool()  # through the CLI, authenticated
        assert _get(server.api_url + "/work_pools/unclip-process", auth="admin:s3cret")["type"] == "process"
