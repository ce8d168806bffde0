"""End to end: the data pipeline's real flows on a small demo, through the real local HTTP server,
img2dataset, webdataset, open_clip, faiss and Prefect (a temporary API server).

One uninterrupted run is shared by the accounting, lineage and artifact checks; the resume test
kills a second run mid-ingest with SIGKILL and compares its final Parquet content to the first; the
incremental test runs last because it adds a URL list to the shared workdir.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unclip import manifest, storage
from unclip.config import load_config
from conftest import data_half_config
from unclip.data import demo_source, embeddings, inputs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIZE = 240
# The demo's CLIP is a random initialisation, so the demo config leaves the semantic filter off;
# here both filters are on, with thresholds that do drop rows, to exercise the stage's mechanics.
CLIP_THRESHOLD = 0.0
NEAR_DUP_THRESHOLD = 0.9999


def _write_config(path: Path) -> Path:
    cfg = data_half_config(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    cfg["semantic_filter"] = {"min_clip_score": CLIP_THRESHOLD,
                              "near_dup": {"threshold": NEAR_DUP_THRESHOLD, "cluster_size": 100}}
    cfg["orchestration"]["filter_shards_per_task"] = 4  # several batches, as at scale
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(workdir: Path, config: Path, api: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api}
    # the data half only: these tests compare the data stages' results (the priors' training after them
    # is tests/test_demo_clip.py's)
    return subprocess.Popen([sys.executable, "-m", "unclip.cli", "demo", "--workdir", str(workdir), "--size",
                             str(SIZE), "--config", str(config), "--train-stages", ""], env=env, **popen)


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_api):
    """One uninterrupted demo run, in-process under the Prefect test API."""
    from unclip.flows.demo import demo_flow

    base = tmp_path_factory.mktemp("e2e")
    config_path = _write_config(base / "demo-test.yaml")
    workdir = base / "uninterrupted"
    config = load_config(config_path, variables={"workdir": str(workdir)})
    records = demo_flow(config=config, workdir=str(workdir), size=SIZE, seed=0)
    return {"workdir": workdir, "records": records, "config": config, "config_path": config_path,
            "spec": demo_source.load_demo(str(workdir / "demo")), "api": prefect_api}


def _parquets(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "**" / "*.parquet"), recursive=True))


def _table(files: list[str], columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def _input_uids(spec) -> dict[str, dict]:
    """uid -> {url, plan row} for every row of every URL list."""
    plan = spec.plan().to_pylist()
    by_file_row = {(p["source"], p["file"], p["row"]): p for p in plan}
    out = {}
    for source, files in spec.lists.items():
        for f in files:
            fid = inputs.file_id(f)
            for row, url in enumerate(pq.read_table(f, columns=["url"]).column("url").to_pylist()):
                out[f"{source}/{fid}/{row:010d}"] = {"url": url, "plan": by_file_row[(source, os.path.basename(f), row)]}
    return out


def test_every_input_row_is_kept_or_dropped_exactly_once(run):
    w = run["workdir"]
    every = _input_uids(run["spec"])
    assert len(every) == SIZE
    dropped = _table(_parquets(w / "drops"), ["uid", "url", "stage", "reason"])
    kept = _table(_parquets(w / "embeddings"), ["uid", "url", "key", "image_emb", "text_emb", "clip_score"])
    d_uids, k_uids = dropped.column("uid").to_pylist(), kept.column("uid").to_pylist()
    assert len(set(d_uids)) == len(d_uids), "a row was dropped twice"
    assert len(set(k_uids)) == len(k_uids), "a row was kept twice"
    assert not set(d_uids) & set(k_uids), "a row was both kept and dropped"
    assert set(d_uids) | set(k_uids) == set(every)
    for table in (dropped, kept):
        for uid, url in zip(table.column("uid").to_pylist(), table.column("url").to_pylist()):
            assert url == every[uid]["url"]
    assert all(r is not None for r in dropped.column("reason").to_pylist())
    # the embeddings: fixed-size float16 lists of 1024, unit norm, clip_score their cosine
    assert kept.schema.field("image_emb").type == pa.list_(pa.float16(), 1024)
    img, txt = embeddings.to_numpy(kept.column("image_emb")), embeddings.to_numpy(kept.column("text_emb"))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=2e-3)
    np.testing.assert_allclose((img * txt).sum(1), kept.column("clip_score").to_numpy(), atol=3e-3)


def test_drop_reasons_match_what_the_generator_planted(run):
    w = run["workdir"]
    every = _input_uids(run["spec"])
    dropped = _table(_parquets(w / "drops"), ["uid", "stage", "reason"])
    got = {u: (s, r) for u, s, r in zip(*(dropped.column(c).to_pylist() for c in ("uid", "stage", "reason")))}
    for uid, row in every.items():
        plan = row["plan"]
        if plan["expected_reason"] is not None:
            assert got.get(uid) == (plan["expected_stage"], plan["expected_reason"]), (uid, plan["kind"])
        else:  # a valid row (or a model-dependent near duplicate) is kept or removed by the semantic filter
            assert uid not in got or got[uid][0] == "semantic_filter", (uid, plan["kind"], got.get(uid))
    planted = run["spec"].expected_drop_counts()
    counted = {}
    for stage, reason in got.values():
        if stage != "semantic_filter":
            counted[(stage, reason)] = counted.get((stage, reason), 0) + 1
    assert counted == planted
    rec = run["records"]
    for stage in ("ingest", "basic_filter"):
        assert rec[stage]["drops_by_reason"] == {r: n for (s, r), n in planted.items() if s == stage}


def test_semantic_drops_are_justified_by_the_embeddings(run):
    w = run["workdir"]
    cand = _table(_parquets(w / "embed" / "candidates"), ["uid", "image_emb", "clip_score"])
    emb = dict(zip(cand.column("uid").to_pylist(), embeddings.to_numpy(cand.column("image_emb"))))
    score = dict(zip(cand.column("uid").to_pylist(), cand.column("clip_score").to_pylist()))
    kept = set(_table(_parquets(w / "embeddings"), ["uid"]).column("uid").to_pylist())
    sem = _table(_parquets(w / "drops" / "semantic_filter"))
    reasons = sem.column("reason").to_pylist()
    assert reasons.count("clip_score") > 0 and reasons.count("near_duplicate") > 0, "thresholds drop nothing"
    for uid, reason, detail in zip(sem.column("uid").to_pylist(), reasons, sem.column("detail").to_pylist()):
        if reason == "clip_score":
            assert score[uid] < CLIP_THRESHOLD
        else:
            assert reason == "near_duplicate"
            other = detail.rsplit(" to ", 1)[1]
            assert other in kept, "a near duplicate must point at a kept row"
            assert float(emb[uid] @ emb[other]) >= NEAR_DUP_THRESHOLD - 2e-3  # float16 storage
    # every kept pair is below the threshold (greedy keep-first leaves no kept near duplicates)
    k = np.stack([emb[u] for u in sorted(kept)])
    sims = k @ k.T
    np.fill_diagonal(sims, -1)
    assert sims.max() < NEAR_DUP_THRESHOLD + 2e-3


def test_manifest_records_lineage_of_every_stage(run):
    w = run["workdir"]
    m = manifest.load(str(w))
    stages = m["stages"]
    assert list(stages) == ["ingest", "basic_filter", "embed", "semantic_filter", "pca"]
    prev_kept = None
    for name, rec in stages.items():
        assert rec["accounted"] is True
        assert rec["rows_in"] == rec["rows_kept"] + sum(rec["drops_by_reason"].values())
        if prev_kept is not None:
            assert rec["rows_in"] == prev_kept
        prev_kept = rec["rows_kept"]
        assert rec["dataset_version"].startswith("ds-") and rec["code_version"].startswith("0.1.0")
        assert rec["config"] and rec["outputs"]
        for key, uri in rec["outputs"].items():
            assert storage.exists(uri), (name, key, uri)
    assert stages["ingest"]["rows_in"] == SIZE
    assert stages["pca"]["dataset_version"] == stages["semantic_filter"]["dataset_version"]
    n_components = m["config"]["pca"]["n_components"]  # the demo's (configs/demo.yaml)
    # the final dataset version changes exactly when the kept content does
    idx = storage.read_parquet(stages["semantic_filter"]["outputs"]["shard_index"])
    assert idx.num_rows == stages["ingest"]["metrics"]["shards"]

    from unclip.data.pca import PcaQuantiser

    with open(stages["pca"]["outputs"]["pca"], "rb") as f:
        model = PcaQuantiser.load(f)
    emb = embeddings.to_numpy(_table(_parquets(w / "embeddings"), ["image_emb"]).column("image_emb"))
    codes = model.encode(emb[:16])
    assert codes.shape == (16, n_components) and codes.min() >= 0 and codes.max() < m["config"]["pca"]["n_buckets"]
    assert model.decode(codes).shape == (16, 1024)
    r = stages["pca"]["metrics"]
    assert 0 <= r["relative_mse_pca"] <= r["relative_mse_pca_quantised"] <= 1
    assert stages["pca"]["pca_version"] in stages["pca"]["outputs"]["pca"]


def test_stages_publish_prefect_artifacts(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    want = ["ingest-counts", "basic-filter-counts", "embed-counts", "semantic-filter-counts", "pca-counts",
            "pca-explained-variance", "pca-figures", "ingest-lineage", "ingest-progress", "embed-progress"]
    with get_client(sync_client=True) as client:
        # this run's flow runs only: other tests of the session share the server and its artifact keys
        ours = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("workdir") == str(run["workdir"])]
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=want), flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in ours])))
        by_key = {a.key: a for a in arts}
        assert set(want) <= set(by_key), set(want) - set(by_key)
        table = by_key["ingest-counts"].data
        rows = yaml.safe_load(table) if isinstance(table, str) else table
        assert {"what": "rows in", "rows": SIZE} in rows
        assert by_key["pca-explained-variance"].data.startswith("data:image/png;base64,")
        flows = {f.name for f in client.read_flows()}
        assert {"demo", "data_pipeline", "ingest", "basic_filter", "embed", "semantic_filter", "pca"} <= flows
        # shard work is batched: one check task per orchestration.filter_shards_per_task shards, not one per shard
        from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId,
                                                    TaskRunFilter, TaskRunFilterName)

        first = min((r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["basic_filter"])))
                     if r.parameters.get("workdir") == str(run["workdir"])), key=lambda r: r.start_time)
        checks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="basic checks")))
        shards = run["records"]["ingest"]["metrics"]["shards"]
        per_task = run["config"].orchestration.filter_shards_per_task
        assert shards > per_task
        assert len(checks) == -(-shards // per_task)


def _final_tables(workdir: Path) -> dict[str, pa.Table]:
    out = {}
    for area in ("embeddings", "drops"):
        for f in _parquets(workdir / area):
            t = pq.read_table(f).replace_schema_metadata(None)
            out[os.path.relpath(f, workdir)] = t.sort_by(t.column_names[0])
    return out


def test_a_run_killed_mid_ingest_resumes_to_the_same_result(run, tmp_path):
    w = tmp_path / "killed"
    # the same URL lists (and so the same server port) as the uninterrupted run
    shutil.copytree(run["workdir"] / "demo", w / "demo")
    proc = _cli(w, run["config_path"], run["api"], start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if glob.glob(str(w / "shards" / "*" / "*" / "*_stats.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the process and everything it started, like a dead node
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "ingest" not in manifest.load(str(w))["stages"], "killed too late: ingest had finished"
    done = glob.glob(str(w / "ingest" / "*" / "*.done.json"))
    assert len(done) < 6, "killed too late: every partition was done"
    time.sleep(1)  # let the kernel reap the img2dataset workers (they die with their parent)

    resumed = _cli(w, run["config_path"], run["api"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()[-3000:]
    mine, theirs = _final_tables(w), _final_tables(run["workdir"])
    assert sorted(mine) == sorted(theirs)
    for rel in theirs:
        assert mine[rel].equals(theirs[rel]), rel
    stages = manifest.load(str(w))["stages"]
    for stage in ("ingest", "basic_filter", "semantic_filter"):
        assert stages[stage]["dataset_version"] == run["records"][stage]["dataset_version"], stage


def test_second_run_downloads_nothing_and_a_new_list_only_itself(run):
    from unclip.flows.demo import demo_flow

    w = run["workdir"]
    tars = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(w / "shards" / "**" / "*.tar"), recursive=True)}
    again = demo_flow(config=run["config"], workdir=str(w), size=SIZE, seed=0, until="ingest")
    assert again["ingest"]["metrics"]["partitions_downloaded"] == 0
    assert again["ingest"]["dataset_version"] == run["records"]["ingest"]["dataset_version"]
    assert {p: os.stat(p).st_mtime_ns for p in tars} == tars

    new_list = demo_source.add_demo_list(str(w / "demo"), "dalle", 30)
    with run["spec"].server() as srv:
        srv.reset_hits()
        from unclip.flows.data import data_pipeline

        grown = data_pipeline(config=run["config"], workdir=str(w), until="ingest")
        fetched = sum(srv.hits.values())
    m = grown["ingest"]
    assert m["metrics"]["partitions_downloaded"] == 1
    assert m["rows_in"] == SIZE + 30
    assert fetched == 30, "only the new list's rows may be fetched"
    assert {p: os.stat(p).st_mtime_ns for p in tars} == tars
    assert os.path.basename(new_list).rsplit(".", 1)[0] in " ".join(
        p for p in glob.glob(str(w / "inputs" / "dalle" / "*.parquet")))
    assert m["dataset_version"] != run["records"]["ingest"]["dataset_version"]
