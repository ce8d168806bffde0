"""The demo's whole story, as `make demo` runs it (the shipped configs/demo.yaml, 2,000 pairs):
ingest, basic filter, CLIP trained on the kept pairs, embed with that CLIP, semantic filter with
thresholds for it, PCA, a released dataset version naming its CLIP model version; then `retrain`
on it with both priors and `eval_priors`, the decoder, both upsamplers and `eval_generation`. The
held-out recall must be far above chance, plain open_clip must reproduce the stored embeddings from
the released folder, the diffusion prior must beat both baselines on held-out pairs, and the images
drawn from held-out captions must show the captioned colours; `unclip generate` draws with the
released models."""

from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unclip import catalog, manifest
from unclip.config import load_config
from unclip.data import embeddings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIZE = 2000
# The image chain for a handful of steps: its whole path (shards and stored embeddings in, released
# models, eval_generation's four modes, the grid, `unclip generate`) in about 3 minutes instead of the
# demo's 14. What the demo's own settings reach (colour_acc, shape_acc by mode) is measured by
# `make demo` and recorded in docs/training.md.
IMAGE_CHAIN_FOR_CI = {"train": {
    "decoder": {"steps": 60, "warmup_steps": 10, "checkpoint_every": 30, "eval_every": 30, "eval_images": 32},
    "upsampler1": {"steps": 30, "warmup_steps": 5, "checkpoint_every": 15, "eval_every": 15, "eval_images": 4,
                   "sample_steps": 4},
    "upsampler2": {"steps": 6, "warmup_steps": 2, "checkpoint_every": 3, "eval_images": 2, "sample_steps": 3},
    "eval_generation": {"eval_captions": 16, "grid_captions": 2, "judge_images": 600, "judge_steps": 300,
                        "decoder_steps": 10, "upsampler_steps": [4, 3]},
}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_api):
    from unclip.cli import summary
    from unclip.flows.demo import DEMO_TRAIN_STAGES, demo_flow

    workdir = tmp_path_factory.mktemp("demo-clip") / "w"
    config = load_config(ROOT / "configs" / "demo.yaml", IMAGE_CHAIN_FOR_CI, variables={"workdir": str(workdir)})
    records = demo_flow(config=config, workdir=str(workdir), size=SIZE, seed=0, train_stages=list(DEMO_TRAIN_STAGES))
    return {"workdir": workdir, "records": records, "config": config,
            "summary": summary(records, str(workdir), config, 0.0)}


def test_every_stage_ran_and_the_clip_learned(demo):
    rec = demo["records"]
    assert list(rec) == ["ingest", "basic_filter", "clip", "embed", "semantic_filter", "pca", "train"]
    m = rec["clip"]["metrics"]
    assert m["trained"] and m["steps"] == demo["config"].train.clip.steps
    # far above chance on held-out pairs the CLIP never trained on
    assert m["t2i_recall@5"] >= 5 * m["recall@5_chance"], m
    assert m["i2t_recall@5"] >= 5 * m["recall@5_chance"], m
    assert m["zeroshot_colour_acc"] >= 2 * m["zeroshot_colour_chance"], m
    assert 0.4 < m["mix/dalle"] < 0.6, "the two sources are drawn 50/50"
    assert "clip model clip-" in demo["summary"] and "zero-shot colour" in demo["summary"]
    assert "randomly initialised" not in demo["summary"]


def test_the_release_names_the_clip_it_was_embedded_with(demo):
    w = demo["workdir"]
    model = catalog.resolve_model(str(w / "catalog"), "clip@latest")
    assert model["version"] == demo["records"]["clip"]["metrics"]["model_version"]
    assert model["dataset_version"] == demo["records"]["basic_filter"]["dataset_version"]
    assert demo["records"]["embed"]["metrics"]["model_version"] == model["version"]
    release = catalog.latest(str(w / "catalog"), "demo")
    assert release["clip_model_version"] == model["version"]
    assert manifest.load(str(w))["stages"]["embed"]["metrics"]["model_version"] == model["version"]
    # the semantic filter is on, judged against the generator's ground truth
    sem = demo["records"]["semantic_filter"]
    assert sem["drops_by_reason"].get("clip_score", 0) > 0
    # far better than dropping at random: the planted wrong captions are about 2% of the rows judged
    # (the precision itself moved between 0.30 and 0.52 with the held-out split, which the port sets)
    base_rate = sem["metrics"]["truth/clip_score_planted"] / sem["rows_in"]
    assert sem["metrics"]["truth/clip_score_precision"] > 5 * base_rate, sem["metrics"]
    assert sem["metrics"]["truth/clip_score_planted"] > 0


