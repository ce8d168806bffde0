"""The data half of the unCLIP pipeline as Prefect flows (MISSION "The pipeline", stages 1, 2, 4, 5).

``data_pipeline`` runs the stage subflows in order: ingest -> basic_filter -> embed ->
semantic_filter -> pca. Each subflow reads its inputs from the workdir's manifest, runs tasks over
batches of shards (so a 65,000-shard run makes hundreds of task runs, not tens of thousands), checks
that its rows are all accounted for (rows in = rows kept + rows dropped), records its lineage in the
manifest and publishes its counts, progress and lineage as Prefect artifacts. Flows pass URIs and
small summaries; the data stays in Parquet and tar files.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect.futures import as_completed, wait

from unclip import bookkeeping, catalog, locks, manifest, runners, storage
from unclip.config import DATA_STAGES, ClipModelConfig, EmbedConfig, RunConfig, stages_until
from unclip.tasks import embed as embed_tasks
from unclip.tasks import filter as filter_tasks
from unclip.tasks import ingest as ingest_tasks
from unclip.tasks import pca as pca_tasks
from unclip.tasks import semantic as semantic_tasks
from unclip.tasks import train as train_tasks
from unclip.train import stages as train_stages
from unclip.tasks.common import (Progress, batched, count_reasons, publish_counts, publish_markdown,
                                 publish_table)


def run_name(stage: str):
    """A flow-run name saying what runs on what: ``<stage>: <dataset name>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        cfg = flow_run.parameters.get("config")
        dataset = getattr(cfg, "name", None) or (cfg.get("name") if isinstance(cfg, dict) else None) or "?"
        return f"{stage}: {dataset}"

    name.__name__ = f"name_{stage.replace('-', '_')}"
    return name


def _read_index(uri: str) -> list[dict]:
    return storage.read_parquet(uri).to_pylist()


def _finish_stage(workdir: str, config: RunConfig, stage: str, record: dict[str, Any]) -> dict:
    """Check the accounting, write the manifest record, publish the counts and the lineage."""
    bookkeeping.check_accounting(stage, record["rows_in"], record["rows_kept"], record["drops_by_reason"])
    record = {"stage": stage, "accounted": True, **record}
    record = manifest.record_stage(workdir, stage, record, run_config=config.model_dump(mode="json"))["stages"][stage]
    publish_counts(stage, record["rows_in"], record["rows_kept"], record["drops_by_reason"])
    publish_markdown(stage, "lineage", bookkeeping.lineage_markdown(stage, record, workdir),
                     f"{stage}: lineage and outputs")
    return record


def _work_dir(workdir: str, stage: str) -> str:
    # run-scoped scratch space: a stale file from an earlier, different run can never be read
    return storage.join(workdir, stage, "work", uuid.uuid4().hex[:12])


def _run_batches(config: RunConfig, task, batches: list, *args, progress: Progress | None = None,
                 gpus: float = 0.0) -> list:
    """One task run per shard batch on the configured runner; progress advances as batches finish
    (in this process: the runner may be a process pool or a Ray cluster)."""
    with runners.task_options(config.orchestration, gpus=gpus):
        futures = [task.submit(i, list(b), *args) for i, b in enumerate(batches)]
    sizes = {f.task_run_id: len(b) for f, b in zip(futures, batches)}
    for f in as_completed(futures):
        if progress is not None:
            progress.advance(sizes[f.task_run_id])
    return [f.result() for f in futures]


def _write_index(workdir: str, name: str, result_uris: list[str], schema: pa.Schema) -> tuple[pa.Table, str]:
    """Concatenate the batch tasks' result files into the stage's per-shard index ``index/<name>.parquet``."""
    tables = [storage.read_parquet(u) for u in result_uris]
    index = pa.concat_tables(tables) if tables else schema.empty_table()
    return index, storage.write_parquet(storage.join(workdir, "index", f"{name}.parquet"), index)


