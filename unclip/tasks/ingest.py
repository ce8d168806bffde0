"""Ingest tasks: partition the URL lists, download each partition with img2dataset, index the shards.

Outputs under the workdir:
- ``inputs/<source>/<file_id>-<chunk>.parquet``: normalised partitions (uid, url, caption, extras);
- ``shards/<source>/<partition>/NNNNN.{tar,parquet}``: img2dataset's webdataset shards and their
  per-shard status tables (one row per input row: status, error_message, sizes, sha256);
- ``ingest/<source>/<partition>.done.json``: a partition's completion record (its marker);
- ``drops/ingest/...``: rows refused by the URL policy's text check, and failed downloads;
- ``ingest/shards.parquet``: the index of every shard, which later stages read.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unclip import drops, storage
from unclip.config import IngestConfig, SourceConfig
from unclip.data import egress, inputs
from unclip.data.url_policy import UrlPolicy
from unclip.tasks.common import Progress, in_prefect_run

SHARD_INDEX_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("source_rank", pa.int32()),
        pa.field("partition", pa.string()),
        pa.field("shard", pa.string()),  # workdir-relative, without extension: shards/<source>/<partition>/NNNNN
        pa.field("tar", pa.string()),
        pa.field("status", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        pa.field("tar_sha256", pa.string()),
    ]
)

STATUS_COLUMNS = ["key", "uid", "url", "caption", "status", "error_message", "original_width", "original_height",
                  "sha256"]


@task(name="partition-url-lists", task_run_name="partition {source.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def partition_source(source: SourceConfig, workdir: str, ingest: IngestConfig) -> dict:
    """Cut every URL-list file of a source into partitions (files already cut are skipped).

    Returns ``{"files": [{uri, file_id, rows, precheck_drops}], "partitions": [partition dicts]}``.
    """
    policy = UrlPolicy.from_config(ingest.url_policy)
    out_dir = storage.join(workdir, "inputs", source.name)
    files, parts = [], []
    for uri in inputs.discover(source):
        f = inputs.InputFile(uri=uri, file_id=inputs.file_id(uri))
        parts += [p.to_dict() for p in inputs.partition_file(
            source, f, out_dir=out_dir,
            drops_dir=storage.join(workdir, "drops", "ingest", source.name),
            partition_rows=ingest.partition_rows, policy=policy,
        )]
        index = storage.read_json(storage.join(out_dir, f"{f.file_id}.index.json"))
        files.append({"uri": uri, "file_id": f.file_id, "rows": index["rows"],
                      "precheck_drops": index["precheck_drops"]})
    return {"files": files, "partitions": parts}


def _done_uri(workdir: str, source: str, partition_id: str) -> str:
    return storage.join(workdir, "ingest", source, f"{partition_id}.done.json")


def partition_is_done(workdir: str, part: dict) -> bool:
    return storage.exists(_done_uri(workdir, part["source"], part["partition_id"]))


@task(
    name="download-partition",
    cache_policy=NO_CACHE,
    task_run_name="download {part[source]}/{part[partition_id]}",
    retries=2,
    retry_delay_seconds=[10, 60],
)
def download_partition(part: dict, workdir: str, ingest: IngestConfig, extra_cols: tuple[str, ...],
                       progress: Progress | None = None) -> str:
    """Download one partition with img2dataset (resuming a partial one) and record its shards.

    Returns the URI of the partition's completion record. Idempotent: a finished partition is not
    downloaded again.
    """
    done = _done_uri(workdir, part["source"], part["partition_id"])
    if storage.exists(done):
        return done
    out = storage.join(workdir, "shards", part["source"], part["partition_id"])
    n_shards = math.ceil(part["rows"] / ingest.samples_per_shard)
    if n_shards:
        _run_img2dataset(part, out, workdir, ingest, extra_cols, n_shards, progress)
    record = _summarise_partition(part, out, workdir, n_shards)
    storage.write_json(done, record)
    return done


def _run_img2dataset(part: dict, out: str, workdir: str, ingest: IngestConfig, extra_cols: tuple[str, ...],
                     n_shards: int, progress: Progress | None) -> None:
    spec = {"partition_uri": part["uri"], "output_folder": out, "extra_cols": list(extra_cols),
            "ingest": ingest.model_dump(mode="json")}
    env = {**os.environ, **egress.worker_env(ingest), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    log_dir = storage.join(workdir, "logs", "ingest", part["source"]) if storage.is_local(workdir) else tempfile.mkdtemp()
    storage.makedirs(log_dir)
    log_path = os.path.join(log_dir, f"{part['partition_id']}.log")
    fs, out_path = storage.fs_and_path(out)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        import json

        json.dump(spec, f)
        spec_path = f.name
    reported = 0
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "unclip.data.download", spec_path],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                time.sleep(0.5)
                reported = _report_shards(fs, out_path, progress, reported)
            _report_shards(fs, out_path, progress, reported)
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with {proc.returncode} on {part['partition_id']}; log: {log_path}")
    missing = [i for i in range(n_shards) if not fs.exists(f"{out_path}/{i:05d}_stats.json")]
    if missing:
        # img2dataset already retried these shards; a task retry resumes only them
        raise RuntimeError(f"{len(missing)} of {n_shards} shards of {part['partition_id']} did not finish "
                           f"(first: {missing[0]:05d}); log: {log_path}")


def _report_shards(fs, out_path: str, progress: Progress | None, reported: int) -> int:
    if progress is None:
        return reported
    done = len(fs.glob(f"{out_path}/*_stats.json")) if fs.exists(out_path) else 0
    if done > reported:
        progress.advance(done - reported)
    return max(done, reported)


def _summarise_partition(part: dict, out: str, workdir: str, n_shards: int) -> dict:
    """Turn img2dataset's status tables into drop records and a shard list with checksums."""
    shards, drop_tables = [], []
    for i in range(n_shards):
        base = storage.join(out, f"{i:05d}")
        status = storage.read_parquet(base + ".parquet", columns=["uid", "url", "status", "error_message"])
        ok = pc.equal(status.column("status"), "success")
        failed = status.filter(pc.invert(ok))
        if failed.num_rows:
            drop_tables.append(drops.drop_table({
                "uid": failed.column("uid").to_pylist(),
                "url": failed.column("url").to_pylist(),
                "source": [part["source"]] * failed.num_rows,
                "stage": ["ingest"] * failed.num_rows,
                "reason": [drops.reason_from_img2dataset(s, m) for s, m in
                           zip(failed.column("status").to_pylist(), failed.column("error_message").to_pylist())],
                "detail": failed.column("error_message").to_pylist(),
            }))
        shards.append({"shard": _relative(workdir, base), "tar": base + ".tar", "status": base + ".parquet",
                       "rows": status.num_rows, "ok": int(pc.sum(ok).as_py() or 0),
                       "tar_sha256": storage.file_checksum(base + ".tar")})
    drops_uri = storage.join(workdir, "drops", "ingest", part["source"], f"{part['partition_id']}-download.parquet")
    storage.write_parquet(drops_uri, pa.concat_tables(drop_tables) if drop_tables else drops.empty_drop_table())
    return {**part, "shards": shards, "download_drops": drops_uri}


def _relative(workdir: str, uri: str) -> str:
    w = workdir.rstrip("/") + "/"
    return uri[len(w):] if uri.startswith(w) else uri


@task(name="index-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def write_shard_index(workdir: str, done_records: list[str], source_ranks: dict[str, int]) -> str:
    """Collect finished partitions into ``ingest/shards.parquet`` (one row per shard)."""
    rows: dict[str, list] = {f.name: [] for f in SHARD_INDEX_SCHEMA}
    for uri in done_records:
        rec = storage.read_json(uri)
        for s in rec["shards"]:
            rows["source"].append(rec["source"])
            rows["source_rank"].append(source_ranks[rec["source"]])
            rows["partition"].append(rec["partition_id"])
            for k in ("shard", "tar", "status", "rows", "ok", "tar_sha256"):
                rows[k].append(s[k])
    table = pa.table(rows, schema=SHARD_INDEX_SCHEMA)
    table = table.sort_by([("source_rank", "ascending"), ("shard", "ascending")])
    uri = storage.join(workdir, "ingest", "shards.parquet")
    storage.write_parquet(uri, table)
    if in_prefect_run():
        get_run_logger().info("indexed %d shards from %d partitions", table.num_rows, len(done_records))
    return uri
