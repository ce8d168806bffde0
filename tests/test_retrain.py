"""The retrain and evaluate flows around the stages: the checks before a run's first stage, evaluate
on a live or failed run, the settings a stage ran with, the heartbeat and torchrun's progress and
log. Small hand-made catalogs; the deployment and demo tests run the flows for real."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from unclip import catalog, storage
from unclip import generate as gen
from unclip.config import ConfigError, parse_config
from unclip.tasks import train as train_tasks
from unclip.tasks.common import Progress
from unclip.train import stages

sys.path.insert(0, str(Path(__file__).parent))
from pair_shards import publish_pairs_release  # noqa: E402

BASE = {"name": "unit", "sources": [{"name": "gen", "url_list": "/nowhere/*.parquet", "for_generative": True},
                                    {"name": "other", "url_list": "/nowhere/*.parquet", "for_generative": False}],
        "embed": {"model": {"arch": "unclip-tiny", "seed": 0}}}


def _files(*sources: str) -> pa.Table:
    return pa.table({"source": list(sources), "shard": [f"shards/{s}/{i:05d}" for i, s in enumerate(sources)],
                     "kept": ["-"] * len(sources), "rows": [8] * len(sources)})


def _ctx(train: dict | None = None, *, sources=("gen", "other"), release: dict | None = None) -> stages.StageContext:
    cfg = parse_config({**BASE, "train": train or {}})
    return stages.StageContext("r", "/tmp/r", cfg, release if release is not None else
                               {"pca": "/pca.npz", "config": {"ingest": {"image_size": 1024}}},
                               _files(*sources), _files(*sources))


@pytest.fixture
def no_gpus(monkeypatch):
    """The checks as on a machine without GPUs, wherever the test runs (the GPU check has its own)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_runs_stages_are_checked_before_the_first_starts(no_gpus):
    stages.check(_ctx(), stages.names())  # the defaults on a version with generative rows and a PCA: nothing
    ctx = _ctx({"launch": {"nproc_per_node": 3}, "decoder": {"batch_size": 32}, "prior_ar": {"batch_size": 48},
                "upsampler1": {"batch_size": 48, "image_size": 256}, "upsampler2": {"batch_size": 48, "image_size": 1024}},
               release={"config": {"ingest": {"image_size": 256}}})
    with pytest.raises(ConfigError) as err:
        stages.check(ctx, ["prior_ar", "decoder", "upsampler1", "upsampler2"])
    # every problem at once, each naming its field; upsampler 1 (256 px, 48 over 3) has none
    problems = str(err.value).splitlines()[1:]
    assert problems == [
        "- prior_ar: the dataset version has no PCA and the run fitted none (add the `pca` stage)",
        "- train.decoder.batch_size 32 does not split into 1 micro-batches over 3 processes "
        "(train.launch: 1 node(s) x 3)",
        "- train.upsampler2.image_size 1024: the dataset version's images are 256 px (ingest.image_size); ingest "
        "at the top of the chain's size"], problems
    # a run that fits the PCA itself needs none from the version
    stages.check(_ctx(release={"config": {}}), ["pca", "prior_ar"])
    # no generative rows in the training split: the trainings that read them say so
    with pytest.raises(ConfigError, match=r"decoder: no training rows from the generative sources \['gen'\]"):
        stages.check(_ctx(sources=("other",)), ["decoder"])
    stages.check(_ctx(sources=("other",)), ["clip", "eval_retrieval"])  # CLIP trains on every source