# --------------------------------------------------------------------------------------------------
@flow(name="ingest", flow_run_name=run_name("ingest"))
def ingest_flow(config: RunConfig, workdir: str) -> dict:
    """Partition each source's URL lists and download new partitions with img2dataset."""
    log = get_run_logger()
    sources = {s.name: s for s in config.sources}
    ranks = {s.name: i for i, s in enumerate(config.sources)}
    futures = [ingest_tasks.partition_source.submit(s, workdir, config.ingest) for s in config.sources]
    wait(futures)
    per_source = [f.result() for f in futures]
    files = [f for r in per_source for f in r["files"]]
    parts = [p for r in per_source for p in r["partitions"]]
    finished = [ingest_tasks.partition_is_done(workdir, p) for p in parts]
    todo = [p for p, f in zip(parts, finished) if not f]
    done = [ingest_tasks.done_uri(workdir, p) for p, f in zip(parts, finished) if f]
    log.info("%d input files, %d partitions, %d to download", len(files), len(parts), len(todo))
    shards_todo = sum(math.ceil(p["rows"] / config.ingest.samples_per_shard) for p in todo)
    with Progress("ingest", shards_todo, "ingest: downloading shards") as prog:
        # img2dataset parallelises inside a call (processes x threads), so calls go one at a time
        for name in sources:
            mine = [p for p in todo if p["source"] == name]
            for group in batched(mine, config.ingest.partitions_per_call):
                label = f"{len(group)} partitions from {group[0]['partition_id']}"
                done += ingest_tasks.download_partitions(name, label, list(group), workdir, config.ingest,
                                                         sources[name].extra_cols, progress=prog,
                                                         ray_address=config.orchestration.ray.address)
    index_uri = ingest_tasks.write_shard_index(workdir, done, ranks)
    index = storage.read_parquet(index_uri)
    drop_files = [f["precheck_drops"] for f in files] + [storage.read_json(u)["download_drops"] for u in done]
    reasons = count_reasons(drop_files)
    kept = int(pc.sum(index.column("ok")).as_py() or 0)
    with_rows = index.filter(pc.greater(index.column("ok"), 0))
    version = manifest.dataset_version(pa.table({"shard": with_rows.column("shard"),
                                                 "digest": with_rows.column("content_sha256")}))
    return _finish_stage(workdir, config, "ingest", {
        "rows_in": sum(f["rows"] for f in files),
        "rows_kept": kept,
        "drops_by_reason": reasons,
        "dataset_version": version,
        "outputs": {"shard_index": index_uri, "shards": storage.join(workdir, "shards"),
                    "drops": storage.join(workdir, "drops", "ingest")},
        "drop_files": drop_files,
        "metrics": {"input_files": len(files), "partitions": len(parts), "partitions_downloaded": len(todo),
                    "shards": index.num_rows},
        "config": {"sources": [s.model_dump(mode="json") for s in config.sources],
                   "ingest": config.ingest.model_dump(mode="json")},
    })


@flow(name="basic_filter", flow_run_name=run_name("basic-filter"))
def basic_filter_flow(config: RunConfig, workdir: str) -> dict:
    """Per-sample checks, then exact de-duplication by content hash across all shards."""
    cfg = config.basic_filter
    ingested = manifest.stage(workdir, "ingest")
    shards = _read_index(ingested["outputs"]["shard_index"])
    work = _work_dir(workdir, "basic_filter")
    batches = list(batched(shards, config.orchestration.filter_shards_per_task))
    # a few bucket groups per parallel slot: balanced load without a task per bucket
    per_group = max(1, math.ceil(cfg.dedup_buckets / (config.orchestration.max_parallel_tasks * 4)))
    with Progress("basic-filter", len(shards), "basic filter: checking shards") as prog:
        _run_batches(config, filter_tasks.check_batch, batches, work, cfg, per_group, progress=prog)
    dedup = [filter_tasks.dedup_group.submit(g, work) for g in range(math.ceil(cfg.dedup_buckets / per_group))]
    wait(dedup)
    n_dups = sum(f.result() for f in dedup)
    result_uris = _run_batches(config, filter_tasks.finalize_batch, batches, work, workdir)
    index, index_uri = _write_index(workdir, "basic_filter", result_uris, filter_tasks.SHARD_RESULT_SCHEMA)
    storage.remove(work, recursive=True)
    return _finish_stage(workdir, config, "basic_filter", {
        "rows_in": ingested["rows_kept"],
        **bookkeeping.kept_and_drops(index),
        "dataset_version": bookkeeping.versioned_shards(index, workdir),
        "outputs": {"shard_index": index_uri, "kept": storage.join(workdir, "basic_filter", "kept"),
                    "drops": storage.join(workdir, "drops", "basic_filter")},
        "metrics": {"exact_duplicates": n_dups, "shards": index.num_rows},
        "config": {"basic_filter": cfg.model_dump(mode="json")},
    })


