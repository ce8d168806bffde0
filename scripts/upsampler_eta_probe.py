"""How the upsamplers' DDIM eta and steps move what they keep of a real low-res image.

On a demo run's released upsampler 1 (and, with ``--upsampler2``, upsampler 2), fresh demo renders
(``unclip.data.demo_source``) at the upsampler's side are shrunk x4 and sampled back up under each
setting; the result is scored by PSNR against the real image and, for upsampler 1, by the run's
attribute judge (``eval_generation/judge``, 64 px) for the captioned colours and shapes, next to
bicubic upsampling. docs/training.md ("The upsamplers' sampler") has the numbers.

    .venv/bin/python scripts/upsampler_eta_probe.py work/demo/runs/RUN_ID [--images 128] [--upsampler2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from unclip.data import demo_source as ds
from unclip.train import image
from unclip.train import judge as J

# (DDIM steps, eta, seed) per row; the first is the sampler shipped before eta 1
SETTINGS = ((10, 0.0, 50), (25, 0.0, 50), (50, 0.0, 50), (10, 0.5, 50), (10, 1.0, 50), (10, 1.0, 7), (25, 1.0, 50),
            (5, 1.0, 50))


def psnr(x: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over images of each one's PSNR, images in [-1, 1]."""
    return float((10 * torch.log10(4 / ((x.clamp(-1, 1) - real) ** 2).mean((1, 2, 3)))).mean())


@torch.no_grad()
def upsample(model, low: torch.Tensor, steps: int, eta: float, seed: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = model.cfg.image_size
    out = []
    for i in range(0, len(low), batch):
        part = low[i:i + batch]
        x = model.diffusion().respaced(steps).sample(model, (len(part), 3, side, side), generator=g, eta=eta,
                                                     model_kwargs={"low_res": part})
        out.append(model.from_sample(x, part))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a demo run's folder (work/demo/runs/RUN_ID) with upsampler1/, upsampler2/ and "
                    "eval_generation/judge")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--upsampler2", action="store_true", help="also upsampler 2: PSNR at eta 0 and 1, 8 steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    up1, _ = image.load_release(f"{args.run}/upsampler1/model")
    judge = J.load_judge(f"{args.run}/eval_generation/judge")
    rng = np.random.default_rng(123)
    scenes = [ds._sample_scene(rng, 256, 256, "png") for _ in range(args.images)]
    pics = [ds._render(s, rng) for s in scenes]
    captions = [ds.dalle_caption(s, rng) for s in scenes]
    side = up1.cfg.image_size
    real = torch.stack([image.DecoderPreprocess(side)(p) for p in pics])
    low = J.downsample(real, side // image.FACTOR).clamp(-1, 1)

    def row(name: str, x: torch.Tensor) -> None:
        m = J.attribute_accuracy(judge, x, captions)
        print(f"{name:<32} psnr {psnr(x, real):6.2f}  colour_auc {m['colour_auc']:.3f}  shape_auc {m['shape_auc']:.3f}  "
              f"shape_acc {m['shape_acc']:.3f} (chance {m['shape_acc_chance']:.3f})", flush=True)

    print(f"upsampler 1: {len(real)} renders, {side // image.FACTOR} -> {side} px")
    row("bicubic", J.enlarge(low, (side, side)).clamp(-1, 1))
    for steps, eta, seed in SETTINGS:
        t0 = time.perf_counter()
        row(f"ddim {steps} eta {eta} seed {seed}", upsample(up1, low, steps, eta, seed, 32))
        print(f"  {time.perf_counter() - t0:.0f} s")
    row("ddim 10 eta 0, mean of 4", torch.stack([upsample(up1, low, 10, 0.0, s, 32) for s in (1, 2, 3, 4)]).mean(0))

    if args.upsampler2:
        up2, _ = image.load_release(f"{args.run}/upsampler2/model")
        side2 = up2.cfg.image_size
        pics2 = [ds._render(ds._sample_scene(rng, 256, 256, "jpeg"), rng) for _ in range(24)]
        real2 = torch.stack([image.DecoderPreprocess(side2)(p) for p in pics2])
        low2 = J.downsample(real2, side2 // image.FACTOR).clamp(-1, 1)
        print(f"upsampler 2: {len(real2)} renders, {side2 // image.FACTOR} -> {side2} px; bicubic psnr "
              f"{psnr(J.enlarge(low2, (side2, side2)), real2):.2f}")
        for eta in (0.0, 1.0):
            print(f"ddim 8 eta {eta}: psnr {psnr(upsample(up2, low2, 8, eta, 50, 8), real2):.2f}", flush=True)


if __name__ == "__main__":
    main()
