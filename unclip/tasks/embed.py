"""Embed tasks: open_clip image and text embeddings for every row the basic filter kept.

One task embeds a batch of shards: one model load, one DataLoader over the batch's tars (decoding in
worker processes), batches that may span shards, and one Parquet file per shard written as soon as
all of its rows are in. A shard whose output already holds the same kept rows (same digest in the
file's metadata) is skipped, so re-runs and resumed runs embed only what changed. A sample the
loader cannot read or decode is logged, skipped, and recorded as a drop (``embed``, ``decode_error``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from unclip import drops, storage
from unclip.config import EmbedConfig
from unclip.data import clip, embeddings
from unclip.tasks.common import Progress, batch_run_name, in_prefect_run
from unclip.tasks.filter import shard_file

DIGEST_KEY = b"unclip.kept_digest"

EMBED_RESULT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("source_rank", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("tar", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("digest", pa.string()),
        pa.field("embeddings", pa.string()),
        pa.field("drops", pa.string()),
    ]
)


def model_identity(cfg: EmbedConfig) -> str:
    """What makes two embeddings of the same rows equal: architecture, weights (a checkpoint by its
    bytes, not its path) and storage dtype. Computed once per stage run."""
    weights = cfg.model.weights
    if cfg.model.checkpoint is not None:
        weights = f"checkpoint-sha256:{storage.file_checksum(cfg.model.checkpoint)}"
    return f"{cfg.model.arch}|{weights}|{cfg.dtype}"


def shard_digest(kept_digest: str, model_id: str) -> str:
    """The digest an embedded shard carries: its kept rows and the model that embedded them."""
    return hashlib.sha256(f"{kept_digest}|{model_id}".encode()).hexdigest()


def output_digest(uri: str) -> str | None:
    if not storage.exists(uri):
        return None
    fs, p = storage.fs_and_path(uri)
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    value = meta.get(DIGEST_KEY)
    return value.decode() if value else None


def _write_shard(uri: str, drops_uri: str, kept: pa.Table, parts: dict[str, list] | None, dtype: str,
                 digest: str) -> int:
    """Write one shard's embeddings, sorted by key; kept rows that never came out of the loader (a tar
    member webdataset could not decode) become drop records instead. Returns the rows written."""
    parts = parts or {"key": [], "img": [], "txt": [], "score": []}
    order = np.argsort(np.asarray(parts["key"], dtype=object)) if parts["key"] else np.zeros(0, np.int64)
    img = np.concatenate(parts["img"])[order] if parts["img"] else np.zeros((0, embeddings.EMBED_DIM), np.float32)
    txt = np.concatenate(parts["txt"])[order] if parts["txt"] else np.zeros((0, embeddings.EMBED_DIM), np.float32)
    score = np.concatenate(parts["score"])[order] if parts["score"] else np.zeros(0, np.float32)
    got = pa.array([parts["key"][i] for i in order], pa.string())
    present = pc.is_in(kept.column("key"), value_set=got)
    lost = kept.filter(pc.invert(present))
    storage.write_parquet(drops_uri, drops.drop_table({
        "uid": lost.column("uid").to_pylist(), "url": lost.column("url").to_pylist(),
        "source": lost.column("source").to_pylist(), "stage": ["embed"] * lost.num_rows,
        "reason": [drops.DECODE_ERROR] * lost.num_rows,
        "detail": ["the shard's image could not be read or decoded by the embedding loader"] * lost.num_rows,
    }))
    kept = kept.filter(present).sort_by("key")
    if kept.column("key").to_pylist() != got.to_pylist():
        raise RuntimeError(f"{uri}: the loader returned keys that are not among the shard's kept rows")
    schema = embeddings.embedding_schema(dtype).with_metadata({DIGEST_KEY: digest.encode()})
    table = pa.table(
        {
            "key": kept.column("key"),
            "uid": kept.column("uid"),
            "source": kept.column("source"),
            "caption": kept.column("caption"),
            "url": kept.column("url"),
            "image_emb": embeddings.fixed_size_list(img, dtype),
            "text_emb": embeddings.fixed_size_list(txt, dtype),
            "clip_score": pa.array(score.astype(np.float32)),
        },
        schema=schema,
    )
    embeddings.write(uri, table)
    return table.num_rows


@task(name="embed-shards", task_run_name=batch_run_name("embed"), cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=5)
def embed_batch(batch: int, shards: list[dict], workdir: str, cfg: EmbedConfig, model_id: str,
                progress: Progress | None = None) -> str:
    """Embed a batch of shards (rows of the basic filter's result index); returns a result file."""
    device = clip.resolve_device(cfg.device)
    todo, out_rows = {}, []
    for s in shards:
        uri = shard_file(workdir, "embed/candidates", s["shard"])
        drops_uri = shard_file(workdir, "drops/embed", s["shard"])
        out_rows.append({"source": s["source"], "source_rank": s["source_rank"], "shard": s["shard"],
                         "tar": s["tar"], "rows": None, "digest": shard_digest(s["digest"], model_id),
                         "embeddings": uri, "drops": drops_uri})
        if output_digest(uri) == out_rows[-1]["digest"] and storage.exists(drops_uri):
            out_rows[-1]["rows"] = storage.parquet_rows(uri)
            if progress:
                progress.advance()
            continue
        todo[s["tar"]] = (s, uri, drops_uri, storage.read_parquet(s["kept"]), len(out_rows) - 1)

    def finish(tar: str, parts: dict | None) -> None:
        s, uri, drops_uri, kept, row = todo[tar]
        out_rows[row]["rows"] = _write_shard(uri, drops_uri, kept, parts, cfg.dtype, out_rows[row]["digest"])
        if progress:
            progress.advance()

    if todo:
        model, preprocess, tokenizer = clip.load_clip(cfg.model, device)
        keep = {tar: dict(zip(k.column("key").to_pylist(), k.column("caption").to_pylist()))
                for tar, (_, _, _, k, _) in todo.items()}
        parts: dict[str, dict | None] = {tar: {"key": [], "img": [], "txt": [], "score": []} for tar in todo}
        remaining = {tar: len(v) for tar, v in keep.items()}
        for tar in [t for t, n in remaining.items() if n == 0]:
            finish(tar, None)
        for b in clip.make_loader({t: v for t, v in keep.items() if v}, preprocess, tokenizer, cfg):
            img, txt, score = clip.encode_batch(model, b["image"], b["text"], device)
            urls = np.asarray(b["__url__"])
            for tar in dict.fromkeys(b["__url__"]):
                sel = np.flatnonzero(urls == tar)
                p = parts[tar]
                p["key"] += [b["__key__"][i] for i in sel]
                p["img"].append(img[sel])
                p["txt"].append(txt[sel])
                p["score"].append(score[sel])
                remaining[tar] -= len(sel)
                if remaining[tar] == 0:
                    finish(tar, p)
                    parts[tar] = None  # free this shard's arrays now
        for tar, n in remaining.items():
            if n > 0:  # samples the loader skipped (logged by its handler): recorded as drops
                finish(tar, parts[tar])
    if in_prefect_run():
        get_run_logger().info("batch %d: %d shards embedded, %d already up to date", batch, len(todo),
                              len(shards) - len(todo))
    return storage.write_parquet(storage.join(workdir, "embed", "work", "results", f"batch-{batch:06d}.parquet"),
                                 pa.Table.from_pylist(out_rows, schema=EMBED_RESULT_SCHEMA))