@flow(name="clip", flow_run_name=run_name("clip"))
def clip_flow(config: RunConfig, workdir: str) -> dict:
    """Train CLIP on the basic filter's kept pairs (stage 3), before anything is embedded.

    It bootstraps: when the catalog already has a CLIP model version the stage trains nothing (a daily
    refresh must not retrain CLIP; ``unclip retrain --stages clip`` does, and the next refresh
    re-embeds with ``clip@latest``). The pairs are split into training and held-out shards by the same
    shard-name hash ``retrain`` uses,
    so no evaluation ever sees a training pair. The run folder is named by the kept set and the
    training settings: a re-run with both unchanged finds the published model (and a killed one resumes
    from its checkpoint). The model is published as a ``clip`` model version; ``embed.model:
    {catalog: clip@latest}`` embeds with it.
    """
    filtered = manifest.stage(workdir, "basic_filter")
    where = catalog.catalog_uri(config, workdir)
    existing = catalog.models(where, "clip")
    if existing:  # bootstrap only: a refresh embeds with the released CLIP; `unclip retrain` trains anew
        get_run_logger().info("clip: the catalog has CLIP %s; not training one in the data pipeline",
                              existing[-1]["version"])
        return _finish_stage(workdir, config, "clip", {
            "rows_in": filtered["rows_kept"], "rows_kept": filtered["rows_kept"], "drops_by_reason": {},
            "dataset_version": filtered["dataset_version"], "outputs": {"model": existing[-1]["uri"]},
            "metrics": {**existing[-1].get("metrics", {}), "model_version": existing[-1]["version"], "trained": False},
            "config": {}})
    index = storage.read_parquet(filtered["outputs"]["shard_index"])
    files = index.filter(pc.greater(index.column("rows"), 0))
    train, held = train_stages.split_files(files, config.train.eval_fraction)
    key = hashlib.sha256(json.dumps([filtered["dataset_version"], config.train.clip.model_dump(mode="json"),
                                     config.train.eval_fraction], sort_keys=True).encode()).hexdigest()[:12]
    run_id = f"data-clip-{key}"
    lineage = {"run_id": run_id, "dataset_version": filtered["dataset_version"], "release": "basic_filter",
               "pca_version": None, "code_version": manifest.code_version()}
    ctx = train_stages.StageContext(run_id, storage.join(workdir, "runs", run_id), config,
                                    {"release": "basic_filter", "version": filtered["dataset_version"]},
                                    train, held, catalog=None, lineage=lineage)
    result_uri = storage.join(ctx.run_dir, "clip", "result.json")
    if storage.exists(result_uri):
        result = storage.read_json(result_uri)
    else:
        if train_stages.REGISTRY["clip"].gpu:
            locks.ensure_gpu_limit()
        result = train_tasks.run_stage.with_options(tags=[locks.GPU_TAG])("clip", run_id, ctx)
    model = train_tasks.publish_model(where, "clip", result, config, lineage)
    return _finish_stage(workdir, config, "clip", {
        "rows_in": filtered["rows_kept"], "rows_kept": filtered["rows_kept"], "drops_by_reason": {},
        "dataset_version": filtered["dataset_version"],
        "outputs": {**result["outputs"], "run_dir": ctx.run_dir},
        "metrics": {**{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float, str, bool))},
                    "model_version": model["version"], "trained": True, "train_shards": train.num_rows,
                    "heldout_shards": held.num_rows},
        "config": {"train": {"clip": config.train.clip.model_dump(mode="json"),
                             "eval_fraction": config.train.eval_fraction}},
    })


def _resolve_embed_model(config: RunConfig, workdir: str) -> tuple[EmbedConfig, str | None]:
    """``embed.model: {catalog: clip@latest}`` made concrete: the model version's architecture and
    released weights (so the embed digest follows the weights), and the version id for the lineage."""
    cfg = config.embed
    if cfg.model.catalog is None:
        return cfg, None
    model = catalog.resolve_model(catalog.catalog_uri(config, workdir), cfg.model.catalog)
    if model["kind"] != "clip":
        raise catalog.CatalogError(f"embed.model.catalog: {cfg.model.catalog} is a {model['kind']} model, not clip")
    concrete = ClipModelConfig(arch=model["arch"], checkpoint=model["weights"])
    return cfg.model_copy(update={"model": concrete}), model["version"]


