"""The stored (caption, CLIP text embedding, CLIP image embedding) rows of a dataset version, streamed
for training the priors: no image is decoded and no CLIP runs, the embeddings are the ones the embed
stage wrote (MISSION "Prior": the priors map the caption and its CLIP text embedding to the CLIP
image embedding).

``EmbeddingPairs`` is an endless, seeded stream of fixed-size batches for one rank. Each epoch takes
the files in a seeded order, split by rank (whole files when there are at least as many files as
ranks, every ``world_size``-th row of each file otherwise), and each file's rows in a seeded
permutation. The stream's position is the number of rows this rank consumed; resuming at a position
skips whole files by their row counts without opening them, so a resume costs one file's read.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip import storage
from unclip.data import embeddings


def read_rows(uri: str, columns: Sequence[str] = ("image_emb", "text_emb"),
              text_columns: Sequence[str] = ("caption",)) -> dict[str, Any]:
    """A whole embeddings file: each embedding column as an [n, dim] array of the stored dtype (the
    fast page reader), each text column as a list of strings."""
    fs, path = storage.fs_and_path(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups = [embeddings._read_row_group(f, pf, rg, columns) for rg in range(pf.metadata.num_row_groups)]
        out: dict[str, Any] = {c: np.concatenate([g[i] for g in groups]) if groups else np.zeros((0, 0))
                               for i, c in enumerate(columns)}
        if text_columns:
            table = pf.read(columns=list(text_columns))
            out.update({c: table.column(c).to_pylist() for c in text_columns})
    return out


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class EmbeddingPairs:
    """Batches ``{"image_emb": [B, D] float32, "text_emb": [B, D] float32, "caption": [str] * B}``
    of one rank from ``files`` (columns ``kept``: the embeddings Parquet, ``rows``)."""

    def __init__(self, files: pa.Table, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.files = [(u, int(r)) for u, r in zip(files.column("kept").to_pylist(), files.column("rows").to_pylist())
                      if int(r) > 0]
        self.files.sort()
        if not self.files:
            raise ValueError("no embedding rows to train on")
        if sum(r for _, r in self.files) < world_size:
            raise ValueError(f"{sum(r for _, r in self.files)} rows cannot feed {world_size} processes")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed

    def _epoch(self, epoch: int) -> Iterator[tuple[str, np.ndarray]]:
        """(file, the row indices this rank takes from it, in order) for one epoch."""
        order = np.random.default_rng(_seed(self.seed, "files", epoch)).permutation(len(self.files))
        by_file = len(self.files) >= self.world_size
        mine = order[self.rank::self.world_size] if by_file else order
        for i in mine:
            uri, rows = self.files[i]
            perm = np.random.default_rng(_seed(self.seed, "rows", epoch, uri)).permutation(rows)
            yield uri, perm if by_file else perm[self.rank::self.world_size]

    def stream(self, start: int = 0) -> Iterator[dict]:
        """Batches after the first ``start`` rows of this rank's stream."""
        skip = start
        parts: list[dict] = []
        held = 0
        for epoch in itertools.count():
            for uri, take in self._epoch(epoch):
                if skip >= len(take):  # already trained on: not opened
                    skip -= len(take)
                    continue
                take, skip = take[skip:], 0
                if len(take) == 0:
                    continue
                data = read_rows(uri)
                parts.append({"image_emb": data["image_emb"][take], "text_emb": data["text_emb"][take],
                              "caption": [data["caption"][i] for i in take]})
                held += len(take)
                while held >= self.batch_size:
                    batch, parts = _split(parts, self.batch_size)
                    held -= self.batch_size
                    yield batch


def _split(parts: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The first ``n`` rows of a list of row chunks, as one batch, and the rest."""
    taken, rest, got = [], [], 0
    for p in parts:
        size = len(p["caption"])
        if got >= n:
            rest.append(p)
            continue
        k = min(size, n - got)
        taken.append({key: v[:k] for key, v in p.items()})
        if k < size:
            rest.append({key: v[k:] for key, v in p.items()})
        got += k
    batch = {"image_emb": np.concatenate([t["image_emb"] for t in taken]).astype(np.float32),
             "text_emb": np.concatenate([t["text_emb"] for t in taken]).astype(np.float32),
             "caption": [c for t in taken for c in t["caption"]]}
    return batch, rest


def held_out(files: pa.Table, max_rows: int, seed: int = 0) -> dict[str, Any]:
    """Up to ``max_rows`` held-out rows (whole files in a seeded order, the last one trimmed), as
    float32 arrays and captions, for evaluation."""
    rows = [(u, int(r)) for u, r in zip(files.column("kept").to_pylist(), files.column("rows").to_pylist()) if int(r)]
    order = np.random.default_rng(seed).permutation(len(rows))
    img, txt, cap = [], [], []
    got = 0
    for i in order:
        if got >= max_rows:
            break
        data = read_rows(rows[i][0])
        k = min(len(data["caption"]), max_rows - got)
        img.append(data["image_emb"][:k])
        txt.append(data["text_emb"][:k])
        cap.extend(data["caption"][:k])
        got += k
    if not got:
        raise ValueError("the held-out split has no embedding rows")
    return {"image_emb": np.concatenate(img).astype(np.float32), "text_emb": np.concatenate(txt).astype(np.float32),
            "caption": cap}
