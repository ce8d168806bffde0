"""A fast reader for embedding columns stored as uncompressed PLAIN Parquet pages.

The embed stage writes ``image_emb``/``text_emb`` as ``fixed_size_list<float16|float32, d>`` columns
without compression or dictionary (``unclip.data.embeddings.EMBEDDING_PARQUET_OPTIONS``). Parquet keeps a
list column as one repetition and one definition level per value and, for float16, a 2-byte
FIXED_LEN_BYTE_ARRAY per value; Arrow's reader decodes both value by value, which costs about 7 s of
one core per 1M rows of 1,024 float16 values (measured, bench/bench_pca.py), most of a PCA pass.

In such a page the values are one contiguous run of little-endian numbers after the two level blocks.
This module reads a column chunk's bytes in one request, walks its page headers (Thrift compact
protocol, ``PageHeader`` of parquet.thrift) and copies each page's value run into the output array,
at memory speed. It proves on the way that the column holds no null or empty entry: every page's
level count must equal its value count (a null element, a null list or an empty list has a level
and no value), and the values must add up to rows x d.

Anything else (compressed or dictionary-encoded pages, deprecated BIT_PACKED levels, an unknown page
type, a count that does not add up) makes ``read_column`` return ``None``, and the caller falls
back to Arrow's reader; Arrow's reader is also the reference these bytes are tested against.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

import numpy as np

# parquet.thrift enums
_DATA_PAGE, _INDEX_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 1, 2, 3
_PLAIN, _RLE = 0, 3

# Thrift compact protocol field types
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)


class _Unsupported(Exception):
    """A layout this reader does not handle: the caller uses Arrow's reader."""


class _Compact:
    """Just enough of the Thrift compact protocol to read a ``PageHeader``."""

    def __init__(self, buf: memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Unsupported("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self) -> dict[int, Any]:
        """Read a struct: ``{field id: value}``, nested structs as dicts, lists as lists."""
        fields: dict[int, Any] = {}
        last = 0
        while True:
            header = self.byte()
            kind = header & 0x0F
            if kind == _STOP:
                return fields
            delta = header >> 4
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind)

    def value(self, kind: int) -> Any:
        if kind == _TRUE:
            return True
        if kind == _FALSE:
            return False
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.pos += 8
            return None
        if kind == _BINARY:
            n = self.varint()
            self.pos += n
            return None
        if kind in (_LIST, _SET):
            header = self.byte()
            size = header >> 4
            if size == 15:
                size = self.varint()
            elem = header & 0x0F
            # Booleans inside a list are one byte each, not folded into the type.
            return [self.byte() == 1 if elem in (_TRUE, _FALSE) else self.value(elem) for _ in range(size)]
        if kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.value(types >> 4)
                    self.value(types & 0x0F)
            return None
        if kind == _STRUCT:
            return self.struct()
        raise _Unsupported(f"unknown Thrift compact type {kind}")


def _level_block_length(buf: memoryview, pos: int, encoding: int) -> int:
    """Bytes taken by a V1 page's RLE level block at ``pos`` (its 4-byte length prefix included)."""
    if encoding != _RLE:
        raise _Unsupported(f"level encoding {encoding}")
    return 4 + struct.unpack_from("<i", buf, pos)[0]


def _copy_pages(chunk: memoryview, out: np.ndarray, *, has_rep: bool, has_def: bool) -> None:
    """Copy every data page's values from the column chunk bytes into the flat array ``out``."""
    itemsize = out.dtype.itemsize
    dest = out.view(np.uint8)
    filled = pos = 0
    while pos < len(chunk):
        reader = _Compact(chunk, pos)
        header = reader.struct()
        pos = reader.pos
        page_type, size = header.get(1), header.get(3)
        if size is None or size < 0 or pos + size > len(chunk):
            raise _Unsupported("page header out of bounds")
        if page_type == _INDEX_PAGE:
            pos += size
            continue
        if page_type == _DATA_PAGE:
            info = header.get(5) or {}
            levels, encoding = info.get(1), info.get(2)
            start = pos
            if has_rep:
                start += _level_block_length(chunk, start, info.get(4))
            if has_def:
                start += _level_block_length(chunk, start, info.get(3))
        elif page_type == _DATA_PAGE_V2:
            info = header.get(8) or {}
            levels, encoding = info.get(1), info.get(4)
            if info.get(2, 0) != 0:
                raise _Unsupported("page has nulls")
            if info.get(7, True) and header.get(2) != size:
                raise _Unsupported("compressed V2 page")
            start = pos + (info.get(5) or 0) + (info.get(6) or 0)
        else:  # dictionary page, or a type this reader does not know
            raise _Unsupported(f"page type {page_type}")
        if encoding != _PLAIN or levels is None:
            raise _Unsupported(f"value encoding {encoding}")
        nbytes = pos + size - start
        if nbytes < 0 or nbytes != levels * itemsize or filled + nbytes > dest.size:
            raise _Unsupported("page values do not match its level count")
        dest[filled : filled + nbytes] = np.frombuffer(chunk, np.uint8, nbytes, start)
        filled += nbytes
        pos += size
    if filled != dest.size:
        raise _Unsupported(f"column chunk holds {filled // itemsize} values, expected {out.size}")


def read_column(f: BinaryIO, metadata: Any, row_group: int, column: str, dim: int,
                dtype: np.dtype) -> np.ndarray | None:
    """Rows [n, dim] of the ``fixed_size_list`` column ``column`` in row group ``row_group``, or None.

    ``metadata`` is the file's ``pyarrow.parquet.FileMetaData``; ``f`` a seekable binary file.
    ``dtype`` is float16 or float32 (the list's value type, stored little-endian). None means the
    chunk is laid out in a way this reader leaves to Arrow (see the module docstring).
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    schema = metadata.schema
    index = next((i for i in range(len(schema)) if schema.column(i).path.split(".")[0] == column), None)
    if index is None:
        raise KeyError(f"no column {column!r}")
    col_schema = schema.column(index)
    chunk_meta = metadata.row_group(row_group).column(index)
    rows = metadata.row_group(row_group).num_rows
    if chunk_meta.compression != "UNCOMPRESSED" or chunk_meta.has_dictionary_page:
        return None
    if col_schema.max_repetition_level != 1:
        return None
    expected_physical = {2: "FIXED_LEN_BYTE_ARRAY", 4: "FLOAT"}.get(dtype.itemsize)
    if chunk_meta.physical_type != expected_physical:
        return None
    if chunk_meta.num_values != rows * dim:
        return None
    # No dictionary page (checked above): the chunk starts at its first data page.
    f.seek(chunk_meta.data_page_offset)
    data = f.read(chunk_meta.total_compressed_size)
    if len(data) != chunk_meta.total_compressed_size:
        return None
    out = np.empty(rows * dim, dtype)
    try:
        _copy_pages(memoryview(data), out, has_rep=True, has_def=col_schema.max_definition_level > 0)
    except (_Unsupported, IndexError, ValueError, struct.error):
        return None
    return out.reshape(rows, dim).astype(dtype.newbyteorder("="), copy=False)
