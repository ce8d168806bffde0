"""The catalog of dataset versions and runs, the refresh lock, the PCA refit rule, the held-out split,
and the names task runs get. Small hand-made workdirs; the deployment test runs them for real."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from unclip import catalog, locks, manifest, storage
from unclip.config import parse_config
from unclip.bookkeeping import kept_change_since as _kept_change_since
from unclip.tasks.common import describe_shards, fit_png
from unclip.train.stages import split_files

CONFIG = parse_config({"name": "unit", "sources": [{"name": "s", "url_list": "/nowhere/*.parquet"}],
                       "embed": {"model": {"arch": "unclip-tiny", "seed": 0}}})


def _state(workdir, shards: dict[str, int], tag: str = "") -> None:
    """Pretend the semantic filter kept ``rows`` rows in each shard; files named by content."""
    rows = []
    for shard, n in shards.items():
        digest = f"{shard}-{n}{tag}".replace("/", "_")
        kept = storage.write_parquet(f"{workdir}/embeddings/{shard}.{digest}.parquet", pa.table({"uid": list(range(n))}))
        rows.append({"source": "s", "source_rank": 0, "shard": f"shards/s/{shard}", "tar": "-", "rows": n,
                     "digest": digest, "kept": kept, "drops": "-"})
    index = storage.write_parquet(f"{workdir}/index/embeddings.parquet", pa.Table.from_pylist(rows))
    version = manifest.dataset_version(pa.table({"shard": [r["shard"] for r in rows],
                                                 "digest": [r["digest"] for r in rows]}))
    manifest.record_stage(str(workdir), "semantic_filter", {
        "rows_in": sum(shards.values()), "rows_kept": sum(shards.values()), "drops_by_reason": {},
        "dataset_version": version, "outputs": {"shard_index": index}})


def test_publish_resolve_and_gc(tmp_path):
    w, where = str(tmp_path), str(tmp_path / "catalog")
    _state(w, {"c/00000": 10, "c/00001": 5})
    first = catalog.publish_dataset(where, w, {}, CONFIG)
    assert first["new"] and first["release"] == "v000001" and first["rows"] == 15 and first["shards"] == 2
    assert not catalog.publish_dataset(where, w, {}, CONFIG)["new"], "an unchanged kept set is not a new version"
    _state(w, {"c/00000": 10, "c/00001": 7, "c/00002": 3}, tag="b")  # a shard changed, one added
    second = catalog.publish_dataset(where, w, {}, CONFIG)
    assert second["release"] == "v000002" and second["previous"] == first["version"] and second["rows"] == 20
    assert catalog.resolve(where, "unit")["version"] == second["version"]
    assert catalog.resolve(where, "unit", "v000001")["version"] == first["version"]
    assert catalog.resolve(where, "unit", first["version"])["release"] == "v000001"
    with pytest.raises(catalog.CatalogError, match="has no version 'ds-nope'"):
        catalog.resolve(where, "unit", "ds-nope")
    # both versions' files are there; keeping one version removes what only the first listed
    old_only = set(catalog.kept_files(first).column("kept").to_pylist()) - \
        set(catalog.kept_files(second).column("kept").to_pylist())
    assert len(old_only) == 2 and all(storage.exists(u) for u in old_only)
    assert catalog.gc(where, w, "unit", keep_versions=2) == []
    # a run in progress on v000001 protects its files
    catalog.save_run(where, {"run_id": "r1", "state": "running pca", "dataset_version": first["version"]})
    assert catalog.gc(where, w, "unit", keep_versions=1) == []
    catalog.save_run(where, {"run_id": "r1", "state": "completed", "dataset_version": first["version"]})
    assert sorted(catalog.gc(where, w, "unit", keep_versions=1)) == sorted(old_only)
    assert all(storage.exists(u) for u in catalog.kept_files(second).column("kept").to_pylist())
    with pytest.raises(catalog.CatalogError, match="removed by gc"):
        catalog.resolve(where, "unit", "v000001")
    assert catalog.gc(where, w, "unit", keep_versions=1) == []  # collected releases are not read again
    # the workdir knows its catalog; another workdir may not publish the same dataset
    assert catalog.locate(w) == (where, "unit")
    other = str(tmp_path / "other")
    _state(other, {"c/00000": 1})
    with pytest.raises(catalog.CatalogError, match="is refreshed from"):
        catalog.publish_dataset(where, other, {}, CONFIG)
    # ... but another dataset can share the catalog without touching this one
    renamed = CONFIG.model_copy(update={"name": "unit2"})
    assert catalog.publish_dataset(where, other, {}, renamed)["release"] == "v000001"
    assert catalog.gc(where, other, "unit2", keep_versions=1) == []
    assert [r["name"] for r in catalog.datasets(where)] == ["unit", "unit", "unit2"]
    assert all(storage.exists(u) for u in catalog.kept_files(second).column("kept").to_pylist())


def test_resolve_on_an_empty_catalog_says_what_to_do(tmp_path):
    with pytest.raises(catalog.CatalogError, match="run a data refresh first"):
        catalog.resolve(str(tmp_path / "catalog"), "unit")


def test_pca_refit_rule_measures_rows_in_new_changed_and_removed_shards(tmp_path):
    def index(shards: dict[str, tuple[str, int]]) -> pa.Table:
        return pa.table({"shard": list(shards), "digest": [d for d, _ in shards.values()],
                         "rows": [n for _, n in shards.values()]})

    fit = storage.write_parquet(str(tmp_path / "fit.parquet"), index({"a": ("1", 60), "b": ("2", 40)}))
    for name in ("pca.npz", "report.json", "plot.png"):
        (tmp_path / name).write_bytes(b"x")
    previous = {"outputs": {"pca": str(tmp_path / "pca.npz"), "report": str(tmp_path / "report.json"),
                            "plot": str(tmp_path / "plot.png"), "fit_shards": fit},
                "config": {"pca": CONFIG.pca.model_dump(mode="json")}}
    assert _kept_change_since(previous, index({"a": ("1", 60), "b": ("2", 40)}), CONFIG) == 0.0
    # b changed (40 rows now 45), c is new (5): 50 of the 100 fitted rows
    assert _kept_change_since(previous, index({"a": ("1", 60), "b": ("3", 45), "c": ("4", 5)}), CONFIG) == 0.5
    assert _kept_change_since(previous, index({"a": ("1", 60)}), CONFIG) == 0.4  # b removed
    other = CONFIG.model_copy(update={"pca": CONFIG.pca.model_copy(update={"n_components": 8})})
    assert _kept_change_since(previous, index({"a": ("1", 60), "b": ("2", 40)}), other) is None
    assert _kept_change_since(None, index({"a": ("1", 60)}), CONFIG) is None


def test_held_out_shards_never_change_sides_as_the_dataset_grows():
    files = pa.table({"shard": [f"shards/s/call-x/{i:05d}" for i in range(400)], "rows": [1] * 400})
    _, held_small = split_files(files.slice(0, 200), 0.05)
    train_big, held_big = split_files(files, 0.05)
    assert 0 < held_small.num_rows < 30 and train_big.num_rows + held_big.num_rows == 400
    assert set(held_small.column("shard").to_pylist()) <= set(held_big.column("shard").to_pylist())
    assert split_files(files.slice(0, 2), 0.0001)[1].num_rows == 1, "two shards: one is held out"
    # and one of each source that has two or more, however small the fraction
    two = pa.table({"shard": [f"s{i}" for i in range(7)], "rows": [1] * 7, "source": list("aaaaabc")})
    assert sorted(split_files(two, 0.0001)[1].column("source").to_pylist()) == ["a"]
    three = pa.table({"shard": [f"s{i}" for i in range(7)], "rows": [1] * 7, "source": list("aaaabbc")})
    assert sorted(split_files(three, 0.0001)[1].column("source").to_pylist()) == ["a", "b"]


def test_task_run_names_give_the_shard_ranges():
    shards = [{"shard": f"shards/clip/call-35ae12c86c73/{i:05d}"} for i in range(3)]
    shards.append({"shard": "shards/dalle/call-9f0b11aa2233/00007"})
    assert describe_shards(shards) == "clip/call-35ae12c8 00000-00002, dalle/call-9f0b11aa 00007"


def test_artifact_images_are_shrunk_under_prefects_event_limit():
    import io

    import numpy as np
    from PIL import Image

    def png(w, h):
        buf = io.BytesIO()  # noise: PNG cannot compress it, about 3 bytes a pixel
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    big = png(1000, 500)
    assert len(big) > 1_000_000
    out, shown, size = fit_png(big, max_bytes=400_000)
    assert size == (1000, 500) and len(out) <= 400_000
    assert shown[0] < 1000 and abs(shown[0] / shown[1] - 2.0) < 0.01
    assert Image.open(io.BytesIO(out)).size == shown
    small = png(40, 20)
    assert fit_png(small, max_bytes=400_000) == (small, (40, 20), (40, 20))


def test_a_second_refresh_of_a_dataset_waits_for_the_lock(prefect_api):
    held, order = threading.Event(), []

    def first():
        with locks.refresh_lock("unit", "/cat", timeout_s=30):
            order.append("first in")
            held.set()
            time.sleep(2)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    held.wait(30)
    with pytest.raises(TimeoutError):  # refused when it may not wait long enough
        with locks.refresh_lock("unit", "/cat", timeout_s=0.5):
            pass
    with locks.refresh_lock("unit", "/cat", timeout_s=30):  # waits, then runs
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    with locks.refresh_lock("unit", "/another-catalog", timeout_s=1):  # another dataset is not blocked
        pass


def test_unclip_datasets_and_runs_list_the_catalog(tmp_path, capsys):
    import json

    from unclip import cli

    w = str(tmp_path)
    assert cli.main(["datasets", "--workdir", w]) == 0
    assert "no datasets in" in capsys.readouterr().out
    _state(w, {"c/00000": 10})
    release = catalog.publish_dataset(str(tmp_path / "catalog"), w, {}, CONFIG)
    catalog.save_run(str(tmp_path / "catalog"), {
        "run_id": "run-1", "state": "completed", "release": release["release"], "dataset_version": release["version"],
        "pca_version": "pca-x", "code_version": "0.1.0", "started_at": "2026-01-01T00:00:00+00:00",
        "metrics": {"eval_retrieval/i2t_recall@5": 0.25, "pca/rows": 10}})
    assert cli.main(["datasets", "--workdir", w]) == 0
    out = capsys.readouterr().out
    assert "v000001" in out and release["version"] in out and "10" in out
    # a run killed without a word (its record still says running, its last beat hours old)
    storage.write_json(catalog.run_uri(str(tmp_path / "catalog"), "run-0"), {
        "run_id": "run-0", "state": "running decoder", "release": release["release"],
        "dataset_version": release["version"], "code_version": "0.1.0", "started_at": "2025-12-31T00:00:00+00:00",
        "updated_at": "2025-12-31T01:00:00+00:00"})
    assert cli.main(["runs", "--workdir", w]) == 0
    out = capsys.readouterr().out
    assert "run-1" in out and "completed" in out and "i2t_recall@5 0.25" in out and "pca/rows" not in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("run-0")] == ["stopped"]
    assert cli.main(["runs", "--workdir", w, "--json"]) == 0
    assert {r["run_id"]: r.get("pca_version") for r in json.loads(capsys.readouterr().out)}["run-1"] == "pca-x"


def test_gpu_stages_carry_the_gpu_tag_and_the_limit_exists(tmp_path, prefect_api):
    """A training stage registered with gpu=True runs as a task tagged `gpu` under a tag limit."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from unclip.flows.retrain import _run_stages
    from unclip.train import stages

    w, where = str(tmp_path), str(tmp_path / "catalog")
    _state(w, {"c/00000": 4, "c/00001": 4})
    release = catalog.publish_dataset(where, w, {}, CONFIG)
    seen = {}

    def toy(ctx):
        from prefect.context import TaskRunContext

        seen["tags"] = set(TaskRunContext.get().task_run.tags)
        return {"outputs": {}, "metrics": {"train_rows": int(sum(ctx.train_files.column("rows").to_pylist()))}}

    stages.register(stages.Stage("toy_gpu", "train", toy, "test stage", gpu=True))
    try:
        @flow
        def run_it():
            return _run_stages({"run_id": "r", "run_dir": w}, CONFIG, release, ["toy_gpu"], where, w)

        run = run_it()
    finally:
        del stages.REGISTRY["toy_gpu"]
    assert "gpu" in seen["tags"] and run["state"] == "completed" and run["metrics"]["toy_gpu/train_rows"] > 0
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit >= 1


