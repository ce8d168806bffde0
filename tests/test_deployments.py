"""The pipeline as a service: a real Prefect server on a free loopback port, the project's
prefect.yaml deployed to a process work pool, a worker, and ``data-refresh`` triggered and read
back through the REST API, as the UI and a scheduler would.

One server, worker and demo workdir are shared by the module, in order: a first refresh; a second
after a new URL-list file landed (only its rows are downloaded, a new version is catalogued); two
refreshes started at once (the second waits for the first's lock; every version stays whole);
``retrain`` and ``evaluate`` on the latest version; and screenshots of the UI in headless Chromium.
"""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from unclip import catalog, manifest
from unclip.config import load_config
from unclip.data import demo_source
from unclip.prefect_server import PrefectServer, flow_run_tree

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIZE = 200
NEW_ROWS = 25
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = tmp_path_factory.mktemp("service")
    workdir = base / "demo"
    cfg = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": str(workdir)})
    demo_source.generate_demo_for_config(str(workdir / "demo"), cfg, size=SIZE, seed=5)
    with PrefectServer(base / "prefect") as server:
        server.ensure_pool()
        deployments = {d["name"]: d for d in server.deploy_all()}
        server.start_worker(limit=4)
        yield {"server": server, "workdir": workdir, "deployments": deployments}


def _trigger(service, name: str, parameters: dict) -> str:
    dep = service["deployments"][name]
    run = service["server"].post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
    return run["id"]


def _wait(server: PrefectServer, run_id: str, timeout_s: float = 400) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = server.get(f"/flow_runs/{run_id}")
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout_s} s: {run['state_type']}")


def _tree(server: PrefectServer, run_id: str) -> list[dict]:
    """The flow run and all its subflow runs."""
    return [server.get(f"/flow_runs/{run_id}"), *flow_run_tree(server.post, run_id)]


def _artifacts(server: PrefectServer, run_ids: list[str]) -> dict[str, dict]:
    arts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": run_ids}}, "limit": 200})
    return {a["key"]: a for a in arts if a.get("key")}


# the data half as these tests check it: a seeded random CLIP embeds, no semantic filter, no CLIP training
# (tests/test_demo_clip.py runs the demo's trained-CLIP story)
DATA_HALF = {"embed": {"model": {"arch": "unclip-tiny-vit", "seed": 0, "catalog": None}},
             "train": {"clip_in_data_pipeline": False},
             "semantic_filter": {"min_clip_score": None, "near_dup": None}}


def _refresh(service) -> dict:
    return {"config": "configs/demo.yaml", "workdir": str(service["workdir"]), "demo": True, "overrides": DATA_HALF}


def _tars(workdir: Path) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(workdir / "shards" / "**" / "*.tar"), recursive=True)}


@pytest.fixture(scope="module")
def first(service):
    server = service["server"]
    run_id = _trigger(service, "data-refresh", _refresh(service))
    run = _wait(server, run_id)
    return {"run": run, "tree": _tree(server, run_id)}


def test_data_refresh_runs_through_the_deployment_and_reports_in_the_api(service, first):
    server, run = service["server"], first["run"]
    assert run["state_type"] == "COMPLETED", (run["state"], (service["server"].home / "worker-unclip-process.log")
                                              .read_text()[-3000:])
    assert run["name"].startswith("refresh: demo.yaml")
    names = {r["name"] for r in first["tree"]}
    assert {"data-pipeline: demo", "ingest: demo", "basic-filter: demo", "embed: demo", "semantic-filter: demo",
            "pca: demo"} <= names
    arts = _artifacts(server, [r["id"] for r in first["tree"]])
    for stage in ("ingest", "basic-filter", "embed", "semantic-filter", "pca"):
        assert arts[f"{stage}-counts"]["type"] == "table"
        assert arts[f"{stage}-lineage"]["type"] == "markdown"
    assert arts["ingest-progress"]["type"] == "progress" and arts["ingest-progress"]["data"] == 100.0
    assert arts["pca-explained-variance"]["type"] == "image"
    assert arts["pca-explained-variance"]["data"].startswith("data:image/png;base64,")
    release = arts["dataset-release"]["data"]
    assert "v000001" in release and "new dataset version" in release
    # task runs say which shards they worked on
    tasks = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in first["tree"]]}},
                                              "limit": 200})
    assert any(t["name"].startswith("basic checks: clip/call-") for t in tasks)
    versions = catalog.datasets(str(service["workdir"] / "catalog"))
    assert [v["release"] for v in versions] == ["v000001"]
    assert versions[0]["version"] == manifest.stage(str(service["workdir"]), "semantic_filter")["dataset_version"]