def test_plain_open_clip_reproduces_the_stored_embeddings(demo):
    import open_clip
    from PIL import Image

    w = demo["workdir"]
    model = catalog.resolve_model(str(w / "catalog"), "clip@latest")
    folder = Path(model["uri"])
    open_clip.add_model_config(folder / f"{model['arch']}.json")
    plain, _, preprocess = open_clip.create_model_and_transforms(
        model["arch"], pretrained=str(folder / "open_clip_model.safetensors"))
    tokenizer = open_clip.get_tokenizer(model["arch"])
    plain.eval()
    files = catalog.kept_files(catalog.latest(str(w / "catalog"), "demo"))
    kept, tar = files.column("kept")[0].as_py(), files.column("tar")[0].as_py()
    rows = pq.read_table(kept).slice(0, 8)
    with tarfile.open(tar) as tf:
        images = [Image.open(io.BytesIO(tf.extractfile(f"{k}.jpg").read())).convert("RGB")
                  for k in rows.column("key").to_pylist()]
    with torch.inference_mode():
        img = plain.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True).numpy()
        txt = plain.encode_text(tokenizer(rows.column("caption").to_pylist()), normalize=True).numpy()
    stored_img = embeddings.to_numpy(rows.column("image_emb"))
    stored_txt = embeddings.to_numpy(rows.column("text_emb"))
    np.testing.assert_allclose(stored_img, img, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(stored_txt, txt, atol=2e-3)


def test_tensorboard_and_checkpoints_of_the_clip_run(demo):
    out = Path(demo["records"]["clip"]["outputs"]["run_dir"]) / "clip"
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == demo["config"].train.clip.steps


def test_both_priors_are_trained_released_and_compared(demo):
    from safetensors.torch import load_file

    from unclip.models.prior import DiffusionPrior, DiffusionPriorConfig

    from unclip.flows.demo import DEMO_TRAIN_STAGES

    w, run = demo["workdir"], demo["records"]["train"]
    assert run["state"] == "completed" and list(run["stages"]) == list(DEMO_TRAIN_STAGES)
    release = catalog.latest(str(w / "catalog"), "demo")
    for kind in ("prior_diffusion", "prior_ar"):
        model = catalog.resolve_model(str(w / "catalog"), f"{kind}@latest")
        assert model["version"] == run["models"][kind] and model["dataset_version"] == release["version"]
    ar = catalog.resolve_model(str(w / "catalog"), "prior_ar@latest")
    assert ar["pca_version"] == release["pca_version"]  # coded by the dataset version's PCA, that very file
    assert (Path(ar["uri"]) / "pca.npz").read_bytes() == Path(release["pca"]).read_bytes()
    m = {k[len("eval_priors/"):]: v for k, v in run["metrics"].items() if k.startswith("eval_priors/")}
    print(json.dumps(m, indent=1, sort_keys=True))
    d = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("prior_diffusion/")}
    assert d["heldout_pairs"] >= 20  # at least one held-out dalle shard (the split keeps one per source)
    # the bar: at least 0.5 and above both baselines, on pairs no prior trained on
    assert d["cosine_true"] >= 0.5 and d["cosine_true"] > d["cosine_text_baseline"], d
    assert d["cosine_true"] > d["cosine_unrelated"] + 0.05, d
    assert d["i2i_recall@5"] > 2 * d["i2i_recall@5_chance"], d
    a = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("prior_ar/")}
    assert a["heldout_pairs"] == d["heldout_pairs"], a
    assert a["cosine_true"] >= 0.5 and a["cosine_true"] > a["cosine_unrelated"] + 0.2, a
    assert a["i2i_recall@5"] > 2 * a["i2i_recall@5_chance"] and a["cosine_true_ceiling"] > 0.99, a
    assert "priors on the same held-out pairs" in demo["summary"] and "nll_per_code" in demo["summary"]
    # the released weights load into a plain DiffusionPrior from their folder
    folder = Path(catalog.resolve_model(str(w / "catalog"), "prior_diffusion@latest")["uri"])
    meta = json.loads((folder / "prior.json").read_text())
    DiffusionPrior(DiffusionPriorConfig(**meta["prior"])).load_state_dict(load_file(folder / "model.safetensors"))


