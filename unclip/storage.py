"""Storage through fsspec URIs, with atomic writes.

Every file the pipeline produces is written to a temporary name in the same folder and then renamed,
so a reader (or a resumed run) never sees half a file: a local path and ``s3://bucket/prefix`` go
through the same functions. On object stores a single PUT is already atomic, and the rename is a
copy+delete that happens only after the temporary object is complete.
"""

from __future__ import annotations

import datetime as dt

import contextlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def is_local(uri: str) -> bool:
    fs, _ = fs_and_path(uri)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of ``base``."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def absolute(uri: str) -> str:
    """Make a local path absolute; leave remote URIs as they are."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def exists(uri: str) -> bool:
    fs, p = fs_and_path(uri)
    return fs.exists(p)


def makedirs(uri: str) -> None:
    fs, p = fs_and_path(uri)
    fs.makedirs(p, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob, returned as URIs with the pattern's scheme."""
    fs, p = fs_and_path(pattern)
    matches = sorted(fs.glob(p)) if any(c in p for c in "*?[") else ([p] if fs.exists(p) else [])
    return [_unstrip(pattern, fs, m) for m in matches]


def _unstrip(like: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if "://" in like:
        return fs.unstrip_protocol(path)
    return path


def modified(uri: str) -> dt.datetime:
    """Last modification time (timezone-aware, UTC)."""
    fs, p = fs_and_path(uri)
    t = fs.modified(p)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def listdir(uri: str) -> list[str]:
    fs, p = fs_and_path(uri)
    if not fs.exists(p):
        return []
    return sorted(_unstrip(uri, fs, x) for x in fs.ls(p, detail=False))


def remove(uri: str, recursive: bool = False) -> None:
    fs, p = fs_and_path(uri)
    if fs.exists(p):
        fs.rm(p, recursive=recursive)


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``uri`` for writing under a temporary sibling name; rename into place on success."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open writes only ('wb' or 'w')")
    fs, p = fs_and_path(uri)
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(p)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> str:
    with atomic_open(uri, "wb") as f:
        f.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    fs, p = fs_and_path(uri)
    with fs.open(p, "rb") as f:
        return f.read()


def write_json(uri: str, obj: Any, sort_keys: bool = True) -> str:
    return write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table, **kwargs: Any) -> str:
    kwargs.setdefault("compression", "zstd")
    with atomic_open(uri, "wb") as f:
        pq.write_table(table, f, **kwargs)
    return uri


def read_parquet(uri: str, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    fs, p = fs_and_path(uri)
    return pq.read_table(p, columns=columns, filesystem=fs, **kwargs)


def parquet_dataset(uri: str | list[str]) -> ds.Dataset:
    """An Arrow dataset over a folder, a file or a list of files (one filesystem), for filtered and
    column-projected reads that do not load whole files."""
    uris = [uri] if isinstance(uri, str) else list(uri)
    fs, _ = fs_and_path(uris[0])
    paths = [fs_and_path(u)[1] for u in uris]
    return ds.dataset(paths[0] if isinstance(uri, str) else paths, format="parquet", filesystem=fs)


def parquet_rows(uri: str) -> int:
    fs, p = fs_and_path(uri)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def file_checksum(uri: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    import hashlib

    h = hashlib.sha256()
    fs, p = fs_and_path(uri)
    with fs.open(p, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()

