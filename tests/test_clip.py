"""CLIP training (stage ``clip``): the training reader's exact resume, one short run through
``unclip retrain`` under torchrun published as a model version that plain open_clip loads, the
embed stage taking that version from the catalog, and a SIGKILLed run resumed to the same weights."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from unclip import catalog, storage
from unclip.config import ClipTrainConfig, load_config
from unclip.data import pairs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair_shards import make_pair_shards, publish_pairs_release  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1, "num_workers": 0,
         "shuffle_buffer": 8, "lr": 1e-3}


def _config(path: Path, workdir: Path, **train) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["train"]["clip"] = {**TRAIN, **train}
    cfg["train"]["eval_fraction"] = 0.3
    cfg["embed"]["num_workers"] = 0
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ident(img):
    return torch.tensor(np.asarray(img, dtype=np.float32).mean()).reshape(1)


def _tok(captions):
    return torch.tensor([[len(captions[0])]])


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_resumes_exactly_and_mixes_sources_equally(tmp_path, workers):
    files = make_pair_shards(tmp_path, {"clip": 48, "dalle": 16}, samples_per_shard=8)

    def stream(positions=None, rotation=0):
        ds = pairs.TrainPairs(files, preprocess=_ident, tokenizer=_tok, batch_size=4, rank=0, world_size=1,
                              num_workers=max(workers, 1), seed=3, shuffle_buffer=5, positions=positions,
                              rotation=rotation)
        return iter(pairs.train_loader(ds, workers))

    full = list(itertools.islice(stream(), 40))
    keys = [k for b in full for k in b["key"]]
    sources = [s for b in full for s in b["source"]]
    assert abs(sources.count("dalle") / len(sources) - 0.5) < 0.15, "equal mix whatever the sizes (16 vs 48)"
    assert len(set(zip(sources, keys))) == 64, "every training row is seen"
    cut = 13
    positions = {}
    for b in full[:cut]:
        positions[b["worker"]] = b["position"]
    resumed = list(itertools.islice(stream(positions, rotation=cut % max(workers, 1)), 40 - cut))
    for a, b in zip(full[cut:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])


def test_a_resumed_stream_does_not_read_the_shards_it_trained_on(tmp_path, monkeypatch):
    files = make_pair_shards(tmp_path, {"clip": 96, "dalle": 96}, samples_per_shard=4)  # 48 shards
    opened: list[str] = []
    real = pairs.ShardFiles.samples

    def counting(self, tar):
        opened.append(tar)
        return real(self, tar)

    monkeypatch.setattr(pairs.ShardFiles, "samples", counting)

    def stream(positions=None):
        ds = pairs.TrainPairs(files, preprocess=_ident, tokenizer=_tok, batch_size=4, rank=0, world_size=1,
                              num_workers=1, seed=5, shuffle_buffer=3, positions=positions)
        return iter(pairs.train_loader(ds, 0))

    full = list(itertools.islice(stream(), 36))
    before = len(opened)
    opened.clear()
    cut = 30  # 120 of 192 samples: most shards of the epoch are behind
    resumed = list(itertools.islice(stream({0: full[cut - 1]["position"]}), 36 - cut))
    for a, b in zip(full[cut:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    # the shards the buffers held (3 per source at most) and the ones read after the cut
    assert len(set(opened)) <= 2 * 3 + 8 < before, (len(set(opened)), before)


def test_the_held_out_evaluation_reads_only_its_eval_pairs(tmp_path, monkeypatch):
    files = make_pair_shards(tmp_path, {"dalle": 40}, samples_per_shard=8)  # 5 shards
    opened: list[str] = []
    real = pairs.open_shards
    monkeypatch.setattr(pairs, "open_shards", lambda src: real(s for s in src if not opened.append(s["url"])))

    def keys(max_pairs):
        opened.clear()
        return [k for b in pairs.HeldOutPairs(files, preprocess=_ident, tokenizer=_tok, batch_size=4,
                                              max_pairs=max_pairs) for k in b["key"]]

    everything = keys(None)
    assert len(everything) == 40 and len(opened) == 5
    assert keys(10) == everything[:10] and len(opened) == 2  # the third shard is never opened
    assert ClipTrainConfig().eval_pairs == 5000


def test_source_weights_name_known_sources(tmp_path):
    files = make_pair_shards(tmp_path, {"clip": 8, "dalle": 8}, samples_per_shard=8)
    with pytest.raises(ValueError, match="no training rows: \\['laion'\\]"):
        pairs.TrainPairs(files, preprocess=_ident, tokenizer=_tok, batch_size=4, rank=0, world_size=1, num_workers=1,
                         seed=0, shuffle_buffer=4, source_weights={"laion": 1.0})


def test_clip_config_checks_its_weight_source():
    with pytest.raises(ValueError, match="init: checkpoint needs"):
        ClipTrainConfig(init="checkpoint")
    with pytest.raises(ValueError, match="warmup_steps \\(20\\) exceeds steps \\(10\\)"):
        ClipTrainConfig(steps=10, warmup_steps=20)


@pytest.mark.slow
def test_retrain_clip_publishes_a_model_that_plain_open_clip_loads(tmp_path, prefect_api, capsys):
    import open_clip

    from unclip import cli

    w = tmp_path / "w"
    cfg_path = _config(tmp_path / "c.yaml", w)
    config = load_config(cfg_path, variables={"workdir": str(w)})
    release = publish_pairs_release(w, config, {"clip": 64, "dalle": 48}, samples_per_shard=16)
    assert cli.main(["retrain", "--workdir", str(w), "--config", str(cfg_path), "--stages", "clip",
                     "--set", "train.clip.steps=4", "--set", "train.clip.eval_every=2"]) == 0
    out = capsys.readouterr().out
    run_id = out.strip().splitlines()[-1]
    run = catalog.get_run(str(w / "catalog"), run_id)
    assert run["state"] == "completed" and run["dataset_version"] == release["version"]
    m = run["metrics"]
    assert m["clip/steps"] == 4 and m["clip/heldout_pairs"] > 0 and 0.3 < m["clip/mix/dalle"] < 0.7
    for k in ("i2t_recall@5", "t2i_recall@5", "zeroshot_colour_acc", "zeroshot_shape_acc", "recall@5_chance",
              "zeroshot_colour_chance", "probe_colour_auc", "probe_shape_auc"):
        assert f"clip/{k}" in m
    # the model version, listed by `unclip models --json`
    assert cli.main(["models", "--workdir", str(w), "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert len(models) == 1
    model = models[0]
    assert {"kind", "version", "uri", "run_id", "created_at", "dataset_version", "code_version", "metrics"} <= set(model)
    assert model["kind"] == "clip" and model["run_id"] == run_id and model["dataset_version"] == release["version"]
    assert run["models"]["clip"] == model["version"]
    # TensorBoard event files under the run folder, with the held-out metrics every eval_every steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run["run_dir"]) / "clip" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("clip/eval/t2i_recall@5")] == [2, 4]
    history = json.loads((Path(run["run_dir"]) / "clip" / "eval_history.json").read_text())
    assert [e["step"] for e in history] == [2, 4] and history[-1]["t2i_recall@5"] == m["clip/t2i_recall@5"]
    # plain open_clip: register the json, load the safetensors
    folder = Path(model["uri"])
    open_clip.add_model_config(folder / "unclip-tiny.json")
    plain, _, preprocess = open_clip.create_model_and_transforms("unclip-tiny",
                                                                 pretrained=str(folder / "open_clip_model.safetensors"))
    # the embed stage with `catalog: clip@latest` embeds with exactly these weights
    from unclip.data import clip as clip_data
    from unclip.flows.data import _resolve_embed_model

    cfg2 = load_config(cfg_path, {"embed": {"model": {"catalog": "clip@latest", "seed": None, "arch": None}}},
                       variables={"workdir": str(w)})
    embed_cfg, version = _resolve_embed_model(cfg2, str(w))
    assert version == model["version"] and embed_cfg.model.arch == "unclip-tiny"
    ours, ours_pre, tok = clip_data.load_clip(embed_cfg.model)
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    a = clip_data.encode_batch(ours, ours_pre(img)[None], tok(["a red circle"]), torch.device("cpu"))
    plain.eval()
    with torch.inference_mode():
        b = plain.encode_image(preprocess(img)[None], normalize=True).numpy()
    np.testing.assert_allclose(a[0], b, atol=1e-6)
    # resuming the finished run publishes nothing new
    assert cli.main(["retrain", "--workdir", str(w), "--resume", run_id]) == 0
    capsys.readouterr()
    assert len(catalog.models(str(w / "catalog"))) == 1
    # and records the code it resumed with (the lineage of what it trains from there on)
    from unclip import manifest

    resumed = catalog.get_run(str(w / "catalog"), run_id)
    assert resumed["state"] == "completed" and resumed["resumes"][-1]["code_version"] == manifest.code_version()


@pytest.mark.slow
def test_sigkilled_clip_run_resumes_to_the_same_weights(tmp_path):
    from unclip.train import trainer

    w = tmp_path / "w"
    cfg_path = _config(tmp_path / "c.yaml", w, steps=24, checkpoint_every=2)
    config = load_config(cfg_path, variables={"workdir": str(w)})
    files = make_pair_shards(w, {"clip": 32, "dalle": 32}, samples_per_shard=16)
    ctx = {"config": config.model_dump(mode="json"), "lineage": {"dataset_version": "ds-test"},
           "train_files": storage.write_parquet(str(tmp_path / "train.parquet"), files),
           "eval_files": storage.write_parquet(str(tmp_path / "eval.parquet"), files.slice(0, 0))}
    (tmp_path / "ctx.json").write_text(json.dumps(ctx))

    def cmd(run_dir):
        return [sys.executable, "-m", "unclip.train.clip", "--run-dir", str(run_dir), "--context",
                str(tmp_path / "ctx.json")]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(cmd(tmp_path / "ref"), env=env, check=True, timeout=600)
    proc = subprocess.Popen(cmd(tmp_path / "cut"), env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = str(tmp_path / "cut" / "clip")
    deadline = time.monotonic() + 300
    while (trainer.load_step(out) or 0) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed_at = trainer.load_step(out)
    assert killed_at is not None and 2 <= killed_at < 24, f"killed too late or too early: {killed_at}"
    subprocess.run(cmd(tmp_path / "cut"), env=env, check=True, timeout=600)
    a = trainer.load_checkpoint(trainer.latest_checkpoint(str(tmp_path / "ref" / "clip")))
    b = trainer.load_checkpoint(trainer.latest_checkpoint(out))
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["task_state"] == b["task_state"]


def test_the_logit_scale_is_bounded_after_each_step():
    from unclip.train.clip import ClipTask

    task = ClipTask(ClipTrainConfig(arch="unclip-tiny"), pa.table({"x": []}))
    model = task.build_model(task.model_config())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000))
        task.after_step(model)  # the trainer calls it under no_grad after each optimiser step
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
        task.after_step(model)
    assert model.logit_scale.item() == 0.0


@pytest.mark.parametrize("arch,covered", [("unclip-ViT-H-16-256", 0.9), ("unclip-tiny", 0.1),
                                          ("unclip-tiny-timm", 0.1), ("unclip-tiny-vit", 0.3)])
def test_fsdp_blocks_are_disjoint_and_hold_the_towers(arch, covered):
    import open_clip

    from unclip.data import clip as clip_data
    from unclip.train.clip import ClipTask

    clip_data.register_project_configs()
    model = open_clip.create_model(arch, device="meta")
    blocks = ClipTask.fsdp_blocks(model)
    listed = [id(p) for b in blocks for p in b.parameters()]
    ids = set(listed)
    assert blocks and len(listed) == len(ids)  # no parameter in two units
    in_blocks = sum(p.numel() for p in model.parameters() if id(p) in ids)
    # the paper's ViT-H: 94.5%; the tiny ones are mostly token embedding, which stays at the root
    assert in_blocks >= covered * sum(p.numel() for p in model.parameters())
    assert any(id(p) in ids for p in model.visual.parameters())  # both towers
    assert any(id(p) in ids for p in model.transformer.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_clip_matches_one_process_on_the_doubled_batch(strategy, tmp_path):
    from clip_ddp import ARCH, run

    from unclip.config import LaunchConfig
    from unclip.train import trainer
    from unclip.train.distributed import launch

    cfg = ClipTrainConfig(arch=ARCH, steps=2, batch_size=8, warmup_steps=1, checkpoint_every=10, log_every=1,
                          lr=1e-3, ema_decay=0.9)
    one = trainer.load_checkpoint(run(str(tmp_path / "one"), cfg))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    launch(LaunchConfig(nproc_per_node=2, backend="gloo", strategy=strategy), "clip_ddp",
           ["--out", str(tmp_path / "two"), "--config", cfg.model_dump_json(), "--strategy", strategy],
           log_path=str(tmp_path / "two.log"), env=env, timeout_s=300)
    two = trainer.load_checkpoint(trainer.latest_checkpoint(str(tmp_path / "two")))
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    for k, v in one["ema"].items():
        torch.testing.assert_close(two["ema"][k], v, atol=2e-5, rtol=1e-4, msg=k)
    assert two["data_position"]["world_size"] == 2 and one["step"] == two["step"] == 2