def test_one_pipeline_run_per_workdir(tmp_path):
    w = str(tmp_path / "w")
    with locks.workdir_lock(w, timeout_s=1):
        with pytest.raises(locks.WorkdirBusy, match="is in use by another run"):
            with locks.workdir_lock(w, timeout_s=0.5):
                pass
        with locks.workdir_lock(str(tmp_path / "other"), timeout_s=0.5):  # another workdir is free
            pass
    with locks.workdir_lock(w, timeout_s=0.5):  # released with the block
        pass
    # a holder that dies without releasing (SIGKILL) frees it: the kernel drops the flock
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom unclip import locks\n"
                               f"with locks.workdir_lock({w!r}, 5):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(locks.WorkdirBusy):
        with locks.workdir_lock(w, timeout_s=0.5):
            pass
    holder.kill()
    holder.wait()
    with locks.workdir_lock(w, timeout_s=5):
        pass


def test_retrieval_eval_streams_galleries_and_scores_true_pairs(tmp_path):
    import numpy as np

    from unclip.train import stages

    rng = np.random.default_rng(0)

    def files(shuffle: bool) -> pa.Table:
        out = []
        for i, n in enumerate([700, 800, 1]):  # galleries cross file boundaries; the tail gallery is 501
            img = rng.normal(size=(n, 1024)).astype(np.float32)
            txt = img + 0.05 * rng.normal(size=img.shape).astype(np.float32)
            if shuffle:
                txt = txt[rng.permutation(n)]
            col = {k: pa.FixedSizeListArray.from_arrays(pa.array((v / np.linalg.norm(v, axis=1, keepdims=True))
                                                                  .astype(np.float16).ravel()), 1024)
                   for k, v in (("image_emb", img), ("text_emb", txt))}
            out.append(storage.write_parquet(str(tmp_path / f"{shuffle}-{i}.parquet"), pa.table(col)))
        return pa.table({"kept": out})

    def run(shuffle: bool) -> dict:
        ctx = stages.StageContext("r", str(tmp_path), CONFIG, {}, pa.table({"kept": []}), files(shuffle))
        return stages.REGISTRY["eval_retrieval"].run(ctx)["metrics"]

    good, bad = run(False), run(True)
    assert (good["heldout_pairs"], good["galleries"]) == (1501, 2)
    assert good["i2t_recall@1"] == good["t2i_recall@1"] == 1.0
    assert bad["i2t_recall@10"] < 0.05  # chance: 10 / gallery size


