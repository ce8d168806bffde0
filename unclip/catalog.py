"""The catalog: released dataset versions and the training runs made on them.

Layout under the catalog URI (``catalog.uri``, default ``<workdir>/catalog``)::

    datasets/<name>/v000001-ds-<hash>.json          one release: lineage of every stage, counts, PCA, code
    datasets/<name>/v000001-ds-<hash>.files.parquet its kept files: source, shard, rows, digest, kept URI, tar
    runs/<run id>.json                       one training/evaluation run and its lineage
    models/<kind>/m000001-<version>.json     one released model: folder URI, weights sha256, lineage
    refreshes/<time>-<flow run>.json         each refresh: when it held the lock, what it published

A release is published only after every stage of a refresh finished and accounted for its rows, and
its record is written last (atomically), so a reader never sees a half-written version. The files a
release lists are immutable: the final embeddings are named by the digest of their kept keys
(``embeddings/<source>/<call>/<n>.<digest>.parquet``), so a later refresh that changes a shard writes
a new file beside the old one. ``gc`` removes the files that only versions older than the newest
``catalog.keep_versions`` still list (not those of a version a run in progress uses) and marks those
versions collected. Several datasets can share a catalog, each under its own name and refreshed from
one workdir. Publication happens under the dataset's refresh lock (one refresh per dataset at a
time), which is what makes its sequence numbers safe. The workdir's manifest records where its
catalog is (``manifest.json`` ``catalog``), so the CLI and ``evaluate`` find it from the workdir.
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
# per kept shard: where its embeddings (``kept``) and its images (``tar``, keyed by each row's ``key``) are
FILES_COLUMNS = ["source", "shard", "rows", "digest", "kept", "tar"]


class CatalogError(LookupError):
    """A named dataset version or run is not in the catalog."""


def catalog_uri(config: RunConfig, workdir: str) -> str:
    return config.catalog.uri or storage.join(workdir, "catalog")


def locate(workdir: str) -> tuple[str, str | None]:
    """(catalog URI, dataset name) a workdir publishes to: from its manifest, else the default."""
    m = manifest.load(workdir).get("catalog") or {}
    return m.get("uri") or storage.join(workdir, "catalog"), m.get("dataset")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- dataset versions ---------------------------------------------------------------------------------
def dataset_names(catalog: str) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in storage.listdir(storage.join(catalog, "datasets"))]


def datasets(catalog: str, name: str | None = None) -> list[dict]:
    """The released versions of dataset ``name`` (every dataset when None), oldest first."""
    found = []
    for ds in ([name] if name else dataset_names(catalog)):
        folder = storage.join(catalog, "datasets", ds)
        files = sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(folder))
        found += [storage.read_json(storage.join(folder, f)) for f in files if _RELEASE.match(f)]
    return found


def latest(catalog: str, name: str) -> dict | None:
    found = [r for r in datasets(catalog, name) if not r.get("collected_at")]
    return found[-1] if found else None


def resolve(catalog: str, name: str, version: str = "latest") -> dict:
    """Dataset ``name``'s release ``version`` (a ``ds-...`` hash, a ``v000003`` name, or ``latest``)."""
    found = datasets(catalog, name)
    if not found:
        raise CatalogError(f"no version of dataset {name!r} in {catalog} yet: run a data refresh first")
    if version in ("latest", "", None):
        live = [r for r in found if not r.get("collected_at")]
        return live[-1]
    for r in reversed(found):
        if version in (r["version"], r["release"]):
            if r.get("collected_at"):
                raise CatalogError(f"dataset {name!r} {r['release']} ({r['version']}): its files were removed by "
                                   f"gc at {r['collected_at']} (catalog.keep_versions)")
            return r
    known = ", ".join(r["release"] for r in found[-5:])
    raise CatalogError(f"dataset {name!r} has no version {version!r} in {catalog} (latest: {known})")


def kept_files(release: dict) -> pa.Table:
    """The release's kept files (``FILES_COLUMNS``); shards without kept rows left out. A release
    written before file lists carried ``tar`` gets it from the shard name (``<workdir>/<shard>.tar``,
    where ingest writes it)."""
    files = storage.read_parquet(release["files"])
    if "tar" not in files.column_names:
        tars = [storage.join(release["workdir"], f"{s}.tar") for s in files.column("shard").to_pylist()]
        files = files.append_column("tar", pa.array(tars, pa.string()))
    return files


