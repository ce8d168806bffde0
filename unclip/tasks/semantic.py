"""Semantic-filter tasks: the CLIP-score threshold, then near-duplicate removal with faiss.

Near duplicates are searched inside k-means cells of the image embeddings (the SemDeDup recipe), so
that the work and memory of one search are bounded by the cell size, not the dataset: (1) per shard
batch, drop low CLIP scores and assign each survivor to its nearest centroid, writing the survivors'
embeddings grouped by cell group; (2) per cell group, greedy keep-first search within each cell
(exact inner product, faiss); (3) per shard batch, write the final embeddings Parquet (the rows that
survive both) and the drop records. With a single cell (small data) step (1) skips the k-means.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from unclip import drops, storage
from unclip.config import SemanticFilterConfig
from unclip.data import embeddings, filters
from unclip.tasks.common import batch_run_name, read_routed, route_by_batch
from unclip.tasks import embed as embed_tasks
from unclip.tasks.embed import DIGEST_KEY
from unclip.tasks.filter import SHARD_RESULT_SCHEMA, keys_digest, shard_file

# A near-dedup task loads its cell group whole: 4 cells of ~cluster_size rows (100,000 x 2 KiB of
# float16 embedding each in the paper config: ~0.8 GB)
CELLS_PER_GROUP = 4
FLUSH_ROWS = 200_000
CELL_COLUMNS = ["uid", "url", "source", "source_rank", "shard", "batch", "cell", "image_emb"]


def n_cells(rows: int, cfg: SemanticFilterConfig) -> int:
    if cfg.near_dup is None:
        return 0
    return max(1, math.ceil(rows / cfg.near_dup.cluster_size))


@task(name="train-cells", cache_policy=NO_CACHE, retries=1)
def train_centroids(files: list[str], cells: int, work: str, seed: int = 0) -> str | None:
    """k-means centroids of the image embeddings on a sample (faiss), saved as .npy."""
    if cells <= 1:
        return None
    import faiss

    want = min(256 * cells, 2_000_000)  # faiss warns below ~39 points per centroid and gains little above 256
    rng = np.random.default_rng(seed)
    sample, have = [], 0
    for i in rng.permutation(len(files)):
        emb = embeddings.to_numpy(storage.read_parquet(files[i], columns=["image_emb"]).column("image_emb"))
        sample.append(emb)
        have += len(emb)
        if have >= want:
            break
    x = np.ascontiguousarray(np.concatenate(sample)[:want], dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], cells, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(x)
    uri = storage.join(work, "centroids.npy")
    import io

    buf = io.BytesIO()
    np.save(buf, km.centroids)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _load_centroids(uri: str | None) -> np.ndarray | None:
    if uri is None:
        return None
    import io

    return np.load(io.BytesIO(storage.read_bytes(uri)))


@task(name="score-and-assign", task_run_name=batch_run_name("clip score + cells"), cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def score_and_assign(batch: int, shards: list[dict], work: str, cfg: SemanticFilterConfig,
                     centroids: str | None) -> int:
    """Threshold on clip_score; write survivors (with their cell) for the near-duplicate search."""
    cents = _load_centroids(centroids)
    groups: dict[int, list[pa.Table]] = {}
    survivors, held, part = 0, 0, 0

    def flush() -> None:
        # bounded memory: a batch of 256 shards of 10,000 rows would otherwise hold ~5 GB of embeddings
        nonlocal held, part
        for g, tables in groups.items():
            storage.write_parquet(storage.join(work, "cells", f"group={g}", f"batch-{batch:06d}-{part:04d}.parquet"),
                                  pa.concat_tables(tables).select(CELL_COLUMNS))
        groups.clear()
        held, part = 0, part + 1

    for s in shards:
        t = storage.read_parquet(s["embeddings"], columns=["key", "uid", "url", "source", "clip_score", "image_emb"])
        low = filters.clip_score_drops(t, cfg.min_clip_score)
        gone = t.filter(pa.array(low))
        storage.write_parquet(shard_file(work, "score_drops", s["shard"]), drops.drop_table({
            "uid": gone.column("uid").to_pylist(), "url": gone.column("url").to_pylist(),
            "source": gone.column("source").to_pylist(), "stage": ["semantic_filter"] * gone.num_rows,
            "reason": [drops.CLIP_SCORE] * gone.num_rows,
            "detail": [f"clip_score {v:.4f} < {cfg.min_clip_score}" for v in gone.column("clip_score").to_pylist()],
        }))
        keep = t.filter(pa.array(~low))
        survivors += keep.num_rows
        if cfg.near_dup is not None and keep.num_rows:
            if cents is None:
                cell = np.zeros(keep.num_rows, dtype=np.int32)
            else:
                emb = embeddings.to_numpy(keep.column("image_emb"))
                cell = np.argmax(emb @ cents.T, axis=1).astype(np.int32)
            keep = keep.select(["uid", "url", "source", "image_emb"]).append_column(
                "source_rank", pa.array([s["source_rank"]] * keep.num_rows, pa.int32())
            ).append_column("shard", pa.array([s["shard"]] * keep.num_rows)).append_column(
                "batch", pa.array([batch] * keep.num_rows, pa.int32())).append_column("cell", pa.array(cell))
            group = cell // CELLS_PER_GROUP
            for g in np.unique(group):
                groups.setdefault(int(g), []).append(keep.filter(pa.array(group == g)))
            held += keep.num_rows
            if held >= FLUSH_ROWS:
                flush()
    flush()
    return survivors


@task(name="near-dedup", task_run_name="near duplicates: cell group {group}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def near_dedup_group(group: int, work: str, threshold: float) -> int:
    """Greedy keep-first near-duplicate search inside each cell of a cell group."""
    rows = storage.parquet_dataset(storage.join(work, "cells", f"group={group}")).to_table()
    found = []
    for cell in np.unique(rows.column("cell").to_numpy()):
        c = rows.filter(pc.equal(rows.column("cell"), cell)).sort_by([("source_rank", "ascending"),
                                                                     ("uid", "ascending")])
        is_dup, match, sim = filters.near_duplicates(embeddings.to_numpy(c.column("image_emb")), threshold)
        idx = np.flatnonzero(is_dup)
        if not len(idx):
            continue
        uid = c.column("uid").to_numpy(zero_copy_only=False)
        d = c.take(pa.array(idx, pa.int64()))
        found.append(pa.table({
            "uid": d.column("uid"), "url": d.column("url"), "source": d.column("source"),
            "stage": pa.array(["semantic_filter"] * len(idx)),
            "reason": pa.array([drops.NEAR_DUPLICATE] * len(idx)),
            "detail": pa.array([f"cosine {sim[i]:.4f} to {uid[match[i]]}" for i in idx]),
            "shard": d.column("shard"), "batch": d.column("batch"),
        }))
    if not found:
        return 0
    dups = pa.concat_tables(found)
    route_by_batch(dups.drop_columns(["batch"]), dups.column("batch").to_numpy(), work, "neardups",
                   f"group-{group:06d}")
    return dups.num_rows


@task(name="semantic-finalize", task_run_name=batch_run_name("final embeddings"), cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=5)
def finalize_batch(batch: int, shards: list[dict], work: str, workdir: str) -> str:
    """Write each shard's final embeddings (kept rows only) and its semantic-filter drops."""
    dups = read_routed(work, "neardups", batch, filters.ROUTED_DROP_SCHEMA)
    out: dict[str, list] = {f.name: [] for f in SHARD_RESULT_SCHEMA}
    for s in shards:
        score_drops = storage.read_parquet(shard_file(work, "score_drops", s["shard"]))
        mine = dups.filter(pc.equal(dups.column("shard"), s["shard"])).drop_columns(["shard"])
        drop = pa.concat_tables([score_drops, mine.select(score_drops.column_names)])
        t = storage.read_parquet(s["embeddings"])
        kept = t.filter(pc.invert(pc.is_in(t.column("uid"), value_set=drop.column("uid"))))
        # the kept rows and the model that embedded them (the candidates' digest carries it)
        digest = embed_tasks.shard_digest(keys_digest(kept.column("key").to_pylist()), s["digest"])
        kept = kept.replace_schema_metadata({DIGEST_KEY: digest.encode()})
        # named by that digest: a released dataset version's files are never rewritten
        uri = shard_file(workdir, "embeddings", f"{s['shard']}.{digest[:16]}")
        if not storage.exists(uri):
            embeddings.write(uri, kept)
        drops_uri = storage.write_parquet(shard_file(workdir, "drops/semantic_filter", s["shard"]), drop)
        for k, v in (("source", s["source"]), ("source_rank", s["source_rank"]), ("shard", s["shard"]),
                     ("tar", s["tar"]), ("rows", kept.num_rows), ("digest", digest), ("kept", uri),
                     ("drops", drops_uri)):
            out[k].append(v)
    return storage.write_parquet(storage.join(work, "results", f"batch-{batch:06d}.parquet"),
                                 pa.table(out, schema=SHARD_RESULT_SCHEMA))