def test_gc_sweeps_old_orphans_but_not_recent_or_listed_files(tmp_path):
    import os

    w, where = str(tmp_path), str(tmp_path / "catalog")
    _state(w, {"c/00000": 3})
    release = catalog.publish_dataset(where, w, {}, CONFIG)
    listed = catalog.kept_files(release).column("kept").to_pylist()
    old = storage.write_parquet(f"{w}/embeddings/c/00001.deadbeef.parquet", pa.table({"uid": [1]}))
    new = storage.write_parquet(f"{w}/embeddings/c/00002.feedface.parquet", pa.table({"uid": [2]}))
    two_days_ago = time.time() - 2 * 86_400
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(listed[0], (two_days_ago, two_days_ago))  # old but listed by the live release
    assert catalog.gc(where, w, "unit", keep_versions=3) == [old]
    assert storage.exists(new) and all(storage.exists(u) for u in listed)


def test_a_killed_run_stops_pinning_its_dataset_version(tmp_path):
    w, where = str(tmp_path), str(tmp_path / "catalog")
    _state(w, {"c/00000": 10})
    first = catalog.publish_dataset(where, w, {}, CONFIG)
    _state(w, {"c/00000": 12}, tag="b")
    catalog.publish_dataset(where, w, {}, CONFIG)
    old_only = catalog.kept_files(first).column("kept").to_pylist()
    # a run that said "running" two hours ago and never again: killed, its heartbeat stopped
    stale = {"run_id": "dead", "state": "running clip", "dataset_version": first["version"],
             "started_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00"}
    storage.write_json(catalog.run_uri(where, "dead"), stale)
    assert not catalog.run_is_live(catalog.get_run(where, "dead"))
    # a run that failed yesterday keeps the version it trained on for a week (it can still be resumed) ...
    import datetime as dt

    yesterday = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)).isoformat(timespec="seconds")
    storage.write_json(catalog.run_uri(where, "failed"), {**stale, "run_id": "failed", "updated_at": yesterday,
                                                          "state": "failed: LaunchError: torchrun ..."})
    assert catalog.gc(where, w, "unit", keep_versions=1) == []
    # ... and no longer than it is told (catalog.keep_unfinished_days)
    assert sorted(catalog.gc(where, w, "unit", keep_versions=1, unfinished_grace_s=3600)) == sorted(old_only)


