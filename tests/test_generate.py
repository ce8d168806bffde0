"""Generation with a stack of released models (unclip.generate) and the eval_generation stage, on
small randomly initialised models: shapes, determinism under a seed, the bipartite-latent operations,
and the stage's metrics, grid and sample files. (The demo test runs them on trained models.)"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unclip import generate as gen
from unclip.config import ClipModelConfig, load_config
from unclip.models import unet
from unclip.models.diffusion import GaussianDiffusion
from unclip.models.prior import DiffusionPrior, FLAVOURS
from unclip.train import eval_generation, image, prior

sys.path.insert(0, str(Path(__file__).parent))
from pair_shards import make_pair_shards  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = gen.Settings(prior_steps=3, decoder_steps=3, upsampler_steps=(2, 2), batch_size=4)
CLIP = ClipModelConfig(arch="unclip-tiny", seed=0)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Zero-initialised output layers filled in, so outputs depend on inputs and noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stack")
    torch.manual_seed(0)
    pcfg = FLAVOURS["micro"]
    out = {"prior_diffusion": prior.write_release(_randomised(DiffusionPrior(pcfg), 1), {"flavour": "micro",
                                                  "prior": pcfg.to_dict()}, "unclip-tiny", str(root / "prior"),
                                                  kind="prior_diffusion")["uri"]}
    for i, (kind, cfg) in enumerate(unet.FLAVOURS["tiny"].items()):
        model = _randomised(unet.build(kind, cfg.to_dict()), 2 + i)
        out[kind] = prior.write_release(model, {"stage": kind, "flavour": "tiny", "unet": cfg.to_dict()},
                                        "unclip-tiny" if kind == "decoder" else None, str(root / kind), kind=kind,
                                        meta=image.META_FILE)["uri"]
    return out


@pytest.fixture(scope="module")
def stack(folders) -> gen.Stack:
    return gen.Stack.from_folders(folders, CLIP)


@pytest.mark.parametrize("mode", ["prior_diffusion", "text_embedding", "caption_only"])
def test_the_chain_draws_every_resolution_and_a_seed_fixes_it(stack, mode):
    captions = ["a red circle at the top", "two small blue squares on the left"]
    a = stack.generate(captions, mode=mode, s=SETTINGS, seed=0)
    assert [tuple(x.shape) for x in a] == [(2, 3, 16, 16), (2, 3, 64, 64), (2, 3, 256, 256)]
    assert all(torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5 for x in a)
    b = stack.generate(captions, mode=mode, s=SETTINGS, seed=0)
    c = stack.generate(captions, mode=mode, s=SETTINGS, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[-1], c[-1])
    low = stack.generate(captions, mode=mode, s=SETTINGS, seed=0, top="upsampler1")
    assert len(low) == 2 and torch.equal(low[0], a[0])


def test_the_upsamplers_eta_is_a_setting_of_the_run_and_reaches_their_sampling(stack, monkeypatch):
    assert gen.Settings.of({"upsampler_eta": 0.5}).upsampler_eta == 0.5
    assert gen.Settings().upsampler_eta == 1.0
    assert gen.Settings.of({}).upsampler_eta == 0.0  # a run recorded before the setting sampled at eta 0
    seen = []
    sample = GaussianDiffusion.sample

    def spy(self, model, shape, **kw):
        seen.append((tuple(shape)[-1], kw.get("eta", 0.0)))
        return sample(self, model, shape, **kw)

    monkeypatch.setattr(GaussianDiffusion, "sample", spy)
    captions = ["a red circle at the top", "two small blue squares on the left"]
    a = stack.generate(captions, mode="text_embedding", s=dataclasses.replace(SETTINGS, upsampler_eta=0.3), seed=0)
    assert seen == [(16, 0.0), (64, 0.3), (256, 0.3)]  # the decoder at its own eta, both upsamplers at 0.3
    b = stack.generate(captions, mode="text_embedding", s=dataclasses.replace(SETTINGS, upsampler_eta=0.0), seed=0)
    # the upsamplers draw from their own stream: their settings leave the decoder's images as they were
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_fixed_noise_upsamples_equal_images_equally(stack):
    first = stack.generate(["a red circle at the top"], mode="text_embedding", s=SETTINGS, seed=0, top="decoder")[0]
    g = torch.Generator().manual_seed(0)
    fixed = stack.chain(first.repeat(2, 1, 1, 1), SETTINGS, g, fixed_noise=True)
    free = stack.chain(first.repeat(2, 1, 1, 1), SETTINGS, g)
    assert torch.equal(fixed[-1][0], fixed[-1][1]) and not torch.equal(free[-1][0], free[-1][1])


def test_slerp_runs_on_the_sphere_between_its_ends():
    a, b = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1).chunk(2)
    assert torch.allclose(gen.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(gen.slerp(a, b, 1.0), b, atol=1e-5)
    mid = gen.slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(1)) and torch.allclose((mid * a).sum(), (mid * b).sum(), atol=1e-5)


def test_variations_interpolations_and_text_diffs(stack):
    img = torch.rand(3, 256, 256) * 2 - 1
    other = torch.rand(3, 256, 256) * 2 - 1
    v = stack.variations(img, 3, caption="a red circle", s=SETTINGS, seed=0)
    assert [tuple(x.shape) for x in v] == [(3, 3, 16, 16), (3, 3, 64, 64), (3, 3, 256, 256)]
    assert not torch.equal(v[0][0], v[0][1])  # eta > 0: the variations differ
    i = stack.interpolate(img, other, 4, s=SETTINGS, seed=0)
    assert i[-1].shape == (4, 3, 256, 256) and not torch.equal(i[0][0], i[0][-1])
    t = stack.text_diff(img, "a blue square", 3, base_caption="a red circle", s=SETTINGS, seed=0)
    assert t[-1].shape == (3, 3, 256, 256)
    # the decoder noise that deterministic DDIM maps to the image (its accuracy: tests/test_diffusion.py)
    z, x_t, tokens = stack.invert(img, "a red circle", SETTINGS)
    assert z.shape == (1, 1024) and x_t.shape == (1, 3, 16, 16) and torch.isfinite(x_t).all()


def test_inversion_and_decoding_use_one_guided_decoder(stack, monkeypatch):
    """x_T is found with the decoder that then samples from it (guidance, caption or the null text), so
    a text diff's first frame (fraction 0, eta 0) gives the image back."""
    img = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = torch.nn.functional.interpolate(img[None], size=(16, 16), mode="bicubic", antialias=True,
                                         align_corners=False).clamp(-1, 1)
    s = dataclasses.replace(SETTINGS, decoder_steps=25, decoder_guidance=3.0)
    for caption in ("a red circle", ""):
        first = stack.text_diff(img, "a blue square", 2, base_caption=caption, s=s, seed=0)[0][0]
        # 0.005 (either caption); inverting unguided and decoding at 3, or with an empty string's tokens: 0.04-0.11
        assert (first - x0[0]).pow(2).mean() < 0.01
    calls = []
    decoder_fn = gen.Stack._decoder_fn

    def spy(self, tokens, z, guidance, **kw):
        fn, kwargs = decoder_fn(self, tokens, z, guidance, **kw)
        calls.append((guidance, kwargs["drop_text"].tolist(), kwargs["drop_image"].tolist()))
        return fn, kwargs

    monkeypatch.setattr(gen.Stack, "_decoder_fn", spy)
    s = dataclasses.replace(SETTINGS, decoder_guidance=3.0)
    stack.text_diff(img, "a blue square", 2, base_caption="a red circle", s=s, seed=0)
    assert calls == [(gen.INVERSION_GUIDANCE, [False], [False]), (gen.INVERSION_GUIDANCE, [False] * 2, [False] * 2)]
    calls.clear()
    stack.variations(img, 2, caption="  ", s=s, seed=0, guidance=2.0)  # no caption: the null text both times
    assert calls == [(2.0, [True], [False]), (2.0, [True] * 2, [False] * 2)]
    calls.clear()
    stack.interpolate(img, img, 2, s=s, seed=0)  # no inversion: the text-to-image guidance
    assert calls == [(3.0, [True] * 2, [False] * 2)]
    calls.clear()
    # text to image: an empty caption is the null text too, row by row, beside captioned rows
    stack.generate(["a red circle", "", "a blue square"], mode="caption_only", s=s, seed=0, top="decoder")
    assert calls == [(3.0, [False, True, False], [True] * 3)]


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    x = np.random.default_rng(0).standard_normal((400, 8))
    assert abs(eval_generation.frechet_distance(x, x)) < 1e-6
    assert abs(eval_generation.frechet_distance(x, x + 2.0) - 8 * 4.0) < 1e-3