def test_the_image_chain_is_trained_released_and_judged(demo):
    w, run = demo["workdir"], demo["records"]["train"]
    where = str(w / "catalog")
    release = catalog.latest(where, "demo")
    for kind in ("decoder", "upsampler1", "upsampler2"):
        model = catalog.resolve_model(where, f"{kind}@latest")
        assert model["version"] == run["models"][kind] and model["dataset_version"] == release["version"]
        assert model["run_id"] == run["run_id"] and model["code_version"] and model["stage"] == kind
        assert (Path(model["uri"]) / "unet.json").exists() and (Path(model["uri"]) / "model.safetensors").exists()
    dec = run["stages"]["decoder"]["metrics"]
    print(json.dumps({k: run["stages"][k]["metrics"] for k in ("decoder", "upsampler1", "upsampler2")}, indent=1))
    # the CLIP embedding tells the decoder something: its noise prediction is worse without it
    assert dec["heldout_mse"] < dec["heldout_mse_zero_image"], dec
    m = {k[len("eval_generation/"):]: v for k, v in run["metrics"].items() if k.startswith("eval_generation/")}
    print(json.dumps(m, indent=1, sort_keys=True))
    assert m["modes_evaluated"] == 4 and m["captions"] >= 16
    for mode in ("prior_diffusion", "prior_ar", "text_embedding", "caption_only"):
        for metric in ("clip_score", "fd_clip", "colour_acc", "colour_acc_chance", "shape_acc", "shape_acc_chance",
                       "colour_auc", "shape_auc", "decoder_colour_auc"):
            assert np.isfinite(m[f"{mode}/{metric}"]), (mode, metric)
    # the judge's ceiling on real held-out images, and the real images' own CLIP score above the
    # unconditioned samples'. The issue's bar (colour_acc >= 0.7 with the diffusion prior) is the demo's
    # to measure with its own settings, which train the chain for 12 minutes (docs/training.md: 0.77)
    assert m["real/colour_acc"] >= 0.9 and m["real/colour_acc"] > m["real/colour_acc_chance"] + 0.4, m
    assert m["real/clip_score"] > m["caption_only/clip_score"] - 0.05, m
    stage = run["stages"]["eval_generation"]["outputs"]
    assert Path(stage["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = json.loads((Path(stage["samples"]) / "index.json").read_text())
    assert {e["mode"] for e in index} == {"prior_diffusion", "prior_ar", "text_embedding", "caption_only"}
    assert "sample grid:" in demo["summary"] and "generated images:" in demo["summary"]


def test_unclip_generate_draws_with_the_released_models(demo, tmp_path):
    from PIL import Image

    from unclip import cli

    w = demo["workdir"]
    fast = ["--prior-steps", "5", "--decoder-steps", "8", "--upsampler-steps", "3,2"]
    out = tmp_path / "out"
    assert cli.main(["generate", "--workdir", str(w), "--out", str(out), "--n", "2", "--seed", "3", *fast,
                     "--upsampler-eta", "0.5",
                     "a large red circle in the centre", "two small blue squares on the left"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert len(index) == 4 and {e["caption"] for e in index} == {"a large red circle in the centre",
                                                               "two small blue squares on the left"}
    run_cfg = load_config(ROOT / "configs" / "demo.yaml", variables={"workdir": str(w)}).train.eval_generation
    for e in index:
        assert e["size"] == 256 and e["seed"] == 3 and e["prior"] == "diffusion"
        # unset guidance comes from the run's eval_generation config, the options win over it
        assert e["sampling"] == {"prior_guidance": run_cfg.prior_guidance, "prior_steps": 5,
                                 "decoder_guidance": run_cfg.decoder_guidance, "decoder_steps": 8,
                                 "upsampler_steps": [3, 2], "upsampler_eta": 0.5}
        assert set(e["models"]) >= {"prior_diffusion", "decoder", "upsampler1", "upsampler2", "clip"}
        assert Image.open(out / e["file"]).size == (256, 256)
    var = tmp_path / "var"
    assert cli.main(["generate", "--workdir", str(w), "--out", str(var), "--variations", str(out / index[0]["file"]),
                     "--n", "2", "--inversion-guidance", "1.5", *fast]) == 0
    var_index = json.loads((var / "index.json").read_text())
    assert [(e["mode"], e["inversion_guidance"]) for e in var_index] == [("variation", 1.5)] * 2
