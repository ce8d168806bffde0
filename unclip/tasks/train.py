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
    with _heartbeat(ctx):
        if stage.module is None:
            return stage.run(ctx)
        # a distributed stage: torchrun with train.launch; the module writes <run_dir>/<stage>/result.json
        out = storage.join(ctx.run_dir, name)
        steps = getattr(ctx.config.train, name).steps if hasattr(ctx.config.train, name) else 1
        launch = ctx.config.train.launch
        with locks.gpu_devices(launch.nproc_per_node) as gpus, \
                Progress(f"train-{name}", steps, f"{name}: training", unit="step") as progress, \
                _local_log(storage.join(out, "torchrun.log")) as log_path:
            watch = _Watcher(out, progress)
            distributed.launch(launch, stage.module,
                               ["--run-dir", ctx.run_dir, "--stage", name, "--context", _context_file(ctx, out)],
                               log_path=log_path, on_wait=watch,
                               env={"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else None)
            watch()
    return storage.read_json(storage.join(out, "result.json"))


@contextlib.contextmanager
def _heartbeat(ctx: stages.StageContext) -> Iterator[None]:
    """While a stage runs (in this process or under torchrun), its run's catalog record is re-saved
    every ``HEARTBEAT_S``: a run that stops beating no longer pins its dataset version against gc
    (``catalog.run_is_live``). The beating thread is joined before the stage's result goes back to the
    flow, so no beat writes over the flow's own save of the record; a failed beat (the catalog's store
    unreachable for a while) is logged, and the stage goes on."""
    if not ctx.catalog:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        failures = 0
        while not stop.wait(HEARTBEAT_S):
            try:
                catalog.save_run(ctx.catalog, catalog.get_run(ctx.catalog, ctx.run_id))
                failures = 0
            except Exception as err:  # noqa: BLE001 - the next beat may get through; the lease is an hour
                failures += 1
                _log.warning("run %s: heartbeat %d failed in a row: %s: %s", ctx.run_id, failures,
                             type(err).__name__, err)

    thread = threading.Thread(target=beat, name=f"heartbeat-{ctx.run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def _local_log(uri: str) -> Iterator[str]:
    """A local path for torchrun's log (it writes a file): ``uri`` itself when local, else a temporary
    file uploaded to ``uri`` when the job ends, failed or not."""
    if storage.is_local(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="unclip-torchrun-") as tmp:
        path = os.path.join(tmp, "torchrun.log")
        try:
            yield path
        finally:
            if os.path.exists(path):
                storage.write_bytes(uri, Path(path).read_bytes())


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
