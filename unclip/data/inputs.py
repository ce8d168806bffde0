"""Input URL lists: discovery, schema checks and partitioning (stage 1, before img2dataset).

A source's ``url_list`` glob names Parquet or CSV files. Each file is identified by its name and a
content hash, and cut into partitions of at most ``partition_rows`` rows; a partition is one
img2dataset call and the unit of incremental re-runs: a partition that was downloaded once is never
downloaded again, and a new file becomes new partitions. Every row gets a stable identity
``uid = <source>/<file id>/<row>`` that follows it through every stage, so that the drops and the
final embeddings together account for every input row exactly once.

The URL policy's text checks (scheme, IP literals) run here, so refused rows are recorded without
any network access; name resolution and redirects are checked later, inside the download workers.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from unclip import drops, storage
from unclip.config import ConfigError, SourceConfig
from unclip.data.url_policy import UrlPolicy

INPUT_SUFFIXES = (".parquet", ".csv")
PARTITION_INDEX = "_partitions.json"


@dataclasses.dataclass(frozen=True)
class InputFile:
    uri: str
    file_id: str  # "<sanitised stem>-<first 10 hex of sha256>": sorts by name, changes with content


@dataclasses.dataclass(frozen=True)
class Partition:
    source: str
    partition_id: str  # "<file_id>-<chunk:05d>"
    uri: str  # normalised partition Parquet: uid, url, caption, extra columns
    rows: int  # rows handed to img2dataset (after the policy pre-check)
    precheck_drops: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def discover(source: SourceConfig, field: str = "url_list") -> list[str]:
    files = [u for u in storage.glob(source.url_list) if u.lower().endswith(INPUT_SUFFIXES)]
    if not files:
        raise ConfigError(
            f"sources[{source.name}].{field}: no .parquet or .csv file matches {source.url_list!r}"
        )
    return files


def _read_schema_names(uri: str) -> list[str]:
    fs, p = storage.fs_and_path(uri)
    with fs.open(p, "rb") as f:
        if uri.lower().endswith(".parquet"):
            return pq.ParquetFile(f).schema_arrow.names
        reader = pacsv.open_csv(f)
        return reader.schema.names


def check_columns(source: SourceConfig, index: int, files: list[str]) -> None:
    """Fail before any work when an input file lacks a configured column."""
    want = {"url_col": source.url_col, "caption_col": source.caption_col}
    want.update({f"extra_cols[{i}]": c for i, c in enumerate(source.extra_cols)})
    for uri in files:
        try:
            names = set(_read_schema_names(uri))
        except (OSError, ValueError, pa.ArrowException) as err:
            raise ConfigError(f"sources[{index}].url_list: cannot read {uri}: {err}") from None
        for field, col in want.items():
            if col not in names:
                raise ConfigError(
                    f"sources[{index}].{field}: column {col!r} not found in {uri} (columns: {sorted(names)})"
                )


def file_id(uri: str) -> str:
    stem = posixpath.basename(uri).rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:48] or "list"
    return f"{stem}-{storage.file_checksum(uri)[:10]}"


def _iter_batches(uri: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    fs, p = storage.fs_and_path(uri)
    with fs.open(p, "rb") as f:
        if uri.lower().endswith(".parquet"):
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)
        else:
            convert = pacsv.ConvertOptions(
                include_columns=columns, column_types={c: pa.string() for c in columns[:2]}
            )
            reader = pacsv.open_csv(f, convert_options=convert, read_options=pacsv.ReadOptions(block_size=1 << 24))
            for batch in reader:
                yield batch


def _normalise(batch: pa.RecordBatch, source: SourceConfig) -> pa.Table:
    t = pa.Table.from_batches([batch])
    cols = {
        "url": pc.cast(t.column(source.url_col), pa.string()),
        "caption": pc.cast(t.column(source.caption_col), pa.string()),
    }
    for c in source.extra_cols:
        col = t.column(c)
        # img2dataset writes extra columns into its status Parquet with their own types; nested types
        # do not survive its Feather round trip, so they travel as JSON-ish strings.
        if pa.types.is_nested(col.type):
            col = pc.cast(col, pa.string()) if not pa.types.is_struct(col.type) else pa.array(
                [None if v is None else str(v) for v in col.to_pylist()], pa.string()
            )
        cols[c] = col
    return pa.table(cols)


def partition_file(
    source: SourceConfig,
    input_file: InputFile,
    out_dir: str,
    drops_dir: str,
    partition_rows: int,
    policy: UrlPolicy,
) -> list[Partition]:
    """Cut one input file into partitions under ``out_dir``; idempotent (an index file marks it done).

    Rows the URL policy refuses on their text (and rows without a URL) are written to
    ``drops_dir/<file_id>.parquet`` instead of a partition.
    """
    index_uri = storage.join(out_dir, f"{input_file.file_id}.index.json")
    if storage.exists(index_uri):
        return [Partition(**p) for p in storage.read_json(index_uri)["partitions"]]

    columns = [source.url_col, source.caption_col, *source.extra_cols]
    parts: list[Partition] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    pending_drops = 0
    drop_rows: dict[str, list] = {f.name: [] for f in drops.DROP_SCHEMA}
    row = 0

    def flush() -> None:
        nonlocal pending, pending_rows, pending_drops
        if not pending and not pending_drops:
            return
        chunk = len(parts)
        pid = f"{input_file.file_id}-{chunk:05d}"
        table = pa.concat_tables(pending) if pending else _empty_partition(source)
        uri = storage.write_parquet(storage.join(out_dir, f"{pid}.parquet"), table)
        parts.append(Partition(source.name, pid, uri, table.num_rows, pending_drops))
        pending, pending_rows, pending_drops = [], 0, 0

    for batch in _iter_batches(input_file.uri, columns, batch_rows=min(partition_rows, 65536)):
        t = _normalise(batch, source)
        urls = t.column("url").to_pylist()
        keep = []
        for url in urls:
            uid = f"{source.name}/{input_file.file_id}/{row:010d}"
            row += 1
            refusal = (drops.URL_INVALID, "missing url") if not url else policy.precheck(url.strip())
            if refusal is None:
                keep.append(uid)
                continue
            keep.append(None)
            reason, detail = refusal
            for k, v in (("uid", uid), ("url", url), ("source", source.name), ("stage", "ingest"),
                         ("reason", reason), ("detail", detail)):
                drop_rows[k].append(v)
            pending_drops += 1
        mask = pa.array([u is not None for u in keep])
        kept = t.filter(mask)
        kept = kept.add_column(0, "uid", pa.array([u for u in keep if u is not None], pa.string()))
        # img2dataset fails on a null caption; an empty one is kept and judged by the basic filter.
        kept = kept.set_column(kept.schema.get_field_index("caption"), "caption",
                               pc.fill_null(kept.column("caption"), ""))
        kept = kept.set_column(kept.schema.get_field_index("url"), "url", pc.utf8_trim_whitespace(kept.column("url")))
        # partitions are cut at exact row counts so a partition's content depends only on the file
        while kept.num_rows:
            take = min(partition_rows - pending_rows, kept.num_rows)
            pending.append(kept.slice(0, take))
            pending_rows += take
            kept = kept.slice(take)
            if pending_rows >= partition_rows:
                flush()
    flush()

    drops_uri = storage.join(drops_dir, f"{input_file.file_id}.parquet")
    storage.write_parquet(drops_uri, drops.drop_table(drop_rows))
    storage.write_json(
        index_uri,
        {"input": input_file.uri, "file_id": input_file.file_id, "rows": row,
         "partitions": [p.to_dict() for p in parts], "precheck_drops": drops_uri},
    )
    return parts


def _empty_partition(source: SourceConfig) -> pa.Table:
    fields = [pa.field("uid", pa.string()), pa.field("url", pa.string()), pa.field("caption", pa.string())]
    fields += [pa.field(c, pa.string()) for c in source.extra_cols]
    return pa.schema(fields).empty_table()