def test_evaluate_refuses_a_live_run_and_leaves_the_runs_state_as_it_was(tmp_path, prefect_api):
    from unclip.flows.retrain import EvaluateParams, evaluate

    where = str(tmp_path / "catalog")
    catalog.save_run(where, {"run_id": "run-live", "state": "running decoder", "dataset_version": "ds-x",
                             "started_at": "2026-01-01T00:00:00+00:00", "config": {"name": "unit"}})
    with pytest.raises(RuntimeError, match="run run-live is live .'running decoder'.*once it has finished or failed"):
        evaluate.fn(EvaluateParams(run_id="run-live", workdir=str(tmp_path), catalog=where))
    # a stand-in for eval_priors (so the stage's settings section is recorded with its result); it fails
    # on the run "broken"
    seen = []

    def toy(ctx):
        seen.append(ctx.run_id)
        if ctx.run_id == "broken":
            raise ValueError("no held-out pairs")
        return {"outputs": {}, "metrics": {"x": 1}}

    real = stages.REGISTRY["eval_priors"]
    stages.REGISTRY["eval_priors"] = stages.Stage("eval_priors", "eval", toy, "test stage")
    release = publish_pairs_release(tmp_path, parse_config(BASE), {"gen": 4}, samples_per_shard=2)
    cfg = parse_config({**BASE, "train": {"eval_priors": {"eval_pairs": 7}}}).model_dump(mode="json")
    old = "2026-01-01T00:00:00+00:00"
    for run_id, state in (("failed", "failed: LaunchError: torchrun ..."), ("killed", "running decoder"),
                          ("broken", "completed")):
        storage.write_json(catalog.run_uri(where, run_id), {
            "run_id": run_id, "kind": "retrain", "state": state, "started_at": old, "updated_at": old,
            "dataset_version": release["version"], "release": release["release"], "code_version": "0.1.0",
            "run_dir": str(tmp_path / run_id), "config": cfg})
    try:
        for run_id, after in (("failed", "failed: LaunchError: torchrun ..."), ("killed", "stopped (running decoder)")):
            evaluate(EvaluateParams(run_id=run_id, workdir=str(tmp_path), catalog=where, stages=["eval_priors"]))
            done = catalog.get_run(where, run_id)
            assert done["state"] == after and done["metrics"]["eval_priors/x"] == 1, done
            assert done["stages"]["eval_priors"]["settings"]["eval_pairs"] == 7 and "evaluation_error" not in done
        # a failed evaluation of a completed run: still completed, the error beside it
        with pytest.raises(ValueError, match="no held-out pairs"):
            evaluate(EvaluateParams(run_id="broken", workdir=str(tmp_path), catalog=where, stages=["eval_priors"]))
        broken = catalog.get_run(where, "broken")
        assert broken["state"] == "completed" and "ValueError: no held-out pairs" in broken["evaluation_error"]
    finally:
        stages.REGISTRY["eval_priors"] = real
    assert seen == ["failed", "killed", "broken"]


def test_a_wrong_config_stops_a_new_run_before_it_is_recorded(tmp_path, prefect_api, no_gpus, capsys):
    import yaml

    from unclip import cli

    publish_pairs_release(tmp_path, parse_config(BASE), {"gen": 4}, samples_per_shard=2)
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"launch": {"nproc_per_node": 3}, "decoder": {"batch_size": 32}}}))
    assert cli.main(["retrain", "--workdir", str(tmp_path), "--config", str(path), "--stages", "decoder"]) == 2
    err = capsys.readouterr().err
    assert "train.decoder.batch_size 32 does not split" in err and "--resume" not in err
    assert catalog.runs(str(tmp_path / "catalog")) == []  # nothing ran, nothing to resume


