"""One-click retraining (deployment ``retrain``) and evaluation of a run (deployment ``evaluate``).

``retrain`` resolves a dataset version in the catalog (default: the latest), splits its shards into
training and held-out ones, and runs the chosen training and evaluation stages in order, each as a
task (training stages that need GPUs carry the ``gpu`` concurrency tag and run under torchrun). The
run, its lineage (dataset version, PCA version, code version, config) and every stage's metrics are
recorded in the catalog (``catalog/runs/<run id>.json``) as each stage finishes, so a failed run
shows how far it got. A training stage that produces a model publishes it as a model version in the
catalog (``unclip models``). ``resume`` continues a run: the stages it finished are skipped and the
one it was in continues from its last checkpoint (the trainer finds it in the stage's folder).
``evaluate`` runs the evaluation stages again on a named run.

The parameters are pydantic models: the Prefect UI shows them as a form, with each training
stage's main settings (steps, batch size, learning rate, checkpoint interval, seed) as typed fields.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from unclip import catalog, locks, manifest, storage
from unclip.config import ConfigError, RunConfig, deep_merge, load_config, resolve_config_path
from unclip.tasks import train as train_tasks
from unclip.tasks.common import publish_markdown
from unclip.train import stages

# the registered stages at import time: a training issue's `stages.register` extends the form
StageName = Literal[tuple(stages.names())]  # type: ignore[valid-type]
EvalName = Literal[tuple(stages.names("eval"))]  # type: ignore[valid-type]


class StageSettings(BaseModel):
    """A training stage's main settings; a field left empty keeps the config's ``train.<stage>`` value."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, description="Optimiser steps.")
    batch_size: int | None = Field(None, ge=1, description="Global batch (samples per optimiser step).")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Peak learning rate.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps (at most `steps`).")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints.")
    seed: int | None = Field(None, description="Seed of the initialisation, data order and augmentation.")

    def as_overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RetrainParams(BaseModel):
    """What to train, on which dataset version, with which configuration."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("configs/demo.yaml", description="Run config YAML (relative to the project root, or absolute).")
    workdir: str = Field("work/demo", description="The dataset's working directory (holds its catalog by default).")
    dataset_version: str = Field("latest", description="'latest', a release name (v000003) or a version (ds-...).")
    stages: list[StageName] = Field(default_factory=stages.default_retrain_stages,
                                    description="Stages to run, in pipeline order (by default all but `clip`: "
                                    "the others train on the embeddings of the CLIP the dataset version names).")
    clip: StageSettings = Field(default_factory=StageSettings, description="Stage `clip`: CLIP training.")
    prior_diffusion: StageSettings = Field(default_factory=StageSettings,
                                           description="Stage `prior_diffusion`: the diffusion prior's training.")
    prior_ar: StageSettings = Field(default_factory=StageSettings, description="Stage `prior_ar`: the AR prior's "
                                    "training.")
    decoder: StageSettings = Field(default_factory=StageSettings, description="Stage `decoder`: the decoder's "
                                   "training.")
    upsampler1: StageSettings = Field(default_factory=StageSettings, description="Stage `upsampler1`: upsampler 1's "
                                      "training.")
    upsampler2: StageSettings = Field(default_factory=StageSettings, description="Stage `upsampler2`: upsampler 2's "
                                      "training.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Nested config values to override.")
    run_name: str | None = Field(None, description="A label for the run (its id is generated).")
    resume: str | None = Field(None, description="A run id to continue: its finished stages are skipped, the "
                               "stage it was in resumes from its last checkpoint (other fields are then ignored).")
    catalog: str | None = Field(None, description="With resume: the catalog holding the run; default: the "
                                "workdir's (where its data pipeline publishes).")

    def config_overrides(self) -> dict:
        """``overrides`` with the typed stage settings on top (``train.<stage>``)."""
        typed = {name: getattr(self, name).as_overrides() for name in TRAIN_STAGE_FIELDS}
        typed = {k: v for k, v in typed.items() if v}
        return deep_merge(self.overrides, {"train": typed}) if typed else dict(self.overrides)


TRAIN_STAGE_FIELDS = ("clip", "prior_diffusion", "prior_ar", "decoder", "upsampler1", "upsampler2")


class EvaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run to evaluate (see `unclip runs`).")
    workdir: str = Field("work/demo", description="The dataset's working directory.")
    catalog: str | None = Field(None, description="The catalog holding the run; default: the workdir's.")
    config: str | None = Field(None, description="Config YAML; default: the one the run was made with.")
    stages: list[EvalName] = Field(default_factory=lambda: list(stages.names("eval")))


def _params() -> dict:
    """The flow run's ``params`` parameter as a dict (a model in-process, a dict from the API)."""
    p = flow_run.parameters.get("params") or {}
    return p.model_dump() if isinstance(p, BaseModel) else p


