"""The semantic-filter tasks on hand-made embedding shards: threshold, cells, near duplicates across
shards and batches, final files; with the flush size forced small so that the bounded-memory path runs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from unclip import storage
from unclip.config import SemanticFilterConfig
from unclip.data import embeddings
from unclip.tasks import semantic


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _shard(tmp_path, name: str, img: np.ndarray, scores: list[float], rank: int) -> dict:
    n = len(img)
    keys = [f"{i:05d}" for i in range(n)]
    t = pa.table({
        "key": keys, "uid": [f"{name}/f/{k}" for k in keys], "source": [name] * n, "caption": ["c"] * n,
        "url": [f"http://h/{name}/{k}" for k in keys], "image_emb": embeddings.fixed_size_list(img, "float32"),
        "text_emb": embeddings.fixed_size_list(img, "float32"), "clip_score": pa.array(scores, pa.float32()),
    })
    uri = storage.write_parquet(str(tmp_path / "cand" / f"{name}.parquet"), t)
    return {"source": name, "source_rank": rank, "shard": f"shards/{name}/c/00000", "tar": "-", "rows": n,
            "digest": "-", "embeddings": uri}


def test_score_cells_near_duplicates_and_final_files(tmp_path, monkeypatch):
    monkeypatch.setattr(semantic, "FLUSH_ROWS", 3)
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(8, 1024)))
    a = _shard(tmp_path, "a", base[:4], [0.5, 0.5, 0.1, 0.5], rank=0)  # a/00002 has a low CLIP score
    twin = _unit(base[1:2] + 1e-3 * rng.normal(size=(1, 1024)))  # near copy of a/00001, in a later source
    b = _shard(tmp_path, "b", np.vstack([base[4:7], twin]), [0.5] * 4, rank=1)
    cfg = SemanticFilterConfig(min_clip_score=0.2, near_dup={"threshold": 0.99, "cluster_size": 4})
    work = str(tmp_path / "work")
    cents = semantic.train_centroids.fn([a["embeddings"], b["embeddings"]], semantic.n_cells(8, cfg), work)
    assert cents is not None  # two cells: the k-means path
    # shards in two batches, so duplicates are found across batches and routed back
    assert semantic.score_and_assign.fn(0, [a], work, cfg, cents) == 3
    assert semantic.score_and_assign.fn(1, [b], work, cfg, cents) == 4
    groups = sorted(int(p.rsplit("=", 1)[1]) for p in storage.listdir(storage.join(work, "cells")))
    assert sum(semantic.near_dedup_group.fn(g, work, 0.99) for g in groups) == 1
    results = [storage.read_parquet(semantic.finalize_batch.fn(i, [s], work, str(tmp_path))).to_pylist()[0]
               for i, s in enumerate((a, b))]
    kept = {r["shard"]: storage.read_parquet(r["kept"]).column("uid").to_pylist() for r in results}
    dropped = {u: (r, d) for res in results for u, r, d in zip(*(storage.read_parquet(res["drops"]).column(c)
                                                                    .to_pylist() for c in ("uid", "reason", "detail")))}
    assert kept == {"shards/a/c/00000": ["a/f/00000", "a/f/00001", "a/f/00003"],
                    "shards/b/c/00000": ["b/f/00000", "b/f/00001", "b/f/00002"]}
    assert dropped["a/f/00002"][0] == "clip_score"
    assert dropped["b/f/00003"][0] == "near_duplicate" and dropped["b/f/00003"][1].endswith("to a/f/00001")
    assert [r["rows"] for r in results] == [3, 3]
