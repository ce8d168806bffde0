"""The embeddings Parquet format: one module owns its schema, its writer options and its readers.

Every stage that writes or reads CLIP embeddings goes through here: the embed stage and the semantic
filter write with ``write`` (schema ``embedding_schema``, options ``EMBEDDING_PARQUET_OPTIONS``); the
PCA, its evaluation, the retrieval evaluation and the priors read with ``iter_embedding_batches``
(rows of the embedding columns in bulk, through the fast page reader ``unclip.data.plain_pages``
where the layout allows it) or ``to_numpy`` (a column already in memory).

A file has the columns ``key, uid, source, caption, url, image_emb, text_emb, clip_score``; the
embeddings are ``fixed_size_list<float16|float32, 1024>``, L2-normalised; ``clip_score`` is their
cosine (float32, computed before the cast to the storage type).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unclip import storage
from unclip.data.plain_pages import read_column

EMBED_DIM = 1024


# How embedding files are written, for fast reads (the PCA, and every epoch of prior training, read
# them): dictionary encoding buys nothing on float columns and made them about 3x slower to read
# (18 s against 6.4 s per 1M rows of 1024 float16), and zstd saves 8% of their size for 43% more read
# time (7.2 s against 5.0 s), so the embeddings are stored plain and the other columns with zstd.
EMBEDDING_PARQUET_OPTIONS = {
    "row_group_size": 4096,
    "use_dictionary": ["source"],
    "compression": {"key": "zstd", "uid": "zstd", "source": "zstd", "caption": "zstd", "url": "zstd",
                    "image_emb": "none", "text_emb": "none", "clip_score": "zstd"},
}


def embedding_schema(dtype: str) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("uid", pa.string()),
            pa.field("source", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("url", pa.string()),
            pa.field("image_emb", pa.list_(value, EMBED_DIM)),
            pa.field("text_emb", pa.list_(value, EMBED_DIM)),
            pa.field("clip_score", pa.float32()),
        ]
    )


def fixed_size_list(x: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float16 if dtype == "float16" else np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def to_numpy(col: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A ``fixed_size_list<float, dim>`` column as an [n, dim] array of ``dtype`` (None: the stored
    type), without a Python loop and without a copy where Arrow and the dtype allow."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise TypeError(f"expected a fixed_size_list column, got {col.type}")
    if col.null_count:
        raise ValueError(f"the embedding column has {col.null_count} null rows")
    # flatten(), not .values: it honours the slice offset of a trimmed batch.
    flat = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    return flat if dtype is None else flat.astype(dtype, copy=False)


def iter_embedding_batches(
    files: Sequence[tuple[str, int]],
    *,
    batch_rows: int,
    max_rows: int,
    seed: int,
    columns: Sequence[str] = ("image_emb", "text_emb"),
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield ``min(max_rows, total)`` rows of embedding columns as tuples of [n, dim] numpy arrays.

    ``files`` is ``[(uri, num_rows), ...]`` of Parquet files whose ``columns`` are
    ``fixed_size_list<float16|float32, dim>``. Whole files are taken in a seeded random order until
    their rows reach ``max_rows`` (the last one trimmed), so a sample of a large dataset costs only
    the files it uses. Batches have at most ``batch_rows`` rows and never span two files; arrays keep
    the stored dtype. The same arguments yield the same rows in the same order.
    """
    if batch_rows < 1 or max_rows < 0:
        raise ValueError("batch_rows must be >= 1 and max_rows >= 0")
    order = np.random.default_rng(seed).permutation(len(files))
    remaining = max_rows
    for i in order:
        if remaining <= 0:
            break
        uri, num_rows = files[i]
        fs, path = fsspec.core.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_rows != num_rows:
                raise ValueError(f"{uri} has {pf.metadata.num_rows} rows, the file list says {num_rows}")
            pending: list[tuple[np.ndarray, ...]] = []
            pending_rows = 0
            for rg in range(pf.metadata.num_row_groups):
                if remaining - pending_rows <= 0:
                    break
                group = _read_row_group(f, pf, rg, columns)
                take = min(len(group[0]), remaining - pending_rows)
                pending.append(tuple(a[:take] for a in group))
                pending_rows += take
                while pending_rows >= batch_rows:
                    batch, pending = _split_rows(pending, batch_rows)
                    pending_rows -= batch_rows
                    remaining -= batch_rows
                    yield batch
            if pending_rows:
                batch, _ = _split_rows(pending, pending_rows)
                remaining -= pending_rows
                yield batch


def _read_row_group(f: Any, pf: Any, row_group: int, columns: Sequence[str]) -> tuple[np.ndarray, ...]:
    """One row group's embedding columns as [n, dim] arrays: the fast reader of uncompressed PLAIN
    pages (``unclip.data.plain_pages``) where the layout allows it, Arrow's reader otherwise."""

    arrow_schema = pf.schema_arrow
    out = []
    for c in columns:
        typ = arrow_schema.field(c).type
        if not pa.types.is_fixed_size_list(typ):
            raise TypeError(f"expected a fixed_size_list column {c!r}, got {typ}")
        arr = None
        if typ.value_type in (pa.float16(), pa.float32()):
            arr = read_column(f, pf.metadata, row_group, c, typ.list_size, typ.value_type.to_pandas_dtype())
        if arr is None:
            arr = to_numpy(pf.read_row_group(row_group, columns=[c]).column(0), dtype=None)
        out.append(arr)
    return tuple(out)


def _split_rows(parts: list[tuple[np.ndarray, ...]], n: int) -> tuple[tuple[np.ndarray, ...], list[tuple[np.ndarray, ...]]]:
    """The first ``n`` rows of a list of column tuples, and the rest."""
    taken, rest, got = [], [], 0
    for part in parts:
        if got >= n:
            rest.append(part)
            continue
        k = min(len(part[0]), n - got)
        taken.append(tuple(a[:k] for a in part))
        if k < len(part[0]):
            rest.append(tuple(a[k:] for a in part))
        got += k
    if len(taken) == 1:
        return taken[0], rest
    return tuple(np.concatenate(cols) for cols in zip(*taken)), rest


def write(uri: str, table: pa.Table) -> str:
    """Write an embeddings table (atomically, like every write) with the format's options."""
    return storage.write_parquet(uri, table, **EMBEDDING_PARQUET_OPTIONS)
