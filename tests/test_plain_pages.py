"""The fast reader of uncompressed PLAIN embedding pages against Arrow's own Parquet reader."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip.data.embeddings import iter_embedding_batches, to_numpy
from unclip.data.plain_pages import read_column

DIM = 24


def _table(rows: int, dtype, seed: int = 0, *, nulls: str = "") -> pa.Table:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((rows, DIM)).astype(dtype)
    txt = rng.standard_normal((rows, DIM)).astype(dtype)
    values = pa.array(img.ravel())
    if nulls == "element":
        mask = np.zeros(rows * DIM, bool)
        mask[5] = True
        values = pa.array(img.ravel(), mask=mask)
    image_col = pa.FixedSizeListArray.from_arrays(values, DIM)
    if nulls == "row":
        mask = np.zeros(rows, bool)
        mask[3] = True
        image_col = pa.FixedSizeListArray.from_arrays(values, DIM, mask=pa.array(mask))
    return pa.table({"key": [f"k{i}" for i in range(rows)], "image_emb": image_col,
                     "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt.ravel()), DIM)})


def _write(table: pa.Table, **kw) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **kw)
    return sink.getvalue()


def _fast(data: bytes, column: str, row_group: int, dtype) -> np.ndarray | None:
    f = io.BytesIO(data)
    return read_column(f, pq.ParquetFile(io.BytesIO(data)).metadata, row_group, column, DIM, np.dtype(dtype))


def _arrow(data: bytes, column: str, row_group: int) -> np.ndarray:
    return to_numpy(dtype=None, col=pq.ParquetFile(io.BytesIO(data)).read_row_group(row_group, columns=[column])
                                    .column(0))


LAYOUTS = [
    {},
    {"data_page_size": 512},  # many pages per column chunk
    {"data_page_version": "2.0"},
    {"data_page_version": "2.0", "data_page_size": 700},
    {"write_statistics": False},
    {"write_page_checksum": True, "data_page_size": 1000},
    {"write_page_index": True, "data_page_size": 1000},
    {"row_group_size": 37},
]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_fast_reader_equals_arrow(dtype, layout) -> None:
    data = _write(_table(203, dtype), compression="none", use_dictionary=False, **layout)
    groups = pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups
    for rg in range(groups):
        for column in ("image_emb", "text_emb"):
            got = _fast(data, column, rg, dtype)
            assert got is not None, f"fast path refused {layout} {column} row group {rg}"
            ref = _arrow(data, column, rg)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            # Bitwise: NaN payloads and signed zeros included.
            assert np.array_equal(got.view(f"u{got.itemsize}"), ref.view(f"u{ref.itemsize}"))


@pytest.mark.parametrize(
    "write_kw,nulls",
    [
        ({"compression": "zstd", "use_dictionary": False}, ""),
        ({"compression": "snappy", "use_dictionary": False}, ""),
        ({"compression": "none", "use_dictionary": True}, ""),
        ({"compression": "none", "use_dictionary": False}, "element"),
        ({"compression": "none", "use_dictionary": False}, "row"),
        ({"compression": "none", "use_dictionary": False, "data_page_version": "2.0"}, "element"),
    ],
)
def test_fast_reader_declines_what_it_cannot_prove(write_kw, nulls) -> None:
    data = _write(_table(50, np.float16, nulls=nulls), **write_kw)
    assert _fast(data, "image_emb", 0, np.float16) is None


def test_fast_reader_declines_a_wrong_dtype() -> None:
    data = _write(_table(10, np.float32), compression="none", use_dictionary=False)
    assert _fast(data, "image_emb", 0, np.float16) is None


def test_iterator_falls_back_to_arrow_on_compressed_files(tmp_path) -> None:
    table = _table(300, np.float16, seed=4)
    plain = tmp_path / "plain.parquet"
    packed = tmp_path / "packed.parquet"
    pq.write_table(table, plain, compression="none", use_dictionary=False, row_group_size=64)
    pq.write_table(table, packed, compression="zstd", row_group_size=100)
    got = [np.concatenate([b[0] for b in iter_embedding_batches([(str(p), 300)], batch_rows=50, max_rows=1000,
                                                                 seed=0)]) for p in (plain, packed)]
    ref = to_numpy(dtype=None, col=table.column("image_emb"))
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[1], ref)


def test_iterator_reports_null_rows_through_the_fallback(tmp_path) -> None:
    path = tmp_path / "nulls.parquet"
    pq.write_table(_table(20, np.float16, nulls="row"), path, compression="none", use_dictionary=False)
    with pytest.raises(ValueError, match="null rows"):
        list(iter_embedding_batches([(str(path), 20)], batch_rows=8, max_rows=100, seed=0))


def test_iterator_reads_through_fsspec(tmp_path) -> None:
    table = _table(120, np.float16, seed=9)
    data = _write(table, compression="none", use_dictionary=False, row_group_size=50)
    fs = fsspec.filesystem("memory")
    fs.pipe("/emb/a.parquet", data)
    batches = list(iter_embedding_batches([("memory:///emb/a.parquet", 120)], batch_rows=32, max_rows=100, seed=0))
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]),
                                  to_numpy(dtype=None, col=table.column("image_emb"))[:100])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                  to_numpy(dtype=None, col=table.column("text_emb"))[:100])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_embed_stage_layout_takes_the_fast_path(dtype) -> None:
    """The embed stage's own writer options must keep the embedding columns readable by the fast path:
    a change there (compression, dictionary) would silently cost the PCA pass its reading speed."""
    from unclip.data.embeddings import EMBEDDING_PARQUET_OPTIONS, embedding_schema

    schema = embedding_schema(dtype)
    rows, dim = 5000, schema.field("image_emb").type.list_size
    np_dtype = np.float16 if dtype == "float16" else np.float32
    rng = np.random.default_rng(0)
    cols = {}
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            cols[field.name] = pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(rows * dim).astype(np_dtype)), dim)
        elif pa.types.is_floating(field.type):
            cols[field.name] = pa.array(rng.random(rows).astype(np.float32))
        else:
            cols[field.name] = pa.array([f"v{i % 7}" for i in range(rows)], field.type)
    data = _write(pa.table(cols, schema=schema), **EMBEDDING_PARQUET_OPTIONS)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    assert meta.num_row_groups > 1
    for rg in range(meta.num_row_groups):
        for column in ("image_emb", "text_emb"):
            got = read_column(io.BytesIO(data), meta, rg, column, dim, np.dtype(np_dtype))
            assert got is not None
            np.testing.assert_array_equal(got, _arrow(data, column, rg))


def test_fast_reader_declines_damaged_chunks() -> None:
    data = _write(_table(40, np.float16), compression="none", use_dictionary=False, data_page_size=600)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    start = meta.row_group(0).column(1).data_page_offset
    damaged = bytearray(data)
    damaged[start] = 0  # the first page header now ends before saying anything
    assert read_column(io.BytesIO(bytes(damaged)), meta, 0, "image_emb", DIM, np.dtype(np.float16)) is None
    end = start + meta.row_group(0).column(1).total_compressed_size
    truncated = data[: end - 10]
    assert read_column(io.BytesIO(truncated), meta, 0, "image_emb", DIM, np.dtype(np.float16)) is None
