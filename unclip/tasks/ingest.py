"""Ingest tasks: partition the URL lists, download each partition with img2dataset, index the shards.

Outputs under the workdir:
- ``inputs/<source>/<file_id>-<chunk>.parquet``: normalised partitions (uid, url, caption, extras);
- ``shards/<source>/<call>/NNNNN.{tar,parquet}``: img2dataset's webdataset shards and their
  per-shard status tables (one row per input row: status, error_message, sizes, sha256); a call
  downloads a group of partitions and names its folder after them;
- ``ingest/<source>/<partition>.done.json``: a partition's completion record (its marker);
- ``drops/ingest/...``: rows refused by the URL policy's text check, and failed downloads;
- ``index/ingest.parquet``: the index of every shard, which later stages read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unclip import drops, manifest, storage
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
        pa.field("tar_sha256", pa.string()),  # the tar file's bytes (integrity; differs between re-downloads)
        pa.field("content_sha256", pa.string()),  # its samples: sorted (key, image sha256, caption) of successes
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


def done_uri(workdir: str, part: dict) -> str:
    """A partition's completion record, written once all its shards are downloaded and indexed."""
    return storage.join(workdir, "ingest", part["source"], f"{part['partition_id']}.done.json")


def partition_is_done(workdir: str, part: dict) -> bool:
    return storage.exists(done_uri(workdir, part))


def call_id(parts: list[dict]) -> str:
    """A download call's identity: the partitions it downloads. A killed call is resumed by the next
    run because the same pending partitions give the same id, hence the same output folder."""
    return "call-" + hashlib.sha256("\n".join(p["partition_id"] for p in parts).encode()).hexdigest()[:12]


@task(
    name="download-partitions",
    cache_policy=NO_CACHE,
    task_run_name="download {source}: {label}",
    retries=2,
    retry_delay_seconds=[10, 60],
)
def download_partitions(source: str, label: str, parts: list[dict], workdir: str, ingest: IngestConfig,
                        extra_cols: tuple[str, ...], progress: Progress | None = None,
                        ray_address: str | None = None) -> list[str]:
    """Download a group of one source's partitions in ONE img2dataset call and record their shards.

    One call per group, not per partition: an img2dataset call pays several seconds of process
    start-up, which small partitions would not amortise. img2dataset numbers shards across its input
    files in sorted order, so each partition's shard range is known in advance. Returns the URIs of
    the partitions' completion records; partitions already done are skipped, a partial call resumes.
    """
    pending = [p for p in parts if not partition_is_done(workdir, p)]
    with_rows = [p for p in pending if p["rows"]]
    cid = call_id(with_rows)
    out = storage.join(workdir, "shards", source, cid)
    first_shard, ranges = 0, {}
    for p in with_rows:
        n = math.ceil(p["rows"] / ingest.samples_per_shard)
        ranges[p["partition_id"]] = range(first_shard, first_shard + n)
        first_shard += n
    if with_rows:
        inputs_dir = _stage_call_inputs(with_rows, storage.join(workdir, "ingest", source, "calls", cid))
        _run_img2dataset(inputs_dir, out, f"{source}/{cid}", workdir, ingest, extra_cols, first_shard, progress,
                         ray_address)
    for p in pending:
        record = _summarise_partition(p, out, workdir, ranges.get(p["partition_id"], range(0)))
        storage.write_json(done_uri(workdir, p), record)
    return [done_uri(workdir, p) for p in pending]


def _stage_call_inputs(parts: list[dict], call_dir: str) -> str:
    """A folder holding exactly the call's partition files, named so that they sort in call order."""
    fs, d = storage.fs_and_path(call_dir)
    fs.makedirs(d, exist_ok=True)
    for i, p in enumerate(parts):
        target = f"{d}/{i:05d}-{p['partition_id']}.parquet"
        if fs.exists(target):
            continue
        src = storage.fs_and_path(p["uri"])[1]
        if storage.is_local(call_dir):
            os.symlink(src, target)
        else:
            fs.copy(src, target)
    return call_dir