@flow(name="embed", flow_run_name=run_name("embed"))
def embed_flow(config: RunConfig, workdir: str) -> dict:
    """open_clip image and text embeddings of every row the basic filter kept, one Parquet per shard."""
    cfg, model_version = _resolve_embed_model(config, workdir)
    filtered = manifest.stage(workdir, "basic_filter")
    shards = _read_index(filtered["outputs"]["shard_index"])
    batches = list(batched(shards, cfg.shards_per_task))
    model_id = embed_tasks.model_identity(cfg)
    result_uris = []
    with Progress("embed", len(shards), "embed: shards") as prog:
        if config.orchestration.task_runner == "ray":
            # on a cluster: batches in parallel, each asking Ray for embed.gpus_per_task GPUs (an
            # autoscaling cluster adds GPU nodes for them; 0 embeds on CPU workers)
            result_uris = _run_batches(config, embed_tasks.embed_batch, batches, workdir, cfg, model_id,
                                       progress=prog, gpus=cfg.gpus_per_task)
        else:
            # locally, one batch at a time: the model takes the whole machine (or its GPU)
            for i, b in enumerate(batches):
                result_uris.append(embed_tasks.embed_batch(i, list(b), workdir, cfg, model_id, progress=prog))
    index, index_uri = _write_index(workdir, "embed", result_uris, embed_tasks.EMBED_RESULT_SCHEMA)
    storage.remove(storage.join(workdir, "embed", "work"), recursive=True)
    return _finish_stage(workdir, config, "embed", {
        "rows_in": filtered["rows_kept"],
        **bookkeeping.kept_and_drops(index),
        "dataset_version": bookkeeping.versioned_shards(index, workdir),
        "outputs": {"shard_index": index_uri, "embeddings": storage.join(workdir, "embed", "candidates"),
                    "drops": storage.join(workdir, "drops", "embed")},
        "metrics": {"model": cfg.model.arch, "weights": cfg.model.weights, "model_identity": model_id,
                    "dtype": cfg.dtype, "model_version": model_version,
                    "random_init": cfg.model.seed is not None},
        "config": {"embed": cfg.model_dump(mode="json")},
    })


@flow(name="semantic_filter", flow_run_name=run_name("semantic-filter"))
def semantic_filter_flow(config: RunConfig, workdir: str) -> dict:
    """CLIP-score threshold and near-duplicate removal (faiss); writes the final embeddings Parquet."""
    cfg = config.semantic_filter
    embedded = manifest.stage(workdir, "embed")
    shards = _read_index(embedded["outputs"]["shard_index"])
    work = _work_dir(workdir, "semantic_filter")
    batches = list(batched(shards, config.orchestration.filter_shards_per_task))
    cells = semantic_tasks.n_cells(embedded["rows_kept"], cfg)
    centroids = semantic_tasks.train_centroids([s["embeddings"] for s in shards if s["rows"]], cells, work)
    with Progress("semantic-filter", len(shards), "semantic filter: shards") as prog:
        survivors = sum(_run_batches(config, semantic_tasks.score_and_assign, batches, work, cfg, centroids,
                                     progress=prog))
    n_near = 0
    if cfg.near_dup is not None and survivors:
        groups = sorted(int(p.rsplit("=", 1)[1]) for p in storage.listdir(storage.join(work, "cells")))
        futs = [semantic_tasks.near_dedup_group.submit(g, work, cfg.near_dup.threshold) for g in groups]
        wait(futs)
        n_near = sum(f.result() for f in futs)
    result_uris = _run_batches(config, semantic_tasks.finalize_batch, batches, work, workdir)
    index, index_uri = _write_index(workdir, "embeddings", result_uris, filter_tasks.SHARD_RESULT_SCHEMA)
    storage.remove(work, recursive=True)
    return _finish_stage(workdir, config, "semantic_filter", {
        "rows_in": embedded["rows_kept"],
        **bookkeeping.kept_and_drops(index),
        "dataset_version": bookkeeping.versioned_shards(index, workdir),
        "outputs": {"shard_index": index_uri, "embeddings": storage.join(workdir, "embeddings"),
                    "drops": storage.join(workdir, "drops", "semantic_filter")},
        "metrics": {"near_duplicates": n_near, "cells": cells,
                    "clip_random_init": config.embed.model.seed is not None,
                    **_judge_against_demo_truth(workdir, embedded, index)},
        "config": {"semantic_filter": cfg.model_dump(mode="json")},
    })


