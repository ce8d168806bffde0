"""What every stage shares: progress (a terminal bar and a Prefect progress artifact), the counts
table artifact, drop counting, and batching of shard lists into task-sized pieces."""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from tqdm.auto import tqdm

from unclip import storage

T = TypeVar("T")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = "-".join(parts).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key)).strip("-")


def in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def describe_shards(shards: Sequence[dict]) -> str:
    """A shard batch in words, e.g. ``clip/call-35ae12c8 00000-00015, dalle/call-9f0b11aa 00000-00003``:
    per ingest call (source and call id), its first and last shard number."""
    runs: list[list] = []
    for s in shards:
        *where, number = s["shard"].removeprefix("shards/").split("/")
        if where:  # source/call-<12 hex>: 8 hex digits say which call
            where[-1] = where[-1][: len("call-") + 8]
        where = "/".join(where) if where else s.get("source", "?")
        if runs and runs[-1][0] == where:
            runs[-1][2] = number
        else:
            runs.append([where, number, number])
    return ", ".join(f"{w} {a}" if a == b else f"{w} {a}-{b}" for w, a, b in runs) or "no shards"


def batch_run_name(verb: str):
    """A ``task_run_name`` for a task taking ``shards``: what it does and to which shards."""

    def name() -> str:
        from prefect.runtime import task_run

        params = task_run.parameters
        return f"{verb}: {describe_shards(params.get('shards') or [])}"

    name.__name__ = f"name_{artifact_key(verb).replace('-', '_')}"
    return name


class Progress:
    """A stage's progress, shown both as a tqdm bar on the terminal and as a Prefect progress
    artifact in the UI. Thread-safe: shard tasks report from the task runner's threads."""

    def __init__(self, key: str, total: int, desc: str, unit: str = "shard") -> None:
        self.total = max(total, 1)
        self.done = 0
        self._lock = threading.Lock()
        self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        self._artifact = None
        self._last_pct = -1.0
        self._desc = desc
        if in_prefect_run():
            self._artifact = create_progress_artifact(0.0, key=artifact_key(key, "progress"), description=desc)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            self._bar.update(n)
            pct = 100.0 * min(self.done, self.total) / self.total
            # one API call per percent at most: a 65,000-shard stage must not flood the server
            if self._artifact is not None and (pct - self._last_pct >= 1.0 or self.done >= self.total):
                self._last_pct = pct
                with contextlib.suppress(Exception):
                    update_progress_artifact(self._artifact, pct, description=f"{self._desc}: {self.done}/{self.total}")

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def count_reasons(uris: Iterable[str]) -> dict[str, int]:
    """Drops per reason over drop Parquet files, aggregated by Arrow without loading the rows."""
    uris = [u for u in uris]
    if not uris:
        return {}
    table = storage.parquet_dataset(uris).to_table(columns=["reason"])
    if table.num_rows == 0:
        return {}
    agg = table.group_by("reason").aggregate([("reason", "count")])
    return dict(sorted(zip(agg.column("reason").to_pylist(), agg.column("reason_count").to_pylist())))


def publish_counts(stage: str, rows_in: int, rows_kept: int, reasons: dict[str, int], extra: dict | None = None) -> None:
    """The stage's counts as a Prefect table artifact (rows in, kept, drops by reason) and a log line."""
    table = [{"what": "rows in", "rows": rows_in}, {"what": "rows kept", "rows": rows_kept}]
    table += [{"what": f"dropped: {r}", "rows": n} for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    for k, v in (extra or {}).items():
        table.append({"what": k, "rows": v})
    if in_prefect_run():
        create_table_artifact(table, key=artifact_key(stage, "counts"),
                              description=f"{stage}: rows in, rows kept and drops by reason")
        get_run_logger().info("%s: %d in, %d kept, %d dropped %s", stage, rows_in, rows_kept,
                              sum(reasons.values()), reasons)


def publish_table(stage: str, name: str, rows: list[dict], description: str) -> None:
    if in_prefect_run():
        create_table_artifact(rows, key=artifact_key(stage, name), description=description)


# Prefect's server drops the event of an artifact whose JSON is over 1.5 MB
# (PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES) and logs "Refusing to publish event"; a base64 data: URI
# is 4/3 the PNG's size, so an artifact image is kept under 1 MB of PNG.
MAX_ARTIFACT_PNG_BYTES = 1_000_000


def fit_png(png: bytes, max_bytes: int = MAX_ARTIFACT_PNG_BYTES) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """``png`` downscaled (Lanczos, by whole steps of 1/sqrt(2) per side) until it is at most ``max_bytes``;
    returns (png, (width, height) shown, (width, height) of the original). A PNG that fits is returned as is."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png))
    size = image.size
    rgb = image.convert("RGB") if len(png) > max_bytes else image
    out, shown, scale = png, size, 1.0
    while len(out) > max_bytes and min(shown) > 16:
        scale /= 2 ** 0.5
        shown = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        buf = io.BytesIO()
        rgb.resize(shown, Image.LANCZOS).save(buf, format="PNG", optimize=True)
        out = buf.getvalue()
    return out, shown, size


def publish_image(stage: str, name: str, png: bytes, description: str) -> None:
    """A PNG as an image artifact the Prefect UI displays (a data: URI, so no web server is needed),
    downscaled by ``fit_png`` when it is too large for Prefect's events (the description then says so)."""
    if in_prefect_run():
        import base64

        from prefect.artifacts import create_image_artifact

        png, shown, size = fit_png(png)
        if shown != size:
            description += f" (shown at {shown[0]}x{shown[1]} of {size[0]}x{size[1]} pixels)"
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                              key=artifact_key(stage, name), description=description)


def publish_markdown(stage: str, name: str, markdown: str, description: str) -> None:
    if in_prefect_run():
        create_markdown_artifact(markdown, key=artifact_key(stage, name), description=description)


def route_by_batch(rows: pa.Table, batches, work: str, area: str, name: str) -> None:
    """Write ``rows`` to ``<work>/<area>/batch=<b>/<name>.parquet``, one file per shard batch ``b``
    (``batches`` gives each row's batch), so that the batch's finalize task reads only its own."""
    import numpy as np

    batches = np.asarray(batches)
    for b in np.unique(batches):
        storage.write_parquet(storage.join(work, area, f"batch={int(b)}", f"{name}.parquet"),
                              rows.filter(pa.array(batches == b)))


def read_routed(work: str, area: str, batch: int, schema: pa.Schema) -> pa.Table:
    """The rows ``route_by_batch`` wrote for ``batch`` (an empty table of ``schema`` if none)."""
    folder = storage.join(work, area, f"batch={batch}")
    if not storage.exists(folder):
        return schema.empty_table()
    return storage.parquet_dataset(folder).to_table()