def _run_img2dataset(inputs_dir: str, out: str, name: str, workdir: str, ingest: IngestConfig,
                     extra_cols: tuple[str, ...], n_shards: int, progress: Progress | None,
                     ray_address: str | None = None) -> None:
    spec = {"url_list": inputs_dir, "output_folder": out, "extra_cols": list(extra_cols),
            "ingest": ingest.model_dump(mode="json"), "ray_address": ray_address}
    env = {**os.environ, **egress.worker_env(ingest), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    log_dir = storage.join(workdir, "logs", "ingest") if storage.is_local(workdir) else tempfile.mkdtemp()
    log_path = os.path.join(log_dir, name.replace("/", "-") + ".log")
    os.makedirs(log_dir, exist_ok=True)
    fs, out_path = storage.fs_and_path(out)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    reported = 0
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "unclip.data.download", spec_path],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while True:
                    try:
                        proc.wait(timeout=0.5)  # returns as soon as the child exits
                        break
                    except subprocess.TimeoutExpired:
                        reported = _report_shards(fs, out_path, progress, reported)
            finally:  # cancelled, lock lost, interrupted: no img2dataset may go on writing this call
                _stop(proc)
            _report_shards(fs, out_path, progress, reported)
    finally:
        os.unlink(spec_path)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited with {proc.returncode} on {name}; log: {log_path}")
    missing = [i for i in range(n_shards) if not fs.exists(f"{out_path}/{i:05d}_stats.json")]
    if missing:
        # img2dataset already retried these shards; a task retry resumes only them
        raise RuntimeError(f"{len(missing)} of {n_shards} shards of {name} did not finish "
                           f"(first: {missing[0]:05d}); log: {log_path}")


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the download child (it exits through SystemExit, which stops img2dataset's pool
    workers too), then SIGKILL it if it has not gone after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _report_shards(fs, out_path: str, progress: Progress | None, reported: int) -> int:
    if progress is None:
        return reported
    done = len(fs.glob(f"{out_path}/*_stats.json")) if fs.exists(out_path) else 0
    if done > reported:
        progress.advance(done - reported)
    return max(done, reported)


def _summarise_partition(part: dict, out: str, workdir: str, shard_ids: range) -> dict:
    """Turn img2dataset's status tables into drop records and a shard list with checksums."""
    shards, drop_tables = [], []
    for i in shard_ids:
        base = storage.join(out, f"{i:05d}")
        status = storage.read_parquet(base + ".parquet",
                                      columns=["key", "uid", "url", "caption", "status", "error_message", "sha256"])
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
        shards.append({"shard": manifest.relative(workdir, base), "tar": base + ".tar", "status": base + ".parquet",
                       "rows": status.num_rows, "ok": int(pc.sum(ok).as_py() or 0),
                       "tar_sha256": storage.file_checksum(base + ".tar"),
                       "content_sha256": _content_checksum(status.filter(ok))})
    drops_uri = storage.join(workdir, "drops", "ingest", part["source"], f"{part['partition_id']}-download.parquet")
    storage.write_parquet(drops_uri, pa.concat_tables(drop_tables) if drop_tables else drops.empty_drop_table())
    return {**part, "shards": shards, "download_drops": drops_uri}


def _content_checksum(ok: pa.Table) -> str:
    """A shard's checksum that depends only on what it holds, not on how the tar was written (img2dataset
    writes members in completion order with the current time as their mtime)."""
    h = hashlib.sha256()
    for key, sha, caption in sorted(zip(*(ok.column(c).to_pylist() for c in ("key", "sha256", "caption")))):
        h.update(f"{key}\t{sha}\t{caption}\n".encode())
    return h.hexdigest()


@task(name="index-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def write_shard_index(workdir: str, done_records: list[str], source_ranks: dict[str, int]) -> str:
    """Collect finished partitions into ``index/ingest.parquet`` (one row per shard)."""
    rows: dict[str, list] = {f.name: [] for f in SHARD_INDEX_SCHEMA}
    for uri in done_records:
        rec = storage.read_json(uri)
        for s in rec["shards"]:
            rows["source"].append(rec["source"])
            rows["source_rank"].append(source_ranks[rec["source"]])
            rows["partition"].append(rec["partition_id"])
            for k in ("shard", "tar", "status", "rows", "ok", "tar_sha256", "content_sha256"):
                rows[k].append(s[k])
    table = pa.table(rows, schema=SHARD_INDEX_SCHEMA)
    table = table.sort_by([("source_rank", "ascending"), ("shard", "ascending")])
    uri = storage.join(workdir, "index", "ingest.parquet")
    storage.write_parquet(uri, table)
    if in_prefect_run():
        get_run_logger().info("indexed %d shards from %d partitions", table.num_rows, len(done_records))
    return uri