def _retrain_name() -> str:
    p = _params()
    if p.get("resume"):
        return f"retrain: resume {p['resume']}"
    return f"retrain: {','.join(p.get('stages') or stages.default_retrain_stages())} on {p.get('dataset_version', 'latest')}"


def _evaluate_name() -> str:
    return f"evaluate: {_params().get('run_id', '?')}"


def _run_stages(run: dict, cfg: RunConfig, release: dict, names: list[str], where: str, workdir: str,
                skip_finished: bool = False, final_state: str = "completed") -> dict:
    log = get_run_logger()
    # the split is the run's: evaluate reuses the fraction retrain held out, whatever its config says
    run.setdefault("eval_fraction", cfg.train.eval_fraction)
    files = catalog.kept_files(release)
    if "held_out_shards" in run:  # resume and evaluate: the split the run trained with, whatever the code now does
        held_mask = pa.array(np.isin(np.array(files.column("shard").to_pylist(), dtype=object), run["held_out_shards"]))
        train, held = files.filter(pc.invert(held_mask)), files.filter(held_mask)
    else:
        train, held = stages.split_files(files, run["eval_fraction"])
        run["held_out_shards"] = held.column("shard").to_pylist()
    ctx = stages.StageContext(run["run_id"], run["run_dir"], cfg, release, train, held,
                              previous=dict(run.get("stages", {})), catalog=where,
                              lineage={"run_id": run["run_id"], "dataset_version": release["version"],
                                       "release": release["release"], "pca_version": run.get("pca_version"),
                                       "code_version": (run.get("resumes") or [run])[-1].get("code_version")})
    todo = [n for n in sorted(set(names), key=list(stages.REGISTRY).index)
            if not (skip_finished and n in run.get("stages", {}))]
    for name in sorted(set(names) - set(todo), key=list(stages.REGISTRY).index):
        log.info("%s: finished in this run before, skipped", name)
    stages.check(ctx, todo)  # what would fail a stage when it starts, before any of them does
    if any(stages.REGISTRY[n].gpu for n in todo):
        locks.ensure_gpu_limit()
    for name in todo:
        stage = stages.REGISTRY[name]
        runner = train_tasks.run_stage.with_options(tags=[locks.GPU_TAG] if stage.gpu else [])
        run["state"] = f"running {name}"
        catalog.save_run(where, run)
        with train_tasks.heartbeat(where, run["run_id"]):  # also while the task waits for a GPU slot
            result = runner(name, run["run_id"], ctx)
        if result.get("model"):
            model = train_tasks.publish_model(where, name, result, cfg, ctx.lineage)
            run.setdefault("models", {})[name] = model["version"]
        ctx.previous[name] = result
        # the stage's own settings as it ran (evaluate may run with another config than the run's)
        section = getattr(cfg.train, name, None)
        settings = {"settings": section.model_dump(mode="json")} if isinstance(section, BaseModel) else {}
        run.setdefault("stages", {})[name] = {"kind": stage.kind, **result, **settings,
                                              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        run.setdefault("metrics", {}).update({f"{name}/{k}": v for k, v in result["metrics"].items()
                                              if isinstance(v, (int, float, str, bool))})
        if name == "pca":  # the models trained after it in this run are coded with it (the AR prior)
            run["pca_version"] = ctx.lineage["pca_version"] = result["metrics"]["pca_version"]
        log.info("%s: %s", name, json.dumps(result["metrics"], default=str)[:500])
    run["state"] = final_state
    return catalog.save_run(where, run)


def _run_and_publish(run: dict, cfg: RunConfig, release: dict, names: list[str], where: str, workdir: str, *,
                     evaluation: bool = False, skip_finished: bool = False, final_state: str = "completed") -> dict:
    """Run the stages; a failure is recorded in the run's catalog entry before it propagates: as its
    state, or (``evaluate``, which leaves the training's state as it was) as its ``evaluation_error``.
    A new run that a wrong config stops before its first stage is not recorded at all."""
    try:
        run = _run_stages(run, cfg, release, names, where, workdir, skip_finished, final_state)
    except BaseException as err:
        if isinstance(err, ConfigError) and "stages" not in run and "resumes" not in run:
            raise  # nothing ran and nothing to resume: fix the config and start again
        message = f"{'evaluation failed' if evaluation else 'failed'}: {type(err).__name__}: {err}"[:500]
        if evaluation:
            run.update(state=final_state, evaluation_error=message)
        else:
            run["state"] = message
        catalog.save_run(where, run)
        raise
    _publish_run(run)
    return run


def _publish_run(run: dict) -> None:
    lines = [f"# run `{run['run_id']}`" + (f" ({run['name']})" if run.get("name") else ""), "",
             f"- dataset version: {run['release']} `{run['dataset_version']}`",
             f"- PCA version: `{run.get('pca_version')}`", f"- code version: `{run['code_version']}`",
             f"- stages: {', '.join(run.get('stages', {}))}", f"- run folder: `{run['run_dir']}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in sorted(run.get("metrics", {}).items())]
    publish_markdown("run", "summary", "\n".join(lines), f"run {run['run_id']}: lineage and metrics")


@flow(name="retrain", flow_run_name=_retrain_name)
def retrain(params: RetrainParams = RetrainParams()) -> dict:
    """Run the staged trainings and evaluations on a dataset version; record the run in the catalog."""
    workdir = storage.absolute(params.workdir)
    if params.resume:
        where = params.catalog or catalog.locate(workdir)[0]
        run = catalog.get_run(where, params.resume)
        cfg = RunConfig.model_validate(run["config"])
        release = catalog.resolve(where, cfg.name, run["dataset_version"])
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        run.update(state="starting", resumed_at=now)
        # the code that trains from here on, which the models it publishes record (the run's code_version
        # stays the one it started with)
        run.setdefault("resumes", []).append({"at": now, "code_version": manifest.code_version()})
        return _run_and_publish(run, cfg, release, run["requested_stages"], where, workdir, skip_finished=True)
    cfg = load_config(resolve_config_path(params.config), params.config_overrides(), variables={"workdir": workdir})
    where = catalog.catalog_uri(cfg, workdir)
    release = catalog.resolve(where, cfg.name, params.dataset_version)
    started = dt.datetime.now(dt.timezone.utc)
    run_id = f"run-{started:%Y%m%d-%H%M%S}-{str(flow_run.id or 'local')[:6]}"
    run = {"run_id": run_id, "name": params.run_name, "kind": "retrain", "state": "starting",
           "started_at": started.isoformat(timespec="seconds"), "flow_run_id": str(flow_run.id),
           "dataset_version": release["version"], "release": release["release"],
           "pca_version": release.get("pca_version"), "code_version": manifest.code_version(),
           "run_dir": storage.join(workdir, "runs", run_id), "config": cfg.model_dump(mode="json"),
           "config_path": params.config, "overrides": params.config_overrides(),
           "requested_stages": list(params.stages)}
    return _run_and_publish(run, cfg, release, list(params.stages), where, workdir)


@flow(name="evaluate", flow_run_name=_evaluate_name)
def evaluate(params: EvaluateParams) -> dict:
    """Run the evaluation stages on a finished run; its metrics are added to the run's record."""
    workdir = storage.absolute(params.workdir)
    where = params.catalog or catalog.locate(workdir)[0]
    run = catalog.get_run(where, params.run_id)
    if catalog.run_is_live(run):  # its flow holds its own copy of the record: one of the two would be lost
        raise RuntimeError(f"run {params.run_id} is live ({run['state']!r}, last beat {run.get('updated_at')}): "
                           "evaluate it once it has finished or failed (a run that stopped without saying so "
                           f"counts as live for {catalog.RUN_LEASE_S / 60:.0f} minutes after its last beat)")
    cfg = (load_config(resolve_config_path(params.config), variables={"workdir": workdir}) if params.config
           else RunConfig.model_validate(run["config"]))
    release = catalog.resolve(where, run["config"]["name"], run["dataset_version"])
    # an evaluation leaves the training's state as it was: a failed run evaluated is still a failed run
    # (``unclip demo`` resumes a run that is not "completed"); one killed while running reads "stopped"
    trained = run.get("state", "completed")
    if catalog.run_stopped(run):
        trained = f"stopped ({trained})"
    run.pop("evaluation_error", None)
    return _run_and_publish(run, cfg, release, list(params.stages), where, workdir, evaluation=True,
                            final_state=trained)
