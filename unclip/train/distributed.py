"""Data-parallel training under torch.distributed: launching ``torchrun`` and the runtime inside it.

The launch side builds the ``torchrun`` command from a ``LaunchConfig`` and runs it as a child process
in its own process group, so a timeout or Ctrl-C stops the whole job and a failure surfaces as a
``LaunchError`` carrying the exit code and the end of the log. The runtime side is what a training
module calls once inside the job: ``init`` joins the process group (nccl on GPUs, gloo on CPU) and
picks the device, ``wrap_model`` applies DDP or FSDP2 to a built model from outside (the models never
import any of this), ``cleanup`` leaves the group. Run without ``torchrun`` (a notebook, a debugger)
the same calls give a one-process context, no process group and an unwrapped model.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from unclip.config import LaunchConfig
from unclip.prefect_server import terminate_group

# torchrun gives its workers 30 s (its default --shutdown-timeout) between SIGTERM and SIGKILL; its
# workers live in their own sessions, out of reach of our group kill, so torchrun must outlive them.
_STOP_GRACE_S = 45.0
_TAIL_LINES = 40
COLLECTIVE_TIMEOUT_S = LaunchConfig.model_fields["timeout_minutes"].default * 60


class LaunchError(RuntimeError):
    """A torchrun job that failed or timed out. ``returncode`` is None after a timeout."""

    def __init__(self, message: str, returncode: int | None, log_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail


def torchrun_command(launch: LaunchConfig, module: str, args: list[str]) -> list[str]:
    """The ``torchrun`` command line that runs ``python -m module *args`` in every process.

    One node uses ``--standalone`` (a rendezvous on a free local port). Several nodes meet at the c10d
    rendezvous on ``rdzv_endpoint``, which assigns node ranks in arrival order: every node runs the
    identical command (torchrun ignores ``--node-rank`` for c10d).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nnodes", str(launch.nnodes), "--nproc-per-node", str(launch.nproc_per_node)]
    if launch.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(launch.rdzv_endpoint)]
    return [*cmd, "-m", module, *args]


def launch(
    launch: LaunchConfig,
    module: str,
    args: list[str],
    log_path: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    on_wait: Callable[[], None] | None = None,
    poll_s: float = 2.0,
    pass_fds: tuple[int, ...] = (),
    log_name: str | None = None,
) -> None:
    """Run ``module`` under torchrun on this node and wait for it; raise ``LaunchError`` on failure.

    stdout and stderr of torchrun and all its workers go to ``log_path`` (a local file, overwritten);
    without one, to a temporary file removed afterwards, so only a failure's tail is kept, in the error.
    Decorate the module's entry point with torch's ``@record`` and that tail ends with the failing
    rank's traceback. ``env`` is added to this process's environment. OMP_NUM_THREADS, unless set,
    shares this machine's cores among the local processes, so they do not oversubscribe the CPU.
    ``on_wait`` is called every ``poll_s`` seconds while the job runs (progress, heartbeats).
    ``pass_fds`` stay open in torchrun (the GPU locks it runs under: ``locks.gpu_devices``).
    ``log_name``: where the log can be read once the job ends, for the error (default ``log_path``).
    On timeout or KeyboardInterrupt the job is stopped (SIGTERM, which torchrun forwards to its
    workers, then SIGKILL) before the exception propagates.
    """
    cmd = torchrun_command(launch, module, args)
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // launch.nproc_per_node)))
    with _log_file(log_path) as (log, path):
        proc = subprocess.Popen(cmd, env=child_env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds)
        try:
            returncode = _wait(proc, timeout_s, on_wait, poll_s)
        except subprocess.TimeoutExpired:
            terminate_group(proc, _STOP_GRACE_S)
            tail = _tail(path)
            raise LaunchError(f"torchrun -m {module} timed out after {timeout_s:g} s and was stopped; "
                              f"last lines of its log{_where(log_name or log_path)}:\n{tail}", None, tail) from None
        except BaseException:
            terminate_group(proc, _STOP_GRACE_S)
            raise
        if returncode != 0:
            tail = _tail(path)
            raise LaunchError(f"torchrun -m {module} failed with exit code {returncode}; "
                              f"last lines of its log{_where(log_name or log_path)}:\n{tail}", returncode, tail)


def _wait(proc: subprocess.Popen, timeout_s: float | None, on_wait: Callable[[], None] | None,
          poll_s: float) -> int:
    if on_wait is None:
        return proc.wait(timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
        try:
            return proc.wait(poll_s if left is None else min(poll_s, left))
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            on_wait()


@contextlib.contextmanager
def _log_file(log_path: str | None) -> Iterator[tuple[IO[bytes], Path]]:
    if log_path is not None:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            yield f, path
        return
    with tempfile.NamedTemporaryFile(prefix="torchrun-", suffix=".log") as f:
        yield f, Path(f.name)


def _tail(path: Path, max_bytes: int = 16384) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-_TAIL_LINES:])