def test_a_new_url_list_downloads_only_its_rows_and_publishes_a_new_version(service, first):
    workdir, server = service["workdir"], service["server"]
    before = catalog.latest(str(workdir / "catalog"), "demo")
    tars = _tars(workdir)
    embedded = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(workdir / "embed" / "candidates" / "**" / "*.parquet"),
                                                                 recursive=True)}
    demo_source.add_demo_list(str(workdir / "demo"), "dalle", NEW_ROWS, seed=11)
    run = _wait(server, _trigger(service, "data-refresh", _refresh(service)))
    assert run["state_type"] == "COMPLETED"
    after_tars = _tars(workdir)
    assert {p: after_tars[p] for p in tars} == tars, "an old shard was downloaded again"
    new = [p for p in after_tars if p not in tars]
    assert len(new) == 1
    ingest = manifest.stage(str(workdir), "ingest")
    assert ingest["metrics"]["partitions_downloaded"] == 1
    assert ingest["rows_in"] == SIZE + NEW_ROWS
    # only the new shard was embedded; 25 new of ~190 fitted rows is past refit_min_change (5%)
    assert {p: os.stat(p).st_mtime_ns for p in embedded} == embedded
    pca = manifest.stage(str(workdir), "pca")["metrics"]
    assert pca["refit"] and pca["kept_change_since_fit"] == pytest.approx(NEW_ROWS / before["rows"])
    got = catalog.latest(str(workdir / "catalog"), "demo")
    assert got["release"] == "v000002" and got["previous"] == before["version"]
    assert got["rows"] == before["rows"] + NEW_ROWS
    # the older version is intact: every file it lists is still there, with the rows it says
    for release in (before, got):
        files = catalog.kept_files(release)
        assert sum(pq.read_metadata(f).num_rows for f in files.column("kept").to_pylist()) == release["rows"]


def test_two_refreshes_at_once_run_one_after_the_other(service, first):
    server, workdir = service["server"], service["workdir"]
    demo_source.add_demo_list(str(workdir / "demo"), "clip", NEW_ROWS, seed=12)
    before = [v["release"] for v in catalog.datasets(str(workdir / "catalog"))]
    ids = [_trigger(service, "data-refresh", _refresh(service)) for _ in range(2)]
    runs = [_wait(server, i) for i in ids]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    held = {e["flow_run_id"]: (e["held_from"], e["held_until"]) for e in catalog.refreshes(str(workdir / "catalog"))}
    (a0, a1), (b0, b1) = sorted(held[i] for i in ids)
    assert a1 <= b0, "both refreshes held the dataset at once"
    versions = catalog.datasets(str(workdir / "catalog"))
    # the first published the new list's rows, the second found nothing changed and kept the PCA
    assert [v["release"] for v in versions] == before + [f"v{len(before) + 1:06d}"]
    pca = manifest.stage(str(workdir), "pca")["metrics"]
    assert not pca["refit"] and pca["kept_change_since_fit"] == 0.0
    assert manifest.stage(str(workdir), "pca")["pca_version"] == versions[-1]["pca_version"]
    for release in versions:
        files = catalog.kept_files(release)
        assert sum(pq.read_metadata(f).num_rows for f in files.column("kept").to_pylist()) == release["rows"]