def test_an_in_process_gpu_stage_runs_on_a_gpu_no_other_job_holds(tmp_path, monkeypatch):
    import torch

    from unclip import locks

    monkeypatch.setattr(locks, "GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.__setitem__(0, i))
    seen = []
    stages.register(stages.Stage("toy_gpu_eval", "eval", lambda ctx: seen.append(current[0]) or {
        "outputs": {}, "metrics": {}}, "test stage", gpu=True))
    try:
        ctx = stages.StageContext("r", str(tmp_path), parse_config(BASE), {}, _files(), _files())
        with locks.gpu_devices(1) as other:  # another job holds GPU 0
            assert other.devices == "0"
            train_tasks.run_stage.fn("toy_gpu_eval", "r", ctx)
    finally:
        del stages.REGISTRY["toy_gpu_eval"]
    assert seen == [1] and current == [0]  # ran on GPU 1, and the process's device is put back


def test_generation_settings_are_those_the_runs_eval_generation_ran_with(tmp_path):
    where = str(tmp_path / "catalog")
    config = {"train": {"eval_generation": {"decoder_guidance": 2.0, "decoder_steps": 7}}}
    catalog.save_run(where, {"run_id": "old", "config": config})
    assert gen.Settings.of_run(where, "old")[0].decoder_steps == 7
    # evaluated since with another config: the stage's own settings win
    catalog.save_run(where, {"run_id": "new", "config": config, "stages": {"eval_generation": {
        "settings": {"decoder_guidance": 4.0, "decoder_steps": 9}}}})
    s, source = gen.Settings.of_run(where, "new")
    assert (s.decoder_guidance, s.decoder_steps) == (4.0, 9) and "new" in source


def test_the_heartbeat_beats_while_a_stage_runs_and_outlives_a_failed_beat(tmp_path, monkeypatch, caplog):
    where = str(tmp_path / "catalog")
    first = catalog.save_run(where, {"run_id": "r", "state": "running x", "started_at": "2026-01-01T00:00:00+00:00"})
    monkeypatch.setattr(train_tasks, "HEARTBEAT_S", 0.05)
    beats = []
    save = catalog.save_run
    monkeypatch.setattr(catalog, "save_run", lambda w, run: beats.append(run["run_id"]) or save(w, run))
    with train_tasks.heartbeat(where, "r"):
        time.sleep(0.3)
    assert len(beats) >= 2 and set(beats) == {"r"} and catalog.get_run(where, "r")["state"] == first["state"]
    n = len(beats)
    time.sleep(0.15)
    assert len(beats) == n  # stopped with the stage

    def unreachable(*a, **k):
        raise OSError("503 Slow Down")

    monkeypatch.setattr(catalog, "get_run", unreachable)
    with caplog.at_level(logging.WARNING), train_tasks.heartbeat(where, "r"):
        time.sleep(0.3)
    assert "heartbeat" in caplog.text and "503 Slow Down" in caplog.text


def test_torchruns_progress_survives_a_failed_read_and_its_log_reaches_a_remote_run_folder(tmp_path, monkeypatch):
    storage.write_json(str(tmp_path / "progress.json"), {"step": 3})
    with Progress("train-toy", 10, "toy", unit="step") as progress:
        watch = train_tasks._Watcher(str(tmp_path), progress)
        watch()
        assert progress.done == 3
        real = storage.read_json
        monkeypatch.setattr(storage, "read_json", lambda uri: (_ for _ in ()).throw(OSError("connection reset")))
        watch()  # skipped, not raised: raising would stop the torchrun job
        monkeypatch.setattr(storage, "read_json", real)
        storage.write_json(str(tmp_path / "progress.json"), {"step": 5})
        watch()
        assert progress.done == 5 and watch.failures == 0
    uri = "memory://runs/r/decoder/torchrun.log"
    with pytest.raises(RuntimeError), train_tasks._local_log(uri) as path:
        assert not path.startswith("memory:")
        with open(path, "w") as f:
            f.write("rank 0 failed\n")
        raise RuntimeError("the job failed")
    assert storage.read_bytes(uri) == b"rank 0 failed\n"  # uploaded, failed or not
    with train_tasks._local_log(str(tmp_path / "torchrun.log")) as path:
        assert path == str(tmp_path / "torchrun.log")


def test_the_paper_configs_one_click_retrain_trains_paper_sized_models_that_pass_the_checks(no_gpus):
    from unclip.config import load_config

    paper = load_config(Path(__file__).resolve().parent.parent / "configs" / "paper.yaml")
    chosen = stages.default_retrain_stages()
    assert "clip" not in chosen and "prior_diffusion" in chosen  # CLIP is opt-in (its docstring says why)
    trained = [n for n in chosen if stages.REGISTRY[n].module]
    assert trained == ["prior_diffusion", "prior_ar", "decoder", "upsampler1", "upsampler2"]
    for name in trained:
        assert getattr(paper.train, name).flavour == "paper", name
    ctx = stages.StageContext("r", "/tmp/r", paper, {"pca": "/pca.npz", "config": {"ingest": {"image_size": 1024}}},
                              _files("clip", "dalle"), _files("clip", "dalle"))
    stages.check(ctx, chosen)  # the batches split over its 8 GPUs, its images are 1024 px, ViT-H's BPE


def test_a_runs_models_are_those_it_recorded_even_when_an_earlier_run_published_the_same_weights(tmp_path):
    where = str(tmp_path / "catalog")
    record = {"kind": "decoder", "uri": "/a", "weights_sha256": "ab" * 32, "run_id": "run-a", "metrics": {}}
    first = catalog.publish_model(where, record)
    again = catalog.publish_model(where, {**record, "uri": "/b", "run_id": "run-b"})  # a rerun, same weights
    assert first["new"] and not again["new"] and again["run_id"] == "run-a"
    catalog.save_run(where, {"run_id": "run-b", "models": {"decoder": again["version"]}})
    assert gen._model_record(where, "decoder", "run-b")["version"] == first["version"]
    with pytest.raises(catalog.CatalogError, match="run 'run-c' released no 'decoder' model"):
        gen._model_record(where, "decoder", "run-c")


def test_jobs_side_by_side_on_one_machine_get_their_own_gpus(tmp_path, monkeypatch):
    import threading

    import torch

    from unclip import locks

    monkeypatch.setattr(locks, "GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with locks.gpu_devices(2) as none:  # no CUDA here: nothing to hold, the environment left alone
        assert none is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with locks.gpu_devices(2) as a, locks.gpu_devices(2) as b:
        assert (a.devices, a.indices, b.devices, b.indices) == ("0,1", (0, 1), "2,3", (2, 3))
        with pytest.raises(RuntimeError, match="no 1 free GPU"):
            with locks.gpu_devices(1, timeout_s=0.2, poll_s=0.05):
                pass
    with pytest.raises(RuntimeError, match="a job of 5 GPU"):
        with locks.gpu_devices(5):
            pass
    # a job waits for GPUs another holds, and takes them when it lets go
    got = []

    def wait_for_three():
        with locks.gpu_devices(3, poll_s=0.05) as lease:
            got.append(lease.devices)

    with locks.gpu_devices(4):
        waiter = threading.Thread(target=wait_for_three)
        waiter.start()
        time.sleep(0.3)
        assert not got
    waiter.join(5)
    assert got == ["0,1,2"]
    # within the GPUs the machine's environment lists
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    with locks.gpu_devices(2) as listed:
        assert (listed.devices, listed.indices) == ("5,7", (0, 1))  # torch's indices within what it sees
    with pytest.raises(RuntimeError, match=r"machine that has 2 \(5,7\)"), locks.gpu_devices(3):
        pass


def test_resume_finds_its_run_in_the_catalog_it_is_given(tmp_path):
    from unclip.flows.retrain import RetrainParams, retrain

    elsewhere = str(tmp_path / "shared-catalog")
    with pytest.raises(catalog.CatalogError, match=f"run 'run-x' is not in {elsewhere}"):
        retrain.fn(RetrainParams(workdir=str(tmp_path / "w"), resume="run-x", catalog=elsewhere))
    with pytest.raises(catalog.CatalogError, match=f"is not in {tmp_path / 'w' / 'catalog'}"):
        retrain.fn(RetrainParams(workdir=str(tmp_path / "w"), resume="run-x"))  # the workdir's by default


def test_a_job_larger_than_the_machines_gpus_is_refused_before_the_first_stage(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="train.launch.nproc_per_node 4: this machine has 2 GPU"):
        stages.check(_ctx({"launch": {"nproc_per_node": 4, "backend": "gloo"}}), ["prior_diffusion"])
    stages.check(_ctx({"launch": {"nproc_per_node": 4}}), ["eval_pca"])  # no torchrun stage: no job