def test_model_versions_publish_once_and_resolve_by_reference(tmp_path):
    where = str(tmp_path / "catalog")
    with pytest.raises(catalog.CatalogError, match="no 'clip' model"):
        catalog.resolve_model(where, "clip@latest")
    rec = {"kind": "clip", "uri": "/m/1", "weights_sha256": "ab" * 32, "run_id": "r1", "dataset_version": "ds-1",
           "code_version": "0.1.0", "metrics": {"t2i_recall@5": 0.3}}
    first = catalog.publish_model(where, rec)
    assert first["new"] and first["version"] == "clip-" + "ab" * 6
    assert not catalog.publish_model(where, rec)["new"], "the same weights are one version"
    second = catalog.publish_model(where, {**rec, "weights_sha256": "cd" * 32, "run_id": "r2"})
    assert catalog.resolve_model(where, "clip@latest")["version"] == second["version"]
    assert catalog.resolve_model(where, f"clip@{first['version']}")["run_id"] == "r1"
    assert catalog.resolve_model(where, first["version"])["run_id"] == "r1"
    assert catalog.resolve_model(where, "clip@m000002")["run_id"] == "r2"
    with pytest.raises(catalog.CatalogError, match="has no model version 'nope'"):
        catalog.resolve_model(where, "clip@nope")
    assert [m["version"] for m in catalog.models(where)] == [first["version"], second["version"]]
