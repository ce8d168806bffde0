"""The scheduled data refresh (deployment ``data-refresh``).

Each run loads the config, checks it before any work, takes the dataset's refresh lock (one refresh
of a dataset at a time), and runs the data pipeline incrementally on the workdir: new URL-list files
are partitioned and downloaded, the rest is skipped by content (ingest), and each later stage redoes
only the shards whose inputs changed (basic filter and semantic filter are cheap and global; embed
skips shards with the same kept rows and model). The PCA is refitted only when the kept set moved by
more than ``pca.refit_min_change``. A changed kept set becomes a new dataset version in the catalog,
published last; an unchanged one publishes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from unclip import catalog, locks, preflight, storage
from unclip.config import DATA_STAGES, load_config, resolve_config_path
from unclip.flows.data import data_pipeline
from unclip.tasks.common import publish_markdown


def _refresh_name() -> str:
    p = flow_run.parameters
    return f"refresh: {p.get('config', '?').rsplit('/', 1)[-1]} -> {p.get('workdir', '?')}"


@flow(name="data-refresh", flow_run_name=_refresh_name)
def data_refresh(config: str = "configs/demo.yaml", workdir: str = "work/demo",
                 overrides: dict[str, Any] | None = None, demo: bool = False,
                 lock_timeout_s: float = 6 * 3600) -> dict:
    """Refresh a dataset from its sources' URL-list locations and publish a new version if it changed.

    Args:
        config: run config YAML (a path relative to the project root, or absolute).
        workdir: the dataset's working directory (path or fsspec URI); ``${workdir}`` in the config.
        overrides: nested config values to override, e.g. ``{"pca": {"refit_min_change": 0.1}}``.
        demo: serve the built-in demo's images from 127.0.0.1 during the refresh (the demo config; the
            data ``unclip demo`` generated in this workdir, or 2,000 new pairs if there is none).
        lock_timeout_s: how long to wait for a refresh of the same dataset that is still running.
    """
    log = get_run_logger()
    workdir = storage.absolute(workdir)
    cfg = load_config(resolve_config_path(config), overrides, variables={"workdir": workdir})
    preflight.check_environment()
    if not demo:  # the demo's lists may not exist before its data is generated (under the lock)
        preflight.check_config(cfg, DATA_STAGES)
    where = catalog.catalog_uri(cfg, workdir)
    log.info("waiting for the refresh lock of dataset %r (catalog %s)", cfg.name, where)
    with locks.refresh_lock(cfg.name, where, timeout_s=lock_timeout_s) as lock:
        held_since = dt.datetime.now(dt.timezone.utc)
        log.info("holding %s", lock)
        with _demo_server(workdir, cfg) if demo else contextlib.nullcontext():
            if demo:
                preflight.check_config(cfg, DATA_STAGES)
            records = data_pipeline(config=cfg, workdir=workdir, lock_timeout_s=lock_timeout_s)
        ctx = {"flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name}
        release = catalog.publish_dataset(where, workdir, records, cfg, flow_run=ctx)
        removed = catalog.gc(where, workdir, cfg.name, cfg.catalog.keep_versions,
                             unfinished_grace_s=cfg.catalog.keep_unfinished_days * 86_400)
        catalog.record_refresh(where, {**ctx, "lock": lock, "held_from": held_since.isoformat(),
                                       "held_until": dt.datetime.now(dt.timezone.utc).isoformat(),
                                       "release": release["release"], "new_version": release["new"],
                                       "removed_files": len(removed)})
        log.info("releasing %s after publishing %s", lock, release["release"])
    _publish_release(release, records, removed)
    return {"release": release["release"], "version": release["version"], "new": release["new"],
            "rows": release["rows"], "pca_version": release["pca_version"], "catalog": where,
            "removed_files": len(removed),
            "stages": {s: {k: r[k] for k in ("rows_in", "rows_kept", "drops_by_reason")} for s, r in records.items()}}


def _demo_server(workdir: str, cfg, size: int = 2000):
    """The demo's image server; the demo data is generated first if this workdir has none."""
    from unclip.data import demo_source

    out = storage.join(workdir, "demo")
    try:
        spec = demo_source.load_demo(out)
    except FileNotFoundError:
        get_run_logger().info("no demo data in %s yet: generating %d pairs", out, size)
        spec = demo_source.generate_demo_for_config(out, cfg, size=size)
    return spec.server()


def _publish_release(release: dict, records: dict, removed: list[str]) -> None:
    pca = records["pca"]
    state = "new dataset version" if release["new"] else "no change: the latest version stands"
    lines = [f"# {release['release']} `{release['version']}`: {state}", "",
             f"- rows: {release['rows']:,} in {release['shards']:,} shards",
             f"- previous version: `{release.get('previous')}`",
             f"- PCA: `{release['pca_version']}` ({'refitted' if pca['metrics'].get('refit') else 'kept'}; kept set "
             f"changed by {pca['metrics'].get('kept_change_since_fit') or 0:.4f} since its fit)",
             f"- ingest: {records['ingest']['metrics'].get('partitions_downloaded', 0)} new partitions downloaded",
             f"- files only older versions used, removed: {len(removed)}",
             f"- code version: `{release['code_version']}`", f"- files: `{release['files']}`", "",
             "| stage | rows in | kept | dropped |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {r['rows_in']:,} | {r['rows_kept']:,} | {sum(r['drops_by_reason'].values()):,} |"
              for s, r in records.items()]
    publish_markdown("dataset", "release", "\n".join(lines), "the dataset version this refresh published")
