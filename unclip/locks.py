"""Concurrency: one writer per workdir, one refresh per dataset, and GPU slots for training tasks.

- Every run of the data pipeline holds its workdir (``workdir_lock``): an exclusive ``flock`` on
  ``<workdir>/.unclip.lock`` for a local workdir (the kernel frees it when the holder dies, however
  it dies), or a leased global concurrency limit named after the workdir for a remote one (s3://...,
  where runs may sit in different pods). A second run on the same workdir fails after its timeout,
  saying the workdir is in use.

- A dataset's refresh holds the slot of a global concurrency limit of size 1 named after the dataset
  and its catalog (``refresh_lock``). A second refresh of the same dataset waits for the slot (up to
  its timeout, then fails without touching the data). Slots are leases: a refresh whose process is
  killed stops renewing its lease and the slot frees itself after ``lease_duration``.
- Training tasks carry the tag ``gpu``; the tag's concurrency limit stands for the GPUs: the server
  runs at most that many such task runs at once. A task run is one training job (``train.launch``:
  ``nnodes`` x ``gpu_slots`` GPUs), so on a machine or pool of N GPUs split into jobs of G GPUs the
  limit is N / G (``unclip server --gpus``; ``ensure_gpu_limit`` creates it with 1 if missing).
  On one machine, ``gpu_devices`` then gives each job its own GPUs (``CUDA_VISIBLE_DEVICES``), so
  jobs running side by side do not all land on the first ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from unclip import storage

GPU_TAG = "gpu"


def refresh_lock_name(dataset: str, catalog: str) -> str:
    return f"unclip-refresh-{dataset}-{hashlib.sha256(catalog.encode()).hexdigest()[:8]}"


def ensure_global_limit(name: str, limit: int = 1) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another refresh created it first
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@contextlib.contextmanager
def refresh_lock(dataset: str, catalog: str, timeout_s: float | None, lease_s: float = 300) -> Iterator[str]:
    """Hold the dataset's refresh slot for the block; ``TimeoutError`` if not free within ``timeout_s``."""
    name = refresh_lock_name(dataset, catalog)
    ensure_global_limit(name, 1)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True):
        yield name


class WorkdirBusy(TimeoutError):
    """Another run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: str, timeout_s: float | None, lease_s: float = 300) -> Iterator[None]:
    """Hold ``workdir`` for the block: no other pipeline run writes it meanwhile."""
    if storage.is_local(workdir):
        path = os.path.join(storage.fs_and_path(workdir)[1], ".unclip.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WorkdirBusy(f"workdir {workdir} is in use by another run (it holds {path}); "
                                          "wait for it to finish or use another --workdir") from None
                    time.sleep(0.5)
            yield
        finally:
            os.close(fd)  # closing releases the lock
        return
    name = f"unclip-workdir-{hashlib.sha256(workdir.encode()).hexdigest()[:12]}"
    ensure_global_limit(name, 1)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=lease_s, strict=True):
            yield
    except TimeoutError as err:
        if isinstance(err, WorkdirBusy):
            raise
        raise WorkdirBusy(f"workdir {workdir} is in use by another run (limit {name})") from err


def ensure_gpu_limit(default: int = 1) -> None:
    """Create the ``gpu`` tag limit with ``default`` slots if it is missing; an existing one (set by
    ``unclip server --gpus`` or ``prefect concurrency-limit create gpu N``) is left as it is."""
    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=default)


GPU_LOCK_DIR = os.environ.get("UNCLIP_GPU_LOCK_DIR", "/tmp/unclip-gpu-locks")


@dataclass(frozen=True)
class GpuLease:
    """GPUs held for one job: ``devices`` as a ``CUDA_VISIBLE_DEVICES`` value for a child process,
    ``indices`` as this process's torch device indices, ``fds`` the open lock files (pass them to a
    child, ``subprocess.Popen(pass_fds=...)``, and the GPUs stay held while it lives, even if this
    process dies)."""

    devices: str
    indices: tuple[int, ...]
    fds: tuple[int, ...]


@contextlib.contextmanager
def gpu_devices(count: int, *, timeout_s: float = 24 * 3600.0, poll_s: float = 5.0) -> Iterator[GpuLease | None]:
    """``count`` of this machine's GPUs for one job, held (an exclusive ``flock`` per GPU under
    ``GPU_LOCK_DIR``, which the kernel frees when the last process holding the lock file ends, however
    it ends) until the block ends; waits while other jobs hold them, all or none, so two jobs never
    hold parts of each other's. The GPUs are those ``CUDA_VISIBLE_DEVICES`` lists, else all that torch
    sees. None without CUDA (nothing to hold); a ``RuntimeError`` when the machine has fewer than
    ``count``, or after ``timeout_s``."""
    import torch

    if not torch.cuda.is_available():
        yield None
        return
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in listed.split(",") if d.strip()] if listed else \
        [str(i) for i in range(torch.cuda.device_count())]
    if count > len(visible):
        raise RuntimeError(f"a job of {count} GPU(s) on a machine that has {len(visible)} ({','.join(visible)})")
    if not os.path.isdir(GPU_LOCK_DIR):
        os.makedirs(GPU_LOCK_DIR, exist_ok=True)
        with contextlib.suppress(OSError):  # every user's jobs share the machine's GPUs
            os.chmod(GPU_LOCK_DIR, 0o1777)
    held: list[tuple[int, int]] = []  # (position in visible, fd)
    deadline, waited = time.monotonic() + timeout_s, False
    try:
        while True:
            for i, device in enumerate(visible):
                if len(held) == count:
                    break
                # read-only suffices for flock, so another user's lock file serves too
                fd = os.open(os.path.join(GPU_LOCK_DIR, f"gpu-{device}.lock"), os.O_CREAT | os.O_RDONLY, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                except BaseException:
                    os.close(fd)
                    raise
                held.append((i, fd))
            if len(held) == count:
                break
            for _, fd in held:  # all or none: holding some while waiting for more could deadlock two jobs
                os.close(fd)
            held = []
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no {count} free GPU(s) of {','.join(visible)} in {timeout_s:g} s "
                                   f"(held by other jobs: {GPU_LOCK_DIR})")
            if not waited:
                waited = True
                logging.getLogger(__name__).warning("waiting for %d free GPU(s) of %s (held by other jobs: %s)",
                                                    count, ",".join(visible), GPU_LOCK_DIR)
            time.sleep(poll_s)
        yield GpuLease(",".join(visible[i] for i, _ in held), tuple(i for i, _ in held), tuple(fd for _, fd in held))
    finally:
        for _, fd in held:
            os.close(fd)
