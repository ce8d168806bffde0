"""Input URL lists: discovery, column mapping, partitioning, the policy's text pre-check, idempotence."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unclip import drops, storage
from unclip.config import ConfigError, SourceConfig
from unclip.data import inputs
from unclip.data.url_policy import UrlPolicy

POLICY = UrlPolicy(allow_hosts=("127.0.0.1",))


def _rows(n: int) -> list[dict]:
    rows = [{"link": f"http://127.0.0.1:9/img/{i}.jpg", "text": f"caption {i}", "tag": i} for i in range(n)]
    rows[3]["link"] = "ftp://127.0.0.1/x.jpg"  # refused scheme
    rows[7]["link"] = "http://10.1.2.3/a.jpg"  # private address
    rows[11]["link"] = None  # no URL at all
    rows[12]["text"] = None  # null caption: kept here, judged by the basic filter
    return rows


SOURCE = dict(name="web", url_col="link", caption_col="text", extra_cols=("tag",))


def _partition(tmp_path, src: SourceConfig, uri: str, rows_per_part: int = 10):
    f = inputs.InputFile(uri=uri, file_id=inputs.file_id(uri))
    return f, inputs.partition_file(src, f, out_dir=str(tmp_path / "inputs"), drops_dir=str(tmp_path / "drops"),
                                    partition_rows=rows_per_part, policy=POLICY)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_partitioning_maps_columns_and_accounts_for_every_row(tmp_path, fmt):
    table = pa.Table.from_pylist(_rows(25))
    uri = str(tmp_path / f"list-01.{fmt}")
    if fmt == "parquet":
        pq.write_table(table, uri)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, uri)
    src = SourceConfig(url_list=str(tmp_path / f"*.{fmt}"), **SOURCE)
    assert inputs.discover(src) == [uri]
    f, parts = _partition(tmp_path, src, uri)
    assert f.file_id.startswith("list-01-") and len(f.file_id) == len("list-01-") + 10
    assert [p.rows for p in parts] == [10, 10, 2]
    got = pa.concat_tables([storage.read_parquet(p.uri) for p in parts])
    assert got.column_names == ["uid", "url", "caption", "tag"]
    caption = dict(zip(got.column("uid").to_pylist(), got.column("caption").to_pylist()))
    assert caption[f"web/{f.file_id}/0000000012"] == ""  # a null caption became empty
    assert caption[f"web/{f.file_id}/0000000013"] == "caption 13"
    d = storage.read_parquet(str(tmp_path / "drops" / f"{f.file_id}.parquet"))
    reasons = dict(zip(d.column("uid").to_pylist(), d.column("reason").to_pylist()))
    assert reasons == {
        f"web/{f.file_id}/0000000003": drops.URL_SCHEME,
        f"web/{f.file_id}/0000000007": drops.URL_PRIVATE,
        f"web/{f.file_id}/0000000011": drops.URL_INVALID,
    }
    uids = got.column("uid").to_pylist() + list(reasons)
    assert sorted(uids) == [f"web/{f.file_id}/{i:010d}" for i in range(25)]


def test_partitioning_is_idempotent_and_content_addressed(tmp_path):
    uri = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(15)), uri)
    src = SourceConfig(url_list=uri, **SOURCE)
    f, parts = _partition(tmp_path, src, uri)
    stamps = {p.uri: os.stat(p.uri).st_mtime_ns for p in parts}
    f2, again = _partition(tmp_path, src, uri)
    assert again == parts and {p.uri: os.stat(p.uri).st_mtime_ns for p in again} == stamps
    pq.write_table(pa.Table.from_pylist(_rows(16)), uri)  # the same name with new content: a new file id
    assert inputs.file_id(uri) != f.file_id


def test_missing_column_and_unreadable_file_name_the_field(tmp_path):
    uri = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"link": ["http://x/y.jpg"]}), uri)
    src = SourceConfig(url_list=uri, **SOURCE)
    with pytest.raises(ConfigError, match=r"sources\[2\]\.caption_col: column 'text' not found"):
        inputs.check_columns(src, 2, [uri])
    with pytest.raises(ConfigError, match=r"sources\[web\]\.url_list: no \.parquet or \.csv file"):
        inputs.discover(SourceConfig(url_list=str(tmp_path / "nothing-*.csv"), **SOURCE))