def test_eval_generation_measures_every_mode_and_writes_a_grid_and_samples(folders, tmp_path, monkeypatch):
    files = make_pair_shards(tmp_path / "data", {"dalle": 24}, samples_per_shard=8, image_emb=True)
    config = load_config(ROOT / "configs" / "demo.yaml", {"train": {"eval_generation": {
        "eval_captions": 6, "grid_captions": 2, "judge_images": 16, "judge_steps": 2, "decoder_steps": 2,
        "prior_steps": 2, "upsampler_steps": [2, 2], "batch_size": 8, "metrics_at": "upsampler2"}}},
        variables={"workdir": str(tmp_path)})
    previous = {k: {"outputs": {"model": v}} for k, v in folders.items()}
    release = {"config": {"embed": {"model": CLIP.model_dump()}}}
    sides: list[int] = []  # every image CLIP embeds, real or generated, comes at metrics_at's side
    embed = gen.Stack.image_embedding
    monkeypatch.setattr(gen.Stack, "image_embedding", lambda self, x: sides.append(x.shape[-1]) or embed(self, x))
    done = eval_generation.evaluate_generation(config, files, files, previous, str(tmp_path / "out"),
                                               release=release, catalog_uri=None)
    m = done["metrics"]
    assert m["modes_evaluated"] == 3 and m["captions"] == 6 and m["metrics_at_size"] == 256
    assert len(sides) == 2 + 3 and set(sides) == {256}, sides  # held-out and training real, then each mode
    for mode in ("prior_diffusion", "text_embedding", "caption_only", "real"):
        assert np.isfinite(m[f"{mode}/clip_score"]) and m[f"{mode}/fd_clip"] >= -1e-6, mode
        assert 0 <= m[f"{mode}/colour_acc"] <= 1 and 0 <= m[f"{mode}/shape_acc_chance"] <= 1, mode
    assert done["grid"][:8] == b"\x89PNG\r\n\x1a\n" and Path(done["outputs"]["grid"]).exists()
    index = json.loads((Path(done["outputs"]["samples"]) / "index.json").read_text())
    assert len(index) == 3 * 2 and all((Path(done["outputs"]["samples"]) / e["file"]).exists() for e in index)
    assert {e["size"] for e in index} == {256} and {e["mode"] for e in index} == {"prior_diffusion", "text_embedding",
                                                                                  "caption_only"}
    assert {r["metric"] for r in done["rows"]} >= {"clip_score", "fd_clip", "colour_acc", "shape_acc", "shape_auc"}
    # the ceiling at the bottom of the chain: the real images shrunk to the decoder's side, judged
    assert 0 <= m["real_at_decoder_size/colour_acc"] <= 1 and "real_at_decoder_size" in done["rows"][0]
    # and along the chain: the shrunk real images through upsampler 1, each mode's decoder images
    assert 0 <= m["real_upsampled/colour_acc"] <= 1 and "real_upsampled" in done["rows"][0]
    for mode in ("prior_diffusion", "text_embedding", "caption_only"):
        assert f"{mode}/decoder_shape_auc" in m, mode
    # without a decoder the stage is recorded as skipped, not failed
    none = eval_generation.evaluate_generation(config, files, files, {}, str(tmp_path / "none"), release=release,
                                               catalog_uri=None)
    assert none["metrics"]["modes_evaluated"] == 0 and "decoder" in none["metrics"]["skipped"]


@pytest.mark.parametrize("args", [["--interpolate", "a.png", "b.png", "--steps", "0"],
                                  ["--decoder-steps", "0", "a red circle"], ["--prior-steps", "-1", "a red circle"]])
def test_generate_refuses_step_counts_below_one_before_loading_anything(tmp_path, capsys, args):
    from unclip import cli

    assert cli.main(["generate", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), *args]) == 2
    assert "at least 1" in capsys.readouterr().err and not (tmp_path / "out").exists()
