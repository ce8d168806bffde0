"""The project's CLIP architectures (open_clip configs) and the Prefect deployment declarations."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import yaml

from unclip.config import ClipModelConfig
from unclip.data import clip

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_clip_embeds_to_1024_unit_vectors_reproducibly():
    model, preprocess, tokenizer = clip.load_clip(ClipModelConfig(arch="unclip-tiny", seed=0))
    from PIL import Image

    img = preprocess(Image.new("RGB", (80, 60), (200, 30, 30))).unsqueeze(0)
    txt = tokenizer(["a large red square"])
    i, t, s = clip.encode_batch(model, img, txt, torch.device("cpu"))
    assert i.shape == t.shape == (1, 1024)
    assert abs(float((i ** 2).sum()) - 1) < 1e-5 and abs(float((t ** 2).sum()) - 1) < 1e-5
    assert abs(float(s[0]) - float((i * t).sum())) < 1e-6
    clip._load_cached.cache_clear()  # a fresh build from the same seed gives the same weights
    again, _, _ = clip.load_clip(ClipModelConfig(arch="unclip-tiny", seed=0))
    i2, _, _ = clip.encode_batch(again, img, txt, torch.device("cpu"))
    assert (i == i2).all()


def test_paper_clip_builds_on_meta_with_vit_h16_sizes():
    import open_clip

    clip.register_project_configs()
    model = open_clip.create_model("unclip-ViT-H-16-256", pretrained=None, device="meta")
    visual = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).device.type == "meta"
    assert model.visual.image_size == (256, 256) and model.visual.patch_size == (16, 16)
    assert len(model.visual.transformer.resblocks) == 32 and model.visual.transformer.width == 1280
    assert len(model.transformer.resblocks) == 24 and model.transformer.width == 1024
    assert model.text_projection.shape[1] == 1024
    assert 630e6 < visual < 635e6 and 985e6 < total < 988e6  # measured: 632.3M image tower, 986.3M in all
    assert 353e6 < total - visual < 355e6  # the text tower, 50.6M of it the token embedding (article: ~340M)


def test_prefect_yaml_entrypoints_are_flows():
    from prefect import Flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert {"demo", "data-pipeline"} <= set(names)
    for d in spec["deployments"]:
        path, fn = d["entrypoint"].split(":")
        mod = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(mod, fn), Flow), d["entrypoint"]
        if d.get("parameters"):  # the flow takes what the deployment passes
            getattr(mod, fn).validate_parameters(d["parameters"])
        assert d["work_pool"]["name"] == "unclip-process"
    # the demo deployment trains what `unclip demo` does
    from unclip.train.stages import DEMO_TRAIN_STAGES

    demo = next(d for d in spec["deployments"] if d["name"] == "demo")
    assert tuple(demo["parameters"]["train_stages"]) == DEMO_TRAIN_STAGES


@pytest.mark.parametrize("name", ["unclip-tiny", "unclip-tiny-timm", "unclip-ViT-H-16-256"])
def test_project_architectures_are_registered(name):
    assert name in clip.known_architectures()


def test_checkpoint_weights_load_through_the_config(tmp_path):
    seeded, preprocess, tokenizer = clip.load_clip(ClipModelConfig(arch="unclip-tiny", seed=3))
    path = tmp_path / "clip.pt"
    torch.save(seeded.state_dict(), path)
    loaded, _, _ = clip.load_clip(ClipModelConfig(arch="unclip-tiny", checkpoint=str(path)))
    other, _, _ = clip.load_clip(ClipModelConfig(arch="unclip-tiny", seed=4))
    from PIL import Image

    img = preprocess(Image.new("RGB", (64, 64), (10, 200, 30))).unsqueeze(0)
    txt = tokenizer(["a green circle"])
    cpu = torch.device("cpu")
    a, b, c = (clip.encode_batch(m, img, txt, cpu)[0] for m in (seeded, loaded, other))
    assert (a == b).all() and not (a == c).all()
