"""Prefect tasks of the training stages: run one stage (in-process, or under torchrun with its
progress and the run's heartbeat followed from here), and publish a trained model as a version.

Used by ``retrain`` (every registered stage) and by the data pipeline's ``clip`` stage (CLIP trained
on the basic filter's kept pairs before embedding).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unclip import catalog, locks, storage
from unclip.config import RunConfig
from unclip.tasks.common import Progress
from unclip.train import distributed, stages

HEARTBEAT_S = 60.0
_log = logging.getLogger(__name__)


@task(name="run-stage", task_run_name="{name}: {run_id}", cache_policy=NO_CACHE)
def run_stage(name: str, run_id: str, ctx: stages.StageContext) -> dict:
    stage = stages.REGISTRY[name]
    if stage.module is None:
        # in this process; a GPU stage (the evaluations) on a GPU no other job holds, as its "cuda"
        with (locks.gpu_devices(1) if stage.gpu else contextlib.nullcontext()) as lease, _current_gpu(lease):
            return stage.run(ctx)
    # a distributed stage: torchrun with train.launch; the module writes <run_dir>/<stage>/result.json
    out = storage.join(ctx.run_dir, name)
    steps = getattr(ctx.config.train, name).steps if hasattr(ctx.config.train, name) else 1
    launch = ctx.config.train.launch
    log_uri = storage.join(out, "torchrun.log")
    # torchrun keeps the GPU locks open: they stay held while it runs, even if this process dies
    with locks.gpu_devices(launch.nproc_per_node) as lease, \
            Progress(f"train-{name}", steps, f"{name}: training", unit="step") as progress, \
            _local_log(log_uri) as log_path:
        watch = _Watcher(out, progress)
        distributed.launch(launch, stage.module,
                           ["--run-dir", ctx.run_dir, "--stage", name, "--context", _context_file(ctx, out)],
                           log_path=log_path, on_wait=watch, log_name=log_uri,
                           env={"CUDA_VISIBLE_DEVICES": lease.devices} if lease else None,
                           pass_fds=lease.fds if lease else ())
        watch()
    return storage.read_json(storage.join(out, "result.json"))


@contextlib.contextmanager
def _current_gpu(lease: locks.GpuLease | None) -> Iterator[None]:
    """The lease's (first) GPU as this thread's current CUDA device while the block runs."""
    if lease is None:
        yield
        return
    import torch

    before = torch.cuda.current_device()
    torch.cuda.set_device(lease.indices[0])
    try:
        yield
    finally:
        torch.cuda.set_device(before)


@contextlib.contextmanager
def heartbeat(where: str | None, run_id: str) -> Iterator[None]:
    """While the block runs (a stage, and its wait for a GPU slot), run ``run_id``'s catalog record
    is re-saved every ``HEARTBEAT_S``, so the run counts as live (``catalog.run_is_live``). The beating
    thread is joined when the block ends, before the flow saves the record itself, so no beat writes
    over the flow's save; a failed beat (the catalog's store unreachable for a while) is logged, and
    the stage goes on."""
    if not where:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        failures = 0
        while not stop.wait(HEARTBEAT_S):
            try:
                catalog.save_run(where, catalog.get_run(where, run_id))
                failures = 0
            except Exception as err:  # noqa: BLE001 - the next beat may get through; the lease is an hour
                failures += 1
                _log.warning("run %s: heartbeat %d failed in a row: %s: %s", run_id, failures,
                             type(err).__name__, err)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _local_log(uri: str) -> Iterator[str]:
    """A local path for torchrun's log (it writes a file): ``uri`` itself when local, else a temporary
    file uploaded to ``uri`` when the job ends, failed or not (a failed upload is logged, and does not
    hide the job's own error)."""
    if storage.is_local(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="unclip-torchrun-") as tmp:
        path = os.path.join(tmp, "torchrun.log")
        try:
            yield path
        finally:
            if os.path.exists(path):
                try:
                    storage.write_bytes(uri, Path(path).read_bytes())
                except Exception as err:  # noqa: BLE001 - see the docstring
                    _log.warning("torchrun's log not uploaded to %s: %s: %s", uri, type(err).__name__, err)


class _Watcher:
    """While torchrun runs: the trainer's progress.json into the progress artifact and the terminal
    bar. A read that fails (the file being replaced, the store briefly unreachable) is skipped: the next
    poll, 2 s later, reads it again; the training is never stopped for it."""

    def __init__(self, out: str, progress: Progress) -> None:
        self.uri, self.progress = storage.join(out, "progress.json"), progress
        self.failures = 0

    def __call__(self) -> None:
        try:
            step = int(storage.read_json(self.uri)["step"]) if storage.exists(self.uri) else self.progress.done
            self.failures = 0
        except Exception as err:  # noqa: BLE001 - see the class docstring
            self.failures += 1
            if self.failures % 150 == 1:  # the first, then every 5 minutes of failing
                _log.warning("progress of %s not read (%d in a row): %s: %s", self.uri, self.failures,
                             type(err).__name__, err)
            return
        if step > self.progress.done:
            self.progress.advance(step - self.progress.done)


def _context_file(ctx: stages.StageContext, out: str) -> str:
    """Everything a torchrun rank needs, in files: the config, the split's file lists, the lineage."""
    train_uri = storage.write_parquet(storage.join(out, "train_files.parquet"), ctx.train_files)
    eval_uri = storage.write_parquet(storage.join(out, "eval_files.parquet"), ctx.eval_files)
    uri = storage.join(out, "context.json")
    storage.write_json(uri, {"run_id": ctx.run_id, "run_dir": ctx.run_dir, "release": ctx.release["release"],
                             "dataset_version": ctx.release["version"], "catalog": ctx.catalog,
                             "config": ctx.config.model_dump(mode="json"), "previous": ctx.previous,
                             "train_files": train_uri, "eval_files": eval_uri, "lineage": ctx.lineage,
                             "release_record": ctx.release})
    return uri


def publish_model(where: str, name: str, result: dict, cfg: RunConfig, lineage: dict) -> dict:
    """Release a stage's model (``result["model"]``) in the catalog with its lineage; the version id
    goes into the stage's outputs."""
    # the run's lineage, then what the stage itself reports (the AR prior: the PCA it coded with)
    model = catalog.publish_model(where, {
        "run_id": lineage.get("run_id"), "dataset_version": lineage.get("dataset_version"),
        "release": lineage.get("release"), "pca_version": lineage.get("pca_version"),
        "code_version": lineage.get("code_version"), **result["model"], "stage": name,
        "config": getattr(cfg.train, name).model_dump(mode="json") if hasattr(cfg.train, name) else {},
        "metrics": {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float, str, bool))}})
    result["outputs"]["model_version"] = model["version"]
    get_run_logger().info("%s: model version %s%s", name, model["version"],
                          "" if model["new"] else " (already in the catalog)")
    return model