def test_retrain_and_evaluate_through_their_deployments(service, first):
    server, workdir = service["server"], service["workdir"]
    # the UI's form: the parameters are the pydantic model, with its fields and their descriptions
    schema = service["deployments"]["retrain"]["parameter_openapi_schema"]
    fields = schema["definitions"]["RetrainParams"]["properties"]
    assert {"dataset_version", "stages", "config", "overrides", "run_name", "clip", "resume"} <= set(fields)
    assert fields["stages"]["items"]["enum"] == ["clip", "pca", "prior_diffusion", "prior_ar", "decoder", "upsampler1",
                                                 "upsampler2", "eval_generation", "eval_pca", "eval_retrieval",
                                                 "eval_priors"]
    assert {"clip", "prior_diffusion", "prior_ar", "decoder", "upsampler1", "upsampler2"} <= set(fields)
    settings = schema["definitions"]["StageSettings"]["properties"]
    assert {"steps", "batch_size", "lr", "checkpoint_every", "seed"} <= set(settings)
    # CLIP and both priors train under torchrun for a few steps set in the form's typed fields
    # (the image chain's stages are the demo test's: here CLIP, the PCA, both priors and their evaluations)
    run = _wait(server, _trigger(service, "retrain", {"params": {
        "workdir": str(workdir), "run_name": "ci", "stages": ["clip", "pca", "prior_diffusion", "prior_ar", "eval_pca",
                                                               "eval_retrieval", "eval_priors"],
        "clip": {"steps": 3, "batch_size": 16, "warmup_steps": 1},
        "prior_diffusion": {"steps": 2, "batch_size": 8, "warmup_steps": 1},
        "prior_ar": {"steps": 2, "batch_size": 8, "warmup_steps": 1},
        "overrides": {"train": {"prior_diffusion": {"eval_pairs": 32, "sample_steps": 4},
                                "prior_ar": {"eval_pairs": 16, "flavour": "micro"},
                                "eval_priors": {"eval_pairs": 16, "guidance_sweep": [2.0]}}}}}))
    assert run["state_type"] == "COMPLETED"
    assert run["name"].startswith("retrain: clip,pca,prior_diffusion,prior_ar,eval_pca,eval_retrieval,eval_priors on")
    runs = catalog.runs(str(workdir / "catalog"))
    assert len(runs) == 1 and runs[0]["state"] == "completed" and runs[0]["name"] == "ci"
    latest = catalog.latest(str(workdir / "catalog"), "demo")
    assert runs[0]["dataset_version"] == latest["version"]
    assert 0 <= runs[0]["metrics"]["eval_retrieval/i2t_recall@10"] <= 1
    assert runs[0]["metrics"]["clip/steps"] == 3 and runs[0]["config"]["train"]["clip"]["batch_size"] == 16
    assert [m["version"] for m in catalog.models(str(workdir / "catalog"), "clip")] == [runs[0]["models"]["clip"]]
    # evaluated where the held-out split (its shards chosen by a hash of their names) holds generative rows
    held_out = runs[0]["metrics"]["prior_diffusion/heldout_pairs"]
    assert runs[0]["metrics"]["prior_diffusion/steps"] == 2 and (held_out == 0) == (
        "prior_diffusion/cosine_true" not in runs[0]["metrics"])
    prior = catalog.models(str(workdir / "catalog"), "prior_diffusion")
    assert [m["version"] for m in prior] == [runs[0]["models"]["prior_diffusion"]]
    assert prior[0]["dataset_version"] == latest["version"] and prior[0]["flavour"] == "tiny"
    # the AR prior is coded by the PCA this run fitted, which its lineage names
    ar = catalog.models(str(workdir / "catalog"), "prior_ar")
    assert [m["version"] for m in ar] == [runs[0]["models"]["prior_ar"]] and ar[0]["flavour"] == "micro"
    assert ar[0]["pca_version"] == runs[0]["pca_version"] == runs[0]["metrics"]["pca/pca_version"]
    # and the PCA it was released with is that stage's file, byte for byte
    released_pca = Path(ar[0]["uri"]) / "pca.npz"
    assert released_pca.read_bytes() == Path(runs[0]["stages"]["pca"]["outputs"]["pca"]).read_bytes()
    assert runs[0]["metrics"]["prior_ar/steps"] == 2
    if held_out:  # both priors side by side on the same pairs
        for p in ("prior_diffusion", "prior_ar"):
            assert -1 <= runs[0]["metrics"][f"eval_priors/{p}/cosine_true"] <= 1
        assert "eval_priors/prior_diffusion/cosine_true@guidance_2" in runs[0]["metrics"]
        assert runs[0]["metrics"]["eval_priors/prior_ar/nll_per_code_uniform"] == pytest.approx(np.log(1024))
        arts = _artifacts(server, [run["id"]])
        assert "prior_ar" in json.dumps(arts["eval-priors-table"]["data"])
    ev = _wait(server, _trigger(service, "evaluate", {"params": {"workdir": str(workdir),
                                                                 "run_id": runs[0]["run_id"],
                                                                 "stages": ["eval_pca"]}}))
    assert ev["state_type"] == "COMPLETED" and ev["name"] == f"evaluate: {runs[0]['run_id']}"
    arts = _artifacts(server, [ev["id"]])
    assert "eval_pca/heldout_relative_mse_pca_quantised" in arts["run-summary"]["data"]


def test_the_ui_shows_the_refresh_to_a_person(service, first, tmp_path):
    """The real UI in headless Chromium: the refresh's pages and artifacts render to screenshots."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ui_screenshots", ROOT / "scripts" / "ui_screenshots.py")
    shots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shots)
    if shots.find_chromium() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; `make test` installs it as root)")
    server, run_id = service["server"], first["run"]["id"]
    assert shots.main(["--ui", server.ui_url, "--flow-run", run_id, "--out", str(tmp_path)]) == 0
    got = sorted(p.name for p in tmp_path.glob("*.png"))
    assert {"01-refresh-flow-run.png", "05-dataset-release.png", "09-pca-plot.png", "12-deployments.png"} <= set(got)
    from PIL import Image

    for name in got:
        img = Image.open(tmp_path / name).convert("L")
        # a rendered page, not a blank or error screen: many distinct grey levels and some contrast
        assert img.size == (1440, 1100) and len(set(img.getdata())) > 20, name
