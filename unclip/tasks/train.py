"""Prefect tasks of the training stages: run one stage (in-process, or under torchrun with its
progress and the run's heartbeat followed from here), and publish a trained model as a version.

Used by ``retrain`` (every registered stage) and by the data pipeline's ``clip`` stage (CLIP trained
on the basic filter's kept pairs before embedding).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unclip import catalog, storage
from unclip.config import RunConfig
from unclip.tasks.common import Progress
from unclip.train import distributed, stages

HEARTBEAT_S = 60.0


@task(name="run-stage", task_run_name="{name}: {run_id}", cache_policy=NO_CACHE)
def run_stage(name: str, run_id: str, ctx: stages.StageContext) -> dict:
    stage = stages.REGISTRY[name]
    if stage.module is None:
        return stage.run(ctx)
    # a distributed stage: torchrun with train.launch; the module writes <run_dir>/<stage>/result.json
    out = storage.join(ctx.run_dir, name)
    steps = getattr(ctx.config.train, name).steps if hasattr(ctx.config.train, name) else 1
    with Progress(f"train-{name}", steps, f"{name}: training", unit="step") as progress:
        watch = _Watcher(out, progress, ctx)
        distributed.launch(ctx.config.train.launch, stage.module,
                           ["--run-dir", ctx.run_dir, "--stage", name, "--context", _context_file(ctx, out)],
                           log_path=storage.join(out, "torchrun.log"), on_wait=watch)
        watch()
    return storage.read_json(storage.join(out, "result.json"))


class _Watcher:
    """While torchrun runs: the trainer's progress.json into the progress artifact and the terminal
    bar, and a heartbeat on the run's catalog record (a run that stops beating no longer pins its
    dataset version against gc)."""

    def __init__(self, out: str, progress: Progress, ctx: stages.StageContext) -> None:
        self.uri, self.progress, self.ctx = storage.join(out, "progress.json"), progress, ctx
        self.beat = 0.0

    def __call__(self) -> None:
        import time

        if storage.exists(self.uri):
            try:
                step = int(storage.read_json(self.uri)["step"])
            except (ValueError, KeyError):  # being replaced: read it next time
                step = self.progress.done
            if step > self.progress.done:
                self.progress.advance(step - self.progress.done)
        if self.ctx.catalog and time.monotonic() - self.beat >= HEARTBEAT_S:
            self.beat = time.monotonic()
            run = catalog.get_run(self.ctx.catalog, self.ctx.run_id)
            catalog.save_run(self.ctx.catalog, run)


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
