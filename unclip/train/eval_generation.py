"""Stage ``eval_generation``: the run's text-to-image stack judged on held-out captions of the
generative sources, under the paper's four conditionings (``unclip.generate.MODES``):
``prior_diffusion`` and ``prior_ar`` (a prior's sampled CLIP image embedding), ``text_embedding`` (the
CLIP text embedding given in place of the image embedding) and ``caption_only`` (a zero embedding).

Metrics ``<mode>/<metric>`` (the run records them as ``eval_generation/<mode>/<metric>``), measured on
the images at ``metrics_at`` (a stage of the chain) for the first ``eval_captions`` held-out captions:

- ``clip_score``: the project's CLIP, cosine of each generated image with its caption, averaged;
- ``fd_clip``: the Frechet distance between the CLIP image features of the generated images and of the
  held-out real images, both taken at ``metrics_at``'s side and resized alike to CLIP's (means and
  covariances, scipy's ``sqrtm``); small samples bias it upward, so
  ``real/fd_clip`` (as many training images against the held-out ones) is the floor to read it by;
- where the tars carry the demo's ``scene_json``: ``colour_acc`` and ``shape_acc``, the fraction of
  the captions' objects whose colour (shape) an attribute classifier (``unclip.train.judge``, trained
  here on real training images and their ground truth) finds in the image, with ``*_chance`` (the
  same images judged against other captions), and ``colour_auc`` and ``shape_auc``, the same without a
  threshold (chance 0.5: is the judge surer of a captioned attribute on its image than on images whose
  captions do not name it; ``judge.attribute_accuracy``); ``real/colour_acc`` and ``real/shape_acc`` are the
  judge on held-out real images: the ceiling of the measurement, and ``real_at_decoder_size/*`` the
  same images shrunk to the decoder's side and back: what the chain's first image can show at best
  (the upsamplers see no caption); ``real_upsampled/*`` those shrunk images through the upsamplers up
  to ``metrics_at``: what the upsamplers keep of it; and per mode ``decoder_colour_auc`` and
  ``decoder_shape_auc``, the decoder's own images judged as ``real_at_decoder_size`` is: so a run shows
  where along the chain an attribute is lost.

Also a sample grid (a row per caption: the real image, then each mode at the decoder's resolution
and at the top of the chain) as ``grid.png``, a Prefect image artifact, and ``metrics.json`` and a
table artifact. A run without a decoder, or a held-out split without generative rows, is recorded as
skipped, not failed.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from unclip import catalog, storage
from unclip import generate as gen
from unclip.data import pairs
from unclip.train import judge as judge_mod
from unclip.train import prior
from unclip.train.image import square, to_pil, to_tensor

PRIOR_STAGES = ("prior_diffusion", "prior_ar")
REAL_SMALL = "real_at_decoder_size"  # the held-out real images shrunk to the decoder's side (and judged at 64 px)
REAL_UPSAMPLED = "real_upsampled"  # those shrunk images through the upsamplers up to metrics_at


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [n, d]."""
    from scipy import linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)  # (its disp argument is deprecated in SciPy 1.17, gone in 1.18)
    if not np.isfinite(covmean).all():  # near-singular product (few samples): regularise, as pytorch-fid does
        eps = 1e-6 * np.eye(len(sa))
        covmean = linalg.sqrtm((sa + eps) @ (sb + eps))
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean.real))


def _real_images(files, n: int, size: int, *, clip_size: int | None = None) -> dict:
    """The first ``n`` images of ``files`` at ``size`` (``image``), and with ``clip_size`` the same
    images also at that side (``clip_image``), from one read: the CLIP features of real images are taken
    from them at the side the generated images they are compared with have."""
    if clip_size is None:
        return pairs.held_out_images(files, n, lambda img: to_tensor(square(img, size)))
    both = pairs.held_out_images(files, n, lambda img: {"image": to_tensor(square(img, size)),
                                                        "clip_image": to_tensor(square(img, clip_size))})
    return {**both, **both["image"]}


def _scenes(meta: list[dict]) -> list[dict] | None:
    import json

    found = [m.get("scene_json") for m in meta]
    if not found or any(s is None for s in found):
        return None
    return [json.loads(s) if isinstance(s, str) else s for s in found]


