"""Sample filters (stage 2): the basic checks on img2dataset's metadata, exact de-duplication by
content hash, the CLIP-score threshold and near-duplicate removal with faiss.

Pure functions over Arrow tables and numpy arrays; the Prefect tasks in ``unclip.tasks.filter``
decide which shards they run on. Every function that removes rows returns them as drop records with
a reason, so nothing disappears silently.

Order matters for de-duplication: of a group of duplicates the copy that sorts first by
(source rank in the config, uid) is kept, where a uid is ``<source>/<file id>/<row>`` and file ids
sort by file name. The result therefore does not depend on which task saw which shard first, and a
resumed run keeps the same copy as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unclip import drops
from unclip.config import BasicFilterConfig

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("source_rank", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("bucket", pa.int32()),
    ]
)


def hash_bucket(sha256_hex: pa.Array, buckets: int) -> pa.Array:
    """Bucket of each content hash: its first 8 hex digits modulo ``buckets`` (hashes are uniform)."""
    prefix = pc.utf8_slice_codeunits(sha256_hex, 0, 8).to_numpy(zero_copy_only=False)
    vals = np.fromiter((int(p, 16) for p in prefix), dtype=np.int64, count=len(prefix))
    return pa.array((vals % buckets).astype(np.int32))


def basic_checks(status: pa.Table, cfg: BasicFilterConfig, *, source: str, source_rank: int, shard: str
                 ) -> tuple[pa.Table, pa.Table]:
    """Apply the per-sample checks to one shard's successful downloads.

    ``status`` is img2dataset's status table filtered to ``status == "success"``. Returns
    (candidates, drops); a row failing several checks is recorded once, with the first reason in the
    order: min_side, aspect_ratio, caption_empty, caption_too_short, caption_too_long.
    """
    n = status.num_rows
    w = status.column("original_width").to_numpy(zero_copy_only=False).astype(np.int64)
    h = status.column("original_height").to_numpy(zero_copy_only=False).astype(np.int64)
    caption = pc.fill_null(status.column("caption"), "")
    clen = pc.utf8_length(pc.utf8_trim_whitespace(caption)).to_numpy(zero_copy_only=False)
    short = np.minimum(w, h)
    aspect = np.maximum(w, h) / np.maximum(short, 1)

    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    checks = [
        (short < cfg.min_side, drops.MIN_SIDE, lambda i: f"{w[i]}x{h[i]} < {cfg.min_side}px"),
        (aspect > cfg.max_aspect_ratio, drops.ASPECT_RATIO, lambda i: f"{w[i]}x{h[i]} ratio {aspect[i]:.2f}"),
        (clen == 0, drops.CAPTION_EMPTY, lambda i: "empty caption"),
        (clen < cfg.min_caption_chars, drops.CAPTION_TOO_SHORT, lambda i: f"{clen[i]} chars"),
        (clen > cfg.max_caption_chars, drops.CAPTION_TOO_LONG, lambda i: f"{clen[i]} chars"),
    ]
    for mask, code, why in checks:
        hit = mask & (reason == None)  # noqa: E711  (elementwise test on an object array)
        for i in np.flatnonzero(hit):
            reason[i] = code
            detail[i] = why(i)
    dropped = reason != None  # noqa: E711
    keep = pa.array(~dropped)

    kept = status.filter(keep)
    candidates = pa.table(
        {
            "key": kept.column("key"),
            "uid": kept.column("uid"),
            "url": kept.column("url"),
            "caption": pc.fill_null(kept.column("caption"), ""),
            "source": pa.array([source] * kept.num_rows, pa.string()),
            "source_rank": pa.array([source_rank] * kept.num_rows, pa.int32()),
            "shard": pa.array([shard] * kept.num_rows, pa.string()),
            "sha256": kept.column("sha256"),
            "bucket": hash_bucket(kept.column("sha256"), cfg.dedup_buckets),
        },
        schema=CANDIDATE_SCHEMA,
    )
    idx = np.flatnonzero(dropped)
    gone = status.take(pa.array(idx, pa.int64()))
    drop = drops.drop_table({
        "uid": gone.column("uid").to_pylist(),
        "url": gone.column("url").to_pylist(),
        "source": [source] * len(idx),
        "stage": ["basic_filter"] * len(idx),
        "reason": list(reason[idx]),
        "detail": list(detail[idx]),
    })
    return candidates, drop


# drop records that still carry their shard, so that a shard batch's finalize task can find them
ROUTED_DROP_SCHEMA = drops.DROP_SCHEMA.append(pa.field("shard", pa.string()))


def exact_duplicates(rows: pa.Table) -> pa.Table:
    """Rows whose ``sha256`` equals that of a row sorting earlier by (source_rank, uid).

    ``rows`` needs uid, url, source, source_rank, shard, sha256. Returns drop records (with an
    extra ``shard`` column, so that they can be routed back to their shard).
    """
    if rows.num_rows == 0:
        return ROUTED_DROP_SCHEMA.empty_table()
    rows = rows.sort_by([("sha256", "ascending"), ("source_rank", "ascending"), ("uid", "ascending")])
    sha = rows.column("sha256").to_numpy(zero_copy_only=False)
    first = np.ones(len(sha), dtype=bool)
    first[1:] = sha[1:] != sha[:-1]
    # index of the group's first row, for every row
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(sha)), 0))
    dup = np.flatnonzero(~first)
    uid = rows.column("uid").to_numpy(zero_copy_only=False)
    taken = rows.take(pa.array(dup, pa.int64()))
    table = drops.drop_table({
        "uid": taken.column("uid").to_pylist(),
        "url": taken.column("url").to_pylist(),
        "source": taken.column("source").to_pylist(),
        "stage": ["basic_filter"] * len(dup),
        "reason": [drops.DUPLICATE_EXACT] * len(dup),
        "detail": [f"same bytes as {uid[group_start[i]]}" for i in dup],
    })
    return table.append_column("shard", taken.column("shard"))


def clip_score_drops(table: pa.Table, min_score: float | None) -> np.ndarray:
    """Boolean mask of rows whose image-text cosine is below ``min_score``."""
    if min_score is None:
        return np.zeros(table.num_rows, dtype=bool)
    score = table.column("clip_score").to_numpy(zero_copy_only=False)
    return score < min_score


def near_duplicates(emb: np.ndarray, threshold: float, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy keep-first near-duplicate removal over L2-normalised rows given in keep-priority order.

    A row is a near duplicate when its cosine similarity to an earlier KEPT row is >= ``threshold``.
    Exact inner-product search with faiss: earlier chunks through an index of the rows kept so far,
    pairs inside a chunk through one matrix product. Returns (is_dup, matched row index, similarity).
    Memory is the kept rows of this call plus chunk^2 similarities; callers bound the rows per call by
    clustering first (see ``unclip.tasks.semantic``).
    """
    import faiss

    n, d = emb.shape
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    is_dup = np.zeros(n, dtype=bool)
    match = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float32)
    index = faiss.IndexFlatIP(d)
    kept_ids: list[np.ndarray] = []
    for lo in range(0, n, chunk):
        x = emb[lo : lo + chunk]
        m = len(x)
        best_sim = np.full(m, -np.inf, dtype=np.float32)
        best_id = np.full(m, -1, dtype=np.int64)
        if index.ntotal:
            D, I = index.search(x, 1)
            best_sim, local = D[:, 0].copy(), I[:, 0]
            all_kept = np.concatenate(kept_ids)
            best_id = np.where(local >= 0, all_kept[np.maximum(local, 0)], -1)
        within = x @ x.T
        kept_here = []
        for i in range(m):
            s_prev = best_sim[i]
            if kept_here:
                row = within[i, kept_here]
                j = int(np.argmax(row))
                if row[j] > s_prev:
                    s_prev, best_id[i] = row[j], lo + kept_here[j]
            if s_prev >= threshold:
                is_dup[lo + i] = True
                match[lo + i] = best_id[i]
                sim[lo + i] = s_prev
            else:
                kept_here.append(i)
        if kept_here:
            index.add(x[kept_here])
            kept_ids.append(lo + np.asarray(kept_here, dtype=np.int64))
    return is_dup, match, sim