def _judge_against_demo_truth(workdir: str, embedded: dict, index: pa.Table) -> dict:
    """On the demo's data (its generator's plan beside the workdir's data): the semantic filter's
    precision and recall against the planted wrong captions and near duplicates, as ``truth/*``
    metrics and a table artifact. Empty for any other data."""
    plan_uri = storage.join(workdir, "demo", "plan.parquet")
    if not storage.exists(plan_uri):
        return {}
    from unclip.data import demo_source

    cand = [u for u in storage.read_parquet(embedded["outputs"]["shard_index"]).column("embeddings").to_pylist() if u]
    reached = pa.concat_tables([storage.read_parquet(u, columns=["url"]) for u in cand])
    drop_files = [u for u in index.column("drops").to_pylist() if u]
    dropped = pa.concat_tables([storage.read_parquet(u, columns=["url", "reason"]) for u in drop_files])
    truth = demo_source.semantic_filter_truth(storage.read_parquet(plan_uri), reached, dropped)
    publish_table("semantic_filter", "truth", [{"measure": k, "value": v} for k, v in truth.items()],
                  "semantic filter: precision and recall against the demo generator's planted rows")
    return {f"truth/{k}": v for k, v in truth.items()}


@flow(name="pca", flow_run_name=run_name("pca"))
def pca_flow(config: RunConfig, workdir: str) -> dict:
    """Fit the AR prior's PCA (319 of 1024) and 1024-bucket quantiser out-of-core; save it versioned.

    A refresh that changed the kept set by at most ``pca.refit_min_change`` (rows in new, changed or
    removed shards over the rows the current PCA was fitted on) keeps the current PCA: its codes stay
    valid for the priors already trained on them.
    """
    log = get_run_logger()
    final = manifest.stage(workdir, "semantic_filter")
    index = storage.read_parquet(final["outputs"]["shard_index"])
    previous = manifest.load(workdir)["stages"].get("pca")
    change = bookkeeping.kept_change_since(previous, index, config)
    if change is not None and change <= config.pca.refit_min_change:
        fitted = pca_tasks.load_fitted(previous["outputs"])
        log.info("pca: kept set changed by %.4f <= %.4f since %s was fitted; keeping it", change,
                 config.pca.refit_min_change, fitted["version"])
    else:
        shards = index.filter(pc.greater(index.column("rows"), 0))
        files = list(zip(shards.column("kept").to_pylist(), shards.column("rows").to_pylist()))
        fitted = pca_tasks.fit_and_save_pca(files, workdir, config.pca, shards.select(["shard", "digest", "rows"]))
    pca_tasks.publish_pca(fitted)
    return _finish_stage(workdir, config, "pca", {
        "rows_in": final["rows_kept"],
        "rows_kept": final["rows_kept"],
        "drops_by_reason": {},
        "dataset_version": final["dataset_version"],
        "outputs": {"pca": fitted["uri"], "report": fitted["report_uri"], "plot": fitted["plot_uri"],
                    "fit_shards": fitted["fit_shards_uri"]},
        "pca_version": fitted["version"],
        "metrics": {**fitted["report"], "refit": change is None or change > config.pca.refit_min_change,
                    "kept_change_since_fit": change},
        "config": {"pca": config.pca.model_dump(mode="json")},
    })


SUBFLOWS: dict[str, Callable[..., dict]] = {
    "ingest": ingest_flow,
    "basic_filter": basic_filter_flow,
    "clip": clip_flow,
    "embed": embed_flow,
    "semantic_filter": semantic_filter_flow,
    "pca": pca_flow,
}
assert tuple(SUBFLOWS) == DATA_STAGES


@flow(name="data_pipeline", flow_run_name=run_name("data-pipeline"))
def data_pipeline(config: RunConfig, workdir: str, until: str = "pca", lock_timeout_s: float | None = 60.0) -> dict:
    """Run the data stages in order, each as a subflow; stop after ``until``. Returns per-stage records.

    The run holds the workdir (``locks.workdir_lock``): another run on it meanwhile waits up to
    ``lock_timeout_s`` seconds, then fails saying the workdir is in use.
    """
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    records = {}
    with locks.workdir_lock(workdir, lock_timeout_s):
        for stage in stages_until(until):
            if stage == "clip" and not config.train.clip_in_data_pipeline:
                continue
            sub = SUBFLOWS[stage].with_options(task_runner=runners.task_runner(config.orchestration))
            records[stage] = sub(config=config, workdir=workdir)
    return records