def train_attribute_judge(train_files, cfg, device) -> tuple[judge_mod.AttributeJudge | None, str | None]:
    """The judge, trained on up to ``cfg.judge_images`` real training images with their ground truth,
    or (None, why) when the images carry no ``scene_json``."""
    real = _real_images(train_files, cfg.judge_images, judge_mod.JUDGE_SIZE)
    scenes = _scenes(real["meta"])
    if scenes is None:
        return None, "the images carry no scene_json ground truth (the demo's), so no attribute judge"
    labels = [judge_mod.scene_labels(s) for s in scenes]
    colours = torch.from_numpy(np.stack([c for c, _ in labels])).float()
    shapes = torch.from_numpy(np.stack([s for _, s in labels])).float()
    model = judge_mod.train_judge(real["image"], colours, shapes, steps=cfg.judge_steps, seed=cfg.seed)
    return model.to(device), None


def evaluate_generation(run_config, train_files, eval_files, previous: dict[str, dict], out_dir: str, *,
                        release: dict, catalog_uri: str | None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Metrics ``<mode>/<metric>``, the grid, and where the files went (see the module docstring)."""
    cfg = run_config.train.eval_generation
    folders = {k: previous[k]["outputs"]["model"] for k in (*PRIOR_STAGES, *gen.IMAGE_STAGES)
               if (previous.get(k) or {}).get("outputs", {}).get("model")}
    generative = [s.name for s in run_config.sources if s.for_generative]
    held_files = prior.generative_files(eval_files, generative)
    missing = [k for k in gen.IMAGE_STAGES if k not in folders]
    skipped = (f"the run has no {', '.join(missing)}" if missing else
               f"the held-out split has no rows of the generative sources {generative}" if not held_files.num_rows
               else None)
    if skipped:
        return {"metrics": {"modes_evaluated": 0, "skipped": skipped}, "rows": [], "outputs": {}, "grid": None}
    started = time.monotonic()
    versions = {k: catalog.model_version_id(k, previous[k]["model"]["weights_sha256"]) for k in folders
                if (previous[k].get("model") or {}).get("weights_sha256")}
    stack = gen.Stack.from_folders(folders, gen.clip_config(catalog_uri, release), versions=versions,
                                   clip_version=gen.clip_version(release), device=device)
    settings = gen.Settings.of(cfg)
    modes = [m for m in gen.MODES if m not in PRIOR_STAGES or m in folders]
    # the judge reads 64 px images; CLIP reads the real ones at the side of the generated ones (metrics_at),
    # each resized to CLIP's own side alike (not a 64 px image enlarged against a large one reduced)
    side, clip_side = judge_mod.JUDGE_SIZE, stack.size(cfg.metrics_at)
    held = _real_images(held_files, cfg.eval_captions, side, clip_size=clip_side)
    captions = held["caption"]
    _, text_emb = stack.text(captions)
    real_feats = stack.image_embedding(held["clip_image"])
    train_real = _real_images(prior.generative_files(train_files, generative), len(captions), clip_side)
    metrics: dict[str, Any] = {
        "captions": len(captions), "metrics_at": cfg.metrics_at, "metrics_at_size": clip_side,
        "real/clip_score": float((real_feats * text_emb).sum(-1).mean()),
        "real/fd_clip": frechet_distance(stack.image_embedding(train_real["image"]).cpu().numpy(),
                                         real_feats.cpu().numpy()),
    }
    judge, why = train_attribute_judge(prior.generative_files(train_files, generative), cfg, device)
    if judge is not None:
        real_acc = judge_mod.attribute_accuracy(judge, held["image"].to(device), captions)
        metrics.update({f"real/{k}": v for k, v in real_acc.items()})
        # what the chain's first image can show at best: the real images shrunk to the decoder's side
        low = judge_mod.downsample(held["image"], stack.size("decoder"))
        small = judge_mod.enlarge(low, held["image"].shape[-2:])
        metrics.update({f"{REAL_SMALL}/{k}": v for k, v in
                        judge_mod.attribute_accuracy(judge, small.to(device), captions).items()})
        if cfg.metrics_at != "decoder":
            upsampled = _upsampled(stack, low.clamp(-1, 1), settings, cfg)
            metrics.update({f"{REAL_UPSAMPLED}/{k}": v for k, v in
                            judge_mod.attribute_accuracy(judge, upsampled.to(device), captions).items()})
        judge_mod.save_judge(judge, storage.join(out_dir, "judge"))
    else:
        metrics["judge_skipped"] = why
    for i, mode in enumerate(modes):
        chain = stack.generate(captions, mode=mode, s=settings, seed=cfg.seed + i, top=cfg.metrics_at)
        images = chain[-1]
        feats = stack.image_embedding(images)
        got = {"clip_score": float((feats * text_emb).sum(-1).mean()),
               "fd_clip": frechet_distance(feats.cpu().numpy(), real_feats.cpu().numpy())}
        if judge is not None:
            got.update(judge_mod.attribute_accuracy(judge, images.to(device), captions))
            if len(chain) > 1:  # the decoder's own images, before the upsamplers (which see no caption)
                first = judge_mod.attribute_accuracy(judge, judge_mod.enlarge(chain[0], images.shape[-2:]).to(device),
                                                     captions)
                got.update({f"decoder_{k}": first[k] for k in ("colour_auc", "shape_auc")})
        metrics.update({f"{mode}/{k}": v for k, v in got.items()})
    grid_png = sample_grid(stack, held, modes, settings, cfg, storage.join(out_dir, "samples"))
    grid_uri = storage.write_bytes(storage.join(out_dir, "grid.png"), grid_png)
    metrics["modes_evaluated"] = len(modes)
    metrics["seconds"] = round(time.monotonic() - started, 1)
    rows = table_rows(metrics, ["real", REAL_SMALL, REAL_UPSAMPLED, *modes])
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)
    return {"metrics": metrics, "rows": rows, "grid": grid_png,
            "outputs": {"metrics": storage.join(out_dir, "metrics.json"), "grid": grid_uri,
                        "samples": storage.join(out_dir, "samples")}}


def _upsampled(stack: gen.Stack, small: torch.Tensor, s: gen.Settings, cfg) -> torch.Tensor:
    """Images at the decoder's side through the upsamplers up to ``cfg.metrics_at``, in batches of
    ``s.batch_size`` with one seeded generator."""
    g = torch.Generator(device=stack.device).manual_seed(cfg.seed + 50)
    return torch.cat([stack.chain(small[i:i + s.batch_size].to(stack.device), s, g, top=cfg.metrics_at)[-1].cpu()
                      for i in range(0, len(small), s.batch_size)])


def sample_grid(stack: gen.Stack, held: dict, modes: list[str], s: gen.Settings, cfg, samples_dir: str) -> bytes:
    """PNG: a row per caption (the first ``cfg.grid_captions``): the real image, then per mode the
    decoder's image and the top of the chain's. The top images also go to ``samples_dir`` as PNG files
    with an ``index.json`` (as ``unclip generate`` writes)."""
    n = min(cfg.grid_captions, len(held["caption"]))
    captions = held["caption"][:n]
    columns: list[list] = [[to_pil(x) for x in held["image"][:n]]]
    index: list[dict] = []
    for i, mode in enumerate(modes):
        seed = cfg.seed + 100 + i
        chain = stack.generate(captions, mode=mode, s=s, seed=seed)
        columns += [[to_pil(x) for x in chain[0]], [to_pil(x) for x in chain[-1]]]
        index += gen.write_images(chain, samples_dir, [{"caption": c, "mode": mode, "seed": seed,
                                                         "prior": mode if mode in PRIOR_STAGES else None,
                                                         "models": stack.versions} for c in captions], mode)
    storage.write_json(storage.join(samples_dir, "index.json"), index)
    rows = [[col[r] for col in columns] for r in range(n)]
    header = ["real"] + [f"{m} {k}" for m in modes for k in (stack.size("decoder"), stack.size("upsampler2"))]
    picture = gen.grid(rows, captions, label_width=180, header=header)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def table_rows(metrics: dict[str, Any], modes: list[str]) -> list[dict]:
    """One row per metric, one column per mode (and ``real``, the reference)."""
    names: list[str] = []
    for key in metrics:
        if "/" in key and key.split("/", 1)[0] in modes:
            m = key.split("/", 1)[1]
            if m not in names:
                names.append(m)
    return [{"metric": m, **{mode: metrics.get(f"{mode}/{m}") for mode in modes}} for m in names]
