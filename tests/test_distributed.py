"""The torch.distributed layer: torchrun command lines, launching, failures and timeouts, and a real
two-process DDP/FSDP step on CPU (gloo) that matches one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser

from unclip.config import LaunchConfig
from unclip.train.distributed import LaunchError, launch, torchrun_command

TESTS = Path(__file__).resolve().parent
# the workers import dist_step from this folder; hiding GPUs keeps the step on CPU with gloo anywhere
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
       "CUDA_VISIBLE_DEVICES": ""}


def test_torchrun_command_single_node():
    cmd = torchrun_command(LaunchConfig(nproc_per_node=2), "unclip.train.prior", ["--steps", "3"])
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                   "--standalone", "-m", "unclip.train.prior", "--steps", "3"]
    args = get_args_parser().parse_args(cmd[3:])  # the installed torchrun understands every flag
    assert (args.nnodes, args.nproc_per_node, args.standalone) == ("1", "2", True)
    assert (args.module, args.training_script, args.training_script_args) == (True, "unclip.train.prior",
                                                                             ["--steps", "3"])


def test_torchrun_command_multi_node():
    launch_cfg = LaunchConfig(nnodes=4, nproc_per_node=8, strategy="fsdp", rdzv_endpoint="node0:29400")
    cmd = torchrun_command(launch_cfg, "unclip.train.decoder", [])
    assert cmd[3:] == ["--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", "node0:29400", "-m", "unclip.train.decoder"]
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint, args.standalone) == ("4", "c10d", "node0:29400",
                                                                                     False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, no torchrun, unwrapped model, the whole global batch."""
    out = tmp_path_factory.mktemp("ref") / "step.pt"
    subprocess.run([sys.executable, "-m", "dist_step", "--out", str(out)], env={**os.environ, **ENV},
                   check=True, timeout=120)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, reference, tmp_path):
    launch_cfg = LaunchConfig(nproc_per_node=2, strategy=strategy, backend="gloo")
    out = tmp_path / "step.pt"
    launch(launch_cfg, "dist_step", ["--out", str(out), "--strategy", launch_cfg.strategy,
                                     "--backend", launch_cfg.backend],
           log_path=str(tmp_path / "logs" / "torchrun.log"), env=ENV, timeout_s=120)
    got = torch.load(out)
    assert (reference["world_size"], got["world_size"]) == (1, 2)
    assert reference["wrapper"] == "Sequential"  # no process group: the model itself
    assert got["wrapper"] == {"ddp": "DistributedDataParallel", "fsdp": "FSDPSequential"}[strategy]
    torch.testing.assert_close(got["loss"], reference["loss"], atol=1e-6, rtol=0)
    assert got["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert got["grads"][name].shape == grad.shape  # FSDP's shards gathered into full gradients
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_launch_failure_raises_with_log_tail(tmp_path):
    # three processes cannot split dist_step's 8-row batch: every rank raises after joining the group
    with pytest.raises(LaunchError) as err:
        launch(LaunchConfig(nproc_per_node=3), "dist_step", ["--out", str(tmp_path / "never.pt")], env=ENV,
               timeout_s=120)
    assert err.value.returncode == 1
    assert "failed with exit code 1" in str(err.value)
    assert "ValueError: the global batch of 8 rows does not split over 3 processes" in err.value.log_tail
    assert err.value.log_tail in str(err.value)
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.slow
def test_launch_sets_omp_threads_and_keeps_env(tmp_path):
    log = tmp_path / "torchrun.log"
    # One write(2) per rank: print() writes its pieces separately (unbuffered under PYTHONUNBUFFERED),
    # and two ranks sharing the log interleave them.
    probe = "import os; os.write(1, ('omp %s %s\\n' % (os.environ['OMP_NUM_THREADS'], os.environ['PROBE'])).encode())"
    launch(LaunchConfig(nproc_per_node=2), "timeit", ["-n", "1", "-r", "1", probe], log_path=str(log),
           env={"PROBE": "kept"}, timeout_s=60)
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert log.read_text().count(f"omp {expected} kept") == 2


@pytest.mark.slow
def test_launch_timeout_stops_every_process(tmp_path):
    started = tmp_path / "started"  # each worker notes it is up; the unique path also marks its command line
    sleeper = f"open({str(started)!r}, 'a').write('up\\n'); import time; time.sleep(600)"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 6 s") as err:
        launch(LaunchConfig(nproc_per_node=2), "timeit", ["-n", "1", "-r", "1", sleeper], timeout_s=6)
    assert err.value.returncode is None
    assert time.monotonic() - t0 < 30  # torchrun passed SIGTERM on: no wait for the SIGKILL grace
    assert started.read_text() == "up\n" * 2
    assert not _processes_with(str(started)), "torchrun or a worker outlived the timeout"


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have an empty one)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # exited while we looked
            continue
    return pids


def test_the_process_group_waits_the_configured_time_for_its_collectives(monkeypatch):
    """Rank 0 evaluates while the others wait at the next collective: the group's timeout is the
    launch config's (60 minutes by default), not torch's 10 for nccl."""
    import socket

    import torch.distributed as dist

    from unclip.train import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    assert LaunchConfig().timeout_minutes * 60 == distributed.COLLECTIVE_TIMEOUT_S == 3600
    distributed.init("gloo", timeout_s=123)
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout.total_seconds() == 123  # (private: torch is pinned)
    finally:
        distributed.cleanup()