def publish_dataset(catalog: str, workdir: str, records: dict[str, dict], config: RunConfig,
                    flow_run: dict | None = None) -> dict:
    """Release the workdir's current kept set as a version of dataset ``config.name``, unless it is
    the latest one already. A dataset is refreshed from one workdir: publishing it from another is
    refused. Returns the release record, with ``"new": False`` when nothing changed.
    """
    final = records.get("semantic_filter") or manifest.stage(workdir, "semantic_filter")
    pca_rec = records.get("pca") or manifest.load(workdir)["stages"].get("pca")
    found = datasets(catalog, config.name)
    previous = found[-1] if found else None
    if previous and previous["workdir"] != workdir:
        raise CatalogError(f"dataset {config.name!r} in {catalog} is refreshed from {previous['workdir']}, not "
                           f"{workdir}: give this one another `name` in its config")
    if previous and previous["version"] == final["dataset_version"] and \
            previous.get("pca_version") == (pca_rec or {}).get("pca_version"):
        return {**previous, "new": False}
    seq = (previous["seq"] + 1) if previous else 1
    release = f"v{seq:06d}"
    stem = storage.join(catalog, "datasets", config.name, f"{release}-{final['dataset_version']}")
    index = storage.read_parquet(final["outputs"]["shard_index"])
    files = index.filter(pc.greater(index.column("rows"), 0)).select(FILES_COLUMNS)
    files_uri = storage.write_parquet(stem + ".files.parquet", files)
    stages = manifest.load(workdir)["stages"]
    record = {
        "release": release, "seq": seq, "version": final["dataset_version"], "name": config.name,
        "created_at": _now(), "workdir": workdir, "files": files_uri, "rows": int(final["rows_kept"]),
        "shards": files.num_rows, "previous": previous["version"] if previous else None,
        "pca_version": (pca_rec or {}).get("pca_version"), "pca": ((pca_rec or {}).get("outputs") or {}).get("pca"),
        # the CLIP model version the embeddings come from, when it came from the catalog
        "clip_model_version": ((stages.get("embed") or {}).get("metrics") or {}).get("model_version"),
        "code_version": manifest.code_version(), "flow_run": flow_run or {},
        "stages": {s: {k: r.get(k) for k in ("rows_in", "rows_kept", "drops_by_reason", "dataset_version",
                                             "metrics", "code_version", "finished_at")}
                   for s, r in stages.items()},
        "config": config.model_dump(mode="json"),
    }
    storage.write_json(stem + ".json", record, sort_keys=False)  # last: the release exists from here on
    manifest.set_catalog(workdir, catalog, config.name)
    return {**record, "new": True}


def _release_uri(catalog: str, release: dict) -> str:
    return storage.join(catalog, "datasets", release["name"], f"{release['release']}-{release['version']}.json")


def gc(catalog: str, workdir: str, name: str, keep_versions: int, orphan_grace_s: float = 86_400,
       unfinished_grace_s: float = 7 * 86_400) -> list[str]:
    """Remove the final-embeddings files of dataset ``name``'s releases older than the newest
    ``keep_versions``, except files that a kept release, a run still in progress, a run that stopped
    unfinished less than ``unfinished_grace_s`` ago (so it can be resumed), or the workdir's current
    index uses. Collected releases are marked (``collected_at``) and never read again.
    Then sweep ``<workdir>/embeddings/``: a file that nothing live lists and that is older than
    ``orphan_grace_s`` (one written by a refresh killed before it published, or by a run between
    refreshes) is removed too. Returns the removed URIs."""
    found = datasets(catalog, name)
    keep = set()
    busy = {r["dataset_version"] for r in runs(catalog) if run_is_live(r) or _resumable(r, unfinished_grace_s)}
    for r in found[-keep_versions:] + [r for r in found if r["version"] in busy and not r.get("collected_at")]:
        keep.update(kept_files(r).column("kept").to_pylist())
    current = storage.join(workdir, "index", "embeddings.parquet")
    if storage.exists(current):
        keep.update(u for u in storage.read_parquet(current, columns=["kept"]).column("kept").to_pylist() if u)
    removed = []
    for r in found[:-keep_versions]:
        if r.get("collected_at") or r["version"] in busy:
            continue
        for u in kept_files(r).column("kept").to_pylist():
            if u not in keep and storage.exists(u):
                storage.remove(u)
                removed.append(u)
        storage.write_json(_release_uri(catalog, r), {**r, "collected_at": _now()}, sort_keys=False)
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=orphan_grace_s)
    for u in storage.glob(storage.join(workdir, "embeddings", "**", "*.parquet")):
        if u not in keep and storage.modified(u) < cutoff:
            storage.remove(u)
            removed.append(u)
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


