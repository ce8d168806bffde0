"""Basic-filter tasks: per-shard checks, exact de-duplication in hash buckets, per-shard results.

Map-reduce shaped so that nothing holds the dataset: (1) each task checks a batch of shards, writes
their candidate rows to a run-scoped work folder and their content hashes shuffled into bucket
groups; (2) each dedup task reads one bucket group (all shards' rows of those buckets, nothing
else), finds duplicates and writes them routed by shard batch; (3) each finalize task writes, per
shard, the kept rows and all drop records. Tasks return URIs of small batch-result files, never row data.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from unclip import storage
from unclip.config import BasicFilterConfig
from unclip.data import filters
from unclip.tasks.common import batch_run_name, read_routed, route_by_batch
from unclip.tasks.ingest import STATUS_COLUMNS

SHARD_RESULT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("source_rank", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("tar", pa.string()),
        pa.field("rows", pa.int64()),  # kept rows
        pa.field("digest", pa.string()),  # sha256 of the kept keys, newline-joined
        pa.field("kept", pa.string()),  # Parquet of the kept rows
        pa.field("drops", pa.string()),  # Parquet of this stage's drops for the shard
    ]
)


def shard_file(workdir: str, area: str, shard: str, ext: str = ".parquet") -> str:
    """``<workdir>/<area>/<source>/<partition>/<n>.parquet`` for shard ``shards/<source>/<partition>/<n>``."""
    rel = shard.split("/", 1)[1] if shard.startswith("shards/") else shard
    return storage.join(workdir, area, rel + ext)


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


HASH_COLUMNS = ["uid", "url", "source", "source_rank", "shard", "sha256", "batch"]


@task(name="basic-checks", task_run_name=batch_run_name("basic checks"), cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def check_batch(batch: int, shards: list[dict], work: str, cfg: BasicFilterConfig, buckets_per_group: int) -> int:
    """Per-sample checks on a batch of shards; writes candidates and drops to the work folder.

    Also writes the candidates' hashes shuffled by bucket group (``hashes/group=<g>/batch-<b>``), so
    that each dedup task reads its own group once instead of scanning every shard.
    """
    n, slim = 0, []
    for s in shards:
        status = storage.read_parquet(s["status"], columns=STATUS_COLUMNS)
        status = status.filter(pc.equal(status.column("status"), "success"))
        cand, drop = filters.basic_checks(status, cfg, source=s["source"], source_rank=s["source_rank"],
                                          shard=s["shard"])
        cand = cand.append_column("batch", pa.array([batch] * cand.num_rows, pa.int32()))
        storage.write_parquet(shard_file(work, "candidates", s["shard"]), cand)
        storage.write_parquet(shard_file(work, "check_drops", s["shard"]), drop)
        slim.append(cand.select(HASH_COLUMNS + ["bucket"]))
        n += cand.num_rows
    if slim:
        hashes = pa.concat_tables(slim)
        group = hashes.column("bucket").to_numpy() // buckets_per_group
        for g in np.unique(group):
            storage.write_parquet(storage.join(work, "hashes", f"group={int(g)}", f"batch-{batch:06d}.parquet"),
                                  hashes.filter(pa.array(group == g)).select(HASH_COLUMNS))
    return n


@task(name="exact-dedup", task_run_name="exact dedup: bucket group {group}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def dedup_group(group: int, work: str) -> int:
    """Find exact duplicates among the candidates of one bucket group; route them by shard batch."""
    folder = storage.join(work, "hashes", f"group={group}")
    if not storage.exists(folder):
        return 0
    rows = storage.parquet_dataset(folder).to_table(columns=HASH_COLUMNS)
    dups = filters.exact_duplicates(rows.drop_columns(["batch"]))
    if dups.num_rows == 0:
        return 0
    batch_of = dict(zip(rows.column("uid").to_pylist(), rows.column("batch").to_pylist()))
    route_by_batch(dups, [batch_of[u] for u in dups.column("uid").to_pylist()], work, "dups",
                   f"group-{group:06d}")
    return dups.num_rows


@task(name="basic-finalize", task_run_name=batch_run_name("basic filter results"), cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def finalize_batch(batch: int, shards: list[dict], work: str, workdir: str) -> str:
    """Write each shard's kept rows and drop records; return the batch's result file."""
    dups = read_routed(work, "dups", batch, filters.ROUTED_DROP_SCHEMA)
    out: dict[str, list] = {f.name: [] for f in SHARD_RESULT_SCHEMA}
    for s in shards:
        cand = storage.read_parquet(shard_file(work, "candidates", s["shard"]))
        mine = dups.filter(pc.equal(dups.column("shard"), s["shard"]))
        is_dup = pc.is_in(cand.column("uid"), value_set=mine.column("uid"))
        kept = cand.filter(pc.invert(is_dup)).select(["key", "uid", "url", "caption", "source"]).sort_by("key")
        drop = pa.concat_tables([storage.read_parquet(shard_file(work, "check_drops", s["shard"])),
                                 mine.drop_columns(["shard"])])
        kept_uri = storage.write_parquet(shard_file(workdir, "basic_filter/kept", s["shard"]), kept)
        drops_uri = storage.write_parquet(shard_file(workdir, "drops/basic_filter", s["shard"]), drop)
        for k, v in (("source", s["source"]), ("source_rank", s["source_rank"]), ("shard", s["shard"]),
                     ("tar", s["tar"]), ("rows", kept.num_rows),
                     ("digest", keys_digest(kept.column("key").to_pylist())), ("kept", kept_uri),
                     ("drops", drops_uri)):
            out[k].append(v)
    return storage.write_parquet(storage.join(work, "results", f"batch-{batch:06d}.parquet"),
                                 pa.table(out, schema=SHARD_RESULT_SCHEMA))
