"""Scale-out engines give the same data as the local defaults.

The same demo URL lists run through the whole data pipeline twice: once with the defaults (thread
pool task runner, img2dataset's multiprocessing distributor), once on a local Ray (prefect-ray task
runner for the shard stages, img2dataset's ray distributor for the downloads); the shard stages
then run again on the first workdir with the process-pool runner. Kept rows, their
embeddings and every drop with its reason must be the same. The demo lists plant refused addresses
(loopback, private, link-local), so equal drop reasons also show that the URL policy reached
img2dataset's Ray workers.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unclip.config import load_config
from unclip.data import demo_source

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

SIZE = 160


def _config(path, lists_dir: str, **orchestration) -> str:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for s in cfg["sources"]:
        s["url_list"] = f"{lists_dir}/{s['name']}/*.parquet"
    cfg["semantic_filter"] = {"min_clip_score": 0.0, "near_dup": {"threshold": 0.9999, "cluster_size": 50}}
    cfg["orchestration"].update(shards_per_task=2, **orchestration.pop("orch", {}))
    cfg["ingest"].update(orchestration.pop("ingest", {}))
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _final(workdir) -> tuple[pa.Table, pa.Table]:
    kept = pa.concat_tables([pq.read_table(f) for f in pq.read_table(f"{workdir}/index/embeddings.parquet")
                            .column("kept").to_pylist() if f])
    kept = kept.select(["uid", "key", "url", "caption", "image_emb", "text_emb", "clip_score"]).sort_by("uid")
    drops = pa.concat_tables([pq.read_table(f, columns=["uid", "stage", "reason"])
                              for f in glob.glob(f"{workdir}/drops/**/*.parquet", recursive=True)]).sort_by("uid")
    return kept, drops


def test_ray_runner_and_distributor_match_the_defaults(tmp_path, prefect_api):
    from unclip.flows.data import data_pipeline

    base_cfg = load_config(_config(tmp_path / "base.yaml", str(tmp_path / "lists")), variables={"workdir": "x"})
    spec = demo_source.generate_demo_for_config(str(tmp_path / "demo"), base_cfg, size=SIZE, seed=3)
    lists = f"{spec.out_dir}/lists"
    local = load_config(_config(tmp_path / "local.yaml", lists), variables={"workdir": "x"})
    on_ray = load_config(_config(tmp_path / "ray.yaml", lists, orch={"task_runner": "ray"},
                                 ingest={"distributor": "ray"}), variables={"workdir": "x"})
    assert on_ray.orchestration.task_runner == "ray" and on_ray.ingest.distributor == "ray"
    with spec.server():
        a = data_pipeline(config=local, workdir=str(tmp_path / "local"))
        b = data_pipeline(config=on_ray, workdir=str(tmp_path / "ray"))
    # the local process pool, re-running the shard stages on the first workdir (nothing to download)
    in_processes = local.model_copy(update={"orchestration": local.orchestration.model_copy(
        update={"task_runner": "process"})})
    c = data_pipeline(config=in_processes, workdir=str(tmp_path / "local"))
    for stage in a:
        assert (a[stage]["rows_kept"], a[stage]["drops_by_reason"], a[stage]["dataset_version"]) == \
               (c[stage]["rows_kept"], c[stage]["drops_by_reason"], c[stage]["dataset_version"]), stage
    for stage in a:
        assert (a[stage]["rows_in"], a[stage]["rows_kept"], a[stage]["drops_by_reason"]) == \
               (b[stage]["rows_in"], b[stage]["rows_kept"], b[stage]["drops_by_reason"]), stage
    assert a["semantic_filter"]["dataset_version"] == b["semantic_filter"]["dataset_version"]
    kept_a, drops_a = _final(tmp_path / "local")
    kept_b, drops_b = _final(tmp_path / "ray")
    assert kept_a.num_rows > 0 and kept_a.equals(kept_b)
    assert drops_a.equals(drops_b)
    # refusals that only the workers can make (redirect hops, body and pixel caps) are all there
    counted: dict = {}
    for stage, reason in zip(drops_b.column("stage").to_pylist(), drops_b.column("reason").to_pylist()):
        if stage != "semantic_filter":
            counted[(stage, reason)] = counted.get((stage, reason), 0) + 1
    assert counted == spec.expected_drop_counts()