# -- model versions -----------------------------------------------------------------------------------
_MODEL = re.compile(r"^m(\d{6})-(.+)\.json$")


def model_version_id(kind: str, weights_sha256: str) -> str:
    """A released model's version id: its kind and the start of its weights' sha256."""
    return f"{kind}-{weights_sha256[:12]}"


def publish_model(catalog: str, record: dict) -> dict:
    """Release a trained model as a version of its ``kind`` (clip, prior_diffusion, ...).

    ``record`` holds at least ``kind``, ``uri`` (the release folder), ``weights_sha256``, ``run_id``,
    ``dataset_version``, ``code_version``, ``metrics``; the version id is ``<kind>-<sha256[:12]>``, so
    the same weights published twice (a finished run resumed) give the same version, written once.
    """
    kind = record["kind"]
    version = model_version_id(kind, record["weights_sha256"])
    found = models(catalog, kind)
    for r in found:
        if r["version"] == version:
            return {**r, "new": False}
    seq = found[-1]["seq"] + 1 if found else 1
    out = {"version": version, "seq": seq, "created_at": _now(), **record}
    storage.write_json(storage.join(catalog, "models", kind, f"m{seq:06d}-{version}.json"), out, sort_keys=False)
    return {**out, "new": True}


def models(catalog: str, kind: str | None = None) -> list[dict]:
    """Released model versions of ``kind`` (every kind when None), oldest first within a kind."""
    root = storage.join(catalog, "models")
    if not storage.exists(root):
        return []
    kinds = [kind] if kind else sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(root))
    found = []
    for k in kinds:
        folder = storage.join(root, k)
        if storage.exists(folder):
            names = sorted(u.rsplit("/", 1)[-1] for u in storage.listdir(folder))
            found += [storage.read_json(storage.join(folder, n)) for n in names if _MODEL.match(n)]
    return found


def resolve_model(catalog: str, ref: str) -> dict:
    """A model version by reference: ``<kind>@latest``, ``<kind>@<version>`` or a bare version id."""
    kind, _, which = ref.partition("@") if "@" in ref else (ref.split("-", 1)[0], "@", ref)
    found = models(catalog, kind)
    if not found:
        raise CatalogError(f"no {kind!r} model in {catalog} yet: train one with `unclip retrain --stages {kind}`")
    if which in ("latest", ""):
        return found[-1]
    for r in reversed(found):
        if which in (r["version"], f"m{r['seq']:06d}"):
            return r
    known = ", ".join(r["version"] for r in found[-5:])
    raise CatalogError(f"{kind!r} has no model version {which!r} in {catalog} (latest: {known})")


# -- runs ---------------------------------------------------------------------------------------------
def run_uri(catalog: str, run_id: str) -> str:
    return storage.join(catalog, "runs", f"{run_id}.json")


# A run in progress refreshes ``updated_at`` at least this often (the flow's heartbeat does, every
# minute); a "running" record older than the lease is a killed run: no longer live (``gc`` keeps its
# dataset version a while longer all the same, so it can be resumed: ``_resumable``).
RUN_LEASE_S = 3600.0


def _heard_within(run: dict, seconds: float) -> bool:
    """Whether the run's record was last saved (or, never saved since, started) within ``seconds``."""
    updated = run.get("updated_at") or run.get("started_at")
    if not updated:
        return False
    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(updated)).total_seconds() < seconds


def _says_running(run: dict) -> bool:
    return run.get("state", "").startswith(("running", "starting"))


def run_is_live(run: dict, lease_s: float = RUN_LEASE_S) -> bool:
    return _says_running(run) and _heard_within(run, lease_s)


def run_stopped(run: dict) -> bool:
    """A run whose record says it is running but which stopped beating: killed without a word."""
    return _says_running(run) and not run_is_live(run)


def _resumable(run: dict, grace_s: float) -> bool:
    """A run that stopped unfinished (failed, or killed while running) less than ``grace_s`` ago."""
    return run.get("state") != "completed" and bool(run.get("dataset_version")) and _heard_within(run, grace_s)


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
