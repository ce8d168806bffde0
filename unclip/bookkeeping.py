"""The data pipeline's bookkeeping, without Prefect: row accounting, dataset-version hashing, the
PCA refit rule and lineage text. The flows in ``unclip.flows.data`` call these and only sequence."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from unclip import manifest, storage
from unclip.config import RunConfig
from unclip.tasks.common import count_reasons


class AccountingError(RuntimeError):
    """A stage's rows in differ from its rows kept plus rows dropped: a row was lost or doubled."""


def check_accounting(stage: str, rows_in: int, kept: int, reasons: dict[str, int]) -> None:
    dropped = sum(reasons.values())
    if rows_in != kept + dropped:
        raise AccountingError(f"{stage}: {rows_in} rows in but {kept} kept + {dropped} dropped")


def versioned_shards(index: pa.Table, workdir: str) -> str:
    """Dataset version of a per-shard result index: shards with kept rows, with their content
    checksum and the digest of their kept keys."""
    ingest_index = storage.read_parquet(manifest.stage(workdir, "ingest")["outputs"]["shard_index"],
                                        columns=["shard", "content_sha256"])
    sha = dict(zip(ingest_index.column("shard").to_pylist(), ingest_index.column("content_sha256").to_pylist()))
    kept = index.filter(pc.greater(index.column("rows"), 0))
    digests = [f"{sha[s]}:{d}" for s, d in zip(kept.column("shard").to_pylist(), kept.column("digest").to_pylist())]
    return manifest.dataset_version(pa.table({"shard": kept.column("shard"), "digest": digests}))


def kept_and_drops(index: pa.Table) -> dict:
    return {"rows_kept": int(pc.sum(index.column("rows")).as_py() or 0),
            "drops_by_reason": count_reasons(index.column("drops").to_pylist())}


def kept_change_since(previous: dict | None, index: pa.Table, config: RunConfig) -> float | None:
    """Fraction of the rows the previous PCA was fitted on that changed since (None: fit anew)."""
    if not previous or "fit_shards" not in previous.get("outputs", {}):
        return None
    fit_cfg = {k: v for k, v in previous["config"]["pca"].items() if k != "refit_min_change"}
    now_cfg = {k: v for k, v in config.pca.model_dump(mode="json").items() if k != "refit_min_change"}
    if fit_cfg != now_cfg or not all(storage.exists(u) for u in previous["outputs"].values()):
        return None
    fit = storage.read_parquet(previous["outputs"]["fit_shards"])
    before = dict(zip(fit.column("shard").to_pylist(), zip(fit.column("digest").to_pylist(),
                                                          fit.column("rows").to_pylist())))
    now = index.filter(pc.greater(index.column("rows"), 0))
    after = dict(zip(now.column("shard").to_pylist(), zip(now.column("digest").to_pylist(),
                                                         now.column("rows").to_pylist())))
    changed = sum(rows for shard, (digest, rows) in after.items() if before.get(shard, (None,))[0] != digest)
    changed += sum(rows for shard, (_, rows) in before.items() if shard not in after)
    return changed / max(1, sum(rows for _, rows in before.values()))


def lineage_markdown(stage: str, record: dict, workdir: str) -> str:
    """A stage's lineage as the markdown artifact shows it: versions, counts, outputs, metrics, config."""
    lines = [f"# {stage}", "", f"- dataset version: `{record.get('dataset_version')}`",
             f"- code version: `{manifest.code_version()}`", f"- rows in: {record['rows_in']:,}",
             f"- rows kept: {record['rows_kept']:,}", f"- workdir: `{workdir}`", "", "## outputs", ""]
    lines += [f"- {k}: `{v}`" for k, v in record.get("outputs", {}).items()]
    if record.get("metrics"):
        lines += ["", "## metrics", ""] + [f"- {k}: {v}" for k, v in record["metrics"].items()]
    lines += ["", "## configuration", "", "```yaml", yaml.safe_dump(record.get("config", {}), sort_keys=False).strip(),
              "```"]
    return "\n".join(lines)
