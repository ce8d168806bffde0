"""The image stages (decoder, upsampler1, upsampler2): their data, a training step of each through the
shared trainer, evaluation, release and resume."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unclip.config import DecoderTrainConfig, TrainConfig, UpsamplerTrainConfig
from unclip.data import degrade, embeddings
from unclip.train import distributed, image
from unclip.train import trainer as tr

sys.path.insert(0, str(Path(__file__).parent))
from pair_shards import make_pair_shards  # noqa: E402

SIZES = {"decoder": 16, "upsampler1": 64, "upsampler2": 256}


def _cfg(stage: str, **kw):
    base = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1, seed=0,
                ema_decay=0.9, eval_images=4, sample_steps=2, num_workers=0, shuffle_buffer=8,
                image_size=SIZES[stage])
    if stage == "decoder":
        return DecoderTrainConfig(**{**base, **kw})
    return UpsamplerTrainConfig(**{**base, "degradation": "blur" if stage == "upsampler1" else "bsr", **kw})


def _tokenizer():
    import open_clip

    from unclip.data import clip as clip_data

    clip_data.register_project_configs()
    return open_clip.get_tokenizer("unclip-tiny")


def _task(stage: str, files, cfg=None, cls=image.ImageTask):
    return cls(stage, cfg or _cfg(stage), files, files, _tokenizer() if stage == "decoder" else None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_pair_shards(tmp_path_factory.mktemp("shards"), {"dalle": 24}, samples_per_shard=8, image_emb=True)


def test_the_chain_of_sizes_is_checked_before_any_work():
    with pytest.raises(ValueError, match="4x"):
        TrainConfig(decoder={"image_size": 16}, upsampler1={"image_size": 64}, upsampler2={"image_size": 128})
    TrainConfig(decoder={"image_size": 16}, upsampler1={"image_size": 64}, upsampler2={"image_size": 256})


def test_an_upsampler_sample_is_a_quarter_size_crop_with_its_corrupted_low_res_version():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    pre = image.UpsamplerPreprocess(64, degrade.BlurDegradation(p=1.0))
    torch.manual_seed(3)
    a = pre(img)
    torch.manual_seed(3)
    b = pre(img)
    torch.manual_seed(4)
    c = pre(img)
    assert a["image"].shape == (3, 16, 16) and a["low_res"].shape == (3, 4, 4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["low_res"], b["low_res"])
    assert not torch.equal(a["image"], c["image"])
    full = image.UpsamplerPreprocess(64, None, crop=False)(img)
    assert full["image"].shape == (3, 64, 64) and torch.allclose(full["low_res"], degrade.downsample(full["image"], 4))


def test_detail_measures_what_lies_above_the_low_res_band():
    g = torch.Generator().manual_seed(0)
    real = degrade.upsample(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, 2)  # [4, 3, 32, 32] with some detail
    bicubic = degrade.upsample(degrade.downsample(real, image.FACTOR), image.FACTOR)
    assert image.detail(real, real) == pytest.approx(1.0)
    assert image.detail(bicubic, real) < 0.05  # bicubic restores nothing above the low-res band
    noisy = real + 0.5 * torch.randn(real.shape, generator=g)
    assert image.detail(noisy, real) > 1.5  # invented detail counts too: psnr says whether it is right


def test_the_decoder_stream_carries_each_rows_stored_image_embedding(shards):
    task = _task("decoder", shards)
    task.build_model(task.model_config())
    ctx = distributed.DistContext(0, 1, 0, torch.device("cpu"))
    stored = {}
    for kept in shards.column("kept").to_pylist():
        t = pq.read_table(kept)
        stored.update(zip(t.column("key").to_pylist(), embeddings.to_numpy(t.column("image_emb"))))
    batches = list(itertools.islice(task.batches(4, 0, ctx), 3))
    for b in batches:
        assert b["image"].shape == (4, 3, 16, 16) and b["text"].shape[0] == 4 and b["image_emb"].dtype == torch.float32
        for key, emb in zip(b["key"], b["image_emb"]):
            assert np.array_equal(emb.numpy(), stored[key]), key


@pytest.mark.parametrize("stage,residual", [*((s, 0.0) for s in image.STAGES), ("upsampler1", 4.0)])
def test_one_training_step_and_an_evaluation_of_each_image_model(stage, residual, shards, tmp_path):
    cfg = _cfg(stage, steps=1, checkpoint_every=1, **({"residual_scale": residual} if residual else {}))
    task = _task(stage, shards, cfg)
    trainer = tr.Trainer(task, cfg, str(tmp_path / stage))
    result = trainer.run()
    model, model_config, metrics = trainer.released(result)
    assert result.step == 1 and model_config["unet"]["image_size"] == SIZES[stage]
    if stage != "decoder":
        assert model_config["unet"]["residual_scale"] == residual
    assert np.isfinite(metrics["heldout_mse"]) and metrics["heldout_images"] == 4
    if stage == "decoder":
        assert np.isfinite(metrics["heldout_mse_zero_image"])
    else:
        assert np.isfinite(metrics["psnr"]) and metrics["psnr_bicubic"] > 10 and np.isfinite(metrics["psnr_mean"])
        assert np.isfinite(metrics["psnr_posterior_mean"])
        assert metrics["detail"] > 0 and 0 <= metrics["detail_bicubic"] < 0.5
    # the release folder rebuilds the same network
    from unclip.train import prior

    rel = prior.write_release(model, model_config, None, str(tmp_path / "release"), kind=stage, meta=image.META_FILE)
    loaded, meta = image.load_release(rel["uri"])
    assert meta["kind"] == stage and meta["stage"] == stage
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("stage", ["decoder", "upsampler1"])
def test_evaluation_in_small_batches_measures_what_one_batch_does(stage, shards):
    """eval_batch_size bounds the images per forward pass (the paper's 1024 px upsampler cannot sample
    32 at once) and changes no metric: heldout_mse's noise and the samples' start noise are drawn for
    all images first (eta 0 here: the steps draw none)."""
    metrics, batches = [], []
    for bs in (8, 3):
        kw = {} if stage == "decoder" else {"sample_eta": 0.0, "eval_samples": 2}
        task = _task(stage, shards, _cfg(stage, eval_images=8, eval_batch_size=bs, **kw))
        torch.manual_seed(0)
        model = task.build_model(task.model_config()).eval()
        with torch.no_grad():  # the zero-initialised output layers filled in, so the outputs depend on the inputs
            for p in model.parameters():
                if not p.abs().sum():
                    p.normal_(0, 0.02)
        seen: list[int] = []
        model.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(len(args[0])))
        metrics.append(task.evaluate(model))
        batches.append(max(seen))
    assert batches == [8, 3]
    assert metrics[0].keys() == metrics[1].keys() and metrics[0]["heldout_images"] == 8
    for k, v in metrics[0].items():
        assert metrics[1][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


class _NanTask(image.ImageTask):
    calls = 0

    def loss(self, model, batch):
        loss, extra = super().loss(model, batch)
        type(self).calls += 1
        return (loss * float("nan") if type(self).calls == 4 else loss), extra


def test_a_killed_decoder_run_resumes_to_the_same_weights(shards, tmp_path):
    full = tr.Trainer(_task("decoder", shards), _cfg("decoder"), str(tmp_path / "full")).run()
    with pytest.raises(tr.NonFiniteLossError):
        tr.Trainer(_task("decoder", shards, cls=_NanTask), _cfg("decoder"), str(tmp_path / "cut")).run()
    resumed = tr.Trainer(_task("decoder", shards), _cfg("decoder"), str(tmp_path / "cut")).run()
    assert resumed.resumed_from == 2
    a, b = tr.load_checkpoint(full.checkpoint), tr.load_checkpoint(resumed.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
