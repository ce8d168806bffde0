"""The run's lineage record, ``DIR/manifest.json``.

For each stage that ran: its outputs' URIs, row counts, drops by reason, the configuration it ran
with, the dataset version (a content hash of the kept shards and their checksums), the code version
and its key metrics. Later stages read their inputs from here rather than from conventions about
paths, so a stage can be re-run alone on what an earlier run produced. The file is small at any
scale: per-shard detail lives in index Parquet files that the manifest points to.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import subprocess
from pathlib import Path

import pyarrow as pa

import unclip
from unclip import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class MissingStageError(RuntimeError):
    """A stage needs the output of an earlier stage that has not run in this workdir."""


def manifest_uri(workdir: str) -> str:
    return storage.join(workdir, MANIFEST)


def load(workdir: str) -> dict:
    uri = manifest_uri(workdir)
    if storage.exists(uri):
        return storage.read_json(uri)
    return {"format_version": FORMAT_VERSION, "workdir": workdir, "stages": {}}


def stage(workdir: str, name: str) -> dict:
    record = load(workdir)["stages"].get(name)
    if record is None:
        raise MissingStageError(
            f"stage {name!r} has not run in {workdir}; run it first (e.g. `unclip data --until {name}`)"
        )
    return record


def record_stage(workdir: str, name: str, record: dict, run_config: dict | None = None) -> dict:
    """Write ``record`` as stage ``name`` (replacing an older one) and return the whole manifest.

    Only the flow process writes the manifest, once per stage, so read-modify-write is safe here;
    the write itself is atomic.
    """
    m = load(workdir)
    record = {**record, "code_version": code_version(),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    m["stages"][name] = record
    # stages in pipeline order, whatever order they (re-)ran in
    m["stages"] = {s: m["stages"][s] for s in sorted(m["stages"], key=_stage_rank)}
    m["code_version"] = code_version()
    if run_config is not None:
        m["config"] = run_config
    storage.write_json(manifest_uri(workdir), m, sort_keys=False)
    return m


def set_catalog(workdir: str, catalog: str, dataset: str) -> None:
    """Record where this workdir's dataset versions are published."""
    m = load(workdir)
    if m.get("catalog") != {"uri": catalog, "dataset": dataset}:
        m["catalog"] = {"uri": catalog, "dataset": dataset}
        storage.write_json(manifest_uri(workdir), m, sort_keys=False)


def _stage_rank(stage: str) -> int:
    from unclip.config import DATA_STAGES

    return DATA_STAGES.index(stage) if stage in DATA_STAGES else len(DATA_STAGES)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<commit>[.dirty]`` when running from a git checkout, ``<package
    version>+g<UNCLIP_CODE_VERSION>`` in an image built with ``--build-arg CODE_VERSION=<commit>``
    (which copies no .git), else the package version alone."""
    built = os.environ.get("UNCLIP_CODE_VERSION", "").strip()
    if built:
        return f"{unclip.__version__}+g{built}"
    root = Path(unclip.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return unclip.__version__
    return f"{unclip.__version__}+g{commit}{'.dirty' if dirty else ''}"


def dataset_version(shards: pa.Table) -> str:
    """Content hash of a kept-shard list: sorted (shard, checksum of its kept rows) pairs.

    ``shards`` has columns ``shard`` (workdir-relative name) and ``digest``; shards without kept rows
    are left out, so the version says exactly which samples are in.
    """
    pairs = sorted(zip(shards.column("shard").to_pylist(), shards.column("digest").to_pylist()))
    h = hashlib.sha256()
    for shard, digest in pairs:
        h.update(f"{shard}\t{digest}\n".encode())
    return "ds-" + h.hexdigest()[:16]


def relative(workdir: str, uri: str) -> str:
    w = workdir.rstrip("/") + "/"
    return uri[len(w):] if uri.startswith(w) else uri

