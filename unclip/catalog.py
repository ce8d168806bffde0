"""The catalog: released dataset versions and the training runs made on them.

Layout under the catalog URI (``catalog.uri``, default ``<workdir>/catalog``)::

    datasets/v000001-ds-<hash>.json          one release: lineage of every stage, counts, PCA, code
    datasets/v000001-ds-<hash>.files.parquet its kept files: source, shard, rows, digest, kept URI
    runs/<run id>.json                       one training/evaluation run and its lineage
    refreshes/<time>-<flow run>.json         each refresh: when it held the lock, what it published

A release is published only after every stage of a refresh finished and accounted for its rows, and
its record is written last (atomically), so a reader never sees a half-written version. The files a
release lists are immutable: the final embeddings are named by the digest of their kept keys
(``embeddings/<source>/<call>/<n>.<digest>.parquet``), so a later refresh that changes a shard writes
a new file beside the old one. ``gc`` removes the files that only versions older than the newest
``catalog.keep_versions`` still list. Publication happens under the refresh lock (one refresh per
dataset at a time), which is what makes the sequence numbers safe.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from unclip import manifest, storage
from unclip.config import RunConfig

_RELEASE = re.compile(r"^v(\d{6})-(ds-[0-9a-f]+)\.json$")
FILES_COLUMNS = ["source", "shard", "rows", "digest", "kept"]


class CatalogError(LookupError):
    """A named dataset version or run is not in the catalog."""


def catalog_uri(config: RunConfig, workdir: str) -> str:
    return config.catalog.uri or storage.join(workdir, "catalog")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- dataset versions ---------------------------------------------------------------------------------
def datasets(catalog: str) -> list[dict]:
    """Every released dataset version, oldest first."""
    folder = storage.join(catalog, "datasets")
    if not storage.exists(folder):
        return []
    names = sorted(n.rsplit("/", 1)[-1] for n in storage.listdir(folder))
    return [storage.read_json(storage.join(folder, n)) for n in names if _RELEASE.match(n)]


def latest(catalog: str) -> dict | None:
    found = datasets(catalog)
    return found[-1] if found else None


def resolve(catalog: str, version: str = "latest") -> dict:
    """The release named ``version`` (a ``ds-...`` hash, a ``v000003`` sequence name, or ``latest``)."""
    found = datasets(catalog)
    if not found:
        raise CatalogError(f"no dataset version in {catalog} yet: run a data refresh first")
    if version in ("latest", "", None):
        return found[-1]
    for r in reversed(found):
        if version in (r["version"], r["release"]):
            return r
    known = ", ".join(r["release"] for r in found[-5:])
    raise CatalogError(f"dataset version {version!r} is not in {catalog} (latest: {known})")


def kept_files(release: dict) -> pa.Table:
    """The release's kept embeddings files (``FILES_COLUMNS``); shards without kept rows left out."""
    return storage.read_parquet(release["files"])


def publish_dataset(catalog: str, workdir: str, records: dict[str, dict], config: RunConfig,
                    flow_run: dict | None = None) -> dict:
    """Release the workdir's current kept set as a dataset version, unless it is the latest already.

    Returns the release record, with ``"new": False`` when nothing changed since the latest one.
    """
    final = records.get("semantic_filter") or manifest.stage(workdir, "semantic_filter")
    pca_rec = records.get("pca") or manifest.load(workdir)["stages"].get("pca")
    previous = latest(catalog)
    if previous and previous["version"] == final["dataset_version"] and \
            previous.get("pca_version") == (pca_rec or {}).get("pca_version"):
        return {**previous, "new": False}
    seq = (previous["seq"] + 1) if previous else 1
    release = f"v{seq:06d}"
    stem = storage.join(catalog, "datasets", f"{release}-{final['dataset_version']}")
    index = storage.read_parquet(final["outputs"]["shard_index"])
    files = index.filter(pc.greater(index.column("rows"), 0)).select(FILES_COLUMNS)
    files_uri = storage.write_parquet(stem + ".files.parquet", files)
    stages = manifest.load(workdir)["stages"]
    record = {
        "release": release, "seq": seq, "version": final["dataset_version"], "name": config.name,
        "created_at": _now(), "workdir": workdir, "files": files_uri, "rows": int(final["rows_kept"]),
        "shards": files.num_rows, "previous": previous["version"] if previous else None,
        "pca_version": (pca_rec or {}).get("pca_version"), "pca": ((pca_rec or {}).get("outputs") or {}).get("pca"),
        "code_version": manifest.code_version(), "flow_run": flow_run or {},
        "stages": {s: {k: r.get(k) for k in ("rows_in", "rows_kept", "drops_by_reason", "dataset_version",
                                             "metrics", "code_version", "finished_at")}
                   for s, r in stages.items()},
        "config": config.model_dump(mode="json"),
    }
    storage.write_json(stem + ".json", record, sort_keys=False)  # last: the release exists from here on
    return {**record, "new": True}


def gc(catalog: str, workdir: str, keep_versions: int) -> list[str]:
    """Remove final-embeddings files that neither the newest ``keep_versions`` releases nor the
    workdir's current index list. Returns the removed URIs."""
    found = datasets(catalog)
    keep = set()
    for r in found[-keep_versions:]:
        keep.update(kept_files(r).column("kept").to_pylist())
    current = storage.join(workdir, "index", "embeddings.parquet")
    if storage.exists(current):
        keep.update(u for u in storage.read_parquet(current, columns=["kept"]).column("kept").to_pylist() if u)
    listed = set()
    for r in found[:-keep_versions]:
        listed.update(kept_files(r).column("kept").to_pylist())
    removed = sorted(u for u in listed - keep if storage.exists(u))
    for u in removed:
        storage.remove(u)
    return removed


def record_refresh(catalog: str, entry: dict) -> str:
    """One file per refresh (``refreshes/<held from>-<flow run>.json``): when it held the dataset's
    lock and what it published. Written by the lock holder only."""
    name = f"{entry['held_from'].replace(':', '').replace('+0000', 'Z')}-{entry.get('flow_run_id', 'local')[:8]}"
    return storage.write_json(storage.join(catalog, "refreshes", f"{name}.json"), entry, sort_keys=False)


def refreshes(catalog: str) -> list[dict]:
    folder = storage.join(catalog, "refreshes")
    return sorted((storage.read_json(u) for u in storage.listdir(folder) if u.endswith(".json")),
                  key=lambda e: e["held_from"])


# -- runs ---------------------------------------------------------------------------------------------
def run_uri(catalog: str, run_id: str) -> str:
    return storage.join(catalog, "runs", f"{run_id}.json")


def save_run(catalog: str, run: dict[str, Any]) -> dict:
    run = {**run, "updated_at": _now()}
    storage.write_json(run_uri(catalog, run["run_id"]), run, sort_keys=False)
    return run


def runs(catalog: str) -> list[dict]:
    folder = storage.join(catalog, "runs")
    if not storage.exists(folder):
        return []
    found = [storage.read_json(u) for u in storage.listdir(folder) if u.endswith(".json")]
    return sorted(found, key=lambda r: r.get("started_at", ""))


def get_run(catalog: str, run_id: str) -> dict:
    uri = run_uri(catalog, run_id)
    if not storage.exists(uri):
        known = ", ".join(r["run_id"] for r in runs(catalog)[-5:]) or "none"
        raise CatalogError(f"run {run_id!r} is not in {catalog} (latest: {known})")
    return storage.read_json(uri)
