"""How much a released diffusion prior's prediction moves with its caption tokens, against its CLIP
text embedding.

The decoder once lost its caption inside its text encoder (docs/training.md, "The decoder's caption
path"); this asks the same of the priors' ``CaptionTransformer``. For caption pairs that differ in one
colour or one shape word it predicts x0 from the same x_t at a few timesteps with (tokens, text
embedding) of the first caption, and with the second caption's tokens only, embedding only, and both
swapped; it prints 1 - cosine between the normalised predictions, averaged over the pairs. A dead
token path shows as ~0 for "tokens only".

    .venv/bin/python scripts/prior_caption_probe.py --workdir work/demo [--run RUN_ID]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from unclip import catalog, storage
from unclip.generate import Stack

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]


def caption_pairs() -> tuple[list[str], list[str]]:
    a, b = [], []
    for i, shape in enumerate(SHAPES):
        colour = COLOURS[i]
        a += [f"A large {colour} {shape} at the top right."] * 2
        b += [f"A large {COLOURS[(i + 2) % 6]} {shape} at the top right.",
              f"A large {colour} {SHAPES[(i + 3) % 6]} at the top right."]
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--run", default=None, help="that run's prior (default: the latest released)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    where = catalog.locate(storage.absolute(args.workdir))[0]
    stack = Stack.load(where, run_id=args.run, kinds=("prior_diffusion",))
    model = stack.models["prior_diffusion"].eval()
    process = model.diffusion()
    scale = math.sqrt(model.cfg.embed_dim)
    captions_a, captions_b = caption_pairs()
    tokens_a, emb_a = stack.text(captions_a)
    tokens_b, emb_b = stack.text(captions_b)
    n = len(captions_a)
    keep = torch.zeros(n, dtype=torch.bool)
    g = torch.Generator().manual_seed(args.seed)
    print(f"prior {stack.versions['prior_diffusion']}; {n} caption pairs; mean text-embedding cosine "
          f"{float((emb_a * emb_b).sum(-1).mean()):.3f}; 1 - cosine of the x0 predictions:")
    with torch.no_grad():
        for step in (999, 500, 100):
            x0 = F.normalize(torch.randn(n, model.cfg.embed_dim, generator=g), dim=-1) * scale
            t = torch.full((n,), step)
            x_t = process.q_sample(x0, t, torch.randn(x0.shape, generator=g))

            def predict(tokens, emb, x_t=x_t, t=t):
                out = model(x_t, process.model_timesteps(t), tokens=tokens, text_emb=emb * scale, drop=keep)
                return F.normalize(out, dim=-1)

            base = predict(tokens_a, emb_a)
            moved = {name: float(1 - (base * predict(tok, emb)).sum(-1).mean())
                     for name, (tok, emb) in {"both swapped": (tokens_b, emb_b), "tokens only": (tokens_b, emb_a),
                                              "embedding only": (tokens_a, emb_b)}.items()}
            print(f"  t={step}: " + ", ".join(f"{k} {v:.4f}" for k, v in moved.items()))


if __name__ == "__main__":
    main()
