"""Does a CLIP architecture learn the demo's shapes? A proxy that needs no pipeline run.

Renders fresh demo scenes (``unclip.data.demo_source``, 256 px, shrunk to the tower's side) with a
dalle caption for every other scene and a clip (alt-text) caption for the rest, as the CLIP stage
mixes its two sources, and trains an open_clip architecture the project registers:

- contrastive (default): open_clip's ``ClipLoss``, AdamW (betas 0.9/0.98, weight decay 0.2 on the
  matrices) as ``train.clip`` has, 20 warm-up steps and a cosine over all steps (``train.clip``'s
  ``trainer.lr_at`` decays over the steps after the warm-up: slightly higher rates late); ``--hard-negatives`` adds, per
  caption, a copy with one shape word swapped for another to the image side's softmax (NegCLIP-style);
- ``--supervised``: the image tower alone with a linear head on the scenes' colour and shape labels
  (BCE), which asks whether the tower can learn shapes at all, whatever the objective.

Every ``--steps // 3`` steps it prints, on held-out scenes: text-to-image recall@5 (contrastive),
zero-shot shape accuracy (the prompt "a {colour} {shape}" ranked first names a shape in the scene),
and the linear probes of the image embedding (``judge.probe_auc``, chance 0.5) or, supervised, the
head's AUC. docs/training.md ("Why the demo's CLIP does not learn shape") has the numbers.

    .venv/bin/python scripts/clip_shape_proxy.py --arch unclip-tiny-timm [--steps 300] [--batch-size 64]
        [--hard-negatives] [--supervised] [--pairs 2000]
"""

from __future__ import annotations

import argparse
import math
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.data import clip as clip_data
from unclip.data import demo_source as ds
from unclip.data.retrieval import RecallCounter
from unclip.train import judge


def render(n: int, side: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """n scenes: images [n, 3, side, side] in [-1, 1], captions, colour and shape multi-hot labels."""
    images, captions, colours, shapes = [], [], [], []
    for i in range(n):
        scene = ds._sample_scene(rng, 256, 256, "png")
        img = ds._render(scene, rng).resize((side, side), resample=3)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        captions.append(ds.dalle_caption(scene, rng) if i % 2 else ds.clip_caption(scene, rng))
        c, s = judge.scene_labels(scene)
        colours.append(torch.from_numpy(c))
        shapes.append(torch.from_numpy(s))
    return torch.stack(images), captions, torch.stack(colours), torch.stack(shapes)


_WORDS = sorted(set(ds.SHAPES) | set(ds.PLURAL.values()), key=len, reverse=True)
_SHAPE_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.IGNORECASE)
_SINGULAR = {p: s for s, p in ds.PLURAL.items()}


def swap_shape(caption: str, rng: np.random.Generator) -> str:
    """The caption with one of its shape words replaced by another shape (same number); unchanged if none."""
    found = list(_SHAPE_WORD.finditer(caption))
    if not found:
        return caption
    m = found[int(rng.integers(len(found)))]
    word = m.group(0).lower()
    shape = _SINGULAR.get(word, word)
    new = [s for s in ds.SHAPES if s != shape][int(rng.integers(len(ds.SHAPES) - 1))]
    return caption[: m.start()] + (ds.PLURAL[new] if word in _SINGULAR else new) + caption[m.end():]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="unclip-tiny-timm")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--hard-negatives", action="store_true")
    ap.add_argument("--supervised", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    clip_data.register_project_configs()
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.arch)
    side = model.visual.image_size
    side = int(side[0] if isinstance(side, (tuple, list)) else side)
    rng = np.random.default_rng(args.seed)
    x, caps, c, s = render(args.pairs, side, rng)
    xt, capt, ct, st = render(args.heldout, side, rng)
    tok = open_clip.get_tokenizer(args.arch)
    tokens, tokens_t = tok(caps), tok(capt)
    n_col = len(ds.COLOURS)
    with torch.no_grad():
        width = model.visual(x[:1]).shape[1]
    head = nn.Linear(width, n_col + len(ds.SHAPES))
    trained = nn.ModuleList([model.visual, head]) if args.supervised else model
    decay = [p for p in trained.parameters() if p.dim() >= 2]
    rest = [p for p in trained.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01 if args.supervised else 0.2},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    prompts = [(col, shp) for col in ds.COLOURS for shp in ds.SHAPES]
    named = [set(torch.nonzero(r).flatten().tolist()) for r in ct], [set(torch.nonzero(r).flatten().tolist()) for r in st]
    g = torch.Generator().manual_seed(args.seed)
    hn_rng = np.random.default_rng(args.seed + 1)
    labels = torch.cat([c, s], 1)
    print(f"{args.arch}: image tower {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f}M parameters, "
          f"{'supervised' if args.supervised else 'contrastive'}{', hard negatives' if args.hard_negatives else ''}, "
          f"{args.steps} steps of {args.batch_size}, lr {args.lr}, {args.pairs} pairs", flush=True)
    t0 = time.time()
    trained.train()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, args.pairs, (args.batch_size,), generator=g)
        if args.supervised:
            loss = F.binary_cross_entropy_with_logits(head(model.visual(x[idx])), labels[idx])
        else:
            fi, ft, scale = model(x[idx], tokens[idx])[:3]
            if args.hard_negatives:
                fn = model.encode_text(tok([swap_shape(caps[i], hn_rng) for i in idx.tolist()]), normalize=True)
                target = torch.arange(len(idx))
                loss = (F.cross_entropy(scale * fi @ torch.cat([ft, fn]).T, target)
                        + F.cross_entropy(scale * ft @ fi.T, target)) / 2
            else:
                loss = loss_fn(fi, ft, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 3) == 0:
            trained.eval()
            with torch.no_grad():
                if args.supervised:
                    p = torch.sigmoid(head(model.visual(xt)))
                    line = (f"head colour AUC {judge._auc(p[:, :n_col], named[0]):.3f} "
                            f"shape AUC {judge._auc(p[:, n_col:], named[1]):.3f}")
                else:
                    fi = model.encode_image(xt, normalize=True)
                    ft = model.encode_text(tokens_t, normalize=True)
                    fp = model.encode_text(tok([f"a {col} {shp}" for col, shp in prompts]), normalize=True)
                    recall = RecallCounter()
                    recall.add(fi.numpy(), ft.numpy())
                    top = (fi @ fp.T).argmax(1).tolist()
                    zs = np.mean([st[i, ds.SHAPES.index(prompts[t][1])].item() for i, t in enumerate(top)])
                    line = (f"t2i recall@5 {recall.result()['t2i_recall@5']:.3f} zero-shot shape {zs:.3f} "
                            f"probe colour {judge.probe_auc(fi, ct):.3f} shape {judge.probe_auc(fi, st):.3f}")
            print(f"step {step} loss {loss.item():.3f} {line} ({time.time() - t0:.0f} s)", flush=True)
            trained.train()


if __name__ == "__main__":
    main()