def _where(log_path: str | None) -> str:
    return f" ({log_path})" if log_path is not None else ""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: global rank, number of processes, rank on its node, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init(backend: Literal["auto", "gloo", "nccl"] = "auto", *, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> DistContext:
    """Join the job's process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    ``timeout_s``: how long a collective waits for the other processes before the job fails (torch's
    own default is 10 minutes for nccl): rank 0 evaluates while the others wait at the next step's
    collective, and a large model's evaluation may take longer than that. 'auto' is nccl when CUDA is
    available, else gloo. With CUDA each process takes the GPU of its
    LOCAL_RANK. Outside torchrun no group is created: rank 0 of 1, and the other helpers here act
    as their one-process identities.
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return DistContext(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, which this process does not see; use 'gloo' on CPU")
    device = torch.device("cpu")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                               "nproc_per_node must not exceed the GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # binding nccl to its device up front creates its communicator eagerly, not at the first collective
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, device)


def wrap_model(model: nn.Module, strategy: Literal["ddp", "fsdp"], ctx: DistContext,
               blocks: Iterable[nn.Module] = ()) -> nn.Module:
    """Move ``model`` to ``ctx.device`` and make it data parallel.

    'ddp' returns a ``DistributedDataParallel`` wrapper (the model is its ``.module``): every process
    holds all weights and gradients are averaged. 'fsdp' applies FSDP2 (``fully_shard``) in place and
    returns the same module: parameters and gradients become DTensors sharded across processes.
    Each module in ``blocks`` (e.g. the transformer layers) is sharded as its own unit first, so only
    one block's full weights are gathered at a time; the rest of the model forms the root unit. 0-d
    parameters, which FSDP2 cannot shard, are left out of it and kept whole, gradients averaged.
    Without a process group the model is returned unwrapped.
    """
    model = model.to(ctx.device)
    if not dist.is_initialized():
        return model
    if strategy == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    # FSDP2 cannot shard a 0-d parameter (open_clip's logit_scale): such scalars stay whole on every
    # rank, as under DDP, and the trainable ones' gradients are averaged over the processes as backward
    # makes them
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_hook(all_reduce_mean)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=scalars or None)
    fully_shard(model, mesh=mesh, ignored_params=scalars or None)
    return model


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all processes, as a new detached tensor (for logged metrics)."""
    if not dist.is_initialized():
        return tensor.detach()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.AVG)
    return out


def barrier() -> None:
    """Wait for every process (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    """Whether this is global rank 0, the process that writes checkpoints, logs and outputs."""
    return not dist.is_initialized() or dist.get_rank() == 0


def cleanup() -> None:
    """Leave the process group, if one was joined. Call it once the wrapped model is unreachable.

    A DDP or FSDP model keeps the group alive after ``destroy_process_group``; if it is still alive
    when Python exits, a gloo worker thread can take the GIL during interpreter shutdown and abort the
    process (SIGABRT, "terminate called without an active exception"; 5 of 20 two-process CPU runs
    here). Collecting the dropped wrapper's reference cycles first lets the group be freed in order.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def stage_main(stage: str, description: str, train: Callable[..., dict | None]) -> None:
    """The body of a training stage's torchrun module (``-m unclip.train.<stage> --run-dir D --stage NAME
    --context C.json``): ``train(config, context, out_dir, dist_context)`` runs on every rank, and what
    rank 0 returns ({"outputs", "metrics", "model"}) is written to ``D/NAME/result.json``."""
    import argparse

    from torch.distributed.elastic.multiprocessing.errors import record

    from unclip import storage
    from unclip.config import RunConfig

    @record
    def run() -> None:
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("--run-dir", required=True)
        ap.add_argument("--stage", default=stage)
        ap.add_argument("--context", required=True)
        a = ap.parse_args()
        context = storage.read_json(a.context)
        context["stage"] = a.stage  # one module may serve several stages (upsampler1, upsampler2)
        config = RunConfig.model_validate(context["config"])
        out = storage.join(a.run_dir, a.stage)
        dist_ctx = init(config.train.launch.backend, timeout_s=config.train.launch.timeout_minutes * 60)
        try:
            result = train(config, context, out, dist_ctx)
            if result is not None:
                storage.write_json(storage.join(out, "result.json"), result)
        finally:
            cleanup()

    run()
